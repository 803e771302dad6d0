"""run=benchmark on tiny data: one cell per (method, speed-up, seed), a table with every cell, resumable."""
import json
import math
from pathlib import Path

import pytest
from omegaconf import open_dict

import main.benchmark as bm
from main.benchmark import markdown
from main.run_modes import ConfigError
from tests.main.test_meta_train import _cfg


def _bench_cfg(root, methods):
    cfg = _cfg(root, "run=benchmark", "task.data_models.num=3", "benchmark.seeds=[0,1]", "benchmark.speed_ups=[1.5]",
               "benchmark.meta_epochs=[2]", "benchmark.workers=1")  # serial: the spies below see every dispatch
    with open_dict(cfg):
        cfg.benchmark.methods = methods
    return cfg


METHODS = {"graph_metanetwork": {"method": "group_l2_max", "metanetwork": True},
           "group_l2_max": {"method": "group_l2_max"}, "random": {"method": "random"}}


@pytest.mark.slow
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
    assert all(c["pruned_test_acc"] is not None for c in result["cells"])  # both columns, same pruned network
    # the same target network (per seed) for every method: identical base accuracy across methods
    for seed in (0, 1):
        bases = {c["base_test_acc"] for c in result["cells"] if c["seed"] == seed}
        assert len(bases) == 1
    assert (Path(cfg.run_dir) / "benchmark_acc_vs_speed_up.png").stat().st_size > 0
    assert not (tmp_path / "figures").exists()  # nothing outside the run directories
    calls.clear()
    again = bm.benchmark(_bench_cfg(tmp_path, METHODS))
    assert "pruning_final" not in calls and again["cells"] == result["cells"]
    # a finished cell made under other settings is refused, never reused (here: another fine-tuning lr)
    cell = next((Path(cfg.run_dir) / "cells").glob("random_*.json"))
    row = json.loads(cell.read_text())
    row["inputs"]["task"]["schedules"]["finetune_after_pruning"]["lr"] = 0.5
    cell.write_text(json.dumps(row))
    with pytest.raises(ConfigError, match=f"{cell.name} was computed under other settings"):
        bm.benchmark(_bench_cfg(tmp_path, METHODS))


@pytest.mark.slow
def test_a_grid_is_chosen_on_validation_once_and_used_for_every_seed(tmp_path, monkeypatch):
    calls = []
    real = bm.dispatch
    monkeypatch.setattr(bm, "dispatch", lambda cfg: calls.append(cfg.run) or real(cfg))
    methods = {"group_l2_max": {"method": "group_l2_max"},
               "sparse_learning": {"method": "sparse_learning", "grid": {"method.reg": [5e-4, 0.2]}}}
    result = bm.benchmark(_bench_cfg(tmp_path, methods))
    assert calls.count("pruning_final") == 2 + 2 + 1  # group_l2 x 2 seeds, the grid on seed 0, the choice on seed 1
    (tuning,) = result["tuning"]
    assert set(tuning["val_acc"]) == {"reg0.0005", "reg0.2"}
    best = max(tuning["val_acc"], key=tuning["val_acc"].get)
    assert bm.grid_tag(tuning["chosen"]) == best  # chosen by validation accuracy
    sl = [c for c in result["cells"] if c["method"] == "sparse_learning"]
    assert [c["grid"] for c in sl] == [tuning["chosen"]] * 2 and f"sparse_learning {best} at 1.5x" in result["table"]
    calls.clear()
    assert bm.benchmark(_bench_cfg(tmp_path, methods))["cells"] == result["cells"] and "pruning_final" not in calls


@pytest.mark.slow
def test_two_workers_give_the_cells_of_one_bit_for_bit(tmp_path):
    methods = {"group_l2_max": {"method": "group_l2_max"},
               "sparse_learning": {"method": "sparse_learning", "grid": {"method.reg": [5e-4, 0.2]}}}
    serial = bm.benchmark(_bench_cfg(tmp_path / "serial", methods))
    cfg = _bench_cfg(tmp_path / "parallel", methods)
    with open_dict(cfg):
        cfg.benchmark.workers = 2
    parallel = bm.benchmark(cfg)
    drop = ("seconds", "latency_ms", "base_latency_ms")  # timings differ; every accuracy and size must not
    assert [{k: v for k, v in c.items() if k not in drop} for c in parallel["cells"]] == \
        [{k: v for k, v in c.items() if k not in drop} for c in serial["cells"]]
    assert parallel["tuning"][0]["chosen"] == serial["tuning"][0]["chosen"] and parallel["workers"] == 2
    assert list((Path(cfg.run_dir) / "cells").glob("worker_*.log"))  # each worker logs into the run directory
    with open_dict(cfg):
        cfg.benchmark.workers = 0
    with pytest.raises(ConfigError, match="benchmark.workers=0"):
        bm.benchmark(cfg)


