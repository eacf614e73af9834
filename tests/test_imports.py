"""The import graph runs one way, workflow order: loading a model imports no statistics pass, pruning does not
import healing, and no library module imports the command line. Checked in a fresh interpreter, since this
test session has imported everything already."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import avss

# (module imported, modules it must not pull in)
ONE_WAY = [
    ("avss.models", ["avss.stats.collect", "avss.scorers", "avss.pruning", "avss.healing"]),
    ("avss.data", ["avss.models", "avss.stats", "avss.scorers"]),
    ("avss.stats.collect", ["avss.scorers", "avss.pruning", "avss.healing", "avss.evaluation"]),
    # Scorers select with the pure rules of pruning.rules (count, protect), nothing else of pruning.
    ("avss.scorers", ["avss.pruning.prune", "avss.pruning.select", "avss.healing", "avss.evaluation"]),
    ("avss.pruning.prune", ["avss.healing.heal", "avss.healing.methods", "avss.evaluation", "avss.study"]),
    ("avss.healing.heal", ["avss.evaluation", "avss.study", "avss.hallucination"]),
    ("avss.evaluation", ["avss.stats.collect", "avss.pruning", "avss.healing", "avss.study"]),
    ("avss.study", ["avss.cli", "avss.report"]),
]


def imported_by(module: str) -> set[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name for name in json.loads(result.stdout) if name.startswith("avss")}


@pytest.mark.parametrize(("module", "forbidden"), ONE_WAY, ids=[module for module, _ in ONE_WAY])
def test_imports_run_in_workflow_order(module, forbidden):
    loaded = imported_by(module)
    upward = sorted(name for name in loaded for bad in forbidden if name == bad or name.startswith(bad + "."))
    assert not upward, f"importing {module} imports {upward}"


def test_every_public_name_resolves_and_importing_avss_imports_none():
    assert imported_by("avss") == {"avss"}
    for name in avss.__all__:
        assert getattr(avss, name) is not None, name
