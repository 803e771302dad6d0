"""Hydra entry point of the ImageNet pipeline, one process per GPU under ``torchrun``.

    python -m main_imagenet run=train slot=0                       # one process (one GPU, or the CPU)
    torchrun --nproc_per_node=8 -m main_imagenet run=train slot=0  # DDP over 8 GPUs of one machine

``run=help`` lists the stages. Every rank composes the same config, but only rank 0 is Hydra's "real"
job: the other ranks get overrides that stop Hydra from writing (no ``.hydra/`` folder, no log file, an
output directory that already exists), so a job has one run directory and one log (rank 0's); the stages
take the run directory rank 0 resolved (``context.prepare``).
"""
from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from main.run_modes import USER_ERRORS
from main_imagenet import meta  # noqa: F401  (registers the metanetwork stages)
from main_imagenet.stages import STAGES
from utils import distributed as du
from utils.config_schema import check_config

log = logging.getLogger(__name__)

# Hydra settings for ranks other than 0: write nothing, log to the console only.
_FOLLOWER_OVERRIDES = ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.run.dir=."]


def run_stage(cfg: DictConfig) -> None:
    """Run stage ``cfg.run``; user errors print one message and exit with status 2 (on every rank)."""
    if cfg.run == "help":
        print("stages: " + ", ".join(STAGES.names()))
        return
    try:
        check_config(cfg)  # numeric settings, before any work
        STAGES.get(str(cfg.run))(cfg)
    except USER_ERRORS as err:
        log.error("%s", err)
        sys.exit(2)
    except KeyboardInterrupt:
        log.warning("interrupted: finished work is checkpointed under %s; re-run the same command to resume",
                    cfg.run_dir)
        sys.exit(130)


@hydra.main(version_base="1.3", config_path="../configs", config_name="main_imagenet")
def _hydra_main(cfg: DictConfig) -> None:
    run_stage(cfg)


def main() -> None:
    """Entry of ``python -m main_imagenet``: Hydra on every rank, a failing rank takes the job down."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Let errors reach run_guarded (and torchrun's error file) with their traceback instead of Hydra's
        # one-line report followed by exit(1).
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
        if du.env_rank() != 0:
            sys.argv += _FOLLOWER_OVERRIDES
    du.run_guarded(_hydra_main)


if __name__ == "__main__":
    main()
