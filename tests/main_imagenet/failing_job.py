"""A 2-rank job for the failure tests: ``mode=raise`` (one rank raises while the other waits in a
collective) or ``mode=hang`` (one rank stalls; the waiting rank's process-group timeout fires).

Run by tests/main_imagenet/test_distributed.py under ``python -m torch.distributed.run``.
"""
import sys
import time

import torch

from utils import distributed as du


def job(mode: str, timeout_s: float) -> None:
    _, info = du.init_distributed("cpu", timeout_s=timeout_s)
    du.all_reduce_sum([1.0])  # both ranks are up
    if info.rank == 1:
        if mode == "raise":
            raise RuntimeError("rank 1 broke on purpose")
        time.sleep(600)  # hang: never reaches the barrier
    du.barrier()
    print("rank", info.rank, "passed the barrier", torch.__version__)


if __name__ == "__main__":
    du.run_guarded(lambda: job(sys.argv[1], float(sys.argv[2])))
