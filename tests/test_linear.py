"""QuantLinear: forward equals the explicit float weight; exact scale gradients; frozen integers."""

from __future__ import annotations

import pytest
import torch

from peqa_cli.quant.linear import QuantLinear, linear_reference, set_weight_cache
from peqa_cli.quant.primitives import quantize_weight


def make_layer(bits, group_size, n=64, k=96, bias=False, seed=0):
    torch.manual_seed(seed)
    r = quantize_weight(torch.randn(n, k), bits, group_size)
    b = torch.randn(n).half() if bias else None
    return QuantLinear.from_quantized(
        r["q"], r["scales"], r["zeros"], r["g_idx"], bits, group_size, b
    )


def test_only_scales_are_parameters():
    layer = make_layer(4, 32, bias=True)
    assert [n for n, _ in layer.named_parameters()] == ["scales"]
    assert {n for n, _ in layer.named_buffers()} == {"qweight", "qzeros", "g_idx", "bias"}
    assert layer.qweight.dtype == torch.int32 and layer.qzeros.dtype == torch.int32


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 40])
def test_forward_and_gradients_match_float_weight(bits, group_size):
    layer = make_layer(bits, group_size, bias=True).double()
    layer.scales.requires_grad_(True)
    x = torch.randn(3, 5, 96, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    (y.sin().sum()).backward()
    gs, gx = layer.scales.grad.clone(), x.grad.clone()

    # Reference: autograd through an explicit float weight built from the same scales.
    s = layer.scales.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    qbar = layer.integers().double() - layer.zeros().double()[layer.g_idx.long()].t()
    w = qbar * s[layer.g_idx.long()].t()
    y2 = torch.nn.functional.linear(x2, w, layer.bias.double())
    (y2.sin().sum()).backward()
    assert torch.allclose(y, y2, rtol=1e-10, atol=1e-10)
    assert torch.allclose(gs, s.grad, rtol=1e-9, atol=1e-9)
    assert torch.allclose(gx, x2.grad, rtol=1e-9, atol=1e-9)


def test_integers_unchanged_by_an_optimizer_step():
    layer = make_layer(3, 32)
    before = {n: b.clone() for n, b in layer.named_buffers()}
    layer.scales.requires_grad_(True)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(4, 96)).pow(2).mean().backward()
        opt.step()
    for n, b in layer.named_buffers():
        assert torch.equal(b, before[n]), n
    assert not torch.equal(layer.scales.detach(), make_layer(3, 32).scales.detach())


def test_no_input_grad_requested():
    layer = make_layer(4, -1)
    layer.scales.requires_grad_(True)
    x = torch.randn(2, 96)  # no grad for the input: backward must still give scale grads
    layer(x).sum().backward()
    assert layer.scales.grad is not None and torch.isfinite(layer.scales.grad).all()


def test_bf16_autocast_runs_in_bf16():
    layer = make_layer(4, 32)
    x = torch.randn(2, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = linear_reference(x, layer)
    assert torch.allclose(y.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_weight_cache_matches_and_follows_scale_changes():
    from peqa_cli.io.delta import ScaleDelta, apply_delta, remove_delta

    layer = make_layer(3, 32)
    model = torch.nn.Sequential(layer)
    x = torch.randn(4, 96)
    with torch.no_grad():
        plain = model(x)
        set_weight_cache(model, True)
        cached = model(x)
        assert torch.allclose(plain, cached, rtol=1e-5, atol=1e-5)
        delta = ScaleDelta({"0": torch.full_like(layer.scales, 0.01)})
        apply_delta(model, delta)
        set_weight_cache(model, False)
        want = model(x)
        set_weight_cache(model, True)
        assert torch.allclose(model(x), want, rtol=1e-5, atol=1e-5)
        remove_delta(model)
        assert torch.allclose(model(x), plain, rtol=1e-5, atol=1e-5)
    # training never reads the cache
    layer.scales.requires_grad_(True)
    model(x).sum().backward()
    assert layer.scales.grad is not None
