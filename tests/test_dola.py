"""DoLa: premature-layer selection, the contrast with and without the relative-top filter, the buckets, the
options' validation, and the paper setting's multiple-choice score against a re-implementation from a tiny
model's hidden states."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _tiny import tiny_model, tiny_tokenizer
from avss.adapters import get_adapter
from avss.errors import AvssError
from avss.evaluation import LanguageModel
from avss.evaluation.engine import LoglikelihoodRequest
from avss.hallucination.dola import (
    DOLA_SETTINGS,
    DolaConfig,
    DolaConfigError,
    DolaModel,
    candidate_layers,
    contrast,
    divergence,
    select_premature,
)

EPS = torch.finfo(torch.float32).eps
# Two float32 paths to one quantity agree to rounding accumulated along the path, which scales with the
# magnitude of what is summed; the tiny models' reductions have <= 64 terms, so 64 units of round-off.
PATHS = 64 * EPS

MATURE = [0.5, 0.3, 0.2]
CANDIDATES = [[0.1, 0.8, 0.1], [0.6, 0.399, 0.001]]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True))


def _log(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).log()


def test_divergences_match_hand_values_and_pick_different_candidates() -> None:
    by_hand = {"authors": [], "js": []}
    for q in CANDIDATES:
        m = [(a + b) / 2 for a, b in zip(MATURE, q, strict=True)]
        by_hand["authors"].append(0.5 * (_kl(m, MATURE) + _kl(m, q)) / 3)  # mean over the 3 tokens
        by_hand["js"].append(0.5 * (_kl(MATURE, m) + _kl(q, m)) / 3)
    # authors: 0.0535 vs 0.0676 -> the second candidate; Jensen-Shannon: 0.0467 vs 0.0241 -> the first.
    assert by_hand["authors"][1] > by_hand["authors"][0] and by_hand["js"][0] > by_hand["js"][1]
    mature, candidates = _log([MATURE]), _log(CANDIDATES)[:, None]  # (C=2, positions=1, V=3)
    for kind, expected in by_hand.items():
        got = divergence(mature[None], candidates, kind)[:, 0]
        torch.testing.assert_close(got, torch.tensor(expected), rtol=PATHS, atol=PATHS)
        chosen, picked = select_premature(mature, candidates, kind)
        winner = max(range(2), key=expected.__getitem__)
        assert chosen.tolist() == [winner]
        assert torch.equal(picked[0], candidates[winner, 0])


def test_selection_is_per_position_and_first_on_ties() -> None:
    mature = _log([MATURE, MATURE])
    candidates = torch.stack([_log([CANDIDATES[0], MATURE]), _log([CANDIDATES[1], MATURE])])
    chosen, picked = select_premature(mature, candidates, "authors")
    assert chosen.tolist() == [1, 0]  # position 1: both candidates equal the mature layer, divergence 0
    assert torch.equal(picked, torch.stack([candidates[1, 0], candidates[0, 1]]))


def test_relative_top_zero_leaves_the_difference_raw() -> None:
    mature, premature = _log([MATURE]), _log([CANDIDATES[1]])
    scores = contrast(mature, premature, relative_top=0.0)
    assert torch.equal(scores, mature - premature)  # no mask, no log-softmax
    assert torch.logsumexp(scores, -1).item() > 1.0  # far from normalized: log(0.5/0.6+0.3/0.399+0.2/0.001)


def test_relative_top_masks_implausible_tokens_and_renormalize_log_softmaxes() -> None:
    mature = _log([[0.6, 0.35, 0.05]])  # 0.05 < 0.1 * 0.6: the third token leaves the plausible set
    premature = _log([[0.2, 0.3, 0.5]])
    masked = contrast(mature, premature, relative_top=0.1)
    diff = mature - premature
    assert masked[0, 2].item() == -1000.0
    assert torch.equal(masked[0, :2], diff[0, :2])
    kept = contrast(mature, premature, relative_top=0.05)  # 0.05 is not below 0.05 * 0.6 = 0.03
    assert torch.equal(kept, diff)
    renormalized = contrast(mature, premature, relative_top=0.1, renormalize=True)
    torch.testing.assert_close(renormalized, masked.log_softmax(-1), rtol=0, atol=0)
    # Over the plausible set the renormalized scores are a log-softmax of the difference alone.
    torch.testing.assert_close(renormalized[0, :2], diff[0, :2].log_softmax(-1), rtol=PATHS, atol=PATHS)


@pytest.mark.parametrize(
    ("depth", "low", "high"),
    [
        (4, [0], [2]),
        (8, [0, 2], [4, 6]),
        (30, list(range(0, 15, 2)), list(range(15, 30, 2))),  # SmolLM2-135M: 15, 17, ..., 29
        (32, list(range(0, 16, 2)), list(range(16, 32, 2))),  # LLaMA-7B, the authors' README
        (40, list(range(0, 20, 2)), list(range(20, 40, 2))),  # LLaMA-13B
        (60, list(range(0, 20, 2)), list(range(40, 60, 2))),  # LLaMA-30B: ten layers per bucket above 40
        (80, list(range(0, 20, 2)), list(range(60, 80, 2))),  # LLaMA-65B
    ],
)
def test_buckets_for_several_depths(depth: int, low: list[int], high: list[int]) -> None:
    assert candidate_layers("low", depth) == low
    assert candidate_layers("high", depth) == high
    assert candidate_layers("paper", depth) == high  # the authors' TruthfulQA bucket
    assert candidate_layers("1,3", depth) == [1, 3]


@pytest.mark.parametrize(
    "options",
    [
        {"relative_top": -0.1},
        {"relative_top": 1.0},
        {"relative_top_value": float("-inf")},
        {"divergence": "kl"},
        {"buckets": "middle"},
        {"buckets": ()},
        {"buckets": (0, -1)},
    ],
)
def test_bad_options_fail_before_any_model_loads(options: dict) -> None:
    with pytest.raises(DolaConfigError) as info:
        DolaConfig(**options)
    assert isinstance(info.value, AvssError)


def test_named_settings_and_layers_beyond_the_model() -> None:
    paper = DolaConfig.named("paper")
    assert paper == DolaConfig() and paper.relative_top == 0.0 and not paper.renormalize
    assert paper.buckets == "paper" and paper.divergence == "authors" and not paper.premature_norm
    old = DolaConfig.named("avss_v1")
    assert (old.relative_top, old.renormalize, old.buckets, old.divergence) == (0.1, True, "high", "js")
    assert DolaConfig.named("paper", relative_top=0.1).relative_top == 0.1
    assert DolaConfig(buckets="0,2").buckets == (0, 2)
    assert set(DOLA_SETTINGS) == {"paper", "avss_v1"}
    with pytest.raises(DolaConfigError, match="unknown DoLa setting"):
        DolaConfig.named("nope")
    with pytest.raises(DolaConfigError, match=r"0\.\.3"):
        DolaModel(tiny_model("llama", num_layers=4), DolaConfig(buckets=(1, 4)))


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2", "opt"])
def test_early_exit_of_the_last_hidden_state_gives_the_model_logits(model_type: str) -> None:
    """The adapter's final norm, head and soft-cap reproduce the model's own logits (the last hidden state
    is already normed, so it exits without the norm); Gemma 2's soft-cap is in the table."""
    model = tiny_model(model_type, num_layers=2)
    if model_type == "gemma2":
        model.config.final_logit_softcapping = 2.0  # small enough that the cap changes the logits
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        adapter = get_adapter(model)
        got = adapter.early_exit_logits(out.hidden_states[-1], norm=False)
    scale = out.logits.abs().max().item()
    torch.testing.assert_close(got, out.logits, rtol=PATHS, atol=PATHS * scale)
    if model_type == "gemma2":
        assert out.logits.abs().max().item() < 2.0
    assert not isinstance(adapter.final_norm(), torch.nn.Identity)


