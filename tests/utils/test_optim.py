import pytest
import torch

from utils.optim import build_optimizer, build_scheduler
from utils.registry import UnknownNameError


def _lrs(schedule, epochs):
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], {"name": "sgd"}, lr=1.0)
    sched = build_scheduler(opt, schedule, epochs)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_multistep_schedule():
    assert _lrs({"milestones": [2, 4], "gamma": 0.1}, 5) == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_cosine_with_warmup():
    lrs = _lrs({"scheduler": "cosine", "warmup_epochs": 2}, 6)
    assert lrs[:2] == pytest.approx([1 / 3, 2 / 3])
    assert lrs[2] == pytest.approx(1.0) and lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0


def test_optimizers_and_errors():
    p = [torch.nn.Parameter(torch.zeros(1))]
    assert isinstance(build_optimizer(p, {"name": "adamw", "weight_decay": 0.05}, 1e-3), torch.optim.AdamW)
    with pytest.raises(UnknownNameError, match="adamw, sgd"):
        build_optimizer(p, {"name": "adam"}, 1e-3)
    with pytest.raises(ValueError, match="multistep"):
        _lrs({"scheduler": "linear"}, 2)
