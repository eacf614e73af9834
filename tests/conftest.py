import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread count for the whole session: ``--threads auto`` keeps a user's OMP_NUM_THREADS, so commands run
# in tests do not change torch's threads with the machine's load between two computations a test compares
# (test_threads.py removes the variable where it tests the automatic choice).
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep converted-model caches out of the user's home during tests, and keep evaluation tasks whose file
    is missing from reaching for their hub dataset (tests that exercise the hub path patch load_dataset)."""
    monkeypatch.setenv("AVSS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "avss-cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def tokenizer():
    from _tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def saved_tiny_model(tmp_path_factory):
    """``saved_tiny_model(num_layers)``: a tiny random llama and its tokenizer saved once per depth for the
    whole session, the model directory every CLI test starts from. Tests that change it copy it first."""
    from _tiny import tiny_model, tiny_tokenizer

    saved = {}

    def save(num_layers: int = 4):
        if num_layers not in saved:
            path = tmp_path_factory.mktemp("saved-models") / f"tiny-llama-{num_layers}"
            tiny_model("llama", num_layers).save_pretrained(path)
            tiny_tokenizer().save_pretrained(path)
            saved[num_layers] = path
        return saved[num_layers]

    return save


@pytest.fixture
def cli(capsys, monkeypatch):
    """``cli(*ARGS)`` runs ``avss ARGS`` in process through the real entry point and returns its exit code,
    stdout and stderr as a ``CompletedProcess``."""
    import subprocess

    from avss.cli import main

    def run(*args: object) -> subprocess.CompletedProcess:
        monkeypatch.setattr(sys, "argv", ["avss", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code or 0
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return run
