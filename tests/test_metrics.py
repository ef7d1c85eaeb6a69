"""Metrics on hand-computed cases (design.md definitions)."""
import math

import pytest
import torch

from parity import metrics


def test_max_and_mean_abs():
    ref = torch.tensor([1.0, -2.0, 3.0, 0.0])
    out = torch.tensor([1.5, -2.0, 2.0, 0.25])
    assert metrics.max_abs(ref, out) == 1.0
    assert metrics.mean_abs(ref, out) == pytest.approx((0.5 + 0 + 1.0 + 0.25) / 4)


def test_rel_l2_hand_computed():
    ref = torch.tensor([3.0, 4.0])  # |ref| = 5
    out = torch.tensor([3.0, 4.5])  # |diff| = 0.5
    assert metrics.rel_l2(ref, out) == pytest.approx(0.1)
    assert metrics.rel_l2(torch.zeros(3), torch.zeros(3)) == 0.0
    assert metrics.rel_l2(torch.zeros(3), torch.ones(3)) == math.inf


def test_cosine_distance_hand_computed():
    a = torch.tensor([1.0, 0.0])
    assert metrics.cosine_distance(a, torch.tensor([0.0, 2.0])) == pytest.approx(1.0)
    assert metrics.cosine_distance(a, torch.tensor([-3.0, 0.0])) == pytest.approx(2.0)
    assert metrics.cosine_distance(a, torch.tensor([1.0, 1.0])) == pytest.approx(1 - 1 / math.sqrt(2))
    assert metrics.cosine_distance(a, a * 5) == pytest.approx(0.0, abs=1e-15)


def test_psnr_apple_definition():
    ref = torch.tensor([0.0, 2.0, -4.0, 1.0])  # max|ref| = 4
    out = ref + torch.tensor([0.1, -0.1, 0.1, -0.1])  # rmse = 0.1
    expected = 20 * math.log10((4 + 1e-5) / (0.1 + 1e-10))
    assert metrics.psnr_db(ref, out) == pytest.approx(expected)
    # identical tensors: rmse 0 -> the 1e-10 guard gives a large finite number
    assert metrics.psnr_db(ref, ref) == pytest.approx(20 * math.log10((4 + 1e-5) / 1e-10))


def test_compare_flags_non_finite_and_shape():
    ref = torch.ones(4)
    bad = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    e = metrics.compare(ref, bad)
    assert not e.finite and math.isnan(e.max_abs)
    assert metrics.compare(ref, ref + 1e-3).finite
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.compare(ref, torch.ones(5))


def test_metrics_are_computed_in_float64():
    ref = torch.full((1000,), 1.0, dtype=torch.bfloat16)
    out = ref.clone()
    out[0] = 1.0078125  # one bf16 ulp above 1
    assert metrics.max_abs(ref, out) == pytest.approx(0.0078125)
