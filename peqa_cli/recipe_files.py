"""Shipped recipes (``recipes/*.yaml``): listing, lookup by name, copying to edit.

A recipe's header comment is its documentation: the first comment line describes it, and a
line containing ``peqa <command>`` names the subcommand that runs it.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from peqa_cli.errors import InputError

_COMMAND = re.compile(r"\bpeqa\s+(quantize|finetune|eval|merge)\b")


def recipes_dir() -> Path:
    env = os.environ.get("PEQA_RECIPES")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "recipes"


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    path: Path
    command: str
    description: str


def _info(path: Path) -> RecipeInfo:
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    text = [h for h in header if h]
    cmd = next((m.group(1) for h in header if (m := _COMMAND.search(h))), "?")
    return RecipeInfo(path.stem, path, cmd, text[0] if text else "")


def list_recipes() -> list[RecipeInfo]:
    d = recipes_dir()
    return [_info(p) for p in sorted(d.glob("*.yaml"))] if d.is_dir() else []


def find_recipe(name_or_path: str) -> Path | None:
    """A recipe path from a file path or a shipped recipe's name; None if neither."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml"):
        return p
    shipped = recipes_dir() / f"{name_or_path}.yaml"
    return shipped if shipped.is_file() else None


def copy_recipe(name: str, dest: str) -> Path:
    src = recipes_dir() / f"{name}.yaml"
    if not src.is_file():
        names = ", ".join(r.name for r in list_recipes())
        raise InputError(f"unknown recipe '{name}' (shipped recipes: {names})")
    out = Path(dest)
    if out.is_dir():
        out = out / src.name
    if out.exists():
        raise InputError(f"{out} already exists; choose another destination")
    shutil.copyfile(src, out)
    return out
