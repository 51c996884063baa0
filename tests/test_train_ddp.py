"""Two CPU processes (DDP over gloo, launched by ``accelerate launch``) take the same steps as
one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peqa_cli.train import testing

REPO = Path(__file__).resolve().parent.parent


def accelerate_cmd() -> list[str]:
    exe = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which(
        "accelerate"
    )
    if exe is None:
        pytest.fail("the accelerate launcher is not installed next to this Python")
    return [exe]


def write_recipe(path: Path, model: Path, data: Path, **train) -> Path:
    doc = {
        "model": str(model),
        "data": {"path": str(data), "format": "text", "max_length": 32, "val_size": 8},
        "train": {"lr": 0.01, "max_steps": 6, "scheduler": "cosine", "warmup_steps": 1,
                  "eval_every": 3, "log_every": 1, **train},
    }  # fmt: skip
    path.write_text("# ddp test\n" + yaml.safe_dump(doc))
    return path


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    float_dir = testing.save_float_model(tmp_path / "float")
    q = testing.save_quantized_model(tmp_path / "q", float_dir, bits=3, group_size=32)
    data = testing.write_text_jsonl(tmp_path / "text.jsonl", rows=40)
    env = {**os.environ, "PEQA_QUIET": "1", "OMP_NUM_THREADS": "1"}

    one = tmp_path / "one"
    rec1 = write_recipe(tmp_path / "one.yaml", q, data, batch_size=4)
    subprocess.run(
        [sys.executable, "-m", "peqa_cli", "finetune", str(rec1), "--out", str(one)],
        check=True, env=env, cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip

    two = tmp_path / "two"  # 2 processes x 1 row x 2 accumulation steps = 4 rows per step
    rec2 = write_recipe(tmp_path / "two.yaml", q, data, batch_size=1, grad_accum=2)
    proc = subprocess.run(
        [*accelerate_cmd(), "launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "peqa_cli", "finetune", str(rec2), "--out", str(two), "--json"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # printed once, by the main process only
    assert summary["steps"] == 6

    state = json.loads((two / "checkpoints" / "step-6" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert sorted(p.name for p in (two / "checkpoints" / "step-6").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    a = load_file(str(one / "final" / "adapter_model.safetensors"))
    b = load_file(str(two / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].abs().max() > 0
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)

    def records(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    for r1, r2 in zip(records(one), records(two), strict=True):
        key = "loss" if r1["kind"] == "train" else "val_loss"
        assert r1["step"] == r2["step"] and r2[key] == pytest.approx(r1[key], rel=1e-5)
