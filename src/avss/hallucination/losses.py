"""Pure loss functions for mitigation: masked pooling, answer NLL, InfoNCE and the log-prob margin.

Shapes: ``B`` rows, ``T`` tokens, ``D`` channels, ``G`` questions, ``K`` hallucinated answers per question.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D) mean over the tokens ``mask`` (B, T) selects; rows with no token give zeros."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)


# How an answer's token log-likelihoods become one number: ``sum`` is the sequence log-likelihood, which the
# method's ``--contrast logprob`` margin and the multiple-choice metrics (MC1/MC2) compare; ``mean`` is the
# per-token mean, which favours short or long answers less but is a different objective.
REDUCTIONS = ("sum", "mean")


def answer_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed log-likelihood of the answer tokens and their number, both (B,); position t predicts
    token t + 1. One log-softmax serves both reductions (it is the costly step, over the vocabulary)."""
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = answer_mask[:, 1:].to(picked.dtype)
    return (picked * mask).sum(dim=1), mask.sum(dim=1)


def reduce_logprobs(sums: torch.Tensor, counts: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sequence (``sum``) or per-token mean (``mean``) log-likelihood from :func:`answer_logprobs`."""
    if reduction == "sum":
        return sums
    if reduction == "mean":
        return sums / counts.clamp_min(1)
    raise ValueError(f"unknown reduction {reduction!r}; choose from {', '.join(REDUCTIONS)}")


def answer_nll(logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean negative log-likelihood of the answer tokens, (B,): the LM loss's per-token form."""
    return -reduce_logprobs(*answer_logprobs(logits, input_ids, answer_mask), "mean")


def infonce(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over questions of ``-log softmax`` of the positive among cosine similarities to the query / tau.

    ``query`` (G, D), ``positive`` (G, D), ``negatives`` (G, K, D).
    """
    candidates = torch.cat([positive.unsqueeze(1), negatives], dim=1)
    similarity = F.cosine_similarity(query.unsqueeze(1).float(), candidates.float(), dim=-1) / tau
    return F.cross_entropy(similarity, torch.zeros(len(query), dtype=torch.long, device=query.device))


def logprob_margin(truthful: torch.Tensor, hallucinated: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean softplus of ``margin - (lp(T) - lp(H))`` over questions and hallucinated answers.

    ``truthful`` (G,) and ``hallucinated`` (G, K) are log-likelihoods of each answer, reduced as
    :func:`reduce_logprobs` does (sequence sums in the method); the loss is a smooth hinge pushing every
    truthful answer above each hallucinated one.
    """
    return F.softplus(margin - (truthful.unsqueeze(1) - hallucinated)).mean()


# The contrastive objectives, by their `--contrast` name.
CONTRASTS = ("infonce", "logprob")
