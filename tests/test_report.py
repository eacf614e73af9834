"""``avss report``: a self-contained HTML page and its Markdown twin from whatever the run folders hold."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest

from avss.errors import DataError
from avss.report import collect, output_files, render_html, write_report

LAYERS = [
    {
        "layer": i,
        "variance": 0.1 * (i + 1),
        "sparsity": 0.05,
        "avss": [0.7, 1.2, 0.4, 1.7][i],
        "avss_normalized": 0.25,
    }
    for i in range(4)
]


def red_bar_plot(path: Path) -> None:
    """A plot whose pixels are easy to find in a screenshot: saturated red bars."""
    figure, axis = plt.subplots(figsize=(5, 3))
    axis.bar(range(4), [row["avss"] for row in LAYERS], color="#e00000")
    figure.savefig(path, format="png", dpi=80)
    plt.close(figure)


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def evaluation(value: float, ppl: float) -> dict:
    return {
        "format": "avss-eval/1",
        "model": {"name": "tiny"},
        "tasks": {
            "sciq": {
                "metrics": {"accuracy": value},
                "num_examples": 20,
                "config": {},
                "data": [],
                "seconds": 1.0,
            },
            "wikitext2": {
                "metrics": {"perplexity": ppl},
                "num_examples": 5,
                "config": {},
                "data": [],
                "seconds": 1.0,
            },
        },
        "options": {"limit": 20},
        "versions": {"avss-llm": "0.1.0", "torch": "2.13"},
        "wall_time_s": 2.0,
        "created": "2026-01-01T00:00:00+00:00",
    }


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    """A full run (scores, pruned model, evaluation, study CSV, EAVSS, plots, noise) and an evaluation run."""
    full, other = tmp_path / "full", tmp_path / "pruned-eval"
    write_json(
        full / "scores.json",
        {
            "avss_version": "0.1.0",
            "model": {"name": "tiny-llama", "kind": "directory"},
            "command": "avss score tiny --samples 8",
            "versions": {"avss": "0.1.0", "torch": "2.13.0"},
            "options": {"site": "block", "variance": "elements", "threshold": "rel:0.01"},
            "warnings": ["1 layer(s) [3] have no values under the sparsity threshold"],
            "layers": LAYERS,
        },
    )
    model = full / "model"
    write_json(model / "config.json", {"model_type": "llama", "num_hidden_layers": 3})
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    write_json(
        model / "avss_pruning.json",
        {
            "source_model": {"name": "tiny-llama"},
            "removed_layers": [2],
            "kept_layers": [0, 1, 3],
            "original_num_layers": 4,
            "method": "avss",
            "selection": {"rule": "count", "fraction": 0.25},
            "options": {"versions": {"avss": "0.1.0"}, "command": "avss prune tiny --fraction 0.25"},
        },
    )
    write_json(full / "eval.json", evaluation(0.5, 20.0))
    write_json(full / "eavss.json", {"layers": [{**row, "eavss": row["avss"] / 2} for row in LAYERS]})
    write_json(full / "config.json", {"methods": ["avss", "block_influence"], "fractions": [0.25]})
    for key in range(5):
        write_json(full / "cells" / f"cell{key}.json", {"key": key})
    (full / "results.csv").write_text("method,fraction,retained\navss,0.25,0.91\nblock_influence,0.25,0.88\n")
    (full / "summary.txt").write_text("removed 1 of 4 layers; perplexity retained 93.1%\n")
    (full / "broken.json").write_text("{not json")
    odd_layers = [{"layer": 0, "avss": 1.0}, {"layer": 1, "avss": None}]
    write_json(full / "odd" / "scores.json", {"layers": odd_layers})
    (full / ".scores.json.abc.tmp").write_text("partial")
    write_json(full / "scores.json.checkpoint.json", {"format": "avss-statistics-checkpoint/1"})
    (full / "healed.checkpoint").mkdir()
    (full / "healed.checkpoint" / "checkpoint.pt").write_bytes(b"\0" * 64)
    red_bar_plot(full / "scores.png")
    write_json(other / "eval.json", evaluation(0.4, 25.0))
    return full, other


def test_collect_reads_every_kind_of_output(runs: tuple[Path, Path]) -> None:
    report = collect(list(runs))
    titles = [section.title for section in report.runs[0].sections]
    for expected in ("AVSS per layer", "EAVSS per layer", "Evaluation", "Pruned layers", "results", "Plots"):
        assert expected in titles
    assert "cells/" in titles, "many small JSON files collapse into one entry"
    odd = next(s for s in report.runs[0].sections if s.source == runs[0] / "odd" / "scores.json")
    assert odd.title == "scores", "a file a reader cannot parse falls back to the generic reader"
    assert not any(section.source.name == ".scores.json.abc.tmp" for section in report.runs[0].sections)
    assert not any(section.source == runs[0] / "model" / "config.json" for section in report.runs[0].sections)
    assert any(section.source == runs[0] / "config.json" for section in report.runs[0].sections)
    listed = {path.relative_to(runs[0]).as_posix() for path in output_files(runs[0])}
    assert "scores.json" in listed
    assert not any("checkpoint" in name for name in listed), "checkpoints of unfinished runs are not outputs"

    scores = next(s for s in report.runs[0].sections if s.title == "AVSS per layer")
    ranks = [row[-1] for row in scores.tables[0].rows]
    assert ranks == [1, 2, 0, 3]
    assert scores.provenance["command"] == "avss score tiny --samples 8"


def test_evaluations_without_records_are_only_set_side_by_side(runs: tuple[Path, Path]) -> None:
    """Files from before per-example records: no interval and no pairing, so no ratio is called retained."""
    [table] = collect(list(runs)).comparisons
    rows = {(row[0], row[1]): row[2:] for row in table.rows}
    assert rows[("sciq", "accuracy")] == [0.5, 0.4]
    assert rows[("wikitext2", "perplexity")] == [20.0, 25.0]
    assert "no interval" in table.caption and not any("retained" in column for column in table.columns)


@pytest.fixture(scope="module")
def written_runs(saved_tiny_model, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """What the commands themselves write: `avss score` and `avss eval` of a tiny model, and `avss prune
    --layers` and `avss eval` of its pruned copy, on the same examples."""
    from typer.testing import CliRunner

    from avss.cli._app import app

    model, root = saved_tiny_model(4), tmp_path_factory.mktemp("written")
    data = root / "data"
    shutil.copytree(Path(__file__).parent / "fixtures" / "eval" / "arc_easy", data / "arc_easy")
    (data / "wikitext2").mkdir()
    (data / "wikitext2" / "wiki.test.raw").write_text(
        "\n".join(f" = Section {i} = \n The cat sat on mat number {i} ." for i in range(6)) + "\n"
    )
    base, pruned = root / "base", root / "pruned"
    evaluate = [
        "--tasks",
        "wikitext2,arc_easy",
        "--limit",
        "4",
        "--max-length",
        "32",
        "--data-dir",
        str(data),
    ]
    commands = [
        ["score", str(model), "--samples", "2", "--max-length", "16", "--out", str(base / "scores.json")],
        ["eval", str(model), *evaluate, "--out", str(base / "eval.json")],
        ["prune", str(model), "--layers", "1", "--out", str(pruned / "model")],
        ["eval", str(pruned / "model"), *evaluate, "--out", str(pruned / "eval.json")],
    ]
    for command in commands:
        result = CliRunner().invoke(app, [*command, "--device", "cpu"])
        assert result.exit_code == 0, result.output
    return base, pruned


def test_report_reads_what_the_commands_wrote(written_runs: tuple[Path, Path]) -> None:
    from avss.evaluation.runner import EvalResult
    from avss.report import comparison_cells, format_interval

    base, pruned = written_runs
    report = collect([base, pruned])
    sections = [{s.title: s for s in run.sections} for run in report.runs]
    assert {"AVSS per layer", "Evaluation"} <= set(sections[0]) and {"Pruned layers", "Evaluation"} <= set(
        sections[1]
    )
    layers = json.loads((base / "scores.json").read_text())["layers"]
    assert len(sections[0]["AVSS per layer"].tables[0].rows) == len(layers)
    assert sections[1]["Pruned layers"].facts["removed"] == "1"
    written = EvalResult.load(base / "eval.json")
    for task, metric, value, interval, examples in sections[0]["Evaluation"].tables[0].rows:
        assert value == written.tasks[task].metrics[metric] and examples == written.tasks[task].num_examples
        assert interval == format_interval(written.tasks[task].interval(metric)) != ""

    [table] = report.comparisons
    expected = EvalResult.load(pruned / "eval.json").compare(written)
    assert [row[1:] for row in table.rows] == [comparison_cells(row) for row in expected.rows]
    by_metric = {row[2]: row for row in table.rows}
    assert by_metric["perplexity"][6].endswith("nats/token")
    accuracy = next(row for row in expected.rows if row.metric == "accuracy")
    assert by_metric["accuracy"][8].startswith("not reported") != bool(accuracy.included)


def test_html_is_self_contained(runs: tuple[Path, Path], tmp_path: Path) -> None:
    page = render_html(collect(list(runs)), title="demo & <test>")
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page), "no external assets"
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 1
    assert base64.b64decode(images[0]) == (runs[0] / "scores.png").read_bytes()
    assert "demo &amp; &lt;test&gt;" in page
    assert "avss prune tiny --fraction 0.25" in page
    assert "not readable as JSON" in page
    assert "<pre>removed 1 of 4 layers; perplexity retained 93.1%" in page
    assert '<td class="num">0.91</td>' in page, "CSV numbers are right-aligned numbers"


def test_markdown_travels_with_copies_of_its_plots(runs: tuple[Path, Path], tmp_path: Path) -> None:
    _, markdown = write_report(list(runs), tmp_path / "docs" / "report.html")
    text = markdown.read_text()
    [link] = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert link == "report_files/0-full/scores.png"
    assert (markdown.parent / link).read_bytes() == (runs[0] / "scores.png").read_bytes()
    assert "| sciq | accuracy |" in text
    assert "- **removed**: 2" in text


def test_any_subset_of_outputs_is_enough(tmp_path: Path) -> None:
    only_plot = tmp_path / "only-plot"
    only_plot.mkdir()
    red_bar_plot(only_plot / "curve.png")
    html_path, md_path = write_report([only_plot], tmp_path / "out" / "report.html")
    assert "data:image/png;base64," in html_path.read_text()
    assert md_path == tmp_path / "out" / "report.md"


@pytest.mark.parametrize("make", [lambda p: None, lambda p: p.mkdir()], ids=["missing", "empty"])
def test_nothing_to_report_is_a_data_error(tmp_path: Path, make) -> None:
    make(tmp_path / "run")
    with pytest.raises(DataError):
        write_report([tmp_path / "run"], tmp_path / "report.html")
    assert not (tmp_path / "report.html").exists()


def test_cli_report(runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "site" / "report.html"
    result = subprocess.run(
        [sys.executable, "-m", "avss", "report", *map(str, runs), "--out", str(out), "--title", "Demo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.is_file() and out.with_suffix(".md").is_file()
    assert "<title>Demo</title>" in out.read_text()


def chromium() -> str:
    """The Chromium binary, installed from Debian when missing and possible; otherwise skip, saying why."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        if subprocess.run(command, env=env, capture_output=True, timeout=900).returncode != 0:
            pytest.skip(f"installing chromium failed at: {' '.join(command)}")
    return shutil.which("chromium") or pytest.skip("chromium still not on PATH after apt-get install")


@pytest.mark.slow
def test_page_renders_in_headless_chromium(runs: tuple[Path, Path], tmp_path: Path) -> None:
    binary = chromium()
    page, shot = tmp_path / "report.html", tmp_path / "shot.png"
    write_report(list(runs), page)
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--window-size=1200,3000",
                f"--screenshot={shot}",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, f"the page logged to the console: {console}"

    pixels = plt.imread(shot)[..., :3]
    assert pixels.std() > 0.05, "the screenshot is blank"
    red = (pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.2) & (pixels[..., 2] < 0.2)
    assert red.sum() > 500, "the embedded plot's red bars are not visible in the screenshot"
    assert np.isfinite(pixels).all()
