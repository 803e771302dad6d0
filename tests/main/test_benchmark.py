"""run=benchmark on tiny data: one cell per (method, speed-up, seed), a table with every cell, resumable."""
from pathlib import Path

import pytest
from omegaconf import open_dict

import main.benchmark as bm
from main.benchmark import markdown
from main.run_modes import ConfigError
from tests.main.test_meta_train import _cfg


def _bench_cfg(root, methods):
    cfg = _cfg(root, "run=benchmark", "task.data_models.num=3", "benchmark.seeds=[0,1]", "benchmark.speed_ups=[1.5]",
               "benchmark.meta_epochs=[2]")
    with open_dict(cfg):
        cfg.benchmark.methods = methods
    return cfg


METHODS = {"graph_metanetwork": {"method": "group_l2_max", "metanetwork": True},
           "group_l2_max": {"method": "group_l2_max"}, "random": {"method": "random"}}


def test_benchmark_fills_every_cell_and_a_rerun_skips_them(tmp_path, monkeypatch):
    calls = []
    real = bm.dispatch

    def spy(cfg):
        calls.append(cfg.run)
        return real(cfg)

    monkeypatch.setattr(bm, "dispatch", spy)
    cfg = _bench_cfg(tmp_path, METHODS)
    result = bm.benchmark(cfg)
    assert calls.count("pruning_final") == 6 and calls.count("meta_train") == 1
    assert {(c["method"], c["seed"]) for c in result["cells"]} == {(m, s) for m in METHODS for s in (0, 1)}
    assert all(c["speed_up"] >= 1.5 for c in result["cells"])
    table = (Path(cfg.run_dir) / "benchmark_table.md").read_text()
    for label in METHODS:
        assert f"| {label} | " in table
    # the same target network (per seed) for every method: identical base accuracy across methods
    for seed in (0, 1):
        bases = {c["base_test_acc"] for c in result["cells"] if c["seed"] == seed}
        assert len(bases) == 1
    assert (tmp_path / "figures" / "benchmark_resnet20_on_digits.png").stat().st_size > 0
    calls.clear()
    again = bm.benchmark(_bench_cfg(tmp_path, METHODS))
    assert "pruning_final" not in calls and again["cells"] == result["cells"]


def test_benchmark_rejects_unknown_methods_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="method=group_l9: no such option; valid: .*group_l2_max"):
        bm.benchmark(_bench_cfg(tmp_path, {"x": {"method": "group_l9"}}))


def test_markdown_table_reports_mean_std_and_reached_speed_up():
    cells = [{"test_acc": a, "speed_up": 2.0 + d, "val_acc": a, "base_test_acc": 90.0} for a, d in ((80, 0), (82, .1))]
    table = markdown([bm._summary_row("m", 2.0, cells)], [2.0])
    assert "| m | 81.00 ± 1.41 (2.05x) |" in table
