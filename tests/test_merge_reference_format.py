"""An independent GPTQ reader and writer, from the published format (../shared/GPTQ_FORMAT.md).

Nothing here calls peqa's packing or dequantization: values are packed and unpacked bit by
bit in numpy, and weights rebuilt from the published rule
``W[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]`` (v1 stores z - 1, readers add 1
back modulo 2^b). The merge tests use :func:`reference_model` to load peqa's checkpoints
through it; the tests below check peqa's loader on checkpoints this module writes by hand
(v1, v2, and desc_act with a permuted group assignment).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from peqa_cli.io.checkpoint import load_quantized, quant_layers
from peqa_cli.quant import bitpack
from tests.conftest import make_tiny_llama

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------- packing, bit by bit


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """[R, C] values -> int32 [R*b/32, C]: value j of a column at stream bits j*b .. j*b+b-1."""
    rows, cols = values.shape
    assert rows * bits % 32 == 0
    words = np.zeros((rows * bits // 32, cols), dtype=np.uint64)
    v = values.astype(np.uint64)
    for j in range(rows):
        for i in range(bits):
            pos = j * bits + i
            words[pos // 32] |= ((v[j] >> np.uint64(i)) & np.uint64(1)) << np.uint64(pos % 32)
    return words.astype(np.uint32).view(np.int32)


def unpack_bits(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """int32 [W, C] -> int64 [count, C], the inverse of :func:`pack_bits`."""
    w = words.view(np.uint32).astype(np.uint64)
    out = np.zeros((count, w.shape[1]), dtype=np.int64)
    for j in range(count):
        for i in range(bits):
            pos = j * bits + i
            bit = (w[pos // 32] >> np.uint64(pos % 32)) & np.uint64(1)
            out[j] |= bit.astype(np.int64) << i
    return out


# ---------------------------------------------------------------- reading


def read_layer(tensors: dict, name: str, bits: int, v1: bool) -> torch.Tensor:
    """Float weight [N, K] of one quantized linear, from the published rule."""
    qweight = tensors[f"{name}.qweight"].numpy()
    qzeros = tensors[f"{name}.qzeros"].numpy()
    scales = tensors[f"{name}.scales"].double().numpy()
    g_idx = tensors[f"{name}.g_idx"].numpy().astype(np.int64)
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    q = unpack_bits(qweight, bits, k)  # [K, N]
    z = unpack_bits(np.ascontiguousarray(qzeros.T), bits, n).T  # packed along N -> [G, N]
    if v1:
        z = (z + 1) % (1 << bits)
    w = (q - z[g_idx]) * scales[g_idx]  # [K, N]
    return torch.from_numpy(w.T.copy()).float()


def read_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and a float state dict (every quantized linear as ``.weight``)."""
    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq"
    v1 = qc.get("checkpoint_format", "gptq") == "gptq"
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    layers = {k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")}
    state = {f"{name}.weight": read_layer(tensors, name, qc["bits"], v1) for name in layers}
    for k, t in tensors.items():
        if k.rpartition(".")[0] not in layers or k.endswith(".bias"):  # float tensors as is
            state[k] = t.float()
    return config, state


def reference_model(folder: Path) -> torch.nn.Module:
    """A plain transformers model (no peqa, no quantization) holding the checkpoint's weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config, state = read_checkpoint(folder)
    cfg = AutoConfig.for_model(
        **{k: v for k, v in config.items() if k not in ("quantization_config", "architectures")}
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"} and (not missing or cfg.tie_word_embeddings)
    model.tie_weights()
    return model


# ---------------------------------------------------------------- writing by hand


def random_layer(rng: np.random.Generator, n: int, k: int, bits: int, gs: int, desc_act: bool):
    """Random integers, zero-points (0 and 2^b - 1 included) and fp16 scales for one linear."""
    g = k // gs
    if desc_act:  # act-order: columns visited in a permuted order, groups of gs along it
        g_idx = np.empty(k, dtype=np.int32)
        g_idx[rng.permutation(k)] = np.arange(k) // gs
    else:
        g_idx = (np.arange(k) // gs).astype(np.int32)
    q = rng.integers(0, 1 << bits, size=(k, n))
    z = rng.integers(0, 1 << bits, size=(g, n))
    z[0, 0], z[0, 1] = 0, (1 << bits) - 1  # the v1 wrap-around cases
    s = (rng.uniform(0.5, 1.5, size=(g, n)) * 0.1 / (1 << bits)).astype(np.float16)
    return q, z, s, g_idx


def write_by_hand(
    folder: Path, bits: int, gs: int, fmt: str, desc_act: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A GPTQ checkpoint (``fmt`` "gptq" = v1 or "gptq_v2") of the tiny Llama, packed here.

    Returns the float weight [N, K] of every quantized linear, from the published rule.
    """
    rng = np.random.default_rng(seed)
    model = make_tiny_llama(seed)
    folder.mkdir(parents=True)
    tensors = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    tensors.pop("lm_head.weight")  # tied
    weights = {}
    for i in range(model.config.num_hidden_layers):
        for lin in LINEARS:
            part = "self_attn" if lin.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            name = f"model.layers.{i}.{part}.{lin}"
            n, k = tensors.pop(f"{name}.weight").shape
            q, z, s, g_idx = random_layer(rng, n, k, bits, gs, desc_act)
            stored_z = (z - 1) % (1 << bits) if fmt == "gptq" else z
            tensors[f"{name}.qweight"] = torch.from_numpy(pack_bits(q, bits))
            tensors[f"{name}.qzeros"] = torch.from_numpy(
                np.ascontiguousarray(pack_bits(stored_z.T, bits).T)
            )
            tensors[f"{name}.scales"] = torch.from_numpy(s)
            tensors[f"{name}.g_idx"] = torch.from_numpy(g_idx)
            w = (q - z[g_idx]) * s.astype(np.float64)[g_idx]
            weights[name] = torch.from_numpy(w.T.copy()).float()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": gs,
        "sym": False,
        "desc_act": desc_act,
        "checkpoint_format": fmt,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "quantize_config.json").write_text(
        json.dumps({"bits": bits, "group_size": gs, "desc_act": desc_act, "sym": False})
    )
    return weights


