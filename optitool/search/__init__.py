"""Accuracy-aware search over pipeline settings: the `[search]` table, Optuna for the sampling, trials as
ordinary runs in their own folders, winners re-measured side by side."""
