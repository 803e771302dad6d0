"""Hydra entry point: ``python -m main run=<mode> [overrides]`` (``run=help`` lists the modes).

Kept thin on purpose: the run modes live in ``utils`` and are looked up by name.
"""
import logging
import sys

import hydra
from omegaconf import DictConfig

from utils.run_modes import USER_ERRORS, dispatch

log = logging.getLogger("main")


@hydra.main(version_base="1.3", config_path="../configs", config_name="main")
def main(cfg: DictConfig) -> None:
    try:
        dispatch(cfg)
    except USER_ERRORS as err:
        log.error("%s", err)  # Hydra's logging prints it on the console and into <run_dir>/main.log
        sys.exit(2)
    except KeyboardInterrupt:
        log.warning("interrupted; finished epochs are checkpointed in %s: re-run the same command to resume", cfg.run_dir)
        sys.exit(130)


if __name__ == "__main__":
    main()
