"""The core commands end to end on a tiny saved model, through the real entry point."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from avss.pruning.prune import PROVENANCE_FILE


@pytest.fixture(scope="module")
def model_dir(saved_tiny_model) -> Path:
    return saved_tiny_model(6)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(
        "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(20))
    )
    return path


def test_score_writes_json_with_every_option(cli, model_dir, text_file, tmp_path):
    out = tmp_path / "scores.json"
    result = cli("score", model_dir, "--data", text_file, "--samples", 4, "--max-length", 32, "--out", out)
    assert result.returncode == 0, result.stderr
    scores = json.loads(out.read_text())
    assert len(scores["layers"]) == 6
    assert scores["score_options"]["site"] == "block"
    assert scores["calibration"]["samples"] == 4
    assert scores["data"]["kind"] == "file" and len(scores["data"]["sha256"]) == 64


def test_score_with_a_device_map_gives_the_same_scores(cli, model_dir, text_file, tmp_path):
    """--device-map loads through accelerate's dispatch (all on the CPU here) and changes no number."""
    common = ("score", model_dir, "--data", text_file, "--samples", 4, "--max-length", 32, "--device", "cpu")
    plain, mapped = tmp_path / "plain.json", tmp_path / "mapped.json"
    assert cli(*common, "--out", plain).returncode == 0
    result = cli(*common, "--device-map", "auto", "--out", mapped)
    assert result.returncode == 0, result.stderr
    layers = lambda path: json.loads(path.read_text())["layers"]  # noqa: E731
    assert layers(mapped) == layers(plain)


def test_prune_saves_a_model_that_reloads(cli, model_dir, text_file, tmp_path):
    out = tmp_path / "pruned"
    result = cli(
        "prune", model_dir, "--data", text_file, "--samples", 4, "--max-length", 32, "--fraction", 0.5,
        "--protect", "first", "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert len(provenance["removed_layers"]) == 3 and 0 not in provenance["removed_layers"]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["score", "no/such/model-dir/"], "not found"),
        (["score", "tiny-unknown-name"], "not found"),
        (["prune", "{model}", "--fraction", "1.5", "--out", "{tmp}/x"], "strictly between 0 and 1"),
        (["score", "{model}", "--data", "{tmp}/empty.txt"], "empty"),
    ],
)
def test_bad_input_is_one_line_exit_2(cli, model_dir, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("")
    result = cli(*[a.format(model=model_dir, tmp=tmp_path) for a in args])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_installed_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "avss", "models"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "smollm2-135m" in result.stdout and "gemma3_text" in result.stdout


def test_a_flag_group_is_declared_once_and_arrives_as_its_object(text_file):
    """The group's flags replace the command's one parameter in the signature typer reads (with per-command
    defaults), and the command receives the object they build, validated before its body runs."""
    import inspect

    from avss.cli.options import CALIBRATION_TEXT, CALIBRATION_WINDOWS
    from avss.data import CalibrationOptions, TextSource
    from avss.errors import OptionError

    received = []

    @CALIBRATION_TEXT.into()
    @CALIBRATION_WINDOWS.into(samples=7)
    def command(model: str = "m", *, source: TextSource, calibration: CalibrationOptions, out: str = "o"):
        received.append((model, source, calibration, out))

    parameters = inspect.signature(command).parameters
    assert list(parameters) == [
        "model",
        "data",
        "data_dir",
        "dataset",
        "samples",
        "max_length",
        "batch_size",
        "seed",
        "out",
    ]
    assert parameters["samples"].default == 7 and parameters["max_length"].default == 256
    command(
        model="x",
        data=text_file,
        data_dir=None,
        dataset=None,
        samples=3,
        max_length=16,
        batch_size=2,
        seed=5,
        out="y",
    )
    assert received == [("x", TextSource(data=str(text_file)), CalibrationOptions(3, 16, 2, 5), "y")]
    with pytest.raises(OptionError, match="samples"):
        command(data=None, data_dir=None, dataset=None, samples=0, max_length=16, batch_size=2, seed=0)
    assert len(received) == 1
    with pytest.raises(TypeError, match="no flags"):
        CALIBRATION_WINDOWS.into(sample=3)
    with pytest.raises(TypeError, match="declares no parameter 'calibration'"):
        CALIBRATION_WINDOWS.into()(lambda model="m": None)


def test_load_options_refuse_a_bad_dtype_or_device_when_built():
    from avss.errors import DeviceError
    from avss.models import LoadOptions

    assert LoadOptions(dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(DeviceError, match="invalid --dtype 'float8'"):
        LoadOptions(dtype="float8")
    with pytest.raises(DeviceError):
        LoadOptions(device="tpu")