def _direct_dola_score(model: torch.nn.Module, tokens: list[int], n: int, layers: list[int]) -> tuple:
    """DoLa's ``lm_score(mode="dola", relative_top=0, post_softmax=False)`` written out position by position
    from the hidden states, in float64: ``lm_head(hidden_states[l])`` for candidates, the last layer's logits
    as the mature ones, their ``kl_div`` divergence, the argmax layer per position, the summed difference."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    head = model.get_output_embeddings().weight.double()
    total, magnitude, picked = 0.0, 0.0, []
    for position in range(len(tokens) - n - 1, len(tokens) - 1):
        target = tokens[position + 1]
        mature = out.logits[0, position].double().log_softmax(-1)
        best = None
        for layer in layers:
            premature = (out.hidden_states[layer][0, position].double() @ head.T).log_softmax(-1)
            m = 0.5 * (mature.exp() + premature.exp())
            js = 0.5 * (
                F.kl_div(mature, m, reduction="none").mean() + F.kl_div(premature, m, reduction="none").mean()
            )
            if best is None or js > best[0]:
                best = (js, layer, premature)
        _, layer, premature = best
        picked.append(layer)
        total += (mature[target] - premature[target]).item()
        magnitude += abs(mature[target].item()) + abs(premature[target].item())
    return total, magnitude, picked


@pytest.mark.parametrize("buckets", ["paper", (0, 1, 2, 3, 5)])
def test_paper_setting_mc_score_equals_a_direct_reimplementation(buckets) -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", num_layers=8, seed=3)
    dola = DolaModel(model, DolaConfig(buckets=buckets))
    requests = [
        LoglikelihoodRequest("Q: Where is Paris?\nA:", " In France."),
        LoglikelihoodRequest("Q: Where is Paris?\nA:", " On the moon, of course."),
        LoglikelihoodRequest("Q: 2+2?\nA:", " 4"),
    ]
    shared = LanguageModel(dola, tokenizer, batch_size=2)
    results = shared.loglikelihood(requests)  # options of one question share the context's KV cache
    padded = LanguageModel(dola, tokenizer, batch_size=3, share_context=False).loglikelihood(requests)
    layers = candidate_layers(buckets, 8)
    picked_any = set()
    for request, result, other in zip(requests, results, padded, strict=True):
        tokens, n = shared.encode_request(request)
        expected, magnitude, picked = _direct_dola_score(model, tokens, n, layers)
        picked_any.update(picked)
        assert result.logprob == pytest.approx(expected, abs=PATHS * magnitude)
        assert other.logprob == pytest.approx(expected, abs=PATHS * magnitude)
    if not isinstance(buckets, str):
        assert len(picked_any) > 1  # the selection really varies by position here
    assert set(dola.picked_counts) == set(layers) and sum(dola.picked_counts.values()) > 0


def test_perplexity_of_dola_scores_is_refused() -> None:
    """DoLa's contrast scores are no distribution over the vocabulary, so an NLL summed from them is not a
    perplexity: the engine refuses it instead of returning a number."""
    lm = LanguageModel(DolaModel(tiny_model("llama", num_layers=4)), tiny_tokenizer())
    with pytest.raises(AvssError, match="accuracy tasks only"):
        lm.rolling_nll(["Paris is the capital of France."], max_length=16)
