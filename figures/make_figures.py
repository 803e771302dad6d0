"""Regenerate the README's figures from saved results (nothing is re-trained here). Runs write their figures
into their own run directory only; this script is the one thing that writes into figures/.

    python figures/make_figures.py --pretrain-run outputs/resnet20_on_digits/pretrain/resnet20_group_l2_max_seed0
    python figures/make_figures.py --visualize-run outputs/resnet20_on_digits/visualize/resnet20_group_l2_max_seed0
    python figures/make_figures.py --quickstart-run outputs/resnet20_on_digits/quickstart/resnet20_group_l2_max_seed0
    python figures/make_figures.py --benchmark-run outputs/resnet20_on_fashion_mnist/benchmark/resnet20_group_l2_max_seed0
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from utils.io import read_json
from utils.plotting import plot_history

HERE = Path(__file__).resolve().parent


def pretrain_figure(run: Path) -> Path:
    history_csv = run / "pretrain_history.csv"
    if not history_csv.is_file():
        raise SystemExit(f"{history_csv} not found: run `python -m main` first (or pass another run directory)")
    with open(history_csv) as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    out = HERE / "digits_pretrain.png"
    plot_history(rows, out, title="ResNet-20 on digits: run=pretrain")
    return out


def visualize_figure(run: Path) -> Path:
    from main.visualize import plot_curves

    files = sorted(run.glob("curve_epoch_*.json"))
    if not files:
        raise SystemExit(f"no curve_epoch_*.json in {run}: run `python -m main run=visualize index=[...]` first")
    curves = {read_json(f)["epoch"]: read_json(f) for f in files}
    out = HERE / "digits_acc_vs_speed_up"
    plot_curves(curves, out, title="ResNet-20 on digits: run=visualize (validation data model)")
    return out.with_suffix(".png")


def _results(path: Path, hint: str):
    if not path.is_file():
        raise SystemExit(f"{path} not found: {hint}")
    return read_json(path)


def quickstart_figure(run: Path) -> Path:
    from main.quickstart import plot_results, quickstart_title

    summary = _results(run / "quickstart_results.json", "run `python -m main run=quickstart` first")
    out = HERE / "quickstart_acc_vs_speed_up"
    plot_results(summary["rows"], out, quickstart_title(summary))
    return out.with_suffix(".png")


def benchmark_figure(run: Path) -> Path:
    from main.benchmark import benchmark_title, plot

    result = _results(run / "benchmark.json", "run `python -m main run=benchmark` first")
    out = HERE / f"benchmark_{result['task']}"
    plot(result["summary"], out, benchmark_title(result))
    return out.with_suffix(".png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-run", type=Path, help="run directory of a run=pretrain job")
    parser.add_argument("--visualize-run", type=Path, help="run directory of a run=visualize job")
    parser.add_argument("--quickstart-run", type=Path, help="run directory of a run=quickstart job")
    parser.add_argument("--benchmark-run", type=Path, help="run directory of a run=benchmark job")
    args = parser.parse_args()
    if not (args.pretrain_run or args.visualize_run or args.quickstart_run or args.benchmark_run):
        parser.error("give at least one of --pretrain-run, --visualize-run, --quickstart-run, --benchmark-run")
    if args.pretrain_run:
        print(f"wrote {pretrain_figure(args.pretrain_run)}")
    if args.visualize_run:
        print(f"wrote {visualize_figure(args.visualize_run)}")
    if args.quickstart_run:
        print(f"wrote {quickstart_figure(args.quickstart_run)}")
    if args.benchmark_run:
        print(f"wrote {benchmark_figure(args.benchmark_run)}")


if __name__ == "__main__":
    main()
