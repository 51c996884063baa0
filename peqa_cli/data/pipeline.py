"""``build_datasets``: config -> tokenized train/validation datasets and their statistics.

Order of operations: read records (first ``limit``) -> detect/validate format -> tokenize and
mask -> truncate -> drop examples with no trainable token -> carve validation (when no
``val_path``) -> pack. The validation carve happens on examples before packing, so a
validation example never shares a packed row with training data.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch

from peqa_cli.data.config import DataConfig, val_count
from peqa_cli.data.encode import (
    IGNORE_INDEX,
    Example,
    encode_alpaca,
    encode_chat,
    encode_text,
    pack,
)
from peqa_cli.data.formats import detect_format, normalize_records
from peqa_cli.data.loader import TokenizedDataset
from peqa_cli.data.sources import Record, is_local_text, load_records
from peqa_cli.errors import ConfigError, InputError

log = logging.getLogger(__name__)

# transformers sets model_max_length to ~1e30 when a tokenizer does not know its limit.
_UNKNOWN_MAX = 10**9


@dataclass
class DataStats:
    format: str = ""
    records: int = 0  # training records read (after limit)
    examples: int = 0  # training examples (before packing; after the validation carve)
    truncated: int = 0  # examples (train + val) cut to max_length
    dropped: int = 0  # examples with no trainable token left (e.g. prompt >= max_length)
    tokens: int = 0  # tokens in the training sequences
    trainable_tokens: int = 0  # training tokens with a label (not -100)
    sequences: int = 0  # training rows (packed rows when packing, else == examples)
    tail_tokens_dropped: int = 0  # format=text: tokens after the last full window
    val_records: int = 0  # records of val_path (0 when carved)
    val_examples: int = 0
    val_sequences: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_max_length(max_length: int, tokenizer: Any, model_max_length: int | None) -> None:
    """``InputError`` if ``max_length`` exceeds the model's context (from the config, else the tokenizer)."""
    if model_max_length is not None:
        limit, source = int(model_max_length), "the model's maximum sequence length"
    else:
        tok_max = getattr(tokenizer, "model_max_length", None)
        if not tok_max or tok_max >= _UNKNOWN_MAX:
            return
        limit, source = int(tok_max), "the tokenizer's model_max_length"
    if max_length > limit:
        raise InputError(
            f"data.max_length {max_length} exceeds {source} {limit}; set max_length <= {limit}"
        )


def _resolve_format(cfg_format: str, path: str, records: list[Record]) -> str:
    if cfg_format != "auto":
        return cfg_format
    return "text" if is_local_text(path) else detect_format(records[0])


def _encode(
    path: str, cfg: DataConfig, tokenizer: Any, fmt: str, limit: int
) -> tuple[str, int, list[Example], int, int]:
    """(format, records, examples, truncated, tail tokens dropped) of one source."""
    records = load_records(path, split=cfg.split, limit=limit)
    fmt = _resolve_format(fmt, path, records)
    records = normalize_records(records, fmt)
    kw = {"max_length": cfg.max_length}
    if fmt == "text":
        texts = [r.fields["text"] for r in records]
        examples, tail = encode_text(texts, tokenizer, join=cfg.text_join, **kw)
        return fmt, len(records), examples, 0, tail
    if fmt == "alpaca":
        rows = [r.fields for r in records]
        examples, cut = encode_alpaca(rows, tokenizer, train_on_inputs=cfg.train_on_inputs, **kw)
    else:
        examples, cut = encode_chat(records, tokenizer, train_on_inputs=cfg.train_on_inputs, **kw)
    return fmt, len(records), examples, cut, 0


def _drop_untrainable(examples: list[Example]) -> tuple[list[Example], int]:
    # An example whose labels are all -100 adds nothing but, alone in a batch, a 0/0 = NaN loss.
    kept = [e for e in examples if any(t != IGNORE_INDEX for t in e["labels"][1:])]
    return kept, len(examples) - len(kept)


def split_examples(
    examples: list[Example], val_size: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, val): ``val_count`` examples chosen by a seeded permutation, both in original order."""
    k = val_count(val_size, len(examples))
    if k == 0:
        return examples, []
    if k >= len(examples):
        raise InputError(
            f"data.val_size {val_size} takes {k} of {len(examples)} examples, "
            "leaving none for training"
        )
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx = set(perm[:k])
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    return train, val


def build_datasets(
    cfg: DataConfig, tokenizer: Any, *, model_max_length: int | None
) -> tuple[TokenizedDataset, TokenizedDataset | None, DataStats]:
    """Tokenized training and validation (None when neither val_path nor val_size) datasets.

    ``model_max_length`` is the model's context length (``config.max_position_embeddings``);
    None falls back to the tokenizer's ``model_max_length`` when that is known.
    Raises ``ConfigError`` for invalid settings and ``InputError`` for unusable data.
    """
    problems = cfg.validate(require_path=True)
    if problems:
        raise ConfigError(problems)
    resolve_max_length(cfg.max_length, tokenizer, model_max_length)
    stats = DataStats()
    fmt, stats.records, examples, stats.truncated, stats.tail_tokens_dropped = _encode(
        cfg.path, cfg, tokenizer, cfg.format, cfg.limit
    )
    stats.format = fmt
    examples, stats.dropped = _drop_untrainable(examples)

    if cfg.val_path:
        # Same format as training: a val file in another format is almost surely a mistake.
        vfmt, stats.val_records, val, vcut, _ = _encode(cfg.val_path, cfg, tokenizer, cfg.format, 0)
        if vfmt != fmt:
            raise InputError(
                f"data.val_path {cfg.val_path} holds {vfmt} data but data.path holds {fmt} data"
            )
        stats.truncated += vcut
        val, vdropped = _drop_untrainable(val)
        stats.dropped += vdropped
    else:
        examples, val = split_examples(examples, cfg.val_size, cfg.seed)
    if not examples:
        raise InputError(
            f"no training examples left from {cfg.path}: all {stats.dropped} have no response "
            f"tokens within max_length {cfg.max_length} (raise max_length)"
        )
    stats.examples, stats.val_examples = len(examples), len(val)

    # Text windows are already exactly max_length long; packing them would change nothing.
    if cfg.packing and fmt != "text":
        examples, val = pack(examples, cfg.max_length), pack(val, cfg.max_length)
    train_ds = TokenizedDataset(examples)
    val_ds = TokenizedDataset(val) if val else None
    stats.sequences, stats.val_sequences = len(train_ds), len(val)
    stats.tokens, stats.trainable_tokens = train_ds.num_tokens, train_ds.num_trainable_tokens
    _log_stats(cfg, stats)
    return train_ds, val_ds, stats


def _log_stats(cfg: DataConfig, s: DataStats) -> None:
    log.info(
        "data: %s format, %d records -> %d train examples (%d sequences, %d tokens, %d trained), "
        "%d validation",
        s.format,
        s.records,
        s.examples,
        s.sequences,
        s.tokens,
        s.trainable_tokens,
        s.val_examples,
    )
    if s.truncated:
        log.warning("data: %d examples truncated to max_length %d", s.truncated, cfg.max_length)
    if s.dropped:
        log.warning(
            "data: %d examples dropped (no response tokens within max_length %d)",
            s.dropped,
            cfg.max_length,
        )
    if s.tail_tokens_dropped:
        log.info("data: last %d tokens (under one window) not used", s.tail_tokens_dropped)
