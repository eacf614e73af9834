"""One provenance record leads every JSON result file, and readers dispatch on its ``format`` tag."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch

import avss
from avss import provenance
from avss.errors import HealConfigError
from avss.evaluation.runner import RESULT_FORMAT
from avss.healing.heal import HEALING_FILE, HEALING_FORMAT, read_pruning_record
from avss.provenance import Provenance
from avss.pruning.prune import PROVENANCE_FILE, PRUNING_FORMAT
from avss.report import collect
from avss.scorers.run import SCORES_FORMAT


def assert_stamped(data: dict[str, Any], format: str) -> None:
    """``data`` was written by this avss, now: its format tag and every provenance key."""
    assert data["format"] == format
    assert datetime.fromisoformat(data["created"]).utcoffset().total_seconds() == 0
    assert data["avss_version"] == avss.__version__
    assert {"python", "avss-llm", "torch", "transformers"} <= set(data["versions"])
    assert isinstance(data["command"], str) and data["command"]


def test_provenance_records_how_and_when_a_file_was_made() -> None:
    provenance = Provenance.now("avss-test/1", model={"name": "tiny"})
    saved = provenance.to_dict()
    assert list(saved) == ["format", "created", "avss_version", "command", "versions", "model"]
    assert_stamped(saved, "avss-test/1")
    assert "data" not in saved, "model and data only where the file is about one"
    assert Provenance.from_dict(json.loads(json.dumps(saved))) == provenance


def test_a_format_tag_is_required() -> None:
    with pytest.raises(TypeError):
        Provenance.now()  # type: ignore[call-arg]


@pytest.mark.parametrize("tag", ["", "avss-pruning", "avss pruning/2", "avss-pruning/v2", None])
def test_a_format_tag_has_a_family_and_a_version(tag: Any) -> None:
    with pytest.raises(ValueError, match="format"):
        Provenance.now(tag)


def test_files_from_before_the_tag_read_with_empty_fields() -> None:
    stored = {"format": "avss-eval/1", "versions": {"torch": "2.1"}, "model": {"name": "x"}}
    old = Provenance.from_dict(stored)
    assert old.avss_version == "" and old.command == "" and old.created == ""
    assert old.versions == {"torch": "2.1"} and old.model == {"name": "x"}


def test_every_writer_stamps_its_file_and_the_report_dispatches_on_the_tag(cli, saved_tiny_model, tmp_path):
    """score, prune, heal and eval through the CLI; the report reads what they wrote, by format tag."""
    model, run = saved_tiny_model(4), tmp_path / "run"
    fast = ("--samples", 4, "--max-length", 32, "--device", "cpu")
    commands = [
        ("score", model, *fast, "--out", run / "scores.json"),
        ("prune", model, *fast, "--n-layers", 1, "--out", run / "pruned"),
        ("heal", run / "pruned", "--out", run / "healed", "--method", "full", "--steps", 2, "--epochs", 1),
        ("eval", run / "pruned", "--tasks", "perplexity", "--limit", 2, "--device", "cpu"),
    ]
    commands[2] += ("--max-length", 32, "--validation-samples", 4, "--device", "cpu")
    commands[3] += ("--max-length", 32, "--out", run / "eval.json")
    for command in commands:
        result = cli(*command)
        assert result.returncode == 0, result.stderr
    files = {  # each file: its format and the command that wrote it
        "scores.json": (SCORES_FORMAT, "avss score"),
        f"pruned/{PROVENANCE_FILE}": (PRUNING_FORMAT, "avss prune"),
        f"healed/{HEALING_FILE}": (HEALING_FORMAT, "avss heal"),
        "eval.json": (RESULT_FORMAT, "avss eval"),
    }
    saved = {name: json.loads((run / name).read_text()) for name in files}
    for name, (format, command) in files.items():
        assert_stamped(saved[name], format)
        assert saved[name]["command"].startswith(command), name
    assert saved[f"healed/{HEALING_FILE}"]["pruning"]["format"] == PRUNING_FORMAT, "the healed pruning's own"
    assert saved["scores.json"]["model"] == saved[f"pruned/{PROVENANCE_FILE}"]["source_model"]

    # A tagged file goes to its family's reader; its provenance, format included, goes to the table.
    titles = {"scores.json": "AVSS per layer", f"pruned/{PROVENANCE_FILE}": "Pruned layers"}
    titles |= {"eval.json": "Evaluation", f"healed/{HEALING_FILE}": "avss healing"}  # no reader: generic
    sections = {section.source: section for section in collect([run]).runs[0].sections}
    for name, title in titles.items():
        assert sections[run / name].title == title, name
        assert sections[run / name].provenance["format"] == files[name][0]
        assert sections[run / name].provenance["command"].startswith(files[name][1])

    # The tag decides, not the keys: a pruning record of an unknown family is shown generically, and
    # without any tag (a file from before it existed) its keys still identify it.
    record = saved[f"pruned/{PROVENANCE_FILE}"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "renamed.json").write_text(json.dumps({**record, "format": "avss-unknown/1"}))
    untagged = {key: value for key, value in record.items() if key != "format"}
    (other / "untagged.json").write_text(json.dumps(untagged))
    sections = {section.source.name: section for section in collect([other]).runs[0].sections}
    assert sections["renamed.json"].title == "renamed"
    assert sections["untagged.json"].title == "Pruned layers"


def test_heal_reads_untagged_pruning_records_and_refuses_newer_ones(tmp_path: Path) -> None:
    record = {"removed_layers": [1], "kept_layers": [0, 2], "original_num_layers": 3, "source_model": {}}
    (tmp_path / PROVENANCE_FILE).write_text(json.dumps(record))
    assert read_pruning_record(tmp_path) == record
    (tmp_path / PROVENANCE_FILE).write_text(json.dumps({**record, "format": "avss-pruning/9"}))
    with pytest.raises(HealConfigError, match=r"avss-pruning/9.*reads avss-pruning/2"):
        read_pruning_record(tmp_path)


def test_processor_reads_the_model_name_from_cpuinfo(tmp_path: Path, monkeypatch) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n")
    monkeypatch.setattr(provenance, "CPUINFO", cpuinfo)
    assert provenance.processor() == "AMD EPYC 9R14"
    monkeypatch.setattr(provenance, "CPUINFO", tmp_path / "missing")
    monkeypatch.setattr(provenance.platform, "processor", lambda: "arm")
    assert provenance.processor() == "arm"


def test_machine_names_the_processor_and_what_a_timing_depends_on(tmp_path: Path, monkeypatch) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: AMD EPYC 9R14\n")
    monkeypatch.setattr(provenance, "CPUINFO", cpuinfo)
    record = provenance.machine()
    assert record["processor"] == "AMD EPYC 9R14"
    assert record["threads"] == torch.get_num_threads()
    assert json.loads(json.dumps(record)) == record
    record.update(cpus=2, threads=2, memory_gib=23.4, gpu=None)
    assert provenance.describe_machine(record) == "AMD EPYC 9R14, 2 CPUs, 2 torch threads, 23.4 GiB"
    record.update(gpu="NVIDIA H100 80GB HBM3", memory_gib=None)
    assert (
        provenance.describe_machine(record)
        == "AMD EPYC 9R14, 2 CPUs, 2 torch threads, GPU NVIDIA H100 80GB HBM3"
    )
