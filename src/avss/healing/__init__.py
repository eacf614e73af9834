"""Repairing a pruned model: training-free (the linear patch) and trained (LoRA, full, block replacement)."""
