"""``peqa merge --format gptq``: bytes, scales, logits, metadata, task switching, recipes.

Also home of the helpers the other merge tests share: :func:`make_base` (a tiny random
Llama quantized by ``peqa quantize``) and :func:`make_delta` (a random scale delta saved
with ``save_delta``, as ``peqa finetune`` would write one).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from peqa_cli.cli import app
from peqa_cli.config import load_config
from peqa_cli.io.checkpoint import (
    QUANT_SUFFIXES,
    combine_digests,
    load_quantized,
    quant_layers,
    tensor_digest,
)
from peqa_cli.io.delta import apply_delta, load_delta, remove_delta, save_delta
from peqa_cli.recipes.merge import MergeRecipe, run
from peqa_cli.recipes.quantize import QuantizeRecipe, QuantSettings
from peqa_cli.recipes.quantize import run as quantize
from peqa_cli.testing import random_delta
from tests.conftest import make_tiny_llama
from tests.test_merge_reference_format import reference_model

IDS = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- shared helpers


def make_base(folder: Path, bits: int = 4, group_size: int = 32, seed: int = 0, **kw) -> Path:
    """A tiny random Llama saved as fp16, then quantized by ``peqa quantize``."""
    src = folder / f"src-{seed}"
    if not src.exists():
        make_tiny_llama(seed).half().save_pretrained(src)
    out = folder / f"base-w{bits}g{group_size}-{seed}"
    quant = QuantSettings(bits=bits, group_size=group_size)
    quantize(QuantizeRecipe(model=str(src), out=str(out), quant=quant, **kw))
    return out


def make_delta(base: Path, out: Path, seed: int = 0, rel: float = 0.05, **config) -> Path:
    """Δs = rel * s0 * N(0, 1) on every layer, keyed to ``base``'s fingerprint."""
    recipe = {"task": f"synthetic-{seed}", "lr": 1e-4}
    return random_delta(base, out, rel=rel, seed=seed, **{"recipe": recipe, **config})


def file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(IDS).logits


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    base = make_base(root)
    a = make_delta(base, root / "delta-a", seed=1)
    b = make_delta(base, root / "delta-b", seed=2)
    run(MergeRecipe(base=str(base), delta=str(a), out=str(root / "merged-a")))
    return {"root": root, "base": base, "a": a, "b": b, "merged": root / "merged-a"}


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, -1), (2, 64), (8, 32)])
def test_integers_and_zeros_are_byte_identical_scales_are_rounded_sums(tmp_path, bits, group_size):
    base = make_base(tmp_path, bits, group_size)
    delta = make_delta(base, tmp_path / "d")
    summary = run(MergeRecipe(base=str(base), delta=str(delta), out=str(tmp_path / "m")))
    before, after = file_tensors(base), file_tensors(tmp_path / "m")
    assert list(before) == list(after)  # same tensors, same order
    d = load_delta(delta).deltas
    for k, t in before.items():
        if k.endswith(".scales"):
            assert after[k].dtype == torch.float16
            expected = (t.float() + d[k[: -len(".scales")]]).half()
            assert torch.equal(after[k], expected), k
            assert not torch.equal(after[k], t)
        else:  # qweight, qzeros, g_idx and every float tensor: the base's bytes
            assert after[k].dtype == t.dtype and raw_bytes(after[k]) == raw_bytes(t), k
    assert summary["layers_merged"] == 14 and summary["output_bytes"] == summary["base_bytes"]
    for name in ("config.json", "quantize_config.json", "generation_config.json"):
        assert (tmp_path / "m" / name).read_bytes() == (base / name).read_bytes()


def test_merged_logits_equal_base_plus_delta_with_fp16_scales(work):
    merged = load_quantized(work["merged"], dtype=torch.float32)
    mem = load_quantized(work["base"], dtype=torch.float32)
    apply_delta(mem.model, load_delta(work["a"]))
    fp32_scales = logits(mem.model)
    for layer in quant_layers(mem.model).values():
        layer.scales.data.copy_(layer.scales.data.half().float())  # the checkpoint's rounding
    assert torch.equal(logits(merged.model), logits(mem.model))
    # fp16 rounding of the scales is all that separates them from the fp32 in-memory model.
    torch.testing.assert_close(fp32_scales, logits(merged.model), rtol=1e-2, atol=1e-2)


def test_peqa_json_records_the_delta_and_a_new_fingerprint(work):
    meta = json.loads((work["merged"] / "peqa.json").read_text())
    base_fp = json.loads((work["base"] / "peqa.json").read_text())["fingerprint"]
    tensors = file_tensors(work["merged"])
    recomputed = combine_digests(
        {k: tensor_digest(t) for k, t in tensors.items() if k.endswith(QUANT_SUFFIXES)}
    )
    assert meta["kind"] == "merged" and meta["checkpoint_format"] == "gptq_v2"
    assert meta["fingerprint"] == recomputed != base_fp
    assert meta["base_fingerprint"] == base_fp == meta["delta"]["base_fingerprint"]
    assert meta["delta"]["path"] == str(work["a"]) and meta["delta"]["layers"] == 14
    assert meta["delta"]["recipe"]["recipe"] == {"task": "synthetic-1", "lr": 1e-4}
    assert meta["base"]["source"]["path"].endswith("src-0") and meta["warnings"] == []
    assert load_quantized(work["merged"]).fingerprint == recomputed


