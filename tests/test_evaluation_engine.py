"""The batched engine against direct, one-sequence-at-a-time computations on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch

from _precision import float32_approx
from _tiny import tiny_model, tiny_tokenizer
from _tiny_eval import bpe_llama, bpe_tokenizer
from avss.evaluation import engine
from avss.evaluation.engine import LanguageModel, LoglikelihoodRequest, cut_at_stop_strings, perplexity

REQUESTS = [
    LoglikelihoodRequest("Q: What is the capital of France?\nA:", " Paris"),
    LoglikelihoodRequest("Q: What is the capital of France?\nA:", " Paris is the capital of France."),
    LoglikelihoodRequest("The quick brown fox", " jumps over the lazy dog."),
    LoglikelihoodRequest("Water boils at ", "100 degrees"),  # trailing space moves to the continuation
    LoglikelihoodRequest("It was a", " lovely film"),
    LoglikelihoodRequest("", "Telescopes use lenses."),  # empty context: conditioned on the BOS token
]


@pytest.fixture(scope="module")
def bpe():
    return bpe_llama(), bpe_tokenizer()


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Reference: one unpadded forward over BOS + context + continuation, continuation logprobs summed."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    context_ids = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    ids = [tokenizer.bos_token_id, *whole]
    n = len(whole) - len(context_ids)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(float(logprobs[p - 1, ids[p]]) for p in range(len(ids) - n, len(ids)))


def test_loglikelihood_matches_direct_computation(bpe):
    model, tokenizer = bpe
    results = LanguageModel(model, tokenizer, batch_size=4).loglikelihood(REQUESTS)
    for request, result in zip(REQUESTS, results, strict=True):
        expected = direct_loglikelihood(model, tokenizer, request.context, request.continuation)
        assert result.logprob == float32_approx(expected)
        assert result.logprob < 0


def test_continuation_tokens_are_those_beyond_the_context(bpe):
    model, tokenizer = bpe
    lm = LanguageModel(model, tokenizer)
    assert lm.prefix_ids == [tokenizer.bos_token_id]
    tokens, n = lm.encode_request(LoglikelihoodRequest("A:", " Paris"))
    assert tokens[-n:] == tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert tokens[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_batched_and_unbatched_loglikelihoods_agree(kind):
    model, tokenizer = (bpe_llama(), bpe_tokenizer()) if kind == "bpe" else (tiny_model(), tiny_tokenizer())
    one = LanguageModel(model, tokenizer, batch_size=1).loglikelihood(REQUESTS)
    many = LanguageModel(model, tokenizer, batch_size=8).loglikelihood(REQUESTS)
    for a, b in zip(one, many, strict=True):
        assert a.logprob == float32_approx(b.logprob)
        assert (a.is_greedy, a.num_tokens) == (b.is_greedy, b.num_tokens)


def test_memory_budget_splits_batches_without_changing_results(bpe, monkeypatch):
    model, tokenizer = bpe
    expected = LanguageModel(model, tokenizer, batch_size=8).loglikelihood(REQUESTS)
    monkeypatch.setattr(engine, "LOGITS_BUDGET_BYTES", 1)
    forwards = []
    lm = LanguageModel(model, tokenizer, batch_size=8)
    original = lm._forward_tails
    monkeypatch.setattr(lm, "_forward_tails", lambda rows: forwards.append(len(rows)) or original(rows))
    for a, b in zip(lm.loglikelihood(REQUESTS), expected, strict=True):
        assert a.logprob == float32_approx(b.logprob)
    assert set(forwards) == {1}


def test_duplicate_requests_are_scored_once(bpe):
    model, tokenizer = bpe
    calls = []

    class Counting:
        def add_total(self, n):
            calls.append(n)

        def advance(self, n):
            pass

    lm = LanguageModel(model, tokenizer, progress=Counting())
    results = lm.loglikelihood([REQUESTS[0], REQUESTS[1], REQUESTS[0]])
    assert calls == [2]
    assert results[0] == results[2]


def test_long_context_is_truncated_from_the_left(bpe):
    model, tokenizer = bpe
    lm = LanguageModel(model, tokenizer, max_length=8)
    (result,) = lm.loglikelihood([LoglikelihoodRequest("The quick brown fox " * 10, "jumps")])
    assert math.isfinite(result.logprob)


def test_perplexity_is_exp_of_mean_nll(bpe):
    model, tokenizer = bpe
    texts = ["The quick brown fox jumps over the lazy dog.", "Water boils at 100 degrees Celsius."]
    ids = tokenizer("\n\n".join(texts))["input_ids"]  # starts with BOS, as each window does
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss  # mean NLL of tokens 1..n-1
    expected = math.exp(float(loss))
    assert perplexity(model, tokenizer, texts, max_length=256) == float32_approx(expected)


@pytest.mark.parametrize("stride", [None, 5])
def test_strided_windows_score_every_token_once(bpe, stride):
    model, tokenizer = bpe
    texts = ["Telescopes use lenses or mirrors to focus light and make objects appear closer."] * 2
    lm = LanguageModel(model, tokenizer, batch_size=3)
    tokens = lm.encode("\n\n".join(texts))
    nll = lm.rolling_nll(texts, max_length=12, stride=stride)
    assert nll.num_tokens == len(tokens)

    # Reference: the Hugging Face loop, one window at a time, scoring tokens past the previous window's end.
    body, step, total, previous_end = 11, stride or 11, 0.0, 0
    for begin in range(0, len(tokens), step):
        end = min(begin + body, len(tokens))
        window = [tokenizer.bos_token_id, *tokens[begin:end]]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([window])).logits[0], -1)
        for position in range(len(window) - (end - previous_end), len(window)):
            total -= float(logprobs[position - 1, window[position]])
        previous_end = end
        if end == len(tokens):
            break
    assert nll.total == float32_approx(total)


@pytest.mark.parametrize("stride", [None, 5])
def test_rolling_nll_splits_by_text(bpe, stride):
    model, tokenizer = bpe
    lm = LanguageModel(model, tokenizer, batch_size=3)
    first = "The quick brown fox jumps over the lazy dog."
    nll = lm.rolling_nll([first, "Water boils at 100 degrees.", "Paris"], max_length=12, stride=stride)
    assert len(nll.per_text) == 3 and all(tokens > 0 for _, tokens in nll.per_text)
    assert sum(tokens for _, tokens in nll.per_text) == nll.num_tokens
    assert sum(total for total, _ in nll.per_text) == float32_approx(nll.total)
    # Tokens of the first text never see what follows it: changing the last texts leaves its share alone.
    other = lm.rolling_nll([first, "Telescopes use lenses."], max_length=12, stride=stride)
    assert other.per_text[0][1] == nll.per_text[0][1]
    assert other.per_text[0][0] == float32_approx(nll.per_text[0][0])


def test_rolling_nll_rejects_bad_stride(bpe):
    model, tokenizer = bpe
    with pytest.raises(ValueError, match="stride"):
        LanguageModel(model, tokenizer).rolling_nll(["some text here"], max_length=8, stride=9)


def test_batched_greedy_generation_matches_one_at_a_time(bpe):
    model, tokenizer = bpe
    prompts = ["Q: What is the capital of France?\nA:", "The quick", "Water boils at", "It was a lovely film"]
    one = LanguageModel(model, tokenizer, batch_size=1).generate(prompts, max_new_tokens=6)
    many = LanguageModel(model, tokenizer, batch_size=4).generate(prompts, max_new_tokens=6)
    assert one == many
    assert all(isinstance(text, str) for text in many)


def test_generation_stops_at_stop_strings(bpe):
    model, tokenizer = bpe
    lm = LanguageModel(model, tokenizer, batch_size=2)
    free = lm.generate(["The quick", "Water"], max_new_tokens=12)
    stops = sorted({ch for text in free for ch in text if not ch.isspace()})[:3]
    cut = lm.generate(["The quick", "Water"], until=stops, max_new_tokens=12)
    for full, short in zip(free, cut, strict=True):
        assert full.startswith(short)
        assert not any(stop in short for stop in stops)


def test_cut_at_stop_strings():
    assert cut_at_stop_strings("Paris, France. And more", [".", ","]) == "Paris"
    assert cut_at_stop_strings("Paris", ["\n"]) == "Paris"
    assert cut_at_stop_strings("\nParis", ["\n"]) == ""


def test_embeddings_do_not_depend_on_batching():
    model, tokenizer = tiny_model("bert"), tiny_tokenizer()
    texts = ["a lovely film", "dull", "the story is bright and warm"]
    one = LanguageModel(model, tokenizer, batch_size=1).embed(texts)
    many = LanguageModel(model, tokenizer, batch_size=3).embed(texts)
    assert one.shape == (3, model.config.hidden_size)
    assert torch.allclose(torch.from_numpy(one), torch.from_numpy(many), atol=1e-5)


def test_is_causal_lm():
    assert engine.is_causal_lm(tiny_model("llama"))
    assert not engine.is_causal_lm(tiny_model("bert"))


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
def test_shared_prefixes_score_as_independent_forwards(model_type):
    # gemma3_text's tiny config has a 4-token sliding window: nothing is packed, nothing is wrong.
    model, tokenizer = tiny_model(model_type), tiny_tokenizer()
    context = "Q: What is the capital of France?\nA:"
    requests = [LoglikelihoodRequest(context, answer) for answer in (" Paris", " Lyon is big", " No", "!")]
    requests += REQUESTS + [LoglikelihoodRequest("Single-token answers only:", a) for a in "xyz"]
    # WinoGrande's shape: two contexts that share a start, one continuation.
    requests += [
        LoglikelihoodRequest(f"The trophy did not fit the {o} because the", " case was small")
        for o in ("case", "suitcase")
    ]
    shared = LanguageModel(model, tokenizer, batch_size=3)
    groups = shared._prefix_groups([shared.encode_request(r) for r in requests])
    assert [len(group) for group in groups] == ([] if model_type == "gemma3_text" else [6, 3, 2])
    plain = LanguageModel(model, tokenizer, batch_size=3, share_context=False)
    for a, b in zip(shared.loglikelihood(requests), plain.loglikelihood(requests), strict=True):
        assert a.logprob == float32_approx(b.logprob)
        assert (a.is_greedy, a.num_tokens) == (b.is_greedy, b.num_tokens)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_packed_rows_of_different_lengths_batch_exactly(model_type):
    # Left-padded rows with explicit positions: every option scores as in its own unpadded forward.
    model, tokenizer = tiny_model(model_type), tiny_tokenizer()
    contexts = ["Q: why?\nA:", "A much longer question on the weather?\nA:", "Hello there, friend:", "Two:"]
    requests = [LoglikelihoodRequest(c, a) for c in contexts for a in (" y", " no", " ok")]
    batched = LanguageModel(model, tokenizer, batch_size=4)
    groups = batched._prefix_groups([batched.encode_request(r) for r in requests])
    assert groups == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    plain = LanguageModel(model, tokenizer, batch_size=4, share_context=False)
    for a, b in zip(batched.loglikelihood(requests), plain.loglikelihood(requests), strict=True):
        assert a.logprob == float32_approx(b.logprob)
        assert (a.is_greedy, a.num_tokens) == (b.is_greedy, b.num_tokens)


def test_a_prefix_is_shared_only_where_it_saves_tokens():
    lm = LanguageModel(tiny_model("llama"), tiny_tokenizer())
    passage = list(range(10, 40))
    sequences = [([*passage, 1], 1), ([*passage, 2], 1), ([10, 11, 50, 51, 52], 1), ([10, 11, 60, 61], 1)]
    # The third shares two tokens with the passage: joining would unshare the passage for the first two.
    assert lm._prefix_groups(sequences) == [[0, 1], [2, 3]]


def test_sequences_longer_than_a_sliding_window_are_not_packed():
    # A custom mask would not enforce the window (tiny gemma3: 4 tokens).
    model, tokenizer = tiny_model("gemma3_text"), tiny_tokenizer()
    lm = LanguageModel(model, tokenizer)
    assert lm._attention_window == model.config.sliding_window == 4
    assert lm._prefix_groups([([1, 2, 3, 4, 5], 1), ([1, 2, 3, 4, 6], 1)]) == []
    assert lm._prefix_groups([([1, 2, 3, 4], 1), ([1, 2, 3, 5], 1)]) == [[0, 1]]


def test_packed_rows_score_each_option_as_if_alone():
    row = engine._PackedRow.of([([7, 8, 9, 1], 1), ([7, 8, 9, 2, 3], 2), ([7, 8, 9, 4, 5, 6], 3)])
    assert row.prefix == 3
    assert row.tokens == [7, 8, 9, 2, 4, 5]  # each option's last token is only a target
    assert row.positions == [0, 1, 2, 3, 3, 4]
    assert row.segments == [0, 0, 0, 2, 3, 3]
    assert row.keep == 4
    assert row.predictors() == [[2], [2, 3], [2, 4, 5]]
    # Two contexts that share a start, and one scored token each (WinoGrande): the prefix stops at the split.
    split = engine._PackedRow.of([([1, 2, 3, 9], 1), ([1, 2, 4, 5, 9], 1)])
    assert (split.prefix, split.tokens, split.positions) == (2, [1, 2, 3, 4, 5], [0, 1, 2, 2, 3])
    assert split.predictors() == [[2], [4]] and split.keep == 3
    mask = engine._packed_mask(torch.tensor([[-1, *row.segments]]), torch.float32)[0, 0] == 0
    assert mask.tolist()[1:] == [
        [False, True, False, False, False, False, False],
        [False, True, True, False, False, False, False],
        [False, True, True, True, False, False, False],
        [False, True, True, True, True, False, False],
        [False, True, True, True, False, True, False],
        [False, True, True, True, False, True, True],
    ]
    assert mask[0].tolist() == [True, False, False, False, False, False, False]  # padding sees itself


def test_pick_normalizes_in_chunks_and_breaks_ties_by_first_index(monkeypatch):
    """Hand-made logits: log-probabilities equal a full log-softmax whatever the chunk size, and a target
    that ties its row's maximum is greedy only where argmax (first index) would pick it, as in lm-eval."""
    logits = torch.tensor([[2.0, 2.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0]], dtype=torch.bfloat16)
    expected = torch.log_softmax(logits.float(), -1)[[0, 1, 2], [0, 2, 0]]
    for chunk in (1, 3, 9, 1 << 20):  # one row per chunk up to all rows in one
        monkeypatch.setattr(engine, "PICK_CHUNK_ELEMENTS", chunk)
        picked = engine._pick(logits, [0, 2, 0])
        assert picked.token_logprobs == pytest.approx(expected.tolist(), abs=1e-6)
        assert picked.is_greedy
    assert not engine._pick(logits, [1, 2, 0]).is_greedy  # ties row 0's maximum, but argmax picks index 0
    assert not engine._pick(logits, [0, 1, 0]).is_greedy  # below row 1's maximum
    assert engine._pick(logits, [0, 2, 0], normalize=False).logprob == pytest.approx(2.0 + 3.0 + 1.0)


