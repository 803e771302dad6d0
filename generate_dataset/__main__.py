"""``python -m generate_dataset``: the Hydra entry of run=generate (see main/generate.py)."""
import sys

import hydra
from omegaconf import DictConfig

from main.run_modes import check_command_line, run_entry


@hydra.main(version_base="1.3", config_path="../configs", config_name="generate_dataset")
def _hydra_main(cfg: DictConfig) -> None:
    run_entry(cfg)


def main() -> None:
    check_command_line(sys.argv[1:], "generate_dataset")  # Hydra's own errors: one line, exit 2
    _hydra_main()


if __name__ == "__main__":
    main()
