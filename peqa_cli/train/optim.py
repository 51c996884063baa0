"""What PEQA trains, how it steps, and the loss it minimizes.

Only the quantization scales are trainable: every other parameter (embeddings, norms,
``lm_head``) is frozen and the integers are buffers, so the optimizer state is two fp32
tensors the size of the scales (AdamW's moments) and nothing else.

The loss is summed over trainable tokens and divided by the number of trainable tokens in
the *global* batch (all micro-batches of one optimizer step, on all processes). With that
normalization the gradient does not depend on how a batch is split into micro-batches or
processes, so 1 process x 4 rows, 1 x 2 rows x 2 accumulation steps and 2 processes x 2 rows
all take the same step (DDP averages gradients, hence the ``world_size`` factor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peqa_cli.data import IGNORE_INDEX
from peqa_cli.io.checkpoint import quant_layers

# Schedules a recipe may name (transformers' get_scheduler names); the others need extra
# arguments (restarts, power, min lr) that recipes do not expose.
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


def trainable_scales(model: nn.Module) -> dict[str, nn.Parameter]:
    """Freeze everything, then unfreeze the scales. Returns ``{layer name: scales}``."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = quant_layers(model)
    for layer in layers.values():
        layer.scales.requires_grad_(True)
    return {name: layer.scales for name, layer in layers.items()}


def make_optimizer(
    params: list[nn.Parameter],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
) -> torch.optim.Optimizer:
    # foreach=False: the per-tensor loop gives the same bits whatever the process count,
    # and the scales are small enough that the fused multi-tensor kernels gain nothing.
    return torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, foreach=False
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    from transformers import get_scheduler

    assert name in SCHEDULERS, name  # the recipe's choices already rejected anything else
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps
    )


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labels that are not -100 (fp32)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that contribute to the loss (after the causal shift)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
