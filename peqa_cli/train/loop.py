"""The PEQA training loop on accelerate: scales only, exact resume, any number of processes.

Batches: ``batch_size`` rows per micro-batch and process; one optimizer step takes
``grad_accum`` micro-batches on each of ``P`` processes, i.e. the next
``batch_size * grad_accum * P`` rows of the epoch's (seeded) order, micro-batch ``i`` of the
step going to process ``i % P``. Every factorization of the same global batch therefore sees
the same rows per step, and with the global token normalization of
:mod:`peqa_cli.train.optim` it takes the same step. The epoch's last rows that cannot fill a
whole step are skipped (a different few each epoch, as the order is reshuffled), so every
step has the full global batch and no process waits for data.

Data position = (epoch, optimizer steps done in the epoch); the epoch order is a pure
function of (seed, epoch), so resuming skips exactly the consumed micro-batches.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from peqa_cli.data import TokenizedDataset, make_dataloader
from peqa_cli.errors import CheckpointError, InputError, RunError
from peqa_cli.train import optim
from peqa_cli.train.metrics import MetricsLog
from peqa_cli.train.signals import StopRequest, TrainingInterrupted, signal_name
from peqa_cli.train.state import (
    TrainerState,
    install_scale_hooks,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)


@dataclass
class LoopSettings:
    """The subset of the recipe's ``train:`` section the loop reads (see recipes/finetune.py)."""

    lr: float
    scheduler: str
    warmup_steps: int
    total_steps: int
    steps_per_epoch: int
    batch_size: int
    grad_accum: int
    max_grad_norm: float
    weight_decay: float
    adam_betas: tuple[float, float]
    adam_eps: float
    gradient_checkpointing: bool
    seed: int
    shuffle: bool
    eval_every: int
    eval_batches: int
    eval_batch_size: int
    eval_at_start: bool
    save_every: int
    keep_last: int
    log_every: int
    isolate_packed: bool = False


@dataclass
class TrainResult:
    state: TrainerState
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # final, on CPU (main only)
    resumed_from: Path | None = None
    tokens_per_s: float = 0.0


def steps_per_epoch(n_sequences: int, batch_size: int, grad_accum: int, world: int) -> int:
    """Optimizer steps in one epoch; a clear error when the data cannot fill a single one."""
    rows = batch_size * grad_accum * world
    if n_sequences < rows:
        raise InputError(
            f"{n_sequences} training sequences are fewer than one optimizer step takes "
            f"(train.batch_size {batch_size} x train.grad_accum {grad_accum} x {world} "
            "processes); use more data or smaller batches"
        )
    return n_sequences // rows


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (transformers >= 5 renamed the method)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _inputs(batch: dict, device: torch.device) -> tuple[dict, torch.Tensor, int]:
    labels = batch["labels"].to(device)
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    mask = batch.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    return inputs, labels, tokens


