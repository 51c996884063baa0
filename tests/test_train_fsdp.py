"""FSDP2 shards the scales and the frozen float parameters, never the integer buffers.

accelerate runs FSDP only on accelerators, so this drives torch's FSDP2 (``fully_shard``,
what accelerate's FSDP2 plugin calls, wrapping each decoder layer) directly: two CPU
processes over gloo, launched by ``torch.distributed.run``. Their scale gradients must equal
one process's, and the packed integers must stay whole, plain tensors, unchanged by a step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from peqa_cli.io.checkpoint import load_quantized
from peqa_cli.train import testing

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "workers" / "fsdp_grads.py"


def test_fsdp2_shards_scales_not_integer_buffers(tmp_path):
    float_dir = testing.save_float_model(tmp_path / "float")
    ckpt = testing.save_quantized_model(tmp_path / "q", float_dir, bits=3, group_size=32)
    out = tmp_path / "fsdp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), str(ckpt), str(out)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)

    ref = load_quantized(ckpt).model
    before = {n: b.clone() for n, b in ref.named_buffers()}
    for name, p in ref.named_parameters():
        p.requires_grad_(name.endswith(".scales"))
    torch.manual_seed(0)
    ids = torch.randint(0, ref.config.vocab_size, (2, 24))
    ref(input_ids=ids, labels=ids).loss.backward()
    want = {n: p.grad for n, p in ref.named_parameters() if n.endswith(".scales")}

    assert got["grads"].keys() == want.keys()
    for name, g in want.items():
        assert g.abs().max() > 0
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-7)
    # every scale is sharded; no integer buffer is (buffers are plain tensors, whole)
    assert set(want) <= set(got["sharded"])
    assert got["buffer_types"] == ["Tensor"]
    assert got["buffers"].keys() == before.keys()
    for name, b in before.items():
        assert torch.equal(got["buffers"][name], b), name
