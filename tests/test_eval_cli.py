"""``peqa eval`` end to end through the CLI: a quantized base and two scale deltas on one load,
results on stdout and in a JSON file, and one clear line (exit 2) for each bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peqa_cli.cli import app
from peqa_cli.testing import random_delta
from peqa_cli.train import testing

runner = CliRunner()

ARC = [
    {"question": "Which gas do plants absorb?",
     "choices": {"text": ["oxygen", "carbon dioxide"], "label": ["A", "B"]}, "answerKey": "B"},
    {"question": "What is water?",
     "choices": {"text": ["a liquid", "a rock", "a gas"], "label": ["1", "2", "3"]},
     "answerKey": "1"},
    {"question": "The fox jumps over the?",
     "choices": {"text": ["lazy dog", "world"], "label": ["A", "B"]}, "answerKey": "A"},
]  # fmt: skip


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-cli")
    float_dir = testing.save_float_model(root / "float")
    q4 = testing.save_quantized_model(root / "q4", float_dir, bits=4, group_size=32)
    data = root / "data"
    data.mkdir()
    _jsonl(data / "arc_easy_test.jsonl", ARC)
    testing.write_text_jsonl(data / "wikitext2_raw_test.jsonl", rows=80)
    return {
        "float": float_dir,
        "q4": q4,
        "data": data,
        "a": random_delta(q4, root / "delta-a", seed=1),
        "b": random_delta(q4, root / "delta-b", seed=2),
        "other": random_delta(q4, root / "delta-other", seed=3, base_fingerprint="0" * 64),
    }


def eval_cli(*args) -> object:
    return runner.invoke(app, ["eval", *map(str, args)])


def test_base_and_two_deltas_on_one_load(assets, tmp_path):
    out = tmp_path / "res.json"
    res = eval_cli(assets["q4"], "--delta", assets["a"], "--delta", assets["b"],
                   "--tasks", "wikitext,arc_easy", "--data-dir", assets["data"],
                   "--json", out, "seq_len=64")  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())
    assert [(r["task"], r["metric"], r["delta"]) for r in rows] == [
        (t, m, d)
        for d in (None, str(assets["a"]), str(assets["b"]))
        for t, m in (("wikitext", "ppl"), ("arc_easy", "acc"), ("arc_easy", "acc_norm"))
    ]
    assert all(r["count"] == 3 for r in rows if r["task"] == "arc_easy")
    ppl = [r["value"] for r in rows if r["metric"] == "ppl"]
    assert all(math.isfinite(p) and p > 1 for p in ppl) and len(set(ppl)) == 3
    # stdout carries one tab-separated line per row, the delta last when there is one
    lines = [line.split("\t") for line in res.stdout.splitlines() if "\t" in line]
    assert len(lines) == len(rows) and lines[0][:2] == ["wikitext", "ppl"]
    assert lines[-1][-1] == str(assets["b"])


def test_delta_swap_leaves_the_base_untouched(assets, tmp_path):
    """Evaluating the base after deltas (separate runs) gives the same number as before them."""
    first = tmp_path / "first.json"
    again = tmp_path / "again.json"
    common = ["--tasks", "wikitext", "--data-dir", assets["data"], "seq_len=64"]
    assert eval_cli(assets["q4"], *common, "--json", first).exit_code == 0
    with_deltas = tmp_path / "with.json"
    res = eval_cli(assets["q4"], "--delta", assets["a"], *common, "--json", with_deltas)
    assert res.exit_code == 0, res.output
    base_row = json.loads(with_deltas.read_text())[0]
    assert base_row["delta"] is None
    assert base_row["value"] == json.loads(first.read_text())[0]["value"]
    assert eval_cli(assets["q4"], *common, "--json", again).exit_code == 0
    assert json.loads(again.read_text())[0]["value"] == base_row["value"]


BAD = {
    # case: (args after the model, fragments of the one error line)
    "unknown task": (["--tasks", "wikitext,arc_hard"], ["arc_hard", "arc_easy", "hellaswag"]),
    "data file missing": (["--tasks", "piqa"], ["piqa_validation.jsonl"]),
    "limit zero": (["--tasks", "wikitext", "--limit", "0"], ["limit"]),
    "limit negative": (["--tasks", "wikitext", "--limit", "-3"], ["limit"]),
    "delta from another base": (["--tasks", "wikitext", "--delta", "OTHER"], ["another base"]),
    "delta missing": (["--tasks", "wikitext", "--delta", "/nonexistent/delta"],
                      ["delta not found"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(assets, tmp_path, case):
    args, fragments = BAD[case]
    args = [str(assets["other"]) if a == "OTHER" else a for a in args]
    out = tmp_path / "res.json"
    res = eval_cli(assets["q4"], *args, "--data-dir", assets["data"], "--json", out)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("peqa: error: ")]
    assert len(lines) == 1 and res.stderr.rstrip().endswith(lines[0]), res.stderr
    assert all(f in lines[0] for f in fragments), lines[0]
    assert "Traceback" not in res.output
    assert not out.exists()


def test_a_record_lacking_a_field_names_file_and_line(assets, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _jsonl(data / "arc_easy_test.jsonl", [ARC[0], {"question": "no choices", "answerKey": "A"}])
    res = eval_cli(assets["q4"], "--tasks", "arc_easy", "--data-dir", data)
    assert res.exit_code == 2, res.output
    assert "arc_easy_test.jsonl:2" in res.stderr and "choices" in res.stderr, res.stderr


def test_a_delta_needs_a_quantized_model(assets):
    res = eval_cli(assets["float"], "--delta", assets["a"], "--tasks", "wikitext",
                   "--data-dir", assets["data"])  # fmt: skip
    assert res.exit_code == 2 and "float model" in res.stderr, res.output
