"""peqa / GPTQ checkpoints: metadata, fingerprints, atomic output folders, and loading.

A peqa checkpoint is a GPTQ v2 checkpoint (see ``../shared/GPTQ_FORMAT.md``):
``config.json`` with ``quantization_config``, ``*.safetensors`` holding per quantized
linear ``qweight``/``qzeros``/``scales``/``g_idx``, plus ``peqa.json`` describing where it
came from. Loading builds the model on the ``meta`` device, swaps in
:class:`QuantLinear` modules wherever the files hold a ``qweight``, and assigns tensors
straight from mmap'd safetensors, so no float copy of a quantized weight ever exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from peqa_cli.errors import CheckpointError, InputError
from peqa_cli.quant import bitpack
from peqa_cli.quant.linear import QuantLinear
from peqa_cli.quant.primitives import SUPPORTED_BITS

PEQA_JSON = "peqa.json"
QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")
# Files copied from a source model folder into every derived checkpoint.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass
class QuantSpec:
    """The ``quantization_config`` facts peqa needs."""

    bits: int
    group_size: int
    sym: bool = False
    desc_act: bool = False
    checkpoint_format: str = "gptq_v2"

    def to_config(self) -> dict:
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "desc_act": self.desc_act,
            "checkpoint_format": self.checkpoint_format,
            "pack_dtype": "int32",
            "meta": {"quantizer": ["peqa"]},
        }


@dataclass
class QuantizedModel:
    """A loaded quantized model and what describes it."""

    model: nn.Module
    path: Path
    spec: QuantSpec
    fingerprint: str
    layers: list[str]
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- metadata and fingerprints


def tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(memoryview(data.view(torch.uint8).numpy())).hexdigest()


def combine_digests(digests: dict[str, str]) -> str:
    """One fingerprint from per-tensor digests, independent of the order they were made in."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}:{digests[name]}\n".encode())
    return h.hexdigest()


def fingerprint_state(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Fingerprint of a quantized model: its integers, zeros, groups and scales."""
    return combine_digests({n: tensor_digest(t) for n, t in tensors if n.endswith(QUANT_SUFFIXES)})


def read_quant_spec(path: Path) -> QuantSpec:
    """Parse and check ``quantization_config``; one clear line if this is no GPTQ checkpoint."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint folder (no config.json)")
    try:
        qc = json.loads(cfg_path.read_text()).get("quantization_config")
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({exc.msg})") from None
    if not qc or qc.get("quant_method") != "gptq":
        raise CheckpointError(
            f"{path} is not a peqa/GPTQ checkpoint (config.json has no gptq quantization_config); "
            "quantize it first with: peqa quantize MODEL --bits 4 --out DIR"
        )
    bits, gs = qc.get("bits"), qc.get("group_size", -1)
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{cfg_path}: bits {bits} unsupported (supported: {SUPPORTED_BITS})")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{cfg_path}: checkpoint_format '{fmt}' unsupported (gptq, gptq_v2)")
    return QuantSpec(bits, gs, bool(qc.get("sym", False)), bool(qc.get("desc_act", False)), fmt)


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    try:
        read_quant_spec(Path(path))
    except InputError:
        return False
    return True


def read_peqa_json(path: Path) -> dict:
    p = path / PEQA_JSON
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{p}: invalid JSON ({exc.msg})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_shareable(path: str | os.PathLike) -> None:
    """Give a file the umask's usual mode: mkstemp (and safetensors' writer) make 0600, yet
    checkpoints, deltas and results are meant to be read by the rest of a team."""
    os.chmod(path, 0o666 & ~_umask())


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    make_shareable(tmp)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


# ---------------------------------------------------------------- atomic output folders


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise InputError(f"output directory {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a directory")


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool):
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` in one rename.

    On any failure the temporary folder is removed and ``out`` is left as it was.
    """
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_index(out: Path, weight_map: dict[str, str], total_size: int) -> None:
    if len(set(weight_map.values())) > 1:
        write_json(
            out / "model.safetensors.index.json",
            {"metadata": {"total_size": total_size}, "weight_map": weight_map},
        )


# ---------------------------------------------------------------- loading


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _fix_v1_zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ v1 stores z - 1; readers add the 1 back modulo 2^b (v2 stores z as is)."""
    z = bitpack.unpack_cols(qzeros, bits).to(torch.int32)
    return bitpack.pack_cols((z + 1) & ((1 << bits) - 1), bits)


def default_dtype(device: torch.device) -> torch.dtype:
    """Float dtype for the non-quantized parts: fp32 on CPU (fp16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_quantized(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> QuantizedModel:
    """Load a peqa or GPTQ (v1/v2) checkpoint into a transformers model with QuantLinear layers."""
    from accelerate import init_empty_weights
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    spec = read_quant_spec(path)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors files")
    config = AutoConfig.from_pretrained(path)
    # transformers would route a gptq config to its own integration; peqa owns these layers.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    state: dict[str, torch.Tensor] = {}
    digests: dict[str, str] = {}
    try:
        for f in files:
            with safe_open(str(f), framework="pt", device=str(device)) as fh:
                for key in fh.keys():
                    state[key] = fh.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"corrupt or truncated checkpoint file in {path}: {exc}") from None

    layers = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    if not layers:
        raise CheckpointError(f"{path} holds no quantized layers (no *.qweight tensors)")
    for name in layers:
        qw, sc = state[f"{name}.qweight"], state[f"{name}.scales"]
        in_features = qw.shape[0] * 32 // spec.bits
        linear = QuantLinear(
            in_features,
            qw.shape[1],
            spec.bits,
            spec.group_size,
            bias=f"{name}.bias" in state,
            device="meta",
        )
        if tuple(sc.shape) != tuple(linear.scales.shape) and spec.group_size != -1:
            raise CheckpointError(
                f"{path}: {name}.scales has shape {list(sc.shape)}, "
                f"expected {list(linear.scales.shape)} for group size {spec.group_size}"
            )
        _set_module(model, name, linear)
    meta = read_peqa_json(path)
    # peqa.json records the fingerprint made while writing; other tools' checkpoints get one here.
    if not meta.get("fingerprint"):
        digests = {k: tensor_digest(t) for k, t in state.items() if k.endswith(QUANT_SUFFIXES)}
    for name in layers:
        if spec.checkpoint_format == "gptq":
            state[f"{name}.qzeros"] = _fix_v1_zeros(state[f"{name}.qzeros"], spec.bits)
        state[f"{name}.scales"] = state[f"{name}.scales"].float()
    for key, t in state.items():
        if t.is_floating_point() and not key.endswith(".scales"):
            state[key] = t.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise CheckpointError(f"{path}: tensors the model has no place for: {unexpected[:3]}")
    model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{path} is missing tensors: {left[:3]}")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    fingerprint = meta.get("fingerprint") or combine_digests(digests)
    return QuantizedModel(model, path, spec, fingerprint, layers, meta)


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Every QuantLinear in ``model`` by its module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
