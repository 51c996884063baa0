"""Load whatever model a command names: a peqa/GPTQ checkpoint or a float model.

spec                               | loaded as
-----------------------------------+------------------------------------------------
folder with gptq quantization_config| QuantLinear model (``load_quantized``)
float folder, .gguf, alias, hub id | plain transformers model (``resolve_model``)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peqa_cli.errors import InputError
from peqa_cli.io.checkpoint import (
    QuantizedModel,
    default_dtype,
    is_quantized_checkpoint,
    load_quantized,
)
from peqa_cli.io.sources import resolve_model
from peqa_cli.quant.linear import set_weight_cache

log = logging.getLogger(__name__)

DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str
    path: Path
    quantized: QuantizedModel | None = None  # set for peqa/GPTQ checkpoints


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # missing or unreadable tokenizer files
        raise InputError(
            f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}"
        ) from None


def load_model(
    spec: str,
    device: str | torch.device = "cpu",
    dtype: str = "auto",
    weight_cache: bool | None = None,
) -> LoadedModel:
    """Load ``spec`` for inference on ``device``.

    ``weight_cache`` (quantized models): keep each layer's dequantized weight between
    forwards. ``None`` = on for CPU, where unpacking per forward dominates decoding; off on
    CUDA, where it is cheap and memory is the point of quantizing.
    """
    device = torch.device(device)
    if dtype not in DTYPES:
        raise InputError(f"dtype '{dtype}' is not allowed (choose from {', '.join(DTYPES)})")
    torch_dtype = DTYPES[dtype] or default_dtype(device)
    path = Path(spec).expanduser()
    if path.is_dir() and is_quantized_checkpoint(path):
        qm = load_quantized(path, device=device, dtype=torch_dtype)
        set_weight_cache(qm.model, device.type == "cpu" if weight_cache is None else weight_cache)
        return LoadedModel(qm.model, load_tokenizer(path), spec, path, qm)
    source = resolve_model(spec)
    from transformers import AutoModelForCausalLM

    log.info("loading float model %s", source.path)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype).to(device).eval()
    return LoadedModel(model, load_tokenizer(source.path), spec, source.path, None)
