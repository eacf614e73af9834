"""Kill-safety: a process SIGKILLed in the middle of writing leaves either nothing or the previous result.

Each test starts a child Python process whose writer is slowed down (it writes part of its output, drops a
``ready`` marker and sleeps), waits for the marker, kills the child with SIGKILL (no cleanup handlers run) and
inspects the target. Temporary siblings (``.name.*.tmp``) may be left behind by a kill; the target never is
partial.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from avss.cli import main

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")

SLOW = """
import sys, time
from pathlib import Path

READY = Path({ready!r})


def stall():
    READY.write_text("ready")
    time.sleep(120)
"""


def kill_when_ready(script: str, ready: Path, timeout: float = 90.0) -> None:
    """Run ``script`` in a child process and SIGKILL it as soon as it writes ``ready``."""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not ready.exists():
            if child.poll() is not None:
                raise AssertionError(
                    f"child exited early ({child.returncode}): {child.stderr.read().decode()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError("child never reached the slow write")
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize("previous", [None, {"previous": "complete"}], ids=["first-write", "overwrite"])
def test_json_killed_mid_write(tmp_path: Path, previous: dict | None) -> None:
    target, ready = tmp_path / "scores.json", tmp_path / "ready"
    if previous is not None:
        target.write_text(json.dumps(previous))
    script = SLOW.format(ready=str(ready)) + textwrap.dedent(
        f"""
        from avss.io import atomic_write

        def slow_writer(tmp):
            with open(tmp, "w") as handle:
                handle.write('{{"layers": [')
                handle.flush()
                stall()

        atomic_write({str(target)!r}, slow_writer)
        """
    )
    kill_when_ready(script, ready)
    if previous is None:
        assert not target.exists()
    else:
        assert json.loads(target.read_text()) == previous


@pytest.fixture(scope="module")
def tiny_dir(saved_tiny_model) -> Path:
    return saved_tiny_model(4)


PRUNE = textwrap.dedent(
    """
    from transformers import PreTrainedModel
    from avss.cli import main

    save = PreTrainedModel.save_pretrained

    def slow_save(self, directory, *args, **kwargs):
        save(self, directory, *args, **kwargs)   # the full model is on disk, in the temporary folder ...
        stall()                                  # ... and the process dies before the rename

    PreTrainedModel.save_pretrained = slow_save
    sys.argv = {argv!r}
    main()
    """
)


@pytest.mark.parametrize("previous", [False, True], ids=["first-save", "overwrite"])
def test_pruned_model_killed_mid_save(tiny_dir: Path, tmp_path: Path, previous: bool) -> None:
    out, ready = tmp_path / "pruned", tmp_path / "ready"
    if previous:
        out.mkdir()
        (out / "config.json").write_text('{"previous": true}')
    argv = ["avss", "prune", str(tiny_dir), "--out", str(out), "--overwrite", "--samples", "2"]
    argv += ["--max-length", "16", "--device", "cpu"]
    kill_when_ready(SLOW.format(ready=str(ready)) + PRUNE.format(argv=argv), ready)
    if previous:
        assert sorted(p.name for p in out.iterdir()) == ["config.json"]
        assert json.loads((out / "config.json").read_text()) == {"previous": True}
    else:
        assert not out.exists()


COMMAND = textwrap.dedent(
    """
    import os
    from avss import io
    from avss.cli import main

    TARGET = os.path.realpath({target!r})
    replace, exchange = os.replace, io.exchange_paths

    def at_target(path):
        if os.path.realpath(path) == TARGET:
            stall()   # the new output is complete beside the target, and the process dies before it lands

    def slow_replace(source, destination, *args, **kwargs):
        at_target(destination)
        return replace(source, destination, *args, **kwargs)

    def slow_exchange(first, second):
        at_target(second)
        return exchange(first, second)

    os.replace, io.exchange_paths = slow_replace, slow_exchange
    sys.argv = ["avss", *{argv!r}]
    main()
    """
)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """WikiText-2, ARC-Easy and TruthfulQA in the shared layout, a few rows each."""
    root = tmp_path_factory.mktemp("data")
    (root / "wikitext2").mkdir()
    (root / "wikitext2" / "wiki.test.raw").write_text(
        "\n".join(f" = Section {i} = \n The cat sat on mat number {i} ." for i in range(6)) + "\n"
    )
    shutil.copytree(Path(__file__).parent / "fixtures" / "eval" / "arc_easy", root / "arc_easy")
    questions = [f"What is fact number {i}?" for i in range(40)]
    write_jsonl(
        root / "truthfulqa" / "truthfulqa_gen.jsonl",
        [
            {
                "id": f"tqa_{i:03d}",
                "question": q,
                "best_answer": f"It is {i}",
                "best_incorrect_answer": f"It is {i + 1}",
                "correct_answers": [f"It is {i}"],
                "incorrect_answers": [f"It is {i + 1}", f"It is {i + 2}"],
            }
            for i, q in enumerate(questions)
        ],
    )
    return root


FAST = ["--samples", "2", "--max-length", "16", "--device", "cpu"]


def previous_file(path: Path) -> Callable[[], object]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"previous": true}\n')
    return lambda: path.read_text()


def previous_folder(path: Path) -> Callable[[], object]:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"previous": true}\n')
    return lambda: {p.name: p.read_text() for p in path.iterdir()}


def run_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["avss", *argv])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 0


def score_case(
    model: Path, data: Path, root: Path, mp: pytest.MonkeyPatch
) -> tuple[list[str], Path, Callable]:
    target = root / "scores.json"
    return ["score", str(model), *FAST, "--out", str(target), "--overwrite"], target, previous_file(target)


def eval_case(
    model: Path, data: Path, root: Path, mp: pytest.MonkeyPatch
) -> tuple[list[str], Path, Callable]:
    target = root / "results.json"
    argv = ["eval", str(model), "--tasks", "wikitext2,arc_easy", "--limit", "3", "--max-length", "32"]
    argv += ["--data-dir", str(data), "--device", "cpu", "--out", str(target), "--overwrite"]
    return argv, target, previous_file(target)


def heal_case(
    model: Path, data: Path, root: Path, mp: pytest.MonkeyPatch
) -> tuple[list[str], Path, Callable]:
    pruned, target = root / "pruned", root / "healed"
    run_cli(["prune", str(model), "--layers", "1", "--out", str(pruned)], mp)
    argv = ["heal", str(pruned), "--out", str(target), "--method", "full", "--steps", "1", "--epochs", "1"]
    argv += ["--max-length", "32", "--validation-samples", "2", "--device", "cpu", "--overwrite"]
    return argv, target, previous_folder(target)


def hallucination_case(
    model: Path, data: Path, root: Path, mp: pytest.MonkeyPatch
) -> tuple[list[str], Path, Callable]:
    target = root / "eavss" / "eavss.json"
    argv = ["hallucination", str(model), "--out", str(target.parent), "--limit", "6", "--data-dir", str(data)]
    return [*argv, "--max-length", "48", "--device", "cpu", "--overwrite"], target, previous_file(target)


def mitigate_case(
    model: Path, data: Path, root: Path, mp: pytest.MonkeyPatch
) -> tuple[list[str], Path, Callable]:
    target = root / "mitigated"
    argv = ["mitigate", str(model), "--out", str(target), "--limit", "6", "--data-dir", str(data)]
    argv += ["--layers", "1,2", "--max-length", "48", "--device", "cpu", "--overwrite"]
    return argv, target, previous_folder(target)


def study_case(
    model: Path, data: Path, root: Path, mp: pytest.MonkeyPatch
) -> tuple[list[str], Path, Callable]:
    """A finished study resumed: its cells are reused and only the tables are rewritten, the last of them
    ``results.json``."""
    out = root / "study"
    argv = ["study", str(model), "--out", str(out), "--methods", "last", "--fractions", "0,0.25"]
    argv += ["--tasks", "wikitext2", "--limit", "3", "--ppl-max-length", "32", "--data-dir", str(data), *FAST]
    run_cli(argv, mp)
    previous = (out / "results.json").read_text()
    return [*argv, "--resume"], out / "results.json", lambda: previous


def report_case(
    model: Path, data: Path, root: Path, mp: pytest.MonkeyPatch
) -> tuple[list[str], Path, Callable]:
    run, target = root / "run", root / "report.html"
    run_cli(["score", str(model), *FAST, "--out", str(run / "scores.json")], mp)
    return ["report", str(run), "--out", str(target), "--overwrite"], target, previous_file(target)


def demo_case(
    model: Path, data: Path, root: Path, mp: pytest.MonkeyPatch
) -> tuple[list[str], Path, Callable]:
    target = root / "demo"
    argv = ["demo", str(model), "--out", str(target), "--samples", "2", "--data-dir", str(data)]
    return [*argv, "--device", "cpu", "--overwrite"], target, previous_folder(target)


@pytest.mark.parametrize(
    "case",
    [score_case, eval_case, heal_case, hallucination_case, mitigate_case, study_case, report_case, demo_case],
    ids=lambda case: case.__name__.removesuffix("_case"),
)
def test_each_command_killed_before_its_output_lands_keeps_the_previous_one(
    case, tiny_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every command that writes is killed with its new output complete beside the target and not yet
    renamed onto it: the previous output is still there, unchanged. (``prune`` has its own test above.)"""
    argv, target, read_previous = case(tiny_dir, data_dir, tmp_path, monkeypatch)
    previous = read_previous()
    ready = tmp_path / "ready"
    kill_when_ready(SLOW.format(ready=str(ready)) + COMMAND.format(target=str(target), argv=argv), ready)
    assert read_previous() == previous


