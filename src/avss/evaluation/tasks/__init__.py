"""Built-in tasks; importing this package registers them (one module per benchmark family)."""

from avss.evaluation.tasks import open_qa, perplexity, sciq, sentiment, truthfulqa, wikiqa

__all__ = ["open_qa", "perplexity", "sciq", "sentiment", "truthfulqa", "wikiqa"]
