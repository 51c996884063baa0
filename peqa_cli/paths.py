"""Where peqa finds shared data and keeps its cache.

Data: ``$PEQA_DATA`` when set, else ``../shared/data`` beside the repository root (the
layout CI and the developers' machines share). Cache: ``$PEQA_CACHE``, else
``~/.cache/peqa`` (converted GGUF models live there).
"""

from __future__ import annotations

import os
from pathlib import Path

from peqa_cli.errors import InputError

_REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The directory holding the shared JSONL datasets (see ``../shared/data/README.md``)."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("PEQA_DATA")
    if env:
        return Path(env).expanduser()
    return _REPO_ROOT.parent / "shared" / "data"


def data_file(name: str, override: str | os.PathLike | None = None) -> Path:
    """Path of one shared data file; a missing file is a clear error, never a silent skip."""
    path = data_dir(override) / name
    if not path.is_file():
        raise InputError(
            f"data file not found: {path} (set PEQA_DATA or --data-dir to the folder holding {name})"
        )
    return path


def cache_dir() -> Path:
    """Root of peqa's on-disk cache, created on first use."""
    root = Path(os.environ.get("PEQA_CACHE") or Path.home() / ".cache" / "peqa").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
