"""``peqa quantize``: stream a float model into a GPTQ v2 checkpoint, tensor by tensor.

Lifecycle: resolve the source -> plan every output tensor from the source headers ->
write shards at precomputed offsets while reading, quantizing and hashing one tensor at a
time -> write configs and ``peqa.json`` -> rename the temporary folder into place.
Peak memory is one source tensor (plus its quantized form), whatever the model's size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peqa_cli import __version__
from peqa_cli.errors import InputError
from peqa_cli.io import checkpoint as ckpt
from peqa_cli.io.sources import ModelSource, resolve_model, weight_files
from peqa_cli.io.stream import SafetensorsReader, SafetensorsWriter, TensorSpec, plan_shards
from peqa_cli.progress import progress_bar
from peqa_cli.quant import bitpack
from peqa_cli.quant.primitives import (
    SUPPORTED_BITS,
    group_index,
    num_groups,
    quantize_weight,
)
from peqa_cli.quant.replace import packable, select_linears

log = logging.getLogger(__name__)
DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class QuantSettings:
    bits: int = field(default=4, metadata={"choices": SUPPORTED_BITS, "help": "integer width"})
    group_size: int = field(
        default=-1, metadata={"help": "-1 = per output channel, else columns per group"}
    )
    include: list[str] = field(
        default_factory=list,
        metadata={"help": "globs of linears to quantize (default: all in decoder blocks)"},
    )
    exclude: list[str] = field(
        default_factory=list, metadata={"help": "globs of linears to keep in float"}
    )

    def validate(self, prefix: str = "quant") -> list[str]:
        if self.group_size == 0 or self.group_size < -1:
            return [
                f"{prefix}.group_size: {self.group_size} is not allowed (use -1 for per channel, or a positive size such as 64 or 128)"
            ]
        return []


@dataclass
class QuantizeRecipe:
    model: str = field(default="", metadata={"help": "local folder, .gguf, hub id or alias"})
    out: str = ""
    quant: QuantSettings = field(default_factory=QuantSettings)
    dtype: str = field(
        default="float16",
        metadata={"choices": tuple(DTYPE_NAMES), "help": "dtype of the tensors kept in float"},
    )
    device: str = field(
        default="auto",
        metadata={"help": "where the quantization math runs: auto, cpu, cuda, cuda:N"},
    )
    max_shard_size: str = field(
        default="2GB", metadata={"help": "largest output shard, e.g. 500MB, 2GB"}
    )
    overwrite: bool = False

    def validate(self) -> list[str]:
        problems = self.quant.validate()
        if not self.model:
            problems.append("model: required (a local folder, a .gguf file, a hub id or an alias)")
        if not self.out:
            problems.append("out: required (pass --out DIR)")
        try:
            parse_size(self.max_shard_size)
        except ValueError as exc:
            problems.append(f"max_shard_size: {exc}")
        return problems


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", str(text).upper())
    if not m:
        raise ValueError(f"'{text}' is not a size such as 500MB or 2GB")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"device: '{name}' is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device: '{name}' requested but no CUDA device is available")
    return dev


class _BinReader:
    """Reads a legacy ``pytorch_model*.bin`` through ``weights_only`` loading (never pickle code)."""

    def __init__(self, path: Path) -> None:
        try:
            self._sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise InputError(
                f"cannot read {path} with weights_only loading: {str(exc).splitlines()[0]}"
            ) from None
        self.path = path

    def keys(self) -> list[str]:
        return list(self._sd)

    def spec(self, name: str) -> TensorSpec:
        t = self._sd[name]
        return TensorSpec(name, t.dtype, tuple(t.shape))

    def read(self, name: str) -> torch.Tensor:
        return self._sd[name]


def _open(path: Path):
    return SafetensorsReader(path) if path.suffix == ".safetensors" else _BinReader(path)


def source_fingerprint(src: Path, files: list[Path]) -> str:
    """Identity of the source model from its config and weight headers (cheap, no full read)."""
    h = hashlib.sha256((src / "config.json").read_bytes())
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 16))
    return h.hexdigest()


def _skeleton(src: Path):
    """The model built on ``meta`` (no memory) to find the linears and their shapes."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return config, model


