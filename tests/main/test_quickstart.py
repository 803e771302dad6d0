"""run=quickstart on tiny data: every stage runs, the table and plot are written, a re-run reuses the stages."""
from pathlib import Path

import pytest

import main.meta_train as mt
import main.quickstart as qs
from main.quickstart import curve_score, select_epoch
from main.run_modes import ConfigError, dispatch
from main.visualize import knee, knees
from tests.main.test_meta_train import _cfg
from utils.io import read_json


def test_epoch_selection_prefers_the_flatter_curve_and_never_picks_epoch_0():
    flat = [{"speed_up": 1.3, "val_acc": 90.0}, {"speed_up": 3.0, "val_acc": 80.0}]
    steep = [{"speed_up": 1.3, "val_acc": 92.0}, {"speed_up": 2.0, "val_acc": 50.0}, {"speed_up": 3.0, "val_acc": 20.0}]
    assert curve_score(flat, 1.3, 3.0) == pytest.approx(85.0)
    epoch, scores = select_epoch({0: flat, 2: steep, 4: flat})
    assert epoch == 4 and scores[0] == scores[4] > scores[2]
    with pytest.raises(ValueError, match="epoch > 0"):
        select_epoch({0: flat})


def test_selection_by_target_takes_the_best_pruned_and_finetuned_validation_accuracy():
    flat = [{"speed_up": 1.3, "val_acc": 90.0}, {"speed_up": 3.0, "val_acc": 85.0}]
    steep = [{"speed_up": 1.3, "val_acc": 92.0}, {"speed_up": 3.0, "val_acc": 20.0}]
    curves = {0: flat, 2: steep, 4: flat, 6: flat}
    assert select_epoch(curves, 90.0)[0] == 4  # by knee: 4 and 6 tie, then the curve score, then the first
    epoch, scores = select_epoch(curves, 90.0, {0: 99.0, 2: 96.0, 4: 94.0, 6: 95.0}, by="target")
    assert epoch == 2 and scores == {0: 99.0, 2: 96.0, 4: 94.0, 6: 95.0}  # epoch 0 is reported, never chosen
    assert select_epoch(curves, 90.0, {2: 94.0, 4: 95.0, 6: 95.0}, by="target")[0] == 4  # tie: the higher knee
    with pytest.raises(ConfigError, match="select_target"):
        select_epoch(curves, 90.0, {2: 94.0}, by="target")  # epochs 4 and 6 were not measured at the target
    with pytest.raises(ConfigError, match="choose knee, target or adaptive_bn"):
        select_epoch(curves, 90.0, by="speed")


def test_selection_by_adaptive_bn_reads_meta_trainings_validation_rows(tmp_path):
    rows = [{"epoch": 0, "val_acc": 90.0, "val_acc_at_3x_adaptive_bn": 60.0, "val_acc_at_4x_adaptive_bn": 40.0},
            {"epoch": 1, "val_acc": 88.0, "val_acc_at_3x_adaptive_bn": 70.0, "val_acc_at_4x_adaptive_bn": 50.0},
            {"epoch": 2, "val_acc": 85.0, "val_acc_at_3x_adaptive_bn": 75.0, "val_acc_at_4x_adaptive_bn": 55.0},
            {"epoch": 3, "val_acc": 70.0, "val_acc_at_3x_adaptive_bn": 80.0, "val_acc_at_4x_adaptive_bn": 60.0}]
    assert mt.adaptive_bn_scores(rows) == {0: 50.0, 1: 60.0, 2: 65.0, 3: 70.0}
    cfg = _cfg(tmp_path, "task.visualize.select_by=adaptive_bn", "task.meta_train.accuracy_floor=0.9")
    # epoch 3 scores best but is below the floor (70 < 81); epoch 2 is the best above it and joins the curves
    assert qs.selection_candidates(cfg, [0, 1], rows) == [0, 1, 2]
    flat = [{"speed_up": 1.3, "val_acc": 90.0}, {"speed_up": 3.0, "val_acc": 85.0}]
    assert qs.selected_epoch(cfg, {"curves": {0: flat, 1: flat, 2: flat}}, rows)[0] == 2
    with pytest.raises(ConfigError, match="adaptive-BN figures"):
        select_epoch({0: flat, 5: flat}, 90.0, mt.adaptive_bn_scores(rows), by="adaptive_bn")


