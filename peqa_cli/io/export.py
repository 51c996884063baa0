"""Writing merged checkpoints from a base checkpoint and per-layer scales, tensor by tensor.

    write_gptq  the base's files with only ``*.scales`` replaced: qweight, qzeros and g_idx are
                copied byte for byte in the base's own format (v1 stays v1) and shard layout.
    write_hf    a plain float model: each quantized linear becomes ``{layer}.weight`` =
                ``QuantLinear.dequantized_weight``; config.json loses ``quantization_config``,
                so ``AutoModelForCausalLM.from_pretrained`` loads it without peqa.

The base is opened by its headers (:func:`open_base`); every tensor is read with ``pread``
when written and dropped after, and outputs go to offsets planned up front, so peak memory
is one layer whatever the model size. Both writers hash the base's quantized tensors as they
pass and refuse (before the output folder is renamed into place) a base whose tensors no
longer match the fingerprint its ``peqa.json`` records.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peqa_cli.errors import CheckpointError
from peqa_cli.io import checkpoint as ckpt
from peqa_cli.io.stream import SafetensorsReader, SafetensorsWriter, TensorSpec, plan_shards
from peqa_cli.quant.linear import QuantLinear

Advance = Callable[..., None]
_QPARTS = ("qzeros", "scales", "g_idx")  # consumed with a layer's qweight in an hf export


@dataclass
class BaseCheckpoint:
    """A base checkpoint opened by its headers: no tensor is read until asked for."""

    path: Path
    spec: ckpt.QuantSpec
    readers: list[SafetensorsReader]
    where: dict[str, SafetensorsReader]  # tensor name -> the shard holding it
    layers: list[str]
    meta: dict
    fingerprint: str
    recorded: bool  # the fingerprint comes from peqa.json (verified while streaming)

    def read(self, name: str) -> torch.Tensor:
        return self.where[name].read(name)

    def scale_spec(self, layer: str) -> TensorSpec:
        return self.where[f"{layer}.scales"].spec(f"{layer}.scales")

    @property
    def nbytes(self) -> int:
        return sum(r.path.stat().st_size for r in self.readers)

    @property
    def ntensors(self) -> int:
        return len(self.where)


def _quant_digests(where: dict[str, SafetensorsReader]) -> dict[str, str]:
    return {
        k: ckpt.tensor_digest(r.read(k))
        for k, r in where.items()
        if k.endswith(ckpt.QUANT_SUFFIXES)
    }


def open_base(path: str | Path) -> BaseCheckpoint:
    """Validate a base checkpoint's config and headers; hash its tensors if peqa.json has no
    fingerprint (a GPTQ checkpoint from another tool)."""
    path = Path(path)
    spec = ckpt.read_quant_spec(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors files")
    readers = [SafetensorsReader(f) for f in files]
    where: dict[str, SafetensorsReader] = {}
    for r in readers:
        for k in r.keys():
            if k in where:
                raise CheckpointError(
                    f"{path}: tensor {k} is stored twice ({where[k].path.name}, {r.path.name})"
                )
            where[k] = r
    layers = sorted(k[: -len(".qweight")] for k in where if k.endswith(".qweight"))
    if not layers:
        raise CheckpointError(f"{path} holds no quantized layers (no *.qweight tensors)")
    for layer in layers:
        missing = [p for p in _QPARTS if f"{layer}.{p}" not in where]
        if missing:
            raise CheckpointError(f"{path}: {layer} has a qweight but no {missing[0]}")
    meta = ckpt.read_peqa_json(path)
    recorded = bool(meta.get("fingerprint"))
    # Hashed as load_quantized does (raw file tensors, v1 zeros as stored), so a delta
    # trained on a foreign checkpoint carries the same base fingerprint.
    fingerprint = meta["fingerprint"] if recorded else ckpt.combine_digests(_quant_digests(where))
    return BaseCheckpoint(path, spec, readers, where, layers, meta, fingerprint, recorded)


def merged_scales(s0: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """s0 + Δs, added in fp32 (as ``apply_delta`` does in memory), rounded to s0's dtype."""
    if delta is None:
        return s0
    return (s0.float() + delta.float()).to(s0.dtype)


class _Digests:
    """Digests of the base's quantized tensors as read, and of the merged ones."""

    def __init__(self) -> None:
        self.base: dict[str, str] = {}
        self.merged: dict[str, str] = {}

    def add(self, name: str, base_t: torch.Tensor, merged_t: torch.Tensor) -> None:
        self.base[name] = ckpt.tensor_digest(base_t)
        self.merged[name] = self.base[name] if merged_t is base_t else ckpt.tensor_digest(merged_t)

    def verify(self, base: BaseCheckpoint) -> str:
        """Refuse a base modified since its peqa.json; returns the merged fingerprint."""
        if base.recorded and ckpt.combine_digests(self.base) != base.fingerprint:
            raise CheckpointError(
                f"{base.path}: its tensors do not match the fingerprint in its peqa.json "
                "(modified after it was written?); nothing written"
            )
        return ckpt.combine_digests(self.merged)


