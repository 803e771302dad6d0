"""``python -m generate_dataset``: the Hydra entry of run=generate (see generate_dataset/generate.py)."""
import logging
import sys

import hydra
from omegaconf import DictConfig

from utils.run_modes import USER_ERRORS, dispatch

log = logging.getLogger("generate_dataset")


@hydra.main(version_base="1.3", config_path="../configs", config_name="generate_dataset")
def main(cfg: DictConfig) -> None:
    try:
        dispatch(cfg)
    except USER_ERRORS as err:
        log.error("%s", err)
        sys.exit(2)
    except KeyboardInterrupt:
        log.warning("interrupted: finished data models are stored; re-run the same command to continue")
        sys.exit(130)


if __name__ == "__main__":
    main()
