"""End-to-end ``peqa quantize`` (and ``peqa recipes``) through the CLI on a tiny random Llama.

Bad input must give exit code 2, exactly one line on stderr naming the problem, no
traceback, and nothing written: no output folder and no temporary folder beside it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from peqa_cli.cli import app
from peqa_cli.testing import tiny_llama as build_tiny_llama

runner = CliRunner()
N_LINEARS = 2 * 7  # layers x (q, k, v, o, gate, up, down)
SIDE = {"tokenizer_config.json": '{"model_max_length": 64}', "special_tokens_map.json": "{}"}


def _tiny_llama(path: Path, **save_kw) -> Path:
    model = build_tiny_llama(intermediate_size=128, max_position_embeddings=64,
                             tie_word_embeddings=False).to(torch.float16)  # fmt: skip
    model.save_pretrained(path, **save_kw)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A float16 tiny Llama folder with (dummy) tokenizer files beside it."""
    path = _tiny_llama(tmp_path_factory.mktemp("models") / "tiny")
    for name, text in SIDE.items():
        (path / name).write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny_sharded(tmp_path_factory, tiny) -> Path:
    """The same weights saved in several shards with an index file."""
    path = _tiny_llama(tmp_path_factory.mktemp("models") / "tiny-sharded", max_shard_size="100KB")
    assert len(list(path.glob("*.safetensors"))) > 1
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.fixture
def outs(tmp_path) -> Path:
    """An empty parent for output folders, to check that failures leave nothing in it."""
    d = tmp_path / "outs"
    d.mkdir()
    return d


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI points the root logger at CliRunner's stderr, which closes after each call."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def quantize(*args: object):
    return runner.invoke(app, ["quantize", *map(str, args)])


def ok(result) -> None:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)


