"""Hydra entry point: ``python -m main run=<mode> [overrides]`` (``run=help`` lists the modes).

Kept thin on purpose: the run modes live in ``utils`` (and ``generate_dataset``) and are looked up by name.
"""
import hydra
from omegaconf import DictConfig

from main.run_modes import run_entry


@hydra.main(version_base="1.3", config_path="../configs", config_name="main")
def main(cfg: DictConfig) -> None:
    run_entry(cfg)


if __name__ == "__main__":
    main()