def test_a_grid_key_that_is_no_setting_is_refused_before_any_work(tmp_path):
    methods = {"sparse_learning": {"method": "sparse_learning", "grid": {"method.rge": [0.02]}}}
    with pytest.raises(ConfigError, match="method.rge is not a setting of method=sparse_learning; valid .*reg"):
        bm.benchmark(_bench_cfg(tmp_path, methods))
    assert not list(tmp_path.glob("data_models/*"))  # nothing was generated


def test_grid_points_and_tags():
    assert bm.grid_points({}) == [{}] and bm.grid_tag({}) == ""
    points = bm.grid_points({"grid": {"method.reg": [0.02, 0.05], "method.p": [1]}})
    assert points == [{"method.reg": 0.02, "method.p": 1}, {"method.reg": 0.05, "method.p": 1}]
    assert bm.grid_tag(points[1]) == "reg0.05_p1"


def test_benchmark_rejects_unknown_methods_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="method=group_l9: no such option; valid: .*group_l2_max"):
        bm.benchmark(_bench_cfg(tmp_path, {"x": {"method": "group_l9"}}))
    with pytest.raises(ConfigError, match="method=group_l9"):  # a null label is dropped, not read as a method
        bm.benchmark(_bench_cfg(tmp_path, {"random": None, "x": {"method": "group_l9"}}))


def _cells(accs, pruned=None):
    pruned = pruned or [None] * len(accs)
    return [{"seed": s, "test_acc": a, "pruned_test_acc": p, "speed_up": 2.0 + 0.1 * s, "val_acc": a,
             "base_test_acc": 90.0} for s, (a, p) in enumerate(zip(accs, pruned))]


def test_paired_interval_is_the_t_interval_of_the_mean_difference():
    mean, lo, hi = bm.paired_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, n 3: t(0.975, 2) = 4.303 -> half-width 4.303 / sqrt(3) = 2.484
    assert mean == pytest.approx(2.0) and (lo, hi) == pytest.approx((2.0 - 2.4843, 2.0 + 2.4843), abs=1e-3)
    assert all(map(math.isnan, bm.paired_interval([1.0])[1:]))


def test_markdown_table_reports_both_columns_and_marks_separated_pairs():
    reference = _cells([80, 81, 82, 83, 84], pruned=[10, 12, 11, 13, 12])
    better = _cells([81, 82, 83, 84, 85], pruned=[40, 35, 45, 38, 42])  # +1 on every seed: sd 0, separated
    noisy = _cells([70, 90, 75, 88, 80])  # no no-fine-tuning column (a width-search pipeline)
    summary = [bm._summary_row("ref", 2.0, reference), bm._summary_row("better", 2.0, better, reference),
               bm._summary_row("noisy", 2.0, noisy, reference)]
    table = markdown(summary, [2.0], "ref", 359)
    assert "359 images, so one point is 3.59 images" in table
    assert "| ref | 2.20x | 11.60 ± 1.14 | - | 82.00 ± 1.58 | - |" in table
    assert "| better | 2.20x | 40.00 ± 3.81 | +28.40 [" in table and table.count("] *") == 2
    noisy_row = next(line for line in table.splitlines() if line.startswith("| noisy"))
    assert noisy_row.startswith("| noisy | 2.20x | - | - | 80.60 ± 8.47 | -1.40 [") and "] *" not in noisy_row


def test_each_column_names_its_strongest_baseline_and_the_pairs_against_it():
    reference = _cells([80, 81, 82, 83, 84], pruned=[10, 12, 11, 13, 12])
    better = _cells([81, 82, 83, 84, 85], pruned=[40, 35, 45, 38, 42])  # the metanetwork row: +1 on every seed
    noisy = _cells([70, 90, 75, 88, 80], pruned=[11, 13, 12, 14, 13])
    cells_of = {("ref", 2.0): reference, ("better", 2.0): better, ("noisy", 2.0): noisy}
    summary = [bm._summary_row(label, 2.0, cells, reference if label != "ref" else None)
               for (label, _), cells in cells_of.items()]
    strongest = bm.add_strongest(summary, cells_of, baselines=["ref", "noisy"])
    # fine-tuned: ref 82.0 beats noisy 80.6; before fine-tuning: noisy 12.6 beats ref 11.6
    assert strongest == {"2": {"test_acc": "ref", "pruned_test_acc": "noisy"}}
    row = {r["method"]: r for r in summary}
    assert row["better"]["test_acc_best_diff"] == pytest.approx(1.0) and row["better"]["test_acc_best_separated"]
    assert row["better"]["pruned_test_acc_best_diff"] == pytest.approx(27.4)
    assert "test_acc_best_diff" not in row["ref"] and "pruned_test_acc_best_diff" in row["ref"]
    table = markdown(summary, [2.0], "ref", 10000, strongest)
    assert "**2x** (strongest baseline: no fine-tuning noisy, fine-tuned ref)" in table
    better_row = next(line for line in table.splitlines() if line.startswith("| better"))
    assert better_row.count("[") == 4 and better_row.endswith("+1.00 [+1.00, +1.00] * |")


