"""utils/distributed.py: a failing or stuck rank brings a 2-rank torchrun job down promptly, with its error."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_loaders import build_datasets, sharded_loaders
from utils import distributed as du

ROOT = Path(__file__).resolve().parents[2]
JOB = Path(__file__).with_name("failing_job.py")


def _job(mode: str, timeout_s: float) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(JOB), mode,
           str(timeout_s)]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, check=False,
                          timeout=120)
    return proc, time.time() - start


@pytest.mark.slow
def test_a_raising_rank_fails_the_job_at_once_with_its_error():
    # The process-group timeout is 300 s: the job must end long before it, because the error propagates.
    proc, seconds = _job("raise", 300)
    assert proc.returncode != 0
    assert "rank 1 broke on purpose" in proc.stdout + proc.stderr
    assert "passed the barrier" not in proc.stdout
    assert seconds < 60


@pytest.mark.slow
def test_a_stuck_rank_fails_the_job_after_the_process_group_timeout():
    proc, seconds = _job("hang", 5)  # rank 1 sleeps 600 s; rank 0 waits 5 s in the barrier, then fails
    assert proc.returncode != 0
    assert "Timed out" in proc.stderr or "timed out" in proc.stderr.lower()
    assert seconds < 60


def test_single_process_helpers_are_no_ops():
    assert (du.get_rank(), du.get_world_size(), du.is_main(), du.is_distributed()) == (0, 1, True, False)
    assert du.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert du.all_true(False) is False and du.broadcast_object({"a": 1}) == {"a": 1}
    net = torch.nn.Linear(3, 2)
    assert du.wrap_ddp(net, torch.device("cpu")) is net and du.unwrap(net) is net
    assert du.replica_checksums(net) == [du.state_checksum(net)]


def test_shard_sampler_covers_every_example_once_without_padding():
    data = list(range(10))
    shards = [list(du.ShardSampler(data, r, 3)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(i for s in shards for i in s) == data
    assert [len(du.ShardSampler(data, r, 3)) for r in range(3)] == [4, 3, 3]


def test_state_checksum_sees_any_change():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    before = du.state_checksum(net)
    assert du.state_checksum(net) == before
    with torch.no_grad():
        net[1].running_mean[0] += 1e-6  # a buffer, not a parameter
    assert du.state_checksum(net) != before


@pytest.mark.parametrize("batch", [7, 9])
def test_sharded_loaders_need_a_divisible_global_batch(batch):
    splits = build_datasets({"name": "synthetic", "num_train": 20, "num_test": 8, "image_size": 8, "val_size": 0.25})
    loaders = sharded_loaders(splits, batch_size=batch, eval_batch_size=4)
    assert loaders["train"].batch_size == batch  # one rank: the global batch
    assert sum(len(y) for _, y in loaders["val"]) == 5 and sum(len(y) for _, y in loaders["train_eval"]) == 15
