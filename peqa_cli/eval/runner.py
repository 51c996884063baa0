"""Top-level evaluation API: tasks in, one result row per (task, metric) out.

``evaluate`` may be called once per scale delta on the same model object; it reads the weights
at call time and caches only tokenization (see ``lm.py`` and ``perplexity.py``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from peqa_cli.errors import InputError
from peqa_cli.eval.lm import CausalLMScorer
from peqa_cli.eval.metrics import mc_scores, mean, mean_stderr
from peqa_cli.eval.perplexity import perplexity
from peqa_cli.eval.tasks import (
    MCItem,
    TaskSpec,
    check_limit,
    get_task,
    load_items,
    mc_requests,
    read_docs,
    source_label,
    task_sources,
)
from peqa_cli.io.checkpoint import make_shareable
from peqa_cli.progress import stderr_console


def score_items(
    items: Sequence[MCItem],
    scorer: CausalLMScorer,
    target_delimiter: str = " ",
    desc: str = "loglikelihood",
) -> list[list[float]]:
    """Log-likelihood of every choice of every item (one scorer call for the whole task, so
    batching and prefix sharing see all requests at once)."""
    results = scorer.loglikelihood(mc_requests(list(items), target_delimiter), desc=desc)
    out, pos = [], 0
    for item in items:
        out.append([ll for ll, _ in results[pos : pos + len(item.choices)]])
        pos += len(item.choices)
    return out


def aggregate(
    items: Sequence[MCItem], lls: Sequence[Sequence[float]], metrics: Sequence[str]
) -> dict[str, tuple[float, float | None, int]]:
    """metric -> (mean, lm-eval mean_stderr, n) over items."""
    per_item = [mc_scores(ll, it.choices, it.gold) for it, ll in zip(items, lls, strict=True)]
    return {
        m: (mean(v), mean_stderr(v), len(v)) for m in metrics for v in [[s[m] for s in per_item]]
    }


@dataclass(frozen=True)
class _Run:
    """What one task evaluation needs besides its spec."""

    model: torch.nn.Module
    tokenizer: object
    scorer: CausalLMScorer
    sources: list
    data_dir: str | os.PathLike | None
    hub: bool
    limit: int | None
    seq_len: int
    progress: bool
    console: Console | None


Metric = tuple[str, float, float | None, int, dict]  # metric, value, stderr, count, settings


def _perplexity_metrics(spec: TaskSpec, run: _Run) -> list[Metric]:
    source = run.sources[0]
    kwargs = {"seq_len": run.seq_len, "limit": run.limit, "progress": run.progress}
    if isinstance(source, Path):
        res = perplexity(run.model, run.tokenizer, source, console=run.console, **kwargs)
    else:  # hub split: same "\n\n" join of the rows as for a local JSONL file
        text = "\n\n".join(str(doc["text"]) for _, doc in read_docs(source, spec.fields))
        res = perplexity(run.model, run.tokenizer, text=text, console=run.console, **kwargs)
    extra = {"seq_len": run.seq_len, "n_windows": res["n_windows"]}
    return [("ppl", res["ppl"], None, res["n_tokens"], extra)]


def _multiple_choice_metrics(spec: TaskSpec, run: _Run) -> list[Metric]:
    items = load_items(spec, run.data_dir, run.limit, hub=run.hub)
    lls = score_items(items, run.scorer, spec.target_delimiter, spec.name)
    extra = {"num_fewshot": spec.num_fewshot}
    return [
        (metric, value, stderr, count, extra)
        for metric, (value, stderr, count) in aggregate(items, lls, spec.metrics).items()
    ]


_KIND_RUNNERS = {"perplexity": _perplexity_metrics, "multiple_choice": _multiple_choice_metrics}


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str],
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    seq_len: int = 2048,
    model_name: str = "model",
    delta_name: str | None = None,
    hub: bool = False,
    progress: bool = True,
    console: Console | None = None,
) -> list[dict]:
    """Evaluate ``model`` on ``tasks``; rows ``{task, metric, value, stderr, count, model, delta,
    settings}``. acc/acc_norm are fractions in [0, 1] (as lm-eval reports them); wikitext gives
    ``ppl`` (count = predicted tokens). ``limit``: first N items per task (per subject for
    mmlu), or first N windows for wikitext. All task names and data files are checked before
    any model call, so a typo fails fast instead of after an hour of scoring. ``hub`` reads the
    tasks' Hugging Face datasets instead of local files (needs network).
    """
    if isinstance(tasks, str) or not tasks:
        raise InputError("tasks must be a non-empty list of task names")
    check_limit(limit)
    specs = [get_task(t) for t in tasks]
    sources = {spec.name: task_sources(spec, data_dir, hub) for spec in specs}
    scorer = CausalLMScorer(
        model, tokenizer, batch_size=batch_size, progress=progress, console=console
    )
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    try:
        for spec in specs:
            run = _Run(
                model, tokenizer, scorer, sources[spec.name], data_dir, hub, limit, seq_len,
                progress, console,
            )  # fmt: skip
            settings = {
                "limit": limit,
                "batch_size": batch_size,
                "data": [source_label(s) for s in sources[spec.name]],
            }
            for metric, value, stderr, count, extra in _KIND_RUNNERS[spec.kind](spec, run):
                rows.append(
                    {"task": spec.name, "metric": metric, "value": value, "stderr": stderr}
                    | {"count": count, "model": model_name, "delta": delta_name}
                    | {"settings": settings | extra}
                )
    finally:
        model.train(was_training)
    return rows


def render_table(rows: Sequence[dict], console: Console | None = None) -> None:
    """Print the rows as a rich table (stderr unless a console is given)."""
    table = Table(title="peqa eval")
    for col, justify in [
        ("task", "left"), ("metric", "left"), ("value", "right"), ("± stderr", "right"),
        ("n", "right"), ("model", "left"), ("delta", "left"),
    ]:  # fmt: skip
        table.add_column(col, justify=justify)
    for r in rows:
        se = r.get("stderr")
        table.add_row(
            r["task"],
            r["metric"],
            f"{r['value']:.4f}",
            "" if se is None else f"{se:.4f}",
            str(r["count"]),
            str(r["model"]),
            "" if r.get("delta") is None else str(r["delta"]),
        )
    (console or stderr_console).print(table)


def _finite(obj):
    """JSON has no NaN/inf: write them as null rather than emitting invalid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_json(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write rows as JSON atomically: a temp file in the same directory, then ``os.replace``,
    so a reader never sees half a file and an interrupted run leaves the old one intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    make_shareable(tmp)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(_finite(list(rows)), fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
