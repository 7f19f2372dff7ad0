"""lm-evaluation-harness tasks on every stage: the adapter that serves them from a stage as deployed, the
offline tasks shipped with optitool, and paired comparisons with the baseline on the same items."""