@pytest.mark.slow
def test_a_metanetwork_variant_meta_trains_on_its_own_and_prunes_with_its_settings(tmp_path, monkeypatch):
    seen = []
    real = bm.dispatch
    monkeypatch.setattr(bm, "dispatch", lambda cfg: seen.append(cfg) or real(cfg))
    methods = {"published": {"method": "group_l2_max", "metanetwork": {"edit": "additive", "magnitude_features": False}}}
    cfg = _bench_cfg(tmp_path, methods)
    with open_dict(cfg):
        cfg.benchmark.seeds = [0]
    result = bm.benchmark(cfg)
    (meta,) = [c for c in seen if c.run == "meta_train"]
    assert meta.run_name.endswith("_editadditive_magnitude_featuresFalse") and meta.metanetwork.edit == "additive"
    finals = [c for c in seen if c.run == "pruning_final"]
    assert finals and all(c.metanetwork.edit == "additive" and c.meta_train_dir == meta.meta_train_dir for c in finals)
    assert set(result["metanetwork_epochs"]) == {"editadditive_magnitude_featuresFalse"}


def test_a_variant_names_its_meta_training_and_selection_keys():
    spec = {"method": "sparse_learning", "metanetwork": {"edit": "additive"},
            "meta_train": {"lr": 1e-4, "prune_aware": {"weight": 1.0, "targets": [3.0, 4.0]}},
            "visualize": {"select_by": "target"}}
    variant = bm.metanetwork_variant(spec)
    assert variant == {"metanetwork.edit": "additive", "task.meta_train.lr": 1e-4,
                       "task.meta_train.prune_aware.weight": 1.0, "task.meta_train.prune_aware.targets": [3.0, 4.0],
                       "task.visualize.select_by": "target"}
    assert bm.grid_tag(variant) == "editadditive_lr0.0001_weight1_targets3-4_select_bytarget"
    assert bm.metanetwork_variant({"method": "group_l2_max", "metanetwork": True}) == {}


def test_a_baseline_cell_does_not_depend_on_how_the_metanetwork_is_made(tmp_path):
    cfg = _cfg(tmp_path, "run=benchmark")
    other = _cfg(tmp_path, "run=benchmark", "task.meta_train.lr=0.5", "task.visualize.select_by=target")

    def inputs(c, **values):
        return bm.cell_inputs(bm.stage_config(c, "pruning_final", target=1.5, seed=0, slot=100, **values))

    assert inputs(cfg, metanetwork="none") == inputs(other, metanetwork="none")
    assert inputs(cfg, meta_epoch=2) != inputs(other, meta_epoch=2)  # the metanetwork's cells do
    schedule = _cfg(tmp_path, "run=benchmark", "task.schedules.finetune_after_pruning.epochs=3")
    assert inputs(cfg, metanetwork="none") != inputs(schedule, metanetwork="none")


def test_a_misspelled_variant_key_stops_the_benchmark_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(bm, "dispatch", lambda cfg: pytest.fail("no stage may run"))
    methods = {"v": {"method": "group_l2_max", "metanetwork": True, "meta_train": {"accuracy_flor": 0.9}}}
    with pytest.raises(ConfigError, match="accuracy_flor.*accuracy_floor"):
        bm.benchmark(_bench_cfg(tmp_path, methods))


