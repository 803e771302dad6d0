"""Regenerate the README's figures from saved results (nothing is re-trained here).

    python figures/make_figures.py --pretrain-run outputs/resnet20_on_digits/pretrain/resnet20_seed0
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from utils.plotting import plot_history

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-run", type=Path, required=True, help="run directory of a run=pretrain job")
    args = parser.parse_args()
    history_csv = args.pretrain_run / "pretrain_history.csv"
    if not history_csv.is_file():
        raise SystemExit(f"{history_csv} not found: run `python -m main` first (or pass another run directory)")
    with open(history_csv) as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    out = HERE / "digits_pretrain.png"
    plot_history(rows, out, title="ResNet-20 on digits: run=pretrain")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
