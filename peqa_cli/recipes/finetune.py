"""``peqa finetune``: train only the quantization scales of a quantized model (PEQA).

Lifecycle: validate the recipe -> check the output folder -> resolve the base (a peqa/GPTQ
checkpoint, or a float model plus ``quant:`` settings) -> tokenizer and datasets -> only now
write anything: ``OUT/recipe.yaml``, ``OUT/base`` (quantized here when needed) -> train
(``OUT/checkpoints``, ``OUT/metrics.jsonl``) -> ``OUT/final`` (the scale delta).
Every check that can fail on user input runs before the first byte is written.

Data paths may use ``${PEQA_DATA}``: it expands to :func:`peqa_cli.paths.data_dir`
(``$PEQA_DATA``, else ``../shared/data`` beside the repository), so shipped recipes run
from any checkout; ``data.path=FILE`` overrides take plain paths.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from peqa_cli import __version__
from peqa_cli.config import dump_yaml, read_yaml, to_dict
from peqa_cli.data import DataConfig, build_datasets
from peqa_cli.errors import CheckpointError, InputError
from peqa_cli.io.checkpoint import default_dtype, is_quantized_checkpoint, read_quant_spec
from peqa_cli.paths import data_dir
from peqa_cli.recipes.quantize import QuantizeRecipe, QuantSettings
from peqa_cli.train.optim import SCHEDULERS
from peqa_cli.train.state import TrainerState, complete_checkpoints

log = logging.getLogger(__name__)

PLACEHOLDER = "${PEQA_DATA}"
TRACKERS = ("tensorboard", "wandb")
MIXED_PRECISION = ("no", "bf16", "fp16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RECIPE_FILE = "recipe.yaml"
FINAL = "final"
BASE = "base"
# Changing these between an interrupted run and its resumption changes nothing that matters.
_RESUME_FREE = {"train.max_steps", "train.eval_every", "train.save_every", "train.keep_last",
                "train.log_every", "train.report_to", "overwrite", "out"}  # fmt: skip


def _f(default, help: str, **meta):
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return field(**kw, metadata={"help": help, **meta})


@dataclass
class TrainSettings:
    lr: float = _f(1e-4, "AdamW learning rate of the scales (> 0)")
    scheduler: str = _f("linear", "learning-rate schedule", choices=SCHEDULERS)
    warmup_steps: int = _f(0, "linear warmup steps (overrides warmup_ratio when > 0)")
    warmup_ratio: float = _f(0.0, "warmup as a fraction of the total steps")
    max_steps: int = _f(0, "optimizer steps; 0 = epochs x steps per epoch")
    epochs: int = _f(1, "passes over the training data (when max_steps is 0)")
    batch_size: int = _f(4, "rows per micro-batch and process")
    grad_accum: int = _f(1, "micro-batches per optimizer step and process")
    max_grad_norm: float = _f(1.0, "gradient clipping norm; 0 = off")
    weight_decay: float = _f(0.0, "AdamW weight decay of the scales")
    adam_betas: list[float] = _f(lambda: [0.9, 0.999], "AdamW betas")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    mixed_precision: str = _f("no", "autocast dtype", choices=MIXED_PRECISION)
    gradient_checkpointing: bool = _f(False, "recompute activations in backward")
    seed: int = _f(0, "seed of the data order and of every RNG")
    shuffle: bool = _f(True, "shuffle the training rows each epoch")
    eval_every: int = _f(0, "validate every N steps (0 = at the start and the end only)")
    eval_at_start: bool = _f(True, "validate before the first step")
    eval_batches: int = _f(0, "validate on the first N batches (0 = all)")
    eval_batch_size: int = _f(0, "validation batch size (0 = batch_size)")
    save_every: int = _f(0, "checkpoint every N steps (0 = at the end and on a signal only)")
    keep_last: int = _f(2, "checkpoints kept")
    log_every: int = _f(10, "metrics.jsonl record every N steps")
    report_to: list[str] = _f(list, "trackers: tensorboard, wandb")

    def validate(self, p: str = "train.") -> list[str]:
        out = []
        positive = ("batch_size", "grad_accum", "epochs", "keep_last", "log_every")
        non_negative = ("warmup_steps", "max_steps", "eval_every", "eval_batches",
                        "eval_batch_size", "save_every")  # fmt: skip
        if not self.lr > 0:
            out.append(f"{p}lr: {self.lr} is not allowed (the learning rate must be > 0)")
        out += [f"{p}{k}: must be >= 1 (got {getattr(self, k)})" for k in positive
                if getattr(self, k) < 1]  # fmt: skip
        out += [f"{p}{k}: must be >= 0 (got {getattr(self, k)})" for k in non_negative
                if getattr(self, k) < 0]  # fmt: skip
        if not 0 <= self.warmup_ratio < 1:
            out.append(f"{p}warmup_ratio: must be in [0, 1) (got {self.warmup_ratio})")
        if self.max_grad_norm < 0 or self.weight_decay < 0 or not self.adam_eps > 0:
            out.append(f"{p}max_grad_norm and weight_decay must be >= 0 and adam_eps > 0")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            out.append(f"{p}adam_betas: two numbers in [0, 1) (got {self.adam_betas})")
        out += [f"{p}report_to: '{t}' is not allowed (choose from {', '.join(TRACKERS)})"
                for t in self.report_to if t not in TRACKERS]  # fmt: skip
        return out


@dataclass
class FinetuneRecipe:
    model: str = _f("", "peqa/GPTQ checkpoint, or a float model (folder, .gguf, hub id, alias)")
    quant: QuantSettings | None = _f(None, "quantize a float model first with these settings")
    data: DataConfig = _f(DataConfig, "training (and validation) data")
    train: TrainSettings = _f(TrainSettings, "optimization")
    out: str = _f("", "run folder: base/, checkpoints/, metrics.jsonl, final/")
    device: str = _f("auto", "auto, cpu or cuda (multi-GPU: accelerate launch)",
                     choices=("auto", "cpu", "cuda"))  # fmt: skip
    dtype: str = _f("auto", "dtype of the frozen float parts (auto: fp32 on CPU, bf16 on GPU)",
                    choices=("auto", *DTYPES))  # fmt: skip
    overwrite: bool = _f(False, "replace an existing run folder")

    def validate(self) -> list[str]:
        problems = []
        if not self.model:
            problems.append("model: required (a peqa/GPTQ checkpoint, or a float model + quant:)")
        if not self.out:
            problems.append("out: required (pass --out DIR)")
        if self.quant is not None:
            problems += self.quant.validate()
        problems += self.data.validate(require_path=True)
        problems += self.train.validate()
        return problems


def resolve_paths(cfg: FinetuneRecipe) -> FinetuneRecipe:
    """Expand ``${PEQA_DATA}`` and ``~`` in the data paths (the recipe as it will run)."""

    def expand(p: str) -> str:
        return os.path.expanduser(p.replace(PLACEHOLDER, str(data_dir()))) if p else p

    data = dataclasses.replace(cfg.data, path=expand(cfg.data.path),
                               val_path=expand(cfg.data.val_path))  # fmt: skip
    return dataclasses.replace(cfg, data=data)


# ---------------------------------------------------------------- checks before any output


@dataclass
class BasePlan:
    """Where the quantized base comes from and what the tokenizer/context checks read."""

    path: Path  # the quantized checkpoint (maybe not written yet: OUT/base)
    source: Path  # folder holding config.json and the tokenizer
    quantize_from: str | None  # model spec to quantize into ``path``, or None


def plan_base(cfg: FinetuneRecipe, out: Path, reuse: bool) -> BasePlan:
    """The base checkpoint to train; ``reuse``: keep an ``OUT/base`` an earlier run quantized."""
    model = Path(cfg.model).expanduser()
    if model.is_dir() and is_quantized_checkpoint(model):
        spec = read_quant_spec(model)
        q = cfg.quant
        if q is not None and (q.bits, q.group_size) != (spec.bits, spec.group_size):
            log.warning("%s is already quantized (bits %d, group size %d); the recipe's quant: "
                        "settings are ignored", model, spec.bits, spec.group_size)  # fmt: skip
        return BasePlan(model, model, None)
    if cfg.quant is None:
        if model.is_dir():
            read_quant_spec(model)  # raises the "not a peqa/GPTQ checkpoint" line
        raise CheckpointError(
            f"model {cfg.model} is not a peqa/GPTQ checkpoint; pass a quantized checkpoint "
            "or add quant settings to quantize it first (e.g. quant.bits=4)"
        )
    base = out / BASE
    if reuse and is_quantized_checkpoint(base):
        return BasePlan(base, base, None)
    from peqa_cli.io.sources import resolve_model

    return BasePlan(base, resolve_model(cfg.model).path, cfg.model)


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a directory")
    if out.exists() and not (resume or overwrite):
        raise InputError(
            f"output directory {out} already exists "
            "(pass --resume to continue its run or --overwrite to replace it)"
        )


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many types for a missing tokenizer
        raise InputError(
            f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}"
        ) from None


def max_positions(path: Path) -> int | None:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)


def _check_resume_recipe(out: Path, cfg: FinetuneRecipe) -> None:
    saved_path = out / RECIPE_FILE
    if not saved_path.is_file():
        return

    def flat(d: dict, prefix: str = "") -> dict:
        items = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            items.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
        return items

    before, now = flat(read_yaml(saved_path)), flat(to_dict(cfg))
    changed = sorted(k for k in set(before) | set(now)
                     if before.get(k) != now.get(k) and k not in _RESUME_FREE)  # fmt: skip
    if changed:
        log.warning("resuming with a recipe that differs from %s in: %s (the run will not "
                    "match an uninterrupted one)", saved_path, ", ".join(changed))  # fmt: skip


# ---------------------------------------------------------------- the run


def make_accelerator(cfg: FinetuneRecipe, out: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        InitProcessGroupKwargs,
        ProjectConfiguration,
    )

    t = cfg.train
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InputError("device: 'cuda' requested but no CUDA device is available")
    if t.mixed_precision == "fp16" and cpu:
        raise InputError("train.mixed_precision: fp16 needs a CUDA device; use bf16 or no on CPU")
    for tracker in t.report_to:
        import importlib.util

        if importlib.util.find_spec(tracker) is None:
            raise InputError(f"train.report_to: {tracker} is not installed (pip install {tracker})")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # A single-process caller (tests, notebooks) may run several recipes in one process;
        # accelerate's state is a process-wide singleton fixed by the first Accelerator.
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return Accelerator(
        cpu=cpu,
        mixed_precision=t.mixed_precision,
        log_with=t.report_to or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        kwargs_handlers=[
            # The integers are buffers that never change: do not broadcast them every step.
            DistributedDataParallelKwargs(broadcast_buffers=False),
            # The other processes wait while the main one quantizes the base (minutes for 7B+).
            InitProcessGroupKwargs(timeout=timedelta(hours=2)),
        ],
    )


def run(
    cfg: FinetuneRecipe,
    *,
    resume: bool = False,
    on_step: Callable[[TrainerState], None] | None = None,
) -> dict | None:
    """Run a recipe; returns the summary on the main process (None on the others)."""
    from peqa_cli.io.checkpoint import load_quantized
    from peqa_cli.io.delta import save_delta
    from peqa_cli.train.loop import LoopSettings, Trainer, steps_per_epoch

    cfg = resolve_paths(cfg)
    out = Path(cfg.out)
    check_out_dir(out, resume, cfg.overwrite)
    fresh = not (resume and complete_checkpoints(out))
    if resume and out.exists():
        _check_resume_recipe(out, cfg)
    accelerator = make_accelerator(cfg, out)  # checks device, precision and trackers first
    plan = plan_base(cfg, out, reuse=resume)
    tokenizer = load_tokenizer(plan.source)
    train_ds, val_ds, data_stats = build_datasets(
        cfg.data, tokenizer, model_max_length=max_positions(plan.source)
    )
    t = cfg.train
    per_epoch = steps_per_epoch(len(train_ds), t.batch_size, t.grad_accum,
                                accelerator.num_processes)  # fmt: skip
    total = t.max_steps or t.epochs * per_epoch
    warmup = t.warmup_steps or round(t.warmup_ratio * total)
    accelerator.wait_for_everyone()  # every process has checked ``out`` before it changes

    # ---- from here on, output is written
    if accelerator.is_main_process:
        if cfg.overwrite and not resume and out.exists():
            shutil.rmtree(out)
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            if plan.quantize_from is not None:
                from peqa_cli.recipes.quantize import run as quantize

                quantize(QuantizeRecipe(model=plan.quantize_from, out=str(plan.path),
                                        quant=cfg.quant, device=cfg.device))  # fmt: skip
        except BaseException:
            if created:  # a run that never started leaves nothing behind
                shutil.rmtree(out, ignore_errors=True)
            raise
        (out / RECIPE_FILE).write_text(dump_yaml(cfg))
    accelerator.wait_for_everyone()
    device = accelerator.device
    if device.type == "cpu":
        device = torch.device("cpu")  # multi-CPU runs report "cpu:0", which safetensors rejects
    dtype = DTYPES[cfg.dtype] if cfg.dtype != "auto" else default_dtype(device)
    base = load_quantized(plan.path, device=device, dtype=dtype)
    settings = LoopSettings(
        lr=t.lr, scheduler=t.scheduler, warmup_steps=warmup, total_steps=total,
        steps_per_epoch=per_epoch, batch_size=t.batch_size, grad_accum=t.grad_accum,
        max_grad_norm=t.max_grad_norm, weight_decay=t.weight_decay,
        adam_betas=tuple(t.adam_betas), adam_eps=t.adam_eps,
        gradient_checkpointing=t.gradient_checkpointing, seed=t.seed, shuffle=t.shuffle,
        eval_every=t.eval_every, eval_batches=t.eval_batches, eval_batch_size=t.eval_batch_size,
        eval_at_start=t.eval_at_start, save_every=t.save_every, keep_last=t.keep_last,
        log_every=t.log_every, isolate_packed=cfg.data.packing,
    )  # fmt: skip
    from accelerate.utils import set_seed

    set_seed(t.seed)
    base_scales = {n: m.scales.detach().float().cpu().clone()
                   for n, m in _quant_layers(base.model).items()}  # fmt: skip
    trainer = Trainer(accelerator, base.model, tokenizer, train_ds, val_ds, settings, out,
                      base.fingerprint, on_step=on_step)  # fmt: skip
    if t.report_to:
        accelerator.init_trackers("peqa", config=_flat_config(cfg))
    resumed_from = None if fresh else trainer.resume()
    if resumed_from is not None:
        log.info("resuming from %s (step %d)", resumed_from, trainer.state.step)
    result = trainer.train(resumed_from)
    if t.report_to:
        accelerator.end_training()
    if not accelerator.is_main_process:
        return None
    st = result.state
    deltas = {n: result.scales[n] - base_scales[n] for n in base_scales}
    delta_config = {
        "base_fingerprint": base.fingerprint,
        "bits": base.spec.bits,
        "group_size": base.spec.group_size,
        "base_path": str(plan.path.resolve()),
        "recipe": to_dict(cfg),
        "peqa_version": __version__,
        "steps": st.step,
        "train_loss": st.train_loss,
        "val_loss_start": st.val_loss_start,
        "val_loss": st.val_loss,
    }
    final = save_delta(out / FINAL, deltas, delta_config, overwrite=True)
    delta_bytes = sum(f.stat().st_size for f in final.iterdir())
    log.info("wrote the scale delta %s (%s)", final, _human(delta_bytes))
    return {
        "out": str(out),
        "delta": str(final),
        "delta_bytes": delta_bytes,
        "delta_size": _human(delta_bytes),
        "base": str(plan.path),
        "bits": base.spec.bits,
        "group_size": base.spec.group_size,
        "trainable_params": sum(d.numel() for d in deltas.values()),
        "steps": st.step,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "train_sequences": data_stats.sequences,
        "train_loss": _round(st.train_loss),
        "val_loss_start": _round(st.val_loss_start),
        "val_loss": _round(st.val_loss),
        "tokens": st.tokens,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "seconds": round(st.elapsed_s, 1),
    }


def _quant_layers(model):
    from peqa_cli.io.checkpoint import quant_layers

    return quant_layers(model)


def _flat_config(cfg: FinetuneRecipe) -> dict:
    flat = {}
    for section, values in to_dict(cfg).items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()
                         if isinstance(v, int | float | str | bool)})  # fmt: skip
        elif isinstance(values, int | float | str | bool):
            flat[section] = values
    return flat


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 5)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