def one_error_line(result, *fragments: str) -> str:
    """Exit 2, one ``peqa: error:`` line on stderr containing every fragment, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("peqa: error: "), lines[0]
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def nothing_written(outs: Path) -> None:
    assert list(outs.iterdir()) == []


# ---------------------------------------------------------------- success paths


def test_quantize_writes_gptq_v2_checkpoint(tiny, outs):
    out = outs / "ck"
    result = quantize(tiny, "--bits", "4", "--group-size", "32", "--out", out)
    ok(result)
    assert f"out: {out}" in result.stdout
    assert sorted(p.name for p in outs.iterdir()) == ["ck"]  # no temp folder left beside it

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act")} == {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 32,
        "sym": False,
        "desc_act": False,
    }
    assert qc["checkpoint_format"] == "gptq_v2"
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    for name, text in SIDE.items():
        assert (out / name).read_text() == text

    meta = json.loads((out / "peqa.json").read_text())
    assert len(meta["fingerprint"]) == 64
    assert len(meta["source"]["fingerprint"]) == 64
    assert len(meta["layers"]) == N_LINEARS
    assert all(0 < v["relative_error"] < 0.2 for v in meta["layers"].values())

    tensors = load_file(out / "model.safetensors")
    q = "model.layers.0.mlp.down_proj"  # [N=64, K=128]: 4 groups of 32
    assert tensors[f"{q}.qweight"].shape == (128 * 4 // 32, 64)
    assert tensors[f"{q}.qzeros"].shape == (4, 64 * 4 // 32)
    assert tensors[f"{q}.scales"].shape == (4, 64)
    assert tensors[f"{q}.scales"].dtype == torch.float16
    assert f"{q}.weight" not in tensors
    assert tensors["lm_head.weight"].dtype == torch.float16  # float parts stay float


def test_checkpoint_loads_back_close_to_the_float_model(tiny, outs):
    from peqa_cli.io.checkpoint import load_quantized, quant_layers

    out = outs / "ck"
    ok(quantize(tiny, "-b", "8", "-g", "-1", "-o", out))
    qm = load_quantized(out)
    assert qm.spec.bits == 8 and qm.spec.group_size == -1
    assert qm.fingerprint == json.loads((out / "peqa.json").read_text())["fingerprint"]
    src = load_file(tiny / "model.safetensors")
    layers = quant_layers(qm.model)
    assert len(layers) == N_LINEARS
    for name, layer in layers.items():
        w = src[f"{name}.weight"].float()
        err = (layer.dequantized_weight(torch.float32) - w).norm() / w.norm()
        assert err < 0.01, name  # 8-bit per channel is near-lossless


def test_json_output_parses(tiny, outs):
    result = quantize(tiny, "--bits", "3", "--group-size", "32", "--out", outs / "ck", "--json")
    ok(result)
    summary = json.loads(result.stdout)
    assert summary["bits"] == 3 and summary["group_size"] == 32
    assert summary["quantized_layers"] == N_LINEARS
    assert summary["output_bytes"] > 0
    assert (
        summary["fingerprint"] == json.loads((outs / "ck" / "peqa.json").read_text())["fingerprint"]
    )


def test_print_config_prints_resolved_recipe_and_writes_nothing(tiny, outs):
    import yaml

    result = quantize(
        tiny, "--bits", "2", "--out", outs / "ck", "max_shard_size=1GB", "--print-config"
    )
    ok(result)
    cfg = yaml.safe_load(result.stdout)
    assert cfg["model"] == str(tiny)
    assert cfg["out"] == str(outs / "ck")
    assert cfg["quant"] == {"bits": 2, "group_size": -1, "include": [], "exclude": []}
    assert cfg["max_shard_size"] == "1GB"
    nothing_written(outs)


def test_recipe_yaml_then_overrides_then_flags(tiny, outs, tmp_path):
    recipe = tmp_path / "q.yaml"
    recipe.write_text(
        f"model: {tiny}\nout: {outs / 'from-yaml'}\nmax_shard_size: 1GB\n"
        "quant:\n  bits: 8\n  group_size: 64\n"
    )
    result = quantize(
        recipe, "quant.bits=3", "quant.group_size=32", "--bits", "2", "--print-config"
    )
    ok(result)
    import yaml

    cfg = yaml.safe_load(result.stdout)
    assert cfg["quant"]["bits"] == 2  # flag beats override beats YAML
    assert cfg["quant"]["group_size"] == 32  # override beats YAML
    assert cfg["max_shard_size"] == "1GB"  # YAML beats default
    assert cfg["model"] == str(tiny)

    ok(quantize(recipe, "quant.group_size=32", "--out", outs / "ck"))
    qc = json.loads((outs / "ck" / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"]) == (8, 32)
    assert not (outs / "from-yaml").exists()


def test_sharded_output_has_an_index(tiny, outs):
    out = outs / "ck"
    ok(quantize(tiny, "--bits", "4", "--group-size", "32", "--out", out, "max_shard_size=40KB"))
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and "model.safetensors" not in shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    names = {k for s in shards for k in load_file(out / s)}
    assert names == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for s in shards for t in load_file(out / s).values()
    )


def test_sharded_input_gives_the_same_checkpoint(tiny, tiny_sharded, outs):
    ok(quantize(tiny, "--bits", "4", "--group-size", "32", "--out", outs / "a"))
    ok(quantize(tiny_sharded, "--bits", "4", "--group-size", "32", "--out", outs / "b"))
    a, b = load_file(outs / "a" / "model.safetensors"), load_file(outs / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    meta_a, meta_b = (json.loads((outs / d / "peqa.json").read_text()) for d in "ab")
    assert meta_a["fingerprint"] == meta_b["fingerprint"]


def test_overwrite_replaces_existing_output(tiny, outs):
    out = outs / "ck"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    one_error_line(quantize(tiny, "--bits", "4", "--out", out), str(out), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # untouched

    ok(quantize(tiny, "--bits", "4", "--out", out, "--overwrite"))
    assert not (out / "old.txt").exists()
    assert (out / "peqa.json").is_file()
    assert sorted(p.name for p in outs.iterdir()) == ["ck"]


# ---------------------------------------------------------------- bad input


def test_missing_model_path(tmp_path, outs):
    missing = tmp_path / "no-such-model"
    one_error_line(quantize(missing, "--out", outs / "ck"), "model not found", str(missing))
    nothing_written(outs)


def test_folder_without_config(tmp_path, outs):
    d = tmp_path / "empty"
    d.mkdir()
    one_error_line(quantize(d, "--out", outs / "ck"), str(d), "config.json")
    nothing_written(outs)


def test_bert_folder_is_not_a_causal_lm(tmp_path, outs):
    from transformers import BertConfig, BertModel

    d = tmp_path / "bert"
    cfg = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    BertModel(cfg).save_pretrained(d)
    one_error_line(
        quantize(d, "--out", outs / "ck"), str(d), "not a causal language model", "BertModel"
    )
    nothing_written(outs)


def test_folder_of_unknown_model_type(tmp_path, outs):
    d = tmp_path / "t5"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "t5"}')
    (d / "model.safetensors").write_bytes(b"")
    one_error_line(quantize(d, "--out", outs / "ck"), str(d), "not a causal language model", "t5")
    nothing_written(outs)


def test_config_without_architectures_is_accepted(tiny, tmp_path, outs):
    d = tmp_path / "no-arch"
    shutil.copytree(tiny, d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["architectures"]  # older or hand-written configs; model_type llama is enough
    (d / "config.json").write_text(json.dumps(cfg))
    ok(quantize(d, "--bits", "4", "--out", outs / "ck"))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(tiny, tmp_path, outs, damage):
    d = tmp_path / "broken"
    shutil.copytree(tiny, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    if damage == "garbage":
        f.write_bytes(os.urandom(len(data)))
    else:
        f.write_bytes(data[: len(data) // 2])
    one_error_line(quantize(d, "--out", outs / "ck"), "corrupt or truncated", str(f))
    nothing_written(outs)


@pytest.mark.parametrize("bits", ["1", "5"])
def test_unsupported_bits(tiny, outs, bits):
    one_error_line(
        quantize(tiny, "--bits", bits, "--out", outs / "ck"), "quant.bits", bits, "2, 3, 4, 8"
    )
    nothing_written(outs)


@pytest.mark.parametrize("gs", ["0", "-2"])
def test_bad_group_size(tiny, outs, gs):
    one_error_line(
        quantize(tiny, "--group-size", gs, "--out", outs / "ck"), "quant.group_size", gs, "-1"
    )
    nothing_written(outs)


def test_yaml_syntax_error(tmp_path, outs):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: x\nquant: [bits: 4\nout: y\n")
    one_error_line(quantize(recipe, "--out", outs / "ck"), str(recipe), "YAML syntax error", "line")
    nothing_written(outs)


def test_unknown_recipe_key(tiny, outs):
    one_error_line(
        quantize(tiny, "quant.bitz=4", "--out", outs / "ck"), "unknown key 'quant.bitz'", "bits"
    )
    nothing_written(outs)


def test_wrong_type(tiny, outs):
    result = quantize(tiny, "quant.bits=three", "--out", outs / "ck")
    one_error_line(result, "quant.bits", "integer", "three")
    nothing_written(outs)


def test_wrong_type_is_one_problem(tiny, outs):
    line = one_error_line(quantize(tiny, "quant.bits=three", "--out", outs / "ck"))
    assert line == "peqa: error: quant.bits: expected an integer, got 'three'"


def test_several_problems_listed_at_once(tiny, outs):
    result = quantize(
        tiny, "quant.bits=1", "quant.group_size=0", "colour=red", "--out", outs / "ck"
    )
    line = one_error_line(result, "3 problems", "quant.bits", "quant.group_size", "'colour'")
    assert line.count(";") == 2
    nothing_written(outs)


def test_hub_id_offline(tmp_path, outs, monkeypatch):
    """HF_HUB_OFFLINE=1: every hub request raises before any socket opens. The env var is
    read when huggingface_hub is imported (already done here), so the constant is set too."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    result = quantize("peqa-test/no-such-model", "--out", outs / "ck")
    one_error_line(result, "cannot fetch 'peqa-test/no-such-model'", "local model folder")
    nothing_written(outs)
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("*.safetensors"))


