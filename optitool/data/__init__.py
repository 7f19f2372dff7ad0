"""Data: examples from files or callables, deterministic splits, and model inputs made from them."""
