"""Where training numbers go: ``metrics.jsonl``, optional trackers, and the terminal.

``OUT/metrics.jsonl`` gets one JSON object per event (``"kind": "train"`` every
``log_every`` steps, ``"kind": "eval"`` per validation). A resumed run first drops the lines
past the step it resumes from, so the file reads like one uninterrupted run. Trackers
(``report_to: [tensorboard]`` or ``[wandb]``) receive the same values through accelerate.
Only the main process writes; the terminal shows a rich progress bar on a TTY and plain log
lines otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

from peqa_cli import progress as progress_mod

log = logging.getLogger("peqa_cli.train")

METRICS_FILE = "metrics.jsonl"
TRACKER_PROJECT = "peqa"


def _clean(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def truncate_after(path: Path, step: int) -> None:
    """Drop records logged after ``step`` (they belong to the part of a run being redone)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    path.write_text("".join(k + "\n" for k in kept))


class MetricsLog(AbstractContextManager):
    """Append-only JSONL log plus trackers plus the progress display."""

    def __init__(self, accelerator, out: Path, total_steps: int, start_step: int) -> None:
        self.acc = accelerator
        self.main = accelerator.is_main_process
        self.path = out / METRICS_FILE
        self.total, self.start = total_steps, start_step
        self._stack = ExitStack()
        self._advance = lambda n=1, **_: None
        self._plain = not progress_mod.enabled()
        if self.main:
            truncate_after(self.path, start_step)

    def __enter__(self) -> MetricsLog:
        if self.main:
            self._advance = self._stack.enter_context(
                progress_mod.progress_bar("finetune", total=self.total)
            )
            self._advance(self.start)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def write(self, record: dict) -> None:
        if not self.main:
            return
        record = {k: _clean(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        values = {
            f"{record['kind']}/{k}": v
            for k, v in record.items()
            if isinstance(v, int | float) and k not in ("step",) and v is not None
        }
        if self.acc.trackers:
            self.acc.log(values, step=record["step"])

    def train(
        self, step: int, loss: float, lr: float, grad_norm: float | None, tps: float, **extra
    ) -> None:
        self.write(
            {
                "kind": "train",
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": round(tps, 1),
                "time": round(time.time(), 3),
                **extra,
            }
        )
        if self.main and self._plain:
            log.info("step %d/%d  loss %.4f  lr %.3g  %.0f tok/s", step, self.total, loss, lr, tps)

    def eval(self, step: int, loss: float) -> None:
        ppl = math.exp(loss) if loss < 50 else float("inf")
        self.write(
            {
                "kind": "eval",
                "step": step,
                "val_loss": loss,
                "val_ppl": ppl,
                "time": round(time.time(), 3),
            }
        )
        if self.main:
            log.info("step %d  validation loss %.4f  (ppl %.2f)", step, loss, ppl)

    def advance(self, loss: float, lr: float, tps: float) -> None:
        self._advance(1, info=f"loss {loss:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s")
