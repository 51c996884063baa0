"""Checkpoints: streaming quantize == in-memory quantize, exact reload, meta-device loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from peqa_cli.io.checkpoint import load_quantized, quant_layers, read_quant_spec
from peqa_cli.quant.replace import quantize_model_
from peqa_cli.recipes.quantize import QuantizeRecipe, QuantSettings, run
from tests.conftest import make_tiny_llama


def quantize_dir(src, out, bits, group_size, **kw):
    return run(
        QuantizeRecipe(
            model=str(src),
            out=str(out),
            quant=QuantSettings(bits=bits, group_size=group_size),
            **kw,
        )
    )


@pytest.mark.parametrize("bits,group_size", [(4, -1), (3, 32), (2, 48), (8, 128)])
def test_reload_gives_exact_logits_of_in_memory_model(tmp_path, tiny_llama_dir, bits, group_size):
    out = tmp_path / "q"
    summary = quantize_dir(tiny_llama_dir, out, bits, group_size)
    assert summary["quantized_layers"] == 14  # 7 linears x 2 blocks; lm_head stays float

    reference = make_tiny_llama()  # same seed and fp16 rounding as the saved model
    quantize_model_(reference, bits, group_size)
    loaded = load_quantized(out, dtype=torch.float32)
    assert set(loaded.layers) == set(quant_layers(reference))
    ids = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        a = reference(ids).logits
        b = loaded.model(ids).logits
    assert torch.equal(a, b)


def test_checkpoint_layout_and_metadata(tmp_path, tiny_llama_dir):
    out = tmp_path / "q"
    quantize_dir(tiny_llama_dir, out, 3, 32)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert {
        k: qc[k]
        for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")
    } == {
        "quant_method": "gptq",
        "bits": 3,
        "group_size": 32,
        "sym": False,
        "desc_act": False,
        "checkpoint_format": "gptq_v2",
    }
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        name = "model.layers.0.mlp.down_proj"  # K=160: groups of 32 -> 5
        assert f.get_tensor(f"{name}.qweight").shape == (160 * 3 // 32, 64)
        assert f.get_tensor(f"{name}.qweight").dtype == torch.int32
        assert f.get_tensor(f"{name}.qzeros").shape == (5, 64 * 3 // 32)
        assert f.get_tensor(f"{name}.scales").dtype == torch.float16
        assert f.get_tensor(f"{name}.scales").shape == (5, 64)
        assert torch.equal(
            f.get_tensor(f"{name}.g_idx"), torch.arange(160, dtype=torch.int32) // 32
        )
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
        assert "lm_head.weight" not in f.keys()  # tied
    meta = json.loads((out / "peqa.json").read_text())
    assert len(meta["fingerprint"]) == 64
    assert set(meta["layers"]) == {n for n in meta["layers"] if n.startswith("model.layers.")}
    assert all(0 < v["relative_error"] < 1 for v in meta["layers"].values())
    assert meta["source"]["fingerprint"]
    assert read_quant_spec(out).bits == 3


def test_fingerprint_is_stable_and_sensitive(tmp_path, tiny_llama_dir):
    a = quantize_dir(tiny_llama_dir, tmp_path / "a", 4, -1)["fingerprint"]
    b = quantize_dir(tiny_llama_dir, tmp_path / "b", 4, -1)["fingerprint"]
    c = quantize_dir(tiny_llama_dir, tmp_path / "c", 4, 32)["fingerprint"]
    assert a == b != c
    # A loaded checkpoint recomputes the same fingerprint from its tensors.
    (tmp_path / "a" / "peqa.json").unlink()
    assert load_quantized(tmp_path / "a").fingerprint == a


def test_sharded_output_equals_single_file(tmp_path, tiny_llama_dir):
    quantize_dir(tiny_llama_dir, tmp_path / "one", 4, 32)
    quantize_dir(tiny_llama_dir, tmp_path / "many", 4, 32, max_shard_size="20KB")
    shards = sorted((tmp_path / "many").glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(
            load_quantized(tmp_path / "one").model(ids).logits,
            load_quantized(tmp_path / "many").model(ids).logits,
        )


def test_load_never_materializes_float_weights(tmp_path, tiny_llama_dir):
    quantize_dir(tiny_llama_dir, tmp_path / "q", 4, 32)
    model = load_quantized(tmp_path / "q").model
    for name, layer in quant_layers(model).items():
        assert not hasattr(layer, "weight"), name
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_untied_model_with_bias(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg).eval()  # q/k/v projections carry a bias
    model.half().save_pretrained(tmp_path / "src")
    quantize_dir(tmp_path / "src", tmp_path / "q", 4, 32)
    loaded = load_quantized(tmp_path / "q").model
    assert loaded.model.layers[0].self_attn.q_proj.bias is not None
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        ref = model.float()(ids).logits
        got = loaded(ids).logits
    assert torch.allclose(ref, got, atol=0.1 * ref.abs().max().item())


def test_row_chunking_changes_nothing(tmp_path, tiny_llama_dir, monkeypatch):
    import peqa_cli.recipes.quantize as qmod

    whole = quantize_dir(tiny_llama_dir, tmp_path / "whole", 3, 48)
    monkeypatch.setattr(qmod, "CHUNK_ELEMENTS", 32 * 64)  # 32 rows per step
    chunked = quantize_dir(tiny_llama_dir, tmp_path / "chunked", 3, 48)
    assert chunked["fingerprint"] == whole["fingerprint"]
    a = json.loads((tmp_path / "whole" / "peqa.json").read_text())["layers"]
    b = json.loads((tmp_path / "chunked" / "peqa.json").read_text())["layers"]
    for name in a:
        assert a[name]["relative_error"] == pytest.approx(b[name]["relative_error"], abs=2e-6)


def test_recorded_error_is_the_relative_reconstruction_error(tmp_path, tiny_llama_dir):
    from peqa_cli.quant.primitives import dequantize, quantize_weight, relative_error

    quantize_dir(tiny_llama_dir, tmp_path / "q", 4, 32)
    meta = json.loads((tmp_path / "q" / "peqa.json").read_text())
    w = make_tiny_llama().model.layers[1].mlp.up_proj.weight.detach()
    r = quantize_weight(w, 4, 32)
    want = relative_error(w, dequantize(r["q"], r["scales"], r["zeros"], r["g_idx"]))
    assert meta["layers"]["model.layers.1.mlp.up_proj"]["relative_error"] == pytest.approx(
        want, abs=2e-6
    )
