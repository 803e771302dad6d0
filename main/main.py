"""Hydra entry point: ``python -m main run=<mode> [overrides]`` (``run=help`` lists the modes).

Kept thin on purpose: the run modes live in ``utils`` (and ``generate_dataset``) and are looked up by name.
"""
import sys

import hydra
from omegaconf import DictConfig

from main.run_modes import answer_without_running, check_command_line, run_entry


@hydra.main(version_base="1.3", config_path="../configs", config_name="main")
def _hydra_main(cfg: DictConfig) -> None:
    run_entry(cfg)


def main() -> None:
    answer_without_running(sys.argv[1:])  # run=help and unknown modes write nothing
    check_command_line(sys.argv[1:], "main")  # Hydra's own errors: one line, exit 2, before any folder
    _hydra_main()


if __name__ == "__main__":
    main()