# ---------------------------------------------------------------- tests of the reference itself


def test_packing_follows_the_published_bit_stream():
    # 4 bits: eight values per word, lowest bits first.
    words = pack_bits(np.arange(8).reshape(8, 1), 4)
    assert words.view(np.uint32)[0, 0] == 0x76543210
    # 3 bits: 32 values in 3 words; value 10 occupies stream bits 30-32 across words 0 and 1.
    vals = np.zeros((32, 1), dtype=np.int64)
    vals[10] = 0b111
    w = pack_bits(vals, 3).view(np.uint32)[:, 0]
    assert list(w) == [0xC0000000, 0x1, 0x0]
    assert unpack_bits(pack_bits(vals, 3), 3, 32)[10, 0] == 7


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_peqa_bitpack_agrees_with_the_reference(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, size=(64, 5))
    ours = pack_bits(q, bits)
    assert np.array_equal(bitpack.pack_rows(torch.from_numpy(q), bits).numpy(), ours)
    assert np.array_equal(unpack_bits(ours, bits, 64), q)


@pytest.mark.parametrize(
    "bits,fmt,desc_act",
    [
        (4, "gptq", False),
        (3, "gptq", False),
        (2, "gptq", True),
        (4, "gptq_v2", True),
        (8, "gptq", True),
    ],
)
def test_peqa_reads_hand_made_checkpoints(tmp_path, bits, fmt, desc_act):
    """v1 (z - 1, wrap-around at z = 0) and desc_act (permuted g_idx) read as published."""
    weights = write_by_hand(tmp_path / "ckpt", bits, 32, fmt, desc_act)
    loaded = load_quantized(tmp_path / "ckpt", dtype=torch.float32)
    assert loaded.spec.checkpoint_format == fmt
    layers = quant_layers(loaded.model)
    assert set(layers) == set(weights)
    for name, w in weights.items():
        assert torch.equal(layers[name].dequantized_weight(torch.float32), w), name
    ref = reference_model(tmp_path / "ckpt")
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = loaded.model(ids).logits, ref(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
