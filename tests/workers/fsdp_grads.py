"""Worker for tests/test_train_fsdp.py, started by ``torch.distributed.run`` (2 CPU processes).

Shards a quantized checkpoint with FSDP2 (``fully_shard`` per decoder layer, then the root),
as accelerate's FSDP2 plugin does, runs one forward/backward and one AdamW step on the scales,
and has rank 0 save the full scale gradients, the parameter/buffer types and the buffers.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from peqa_cli.io.checkpoint import load_quantized


def main(ckpt: str, out: str) -> None:
    dist.init_process_group("gloo")
    model = load_quantized(ckpt).model
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".scales"))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    torch.manual_seed(0)  # the same batch on every rank: the averaged gradient is the batch's
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    model(input_ids=ids, labels=ids).loss.backward()
    scales = {n: p for n, p in model.named_parameters() if n.endswith(".scales")}
    grads = {n: p.grad.full_tensor() for n, p in scales.items()}
    sharded = sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor))
    opt = torch.optim.AdamW(scales.values(), lr=1e-3, weight_decay=0.0)
    opt.step()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    buffer_types = sorted({type(b).__name__ for b in buffers.values()})
    if dist.get_rank() == 0:
        torch.save({"grads": grads, "sharded": sharded, "buffers": buffers,
                    "buffer_types": buffer_types}, out)  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
