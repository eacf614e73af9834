"""CPU thread choice on a shared machine: the /proc/stat arithmetic on hand-made samples, and the policy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from avss import threads
from avss.errors import OptionError
from avss.provenance import processor

# Two samples of /proc/stat, 100 ticks apart on each CPU: cpu0 idle 75 of 100 ticks (idle 70 + iowait 5),
# cpu1 busy throughout, cpu2 idle throughout.
BEFORE = """cpu  300 0 300 3000 10 0 0 0 0 0
cpu0 100 0 100 1000 10 0 0 0 0 0
cpu1 100 0 100 1000 0 0 0 0 0 0
cpu2 100 0 100 1000 0 0 0 0 0 0
intr 12345
"""
AFTER = """cpu  500 0 300 3170 15 0 0 0 0 0
cpu0 110 0 115 1070 15 0 0 0 0 0
cpu1 190 0 110 1000 0 0 0 0 0 0
cpu2 100 0 100 1100 0 0 0 0 0 0
intr 12400
"""


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpu_times_reads_only_per_cpu_lines():
    times = threads.cpu_times(BEFORE)
    assert times == {0: (1010, 1210), 1: (1000, 1200), 2: (1000, 1200)}


def test_idle_cpus_sums_each_cpus_idle_share():
    before, after = threads.cpu_times(BEFORE), threads.cpu_times(AFTER)
    assert threads.idle_cpus(before, after, [0, 1, 2]) == pytest.approx(0.75 + 0.0 + 1.0)
    assert threads.idle_cpus(before, after, [1]) == 0.0  # only the CPUs this process may run on count
    assert threads.idle_cpus(before, before, [0, 5]) == 1.0  # counters that did not move; unknown CPU 5


@pytest.mark.parametrize(
    ("idle", "available", "expected"),
    [(2.0, 2, 2), (1.7, 2, 2), (1.0, 2, 1), (0.4, 2, 1), (0.0, 2, 1), (14.2, 16, 14), (40.0, 16, 16)],
)
def test_threads_for_rounds_the_idle_cores_within_one_and_the_default(idle, available, expected):
    assert threads.threads_for(idle, available) == expected


@pytest.mark.parametrize("setting", ["0", "-2", "many", "", 0, 1.5])
def test_parse_threads_refuses_anything_but_auto_or_a_positive_count(setting):
    with pytest.raises(OptionError, match="--threads must be 'auto'"):
        threads.parse_threads(setting)


def test_parse_threads_accepts_auto_and_counts():
    assert threads.parse_threads("AUTO") == threads.AUTO
    assert threads.parse_threads("3") == 3
    assert threads.parse_threads(2) == 2


def test_an_explicit_count_is_applied(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.set_threads("1") == 1 == torch.get_num_threads()


def test_auto_runs_on_the_idle_cores_and_never_more_than_the_default(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_default", 2)
    monkeypatch.setattr(threads, "_measure_idle", lambda: 1.0)
    assert threads.set_threads("auto") == 1
    monkeypatch.setattr(threads, "_measure_idle", lambda: 6.0)
    assert threads.set_threads("auto") == 2  # the machine freed up: measured again, back to the default


def test_auto_keeps_the_default_where_idle_time_cannot_be_read(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_default", 2)
    monkeypatch.setattr(threads, "_measure_idle", lambda: None)
    assert threads.set_threads("auto") == 2


def test_auto_leaves_a_users_omp_num_threads_alone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    monkeypatch.setattr(threads, "_measure_idle", lambda: pytest.fail("must not measure"))
    assert threads.set_threads("auto") == 1


def test_a_recent_measurement_is_reused(monkeypatch):
    samples = []
    clock = iter([100.0, 110.0, 140.0, 140.0])
    monkeypatch.setattr(threads, "_last", None)
    monkeypatch.setattr(threads.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(threads, "_sample_idle", lambda: samples.append(1) or 1.5)
    assert [threads._measure_idle() for _ in range(3)] == [1.5, 1.5, 1.5]
    assert len(samples) == 2  # at t=100 and again at t=140, 40 s after the first


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs Linux /proc/stat")
def test_sampling_proc_stat_counts_at_most_the_cpus_of_this_process():
    idle = threads._sample_idle()
    assert idle is not None and 0.0 <= idle <= len(os.sched_getaffinity(0))


def test_load_model_applies_the_count_and_records_it(saved_tiny_model, monkeypatch):
    from avss.models import load_model

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    loaded = load_model(str(saved_tiny_model()), device="cpu", threads="1")
    assert torch.get_num_threads() == 1 and loaded.source["threads"] == 1
    assert loaded.source["processor"] == processor() != ""


def test_auto_without_adapting_is_the_default_and_measures_nothing(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_default", 2)
    monkeypatch.setattr(threads, "_measure_idle", lambda: pytest.fail("must not measure"))
    torch.set_num_threads(1)
    assert threads.set_threads("auto", adapt=False) == 2


def test_bfloat16_loads_keep_the_default_thread_count(saved_tiny_model, monkeypatch):
    # In bfloat16 the thread count changes results, so the machine's load must not choose it.
    from avss.models import load_model

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_default", 2)
    monkeypatch.setattr(threads, "_measure_idle", lambda: 0.0)
    assert load_model(str(saved_tiny_model()), device="cpu", dtype="bfloat16").source["threads"] == 2
    assert load_model(str(saved_tiny_model()), device="cpu", dtype="float32").source["threads"] == 1
