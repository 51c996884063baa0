"""Integration: the shipped SmolLM2 recipes run end to end on the real model and shared data
(one step each, so the suite stays short; docs/finetune.md has the full runs' numbers)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from peqa_cli.cli import app
from peqa_cli.io.checkpoint import load_quantized
from peqa_cli.io.delta import check_compatible, load_delta
from peqa_cli.paths import data_file

pytestmark = pytest.mark.integration

SHORT = ["--max-steps", "1", "train.eval_at_start=false", "train.eval_batches=1",
         "train.eval_batch_size=1", "train.batch_size=1", "data.max_length=128"]  # fmt: skip


@pytest.mark.parametrize(
    "recipe,files,bits",
    [
        ("smollm2_w3_wikitext", ["wikitext2_raw_validation.jsonl", "wikitext2_raw_test.jsonl"], 3),
        ("smollm2_w4_alpaca", ["alpaca_cleaned_sample2000.jsonl"], 4),
    ],
)
def test_shipped_smollm2_recipe_runs(tmp_path, recipe, files, bits):
    for name in files:
        data_file(name)  # a missing data file fails here, with its path; never a skip
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["finetune", recipe, "--out", str(out), "--json", *SHORT])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 1 and summary["bits"] == bits and summary["val_loss"] > 0
    base = load_quantized(out / "base")
    delta = load_delta(out / "final")
    check_compatible(delta, base.model, base.fingerprint, bits, 128)
    assert summary["trainable_params"] == sum(d.numel() for d in delta.deltas.values())
