"""``peqa finetune`` from the command line: bad input is one line, exit 2, nothing written;
a float model with ``quant:`` is quantized first; Ctrl-C saves a checkpoint; shipped recipes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from peqa_cli.cli import app
from peqa_cli.recipe_files import list_recipes
from peqa_cli.train import testing

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-assets")
    float_dir = testing.save_float_model(root / "float")
    return {
        "float": float_dir,
        "q4": testing.save_quantized_model(root / "q4", float_dir, bits=4, group_size=32),
        "text": testing.write_text_jsonl(root / "text.jsonl", rows=40),
        "alpaca": testing.write_alpaca_jsonl(root / "alpaca.jsonl", rows=16),
    }


def write_recipe(path: Path, model_path, data_path, **sections) -> Path:
    doc = {
        "model": str(model_path),
        "data": {"path": str(data_path), "format": "text", "max_length": 32},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key].update(value)
        else:
            doc[key] = value
    path.write_text("# a test recipe\n" + yaml.safe_dump(doc))
    return path


def finetune(*args: str):
    return runner.invoke(app, ["finetune", *map(str, args)])


def assert_bad_input(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("peqa: error: ")]
    assert len(lines) == 1 and result.stderr.rstrip().endswith(lines[0]), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    assert "Traceback" not in result.output


def _alpaca_without_output(path: Path) -> Path:
    path.write_text(json.dumps({"instruction": "hi", "input": ""}) + "\n")
    return path


BAD_INPUTS = {
    # case: (recipe sections, extra CLI args, expected message fragments)
    "missing data file": (
        {"data": {"path": "/nonexistent/data.jsonl"}}, [], ["data file not found"]),
    "empty data file": ({"data": {"path": "EMPTY"}}, [], ["empty"]),
    "record lacking a field": (
        {"data": {"path": "NO_OUTPUT", "format": "alpaca"}}, [], ["output"]),
    "max_length beyond the model's": (
        {"data": {"max_length": 4096}}, [], ["max_length 4096", "256"]),
    "base not quantized": ({"model": "FLOAT"}, [], ["not a peqa/GPTQ checkpoint"]),
    "learning rate zero": ({"train": {"lr": 0.0}}, [], ["train.lr", "> 0"]),
    "negative learning rate": ({}, ["train.lr=-1e-4"], ["train.lr"]),
    "unknown scheduler": (
        {"train": {"scheduler": "cosine_restarts"}}, [],
        ["train.scheduler", "linear, cosine, constant, constant_with_warmup"]),
    "fp16 on CPU": ({"train": {"mixed_precision": "fp16"}}, [], ["fp16", "CUDA"]),
    "too little data": ({"train": {"batch_size": 512}}, [], ["fewer than one optimizer step"]),
    "unknown tracker": ({"train": {"report_to": ["mlflow"]}}, [], ["report_to", "tensorboard"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, assets, case):
    sections, extra, fragments = BAD_INPUTS[case]
    sections = json.loads(json.dumps(sections))
    data = sections.get("data", {})
    if data.get("path") == "EMPTY":
        (tmp_path / "empty.jsonl").write_text("")
        data["path"] = str(tmp_path / "empty.jsonl")
    elif data.get("path") == "NO_OUTPUT":
        data["path"] = str(_alpaca_without_output(tmp_path / "bad.jsonl"))
    if sections.get("model") == "FLOAT":
        sections["model"] = str(assets["float"])
    recipe = write_recipe(tmp_path / "r.yaml", assets["q4"], assets["text"], **sections)
    out = tmp_path / "out"
    assert_bad_input(finetune(recipe, "--out", out, *extra), *fragments)
    assert not out.exists()


def test_existing_output_needs_resume_or_overwrite(tmp_path, assets):
    recipe = write_recipe(tmp_path / "r.yaml", assets["q4"], assets["text"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_bad_input(finetune(recipe, "--out", out), "already exists", "--resume", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_unknown_recipe_name(tmp_path):
    assert_bad_input(finetune("no_such_recipe"), "recipe not found")


def test_float_model_is_quantized_first_then_trained(tmp_path, assets):
    recipe = write_recipe(tmp_path / "r.yaml", assets["float"], assets["text"],
                          quant={"bits": 3, "group_size": 32})  # fmt: skip
    out = tmp_path / "out"
    result = finetune(recipe, "--out", out, "--max-steps", "2", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and (summary["bits"], summary["group_size"]) == (3, 32)
    assert summary["base"] == str(out / "base")
    assert (out / "base" / "peqa.json").is_file() and (
        out / "final" / "adapter_config.json"
    ).is_file()
    cfg = json.loads((out / "final" / "adapter_config.json").read_text())
    base_meta = json.loads((out / "base" / "peqa.json").read_text())
    assert cfg["base_fingerprint"] == base_meta["fingerprint"]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["max_steps"] == 2

    # --overwrite replaces the run; --resume of a finished run only re-writes the delta.
    again = finetune(recipe, "--out", out, "--max-steps", "2", "--overwrite", "--json")
    assert again.exit_code == 0, again.output
    resumed = finetune(recipe, "--out", out, "--max-steps", "2", "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed_from"].endswith("step-2")


def test_print_config_expands_peqa_data(tmp_path, assets, monkeypatch):
    monkeypatch.setenv("PEQA_DATA", str(tmp_path / "datasets"))
    recipe = write_recipe(tmp_path / "r.yaml", assets["q4"], "${PEQA_DATA}/train.jsonl")
    result = finetune(recipe, "--print-config", "--out", tmp_path / "o", "train.lr=3e-4")
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.stdout)
    assert cfg["data"]["path"] == str(tmp_path / "datasets" / "train.jsonl")
    assert cfg["train"]["lr"] == 3e-4 and cfg["out"] == str(tmp_path / "o")
    assert not (tmp_path / "o").exists()


SHIPPED = [r.name for r in list_recipes() if r.command == "finetune"]


def test_finetune_recipes_are_shipped():
    assert {"smollm2_w3_wikitext", "smollm2_w4_alpaca", "llama7b_w4_alpaca"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_loads_and_takes_model_and_data_overrides(tmp_path, name, monkeypatch):
    monkeypatch.setenv("PEQA_DATA", "/data")
    result = finetune(name, "--print-config", "model=/ckpt/mine", "data.path=/d/train.jsonl")
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.stdout)
    assert cfg["model"] == "/ckpt/mine" and cfg["data"]["path"] == "/d/train.jsonl"
    for key in ("path", "val_path"):  # shipped data paths resolve through PEQA_DATA
        value = yaml.safe_load(finetune(name, "--print-config").stdout)["data"][key]
        assert not value or value.startswith("/data/"), value
    header = (REPO / "recipes" / f"{name}.yaml").read_text().splitlines()
    assert header[0].startswith("# ") and any("peqa finetune" in h for h in header[:12])


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, assets):
    recipe = write_recipe(
        tmp_path / "r.yaml", assets["q4"], assets["text"],
        train={"max_steps": 5000, "batch_size": 1, "log_every": 1, "scheduler": "constant"},
    )  # fmt: skip
    out = tmp_path / "out"
    env = {**os.environ, "PEQA_QUIET": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "peqa_cli", "finetune", str(recipe), "--out", str(out)],
        stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "stopped by SIGINT" in stderr and "--resume" in stderr and "Traceback" not in stderr
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert len(steps) == 1 and 0 < steps[0] < 5000
    assert not (out / "final").exists()

    result = finetune(recipe, "--out", out, "--resume", "--max-steps", str(steps[0] + 1), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == steps[0] + 1
