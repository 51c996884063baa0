"""``peqa merge``: fold a scale delta into its base checkpoint, as a checkpoint or a float export.

    format gptq  the base with only its scales replaced by s0 + Δs, rounded to the base's scale
                 dtype (fp16 for peqa); qweight, qzeros and g_idx byte-identical to the base's.
    format hf    a dequantized bf16/fp16/fp32 model for plain transformers.

Lifecycle: open the base (headers only) and the delta -> check everything (fingerprint,
layers, shapes, bits, group size, finiteness of the merged scales) -> only then create the
output folder -> stream tensor by tensor (:mod:`peqa_cli.io.export`) -> rename into place.

A GPTQ v1 base (``checkpoint_format: gptq``, zero-points stored as z - 1) is merged into a v1
checkpoint: rewriting its qzeros as v2 would change their bytes without changing one weight,
and "integers and zeros byte-identical to the base" would no longer be checkable.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peqa_cli import __version__
from peqa_cli.errors import CheckpointError, InputError
from peqa_cli.io import checkpoint as ckpt
from peqa_cli.io.delta import DELTA_FILE, ScaleDelta, check_against_shapes, load_delta
from peqa_cli.io.export import BaseCheckpoint, merged_scales, open_base, write_gptq, write_hf
from peqa_cli.progress import progress_bar
from peqa_cli.recipes.quantize import DTYPE_NAMES, parse_size

log = logging.getLogger(__name__)
FORMATS = ("gptq", "hf")


@dataclass
class MergeRecipe:
    base: str = field(default="", metadata={"help": "base peqa/GPTQ checkpoint folder"})
    delta: str = field(default="", metadata={"help": "scale delta folder (from peqa finetune)"})
    out: str = ""
    format: str = field(
        default="gptq",
        metadata={"choices": FORMATS, "help": "gptq: integer checkpoint; hf: dequantized float"},
    )
    dtype: str = field(
        default="float16",
        metadata={"choices": tuple(DTYPE_NAMES), "help": "hf export: dtype of every tensor"},
    )
    max_shard_size: str = field(
        default="2GB", metadata={"help": "hf export: largest output shard (gptq keeps the base's)"}
    )
    overwrite: bool = False

    def validate(self) -> list[str]:
        problems = []
        if not self.base:
            problems.append("base: required (a peqa/GPTQ checkpoint folder)")
        if not self.delta:
            problems.append("delta: required (a scale delta folder from peqa finetune)")
        if not self.out:
            problems.append("out: required (pass --out DIR)")
        try:
            parse_size(self.max_shard_size)
        except ValueError as exc:
            problems.append(f"max_shard_size: {exc}")
        return problems


def check_merge(base: BaseCheckpoint, delta: ScaleDelta) -> list[str]:
    """Every refusal before any output exists; returns warnings (scales that changed sign)."""
    shapes = {n: base.scale_spec(n).shape for n in base.layers}
    check_against_shapes(delta, shapes, base.fingerprint, base.spec.bits, base.spec.group_size)
    flipped: dict[str, int] = {}
    for name, d in delta.deltas.items():
        s0 = base.read(f"{name}.scales")
        if not torch.isfinite(s0).all():
            raise CheckpointError(f"{base.path}: base scales of {name} hold NaN or inf values")
        s = merged_scales(s0, d)
        bad = ~torch.isfinite(s)
        if bad.any():
            i = int(bad.flatten().nonzero()[0])
            raise CheckpointError(
                f"{delta.path}: merged scales of {name} overflow {_name(s0.dtype)} (|s| > "
                f"{torch.finfo(s0.dtype).max:g}) at {int(bad.sum())} positions, e.g. "
                f"s0={float(s0.flatten()[i]):g} + Δs={float(d.flatten()[i]):g}; nothing written"
            )
        changed = int((torch.sign(s.float()) != torch.sign(s0.float())).sum())
        if changed:
            flipped[name] = changed
    if not flipped:
        return []
    first = next(iter(flipped))
    return [
        f"{sum(flipped.values())} merged scales in {len(flipped)} layers changed sign or became 0 "
        f"(e.g. {flipped[first]} in {first}); the weights of those groups flip or vanish"
    ]


def _delta_bytes(delta: ScaleDelta) -> int:
    return (delta.path / DELTA_FILE).stat().st_size if delta.path else delta.nbytes


def _delta_summary(delta: ScaleDelta) -> dict:
    """What peqa.json records of the delta: where it came from and how it was made."""
    return {
        "path": str(delta.path),
        "base_fingerprint": delta.base_fingerprint,
        "layers": len(delta.deltas),
        "bytes": _delta_bytes(delta),
        "recipe": {k: v for k, v in delta.config.items() if k != "layers"},
    }


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _mb(n: int) -> str:
    """Human-readable size: 1.2 MB, 93.6 KB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def run(cfg: MergeRecipe) -> dict:
    """Merge ``cfg.delta`` into ``cfg.base`` at ``cfg.out``; returns the summary the CLI prints."""
    out, base_path, delta_path = Path(cfg.out), Path(cfg.base), Path(cfg.delta)
    ckpt.check_output_dir(out, cfg.overwrite)
    for other, what in ((base_path, "base checkpoint"), (delta_path, "delta")):
        if out.resolve() == other.resolve():
            raise InputError(f"--out {out} is the {what} itself; choose another output folder")
    base = open_base(base_path)
    delta = load_delta(delta_path)
    warnings = check_merge(base, delta)
    for w in warnings:
        log.warning("warning: %s", w)

    t0 = time.perf_counter()
    gptq = cfg.format == "gptq"
    with (
        ckpt.atomic_output_dir(out, cfg.overwrite) as tmp,
        progress_bar(f"merging ({cfg.format})", base.ntensors) as advance,
    ):
        if gptq:
            fingerprint = write_gptq(base, delta.deltas, tmp, advance)
        else:
            limit = parse_size(cfg.max_shard_size)
            fingerprint = write_hf(base, delta.deltas, tmp, cfg.dtype, limit, advance)
        meta = {
            "peqa_version": __version__,
            "kind": "merged" if gptq else "merged-hf-export",
            # gptq: this checkpoint's own fingerprint (a delta trained on it must carry it);
            # hf: the fingerprint the same merge has as gptq, tying the export to it.
            "fingerprint" if gptq else "merged_fingerprint": fingerprint,
            "base_fingerprint": base.fingerprint,
            "base": {
                "path": str(base.path),
                "fingerprint": base.fingerprint,
                "checkpoint_format": base.spec.checkpoint_format,
                "source": base.meta.get("source"),
                "quantizer": base.meta.get("quantizer"),
            },
            "delta": _delta_summary(delta),
            "format": cfg.format,
            "scale_dtype": _name(base.scale_spec(base.layers[0]).dtype),
            "warnings": warnings,
            **(
                {"checkpoint_format": base.spec.checkpoint_format} if gptq else {"dtype": cfg.dtype}
            ),
        }
        ckpt.write_json(tmp / ckpt.PEQA_JSON, meta)
    seconds = time.perf_counter() - t0
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    delta_bytes = _delta_bytes(delta)
    log.info(
        "wrote %s (%s, %d layers merged) in %.1fs", out, cfg.format, len(delta.deltas), seconds
    )
    return {
        "out": str(out),
        "format": cfg.format,
        **({"checkpoint_format": base.spec.checkpoint_format} if gptq else {"dtype": cfg.dtype}),
        "layers_merged": len(delta.deltas),
        "base_bytes": base.nbytes,
        "delta_bytes": delta_bytes,
        "output_bytes": out_bytes,
        "sizes": f"base {_mb(base.nbytes)}, delta {_mb(delta_bytes)}, {cfg.format} {_mb(out_bytes)}",
        "base_fingerprint": base.fingerprint,
        "fingerprint": fingerprint,
        "warnings": len(warnings),
        "seconds": round(seconds, 2),
    }