@pytest.mark.slow
def test_a_row_per_meta_epoch_shares_one_meta_training_and_records_the_selection_figures(tmp_path, monkeypatch):
    seen = []
    real = bm.dispatch
    monkeypatch.setattr(bm, "dispatch", lambda cfg: seen.append(cfg) or real(cfg))
    methods = {f"e{e}": {"method": "group_l2_max", "metanetwork": True, "meta_epoch": e} for e in (1, 2)}
    methods["group_l2_max"] = {"method": "group_l2_max"}  # epoch 0 of the study
    cfg = _bench_cfg(tmp_path, methods)
    with open_dict(cfg):
        cfg.benchmark.seeds = [0]
    result = bm.benchmark(cfg)
    assert [c.run for c in seen].count("meta_train") == 1
    finals = {c.meta_epoch: c.run_dir for c in seen if c.run == "pruning_final" and c.metanetwork.name != "none"}
    assert set(finals) == {1, 2} and finals[1] != finals[2]  # one run directory per epoch
    assert {c["method"]: c for c in result["cells"]}["e1"]["test_acc"] is not None
    figures = result["metanetworks"]["task"]["figures"]
    assert set(figures["knee"]) == {0, 2} and set(figures["val_acc"]) == {0, 1, 2}
    study = result["selection_study"]
    assert [r["row"] for r in study["epochs"]] == ["group_l2_max", "e1", "e2"]
    assert [r["figure"] for r in study["figures"]] == ["val_acc", "adaptive_bn"] or \
        [r["figure"] for r in study["figures"]] == ["val_acc"]  # the knee has 2 epochs: too few to rank
    assert (Path(cfg.run_dir) / "selection_figures.csv").exists()
    assert "Selection figures against the fine-tuned accuracy" in (Path(cfg.run_dir) / "benchmark_table.md").read_text()


def test_the_selection_study_ranks_each_figure_against_the_fine_tuned_accuracy():
    methods = {"plain": {"method": "group_l2_max"},
               **{f"e{e}": {"method": "group_l2_max", "metanetwork": True, "meta_epoch": e} for e in (1, 2, 3)},
               "sl": {"method": "sparse_learning"}}
    val = {0: 80.0, 1: 82.0, 2: 85.0, 3: 81.0}  # fine-tuned val acc per epoch; test acc 1 lower
    cells_of = {(label, 4.0): [{"seed": s, "val_acc": val[e] + s, "test_acc": val[e] + s - 1} for s in (0, 1)]
                for e, label in ((0, "plain"), (1, "e1"), (2, "e2"), (3, "e3"))}
    figures = {"val_acc": {0: 90, 1: 89, 2: 88, 3: 87},          # reversed order of the truth's top: rho < 0
               "knee": {"0": 1.30, "1": 1.32, "2": 1.40, "3": 1.31},  # same order as the truth: rho = 1
               "adaptive_bn": {}, "target_val_acc": {2: 70.0}}        # too few epochs: left out
    meta = {"": {"figures": figures}}
    epochs, rows = bm.selection_study(methods, meta, cells_of, [4.0], "plain")
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3] and epochs[2]["finetuned_val_acc_mean"] == 85.5
    by = {r["figure"]: r for r in rows}
    assert set(by) == {"val_acc", "knee"}
    assert by["knee"]["spearman_val"] == pytest.approx(1.0) and by["knee"]["selects"] == 2
    assert by["val_acc"]["selects"] == 1 and by["val_acc"]["spearman_val"] < 0
    assert by["val_acc"]["selected_val_acc"] == 82.5 and by["val_acc"]["best_epoch"] == 2
    assert "| knee | 0,1,2,3 | 1.00 |" in bm.selection_markdown(epochs, rows)


def test_a_method_entry_with_an_unknown_key_or_an_untrained_epoch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(bm, "dispatch", lambda cfg: pytest.fail("no stage may run"))
    for spec, message in (({"method": "group_l2_max", "metanetwork": True, "meta_epcoh": 2}, "unknown key.*meta_epcoh"),
                          ({"method": "group_l2_max", "meta_epoch": 2}, "meta_epoch=2.*metanetwork: true"),
                          ({"metanetwork": True}, "with a method key")):
        with pytest.raises(ConfigError, match=message):
            bm.benchmark(_bench_cfg(tmp_path, {"v": spec}))


@pytest.mark.slow
def test_a_meta_epoch_past_the_trained_ones_is_refused_before_any_cell(tmp_path, monkeypatch):
    real = bm.dispatch
    monkeypatch.setattr(bm, "dispatch", lambda cfg: pytest.fail("no cell may run") if cfg.run == "pruning_final"
                        else real(cfg))
    methods = {"late": {"method": "group_l2_max", "metanetwork": True, "meta_epoch": 99}}
    with pytest.raises(ConfigError, match="meta_epoch=99: its meta-training has epochs"):
        bm.benchmark(_bench_cfg(tmp_path, methods))