class _CountForwards:
    """Sums what the model actually runs: rows x width of every forward's inputs and of its logits."""

    def __init__(self, model):
        self.forwards = self.body_tokens = self.head_positions = 0
        model.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        self.forwards += 1
        self.body_tokens += kwargs["input_ids"].numel()
        self.head_positions += output.logits.shape[0] * output.logits.shape[1]


@pytest.mark.parametrize(
    ("model_type", "plan"), [("llama", "packed"), ("gpt2", "packed"), ("llama", "cache"), ("llama", "plain")]
)
def test_work_counts_exactly_what_loglikelihood_runs(model_type, plan, monkeypatch):
    model, tokenizer = tiny_model(model_type), tiny_tokenizer()
    context = "Q: What is the capital of France?\nA:"
    requests = [LoglikelihoodRequest(context, answer) for answer in (" Paris", " Lyon is big", " No", "!")]
    requests += REQUESTS + [LoglikelihoodRequest("Single-token answers only:", a) for a in "xyz"]
    lm = LanguageModel(model, tokenizer, batch_size=3, share_context=plan != "plain")
    if plan == "cache":  # a model without position ids: shared contexts run on a KV cache instead
        monkeypatch.setattr(lm, "_accepts_position_ids", False)
    # A budget of a few rows' logits splits batches as a large vocabulary would.
    monkeypatch.setattr(engine, "LOGITS_BUDGET_BYTES", 2 * 12 * model.config.vocab_size * 4)
    expected = lm.work(requests)
    counted = _CountForwards(model)
    lm.loglikelihood(requests)
    assert (expected.forwards, expected.body_tokens, expected.head_positions) == (
        counted.forwards,
        counted.body_tokens,
        counted.head_positions,
    )
    assert expected.requests == len(set(requests))
    assert (expected.packed_requests > 0) == (plan == "packed")