# ---------------------------------------------------------------- peqa recipes


@pytest.fixture
def recipes(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "recipes"
    d.mkdir()
    (d / "tiny_w4.yaml").write_text(
        "# Quantize the tiny model to 4 bits.\n# Run: peqa quantize tiny_w4\nquant:\n  bits: 4\n"
    )
    (d / "tiny_ft.yaml").write_text("# Fine-tune scales.\n# Run: peqa finetune tiny_ft\n{}\n")
    monkeypatch.setenv("PEQA_RECIPES", str(d))
    return d


def test_recipes_lists_shipped_recipes(recipes):
    for args in (["recipes"], ["recipes", "ls"]):
        result = runner.invoke(app, args)
        ok(result)
        lines = result.stdout.strip().splitlines()
        assert len(lines) == 2
        assert lines[0].split()[:2] == ["tiny_ft", "finetune"]
        assert lines[1].split()[:2] == ["tiny_w4", "quantize"]
        assert "Quantize the tiny model to 4 bits." in lines[1]


def test_recipes_cp(recipes, tmp_path):
    dest = tmp_path / "mine"
    dest.mkdir()
    result = runner.invoke(app, ["recipes", "cp", "tiny_w4", str(dest)])
    ok(result)
    assert (dest / "tiny_w4.yaml").read_text() == (recipes / "tiny_w4.yaml").read_text()
    assert result.stdout.strip() == str(dest / "tiny_w4.yaml")
    # Copying again would clobber the user's edits; an unknown name lists the known ones.
    one_error_line(runner.invoke(app, ["recipes", "cp", "tiny_w4", str(dest)]), "already exists")
    one_error_line(runner.invoke(app, ["recipes", "cp", "nope", str(dest)]), "nope", "tiny_w4")


def test_shipped_recipe_name_runs(tiny, recipes, outs):
    (recipes / "tiny_w4.yaml").write_text(f"# Tiny.\n# peqa quantize tiny_w4\nmodel: {tiny}\n")
    ok(quantize("tiny_w4", "--out", outs / "ck", "quant.group_size=32"))
    qc = json.loads((outs / "ck" / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"]) == (4, 32)
