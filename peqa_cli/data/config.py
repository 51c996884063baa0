"""Typed configuration of the fine-tuning data pipeline.

A plain dataclass so the recipe loader can build it from YAML and report every problem at
once: ``validate`` returns the problems as strings instead of raising on the first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FORMATS = ("auto", "alpaca", "chat", "text")

# ``text_join`` value meaning "separate rows with the tokenizer's EOS token id" instead of a
# literal string. It is inserted at the id level so it is always the real special token.
EOS_JOIN = "eos"


def _help(default, text: str):
    # Same metadata convention as the other recipes ("help" is shown by --help / print-config).
    # No "choices" on format: validate() reports it, and the loader would report it twice.
    return field(default=default, metadata={"help": text})


@dataclass
class DataConfig:
    path: str = _help("", "local .json/.jsonl/.txt file or HF dataset id ('name' or 'name:config')")
    format: str = _help(
        "auto", "auto | alpaca | chat | text (auto: from the first record's fields)"
    )
    split: str = _help("train", "split to load for HF dataset ids")
    val_path: str = _help("", "separate validation file (same format as path)")
    val_size: float = _help(
        0.0, "validation carved from the training data: fraction (<1) or count (>=1); 0 = none"
    )
    max_length: int = _help(512, "tokens per example; longer ones are truncated")
    train_on_inputs: bool = _help(False, "also train on prompt tokens (default: response only)")
    packing: bool = _help(False, "pack short examples into max_length rows")
    text_join: str = _help("\n\n", "format=text: string joining rows, or 'eos' for the EOS token")
    limit: int = _help(0, "use only the first N records (0 = all)")
    seed: int = _help(0, "seed of the validation carve")

    def validate(self, *, require_path: bool = False, prefix: str = "data.") -> list[str]:
        """Every problem with the values, as one-line strings (empty list = valid).

        ``require_path`` is for commands that train: quantize-only recipes may leave the data
        section empty, so an empty ``path`` is not a problem by default.
        """
        p = prefix
        problems: list[str] = []
        if require_path and not self.path.strip():
            problems.append(f"{p}path is empty; give a .json/.jsonl/.txt file or a dataset id")
        if self.format not in FORMATS:
            problems.append(f"{p}format must be one of {', '.join(FORMATS)} (got {self.format!r})")
        if not self.split.strip():
            problems.append(f"{p}split must not be empty")
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool):
            problems.append(f"{p}max_length must be an integer (got {self.max_length!r})")
        elif self.max_length <= 0:
            problems.append(f"{p}max_length must be > 0 (got {self.max_length})")
        problems.extend(_validate_val_size(self.val_size, p))
        if self.val_path and self.val_size:
            problems.append(
                f"{p}val_path and val_size are both set; use a separate file or a carved split, not both"
            )
        if not isinstance(self.limit, int) or isinstance(self.limit, bool) or self.limit < 0:
            problems.append(
                f"{p}limit must be an integer >= 0 (0 = all records; got {self.limit!r})"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            problems.append(f"{p}seed must be an integer (got {self.seed!r})")
        if not isinstance(self.text_join, str):
            problems.append(f"{p}text_join must be a string (got {self.text_join!r})")
        for name in ("train_on_inputs", "packing"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{p}{name} must be true or false (got {getattr(self, name)!r})")
        return problems


def _validate_val_size(val_size: object, p: str) -> list[str]:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        return [f"{p}val_size must be a number (got {val_size!r})"]
    if math.isnan(val_size) or val_size < 0:
        return [f"{p}val_size must be >= 0 (got {val_size})"]
    if val_size >= 1 and val_size != int(val_size):
        return [
            f"{p}val_size must be a fraction below 1 or a whole count of examples (got {val_size})"
        ]
    return []


def val_count(val_size: float, n_examples: int) -> int:
    """How many of ``n_examples`` a ``val_size`` carves out (0 when val_size is 0).

    A fraction rounds to the nearest count but never to 0, so ``val_size: 0.001`` on a small
    set still yields a validation example instead of silently none.
    """
    if not val_size:
        return 0
    if val_size < 1:
        return max(1, round(val_size * n_examples))
    return int(val_size)
