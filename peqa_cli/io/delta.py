"""Scale deltas: a fine-tuned task as a tiny file, and swapping tasks on a loaded base.

On disk (a folder, peft-style):

    adapter_model.safetensors   "{layer}.scales_delta"  fp32 [G, N]   (s = s0 + Δs)
    adapter_config.json         base fingerprint, bits, group size, layers, recipe, ...

In memory, :func:`apply_delta` sets every layer's ``scales`` to ``s0 + Δs`` from a stored
copy of the base scales, so A -> B -> A swaps return bit-identical weights, and
:func:`remove_delta` restores the base. Nothing is reloaded; a swap costs one add per layer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from peqa_cli.errors import CheckpointError
from peqa_cli.io.checkpoint import atomic_output_dir, make_shareable, quant_layers, write_json
from peqa_cli.quant.linear import QuantLinear

DELTA_FILE = "adapter_model.safetensors"
DELTA_CONFIG = "adapter_config.json"
SUFFIX = ".scales_delta"


@dataclass
class ScaleDelta:
    deltas: dict[str, torch.Tensor]  # layer name -> Δs fp32 [G, N]
    config: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def base_fingerprint(self) -> str:
        return self.config.get("base_fingerprint", "")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.deltas.values())


def base_scales(layer: QuantLinear) -> torch.Tensor:
    """The layer's base scales s0 (remembered the first time a delta is applied)."""
    base = getattr(layer, "_peqa_base_scales", None)
    return base if base is not None else layer.scales.detach()


def _remember_base(layer: QuantLinear) -> torch.Tensor:
    if getattr(layer, "_peqa_base_scales", None) is None:
        layer._peqa_base_scales = layer.scales.detach().clone()
    return layer._peqa_base_scales


def check_compatible(
    delta: ScaleDelta, model: nn.Module, fingerprint: str, bits: int, group_size: int
) -> None:
    """Refuse a delta made for another base: fingerprint, layers, shapes, bits, group size, finiteness."""
    shapes = {n: tuple(layer.scales.shape) for n, layer in quant_layers(model).items()}
    check_against_shapes(delta, shapes, fingerprint, bits, group_size)


def check_against_shapes(
    delta: ScaleDelta,
    scale_shapes: dict[str, tuple[int, ...]],
    fingerprint: str,
    bits: int,
    group_size: int,
) -> None:
    """:func:`check_compatible` against the base's scale shapes by layer, no model needed
    (``peqa merge`` checks a delta from the base's file headers before reading any tensor)."""
    where = delta.path or "delta"
    cfg = delta.config
    if cfg.get("bits") != bits or cfg.get("group_size") != group_size:
        raise CheckpointError(
            f"{where} was trained at bits={cfg.get('bits')}, group_size={cfg.get('group_size')}; "
            f"the base has bits={bits}, group_size={group_size}"
        )
    if delta.base_fingerprint != fingerprint:
        raise CheckpointError(
            f"{where} belongs to another base (its base fingerprint {delta.base_fingerprint[:12]}... "
            f"!= {fingerprint[:12]}...)"
        )
    for name, d in delta.deltas.items():
        if name not in scale_shapes:
            raise CheckpointError(f"{where}: layer {name} is not a quantized layer of the base")
        if tuple(d.shape) != tuple(scale_shapes[name]):
            raise CheckpointError(
                f"{where}: {name} has shape {list(d.shape)}, the base expects {list(scale_shapes[name])}"
            )
        if not torch.isfinite(d).all():
            raise CheckpointError(f"{where}: {name} holds NaN or inf values")


@torch.no_grad()
def apply_delta(model: nn.Module, delta: ScaleDelta) -> None:
    """Set s = s0 + Δs on every layer the delta names (others return to s0)."""
    for name, layer in quant_layers(model).items():
        base = _remember_base(layer)
        d = delta.deltas.get(name)
        layer.scales.data.copy_(base if d is None else base + d.to(base.device, base.dtype))
        layer.clear_cache()


@torch.no_grad()
def remove_delta(model: nn.Module) -> None:
    """Restore every layer's base scales."""
    for layer in quant_layers(model).values():
        base = getattr(layer, "_peqa_base_scales", None)
        if base is not None:
            layer.scales.data.copy_(base)
            layer.clear_cache()


@torch.no_grad()
def extract_delta(model: nn.Module, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Δs = s - s0 per layer, fp32 on CPU."""
    return {
        n: (layer.scales.detach().float() - base[n].float()).cpu()
        for n, layer in quant_layers(model).items()
    }


def save_delta(
    out: str | os.PathLike, deltas: dict[str, torch.Tensor], config: dict, overwrite: bool = True
) -> Path:
    """Write a delta folder atomically; returns its path."""
    from safetensors.torch import save_file

    out = Path(out)
    for name, d in deltas.items():
        if not torch.isfinite(d).all():
            raise CheckpointError(f"refusing to save a delta with NaN or inf scales (layer {name})")
    with atomic_output_dir(out, overwrite) as tmp:
        tensors = {f"{n}{SUFFIX}": d.float().contiguous() for n, d in deltas.items()}
        save_file(tensors, str(tmp / DELTA_FILE), metadata={"format": "pt", "peft_type": "PEQA"})
        make_shareable(tmp / DELTA_FILE)
        write_json(tmp / DELTA_CONFIG, {**config, "peft_type": "PEQA", "layers": sorted(deltas)})
    return out


def load_delta(path: str | os.PathLike) -> ScaleDelta:
    """Read a delta folder (or its safetensors file); one clear line if missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    folder = p.parent if p.suffix == ".safetensors" else p
    tensors_path, config_path = folder / DELTA_FILE, folder / DELTA_CONFIG
    if not tensors_path.is_file() or not config_path.is_file():
        raise CheckpointError(
            f"delta not found: {folder} (expected {DELTA_FILE} and {DELTA_CONFIG})"
        )
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(str(tensors_path))
    except (json.JSONDecodeError, SafetensorError, OSError) as exc:
        raise CheckpointError(f"corrupt delta {folder}: {str(exc).splitlines()[0]}") from None
    deltas = {k[: -len(SUFFIX)]: v.float() for k, v in tensors.items() if k.endswith(SUFFIX)}
    if not deltas:
        raise CheckpointError(f"corrupt delta {folder}: no '*{SUFFIX}' tensors")
    return ScaleDelta(deltas, config, folder)
