"""``avss study`` end to end on a tiny saved model with fixture data, and resuming a finished study."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from avss.cli._app import app
from avss.data import CalibrationOptions
from avss.errors import OutputError, PruneConfigError
from avss.evaluation import evaluate
from avss.evaluation import prefix as prefix_module
from avss.evaluation.runner import EvalResult
from avss.evaluation.uncertainty import Bootstrap
from avss.io import atomic_write_json, read_json
from avss.provenance import processor
from avss.scorers.loss import LeaveOneOutScorer
from avss.study import STUDY_FORMAT, Study, StudyConfig, parse_limits, rank_correlations, slug
from avss.study import runner as study_module
from test_provenance import assert_stamped


def refuse_to_load(*args, **kwargs):
    pytest.fail("a report loads no model")


METHODS = ["avss", "avss[site=delta]", "angular", "random", "last", "loo_nll"]


@pytest.fixture(scope="module")
def saved_model(saved_tiny_model) -> Path:
    return saved_tiny_model(4)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "wikitext2").mkdir()
    (root / "wikitext2" / "wiki.test.raw").write_text(
        "\n".join(f" = Section {i} = \n The cat sat on mat number {i} ." for i in range(6)) + "\n"
    )
    (root / "sst2").mkdir()
    rows = [{"id": f"s{i}", "text": f"a {'good' if i % 2 else 'bad'} film", "label": i % 2} for i in range(6)]
    (root / "sst2" / "sst2_dev.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def config(saved_model, data_dir, **overrides) -> StudyConfig:
    options = dict(
        model=str(saved_model),
        methods=METHODS,
        fractions=[0, 0.25, 0.5],
        tasks=["wikitext2", "sst2"],
        limits={"wikitext2": 4, "sst2": 4},
        iterative=True,
        calibration=CalibrationOptions(samples=4, max_length=32, batch_size=2),
        task_options={"max_length": 32},
        eval_batch_size=4,
        data_dir=str(data_dir),
    )
    return StudyConfig(**{**options, **overrides})


def test_study_runs_end_to_end_and_resume_skips_finished_cells(saved_model, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "study"
    study = Study(config(saved_model, data_dir), out, progress=False)
    result = study.run()
    for name in (
        "results.csv",
        "results.json",
        "summary.md",
        "retention.png",
        "removed_layers.png",
        "correlations.png",
    ):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "results.csv").open()))
    # (4 re-scoring methods x 2 modes + random and last one-shot only) x 2 budgets x task metrics
    metrics = {(row["task"], row["metric"]) for row in rows}
    assert len(rows) == (4 * 2 + 2) * 2 * len(metrics)
    assert not any(row["mode"] == "iterative" for row in rows if row["method"] in ("random", "last"))
    assert ("wikitext2", "perplexity") in metrics and ("sst2", "accuracy") in metrics
    for row in rows:
        assert int(row["n"]) == 4, row  # --limit 4: intervals and pairs over the same 4 documents
        assert float(row["value_low"]) <= float(row["value"]) <= float(row["value_high"]), row
    last = {row["removed_layers"] for row in rows if row["method"] == "last" and row["fraction"] == "0.5"}
    assert last == {"1 2"}
    angular = json.loads((out / "selections" / "angular__oneshot.json").read_text())
    span = angular["by_budget"]["2"]
    assert span[1] - span[0] == 1
    report = json.loads((out / "results.json").read_text())
    assert report["correlations"]["methods"][:2] == ["avss", "avss[site=delta]"]
    # Same layers, same model: identical selections are evaluated once.
    evaluated = [c for c in result.cells if not c.reused_from]
    assert len({tuple(c.removed) for c in evaluated}) == len(evaluated)

    calls = []
    monkeypatch.setattr(Study, "evaluate_model", lambda self, model, *args: calls.append(1) or {})
    again = Study(config(saved_model, data_dir), out, progress=False, resume=True).run()
    assert calls == []
    assert again.rows() == result.rows()


def test_interrupted_study_resumes_from_the_cells_on_disk(saved_model, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "study"
    small = config(
        saved_model, data_dir, methods=["avss", "random"], iterative=False, fractions=[0, 0.25, 0.5]
    )
    original = Study.evaluate_model
    calls = []

    def interrupt_third(self, model, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, model, *args)

    monkeypatch.setattr(Study, "evaluate_model", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        Study(small, out, progress=False).run()
    finished = sorted(path.name for path in (out / "cells").glob("*.json*"))
    assert finished == [
        "avss__oneshot__0.25.eval.json.gz",
        "avss__oneshot__0.25.json",
        "base.eval.json.gz",
        "base.json",
    ]
    assert not list((out / "cells").glob(".*tmp"))
    resumed_calls = []
    monkeypatch.setattr(
        Study,
        "evaluate_model",
        lambda self, model, *args: resumed_calls.append(1) or original(self, model, *args),
    )
    resumed = Study(small, out, progress=False, share_prefix=False, resume=True).run()  # counts evaluations
    monkeypatch.setattr(Study, "evaluate_model", original)
    uninterrupted = Study(small, tmp_path / "whole", progress=False).run()
    evaluated = 1 + sum(not cell.reused_from for cell in uninterrupted.cells)  # with the base
    assert len(resumed_calls) == evaluated - 2  # the base and the finished cell are not evaluated again
    assert resumed.rows() == uninterrupted.rows()
    assert resumed.tables["headline"] == uninterrupted.tables["headline"]


def test_a_different_study_in_the_same_folder_is_refused(saved_model, data_dir, tmp_path):
    out = tmp_path / "study"
    Study(config(saved_model, data_dir, methods=["random"], iterative=False, fractions=[0]), out).prepare()
    other = config(saved_model, data_dir, methods=["random"], iterative=False, fractions=[0], seed=1)
    with pytest.raises(OutputError, match=r"different study \(differs in seed\)"):
        Study(other, out).prepare()


def test_a_study_grows_by_methods_and_budgets_without_recomputing(
    saved_model, data_dir, tmp_path, monkeypatch
):
    out = tmp_path / "study"
    Study(config(saved_model, data_dir, methods=["last"], iterative=False, fractions=[0, 0.25]), out).run()
    grown = config(
        saved_model, data_dir, methods=["last", "first"], iterative=False, fractions=[0, 0.25, 0.5]
    )
    evaluated = []
    original = Study.evaluate_model
    monkeypatch.setattr(
        Study, "evaluate_model", lambda self, m, *args: evaluated.append(1) or original(self, m, *args)
    )
    result = Study(grown, out, progress=False, share_prefix=False, resume=True).run()  # counts evaluations
    assert len(evaluated) == 3  # first at 0.25, first and last at 0.5: nothing finished runs again
    assert json.loads((out / "config.json").read_text())["methods"] == ["last", "first"]
    assert {(c.method, c.fraction) for c in result.cells} == {
        (m, f) for m in ("last", "first") for f in (0.25, 0.5)
    }


def test_grown_budgets_select_as_a_study_run_with_them_from_the_start(saved_model, data_dir, tmp_path):
    """Stored selections reach a new budget by the scorer's own rule: angular's contiguous span (from fresh
    scores, as details are not stored), leave-one-out's lowest scores, a longer iterative order."""
    methods = ["angular", "loo_nll", "block_influence"]
    small = config(saved_model, data_dir, methods=methods, fractions=[0, 0.25], protect=["first"])
    grown = config(saved_model, data_dir, methods=methods, fractions=[0, 0.25, 0.5], protect=["first"])
    out = tmp_path / "grown"
    for study in (Study(small, out, progress=False), Study(grown, out, progress=False, resume=True)):
        study.prepare()
        study.select()
    fresh = Study(grown, tmp_path / "fresh", progress=False)
    fresh.prepare()
    fresh.select()
    assert study.selections.keys() == fresh.selections.keys()
    for name, selection in fresh.selections.items():
        assert study.selections[name].removed_for(2) == selection.removed_for(2), name
    assert 0 not in study.selections["angular__oneshot+protect"].removed_for(2)
    first, second = study.selections["angular__oneshot"].removed_for(2)
    assert second == first + 1


