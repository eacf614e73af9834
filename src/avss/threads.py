"""How many CPU threads torch uses: the cores other processes leave idle, not every core there is.

torch starts one intra-op thread per physical core. On a shared machine (CI, a server, a study running
beside a test suite) some of those cores are busy, and every parallel operation then waits for its slowest
thread, the one sharing a core: measured on the 2-core CI-class machine with another process on both cores,
``avss eval`` on 100 SciQ questions took 84-92 s with 2 threads and 51-66 s with 1. So by default (``auto``)
avss samples ``/proc/stat`` for a quarter of a second and runs as many threads as cores were idle (at least
one, at most torch's default). An explicit ``--threads N`` or an ``OMP_NUM_THREADS`` in the environment is
the user's choice and is kept. Off Linux (no ``/proc/stat``) ``auto`` keeps torch's default.

Only in float32 does ``auto`` adapt: there the thread count changes speed only (identical logits at 1 and
2 threads), while in bfloat16 on CPU it changes results (SmolLM2: logits up to 1.06 apart, argmax agreeing
on 92% of random-token positions; ``benchmarks/threads_determinism.md``), so a result would depend on the
machine's load. There ``auto`` is torch's default, and the count is recorded with the model either way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from avss.errors import OptionError

AUTO = "auto"
SAMPLE_SECONDS = 0.25
# A measurement younger than this is reused, so loading several models in a row sleeps once.
REUSE_SECONDS = 30.0
PROC_STAT = Path("/proc/stat")
# Fields of a ``cpuN`` line of /proc/stat that count time the CPU was not running anything: idle, iowait.
_IDLE_FIELDS = (3, 4)
# torch's thread count before avss changed it (its default: the physical cores, or OMP_NUM_THREADS).
_default: int | None = None
_last: tuple[float, float | None] | None = None  # (monotonic time, idle CPUs) of the latest measurement


def parse_threads(setting: str | int) -> str | int:
    """``auto`` or a positive thread count; anything else is refused with a message naming the option."""
    if isinstance(setting, int) or (isinstance(setting, str) and setting.strip().isdigit()):
        count = int(setting)
        if count >= 1:
            return count
    elif isinstance(setting, str) and setting.strip().lower() == AUTO:
        return AUTO
    raise OptionError(f"--threads must be 'auto' or a positive number of threads, got {setting!r}")


def cpu_times(text: str) -> dict[int, tuple[int, int]]:
    """``{cpu: (idle ticks, total ticks)}`` from the per-CPU ``cpuN`` lines of a /proc/stat text."""
    times = {}
    for line in text.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            ticks = [int(value) for value in fields]
            times[int(name[3:])] = (sum(ticks[i] for i in _IDLE_FIELDS if i < len(ticks)), sum(ticks))
    return times


def idle_cpus(
    before: Mapping[int, tuple[int, int]], after: Mapping[int, tuple[int, int]], cpus: Iterable[int]
) -> float:
    """How many of ``cpus`` were idle between two samples of :func:`cpu_times` (a CPU idle half the time
    counts one half). A CPU whose counters did not move is counted idle."""
    total = 0.0
    for cpu in cpus:
        if cpu not in before or cpu not in after:
            continue
        idle = after[cpu][0] - before[cpu][0]
        elapsed = after[cpu][1] - before[cpu][1]
        total += 1.0 if elapsed <= 0 else min(1.0, max(0.0, idle / elapsed))
    return total


def threads_for(idle: float, available: int) -> int:
    """Threads for ``idle`` free cores: the idle cores rounded, at least one, at most ``available``."""
    return max(1, min(available, int(idle + 0.5)))


def _measure_idle() -> float | None:
    """Idle CPUs of this process's affinity set over :data:`SAMPLE_SECONDS` (the latest measurement if it
    is younger than :data:`REUSE_SECONDS`); None where it cannot tell."""
    global _last
    if _last is not None and time.monotonic() - _last[0] < REUSE_SECONDS:
        return _last[1]
    _last = (time.monotonic(), _sample_idle())
    return _last[1]


def _sample_idle() -> float | None:
    """Two /proc/stat samples :data:`SAMPLE_SECONDS` apart, read as idle CPUs (None off Linux)."""
    try:
        before = cpu_times(PROC_STAT.read_text())
        time.sleep(SAMPLE_SECONDS)
        after = cpu_times(PROC_STAT.read_text())
        cpus = os.sched_getaffinity(0)
    except (OSError, AttributeError, ValueError):
        return None
    return idle_cpus(before, after, cpus) if before else None


def set_threads(setting: str | int = AUTO, *, adapt: bool = True) -> int:
    """Apply ``setting`` (see the module docstring) to torch and return the number of threads it now uses.

    ``auto`` with ``adapt`` measures the idle cores (again on every call older than
    :data:`REUSE_SECONDS`, so a study that started on a busy machine speeds up once it is free); without
    ``adapt`` it is torch's default, for computations whose result the thread count changes (bfloat16).
    """
    import torch

    global _default
    if _default is None:
        _default = torch.get_num_threads()
    chosen = parse_threads(setting)
    if chosen == AUTO:
        if "OMP_NUM_THREADS" in os.environ:
            return torch.get_num_threads()
        idle = _measure_idle() if adapt else None
        chosen = _default if idle is None else threads_for(idle, _default)
    if chosen != torch.get_num_threads():
        torch.set_num_threads(int(chosen))
    return torch.get_num_threads()
