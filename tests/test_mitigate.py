"""Mitigation on tiny models: layer choice, only chosen layers train, the contrastive loss can be overfit,
saved models reload, DoLa scoring and decoding run, and the CLI runs end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from _tiny import killed_after_checkpoint, tiny_model
from avss.evaluation import LanguageModel
from avss.hallucination import load_pairs
from avss.hallucination.batches import contrastive_batches
from avss.hallucination.dola import DolaConfig, DolaModel
from avss.hallucination.eavss import eavss_scores
from avss.hallucination.heldout import evaluate_heldout
from avss.hallucination.losses import (
    answer_logprobs,
    answer_nll,
    infonce,
    logprob_margin,
    reduce_logprobs,
)
from avss.hallucination.mitigate import (
    MITIGATION_FORMAT,
    ContrastiveObjective,
    MitigationConfigError,
    MitigationOptions,
    choose_layers,
    mitigate,
    save_mitigated,
)
from avss.hallucination.scoring import EAVSS_FORMAT
from avss.report import collect
from avss.training import CHECKPOINT_FILE, TrainConfig, lora_module_names, train
from test_hallucination import data_dir  # noqa: F401  (fixture)
from test_provenance import assert_stamped


def scores_for(values: list[float]):
    ones = torch.ones(len(values))
    return eavss_scores(ones, torch.tensor(values), ones, ones)


def test_choose_layers_strategies() -> None:
    scores = scores_for([0.1, 0.9, 0.5, 0.7, 0.2])
    assert choose_layers("auto", 2, 5, scores) == [1, 3]
    assert choose_layers("lowest", 2, 5, scores) == [0, 4]
    assert choose_layers("all", 2, 5) == [0, 1, 2, 3, 4]
    assert choose_layers("random", 2, 5, seed=1) == choose_layers("random", 2, 5, seed=1)
    assert choose_layers("4,1", 2, 5) == [1, 4]
    with pytest.raises(MitigationConfigError):
        choose_layers("7", 1, 5)
    with pytest.raises(MitigationConfigError, match="needs EAVSS"):
        choose_layers("auto", 2, 5)


def test_infonce_and_margin_hand_values() -> None:
    query = torch.tensor([[1.0, 0.0]])
    positive, negatives = torch.tensor([[1.0, 0.0]]), torch.tensor([[[0.0, 1.0]]])
    # cosines 1 and 0, tau 1: -log(e / (e + 1))
    expected = -math.log(math.e / (math.e + 1.0))
    assert float(infonce(query, positive, negatives, tau=1.0)) == pytest.approx(expected)
    margin = logprob_margin(torch.tensor([-1.0]), torch.tensor([[-2.0, -1.0]]))
    assert float(margin) == pytest.approx((math.log1p(math.exp(-1.0)) + math.log(2.0)) / 2)


def test_only_chosen_layers_change(tokenizer, data_dir: Path) -> None:  # noqa: F811
    model = tiny_model("llama", num_layers=4)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    pairs = load_pairs(["truthfulqa"], data_dir)[:4]
    options = MitigationOptions(train=TrainConfig(epochs=1, lr=1e-2, progress=False), max_length=48)
    trained, result = mitigate(model, tokenizer, pairs, [], [1, 3], options)
    assert trained is model and result.layers == [1, 3] and result.training.steps == 1
    for name, param in model.named_parameters():
        chosen = name.startswith(("model.layers.1.", "model.layers.3."))
        assert torch.equal(param, before[name]) != chosen, name


def test_answer_logprobs_sum_and_mean_by_hand() -> None:
    # vocabulary of 2, uniform logits: every token has log-probability log(1/2)
    logits = torch.zeros(2, 4, 2)
    input_ids = torch.zeros(2, 4, dtype=torch.long)
    answer_mask = torch.tensor([[False, True, True, True], [False, False, False, True]])
    sums, counts = answer_logprobs(logits, input_ids, answer_mask)
    half = math.log(0.5)
    torch.testing.assert_close(sums, torch.tensor([3 * half, half]))
    torch.testing.assert_close(counts, torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(reduce_logprobs(sums, counts, "sum"), torch.tensor([3 * half, half]))
    torch.testing.assert_close(reduce_logprobs(sums, counts, "mean"), torch.tensor([half, half]))
    torch.testing.assert_close(answer_nll(logits, input_ids, answer_mask), torch.tensor([-half, -half]))
    with pytest.raises(ValueError, match="reduction"):
        reduce_logprobs(sums, counts, "median")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_logprob_contrast_compares_sequence_or_per_token_log_likelihoods(
    tokenizer,
    data_dir: Path,  # noqa: F811
    reduction: str,
) -> None:
    """The margin is computed on the reduction asked for; the LM loss stays the per-token mean."""
    model = tiny_model("llama", num_layers=2)
    pairs = load_pairs(["truthfulqa"], data_dir)[:3]
    batch = contrastive_batches(tokenizer, pairs, negatives=2, max_length=48, questions_per_batch=3)[0]
    objective = ContrastiveObjective([0], contrast="logprob", reduction=reduction)
    with torch.no_grad():
        lm_loss, contrastive = objective.terms(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    sums, counts = answer_logprobs(logits, batch["input_ids"], batch["answer_mask"])
    scores = (sums if reduction == "sum" else sums / counts).view(-1, 3)
    torch.testing.assert_close(contrastive, logprob_margin(scores[:, 0], scores[:, 1:]))
    torch.testing.assert_close(lm_loss, (-sums / counts).view(-1, 3)[:, 0].mean())
    assert ContrastiveObjective([0], contrast="logprob").reduction == "sum", "the spec's is the default"


def test_an_unknown_reduction_is_refused_before_the_model_loads(cli, monkeypatch, tmp_path: Path) -> None:
    with pytest.raises(MitigationConfigError, match="logprob-reduction"):
        MitigationOptions(logprob_reduction="median")
    with pytest.raises(MitigationConfigError, match="--contrast"):
        MitigationOptions(contrast="triplet")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("avss.cli.hallucination_cmd.load_model", refuse)
    result = cli("mitigate", "some-model", "--logprob-reduction", "median", "--out", tmp_path / "m")
    assert result.returncode != 0 and "logprob-reduction 'median'" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("contrast", "reduction", "epochs", "ratio"),
    [("infonce", "sum", 10, 0.5), ("logprob", "sum", 20, 0.8), ("logprob", "mean", 20, 0.8)],
)
def test_contrastive_loss_decreases_when_overfitting(
    tokenizer,
    data_dir: Path,  # noqa: F811
    contrast: str,
    reduction: str,
    epochs: int,
    ratio: float,
) -> None:
    model = tiny_model("llama", num_layers=4)
    pairs = load_pairs(["truthfulqa"], data_dir)[:4]
    batches = contrastive_batches(tokenizer, pairs, negatives=2, max_length=48, questions_per_batch=4)
    objective = ContrastiveObjective([1, 2], contrast=contrast, tau=0.1, lam=4.0, reduction=reduction)
    with torch.no_grad():
        start = float(objective.terms(model, batches[0])[1])
    config = TrainConfig(epochs=epochs, lr=1e-2, patience=None, progress=False)
    train(model, objective, batches, trainable=lambda name, param: True, config=config)
    with torch.no_grad():
        end = float(objective.terms(model, batches[0])[1])
    assert end < ratio * start, (start, end)


@pytest.mark.parametrize(
    ("model_type", "lora"),
    [("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True), ("olmo2", False), ("olmo2", True)],
)
def test_saved_mitigated_model_reloads(
    tokenizer,
    data_dir: Path,  # noqa: F811
    tmp_path: Path,
    model_type: str,
    lora: bool,
) -> None:
    """GPT-2's projections are ``Conv1D``: LoRA must find them as it finds ``nn.Linear`` elsewhere."""
    model = tiny_model(model_type, num_layers=3)
    pairs = load_pairs(["truthfulqa"], data_dir)[:4]
    options = MitigationOptions(
        lora=lora, max_length=48, train=TrainConfig(epochs=1, lr=1e-2, progress=False)
    )
    trained, result = mitigate(model, tokenizer, pairs, pairs[:2], [2], options)
    assert type(trained) is type(model)
    out = save_mitigated(trained, tokenizer, tmp_path / "mitigated", result.record)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits)
    record = json.loads((out / "avss_mitigation.json").read_text())
    assert record["layers"] == [2] and record["options"]["lora"] is lora