def test_iterative_methods_iterate_only_the_named_methods(saved_model, data_dir, tmp_path):
    """``iterative_methods`` re-scores after each removal for the named methods only: iterative
    leave-one-out costs a pass per remaining block and step, iterative AVSS one statistics pass per step."""
    methods = ["avss", "loo_nll", "last"]
    study = Study(
        config(saved_model, data_dir, methods=methods, fractions=[0, 0.5], iterative=False,
               iterative_methods=["avss"]),
        tmp_path / "study",
        progress=False,
    )  # fmt: skip
    study.prepare()
    study.select()
    assert set(study.selections) == {"avss__oneshot", "avss__iterative", "loo-nll__oneshot", "last__oneshot"}
    assert study.selections["avss__iterative"].iterative
    assert len(study.selections["avss__iterative"].order) == 2
    with pytest.raises(PruneConfigError, match="'block_influence' is not one of the study's methods"):
        config(saved_model, data_dir, methods=methods, iterative_methods=["block_influence"])


def test_an_interrupted_iterative_selection_resumes_from_its_last_step(
    saved_model, data_dir, tmp_path, monkeypatch
):
    """Each step of an iterative selection is kept in ``NAME.json.partial`` (never read as a selection); a
    rerun goes on from there to the order of an uninterrupted run, and the finished selection replaces it."""
    options = dict(methods=["loo_nll"], fractions=[0, 0.5], iterative=True)
    whole = Study(config(saved_model, data_dir, **options), tmp_path / "whole", progress=False)
    whole.prepare()
    whole.select()
    expected = whole.selections["loo-nll__iterative"]

    original = study_module.select_iteratively

    def interrupted(*args, on_step, **kwargs):
        def step(selection):
            on_step(selection)
            raise KeyboardInterrupt

        return original(*args, on_step=step, **kwargs)

    out = tmp_path / "study"
    monkeypatch.setattr(study_module, "select_iteratively", interrupted)
    study = Study(config(saved_model, data_dir, **options), out, progress=False)
    study.prepare()
    with pytest.raises(KeyboardInterrupt):
        study.select()
    partial = out / "selections" / "loo-nll__iterative.json.partial"
    assert read_json(partial)["order"] == expected.order[:1]
    atomic_write_json(partial, {**read_json(partial), "seconds": 1e6})  # as if the first step took that long
    assert not (out / "selections" / "loo-nll__iterative.json").exists()
    monkeypatch.setattr(study_module, "select_iteratively", original)
    scored = []
    score = LeaveOneOutScorer.score
    monkeypatch.setattr(
        LeaveOneOutScorer, "score", lambda self, context: scored.append(1) or score(self, context)
    )
    logs = []
    resumed = Study(
        config(saved_model, data_dir, **options), out, progress=False, log=logs.append, resume=True
    )
    resumed.prepare()
    resumed.select()
    assert any("going on after 1 steps" in line for line in logs)
    assert len(scored) == len(expected.order) - 1  # the first step is replayed, not scored again
    assert resumed.selections["loo-nll__iterative"].order == expected.order
    assert not partial.exists()
    assert read_json(out / "selections" / "loo-nll__iterative.json")["seconds"] > 1e6  # earlier runs count
    resumed.load_selections()
    assert not any("partial" in name for name in resumed.selections)


