"""Built-in tasks; importing this package registers them (one module per benchmark family)."""

from avss.evaluation.tasks import (
    arc,
    boolq,
    lambada,
    open_qa,
    openbookqa,
    perplexity,
    piqa,
    sciq,
    sentiment,
    truthfulqa,
    wikiqa,
    winogrande,
)

__all__ = [
    "arc",
    "boolq",
    "lambada",
    "open_qa",
    "openbookqa",
    "perplexity",
    "piqa",
    "sciq",
    "sentiment",
    "truthfulqa",
    "wikiqa",
    "winogrande",
]
