"""Per-item scores and aggregates with lm-eval 0.4.x definitions (``api/task.py``,
``api/metrics.py``)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def argmax(values: Sequence[float]) -> int:
    """Index of the first maximum, like ``numpy.argmax`` (ties go to the earliest choice)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def mc_scores(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc: highest log-likelihood is gold. acc_norm: highest log-likelihood per character of
    the choice text (``len(choice)``, without the target delimiter, as lm-eval computes it)."""
    acc = float(argmax(lls) == gold)
    # A zero-length choice would divide by zero in lm-eval too; count it as one character.
    per_char = [ll / max(len(c), 1) for ll, c in zip(lls, choices, strict=True)]
    return {"acc": acc, "acc_norm": float(argmax(per_char) == gold)}


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's ``mean_stderr``: sample standard deviation / sqrt(n); None when n < 2."""
    n = len(values)
    if n < 2:
        return None
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)