class Trainer:
    """One run: ``train()`` returns when ``total_steps`` are done; raises on NaN or a signal."""

    def __init__(
        self,
        accelerator,
        model: nn.Module,
        tokenizer,
        train_ds: TokenizedDataset,
        val_ds: TokenizedDataset | None,
        settings: LoopSettings,
        out: Path,
        base_fingerprint: str,
        on_step: Callable[[TrainerState], None] | None = None,
    ) -> None:
        self.acc, self.tok, self.s, self.out = accelerator, tokenizer, settings, out
        self.train_ds, self.val_ds = train_ds, val_ds
        self.on_step = on_step
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.state = TrainerState(world_size=self.world, base_fingerprint=base_fingerprint)
        self._saved_step = -1

        self.scales = optim.trainable_scales(model)
        if settings.gradient_checkpointing:
            # Non-reentrant checkpointing recomputes ScaleMatmul's saved input in backward
            # and needs no input that requires grad (the reentrant variant would).
            enable_checkpointing(model)
        model.config.use_cache = False
        self.params = list(self.scales.values())
        optimizer = optim.make_optimizer(
            self.params, settings.lr, settings.weight_decay, settings.adam_betas, settings.adam_eps
        )
        # Not passed to prepare(): accelerate would step it once per process each step.
        self.scheduler = optim.make_scheduler(
            optimizer, settings.scheduler, settings.warmup_steps, settings.total_steps
        )
        with warnings.catch_warnings():
            # torch >= 2.13 deprecates broadcast_buffers, yet its advice is to keep
            # broadcast_buffers=False until buffers can skip the initial sync too.
            warnings.filterwarnings(
                "ignore", message=".*broadcast_buffers.*", category=FutureWarning
            )
            self.model, self.optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(self.scheduler)
        install_scale_hooks(accelerator, self.scales)

    # ------------------------------------------------------------------ pieces

    def resume(self) -> Path | None:
        folder = latest_checkpoint(self.out)
        if folder is None:
            return None
        saved = read_state(folder)  # checked before anything is loaded into the model
        if saved.base_fingerprint != self.state.base_fingerprint:
            raise CheckpointError(
                f"{folder} was trained on another base (fingerprint "
                f"{saved.base_fingerprint[:12]}... != {self.state.base_fingerprint[:12]}...); "
                "use a new --out or --overwrite"
            )
        state = load_checkpoint(self.acc, folder)
        state.world_size = self.world
        self.state = state
        self._saved_step = state.step
        return folder

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean loss over the validation set (or its first ``eval_batches``)."""
        assert self.val_ds is not None
        self.model.eval()
        bs = self.s.eval_batch_size or self.s.batch_size
        loader = make_dataloader(
            self.val_ds, self.tok, bs, shuffle=False, isolate_packed=self.s.isolate_packed
        )
        sums = torch.zeros(2, dtype=torch.float64, device=self.acc.device)
        for i, batch in enumerate(loader):
            if self.s.eval_batches and i >= self.s.eval_batches:
                break
            if i % self.world != self.rank:
                continue
            inputs, labels, _ = _inputs(batch, self.acc.device)
            logits = self.model(**inputs, use_cache=False).logits
            sums[0] += optim.token_loss_sum(logits, labels).double()
            sums[1] += optim.count_targets(labels)
        sums = self.acc.reduce(sums, "sum")
        self.model.train()
        return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")

    def _step(self, group: list[dict]) -> tuple[float, float | None, int]:
        """One optimizer step on a group of micro-batches: (loss, grad norm, tokens)."""
        n_targets = sum(optim.count_targets(b["labels"]) for b in group)
        mine = group[self.rank :: self.world]
        local = torch.zeros((), dtype=torch.float64, device=self.acc.device)
        tokens = 0
        for i, batch in enumerate(mine):
            inputs, labels, _ = _inputs(batch, self.acc.device)
            sync = i == len(mine) - 1  # all-reduce gradients only on the last micro-batch
            ctx = contextlib.nullcontext() if sync else self.acc.no_sync(self.model)
            with ctx:
                logits = self.model(**inputs, use_cache=False).logits
                loss_sum = optim.token_loss_sum(logits, labels)
                # DDP averages gradients over processes: scale up so the mean is the global sum.
                self.acc.backward(loss_sum * (self.world / max(n_targets, 1)))
            local += loss_sum.detach().double()
        for b in group:
            tokens += _inputs(b, torch.device("cpu"))[2]
        loss = float(self.acc.reduce(local, "sum")) / max(n_targets, 1)
        if not math.isfinite(loss):
            raise RunError(self._nan_message(f"loss became {loss}"))
        grad_norm = None
        if self.s.max_grad_norm > 0:
            grad_norm = float(self.acc.clip_grad_norm_(self.params, self.s.max_grad_norm))
            if not math.isfinite(grad_norm) and self.acc.mixed_precision != "fp16":
                raise RunError(self._nan_message(f"gradient norm became {grad_norm}"))
        self.optimizer.step()
        if not self.optimizer.step_was_skipped:  # fp16 overflow: the scaler skipped the step
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, tokens

    def _nan_message(self, what: str) -> str:
        last = latest_checkpoint(self.out)
        keep = f"; the last good checkpoint is {last}" if last else ""
        return f"{what} at step {self.state.step + 1}, stopping{keep} (try a lower train.lr)"

    def _stop_requested(self, stop: StopRequest) -> bool:
        flag = torch.tensor([1.0 if stop else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(flag, "sum").item() > 0)

    def _save(self) -> Path:
        folder = save_checkpoint(self.acc, self.out, self.state, self.s.keep_last)
        self._saved_step = self.state.step
        return folder

    def _interrupt(self, stop: StopRequest) -> None:
        folder = self._save()
        signum = stop.signum or 2
        raise TrainingInterrupted(
            f"stopped by {signal_name(signum)} after step {self.state.step}; checkpoint saved "
            f"to {folder} (continue with --resume)",
            signum,
        )

    # ------------------------------------------------------------------ the loop

    def train(self, resumed_from: Path | None = None) -> TrainResult:
        s, st = self.s, self.state
        group_size = self.world * s.grad_accum
        if self.val_ds is not None and s.eval_at_start and st.step == 0:
            st.val_loss_start = self.evaluate()
        stop = StopRequest()
        self.model.train()
        t_window, tok_window, tps = time.perf_counter(), 0, 0.0
        t_start, elapsed0, tokens0 = time.perf_counter(), st.elapsed_s, st.tokens
        with MetricsLog(self.acc, self.out, s.total_steps, st.step) as metrics, stop.installed():
            if st.val_loss_start is not None and st.step == 0:
                metrics.eval(0, st.val_loss_start)
            while st.step < s.total_steps:
                loader = make_dataloader(
                    self.train_ds, self.tok, s.batch_size, shuffle=s.shuffle, seed=s.seed,
                    epoch=st.epoch, skip_batches=st.step_in_epoch * group_size,
                    isolate_packed=s.isolate_packed,
                )  # fmt: skip
                batches = iter(loader)
                while st.step < s.total_steps:
                    group = [next(batches) for _ in range(group_size)]
                    loss, grad_norm, tokens = self._step(group)
                    st.step += 1
                    st.step_in_epoch += 1
                    st.tokens += tokens
                    st.train_loss = loss
                    st.elapsed_s = elapsed0 + time.perf_counter() - t_start
                    tok_window += tokens
                    lr = self.scheduler.get_last_lr()[0]
                    now = time.perf_counter()
                    tps = tok_window / max(now - t_window, 1e-9)
                    metrics.advance(loss, lr, tps)
                    if st.step % s.log_every == 0 or st.step == s.total_steps:
                        metrics.train(st.step, loss, lr, grad_norm, tps, epoch=st.epoch)
                        t_window, tok_window = now, 0
                    if self.val_ds is not None and s.eval_every and st.step % s.eval_every == 0:
                        st.val_loss, st.val_step = self.evaluate(), st.step
                        metrics.eval(st.step, st.val_loss)
                    epoch_done = st.step_in_epoch == s.steps_per_epoch
                    if epoch_done:  # saved as (next epoch, 0): the resumed run starts it afresh
                        st.epoch, st.step_in_epoch = st.epoch + 1, 0
                    if s.save_every and st.step % s.save_every == 0:
                        self._save()
                    if self.on_step is not None:
                        self.on_step(st)
                    if self._stop_requested(stop):
                        self._interrupt(stop)
                    if epoch_done:
                        break
            if self.val_ds is not None and st.val_step != st.step:
                st.val_loss, st.val_step = self.evaluate(), st.step
                metrics.eval(st.step, st.val_loss)
        if st.step != self._saved_step:
            self._save()
        run_s = max(st.elapsed_s - elapsed0, 1e-9)
        result = TrainResult(st, resumed_from=resumed_from)
        result.tokens_per_s = (st.tokens - tokens0) / run_s if st.step else 0.0
        full = self.acc.get_state_dict(self.model)  # gathers sharded params under FSDP
        if self.acc.is_main_process:
            result.scales = {
                n: full[f"{n}.scales"].detach().float().cpu().clone() for n in self.scales
            }
        return result
