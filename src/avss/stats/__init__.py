"""Streamed, mergeable activation statistics: the float64 accumulators, the hook pass that fills them, their
merge across processes and their checkpoint."""
