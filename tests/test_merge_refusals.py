"""Every refusal of ``peqa merge``: one clear line, exit code 2, and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from peqa_cli.cli import app
from peqa_cli.io.delta import DELTA_CONFIG, DELTA_FILE, load_delta
from tests.test_merge_gptq import make_base, make_delta

LAYER = "model.layers.0.mlp.down_proj"  # scales [5, 64] at group size 32


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("refuse")
    base = make_base(root)
    good = make_delta(base, root / "good", seed=1)
    return {"root": root, "base": base, "good": good}


def hand_delta(work, folder: Path, tensors: dict, **config) -> Path:
    """A delta folder written without save_delta (which would refuse NaN itself)."""
    good = load_delta(work["good"])
    folder.mkdir()
    save_file({f"{k}.scales_delta": v for k, v in tensors.items()}, str(folder / DELTA_FILE))
    (folder / DELTA_CONFIG).write_text(json.dumps({**good.config, **config}))
    return folder


def refuse(work, tmp_path, delta, *extra, out=None) -> str:
    out = out or tmp_path / "out"
    before = sorted(p.name for p in out.parent.iterdir())
    res = CliRunner().invoke(
        app, ["merge", str(work["base"]), str(delta), "--out", str(out), *extra]
    )
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peqa: error: "), res.stderr
    assert "Traceback" not in res.output
    assert sorted(p.name for p in out.parent.iterdir()) == before  # no output, no temp folder
    return lines[0]


def test_missing_delta(work, tmp_path):
    assert "delta not found" in refuse(work, tmp_path, tmp_path / "nowhere")


def test_corrupt_delta_tensors(work, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(work["good"], bad)
    (bad / DELTA_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert "corrupt delta" in refuse(work, tmp_path, bad)


def test_corrupt_delta_config(work, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(work["good"], bad)
    (bad / DELTA_CONFIG).write_text("{")
    assert "corrupt delta" in refuse(work, tmp_path, bad)


def test_delta_for_another_base(work, tmp_path):
    other = make_base(tmp_path, seed=7)  # same architecture and shapes, other weights
    delta = make_delta(other, tmp_path / "other-delta")
    assert "belongs to another base" in refuse(work, tmp_path, delta)


@pytest.mark.parametrize("key,value", [("bits", 3), ("group_size", 64)])
def test_mismatched_bits_or_group_size(work, tmp_path, key, value):
    delta = make_delta(work["base"], tmp_path / "d", **{key: value})
    msg = refuse(work, tmp_path, delta)
    assert f"{key}={value}" in msg and "the base has bits=4, group_size=32" in msg


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_delta(work, tmp_path, value):
    d = torch.zeros(5, 64)
    d[2, 3] = value
    assert "NaN or inf" in refuse(
        work, tmp_path, hand_delta(work, tmp_path / "nonfinite", {LAYER: d})
    )


def test_merged_scales_overflowing_fp16(work, tmp_path):
    d = torch.zeros(5, 64)
    d[1, 1] = 70000.0  # finite in fp32, inf once rounded to the checkpoint's fp16
    msg = refuse(work, tmp_path, hand_delta(work, tmp_path / "overflow", {LAYER: d}))
    assert "overflow float16" in msg and "65504" in msg


def test_unknown_layer_and_wrong_shape(work, tmp_path):
    d = hand_delta(work, tmp_path / "unknown", {"model.layers.9.mlp.up_proj": torch.zeros(5, 64)})
    assert "is not a quantized layer of the base" in refuse(work, tmp_path, d)
    d = hand_delta(work, tmp_path / "shape", {LAYER: torch.zeros(4, 64)})
    assert "has shape [4, 64], the base expects [5, 64]" in refuse(work, tmp_path, d)


def test_existing_output_without_overwrite(work, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "already exists" in refuse(work, tmp_path, work["good"], out=out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    res = CliRunner().invoke(
        app, ["merge", str(work["base"]), str(work["good"]), "--out", str(out), "--overwrite"]
    )
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and (out / "peqa.json").is_file()


def test_not_a_quantized_base(work, tmp_path):
    res = CliRunner().invoke(
        app, ["merge", str(work["root"] / "src-0"), str(work["good"]), "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2 and "not a peqa/GPTQ checkpoint" in res.stderr
    assert not (tmp_path / "o").exists()


def test_base_modified_after_its_peqa_json(work, tmp_path):
    """Caught while streaming: the temporary folder goes, nothing reaches --out."""
    base = tmp_path / "tampered"
    shutil.copytree(work["base"], base)
    tensors = load_file(str(base / "model.safetensors"))
    tensors[f"{LAYER}.qweight"][0, 0] ^= 1  # one integer changed, peqa.json left as it was
    save_file(tensors, str(base / "model.safetensors"))
    work = {**work, "base": base}
    assert "do not match the fingerprint in its peqa.json" in refuse(work, tmp_path, work["good"])


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--format", "onnx"], "format: 'onnx' is not allowed (choose from gptq, hf)"),
        (["--dtype", "int8"], "dtype: 'int8' is not allowed"),
        (["max_shard_size=lots"], "max_shard_size"),
    ],
)
def test_bad_options(work, tmp_path, args, needle):
    assert needle in refuse(work, tmp_path, work["good"], *args)


def test_usage_errors(work, tmp_path):
    res = CliRunner().invoke(app, ["merge", str(work["base"]), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "missing DELTA" in res.stderr
    res = CliRunner().invoke(app, ["merge", str(work["base"]), str(work["good"])])
    assert res.exit_code == 2 and "out: required" in res.stderr
    res = CliRunner().invoke(
        app,
        ["merge", str(work["base"]), str(work["good"]), "--out", str(work["base"]), "--overwrite"],
    )
    assert res.exit_code == 2 and "is the base checkpoint itself" in res.stderr
