"""DoLa (Chuang et al., 2024): contrast the final layer's next-token distribution with a premature layer's.

:class:`DolaModel` wraps a causal LM so that anything calling ``model(...).logits`` or ``model.generate(...)``
(the evaluation engine, for log-likelihood scoring and greedy generation) sees DoLa scores instead: per token,
``log p_mature - log p_premature`` where the mature layer is the last one and the premature layer is picked
per token among candidate layers as the one that diverges most from it. The engine sums these scores over an
answer's tokens as they are (:attr:`DolaModel.logits_are_scores`); it does not log-softmax them again.

:class:`DolaConfig` holds every choice that differs between implementations, and :data:`DOLA_SETTINGS` names
two of them:

``paper`` (the default): DoLa as its authors score TruthfulQA multiple choice (voidism/DoLa,
``tfqa_mc_eval.py`` calling ``DoLa.lm_score`` with ``mode="dola"``, ``relative_top=0.0``,
``post_softmax=False``):

- candidates: the authors' TruthfulQA bucket, even layers of the second half (``16,18,...,30`` of LLaMA-7B's
  32, their README's ``--early-exit-layers 16,...,30,32``; the last 10 even layers above 40 layers). Their
  *other* tasks (FACTOR, GSM8K, StrategyQA) use the first half, ``low`` here;
- early exit: the LM head applied to the raw hidden state, without the final norm (their modified
  ``LlamaForCausalLM`` computes ``lm_head(hidden_states[layer])``; the mature layer, ``hidden_states[-1]``, is
  already normed). Soft-capping, where an architecture has it, is applied to every layer's logits;
- selection: their divergence ``0.5 * (KL(M || p_mature) + KL(M || p_premature))`` averaged over the
  vocabulary, ``M = (p_mature + p_premature) / 2`` (``F.kl_div(log_p, M)`` computes ``KL(M || p)``; this is
  not the Jensen-Shannon divergence, whose KL terms run the other way);
- score: the raw difference, no relative-top filter, no renormalization.

``avss_v1``: what avss did before, kept for comparison: the ``high`` bucket, early exit through the final
norm, the true Jensen-Shannon divergence, tokens whose mature probability is below ``0.1 x`` the top one set
to -1000, and a log-softmax over the vocabulary after that mask (the paper's equation: a softmax over the
plausible set).

Transformers 5 moved ``generate(dola_layers=...)`` to a hub-hosted decoding recipe that needs network access,
so greedy DoLa decoding is done here too (no KV cache: fine for short answers). For generation the authors
filter with ``relative_top=0.1``; without a filter the argmax of the raw difference is often a token the final
layer finds implausible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from avss.adapters import get_adapter
from avss.errors import DolaConfigError

BUCKETS = ("paper", "low", "high")
DIVERGENCES = ("authors", "js")


def candidate_layers(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """Premature-layer candidates as hidden-state indices (0 = embeddings, ``num_layers`` = the mature layer).

    ``low`` / ``high`` are the even layers of the first / second half (for more than 40 layers: the first /
    last 10 even layers), as the DoLa authors' README lists them for LLaMA 7B-65B and as transformers'
    ``dola_layers`` resolves them; ``paper`` is the authors' bucket for TruthfulQA, ``high``. Anything else is
    a list of indices (or a comma-separated string of them).
    """
    if spec == "paper":
        spec = "high"
    if spec == "low":
        return list(range(0, num_layers // 2 if num_layers <= 40 else 20, 2))
    if spec == "high":
        return list(range(num_layers // 2 if num_layers <= 40 else num_layers - 20, num_layers, 2))
    layers = _parse_layers(spec)
    if not all(layer < num_layers for layer in layers):
        raise DolaConfigError(f"DoLa layers must be in 0..{num_layers - 1} for this model, got {spec!r}")
    return list(layers)


def _parse_layers(spec: str | Sequence[int]) -> tuple[int, ...]:
    try:
        layers = tuple(int(x) for x in (spec.split(",") if isinstance(spec, str) else spec))
    except (TypeError, ValueError):
        raise DolaConfigError(
            f"DoLa buckets must be one of {', '.join(BUCKETS)} or comma-separated layer indices, got {spec!r}"
        ) from None
    if not layers or min(layers) < 0:
        raise DolaConfigError(f"DoLa layers must be non-negative hidden-state indices, got {spec!r}")
    return layers


@dataclass(frozen=True)
class DolaConfig:
    """How DoLa turns two layers' logits into a score; the defaults are the authors' multiple-choice setting.

    ``buckets``: ``paper``, ``low``, ``high`` or explicit hidden-state indices (see :func:`candidate_layers`).
    ``relative_top``: tokens whose mature probability is below ``relative_top x`` the largest get
    ``relative_top_value`` (0 disables the filter). ``renormalize``: log-softmax the (filtered) scores over
    the vocabulary. ``divergence``: ``authors`` (their code's ``KL(M || p)`` terms) or ``js``
    (Jensen-Shannon).
    ``premature_norm``: pass premature hidden states through the final norm before the LM head.
    """

    buckets: str | tuple[int, ...] = "paper"
    relative_top: float = 0.0
    renormalize: bool = False
    relative_top_value: float = -1000.0
    divergence: str = "authors"
    premature_norm: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.buckets, str) and self.buckets in BUCKETS):
            object.__setattr__(self, "buckets", _parse_layers(self.buckets))
        if not 0.0 <= self.relative_top < 1.0:
            raise DolaConfigError(f"DoLa relative_top must be in [0, 1), got {self.relative_top}")
        if not math.isfinite(self.relative_top_value):
            raise DolaConfigError(f"DoLa relative_top_value must be finite, got {self.relative_top_value}")
        if self.divergence not in DIVERGENCES:
            raise DolaConfigError(
                f"DoLa divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}"
            )

    @classmethod
    def named(cls, name: str, **overrides: Any) -> DolaConfig:
        """A setting of :data:`DOLA_SETTINGS` by name, with some fields replaced."""
        if name not in DOLA_SETTINGS:
            raise DolaConfigError(f"unknown DoLa setting {name!r}; choose one of {', '.join(DOLA_SETTINGS)}")
        return replace(DOLA_SETTINGS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["buckets"] = self.buckets if isinstance(self.buckets, str) else list(self.buckets)
        return record


DOLA_SETTINGS: dict[str, DolaConfig] = {
    "paper": DolaConfig(),
    "avss_v1": DolaConfig(
        buckets="high", relative_top=0.1, renormalize=True, divergence="js", premature_norm=True
    ),
}


def divergence(
    log_mature: torch.Tensor,
    log_premature: torch.Tensor,
    kind: str = "authors",
    mature: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position divergence between distributions given as log-probabilities over the last axis
    (broadcast), averaged over the vocabulary as the authors do (a constant factor: the argmax is the same).

    ``authors``: ``0.5 * (KL(M || p) + KL(M || q))``, their ``F.kl_div(log_p, M)`` terms; ``js``:
    ``0.5 * (KL(p || M) + KL(q || M))``, the Jensen-Shannon divergence. ``M = (p + q) / 2``. ``mature`` may
    pass ``log_mature.exp()`` when one mature distribution is compared with many candidates: each pass over
    a vocabulary-wide tensor costs as much as the LM head.
    """
    p = log_mature.exp() if mature is None else mature
    q = log_premature.exp()
    mixture = 0.5 * (p + q)
    if kind == "authors":
        # sum M (log M - log p) + M (log M - log q), in one pass; xlogy keeps M = 0 at 0 as kl_div does.
        terms = 2 * torch.xlogy(mixture, mixture) - mixture * (log_mature + log_premature)
    elif kind == "js":
        log_mixture = mixture.log()
        terms = torch.xlogy(p, p) + torch.xlogy(q, q) - (p + q) * log_mixture
    else:
        raise DolaConfigError(f"DoLa divergence must be one of {', '.join(DIVERGENCES)}, got {kind!r}")
    return 0.5 * terms.mean(-1)


def select_premature(
    log_mature: torch.Tensor, log_candidates: torch.Tensor, kind: str = "authors"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, log_premature)``: per position, the candidate (C, ..., V) that diverges most from
    ``log_mature`` (..., V), first one on ties, and its log-probabilities (..., V)."""
    chosen = divergence(log_mature.unsqueeze(0), log_candidates, kind).argmax(dim=0)
    picked = torch.gather(log_candidates, 0, chosen[None, ..., None].expand(1, *log_mature.shape)).squeeze(0)
    return chosen, picked


def contrast(
    log_mature: torch.Tensor,
    log_premature: torch.Tensor,
    relative_top: float = 0.0,
    relative_top_value: float = -1000.0,
    renormalize: bool = False,
) -> torch.Tensor:
    """DoLa scores ``log_mature - log_premature`` (..., V). With ``relative_top > 0``, tokens whose mature
    probability is below ``relative_top x`` the largest get ``relative_top_value``; with ``renormalize`` the
    result is log-softmaxed over the vocabulary (after the mask, i.e. over the plausible set)."""
    scores = log_mature - log_premature
    if relative_top > 0:
        floor = log_mature.max(dim=-1, keepdim=True).values + math.log(relative_top)
        scores = torch.where(log_mature < floor, torch.full_like(scores, relative_top_value), scores)
    return scores.log_softmax(dim=-1) if renormalize else scores


class DolaModel(nn.Module):
    """A causal LM whose ``.logits`` are DoLa scores; see the module docstring."""

    logits_are_scores = True

    def __init__(self, model: nn.Module, config: DolaConfig | None = None):
        super().__init__()
        self.model = model
        self.config = model.config
        self.dola = config or DolaConfig()
        self.adapter = get_adapter(model)
        self.candidates = candidate_layers(self.dola.buckets, self.adapter.num_layers)
        # How often each candidate was picked, over every scored position (the authors' premature_layer_dist).
        self.picked_counts = dict.fromkeys(self.candidates, 0)

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def can_generate(self) -> bool:
        return True

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        cache: Any = None,
        use_cache: bool | None = None,
    ) -> CausalLMOutputWithPast:
        """DoLa scores for the last ``logits_to_keep`` positions (all when 0) as ``.logits``; ``cache`` and
        ``use_cache`` go to the wrapped model (the engine scores answer options against a shared context)."""
        kwargs: dict[str, Any] = {"use_cache": use_cache} if use_cache is not None else {}
        if cache is not None:
            kwargs["cache"] = cache
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        log_mature = outputs.logits[:, keep].float().log_softmax(-1)
        mature = log_mature.exp()
        # One candidate at a time, keeping the most divergent so far: memory of two vocabularies per
        # position instead of one per candidate. Strictly greater keeps the first on ties, as argmax does.
        best_div, best_log, best_index = None, None, None
        for index, layer in enumerate(self.candidates):
            hidden = outputs.hidden_states[layer][:, keep]
            log_premature = self.adapter.early_exit_logits(hidden, norm=self.dola.premature_norm)
            log_premature = log_premature.float().log_softmax(-1)
            div = divergence(log_mature, log_premature, self.dola.divergence, mature)
            if best_div is None:
                best_div, best_log = div, log_premature
                best_index = torch.zeros_like(div, dtype=torch.long)
            else:
                better = div > best_div
                best_div = torch.where(better, div, best_div)
                best_log = torch.where(better[..., None], log_premature, best_log)
                best_index = torch.where(better, index, best_index)
        # Scored positions are the last ones of the mask (a cached context sits before them, padding aside).
        width = best_index.shape[1]
        mask = attention_mask[:, -width:].bool() if attention_mask is not None else best_index >= 0
        for index, count in zip(*best_index[mask].unique(return_counts=True), strict=True):
            self.picked_counts[self.candidates[int(index)]] += int(count)
        scores = contrast(
            log_mature,
            best_log,
            self.dola.relative_top,
            self.dola.relative_top_value,
            self.dola.renormalize,
        )
        return CausalLMOutputWithPast(logits=scores, cache=getattr(outputs, "cache", None))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        generation_config: Any,
        stopping_criteria: Any = None,
        **_: Any,
    ) -> torch.Tensor:
        """Greedy DoLa decoding for left-padded batches; finished rows are padded with ``pad_token_id``."""
        eos = generation_config.eos_token_id
        pad = generation_config.pad_token_id
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        for _ in range(generation_config.max_new_tokens):
            scores = self.forward(input_ids, attention_mask, logits_to_keep=1).logits[:, -1]
            token = torch.where(done, torch.full_like(done, pad, dtype=torch.long), scores.argmax(-1))
            input_ids = torch.cat([input_ids, token[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, (~done).long()[:, None]], dim=1)
            done |= token == eos if eos is not None else torch.zeros_like(done)
            if stopping_criteria:
                done |= stopping_criteria(input_ids, scores)
            if done.all():
                break
        return input_ids
