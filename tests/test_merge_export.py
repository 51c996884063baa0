"""``peqa merge --format hf``: a float model plain transformers loads, equal to the merge."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peqa_cli.data.testing import make_tiny_tokenizer
from peqa_cli.io.checkpoint import load_quantized
from peqa_cli.recipes.merge import MergeRecipe, run
from tests.test_merge_gptq import IDS, logits, make_base, make_delta


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base = make_base(root)
    make_tiny_tokenizer().save_pretrained(base)  # side files travel with the export
    delta = make_delta(base, root / "delta", seed=1)
    run(MergeRecipe(base=str(base), delta=str(delta), out=str(root / "merged")))
    return {"root": root, "base": base, "delta": delta, "merged": root / "merged"}


def export(work, name: str, **kw):
    out = work["root"] / name
    summary = run(
        MergeRecipe(
            base=str(work["base"]), delta=str(work["delta"]), out=str(out), format="hf", **kw
        )
    )
    return out, summary


def test_fp32_export_equals_the_merged_quantized_model(work):
    out, summary = export(work, "hf32", dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.float32
    merged = load_quantized(work["merged"], dtype=torch.float32)
    torch.testing.assert_close(logits(model), logits(merged.model), rtol=1e-5, atol=1e-5)

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not (out / "quantize_config.json").exists()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok("hello world")["input_ids"]
    meta = json.loads((out / "peqa.json").read_text())
    gptq_meta = json.loads((work["merged"] / "peqa.json").read_text())
    assert meta["kind"] == "merged-hf-export" and meta["dtype"] == "float32"
    assert meta["merged_fingerprint"] == gptq_meta["fingerprint"] == summary["fingerprint"]
    assert summary["output_bytes"] > 3 * summary["base_bytes"]


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-2), ("bfloat16", 1e-1)])
def test_half_exports_load_in_their_dtype(work, dtype, tol):
    out, _ = export(work, f"hf-{dtype}", dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == getattr(torch, dtype)
    merged = load_quantized(work["merged"], dtype=torch.float32)
    with torch.no_grad():
        got = model.float()(IDS).logits
    torch.testing.assert_close(got, logits(merged.model), rtol=tol, atol=tol)


def test_sharded_export_has_an_index(work):
    out, _ = export(work, "hf-sharded", dtype="float32", max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and shards == {p.name for p in out.glob("*.safetensors")}
    assert "model.layers.0.mlp.down_proj.weight" in index["weight_map"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    merged = load_quantized(work["merged"], dtype=torch.float32)
    torch.testing.assert_close(logits(model), logits(merged.model), rtol=1e-5, atol=1e-5)
