"""Mixup / CutMix: the mixed loss equals cross-entropy against mixed one-hot targets; boxes are exact."""
import pytest
import torch
import torch.nn.functional as F

from utils.mixing import BatchMix, mixed_cross_entropy


def test_off_unless_an_alpha_is_set():
    assert BatchMix.from_schedule({"epochs": 1}) is None
    assert BatchMix.from_schedule({"mixup_alpha": 0.8}) == BatchMix(0.8, 0.0, 1.0, 0.5)
    with pytest.raises(ValueError):
        BatchMix.from_schedule({"cutmix_alpha": -1})


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixed_loss_equals_soft_target_cross_entropy(smoothing):
    torch.manual_seed(0)
    logits, y, y2, lam = torch.randn(6, 5), torch.randint(0, 5, (6,)), torch.randint(0, 5, (6,)), 0.3
    soft = lam * F.one_hot(y, 5).float() + (1 - lam) * F.one_hot(y2, 5).float()
    soft = soft * (1 - smoothing) + smoothing / 5
    expected = -(soft * F.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(mixed_cross_entropy(logits, y, y2, lam, smoothing), expected, atol=1e-6)


def test_mixup_blends_with_the_partner():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 4, 4), torch.arange(8)
    torch.manual_seed(1)
    mixed, partner, lam = BatchMix(mixup_alpha=0.8)(x, y)
    assert 0 < lam < 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[partner])  # y = arange: labels index the batch


def test_cutmix_pastes_a_box_whose_area_is_one_minus_lam():
    x, y = torch.zeros(4, 1, 16, 16), torch.arange(4)
    x += y.view(4, 1, 1, 1).float()  # image i is constant i
    for seed in range(5):
        torch.manual_seed(seed)
        mixed, partner, lam = BatchMix(cutmix_alpha=1.0)(x, y)
        for i in range(4):
            if partner[i] != i:
                pasted = (mixed[i] == float(partner[i])).float().mean().item()
                assert pasted == pytest.approx(1 - lam)
