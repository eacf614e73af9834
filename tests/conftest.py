import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
