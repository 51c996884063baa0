"""``peqa eval``: one model, optionally several scale deltas evaluated in turn on one load."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from peqa_cli.errors import InputError
from peqa_cli.io.delta import apply_delta, check_compatible, load_delta, remove_delta
from peqa_cli.io.models import DTYPES, load_model
from peqa_cli.recipes.quantize import resolve_device

log = logging.getLogger(__name__)


@dataclass
class EvalRecipe:
    model: str = field(default="", metadata={"help": "float model or peqa/GPTQ checkpoint"})
    deltas: list[str] = field(
        default_factory=list, metadata={"help": "scale deltas, each evaluated in turn"}
    )
    tasks: list[str] = field(default_factory=lambda: ["wikitext"])
    data_dir: str = ""
    limit: int | None = None
    batch_size: int = 8
    seq_len: int = 2048
    device: str = "auto"
    dtype: str = field(default="auto", metadata={"choices": tuple(DTYPES)})
    json: str = ""
    base_too: bool = field(
        default=True, metadata={"help": "also evaluate the base when deltas are given"}
    )

    def validate(self) -> list[str]:
        problems = []
        if not self.model:
            problems.append("model: required")
        if self.limit is not None and self.limit <= 0:
            problems.append(f"limit: must be a positive number of items, got {self.limit}")
        if self.batch_size < 1:
            problems.append(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.seq_len < 2:
            problems.append(f"seq_len: must be >= 2, got {self.seq_len}")
        return problems


def run(cfg: EvalRecipe) -> list[dict]:
    from peqa_cli.eval.runner import evaluate
    from peqa_cli.eval.tasks import get_task

    for t in cfg.tasks:
        get_task(t)  # unknown task: fail before loading anything
    deltas = [
        load_delta(d) for d in cfg.deltas
    ]  # a missing/corrupt delta fails before the model loads
    lm = load_model(cfg.model, resolve_device(cfg.device), cfg.dtype)
    if deltas and lm.quantized is None:
        raise InputError(
            f"{cfg.model} is a float model; scale deltas apply only to peqa/GPTQ checkpoints"
        )
    for d in deltas:
        q = lm.quantized
        check_compatible(d, lm.model, q.fingerprint, q.spec.bits, q.spec.group_size)
    kw = dict(
        data_dir=cfg.data_dir or None,
        limit=cfg.limit,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        model_name=cfg.model,
    )
    rows: list[dict] = []
    if not deltas or cfg.base_too:
        rows += evaluate(lm.model, lm.tokenizer, cfg.tasks, **kw)
    for spec, d in zip(cfg.deltas, deltas, strict=True):
        apply_delta(lm.model, d)
        try:
            rows += evaluate(lm.model, lm.tokenizer, cfg.tasks, delta_name=spec, **kw)
        finally:
            remove_delta(lm.model)
    return rows
