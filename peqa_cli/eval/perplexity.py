"""Perplexity in the GPTQ / PEQA protocol.

The corpus (WikiText-2 raw test rows joined with ``"\\n\\n"``, as GPTQ's ``datautils.py``) is
tokenized once with the tokenizer's default special tokens, cut into non-overlapping windows of
``seq_len`` tokens, and each window is scored on its own (no context carried over). The last,
partial window is dropped, exactly as GPTQ's ``nsamples = numel // seqlen``. Every window
predicts ``seq_len - 1`` tokens; ppl = exp(total nll / predicted tokens), which equals GPTQ's
``exp(sum(mean_loss_i * seqlen) / (nsamples * seqlen))`` because all windows are equally long.
"""

from __future__ import annotations

import hashlib
import math
import os
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from peqa_cli.errors import InputError
from peqa_cli.eval.tasks import check_limit, read_jsonl
from peqa_cli.progress import progress_bar

# Token ids of corpora per tokenizer, keyed by content hash: the same corpus is re-scored for
# every delta of a run, and tokenizing 1.3 M characters is the slow part of setting up.
_CORPUS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CORPUS_CACHE_MAX = 4


def load_corpus(path: str | os.PathLike) -> str:
    """A .txt file as is, or a .jsonl file's ``text`` fields joined with ``"\\n\\n"``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"text file not found: {path}")
    if path.suffix == ".jsonl":
        return "\n\n".join(str(doc["text"]) for _, doc in read_jsonl(path, ("text",)))
    if path.suffix == ".txt":
        return path.read_text(encoding="utf-8")
    raise InputError(f"{path}: perplexity reads .txt or .jsonl (field 'text') files")


def tokenize_corpus(tokenizer, text: str) -> torch.Tensor:
    """1-D token ids of a corpus, cached per tokenizer and text content."""
    key = hashlib.sha1(text.encode("utf-8")).hexdigest()
    cache = _CORPUS_CACHE.setdefault(tokenizer, {})
    if key not in cache:
        if len(cache) >= _CORPUS_CACHE_MAX:
            cache.clear()
        # verbose=False: the whole corpus is far longer than model_max_length on purpose.
        cache[key] = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    return cache[key]


@torch.inference_mode()
def window_nll(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Summed next-token nll over a [batch, seq_len] block of full windows."""
    logits = model(input_ids=windows, attention_mask=torch.ones_like(windows)).logits
    return float(
        F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), windows[:, 1:].flatten(), reduction="sum"
        )
    )


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    path: str | os.PathLike | None = None,
    *,
    text: str | None = None,
    seq_len: int = 2048,
    limit: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    console: Console | None = None,
) -> dict:
    """Perplexity of ``model`` on a corpus file (or ``text``); ``limit``: first N windows only.

    Returns ``{"ppl", "nll", "n_tokens", "n_windows", "seq_len"}`` where ``n_tokens`` counts the
    predicted tokens (``n_windows * (seq_len - 1)``).
    """
    check_limit(limit)
    if seq_len < 2:
        raise InputError(f"seq_len must be >= 2, got {seq_len}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if (path is None) == (text is None):
        raise ValueError("pass exactly one of path and text")
    ids = tokenize_corpus(tokenizer, load_corpus(path) if text is None else text)
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise InputError(
            f"{path or 'text'}: {ids.numel()} tokens, fewer than one window of seq_len={seq_len}"
        )
    if limit is not None:
        n_windows = min(n_windows, limit)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    total = 0.0
    with progress_bar(
        "perplexity", n_windows, show=progress, console=console, transient=True
    ) as advance:
        for start in range(0, n_windows, batch_size):
            block = windows[start : start + batch_size].to(device)
            total += window_nll(model, block)
            advance(block.shape[0])
    n_tokens = n_windows * (seq_len - 1)
    return {
        "ppl": math.exp(total / n_tokens),
        "nll": total / n_tokens,
        "n_tokens": n_tokens,
        "n_windows": n_windows,
        "seq_len": seq_len,
    }
