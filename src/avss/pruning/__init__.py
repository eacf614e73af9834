"""Removing blocks: the selection rules, one-shot and iterative selection with any scorer, the one pruning
path and its saved record, sublayer removal and GGUF output."""