def test_cli_study_writes_the_summary(saved_model, data_dir, tmp_path):
    out = tmp_path / "cli-study"
    arguments = [
        "study", str(saved_model), "--out", str(out), "--methods", "avss[variance=pooled],block_influence",
        "--fractions", "0,0.25", "--tasks", "wikitext2", "--limit", "3",
        "--samples", "4", "--max-length", "32",
        "--ppl-max-length", "32", "--data-dir", str(data_dir),
    ]  # fmt: skip
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "avss[variance=pooled]" in (out / "summary.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert_stamped(results, STUDY_FORMAT)
    assert results["model"]["path"] and "environment" not in results


def test_helpers():
    assert parse_limits("wikitext2=40,sst2=200", ["wikitext2", "sst2", "sciq"]) == {
        "wikitext2": 40,
        "sst2": 200,
        "sciq": None,
    }
    assert parse_limits("7", ["a", "b"]) == {"a": 7, "b": 7}
    assert slug("avss[site=delta,threshold=abs:1e-05]") == "avss-site-delta-threshold-abs-1e-05"
    import numpy as np

    correlations = rank_correlations({"a": np.array([1.0, 2, 3]), "b": np.array([3.0, 2, 1])})
    assert correlations["spearman"][0][1] == pytest.approx(-1.0)
    assert correlations["kendall"][1][0] == pytest.approx(-1.0)


def test_report_only_writes_the_finished_cells_without_a_model(saved_model, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "study"
    small = config(
        saved_model, data_dir, methods=["avss", "random"], iterative=False, fractions=[0, 0.25, 0.5]
    )
    Study(small, out, progress=False).run()
    (out / "cells" / "random__oneshot__0.5.json").unlink()
    monkeypatch.setattr(study_module, "load_model", refuse_to_load)
    result = Study(small, out).report()
    assert not result.complete and not json.loads((out / "results.json").read_text())["complete"]
    assert {(c.method, c.fraction) for c in result.cells} == {("avss", 0.25), ("avss", 0.5), ("random", 0.25)}


def test_run_logs_each_evaluated_cell_with_its_time_and_place(saved_model, data_dir, tmp_path):
    """A study of hours says after every cell how long it took and how many of the cells to run are done."""
    small = config(saved_model, data_dir, methods=["avss", "first"], iterative=False, fractions=[0, 0.25])
    logged: list[str] = []
    result = Study(small, tmp_path / "study", progress=False, log=logged.append).run()
    done = [line for line in logged if " done in " in line]
    evaluated = [cell for cell in result.cells if cell.reused_from is None]
    assert len(done) == len(evaluated) >= 1  # a twin (the same blocks as a cell run before) is not logged
    assert done[0] == f"{evaluated[0].key} done in {evaluated[0].seconds:.0f} s (1 of 2 cells)"


def test_report_before_the_base_cell_is_finished_is_refused(saved_model, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "study"
    small = config(saved_model, data_dir, methods=["avss"], iterative=False, fractions=[0, 0.25])
    Study(small, out).prepare()  # what a study killed before its first cell leaves: the folder and config
    monkeypatch.setattr(study_module, "load_model", refuse_to_load)
    with pytest.raises(OutputError, match="not finished yet; nothing to report"):
        Study(small, out).report()


def test_report_of_a_study_grown_by_a_method_not_yet_selected(saved_model, data_dir, tmp_path, monkeypatch):
    """A study grown by a method (``--resume``) and stopped before its selection was made reports the
    cells it has, as incomplete, instead of failing on the missing selection."""
    out = tmp_path / "study"
    small = config(saved_model, data_dir, methods=["avss"], iterative=False, fractions=[0, 0.25])
    Study(small, out, progress=False).run()
    grown = config(saved_model, data_dir, methods=["avss", "first"], iterative=False, fractions=[0, 0.25])
    monkeypatch.setattr(study_module, "load_model", refuse_to_load)
    result = Study(grown, out, resume=True).report()
    assert not result.complete
    assert [(c.method, c.fraction) for c in result.cells] == [("avss", 0.25)]


def test_study_with_heal_adds_healed_rows_at_the_same_budget(saved_model, data_dir, tmp_path):
    """``avss study --heal lora``: every pruned cell is also evaluated after healing, with its own rows."""
    study_config = config(
        saved_model, data_dir, methods=["block_influence", "last"], fractions=[0, 0.25], iterative=False
    )
    study_config.heal, study_config.heal_steps = "lora", 2
    result = Study(study_config, tmp_path / "study", progress=False).run()
    modes = {(cell.method, cell.mode) for cell in result.cells}
    assert {("block_influence", "oneshot+healed"), ("last", "oneshot+healed")} <= modes
    healed = {cell.method: cell for cell in result.cells if cell.mode.endswith("+healed")}
    plain = {cell.method: cell for cell in result.cells if cell.mode == "oneshot"}
    for method, cell in healed.items():
        assert cell.removed == plain[method].removed
        assert cell.reused_from is None or cell.reused_from.endswith("+healed__0.25")
        assert cell.metrics != plain[method].metrics
    rows = list(csv.DictReader((tmp_path / "study" / "results.csv").open()))
    assert any(row["mode"] == "oneshot+healed" for row in rows)


def test_a_study_without_healed_cells_may_start_healing_and_then_keeps_its_steps(
    saved_model, data_dir, tmp_path
):
    out = tmp_path / "study"
    plain = config(saved_model, data_dir, methods=["last"], fractions=[0, 0.25], iterative=False)
    Study(plain, out).prepare()
    healing = replace(plain, heal="lora", heal_steps=2)
    Study(healing, out, resume=True).prepare()
    assert json.loads((out / "config.json").read_text())["heal"] == "lora"
    with pytest.raises(OutputError, match=r"differs in heal_steps\)"):
        Study(replace(healing, heal_steps=3), out, resume=True).prepare()
    with pytest.raises(OutputError, match=r"differs in heal\)"):
        Study(replace(healing, heal=None), out, resume=True).prepare()


def test_random_null_band_and_protected_variants(saved_model, data_dir, tmp_path):
    """``random_seeds`` draws are summarized as one band; ``protect`` re-selects without the named blocks."""
    study_config = config(
        saved_model,
        data_dir,
        methods=["random", "first", "block_influence"],
        fractions=[0, 0.25, 0.5],
        iterative=False,
        random_seeds=3,
        protect=["first", "last"],
    )
    result = Study(study_config, tmp_path / "study", progress=False).run()
    methods = {cell.method for cell in result.cells}
    assert {"random", "random[seed=1]", "random[seed=2]", "first", "block_influence"} == methods
    protected = [cell for cell in result.cells if cell.mode == "oneshot+protect"]
    assert protected and all(not {0, 3} & set(cell.removed) for cell in protected)
    first = {c.fraction: c.removed for c in result.cells if (c.method, c.mode) == ("first", "oneshot")}
    assert first == {0.25: [0], 0.5: [0, 1]}
    assert [c.removed for c in protected if c.method == "first"] == [[1], [1, 2]]
    report = json.loads((tmp_path / "study" / "results.json").read_text())
    bands = [b for b in report["null_bands"] if b["mode"] == "oneshot"]
    assert bands and all(b["draws"] == 3 and b["low"] <= b["median"] <= b["high"] for b in bands)
    assert set(report["correlations"]["with_layer_index"]) == {"first", "block_influence"}
    assert report["correlations"]["with_layer_index"]["first"] == pytest.approx(1.0)
    summary = (tmp_path / "study" / "summary.md").read_text()
    assert "| random (3 draws) | oneshot |" in summary and "## Base model" in summary
    # Method against method on the same examples, against the one with the highest macro retention.
    from avss.study import analysis as study_analysis

    macro = [
        {"method": method, "mode": "oneshot", "fraction": 0.25, "retention": value}
        for method, value in (("first", 0.9), ("block_influence", 0.1), ("random", 2.0))
    ]
    versus = study_analysis.versus_best(result.cell_infos(), result.evaluations, macro, Bootstrap(200))
    assert versus and {(row["method"], row["reference"]) for row in versus} <= {("block_influence", "first")}
    assert all(
        row["n"] == 4 and row["difference_low"] <= row["difference"] <= row["difference_high"]
        for row in versus
    )
    # Each row names its own reference: the best method may differ between budgets.
    assert "| best method |" in "\n".join(study_analysis.versus_markdown(versus))
    with pytest.raises(PruneConfigError, match="cannot protect 'middle'"):
        config(saved_model, data_dir, protect=["middle"])


def test_study_with_patch_adds_patched_cells_except_from_block_0(saved_model, data_dir, tmp_path):
    """``avss study --patch``: each pruned model is also evaluated with its runs replaced by a linear map."""
    study_config = config(
        saved_model, data_dir, methods=["block_influence", "first"], fractions=[0, 0.25], iterative=False
    )
    study_config.patch = True
    result = Study(study_config, tmp_path / "study", progress=False).run()
    patched = {cell.method: cell for cell in result.cells if cell.mode == "oneshot+patch"}
    plain = {cell.method: cell for cell in result.cells if cell.mode == "oneshot"}
    assert plain["first"].removed == [0] and "first" not in patched  # no MLP before block 0
    for method, cell in patched.items():
        assert 0 not in cell.removed and cell.removed == plain[method].removed
        assert cell.metrics != plain[method].metrics


def test_repair_methods_limit_the_repaired_twins_to_the_named_methods(saved_model, data_dir, tmp_path):
    """``repair_methods`` keeps the patched (and healed) twins to the named methods; ``random`` names every
    seeded draw."""
    study_config = config(
        saved_model, data_dir, methods=["block_influence", "last", "random"], fractions=[0, 0.5],
        iterative=False, random_seeds=2, patch=True, repair_methods=["block_influence", "random"],
    )  # fmt: skip
    study = Study(study_config, tmp_path / "study", progress=False)
    study.prepare()
    study.select()
    patched = {method for method, mode, _, removed in study.plan() if mode.endswith("+patch")}
    last = {tuple(removed) for method, mode, _, removed in study.plan() if method == "last"}
    assert all(0 not in removed for removed in last)  # so "last" would have a patched twin if named
    assert patched and patched <= {"block_influence", "random", "random[seed=1]"}
    assert {method for method, mode, _, _ in study.plan() if mode == "oneshot"} == {
        "block_influence", "last", "random", "random[seed=1]"
    }  # fmt: skip
    with pytest.raises(PruneConfigError, match="--repair-methods 'angular' is not one of the study"):
        config(saved_model, data_dir, methods=["last"], repair_methods=["angular"])


def test_an_option_added_later_keeps_an_older_study_folder_resumable(saved_model, data_dir, tmp_path):
    out = tmp_path / "study"
    small = config(saved_model, data_dir, methods=["random"], iterative=False, fractions=[0])
    Study(small, out).prepare()
    stored = json.loads((out / "config.json").read_text())
    del stored["patch"], stored["dtype"]  # as written before these options existed
    del stored["calibration"]["part"]  # nested option groups too
    (out / "config.json").write_text(json.dumps(stored))
    Study(small, out, resume=True).prepare()
    with pytest.raises(OutputError, match="differs in dtype"):
        Study(
            config(
                saved_model, data_dir, methods=["random"], iterative=False, fractions=[0], dtype="bfloat16"
            ),
            out,
        ).prepare()


def test_attention_cells_remove_the_parameters_of_each_block_budget(saved_model, data_dir, tmp_path):
    from avss.pruning.sublayers import equal_parameter_budget

    out = tmp_path / "study"
    small = config(
        saved_model, data_dir, methods=["last"], attention_methods=["attn_influence"], iterative=False,
        fractions=[0, 0.25, 0.5],
    )  # fmt: skip
    result = Study(small, out, progress=False).run()
    model = Study(small, out).loaded.model
    attention = {c.fraction: c for c in result.cells if c.mode == "attn"}
    selection = json.loads((out / "selections" / "attn-influence__attn.json").read_text())
    for fraction, cell in attention.items():
        expected = equal_parameter_budget(model, round(fraction * 4), "attn")
        assert expected.feasible and len(cell.removed) == expected.sublayers
        assert cell.removed == sorted(selection["order"][: expected.sublayers])
        assert cell.reused_from is None  # the same indices as a block cell are a different model
    # One tiny block holds about three attentions' parameters: 3 of 4 fit, two blocks' worth (6) does not.
    assert list(attention) == [0.25] and not equal_parameter_budget(model, 2, "attn").feasible
    assert {row["mode"] for row in result.rows()} == {"oneshot", "attn"}


def test_protected_selections_reuse_the_one_shot_scores(saved_model, data_dir, tmp_path, monkeypatch):
    # Leave-one-out costs a pass per block: the protected variant selects from the same scores.
    from avss.scorers.loss import LeaveOneOutScorer

    calls = []
    original = LeaveOneOutScorer.score
    monkeypatch.setattr(LeaveOneOutScorer, "score", lambda self, c: calls.append(1) or original(self, c))
    small = config(
        saved_model, data_dir, methods=["loo_nll"], iterative=False, fractions=[0, 0.25], protect=["first"]
    )
    study = Study(small, tmp_path / "study", progress=False)
    study.prepare()
    study.select()
    assert len(calls) == 1
    plain, protected = (study.selections[f"loo-nll__{mode}"] for mode in ("oneshot", "oneshot+protect"))
    assert plain.steps[0].scores.tolist() == protected.steps[0].scores.tolist()
    assert 0 not in protected.removed_for(1)
    # Resumed with the one-shot selection on disk only, the protected one is still not re-scored.
    (tmp_path / "study" / "selections" / "loo-nll__oneshot+protect.json").unlink()
    Study(small, tmp_path / "study", progress=False, resume=True).run()
    assert len(calls) == 1


def test_a_random_band_resting_on_fewer_draws_at_one_budget_says_so():
    """A grown study may have 20 draws at one budget and 6 at another: each cell then names its count."""
    from avss.study import analysis as study_analysis

    def entry(method, fraction, retention):
        bounds = {"retention_low": retention - 0.1, "retention_high": retention + 0.1}
        cell = {"method": method, "mode": "oneshot", "fraction": fraction, "tasks": ["sciq:accuracy"]}
        return {**cell, "retention": retention, **bounds}

    macro = [entry("first", f, 0.5) for f in (0.125, 0.25)]
    macro += [entry(f"random[seed={s}]", 0.125, 0.1 * s) for s in range(4)]
    macro += [entry(f"random[seed={s}]", 0.25, 0.1 * s) for s in range(2)]
    text = "\n".join(study_analysis.headline_markdown(macro, [0.125, 0.25]))
    row = next(line for line in text.splitlines() if line.startswith("| random"))
    assert "draws in each cell" in row and "(4 draws)" in row and "(2 draws)" in row


def test_a_single_random_draw_shows_its_own_interval_not_a_band():
    """One draw has no 5-95% spread: the headline gives that draw's bootstrap interval, as for any method."""
    from avss.study import analysis as study_analysis

    macro = [
        {
            "method": "random",
            "mode": "attn",
            "fraction": 0.125,
            "tasks": ["sciq:accuracy"],
            "retention": 0.275,
            "retention_low": 0.21,
            "retention_high": 0.33,
        }
    ]
    text = "\n".join(study_analysis.headline_markdown(macro, [0.125]))
    assert "| random (one draw) | attn | 0.275 [0.210, 0.330] |" in text


def test_a_cell_is_reproduced_by_prune_layers_then_eval(saved_model, data_dir, tmp_path):
    """A recorded cell's blocks, removed with `avss prune --layers` and scored with `avss eval` on the study's
    examples, give the cell's metrics and per-example records: the study's numbers can be checked by hand."""
    out = tmp_path / "study"
    small = config(saved_model, data_dir, methods=["angular"], iterative=False, fractions=[0, 0.5])
    study = Study(small, out)
    study.run()
    (cell,) = [c for c in study.cells.values() if c.removed]
    runner = CliRunner()
    pruned = tmp_path / "pruned"
    layers = ",".join(map(str, cell.removed))
    result = runner.invoke(app, ["prune", str(saved_model), "--layers", layers, "--out", str(pruned)])
    assert result.exit_code == 0, result.output
    scored = tmp_path / "eval.json"
    arguments = [
        "eval", str(pruned), "--tasks", "wikitext2,sst2", "--limit", "4", "--batch-size", "4",
        "--max-length", "32", "--data-dir", str(data_dir), "--out", str(scored),
    ]  # fmt: skip
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    recorded = read_json(out / "cells" / f"{cell.key}.eval.json.gz")["tasks"]
    again = json.loads(scored.read_text())["tasks"]
    for task in ("wikitext2", "sst2"):
        assert again[task]["metrics"] == pytest.approx(recorded[task]["metrics"], rel=1e-6), task
        assert [r["id"] for r in again[task]["records"]] == [r["id"] for r in recorded[task]["records"]]


def assert_same_cells(one: Path, other: Path) -> None:
    cells = sorted(path.name for path in (other / "cells").glob("*.eval.json.gz"))
    assert cells and cells == sorted(path.name for path in (one / "cells").glob("*.eval.json.gz"))
    for name in cells:
        a, b = (read_json(root / "cells" / name)["tasks"] for root in (one, other))
        for task in a:
            assert a[task]["metrics"] == b[task]["metrics"], (name, task)
            assert a[task]["records"] == b[task]["records"], (name, task)


@pytest.fixture
def replays(monkeypatch) -> list[int]:
    """The start blocks of every replayed task evaluation."""
    starts: list[int] = []
    replay = prefix_module.PrefixStore.replay

    def counted(self, model, task, start):
        starts.append(start)
        return replay(self, model, task, start)

    monkeypatch.setattr(prefix_module.PrefixStore, "replay", counted)
    return starts


def test_cells_run_from_the_shared_prefix_give_the_same_numbers_to_the_bit(
    saved_model, data_dir, tmp_path, replays
):
    """Recording the unpruned model's block inputs once and running each pruned model from its first removed
    block changes no number: every cell's metrics and per-example records equal those of full forwards."""
    small = config(saved_model, data_dir, methods=["last", "random", "angular"], iterative=False)
    shared, full = tmp_path / "shared", tmp_path / "full"
    Study(small, shared, progress=False).run()
    assert replays and min(replays) > 0 and not (shared / ".prefix").exists()
    Study(small, full, progress=False, share_prefix=False).run()
    assert_same_cells(shared, full)


def test_a_resumed_study_records_the_prefix_in_its_first_cells_without_evaluating_the_base_again(
    saved_model, data_dir, tmp_path, monkeypatch, replays
):
    """The base cell is on disk, so the resumed study evaluates only its new cells: the first cell passing a
    chosen block records its input, later cells replay it, and every number equals full forwards."""
    small = config(saved_model, data_dir, methods=["last", "random"], iterative=False)
    resumed, full = tmp_path / "resumed", tmp_path / "full"
    Study(config(saved_model, data_dir, methods=["last"], iterative=False, fractions=[0]), resumed).run()
    calls = interrupting(monkeypatch, lambda call, task: False)
    logged: list[str] = []
    Study(small, resumed, progress=False, log=logged.append, resume=True).run()
    assert any("sharing the inputs of blocks" in line for line in logged) and replays
    monkeypatch.setattr(study_module, "evaluate", evaluate)
    whole = Study(small, full, progress=False, share_prefix=False).run()
    assert len(calls) == 2 * sum(not cell.reused_from for cell in whole.cells)  # two tasks a cell, no base
    assert_same_cells(resumed, full)


@pytest.mark.parametrize("elsewhere", [True, False])
def test_a_resumed_study_files_a_base_of_its_own_once_per_processor(
    saved_model, data_dir, tmp_path, monkeypatch, elsewhere
):
    """Reduced precision differs between CPUs, so a study resumed on another processor evaluates the unpruned
    model there once, files it beside the stored base and compares its cells with it; on the processor of
    the stored base, the base is not evaluated again."""
    out = tmp_path / "study"
    Study(config(saved_model, data_dir, methods=["last"], iterative=False, fractions=[0]), out).run()
    stored = read_json(out / "cells" / "base.json")
    stored["metrics"]["sst2"]["accuracy"] += 0.25  # as if computed by other kernels
    stored["processor"] = "Other CPU 9000" if elsewhere else processor()
    (out / "cells" / "base.json").write_text(json.dumps(stored))
    evaluation = EvalResult.load(out / "cells" / "base.eval.json.gz")
    record = evaluation.tasks["sst2"].records[0]
    record.metrics["accuracy"] = 1.0 - record.metrics["accuracy"]  # the other kernels' records too
    evaluation.save(out / "cells" / "base.eval.json.gz")
    tampered = sum(r.metrics["accuracy"] for r in evaluation.tasks["sst2"].records) / 4
    grown = config(saved_model, data_dir, methods=["last"], iterative=False)
    calls = interrupting(monkeypatch, lambda call, task: False)
    logged: list[str] = []
    result = Study(grown, out, progress=False, log=logged.append, resume=True).run()
    assert result.base.metrics == stored["metrics"] and result.complete
    pruned_calls = 2 * sum(not cell.reused_from for cell in result.cells)
    key = f"base@{slug(processor())}"
    filed = out / "cells" / f"{key}.eval.json.gz"
    accuracy = [row for row in result.rows() if (row["task"], row["metric"]) == ("sst2", "accuracy")]
    if not elsewhere:
        assert len(calls) == pruned_calls and not filed.exists()
        assert {(row["base_key"], row["base_value"]) for row in accuracy} == {("base", tampered)}
        return
    assert len(calls) == pruned_calls + 2
    here = read_json(filed)["tasks"]["sst2"]["metrics"]["accuracy"]
    assert here == stored["metrics"]["sst2"]["accuracy"] - 0.25 and here != tampered
    assert any("other numbers on" in line for line in logged)
    assert {(row["base_key"], row["base_value"]) for row in accuracy} == {(key, here)}
    assert f"`{key}`: {len(result.cells)} cells" in (out / "summary.md").read_text()
    calls.clear()
    Study(grown, out, progress=False, resume=True).run()
    assert calls == []  # this processor's base is filed: not evaluated again


def test_choosing_the_blocks_to_record():
    # Cells first removing blocks 5, 5, 9 and 2: recording 5 alone skips 5 + 5 + 5 + 0 = 15 blocks.
    assert prefix_module.skipped([5], [5, 5, 9, 2]) == 15
    assert prefix_module.skipped([2, 5, 9], [5, 5, 9, 2]) == 5 + 5 + 9 + 2
    assert prefix_module.choose_starts([5, 5, 9, 2], most=1) == [5]
    assert prefix_module.choose_starts([5, 5, 9, 2], most=3) == [2, 5, 9]
    assert prefix_module.choose_starts([0, 0]) == []  # every cell removes block 0: nothing to share
    assert prefix_module.start_for(7, [2, 5, 9]) == 5 and prefix_module.start_for(1, [2, 5, 9]) == 0
    assert (
        prefix_module.start_for(9, [2, 5, 9], depth=9) == 5
    )  # block 9 is gone: the state would feed the head


def test_a_study_folder_continues_only_with_resume(saved_model, data_dir, tmp_path):
    """The one resume rule of every command: an existing study is refused without --resume (nothing in it
    changes), continued with it, and read by a report either way."""
    out = tmp_path / "study"
    small = config(saved_model, data_dir, methods=["last"], iterative=False, fractions=[0, 0.25])
    Study(small, out, progress=False).run()
    before = {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}
    with pytest.raises(OutputError, match="continue it with --resume"):
        Study(small, out, progress=False).run()
    assert {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()} == before
    assert Study(small, out, progress=False).report().complete
    assert Study(small, out, progress=False, resume=True).run().complete


def interrupting(monkeypatch, when) -> list[str]:
    """Make ``avss.study.evaluate`` raise KeyboardInterrupt at the call where ``when(call, task)``; returns
    the task of every call."""
    original = study_module.evaluate
    calls: list[str] = []

    def counted(model, tokenizer, tasks, **kwargs):
        calls.append(tasks[0])
        if when(len(calls), tasks[0]):
            raise KeyboardInterrupt
        return original(model, tokenizer, tasks, **kwargs)

    monkeypatch.setattr(study_module, "evaluate", counted)
    return calls


def test_an_interrupted_cell_resumes_by_task(saved_model, data_dir, tmp_path, monkeypatch):
    """A cell that stops in its second task keeps its first (hours of a large model's cell on a CPU): the
    resumed run evaluates only the rest, and every number equals an uninterrupted run's."""
    small = config(saved_model, data_dir, methods=["last"], iterative=False, fractions=[0, 0.25])
    out = tmp_path / "study"
    # Calls 1-2: the base cell's two tasks; call 4: the pruned cell's second task.
    interrupting(monkeypatch, lambda call, task: call == 4)
    with pytest.raises(KeyboardInterrupt):
        Study(small, out, progress=False).run()
    key = "last__oneshot__0.25"
    assert sorted(p.name for p in (out / "cells" / f"{key}.tasks").iterdir()) == ["wikitext2.eval.json.gz"]
    assert not (out / "cells" / f"{key}.json").exists()
    calls = interrupting(monkeypatch, lambda call, task: False)
    logged: list[str] = []
    resumed = Study(small, out, progress=False, log=logged.append, resume=True).run()
    assert calls == ["sst2"]
    assert any(f"wikitext2: read from {key}.tasks" in line for line in logged)
    assert not (out / "cells" / f"{key}.tasks").exists()
    assert read_json(out / "cells" / f"{key}.json")["seconds"] > 0
    whole = tmp_path / "whole"
    monkeypatch.setattr(study_module, "evaluate", evaluate)
    uninterrupted = Study(small, whole, progress=False).run()
    assert resumed.rows() == uninterrupted.rows()
    assert_same_cells(out, whole)


def test_a_finished_task_from_another_processor_is_evaluated_again(
    saved_model, data_dir, tmp_path, monkeypatch
):
    small = config(saved_model, data_dir, methods=["last"], iterative=False, fractions=[0, 0.25])
    out = tmp_path / "study"
    interrupting(monkeypatch, lambda call, task: call == 4)
    with pytest.raises(KeyboardInterrupt):
        Study(small, out, progress=False).run()
    path = out / "cells" / "last__oneshot__0.25.tasks" / "wikitext2.eval.json.gz"
    stored = read_json(path)
    stored["model"]["processor"] = "Other CPU 9000"
    atomic_write_json(path, stored)
    calls = interrupting(monkeypatch, lambda call, task: False)
    logged: list[str] = []
    Study(small, out, progress=False, log=logged.append, resume=True).run()
    assert calls == ["wikitext2", "sst2"]
    assert any("processor 'Other CPU 9000'; evaluating it again" in line for line in logged)


def test_a_base_cell_resumed_by_task_leaves_the_unrecorded_task_to_full_forwards(
    saved_model, data_dir, tmp_path, monkeypatch, replays
):
    """The prefix is recorded while the base cell runs; a base task read back from an interrupted run was
    not recorded, so the pruned cells run that task whole and replay the others, to the same numbers."""
    small = config(saved_model, data_dir, methods=["last", "random"], iterative=False)
    out = tmp_path / "study"
    interrupting(monkeypatch, lambda call, task: call == 2)  # the base cell's second task
    with pytest.raises(KeyboardInterrupt):
        Study(small, out, progress=False).run()
    assert (out / "cells" / "base.tasks" / "wikitext2.eval.json.gz").exists()
    monkeypatch.setattr(study_module, "evaluate", evaluate)
    Study(small, out, progress=False, resume=True).run()
    assert replays and not (out / ".prefix").exists()
    full = tmp_path / "full"
    Study(small, full, progress=False, share_prefix=False).run()
    assert_same_cells(out, full)


def test_each_variant_is_compared_with_its_plain_twin_on_the_same_resamples():
    """variant_effects: macro retention of the variant minus its twin's, by hand on 4-option records
    (chance 0.25): base 3 of 4 right (0.75), plain twin 1 of 4 (retention 0), patched 3 of 4 (retention 1)."""
    from avss.study import analysis as study_analysis
    from avss.study.analysis import CellInfo
    from test_evaluation_records import mc_records, result

    evaluations = {
        "base": result(sciq=mc_records([1, 1, 1, 0])),
        "plain": result(sciq=mc_records([1, 0, 0, 0])),
        "patched": result(sciq=mc_records([1, 1, 1, 0])),
        "same-as-plain": result(sciq=mc_records([1, 0, 0, 0])),
    }
    cells = [
        CellInfo("bi", "oneshot", 0.25, [2, 3], "plain", None),
        CellInfo("bi", "oneshot+protect", 0.25, [2, 3], "plain", "bi__oneshot__0.25"),  # reused: left out
        CellInfo("bi", "oneshot+patch", 0.25, [2, 3], "patched", None),
        CellInfo("bi", "iterative", 0.25, [1, 3], "same-as-plain", None),
        CellInfo("bi", "attn", 0.25, [0], "patched", None),  # no plain twin
    ]
    bootstrap = Bootstrap(2000, 0)
    retention = study_analysis.MacroRetention(evaluations, [("sciq", "accuracy")], bootstrap)
    rows = study_analysis.variant_effects(cells, retention)
    by_mode = {row["mode"]: row for row in rows}
    assert set(by_mode) == {"oneshot+patch", "iterative"}
    patched = by_mode["oneshot+patch"]
    assert patched["plain_mode"] == "oneshot" and patched["difference"] == pytest.approx(1.0)
    # Where a resample's base is above chance the patched cell keeps everything (1) and the twin at most that,
    # so no draw is below 0; a resample of examples 1-3 can put the twin below chance, the difference above 1.
    assert 0 <= patched["difference_low"] < 1 < patched["difference_high"]
    # The same outcomes under another key differ by exactly 0 in every resample: the draws are paired.
    iterative = by_mode["iterative"]
    assert (iterative["difference"], iterative["difference_low"], iterative["difference_high"]) == (0, 0, 0)
    assert iterative["removed_layers"] == [1, 3] and iterative["plain_removed_layers"] == [2, 3]

    text = "\n".join(study_analysis.variants_markdown(rows))
    assert "| bi | oneshot+patch | oneshot | 0.25 | 2, 3 | 1.000 [" in text
    assert "| bi | iterative | oneshot | 0.25 | 1, 3 (2, 3) | 0.000 [0.000, 0.000] |" in text


def test_plain_modes_and_twins_compared_with_bases_in_another_order():
    from avss.errors import PairingError
    from avss.study import analysis as study_analysis
    from avss.study.analysis import CellInfo
    from test_evaluation_records import mc_records, result

    assert study_analysis.plain_mode("oneshot+protect+patch") == "oneshot+protect"
    assert study_analysis.plain_mode("oneshot+healed") == "oneshot"
    assert study_analysis.plain_mode("iterative") == "oneshot"
    assert study_analysis.plain_mode("oneshot") is None and study_analysis.plain_mode("attn") is None
    records = mc_records([1, 1, 1, 0])
    evaluations = {
        "base": result(sciq=records),
        "base@other": result(sciq=records[::-1]),
        "plain": result(sciq=mc_records([1, 0, 0, 0])),
        "healed": result(sciq=mc_records([1, 1, 0, 0])),
    }
    cells = [
        CellInfo("bi", "oneshot", 0.25, [2], "plain", None),
        CellInfo("bi", "oneshot+healed", 0.25, [2], "healed", None, base_key="base@other"),
    ]
    with pytest.raises(PairingError, match="base@other and base order sciq's examples differently"):
        retention = study_analysis.MacroRetention(evaluations, [("sciq", "accuracy")], Bootstrap(100, 0))
        study_analysis.variant_effects(cells, retention)
