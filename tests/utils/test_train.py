import pytest
import torch

from tests.conftest import TinyNet
from utils.checkpoint import CheckpointError
from utils import train
from utils.train import Limits, evaluate, fit

SCHEDULE = {"epochs": 3, "lr": 0.1, "milestones": [2], "gamma": 0.1}
OPTIM = {"name": "sgd", "momentum": 0.9, "weight_decay": 5e-4}
CPU = torch.device("cpu")


def test_fit_learns_and_writes_history(synthetic_loaders, tiny_net, tmp_path):
    before = evaluate(tiny_net, synthetic_loaders["val"], CPU)["acc"]
    result = fit(tiny_net, synthetic_loaders, SCHEDULE, OPTIM, CPU, run_dir=tmp_path, name="t", progress=False)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert [row["lr"] for row in result.history] == pytest.approx([0.1, 0.1, 0.01])  # milestone at 2
    assert result.selected_val["acc"] == max(row["val_acc"] for row in result.history)
    # The model ends with the weights of the selected epoch.
    assert evaluate(tiny_net, synthetic_loaders["val"], CPU)["acc"] == pytest.approx(result.selected_val["acc"])
    assert result.selected_val["acc"] > before + 20  # synthetic classes are easy
    assert (tmp_path / "t_last.pt").is_file() and (tmp_path / "t_best.pt").is_file()
    lines = (tmp_path / "t_history.csv").read_text().strip().splitlines()
    assert lines[0].startswith("epoch,lr,train_loss") and len(lines) == 4


class _Interrupt:
    """Wraps a loader and raises KeyboardInterrupt at a given (epoch, batch), like Ctrl-C would."""

    def __init__(self, loader, epoch: int, batch: int) -> None:
        self.loader, self.at, self.epoch = loader, (epoch, batch), -1
        self.generator = loader.generator

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.epoch += 1
        for i, item in enumerate(self.loader):
            if (self.epoch, i) == self.at:
                raise KeyboardInterrupt
            yield item


def test_resume_after_interrupt_is_bit_identical(synthetic_loaders, tmp_path):
    torch.manual_seed(0)
    reference = TinyNet()
    fit(reference, synthetic_loaders, SCHEDULE, OPTIM, CPU, run_dir=tmp_path / "a", progress=False, seed=3)

    torch.manual_seed(0)
    model = TinyNet()
    interrupted = dict(synthetic_loaders, train=_Interrupt(synthetic_loaders["train"], epoch=2, batch=1))
    with pytest.raises(KeyboardInterrupt):
        fit(model, interrupted, SCHEDULE, OPTIM, CPU, run_dir=tmp_path / "b", progress=False, seed=3)
    torch.manual_seed(123)  # a fresh process would start from other weights: resume must overwrite them
    resumed = TinyNet()
    result = fit(resumed, synthetic_loaders, SCHEDULE, OPTIM, CPU, run_dir=tmp_path / "b", progress=False, seed=3)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    for (k, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_resume_refuses_other_settings_and_other_architecture(synthetic_loaders, tiny_net, tmp_path):
    fit(tiny_net, synthetic_loaders, dict(SCHEDULE, epochs=1), OPTIM, CPU, run_dir=tmp_path, progress=False,
        fingerprint={"lr": 0.1})
    with pytest.raises(CheckpointError, match="lr: checkpoint 0.1 vs now 0.2"):
        fit(TinyNet(), synthetic_loaders, dict(SCHEDULE, epochs=1), OPTIM, CPU, run_dir=tmp_path,
            progress=False, fingerprint={"lr": 0.2})
    with pytest.raises(CheckpointError, match="different architecture"):
        fit(TinyNet(width=4), synthetic_loaders, dict(SCHEDULE, epochs=1), OPTIM, CPU, run_dir=tmp_path,
            progress=False, fingerprint={"lr": 0.1})
    # resume=false starts over instead
    result = fit(TinyNet(width=4), synthetic_loaders, dict(SCHEDULE, epochs=1), OPTIM, CPU, run_dir=tmp_path,
                 progress=False, resume=False)
    assert len(result.history) == 1


def test_corrupt_resume_checkpoint_is_reported(synthetic_loaders, tiny_net, tmp_path):
    (tmp_path / "train_last.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="train_last.pt cannot be read"):
        fit(tiny_net, synthetic_loaders, SCHEDULE, OPTIM, CPU, run_dir=tmp_path, progress=False)


def test_limits_cap_epochs_and_batches(synthetic_loaders, tiny_net):
    result = fit(tiny_net, synthetic_loaders, SCHEDULE, OPTIM, CPU, limits=Limits(1, 1, 1), progress=False)
    assert len(result.history) == 1
    assert result.history[0]["val_acc"] >= 0
    assert Limits.from_cfg({"max_epochs": 2, "limit_train_batches": 3}) == Limits(2, 3, None)


def test_select_last_and_bad_select(synthetic_loaders, tiny_net):
    result = fit(tiny_net, synthetic_loaders, dict(SCHEDULE, select="last"), OPTIM, CPU, progress=False)
    assert result.selected_epoch == 3
    with pytest.raises(ValueError, match="schedule.select"):
        fit(tiny_net, synthetic_loaders, dict(SCHEDULE, select="test"), OPTIM, CPU, progress=False)


def test_nonfinite_loss_stops_with_clear_error(synthetic_loaders, tiny_net):
    with torch.no_grad():
        tiny_net.fc.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        fit(tiny_net, synthetic_loaders, SCHEDULE, OPTIM, CPU, progress=False)


def _bn_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    net[1].running_mean.fill_(5.0)  # stale statistics: far from the data's
    return net


def test_batch_statistics_normalise_with_the_batch_and_keep_the_stored_statistics():
    net, x = _bn_net(), torch.randn(8, 3, 6, 6)
    stored = net[1].running_mean.clone()
    with train.batch_statistics(net):
        y = net(x)
    pre = net[0](x)
    expect = torch.relu(net[1].weight[:, None, None] * (pre - pre.mean((0, 2, 3), keepdim=True))
                        / (pre.var((0, 2, 3), unbiased=False, keepdim=True) + net[1].eps).sqrt()
                        + net[1].bias[:, None, None])
    torch.testing.assert_close(y, expect, rtol=1e-4, atol=1e-5)
    assert torch.equal(net[1].running_mean, stored) and not net[1].training and net[1].momentum == 0.1


def test_recalibrated_batchnorm_holds_the_average_over_the_batches():
    net, batches = _bn_net(), [torch.randn(8, 3, 6, 6) + i for i in range(3)]
    train.recalibrate_batchnorm(net, batches)
    means = torch.stack([net[0](x).mean((0, 2, 3)) for x in batches]).mean(0)
    torch.testing.assert_close(net[1].running_mean, means, rtol=1e-4, atol=1e-5)
    assert not net[1].training and net[1].momentum == 0.1
