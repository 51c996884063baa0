"""Record formats: detection from fields, per-record validation, and the Alpaca template.

Validation turns raw records into normalized ones (only the fields a format uses, with the
right types) and names the record's line and field when something is missing, so a bad row
fails before any tokenization.
"""

from __future__ import annotations

from typing import Any

from peqa_cli.data.sources import Record
from peqa_cli.errors import InputError

# Verbatim from tatsu-lab/stanford_alpaca train.py PROMPT_DICT. The response (output + EOS)
# follows "### Response:" directly, with no separator, exactly as Alpaca trained.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt: the with-input variant when ``input`` is non-empty, else the other.

    Same test as Alpaca's ``example.get("input", "") != ""`` so prompts match its training.
    """
    if input != "":
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def detect_format(record: Record) -> str:
    """``alpaca``, ``chat`` or ``text`` from the fields of (the first) record."""
    keys = record.fields.keys()
    if "messages" in keys:
        return "chat"
    if "instruction" in keys or "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    found = ", ".join(sorted(map(str, keys))) or "none"
    raise InputError(
        f"{record.where}: cannot detect the data format from its fields ({found}); expected "
        "instruction/input/output (alpaca), messages (chat) or text; set data.format"
    )


def normalize_records(records: list[Record], fmt: str) -> list[Record]:
    """Records reduced to the fields of ``fmt``, type-checked; ``InputError`` on the first bad one."""
    check = {"alpaca": _alpaca, "chat": _chat, "text": _text}[fmt]
    return [Record(r.where, check(r)) for r in records]


def _require_str(r: Record, field: str, *, optional: bool = False) -> str:
    if field not in r.fields:
        if optional:
            return ""
        raise InputError(f"{r.where}: record lacks required field {field!r}")
    value = r.fields[field]
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{r.where}: field {field!r} must be a string, got {_type_name(value)}")
    return value


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _alpaca(r: Record) -> dict[str, Any]:
    return {
        "instruction": _require_str(r, "instruction"),
        # Optional: some Alpaca-style sets omit "input" or set it to null for no-input rows.
        "input": _require_str(r, "input", optional=True),
        "output": _require_str(r, "output"),
    }


def _text(r: Record) -> dict[str, Any]:
    return {"text": _require_str(r, "text")}


def _chat(r: Record) -> dict[str, Any]:
    if "messages" not in r.fields:
        raise InputError(f"{r.where}: record lacks required field 'messages'")
    messages = r.fields["messages"]
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{r.where}: field 'messages' must be a non-empty list of turns")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"{r.where}: messages[{i}] must be an object with role and content")
        for key in ("role", "content"):
            if key not in m:
                raise InputError(f"{r.where}: messages[{i}] lacks required field {key!r}")
            if not isinstance(m[key], str):
                raise InputError(
                    f"{r.where}: messages[{i}].{key} must be a string, got {_type_name(m[key])}"
                )
        out.append({"role": m["role"], "content": m["content"]})
    return {"messages": out}
