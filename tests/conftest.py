import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep converted-model caches out of the user's home during tests."""
    monkeypatch.setenv("AVSS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "avss-cache"))


@pytest.fixture
def tokenizer():
    from _tiny import tiny_tokenizer

    return tiny_tokenizer()
