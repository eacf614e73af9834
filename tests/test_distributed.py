"""Sharded statistics: a 2-process gloo run equals one process; shards are disjoint and may be uneven."""

import functools
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from _precision import FLOAT32_PATHS, float32_approx
from _tiny import random_batch, tiny_model
from avss.errors import OptionError
from avss.launch import DistributedContext, context, rank_max_memory
from avss.stats.accumulators import ActivationStats
from avss.stats.collect import collect_statistics
from avss.stats.distributed import collect_distributed, pack, unpack

FLOAT64_EPS = torch.finfo(torch.float64).eps

SITES = ("block", "mlp")


def _batches(count: int) -> list[dict[str, torch.Tensor]]:
    return [random_batch(batch=2 + i % 2, length=6 + 3 * i, seed=i) for i in range(count)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, sizes: tuple[int, ...], out: str) -> None:
    """Writes the gathered statistics and, beside them, the merge of every rank's shard computed locally.

    Both come from the same forward passes in the same process, so they may differ only by the gather and
    the merge, which are float64 and must agree to float64 round-off.
    """
    launcher = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LOCAL_RANK": "0"}
    os.environ.update(launcher, RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    model = tiny_model("llama", num_layers=3)
    for size in sizes:
        gathered = collect_distributed(model, _batches(size), sites=SITES, progress=False)
        shards = [
            collect_statistics(model, DistributedContext(r, world_size).shard(_batches(size)), sites=SITES)
            for r in range(world_size)
        ]
        local = functools.reduce(ActivationStats.merge, shards)
        for name, stats in (("gathered", gathered), ("local", local)):
            with open(f"{out}.{size}.{rank}.{name}", "w") as handle:
                json.dump(stats.state_dict(), handle)


def _assert_same(got: dict, want: dict, rtol: float, atol: float) -> None:
    assert got["num_sequences"] == want["num_sequences"]
    for group in ("sites", "relations"):
        flat_got = torch.tensor(_flatten(got[group]), dtype=torch.float64)
        flat_want = torch.tensor(_flatten(want[group]), dtype=torch.float64)
        torch.testing.assert_close(flat_got, flat_want, rtol=rtol, atol=atol)


def _flatten(value) -> list[float]:
    if isinstance(value, dict):
        return [x for key in sorted(value) for x in _flatten(value[key])]
    if isinstance(value, list):
        return [x for item in value for x in _flatten(item)]
    return [float(value)]


def test_shards_are_disjoint_cover_everything_and_may_be_uneven():
    items = list(range(7))
    shards = [DistributedContext(rank, 3).shard(items) for rank in range(3)]
    assert sorted(x for shard in shards for x in shard) == items
    assert [len(shard) for shard in shards] == [3, 2, 2]
    assert DistributedContext(2, 4).shard([0, 1]) == []


def test_pack_unpack_round_trip_is_exact():
    model = tiny_model("llama", num_layers=2)
    stats = collect_statistics(model, _batches(2), sites=SITES, progress=False)
    restored = unpack(pack(stats), stats)
    assert restored.num_sequences == stats.num_sequences
    assert torch.equal(pack(restored), pack(stats))


def test_single_process_without_launcher_is_plain_collection():
    model = tiny_model("llama", num_layers=2)
    batches = _batches(2)
    plain = collect_statistics(model, batches, sites=SITES, progress=False)
    wrapped = collect_distributed(model, batches, sites=SITES, progress=False)
    assert torch.equal(pack(plain), pack(wrapped))


def test_two_gloo_processes_equal_one_process_with_even_and_uneven_shards(tmp_path):
    """4 batches split 2 + 2, 5 split 3 + 2, 1 leaves rank 1 empty; every rank receives the same merge.

    Two guarantees, with two tolerances. The gather and merge are exact: every rank's result equals the
    float64 merge of the same shards to float64 round-off. The whole sharded pass equals one process over
    all batches only to float32 rounding: the forward passes run in float32 with another thread count (and,
    on another CPU, other kernels), and the per-token moments are float32 (``token_moments``).
    """
    out, sizes = str(tmp_path / "stats"), (4, 5, 1)
    mp.spawn(_worker, args=(2, _free_port(), sizes, out), nprocs=2, join=True)
    model = tiny_model("llama", num_layers=3)
    for size in sizes:
        want = collect_statistics(model, _batches(size), sites=SITES, progress=False).state_dict()
        for rank in range(2):
            with open(f"{out}.{size}.{rank}.gathered") as handle:
                gathered = json.load(handle)
            with open(f"{out}.{size}.{rank}.local") as handle:
                local = json.load(handle)
            _assert_same(gathered, local, rtol=64 * FLOAT64_EPS, atol=1e-300)
            _assert_same(gathered, want, rtol=FLOAT32_PATHS, atol=FLOAT32_PATHS)


@pytest.mark.slow  # tiny model, but starts three Python processes (about 30 s on 2 cores)
def test_torchrun_score_writes_the_single_process_scores_once(tmp_path):
    from _tiny import tiny_tokenizer
    from avss.data import bundled_text

    model_dir, text = tmp_path / "tiny", tmp_path / "text.txt"
    tiny_model("llama", num_layers=3).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    text.write_text(bundled_text("calibration"))
    options = f"--data {text} --samples 7 --max-length 48 --batch-size 2 --device cpu".split()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = functools.partial(subprocess.run, env=env, capture_output=True, text=True, check=True, timeout=240)
    sharded = run(
        [*launcher, "-m", "avss", "score", str(model_dir), *options, "--out", str(tmp_path / "two.json")]
    )
    assert sharded.stdout.count("AVSS per layer") == 1  # only rank 0 prints
    run(
        [sys.executable, "-m", "avss", "score", str(model_dir), *options, "--out", str(tmp_path / "one.json")]
    )
    two, one = (json.loads((tmp_path / name).read_text()) for name in ("two.json", "one.json"))
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["num_tokens"] == one["num_tokens"]
    for got, want in zip(two["layers"], one["layers"], strict=True):
        for key, value in want.items():
            assert got[key] == float32_approx(value, floor=1e-15), key  # float32 forwards, see above


@pytest.mark.parametrize(
    ("local_rank", "local_world", "gpus", "expected"),
    [(0, 8, 8, [0]), (5, 8, 8, [5]), (0, 2, 8, [0, 1, 2, 3]), (1, 2, 8, [4, 5, 6, 7]), (2, 3, 8, [4, 5])],
)
def test_each_rank_gets_its_own_slice_of_the_node_gpus(local_rank, local_world, gpus, expected):
    ctx = DistributedContext(
        rank=local_rank, world_size=local_world, local_rank=local_rank, local_world_size=local_world
    )
    assert ctx.gpus(gpus) == expected


def test_more_processes_than_gpus_is_a_clear_error():
    ctx = DistributedContext(rank=0, world_size=4, local_rank=0, local_world_size=4)
    with pytest.raises(OptionError, match="4 processes on this node but only 2 GPU"):
        ctx.gpus(2)


def test_context_reads_the_launcher_environment(monkeypatch):
    launcher = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    for key, value in launcher.items():
        monkeypatch.setenv(key, value)
    assert context() == DistributedContext(rank=5, world_size=8, local_rank=1, local_world_size=4)
    assert context().gpus(8) == [2, 3]


def test_device_map_under_torchrun_is_confined_to_the_rank_gpus(monkeypatch):
    """accelerate places a device_map model only on the devices named in max_memory."""
    launcher = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    for key, value in launcher.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda gpu: (1000 + gpu, 2000))
    assert rank_max_memory() == {2: 1002, 3: 1003}
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert rank_max_memory() is None
