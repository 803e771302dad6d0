"""``python -m generate_dataset.import_published <folder> data_generator=<task> method=<method>``.

The Hydra entry of ``run=import_published`` (main/import_published.py): the folder written by the
published code becomes ``path=``, every other argument is a Hydra override of the generate_dataset config.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List

import hydra
from omegaconf import DictConfig

from main.import_published import USAGE
from main.run_modes import run_entry


@hydra.main(version_base="1.3", config_path="../configs", config_name="generate_dataset")
def _hydra_main(cfg: DictConfig) -> None:
    run_entry(cfg)


def main(argv: List[str] | None = None) -> None:
    """``<folder> key=value ...``: the folder becomes ``path=``, the rest are Hydra overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    folders = [a for a in argv if "=" not in a and not a.startswith("-")]
    if len(folders) > 1:
        sys.exit(f"error: one published folder at a time, got {folders}\nusage: {USAGE}")
    overrides = [a for a in argv if a not in folders]
    if folders:  # quoted for Hydra's override grammar, so that any path survives
        folder = str(Path(folders[0]).expanduser().resolve()).replace("\\", "\\\\").replace("'", "\\'")
        overrides.append(f"path='{folder}'")
    sys.argv = [sys.argv[0], *overrides, "run=import_published"]
    _hydra_main()


if __name__ == "__main__":
    main()