RESUMABLE = textwrap.dedent(
    """
    from avss.stats.checkpoint import StatisticsCheckpoint
    from avss.cli import main

    save = StatisticsCheckpoint.save

    def save_then_die(self, run, stats, batches_done):
        save(self, run, stats, batches_done)
        if batches_done == 3:
            stall()

    StatisticsCheckpoint.save = save_then_die
    sys.argv = {argv!r}
    main()
    """
)


def test_score_killed_then_resumed_matches_uninterrupted(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, ready, reference = tmp_path / "scores.json", tmp_path / "ready", tmp_path / "reference.json"
    common = ["score", str(tiny_dir), "--samples", "10", "--max-length", "24", "--batch-size", "2"]
    common += ["--device", "cpu"]
    argv = ["avss", *common, "--out", str(out), "--checkpoint-every", "1"]
    kill_when_ready(SLOW.format(ready=str(ready)) + RESUMABLE.format(argv=argv), ready)
    assert not out.exists()
    checkpoint = json.loads((tmp_path / "scores.json.checkpoint.json").read_text())
    assert checkpoint["batches_done"] == 3

    for args in ([*argv, "--resume"], ["avss", *common, "--out", str(reference)]):
        monkeypatch.setattr(sys, "argv", args)
        with pytest.raises(SystemExit) as exited:
            main()
        assert exited.value.code == 0
    resumed, expected = json.loads(out.read_text()), json.loads(reference.read_text())
    assert resumed["resumed_at_batch"] == 3
    assert resumed["layers"] == expected["layers"]


def test_outputs_get_ordinary_permissions(tmp_path: Path) -> None:
    """Temporary files are private while being written; the finished output follows the umask."""
    from avss.io import DIR_MODE, FILE_MODE, atomic_directory, atomic_write_json

    written = atomic_write_json(tmp_path / "scores.json", {"ok": True})
    with atomic_directory(tmp_path / "model") as folder:
        (folder / "config.json").write_text("{}")
    umask = os.umask(0)
    os.umask(umask)
    assert (0o666 & ~umask, 0o777 & ~umask) == (FILE_MODE, DIR_MODE)
    assert written.stat().st_mode & 0o777 == FILE_MODE
    assert (tmp_path / "model").stat().st_mode & 0o777 == DIR_MODE


SWAP = textwrap.dedent(
    """
    import shutil
    from avss import io

    remove = shutil.rmtree

    def stall_after_swap(path, *args, **kwargs):
        if Path(path).name.startswith(".model.") and (Path(path) / "old.txt").exists():
            stall()   # the swap is done; the previous content waits at the temporary path
        remove(path, *args, **kwargs)

    io.shutil.rmtree = stall_after_swap
    with io.atomic_directory({out!r}, overwrite=True) as folder:
        (folder / "new.txt").write_text("new")
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="the one-step swap is Linux's renameat2")
def test_an_overwritten_folder_is_whole_at_every_instant(tmp_path: Path) -> None:
    """Replacing a folder is one swap: killed after it, the new folder is complete and the old content is
    only a temporary sibling; the previous folder is never missing (the two-rename fallback parks it)."""
    out, ready = tmp_path / "model", tmp_path / "ready"
    out.mkdir()
    (out / "old.txt").write_text("old")
    kill_when_ready(SLOW.format(ready=str(ready)) + SWAP.format(out=str(out)), ready)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]


def test_the_two_rename_fallback_replaces_a_folder(tmp_path: Path, monkeypatch) -> None:
    from avss import io

    monkeypatch.setattr(io, "exchange_paths", lambda first, second: False)
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with io.atomic_directory(out, overwrite=True) as folder:
        (folder / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing parked is left behind
