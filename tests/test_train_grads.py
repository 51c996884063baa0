"""Scale gradients of a whole quantized model equal autograd through explicit float weights,
with and without activation checkpointing; training moves the scales and nothing else."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peqa_cli.io.checkpoint import quant_layers
from peqa_cli.quant.linear import QuantLinear, unpack_centered
from peqa_cli.quant.replace import quantize_model_
from peqa_cli.train import optim, testing
from peqa_cli.train.loop import enable_checkpointing


class FloatWeightLinear(nn.Module):
    """Reference: W = Q_bar * s[g_idx] built with ordinary autograd ops, then F.linear."""

    def __init__(self, q: QuantLinear) -> None:
        super().__init__()
        self.scales = nn.Parameter(q.scales.detach().clone())
        qbar = unpack_centered(q.qweight, q.qzeros, q.g_idx, q.bits, q.scales.dtype)
        self.register_buffer("qbar", qbar)  # [K, N]
        self.register_buffer("g_idx", q.g_idx.long())
        self.bias = q.bias

    def forward(self, x):
        w = (self.qbar * self.scales[self.g_idx]).t()
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def quantized_tiny_llama(bits: int, group_size: int) -> nn.Module:
    model = testing.tiny_llama(seed=0)
    quantize_model_(model, bits, group_size)
    return model.double()


def reference_of(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    for name, q in quant_layers(ref).items():
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent), child, FloatWeightLinear(q))
    return ref


def masked_loss(model, ids, labels):
    logits = model(input_ids=ids, use_cache=False).logits
    return optim.token_loss_sum(logits, labels) / optim.count_targets(labels)


# Group size 48 divides neither K=64 nor K=160: every layer has a partial last group.
@pytest.mark.parametrize("bits,group_size", [(4, -1), (3, 32), (3, 48), (2, 48)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_scale_gradients_match_float_weight_autograd(bits, group_size, checkpointing):
    model = quantized_tiny_llama(bits, group_size)
    ref = reference_of(model)
    scales = optim.trainable_scales(model)
    ref_scales = {}
    for p in ref.parameters():
        p.requires_grad_(False)
    for n, m in ref.named_modules():
        if isinstance(m, FloatWeightLinear):
            ref_scales[n] = m.scales.requires_grad_(True)
    assert scales.keys() == ref_scales.keys() and len(scales) == 14

    calls = {"n": 0}
    for layer in quant_layers(model).values():
        layer.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    if checkpointing:
        enable_checkpointing(model)
    model.train()

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, testing.VOCAB, (2, 24), generator=g)
    labels = ids.clone()
    labels[0, :10] = -100  # a masked "prompt"
    masked_loss(model, ids, labels).backward()
    masked_loss(ref, ids, labels).backward()
    # Checkpointing reruns the decoder layers in backward (torch stops each rerun early once
    # the saved tensors are rebuilt, so a layer's last linear may be skipped).
    assert calls["n"] > 14 if checkpointing else calls["n"] == 14
    for n, p in scales.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        torch.testing.assert_close(p.grad, ref_scales[n].grad, rtol=1e-9, atol=1e-12)


def test_training_steps_change_scales_only():
    model = quantized_tiny_llama(3, 48).float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(optim.trainable_scales(model).values())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n in before if n.endswith(".scales")
    ]
    opt = optim.make_optimizer(params, 1e-2, 0.0, (0.9, 0.999), 1e-8)
    ids = torch.randint(0, testing.VOCAB, (2, 16))
    model.train()
    for _ in range(3):
        masked_loss(model, ids, ids).backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for k, v in before.items():
        if k.endswith(".scales"):
            assert not torch.equal(v, after[k]), k
        else:
            assert torch.equal(v, after[k]), k  # integers bit-identical, float parts frozen
            if k.endswith((".qweight", ".qzeros", ".g_idx")):
                assert after[k].dtype == torch.int32
    state = opt.state_dict()["state"]
    assert sum(s["exp_avg"].numel() for s in state.values()) == sum(p.numel() for p in params)