def test_knee_is_where_the_curve_first_falls_below_80_percent_of_the_original():
    original = [{"speed_up": 1.3, "val_acc": 100.0}, {"speed_up": 1.5, "val_acc": 90.0},
                {"speed_up": 1.7, "val_acc": 70.0}, {"speed_up": 2.0, "val_acc": 85.0}]
    assert knee(original, 100.0) == pytest.approx(1.6)  # 90 -> 70 crosses 80 halfway; later recovery ignored
    flat = [{"speed_up": 1.3, "val_acc": 95.0}, {"speed_up": 3.0, "val_acc": 90.0}]
    assert knee(flat, 100.0) == 3.0  # never below: the last speed-up (the knee is at least that)
    low = [{"speed_up": 1.3, "val_acc": 50.0}, {"speed_up": 3.0, "val_acc": 40.0}]
    assert knee(low, 100.0) == 1.3  # already below at the start
    both = knees({0: {"points": original}, 4: {"points": flat}})  # both against the original's 100
    assert both == {0: pytest.approx(1.6), 4: 3.0}
    chance = [{"speed_up": 1.3, "val_acc": 10.0}, {"speed_up": 3.0, "val_acc": 10.0}]  # e.g. too strong a reg
    assert knees({0: {"points": chance}}) == {0: 3.0}  # against its own start it would look flat
    assert knees({0: {"points": chance}, 4: {"points": flat}}, reference=98.0) == {0: 1.3, 4: 3.0}
    assert select_epoch({0: original, 2: low, 4: flat}, reference=98.0)[0] == 4


@pytest.mark.slow
def test_quickstart_runs_the_pipeline_and_writes_table_and_plot(tmp_path):
    overrides = ["run=quickstart", "task.data_models.num=3", "task.quickstart.epochs=[2]",
                 "task.pruning.target_speed_ups=[1.5]", "task.quickstart.target_index=100",
                 "task.visualize.select_by=target", "task.visualize.select_target=1.5"]
    cfg = _cfg(tmp_path, *overrides)
    summary = dispatch(cfg)
    rows = summary["rows"]
    assert [r["variant"] for r in rows] == ["metanetwork (epoch 2)", "no metanetwork"]
    assert all(r["speed_up"] >= 1.5 for r in rows)
    run_dir = Path(cfg.run_dir)
    results = read_json(run_dir / "quickstart_results.json")
    assert results["selected_epoch"] == 2 and set(results["knees"]) == {"0", "2"}
    assert results["selected_by"] == "target" and set(results["target_val_acc"]) == {"0", "2"}
    assert "pruned to 1.5x and fine-tuned: no metanetwork" in (run_dir / "quickstart_results.md").read_text()
    assert "knee (val acc < 80% of the original's" in (run_dir / "quickstart_results.md").read_text()
    assert (run_dir / "quickstart_results.csv").read_text().count("\n") == 3  # header + 2 rows
    assert "| no metanetwork | 1.5x |" in (run_dir / "quickstart_results.md").read_text()
    assert (Path(cfg.run_dir) / "quickstart_acc_vs_speed_up.png").stat().st_size > 0
    assert not (tmp_path / "figures").exists()  # nothing outside the run directories
    again = dispatch(_cfg(tmp_path, *overrides))  # every stage is found finished: same numbers
    drop = ("latency_ms", "base_latency_ms")  # latency is measured afresh
    assert [{k: v for k, v in r.items() if k not in drop} for r in again["rows"]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rows]


def test_selection_settings_are_checked_before_any_curve(tmp_path):
    with pytest.raises(ConfigError, match="select_by='speed' is not valid: it must be one of target, adaptive_bn, knee"):
        dispatch(_cfg(tmp_path, "run=visualize", "epochs=[0]", "task.visualize.select_by=speed"))
    with pytest.raises(ConfigError, match="select_by=target needs task.visualize.select_target"):
        dispatch(_cfg(tmp_path, "run=visualize", "epochs=[0]", "task.visualize.select_by=target",
                      "task.visualize.select_target=null"))


def test_quickstart_needs_task_settings(tmp_path):
    with pytest.raises(ConfigError, match="no quickstart settings"):
        dispatch(_cfg(tmp_path, "run=quickstart", "~task.quickstart"))