def write_gptq(
    base: BaseCheckpoint, deltas: dict[str, torch.Tensor], out: Path, advance: Advance
) -> str:
    """The base with scales s0 + Δs into folder ``out`` (all but peqa.json); returns the
    merged fingerprint."""
    digests = _Digests()
    for r in base.readers:
        writer = SafetensorsWriter(out / r.path.name, [r.spec(k) for k in r.keys()], r.metadata)
        for k in r.keys():
            t = r.read(k)
            if k.endswith(ckpt.QUANT_SUFFIXES):
                layer, _, part = k.rpartition(".")
                m = merged_scales(t, deltas.get(layer)) if part == "scales" else t
                digests.add(k, t, m)
                t = m
            writer.write(k, t)
            advance()
        writer.close()
    fingerprint = digests.verify(base)
    for f in sorted(base.path.iterdir()):  # config, quantize_config, index, tokenizer, ...
        if f.is_file() and f.suffix != ".safetensors" and f.name != ckpt.PEQA_JSON:
            shutil.copy2(f, out / f.name)
    return fingerprint


def dequantize_layer(base: BaseCheckpoint, layer: str, scales: torch.Tensor) -> torch.Tensor:
    """fp32 weight [N, K] of one layer with the given scales."""
    bits = base.spec.bits
    qweight, qzeros = base.read(f"{layer}.qweight"), base.read(f"{layer}.qzeros")
    if base.spec.checkpoint_format == "gptq":  # v1 stores z - 1
        qzeros = ckpt._fix_v1_zeros(qzeros, bits)
    words, n = qweight.shape
    lin = QuantLinear(words * 32 // bits, n, bits, base.spec.group_size, device="meta")
    lin.qweight, lin.qzeros, lin.g_idx = qweight, qzeros, base.read(f"{layer}.g_idx")
    lin.scales = nn.Parameter(scales.float(), requires_grad=False)
    return lin.dequantized_weight(torch.float32)


def _plan_hf(base: BaseCheckpoint, dtype: torch.dtype, limit: int) -> list[list[TensorSpec]]:
    """Output tensors in base order (a layer's weight where its qweight was), in shards."""
    layers = set(base.layers)
    specs: list[TensorSpec] = []
    for r in base.readers:
        for k in r.keys():
            stem, _, part = k.rpartition(".")
            if stem in layers and part == "qweight":
                words, n = r.spec(k).shape
                specs.append(TensorSpec(f"{stem}.weight", dtype, (n, words * 32 // base.spec.bits)))
            elif not (stem in layers and part in _QPARTS):
                s = r.spec(k)
                specs.append(
                    TensorSpec(k, dtype if s.dtype.is_floating_point else s.dtype, s.shape)
                )
    return plan_shards(([s] for s in specs), limit)


def write_hf(
    base: BaseCheckpoint,
    deltas: dict[str, torch.Tensor],
    out: Path,
    dtype_name: str,
    max_shard_bytes: int,
    advance: Advance,
) -> str:
    """A dequantized float model into folder ``out`` (all but peqa.json); returns the
    fingerprint the same merge written as gptq has."""
    dtype = getattr(torch, dtype_name)
    shards = _plan_hf(base, dtype, max_shard_bytes)
    names = [ckpt.shard_name(i, len(shards)) for i in range(len(shards))]
    digests = _Digests()
    for shard, fname in zip(shards, names, strict=True):
        writer = SafetensorsWriter(out / fname, shard, {"format": "pt"})
        for spec in shard:
            layer = spec.name.removesuffix(".weight")
            if spec.name.endswith(".weight") and f"{layer}.qweight" in base.where:
                s0 = base.read(f"{layer}.scales")
                s = merged_scales(s0, deltas.get(layer))
                digests.add(f"{layer}.scales", s0, s)
                for part in ("qweight", "qzeros", "g_idx"):
                    t = base.read(f"{layer}.{part}")
                    digests.add(f"{layer}.{part}", t, t)
                writer.write(spec.name, dequantize_layer(base, layer, s).to(dtype))
                advance(1 + len(_QPARTS))
            else:
                writer.write(spec.name, base.read(spec.name).to(spec.dtype))
                advance()
        writer.close()
    fingerprint = digests.verify(base)
    weight_map = {s.name: fname for shard, fname in zip(shards, names, strict=True) for s in shard}
    ckpt.write_index(out, weight_map, sum(s.nbytes for sh in shards for s in sh))
    config = json.loads((base.path / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = dtype_name
    ckpt.write_json(out / "config.json", config)
    ckpt.copy_side_files(base.path, out)
    return fingerprint
