"""``peqa merge`` and ``peqa generate`` on the real SmolLM2 (quantized w4 g128 here).

Kept short: every forward of a quantized model dequantizes all 210 linears on the fly, so on
CPU each generated token costs a full dequantization of the model.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from peqa_cli.cli import app
from peqa_cli.io.checkpoint import load_quantized, quant_layers
from peqa_cli.io.delta import apply_delta, load_delta
from peqa_cli.io.stream import SafetensorsReader
from peqa_cli.recipes.merge import MergeRecipe, run
from peqa_cli.recipes.quantize import QuantizeRecipe, QuantSettings
from peqa_cli.recipes.quantize import run as quantize
from tests.test_merge_gptq import make_delta, raw_bytes

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    base = root / "base"
    quant = QuantSettings(bits=4, group_size=128)
    quantize(QuantizeRecipe(model="smollm2-135m", out=str(base), quant=quant))
    delta = make_delta(base, root / "delta", seed=1, rel=0.02)
    run(MergeRecipe(base=str(base), delta=str(delta), out=str(root / "merged")))
    return {"root": root, "base": base, "delta": delta, "merged": root / "merged"}


def test_smollm2_merge_is_exact_and_byte_identical(work):
    a = SafetensorsReader(work["base"] / "model.safetensors")
    b = SafetensorsReader(work["merged"] / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a.keys():  # one tensor at a time
        if not k.endswith(".scales"):
            assert raw_bytes(a.read(k)) == raw_bytes(b.read(k)), k
    mem = load_quantized(work["base"])
    apply_delta(mem.model, load_delta(work["delta"]))
    for layer in quant_layers(mem.model).values():
        layer.scales.data.copy_(layer.scales.data.half().float())
    merged = load_quantized(work["merged"])
    ids = torch.randint(0, 49152, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(merged.model(ids).logits, mem.model(ids).logits)
    meta = json.loads((work["merged"] / "peqa.json").read_text())
    assert meta["fingerprint"] == merged.fingerprint != meta["base_fingerprint"]


def test_smollm2_generate_with_a_delta(work):
    res = CliRunner().invoke(
        app,
        [
            "generate",
            str(work["base"]),
            "--delta",
            str(work["delta"]),
            "--prompt",
            "Name a color.",
            "-n",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    assert res.stdout.strip()