def test_merged_checkpoint_reads_through_an_independent_reader(work):
    ours = load_quantized(work["merged"], dtype=torch.float32)
    ref = reference_model(work["merged"])
    torch.testing.assert_close(logits(ours.model), logits(ref), rtol=1e-5, atol=1e-5)


def test_swapping_deltas_returns_bit_identical_logits(work):
    q = load_quantized(work["base"], dtype=torch.float32)
    a, b = load_delta(work["a"]), load_delta(work["b"])
    base = logits(q.model)
    apply_delta(q.model, a)
    first_a = logits(q.model)
    apply_delta(q.model, b)
    only_b = logits(q.model)
    apply_delta(q.model, a)
    assert torch.equal(logits(q.model), first_a)
    assert not torch.equal(only_b, first_a)
    remove_delta(q.model)
    assert torch.equal(logits(q.model), base)


def test_a_merged_checkpoint_is_a_base_for_new_deltas(work, tmp_path):
    """Deltas are keyed by fingerprint: the original base's deltas no longer fit the merge."""
    on_merged = make_delta(work["merged"], tmp_path / "d2", seed=3)
    run(MergeRecipe(base=str(work["merged"]), delta=str(on_merged), out=str(tmp_path / "m2")))
    meta = json.loads((tmp_path / "m2" / "peqa.json").read_text())
    assert (
        meta["base_fingerprint"]
        == json.loads((work["merged"] / "peqa.json").read_text())["fingerprint"]
    )
    with pytest.raises(Exception, match="belongs to another base"):
        run(MergeRecipe(base=str(work["merged"]), delta=str(work["b"]), out=str(tmp_path / "m3")))


def test_sharded_base_keeps_its_shard_layout(tmp_path):
    base = make_base(tmp_path, max_shard_size="30KB")
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 1
    delta = make_delta(base, tmp_path / "d")
    run(MergeRecipe(base=str(base), delta=str(delta), out=str(tmp_path / "m")))
    assert sorted(p.name for p in (tmp_path / "m").glob("*.safetensors")) == shards
    index = "model.safetensors.index.json"
    assert (tmp_path / "m" / index).read_bytes() == (base / index).read_bytes()
    for shard in shards:
        with (
            safe_open(str(base / shard), "pt") as a,
            safe_open(str(tmp_path / "m" / shard), "pt") as b,
        ):
            assert list(a.keys()) == list(b.keys())
    load_quantized(tmp_path / "m")


def test_partial_delta_and_sign_change_warning(work, tmp_path, caplog):
    q = load_quantized(work["base"])
    name = q.layers[0]
    s0 = quant_layers(q.model)[name].scales.detach()
    d = torch.zeros_like(s0)
    d[0, :3] = -2 * s0[0, :3]  # three scales flip sign
    cfg = {"base_fingerprint": q.fingerprint, "bits": 4, "group_size": 32}
    save_delta(tmp_path / "d", {name: d}, cfg)
    summary = run(
        MergeRecipe(base=str(work["base"]), delta=str(tmp_path / "d"), out=str(tmp_path / "m"))
    )
    assert summary["warnings"] == 1 and summary["layers_merged"] == 1
    assert "3 merged scales in 1 layers changed sign" in caplog.text
    meta = json.loads((tmp_path / "m" / "peqa.json").read_text())
    assert "changed sign" in meta["warnings"][0]
    before, after = file_tensors(work["base"]), file_tensors(tmp_path / "m")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [f"{name}.scales"]


def test_cli_and_recipe(work, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(
        app, ["merge", str(work["base"]), str(work["a"]), "--out", str(out), "--json"]
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert {"base_bytes", "delta_bytes", "output_bytes", "fingerprint"} <= set(summary)
    assert file_tensors(out).keys() == file_tensors(work["merged"]).keys()
    assert json.loads((out / "peqa.json").read_text())["fingerprint"] == summary["fingerprint"]

    recipe = tmp_path / "merge.yaml"
    recipe.write_text(
        f"base: {work['base']}\ndelta: {work['a']}\nout: {tmp_path / 'from-recipe'}\nformat: hf\n"
    )
    cfg = load_config(MergeRecipe, recipe, ["dtype=float32"], {})
    assert (cfg.format, cfg.dtype, cfg.overwrite) == ("hf", "float32", False)
    res = runner.invoke(app, ["merge", str(recipe), "dtype=bfloat16", "--print-config"])
    assert res.exit_code == 0 and "dtype: bfloat16" in res.stdout and "format: hf" in res.stdout
    res = runner.invoke(app, ["merge", str(recipe), "format=gptq"])
    assert res.exit_code == 0, res.output
    assert "sizes: base" in res.stdout
    assert (tmp_path / "from-recipe" / "quantize_config.json").is_file()
