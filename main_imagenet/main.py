"""Hydra entry point of the ImageNet-scale pipeline: the run modes of ``main``, one process per GPU.

    python -m main_imagenet run=generate shard=0 num=1                       # one process (one GPU, or the CPU)
    torchrun --nproc_per_node=8 -m main_imagenet run=generate shard=0 num=1  # DDP over 8 GPUs of one machine

Every mode of ``python -m main`` runs here unchanged (``run=help`` lists them); ``main.run_modes.prepare_run``
joins the process group that ``torchrun`` describes, and the modes shard their data, average what must
agree and let rank 0 write. This package only adds the launcher's part: the ImageNet task defaults
(``configs/main_imagenet.yaml``) and Hydra on several ranks. Every rank composes the same config, but only
rank 0 is Hydra's "real" job: the other ranks get overrides that stop Hydra from writing (no ``.hydra/``
folder, no log file, an output directory that already exists), so a job has one run directory and one log.
A failing rank takes the job down with its error (``utils.distributed.run_guarded``).
"""
from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from main.run_modes import answer_without_running, check_command_line, run_entry
from utils import distributed as du

# Hydra settings for ranks other than 0: write nothing, log to the console only.
_FOLLOWER_OVERRIDES = ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.run.dir=."]


@hydra.main(version_base="1.3", config_path="../configs", config_name="main_imagenet")
def _hydra_main(cfg: DictConfig) -> None:
    run_entry(cfg)


def main() -> None:
    """Entry of ``python -m main_imagenet``: Hydra on every rank, a failing rank takes the job down."""
    answer_without_running(sys.argv[1:])  # run=help and unknown modes write nothing
    check_command_line(sys.argv[1:], "main_imagenet")  # Hydra's own errors: one line, exit 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Let errors reach run_guarded (and torchrun's error file) with their traceback instead of Hydra's
        # one-line report followed by exit(1).
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
        if du.env_rank() != 0:
            sys.argv += _FOLLOWER_OVERRIDES
    du.run_guarded(_hydra_main)


if __name__ == "__main__":
    main()
