"""Which linears get quantized, and swapping them for :class:`QuantLinear` in memory.

Default targets are every ``nn.Linear`` inside the model's decoder blocks (any module
under a ``ModuleList``), so embeddings, norms and ``lm_head`` stay in 16-bit, as in PEQA.
``include`` / ``exclude`` take shell-style globs over module names
(``model.layers.*.mlp.*``) and override the default.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from peqa_cli.quant import bitpack
from peqa_cli.quant.linear import QuantLinear
from peqa_cli.quant.primitives import quantize_weight


def _block_prefixes(model: nn.Module) -> list[str]:
    return [name + "." for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]


def select_linears(
    model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> dict[str, nn.Linear]:
    """Module name -> linear for every layer to quantize (works on ``meta`` models too)."""
    blocks = _block_prefixes(model)
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if include:
            keep = any(fnmatch.fnmatchcase(name, pat) for pat in include)
        else:
            keep = any(name.startswith(p) for p in blocks)
        if keep and not any(fnmatch.fnmatchcase(name, pat) for pat in exclude or []):
            out[name] = m
    return out


def packable(in_features: int, out_features: int, bits: int) -> bool:
    """GPTQ packs K along words and N for the zeros: both must fill whole 32-bit words."""
    return bitpack.can_pack(in_features, bits) and bitpack.can_pack(out_features, bits)


@torch.no_grad()
def quantize_model_(
    model: nn.Module,
    bits: int,
    group_size: int,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> list[str]:
    """Quantize ``model``'s selected linears in place (round-to-nearest). Returns their names.

    Layers whose shapes cannot be packed are left in float.
    """
    done = []
    for name, lin in select_linears(model, include, exclude).items():
        if not packable(lin.in_features, lin.out_features, bits):
            continue
        r = quantize_weight(lin.weight.data, bits, group_size)
        bias = lin.bias.data.to(torch.float16) if lin.bias is not None else None
        q = QuantLinear.from_quantized(
            r["q"], r["scales"], r["zeros"], r["g_idx"], bits, group_size, bias
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q.to(lin.weight.device))
        done.append(name)
    return done
