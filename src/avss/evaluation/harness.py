"""Bridge to lm-evaluation-harness (the optional ``harness`` extra) for its own task catalogue.

``run_harness`` wraps an in-memory model in lm-eval's ``HFLM`` so a pruned or mitigated model is scored by the
harness without being saved first. Results come back as :class:`TaskResult` entries named ``harness:TASK`` so
they sit in the same results file, table and ``--compare`` logic as the built-in tasks (see
:func:`avss.evaluation.evaluate`'s ``harness`` argument).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from avss.errors import AvssError

PREFIX = "harness:"


def run_harness(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 16,
    include_path: str | None = None,
) -> dict[str, tuple[dict[str, float], int]]:
    """Run lm-eval's ``simple_evaluate`` on ``model``; per task, its numeric metrics and sample count."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise AvssError("--harness needs lm-evaluation-harness: pip install 'avss-llm[harness]'") from exc
    device = str(next(model.parameters()).device)
    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        output = simple_evaluate(
            model=harness_model,
            tasks=list(tasks),
            limit=limit,
            task_manager=TaskManager(include_path=include_path),
        )
    except (KeyError, ValueError) as exc:
        raise AvssError(f"lm-evaluation-harness could not run {', '.join(tasks)}: {exc}") from exc
    results = {}
    for name, metrics in output["results"].items():
        numeric = {
            key.removesuffix(",none"): float(value)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in key
        }
        samples = output.get("n-samples", {}).get(name, {}).get("effective", 0)
        results[PREFIX + name] = (numeric, int(samples))
    return results