@pytest.mark.parametrize("lora", [False, True])
def test_gpt2_conv1d_blocks_train(tokenizer, data_dir: Path, lora: bool) -> None:  # noqa: F811
    """Only block 2 changes, with LoRA too (peft used to get no ``nn.Linear`` target on GPT-2 and raise).

    No validation pairs, so the trained weights are kept rather than the best epoch's (here: the start).
    """
    model = tiny_model("gpt2", num_layers=3)
    assert lora_module_names(model, [2], None) == [
        f"transformer.h.2.{name}" for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    options = MitigationOptions(lora=lora, max_length=48, train=TrainConfig(lr=1e-2, progress=False))
    trained, _ = mitigate(model, tokenizer, load_pairs(["truthfulqa"], data_dir)[:4], [], [2], options)
    changed = {name for name, p in trained.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith("transformer.h.2.") for name in changed), changed


def test_dola_scoring_and_generation_run_on_a_tiny_model(tokenizer, data_dir: Path) -> None:  # noqa: F811
    dola = DolaModel(tiny_model("llama", num_layers=4), DolaConfig(buckets="low"))
    result = evaluate_heldout(dola, tokenizer, ["truthfulqa_mc"], data_dir=data_dir, batch_size=4)
    assert 0 < result["num_examples"]["truthfulqa_mc"] < 60
    assert 0.0 <= result["metrics"]["truthfulqa_mc"]["mc2"] <= 1.0
    texts = LanguageModel(dola, tokenizer, batch_size=2).generate(["Q: a\nA:", "Q: bb\nA:"], max_new_tokens=4)
    assert len(texts) == 2


def test_cli_hallucination_and_mitigate(tokenizer, data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from typer.testing import CliRunner

    from avss.cli import app

    model_dir = tmp_path / "tiny"
    tiny_model("llama", num_layers=4).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    runner = CliRunner()
    common = ["--data-dir", str(data_dir), "--device", "cpu", "--limit", "8"]
    scored = runner.invoke(app, ["hallucination", str(model_dir), "--out", str(tmp_path / "eavss"), *common])
    assert scored.exit_code == 0, scored.output
    scores = json.loads((tmp_path / "eavss" / "eavss.json").read_text())
    assert len(scores["layers"]) == 4
    assert_stamped(scores, EAVSS_FORMAT)
    args = ["mitigate", str(model_dir), "--out", str(tmp_path / "m"), "--k", "2", "--rounds", "2", *common]
    evaluation = ["--eval", "--eval-tasks", "truthfulqa_mc", "--eval-limit", "3"]
    training = ["--val-limit", "4", "--max-length", "48", "--autocast", "off"]
    mitigated = runner.invoke(app, [*args, *training, *evaluation])
    assert mitigated.exit_code == 0, mitigated.output
    record = json.loads((tmp_path / "m" / "avss_mitigation.json").read_text())
    assert 1 <= len(record["rounds"]) <= 2 and len(record["rounds"][0]["layers"]) == 2
    assert record["rounds"][0]["mitigation"]["training"]["config"]["autocast"] == "off"
    assert record["after"]["num_examples"]["truthfulqa_mc"] == 3 and "Before / after" in mitigated.output
    assert_stamped(record, MITIGATION_FORMAT)
    assert record["model"]["kind"] == scores["model"]["kind"]
    assert "versions" not in record["rounds"][0]["mitigation"], "versions are recorded once, at the top"
    sections = {section.source.name: section for section in collect([tmp_path]).runs[0].sections}
    assert sections["eavss.json"].title == "EAVSS per layer", "the report reads the real writers' files"
    assert sections["avss_mitigation.json"].provenance["format"] == MITIGATION_FORMAT
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.num_hidden_layers == 4


def test_killed_mitigate_resumes_each_round_from_the_checkpoint_beside_the_output(
    tokenizer,
    data_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    from typer.testing import CliRunner

    from avss.cli import app

    model_dir = tmp_path / "tiny"
    tiny_model("llama", num_layers=3).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    runner = CliRunner()
    common = ["--data-dir", str(data_dir), "--device", "cpu", "--limit", "6", "--val-limit", "4"]
    common += ["--max-length", "48"]
    training = ["--layers", "1", "--rounds", "2", "--epochs", "2", "--patience", "5", "--lr", "1e-2"]

    def mitigate_to(out: Path, *extra: str) -> None:
        args = ["mitigate", str(model_dir), "--out", str(out), *common, *training, *extra]
        result = runner.invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output

    def training_records(out: Path) -> list[dict]:
        rounds = json.loads((out / "avss_mitigation.json").read_text())["rounds"]
        return [round_["mitigation"]["training"] for round_ in rounds]

    out, checkpoints = tmp_path / "m", tmp_path / "m.checkpoint"
    mitigate_to(tmp_path / "straight")
    with killed_after_checkpoint(3):  # round 0 finished (2 epochs), round 1 killed after its first epoch
        mitigate_to(out)
    assert (checkpoints / "round-0" / CHECKPOINT_FILE).is_file() and not out.exists()
    assert (checkpoints / "round-1" / CHECKPOINT_FILE).is_file()
    mitigate_to(out, "--resume")
    resumed, straight = training_records(out), training_records(tmp_path / "straight")
    assert [record["resumed_from_epoch"] for record in resumed] == [2, 1]
    for key in ("epochs_run", "steps", "val_loss"):
        assert [record[key] for record in resumed] == [record[key] for record in straight], key
    assert not checkpoints.exists(), "a finished run removes its checkpoints"
