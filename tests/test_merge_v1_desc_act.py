"""Merging GPTQ checkpoints from other tools: v1 (zero-points stored as z - 1) and desc_act.

A v1 base merges into a v1 checkpoint: its qzeros keep their bytes (converting them to v2
would change the bytes, not the weights), so the merge stays "the base with new scales".
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from peqa_cli.io.checkpoint import load_quantized, quant_layers
from peqa_cli.io.delta import apply_delta, load_delta
from peqa_cli.recipes.merge import MergeRecipe, run
from tests.test_merge_gptq import file_tensors, logits, make_delta, raw_bytes
from tests.test_merge_reference_format import reference_model, write_by_hand


@pytest.fixture(
    scope="module", params=[("gptq", True, 4), ("gptq", False, 3), ("gptq_v2", True, 2)]
)
def work(request, tmp_path_factory):
    fmt, desc_act, bits = request.param
    root = tmp_path_factory.mktemp(f"{fmt}-{desc_act}")
    base = root / "base"
    write_by_hand(base, bits, 32, fmt, desc_act)
    delta = make_delta(base, root / "delta", seed=4)
    run(MergeRecipe(base=str(base), delta=str(delta), out=str(root / "merged")))
    return {"root": root, "base": base, "delta": delta, "merged": root / "merged", "fmt": fmt}


def test_foreign_base_merges_in_its_own_format(work):
    before, after = file_tensors(work["base"]), file_tensors(work["merged"])
    for k, t in before.items():
        if not k.endswith(".scales"):
            assert raw_bytes(after[k]) == raw_bytes(t), k
    qc = json.loads((work["merged"] / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == work["fmt"]
    meta = json.loads((work["merged"] / "peqa.json").read_text())
    assert meta["checkpoint_format"] == meta["base"]["checkpoint_format"] == work["fmt"]
    # No peqa.json in the base: its fingerprint is the hash load_quantized computes.
    assert meta["base_fingerprint"] == load_quantized(work["base"]).fingerprint


def test_foreign_merge_logits_match_memory_and_the_independent_reader(work):
    mem = load_quantized(work["base"], dtype=torch.float32)
    apply_delta(mem.model, load_delta(work["delta"]))
    for layer in quant_layers(mem.model).values():
        layer.scales.data.copy_(layer.scales.data.half().float())
    merged = load_quantized(work["merged"], dtype=torch.float32)
    assert torch.equal(logits(merged.model), logits(mem.model))
    ref = reference_model(work["merged"])
    torch.testing.assert_close(logits(ref), logits(merged.model), rtol=1e-5, atol=1e-5)


def test_foreign_base_hf_export(work):
    out = work["root"] / "hf"
    run(
        MergeRecipe(
            base=str(work["base"]),
            delta=str(work["delta"]),
            out=str(out),
            format="hf",
            dtype="float32",
        )
    )
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = reference_model(work["merged"])
    for name, p in ref.named_parameters():
        assert torch.equal(model.get_parameter(name), p), name
