"""Training checkpoints: atomic, resumable, small.

Layout of one checkpoint, ``OUT/checkpoints/step-N/``::

    scales.safetensors      every trained scale tensor (fp32), the only model state
    optimizer.bin           AdamW moments (accelerate)
    custom_checkpoint_0.pkl the LR scheduler (accelerate, registered object)
    random_states_R.pkl     Python/NumPy/torch RNG states of process R (accelerate)
    scaler.pt               fp16 loss scaler, when mixed_precision is fp16 (accelerate)
    trainer_state.json      step, epoch, position in the epoch, base fingerprint, ...

The integers and frozen float weights never change, so they are not copied into
checkpoints: a save-state pre-hook swaps accelerate's full model state for the scales alone
(a 7B W4 checkpoint is then ~50 MB instead of ~4 GB). Each checkpoint is written into
``.step-N.tmp`` and renamed into place after ``trainer_state.json``, so a folder named
``step-N`` is always complete; anything else left behind by a crash is ignored and removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from peqa_cli.errors import CheckpointError
from peqa_cli.io.checkpoint import write_json

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
SCALES_FILE = "scales.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # optimizer steps done within ``epoch``
    tokens: int = 0  # tokens processed so far (all processes)
    elapsed_s: float = 0.0  # training wall time so far (resumed runs add to it)
    world_size: int = 1
    base_fingerprint: str = ""
    train_loss: float | None = None  # loss of the last step
    val_loss_start: float | None = None
    val_loss: float | None = None  # last validation loss
    val_step: int = -1  # step of ``val_loss``
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> TrainerState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def checkpoints_dir(out: Path) -> Path:
    return out / CHECKPOINTS


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = checkpoints_dir(out)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    done = complete_checkpoints(out)
    return done[-1][1] if done else None


def read_state(folder: Path) -> TrainerState:
    try:
        return TrainerState.from_dict(json.loads((folder / STATE_FILE).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"corrupt training checkpoint {folder}: {exc}") from None


def install_scale_hooks(accelerator, scales: dict[str, nn.Parameter]) -> None:
    """Make ``save_state``/``load_state`` store the scales instead of the whole model.

    Skipped under FSDP, where parameters are sharded and accelerate's own sharded model
    state is the right thing to save.
    """
    from accelerate.utils import DistributedType
    from safetensors.torch import load_file, save_file

    if accelerator.distributed_type == DistributedType.FSDP:
        return

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        weights.clear()  # accelerate then writes no model file
        if accelerator.is_main_process:
            tensors = {n: p.detach().float().cpu().contiguous() for n, p in scales.items()}
            save_file(tensors, os.path.join(output_dir, SCALES_FILE))

    def load_hook(models: list, input_dir: str) -> None:
        models.clear()  # loaded here, not by accelerate
        path = os.path.join(input_dir, SCALES_FILE)
        saved = load_file(path)
        if set(saved) != set(scales):
            raise CheckpointError(f"{path} does not hold this model's scales")
        with torch.no_grad():
            for n, p in scales.items():
                p.copy_(saved[n].to(p.device, p.dtype))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, out: Path, state: TrainerState, keep_last: int) -> Path:
    """Write ``checkpoints/step-N`` atomically on every process; prune to ``keep_last``."""
    root = checkpoints_dir(out)
    final = root / f"step-{state.step}"
    tmp = root / f".step-{state.step}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / STATE_FILE, asdict(state))
        if final.exists():  # the same step saved again (e.g. interrupted right after resume)
            old = root / f".step-{state.step}.old"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        prune(out, keep_last)
    accelerator.wait_for_everyone()
    return final


def prune(out: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop leftovers of crashed saves."""
    done = complete_checkpoints(out)
    for _, p in done[: max(0, len(done) - keep_last)]:
        shutil.rmtree(p, ignore_errors=True)
    keep = {p for _, p in done}
    for p in checkpoints_dir(out).iterdir():
        if p.name.startswith(".step-") and p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(accelerator, folder: Path) -> TrainerState:
    """Restore scales, optimizer, scheduler, scaler and RNG states; return the trainer state."""
    state = read_state(folder)
    if state.world_size != accelerator.num_processes:
        log.warning(
            "%s was written by %d processes, resuming with %d: the data order continues, "
            "but RNG states and per-process batches differ from an uninterrupted run",
            folder,
            state.world_size,
            accelerator.num_processes,
        )
    try:
        accelerator.load_state(str(folder))
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot resume from {folder}: {str(exc).splitlines()[0]}") from None
    return state
