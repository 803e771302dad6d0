"""``python -m generate_dataset``: the Hydra entry of run=generate (see main/generate.py)."""
import hydra
from omegaconf import DictConfig

from main.run_modes import run_entry


@hydra.main(version_base="1.3", config_path="../configs", config_name="generate_dataset")
def main(cfg: DictConfig) -> None:
    run_entry(cfg)


if __name__ == "__main__":
    main()
