"""Reading raw records from local files or the Hugging Face hub, with line-numbered errors.

Local JSON/JSONL files are parsed here, not by ``datasets.load_dataset("json")``: a precise
error needs the 1-based line of each record, which Arrow loading loses, so the file has to be
parsed line by line anyway; handing it to ``datasets`` afterwards would only add a second
parse, a copy in ``~/.cache/huggingface`` (shared by concurrent runs, keyed on mtime) and
Arrow's schema unification, which rejects files whose *unused* fields change type between
rows. Reading the file on every call also means an edited file is always re-read.
Hub dataset ids do go through ``datasets.load_dataset``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peqa_cli.errors import InputError

log = logging.getLogger(__name__)

JSON_SUFFIXES = (".json", ".jsonl")
TEXT_SUFFIXES = (".txt", ".text")
# "owner/name" or "name", optionally ":config" (e.g. "Salesforce/wikitext:wikitext-2-raw-v1").
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
_HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Record:
    """One raw record and where it came from ("train.jsonl line 7"), for error messages."""

    where: str
    fields: dict[str, Any]


def is_local_text(path: str) -> bool:
    """True for plain-text sources (.txt), whose only possible format is ``text``."""
    return Path(path).suffix.lower() in TEXT_SUFFIXES


def load_records(path: str, *, split: str = "train", limit: int = 0) -> list[Record]:
    """All records of a local .json/.jsonl/.txt file or a hub dataset id (first ``limit`` if > 0).

    A .txt file is one record ``{"text": <whole file>}``. Raises ``InputError`` for a missing
    or empty file, invalid JSON (naming the line) or an unreachable hub.
    """
    if not path or not path.strip():
        raise InputError("no data path given; set data.path to a .json/.jsonl/.txt file")
    p = Path(path).expanduser()
    if p.exists():
        return _load_local(p, limit)
    if _looks_like_hub_id(path):
        return load_hub_records(path, split=split, limit=limit)
    raise InputError(f"data file not found: {path}")


def _looks_like_hub_id(path: str) -> bool:
    if path.startswith((".", "/", "~")) or "\\" in path:
        return False
    if Path(path).suffix.lower() in JSON_SUFFIXES + TEXT_SUFFIXES:
        return False
    return bool(_HUB_ID.match(path))


def _load_local(p: Path, limit: int) -> list[Record]:
    if p.is_dir():
        raise InputError(f"data path is a directory, expected a .json/.jsonl/.txt file: {p}")
    suffix = p.suffix.lower()
    if suffix not in JSON_SUFFIXES + TEXT_SUFFIXES:
        raise InputError(
            f"unsupported data file type {suffix or '(none)'!r}: {p} (use .json, .jsonl or .txt)"
        )
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise InputError(f"{p.name} line {line}: not valid UTF-8") from None
    if not text.strip():
        raise InputError(f"data file is empty: {p}")
    if suffix in TEXT_SUFFIXES:
        return [Record(where=p.name, fields={"text": text})]
    if text.lstrip().startswith("["):
        records = _parse_json_array(text, p.name)
    else:
        records = _parse_jsonl(text, p.name, limit)
    if not records:
        raise InputError(f"data file has no records: {p}")
    return records[:limit] if limit else records


def _parse_jsonl(text: str, name: str, limit: int) -> list[Record]:
    records: list[Record] = []
    # Split on "\n" only: str.splitlines() would also split on U+2028 etc., which JSON
    # strings may legally contain unescaped, and would then shift the reported line numbers.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) are not records
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if not records and _is_single_object(text):
                raise InputError(
                    f"{name}: holds a single JSON object; expected JSON Lines "
                    "(one record per line) or a JSON array of records"
                ) from None
            raise InputError(f"{name} line {lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise InputError(
                f"{name} line {lineno}: expected a JSON object, got {type(obj).__name__}"
            )
        records.append(Record(where=f"{name} line {lineno}", fields=obj))
        if limit and len(records) >= limit:
            break
    return records


def _is_single_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _parse_json_array(text: str, name: str) -> list[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{name} line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise InputError(f"{name}: expected a JSON array of records")
    # Second pass with raw_decode to learn where each element starts, so field errors can
    # name a line like they do for JSONL (the structure is known to be valid by now).
    decoder = json.JSONDecoder()
    records: list[Record] = []
    idx = text.index("[") + 1
    line, counted = 1, 0
    for obj in data:
        idx = _skip_ws(text, idx)
        line += text.count("\n", counted, idx)
        counted = idx
        _, idx = decoder.raw_decode(text, idx)
        idx = _skip_ws(text, idx)
        if idx < len(text) and text[idx] == ",":
            idx += 1
        if not isinstance(obj, dict):
            raise InputError(
                f"{name} line {line}: expected a JSON object, got {type(obj).__name__}"
            )
        records.append(Record(where=f"{name} line {line}", fields=obj))
    return records


def _skip_ws(text: str, idx: int) -> int:
    while idx < len(text) and text[idx] in " \t\r\n":
        idx += 1
    return idx


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when the user asked for offline mode through the usual HF variables."""
    return any(
        _env_true(v) for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_reachable(timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub answers within ``timeout`` seconds.

    ``load_dataset`` retries for ~25 s on a machine without network before failing, so a quick
    probe first keeps an offline run from hanging. urllib honours the *_PROXY variables.
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # an HTTP error status still means the hub answered
    except (OSError, ValueError):
        return False
    return True


def load_hub_records(name: str, *, split: str, limit: int = 0) -> list[Record]:
    """Rows of a hub dataset ``name`` (``"id"`` or ``"id:config"``) as records."""
    ds_id, _, config = name.partition(":")
    local_hint = "pass a local .json/.jsonl/.txt path as data.path instead"
    if hub_offline():
        import datasets

        # datasets reads HF_HUB_OFFLINE at import; if it was set later, load_dataset would
        # still go online (and hang retrying), so only trust its cache when it knows.
        if not datasets.config.HF_HUB_OFFLINE:
            raise InputError(
                f"dataset {name!r}: the Hugging Face hub is unreachable (offline mode); {local_hint}"
            )
    elif not hub_reachable():
        raise InputError(
            f"dataset {name!r}: the Hugging Face hub is unreachable (no network); {local_hint}"
        )
    import datasets

    log.info("loading dataset %s (split %s) with datasets.load_dataset", name, split)
    try:
        ds = datasets.load_dataset(ds_id, config or None, split=split)
    except Exception as e:  # datasets raises many types; the user needs one line either way
        if hub_offline():
            raise InputError(
                f"dataset {name!r} is not in the local cache and the Hugging Face hub is "
                f"unreachable (offline mode); {local_hint}"
            ) from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"dataset {name!r} split {split!r} could not be loaded: {first}") from e
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    records = [Record(where=f"{name} row {i + 1}", fields=dict(row)) for i, row in enumerate(ds)]
    if not records:
        raise InputError(f"dataset {name!r} split {split!r} is empty")
    return records
