"""Model loaders: turn a `[model]` table into a model artifact. Registered by the core plugin like any other."""