# Rows quantized per step: bounds the float temporaries (~12 bytes per element) to a few
# hundred MB whatever the layer's size. Rows are independent (scales are per row and group),
# and a multiple of 32 rows keeps every chunk's zero-points in whole int32 words.
CHUNK_ELEMENTS = 1 << 24


def quantize_linear(
    w: torch.Tensor, bits: int, group_size: int, device: torch.device
) -> tuple[list[torch.Tensor], float]:
    """One linear weight [N, K] -> ([qweight, qzeros, scales fp16, g_idx], relative error)."""
    n, k = w.shape
    rows = max(32, CHUNK_ELEMENTS // max(k, 1) // 32 * 32)
    qweight, qzeros, scales = [], [], []
    sq_err = sq_ref = 0.0
    for r0 in range(0, n, rows):
        chunk = w[r0 : r0 + rows].to(device=device, dtype=torch.float32)
        r = quantize_weight(chunk, bits, group_size)
        sq_err += r["sq_err"]
        sq_ref += float(torch.linalg.vector_norm(chunk)) ** 2
        qweight.append(bitpack.pack_weight(r["q"], bits).cpu())
        qzeros.append(bitpack.pack_cols(r["zeros"], bits).cpu())
        scales.append(r["scales"].to(torch.float16).cpu())
        del chunk, r
    g_idx = group_index(k, group_size)
    err = (sq_err / sq_ref) ** 0.5 if sq_ref > 0 else 0.0
    return [torch.cat(qweight, 1), torch.cat(qzeros, 1), torch.cat(scales, 1), g_idx], err


def run(cfg: QuantizeRecipe) -> dict:
    """Quantize ``cfg.model`` into ``cfg.out``; returns the summary printed by the CLI."""
    out = Path(cfg.out)
    ckpt.check_output_dir(out, cfg.overwrite)
    device = resolve_device(cfg.device)
    source: ModelSource = resolve_model(cfg.model)
    src = source.path
    bits, gs = cfg.quant.bits, cfg.quant.group_size
    float_dtype = DTYPE_NAMES[cfg.dtype]
    _, skeleton = _skeleton(src)
    targets = select_linears(skeleton, cfg.quant.include, cfg.quant.exclude)
    if not targets:
        raise InputError(
            f"no linear layers match quant.include={cfg.quant.include or 'default'} in {src}"
        )
    files = weight_files(src)
    readers = [_open(f) for f in files]  # opening validates every header before any output

    # Plan: every output tensor, in source order, before a single byte is written.
    plan: list[tuple[object, str, list[TensorSpec]]] = []  # (reader, source key, outputs)
    found, skipped = set(), {}
    for r in readers:
        for key in r.keys():
            spec = r.spec(key)
            module = key[: -len(".weight")] if key.endswith(".weight") else None
            if module in targets:
                n, k = spec.shape
                if not packable(k, n, bits):
                    skipped[module] = (
                        f"shape {n}x{k} does not pack into 32-bit words at {bits} bits"
                    )
                else:
                    found.add(module)
                    g = num_groups(k, gs)
                    plan.append(
                        (
                            r,
                            key,
                            [
                                TensorSpec(
                                    f"{module}.qweight",
                                    torch.int32,
                                    (bitpack.packed_rows(k, bits), n),
                                ),
                                TensorSpec(
                                    f"{module}.qzeros",
                                    torch.int32,
                                    (g, bitpack.packed_rows(n, bits)),
                                ),
                                TensorSpec(f"{module}.scales", torch.float16, (g, n)),
                                TensorSpec(f"{module}.g_idx", torch.int32, (k,)),
                            ],
                        )
                    )
                    continue
            dt = float_dtype if spec.dtype.is_floating_point else spec.dtype
            plan.append((r, key, [TensorSpec(key, dt, spec.shape)]))
    if not found:
        raise InputError(
            f"{src}: none of the {len(targets)} target linears has a weight in the files"
        )
    missing = sorted(set(targets) - found - set(skipped))
    if missing:
        raise InputError(
            f"{src}: weights missing for {len(missing)} linears, e.g. {missing[0]}.weight"
        )
    for module, why in skipped.items():
        log.warning("keeping %s in float: %s", module, why)

    # Shards: consecutive outputs up to max_shard_size each.
    limit = parse_size(cfg.max_shard_size)
    shards = plan_shards((outs for _, _, outs in plan), limit)
    weight_map = {
        s.name: ckpt.shard_name(i, len(shards)) for i, sh in enumerate(shards) for s in sh
    }

    t0 = time.perf_counter()
    errors: dict[str, float] = {}
    digests: dict[str, str] = {}
    total = sum(s.nbytes for sh in shards for s in sh)
    with ckpt.atomic_output_dir(out, cfg.overwrite) as tmp:
        writers = [
            SafetensorsWriter(tmp / ckpt.shard_name(i, len(shards)), sh, {"format": "pt"})
            for i, sh in enumerate(shards)
        ]
        by_name = {s.name: writers[i] for i, sh in enumerate(shards) for s in sh}
        with progress_bar("quantizing", total=len(plan)) as advance:
            for reader, key, outs in plan:
                t = reader.read(key)
                if len(outs) == 4:  # a target linear
                    module = outs[0].name[: -len(".qweight")]
                    tensors, errors[module] = quantize_linear(t, bits, gs, device)
                    for spec, x in zip(outs, tensors, strict=True):
                        digests[spec.name] = ckpt.tensor_digest(x)
                        by_name[spec.name].write(spec.name, x)
                    del tensors
                else:
                    spec = outs[0]
                    by_name[spec.name].write(spec.name, t.to(spec.dtype))
                del t
                advance()
        for w in writers:
            w.close()
        ckpt.write_index(tmp, weight_map, total)

        spec = ckpt.QuantSpec(bits=bits, group_size=gs)
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = spec.to_config()
        config["torch_dtype"] = cfg.dtype
        config["dtype"] = cfg.dtype
        ckpt.write_json(tmp / "config.json", config)
        ckpt.write_json(
            tmp / "quantize_config.json",
            {
                "bits": bits,
                "group_size": gs,
                "desc_act": False,
                "sym": False,
                "static_groups": False,
                "true_sequential": False,
                "damp_percent": 0.0,
                "checkpoint_format": "gptq_v2",
            },
        )
        side = ckpt.copy_side_files(src, tmp)
        fingerprint = ckpt.combine_digests(digests)
        meta = {
            "peqa_version": __version__,
            "kind": "quantized",
            "fingerprint": fingerprint,
            "source": {
                "spec": source.spec,
                "kind": source.kind,
                "path": str(src),
                "fingerprint": source_fingerprint(src, files),
            },
            "quantizer": {
                "method": "rtn-minmax",
                "bits": bits,
                "group_size": gs,
                "sym": False,
                "include": cfg.quant.include,
                "exclude": cfg.quant.exclude,
                "float_dtype": cfg.dtype,
                "scale_dtype": "float16",
            },
            "layers": {m: {"relative_error": round(e, 6)} for m, e in sorted(errors.items())},
            "skipped": skipped,
            "side_files": side,
        }
        ckpt.write_json(tmp / ckpt.PEQA_JSON, meta)
    seconds = time.perf_counter() - t0
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    in_bytes = sum(f.stat().st_size for f in files)
    mean_err = sum(errors.values()) / len(errors)
    log.info("wrote %s (%d quantized linears) in %.1fs", out, len(errors), seconds)
    return {
        "out": str(out),
        "source": source.spec,
        "bits": bits,
        "group_size": gs,
        "quantized_layers": len(errors),
        "skipped_layers": len(skipped),
        "mean_relative_error": round(mean_err, 6),
        "max_relative_error": round(max(errors.values()), 6),
        "input_bytes": in_bytes,
        "output_bytes": out_bytes,
        "seconds": round(seconds, 2),
        "fingerprint": fingerprint,
    }
