"""DoLa (Chuang et al., 2024): contrast the final layer's next-token distribution with a premature layer's.

:class:`DolaModel` wraps a causal LM so that anything calling ``model(...).logits`` or ``model.generate(...)``
(the evaluation engine, for log-likelihood scoring and greedy generation) sees DoLa scores instead:
``log p_final - log p_premature``, renormalized, where the premature layer is chosen per token among the
candidate layers as the one with the largest Jensen-Shannon divergence from the final layer, and tokens
outside the final layer's plausible set (``p < relative_top x max p``) are pushed to ``relative_top_value``.

Transformers 5 moved ``generate(dola_layers=...)`` to a hub-hosted decoding recipe that needs network
access, so greedy DoLa decoding is done here too (no KV cache: fine for short answers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from avss.adapters import get_adapter

FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm")


def candidate_layers(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """DoLa's buckets as in transformers: ``low`` = even depths of the first half, ``high`` = of the second
    half (hidden-state indices, 0 = embeddings), or explicit indices."""
    if isinstance(spec, str) and spec in ("low", "high"):
        half = num_layers // 2
        return list(range(0, half, 2)) if spec == "low" else list(range(half, num_layers, 2))
    layers = [int(x) for x in (spec.split(",") if isinstance(spec, str) else spec)]
    if not layers or not all(0 <= layer < num_layers for layer in layers):
        raise ValueError(f"DoLa layers must be in 0..{num_layers - 1}, got {spec!r}")
    return layers


def jensen_shannon(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """JSD between distributions given as log-probabilities over the last axis."""
    logm = torch.logaddexp(logp, logq) - math.log(2)
    kl_pm = (logp.exp() * (logp - logm)).sum(-1)
    kl_qm = (logq.exp() * (logq - logm)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def dola_contrast(
    final: torch.Tensor,
    premature: torch.Tensor,
    relative_top: float = 0.1,
    relative_top_value: float = -1000.0,
) -> torch.Tensor:
    """DoLa log-scores from final (..., V) and per-candidate premature (C, ..., V) log-probabilities."""
    divergence = jensen_shannon(final.unsqueeze(0), premature)  # (C, ...)
    chosen = divergence.argmax(dim=0)
    picked = torch.gather(premature, 0, chosen[None, ..., None].expand(1, *final.shape)).squeeze(0)
    scores = (final - picked).log_softmax(dim=-1)
    if relative_top > 0:
        floor = final.max(dim=-1, keepdim=True).values + math.log(relative_top)
        scores = torch.where(final < floor, torch.full_like(scores, relative_top_value), scores)
    return scores


class DolaModel(nn.Module):
    """A causal LM whose logits are DoLa scores; see the module docstring."""

    def __init__(self, model: nn.Module, layers: str | Sequence[int] = "high", relative_top: float = 0.1):
        super().__init__()
        self.model = model
        self.config = model.config
        self.candidates = candidate_layers(layers, get_adapter(model).num_layers)
        self.relative_top = relative_top
        base = model.base_model
        self.final_norm = next(
            (getattr(base, n) for n in FINAL_NORM_NAMES if hasattr(base, n)), nn.Identity()
        )

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def can_generate(self) -> bool:
        return True

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0
    ) -> Any:
        """DoLa scores for the last ``logits_to_keep`` positions (all when 0), as ``.logits``."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        head = self.model.get_output_embeddings()
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        final = outputs.logits[:, keep].float().log_softmax(-1)
        premature = torch.stack(
            [
                head(self.final_norm(outputs.hidden_states[i][:, keep])).float().log_softmax(-1)
                for i in self.candidates
            ]
        )
        return SimpleNamespace(logits=dola_contrast(final, premature, self.relative_top))

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
