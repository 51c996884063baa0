"""dequantize(quantize(W)) equals PEQA's formula computed independently, for every layout."""

from __future__ import annotations

import math

import pytest
import torch

from peqa_cli.quant.primitives import (
    choose_qparams,
    dequantize,
    group_index,
    num_groups,
    quantize_weight,
)


def formula(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """W_hat = s * (clamp(round(W/s) + z, 0, 2^b-1) - z), one group at a time, in float64."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    out = torch.empty_like(w, dtype=torch.float64)
    qmax = 2**bits - 1
    for start in range(0, k, g):
        blk = w[:, start : start + g].double()
        lo = blk.min(dim=1, keepdim=True).values.clamp(max=0)
        hi = blk.max(dim=1, keepdim=True).values.clamp(min=0)
        s = ((hi - lo) / qmax).half().double()  # the checkpoint stores fp16 scales
        z = torch.round(-lo / s).clamp(0, qmax)
        q = torch.clamp(torch.round(blk / s) + z, 0, qmax)
        out[:, start : start + g] = s * (q - z)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 16, 24, 100])
def test_dequantize_matches_formula(bits, group_size):
    torch.manual_seed(bits * 1000 + group_size)
    w = torch.randn(48, 72)
    r = quantize_weight(w, bits, group_size)
    assert r["scales"].shape == (num_groups(72, group_size), 48)
    assert int(r["q"].max()) <= 2**bits - 1
    ours = dequantize(r["q"], r["scales"], r["zeros"], r["g_idx"], torch.float64)
    ref = formula(w, bits, group_size)
    # same arithmetic up to float32 vs float64 rounding of W/s before round()
    close = torch.isclose(ours, ref, rtol=0, atol=1e-6)
    assert close.float().mean() > 0.999
    assert torch.allclose(ours, ref, atol=r["scales"].max().item() * 1.01)


def test_partial_last_group_uses_its_own_range():
    k, g = 40, 16  # groups of 16, 16 and 8
    w = torch.randn(4, k)
    w[:, 32:] *= 100  # the last, partial group has a much larger range
    r = quantize_weight(w, 4, g)
    assert r["scales"].shape == (3, 4)
    assert torch.equal(r["g_idx"], group_index(k, g))
    assert (r["scales"][2] > 10 * r["scales"][0]).all()


def test_per_channel_is_one_group():
    w = torch.randn(8, 33)
    r = quantize_weight(w, 3, -1)
    assert r["scales"].shape == (1, 8)
    assert int(r["g_idx"].abs().sum()) == 0


def test_zero_rows_and_positive_rows():
    w = torch.zeros(3, 32)
    w[1] = torch.rand(32) + 1.0  # all positive: the range still includes 0
    s, z = choose_qparams(w, 4, -1)
    assert (s > 0).all()
    assert ((z >= 0) & (z <= 15)).all()
    r = quantize_weight(w, 4, -1)
    w_hat = dequantize(r["q"], r["scales"], r["zeros"], r["g_idx"])
    assert torch.equal(w_hat[0], torch.zeros(32))
    assert torch.allclose(w_hat[1], w[1], atol=s[0, 1].item())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_shrinks_with_bits(bits):
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    r = quantize_weight(w, bits, -1)
    err = (dequantize(r["q"], r["scales"], r["zeros"], r["g_idx"]) - w).abs().max().item()
    assert err <= r["scales"].max().item() / 2 + 1e-6  # round-to-nearest: at most half a step
    assert math.isfinite(err)
