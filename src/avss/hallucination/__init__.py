"""EAVSS: find hallucination-prone layers and mitigate them with contrastive training on those layers.

``pairs`` builds (question, truthful answer, hallucinated answers) sets with leak-free splits; ``batches``
turns them into prompt + answer token batches whose statistics mask covers the answer only; ``eavss`` holds
the pure HSAV / HSS / EAVSS math and ``scoring`` streams the statistics through a model; ``losses`` are the
contrastive objectives, ``mitigate`` the layer selection and training recipe, ``dola`` the DoLa decoding
peer, ``steering`` the ITI-style mean-difference peer, ``heldout`` the evaluation on test-split questions and
``workflow`` the command-line workflows. For measuring EAVSS itself: ``folds`` (question-level
cross-validation, the answer-leakage filter, refusal-style targets), ``answer_stats`` (per-answer sums that
recompute EAVSS for any labelling or subset) and ``significance`` (label-permutation null, top-k bootstrap).
"""

from avss.hallucination.eavss import COMBINERS, EavssScores, eavss_scores
from avss.hallucination.pairs import PAIR_SOURCES, SPLITS, Pair, load_pairs, split_of

__all__ = [
    "COMBINERS",
    "PAIR_SOURCES",
    "SPLITS",
    "EavssScores",
    "Pair",
    "eavss_scores",
    "load_pairs",
    "split_of",
]
