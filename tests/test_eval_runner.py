"""Perplexity protocol and the evaluate / render_table / write_json API on tiny models."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from peqa_cli.errors import InputError
from peqa_cli.eval.perplexity import load_corpus, perplexity
from peqa_cli.eval.runner import evaluate, render_table, write_json
from peqa_cli.eval.testing import TINY_CORPUS, tiny_llama
from tests.eval_fixtures import model, one_thread, tok  # noqa: F401 (fixtures)

ROW_KEYS = {"task", "metric", "value", "stderr", "count", "model", "delta", "settings"}
WIKI_ROWS = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English film actor .\n"] * 6


@pytest.fixture
def data(tmp_path):
    """A data dir with two items per task and a small WikiText-like corpus."""
    docs = {
        "arc_easy_test.jsonl": [
            {
                "question": "Which gas do plants absorb?",
                "choices": {"text": ["oxygen", "carbon dioxide"], "label": ["A", "B"]},
                "answerKey": "B",
            },
            {
                "question": "What is water?",
                "choices": {"text": ["a liquid", "a rock", "a gas"], "label": ["1", "2", "3"]},
                "answerKey": "1",
            },
        ],
        "piqa_validation.jsonl": [
            {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat it.", "label": 0},
            {"goal": "Dry a cup", "sol1": "Wet it.", "sol2": "Use a towel.", "label": 1},
        ],
        "wikitext2_raw_test.jsonl": [{"text": t} for t in WIKI_ROWS],
    }
    for name, rows in docs.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return tmp_path


def direct_ppl(model, ids: list[int], seq_len: int) -> tuple[float, int]:
    """Reference: GPTQ's loop, window by window, dropping the partial tail."""
    n = len(ids) // seq_len
    nlls = []
    for w in range(n):
        x = torch.tensor([ids[w * seq_len : (w + 1) * seq_len]])
        with torch.no_grad():
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits[0, :-1], x[0, 1:])  # mean over seq_len - 1 tokens
        nlls.append(float(loss) * seq_len)
    return math.exp(sum(nlls) / (n * seq_len)), n


def test_perplexity_equals_gptq_loop(tok, model, data):
    path = data / "wikitext2_raw_test.jsonl"
    corpus = "\n\n".join(WIKI_ROWS)
    assert load_corpus(path) == corpus
    ids = tok(corpus)["input_ids"]
    ref, n = direct_ppl(model, ids, 16)
    res = perplexity(model, tok, path, seq_len=16, progress=False)
    assert res["n_windows"] == n == len(ids) // 16 and len(ids) % 16 != 0
    assert res["n_tokens"] == n * 15 and res["seq_len"] == 16
    assert res["ppl"] == pytest.approx(ref, rel=1e-5)
    batched = perplexity(model, tok, path, seq_len=16, batch_size=3, progress=False)
    assert batched["ppl"] == pytest.approx(ref, rel=1e-5)
    first2 = perplexity(model, tok, path, seq_len=16, limit=2, progress=False)
    assert first2["n_windows"] == 2
    assert first2["ppl"] == pytest.approx(direct_ppl(model, ids[:32], 16)[0], rel=1e-5)


def test_perplexity_reads_txt_and_rejects_bad_input(tok, model, tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(TINY_CORPUS), encoding="utf-8")
    assert perplexity(model, tok, txt, seq_len=8, progress=False)["ppl"] > 1
    with pytest.raises(InputError, match="fewer than one window"):
        perplexity(model, tok, txt, seq_len=100_000, progress=False)
    with pytest.raises(InputError, match="limit must be a positive integer"):
        perplexity(model, tok, txt, seq_len=8, limit=0, progress=False)
    (tmp_path / "c.csv").write_text("a", encoding="utf-8")
    with pytest.raises(InputError, match=r"\.txt or \.jsonl"):
        perplexity(model, tok, tmp_path / "c.csv", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.jsonl:2: missing field 'text'"):
        perplexity(model, tok, bad, progress=False)


def test_evaluate_rows(tok, model, data):
    rows = evaluate(
        model, tok, ["arc_easy", "piqa", "wikitext"], data_dir=data, seq_len=16,
        model_name="tiny", delta_name="d1", progress=False,
    )  # fmt: skip
    assert [(r["task"], r["metric"]) for r in rows] == [
        ("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("piqa", "acc"), ("piqa", "acc_norm"),
        ("wikitext", "ppl"),
    ]  # fmt: skip
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["model"] == "tiny" and r["delta"] == "d1"
    for r in rows[:4]:
        assert r["value"] in (0.0, 0.5, 1.0) and r["count"] == 2
        assert r["settings"]["num_fewshot"] == 0
    assert rows[4]["value"] > 1 and rows[4]["stderr"] is None
    assert rows[4]["settings"]["seq_len"] == 16
    # Same numbers whatever the batch size.
    again = evaluate(model, tok, ["arc_easy", "piqa"], data_dir=data, batch_size=1, progress=False)
    assert [r["value"] for r in again] == [r["value"] for r in rows[:4]]


class Exploding(torch.nn.Module):
    def forward(self, **_):
        raise AssertionError("the model must not be called")


@pytest.mark.parametrize(
    ("tasks", "kwargs", "match"),
    [
        (["arc_easy", "nope"], {}, "unknown task 'nope' \\(known: wikitext, arc_easy"),
        (["hellaswag"], {}, "data file not found: .*hellaswag_validation_subset1000.jsonl"),
        (["piqa"], {"limit": 0}, "limit must be a positive integer"),
        ([], {}, "non-empty list"),
    ],
)
def test_evaluate_fails_fast(tok, data, tasks, kwargs, match):
    with pytest.raises(InputError, match=match):
        evaluate(Exploding(), tok, tasks, data_dir=data, progress=False, **kwargs)


def test_evaluate_restores_training_mode_and_reads_current_weights(tok, data):
    m = tiny_llama(seed=3)
    m.train()
    first = evaluate(m, tok, ["wikitext"], data_dir=data, seq_len=16, progress=False)
    assert m.training
    with torch.no_grad():
        m.lm_head.weight.mul_(2.0)  # what applying another scale delta does
    second = evaluate(m, tok, ["wikitext"], data_dir=data, seq_len=16, progress=False)
    assert first[0]["value"] != pytest.approx(second[0]["value"], rel=1e-3)


def test_render_table_and_write_json(tmp_path, capsys):
    rows = [
        {"task": "piqa", "metric": "acc", "value": 0.5, "stderr": 0.1, "count": 2,
         "model": "m", "delta": None, "settings": {}},
        {"task": "wikitext", "metric": "ppl", "value": float("nan"), "stderr": None,
         "count": 10, "model": "m", "delta": "d", "settings": {"seq_len": 8}},
    ]  # fmt: skip
    buf = io.StringIO()
    render_table(rows, Console(file=buf, width=120))
    assert "piqa" in buf.getvalue() and "0.5000" in buf.getvalue()
    render_table(rows)
    assert capsys.readouterr().out == ""
    out = write_json(rows, tmp_path / "sub" / "res.json")
    loaded = json.loads(out.read_text())
    assert loaded[0]["value"] == 0.5 and loaded[1]["value"] is None
    assert [p.name for p in out.parent.iterdir()] == ["res.json"]  # no temp file left behind


def test_quantized_model_and_scale_delta(tok, data):
    """A model whose Linears are peqa QuantLinear modules: scored like any other, and a change
    of the scales (what a PEQA delta is) changes the result without re-creating anything."""
    replace = pytest.importorskip("peqa_cli.quant.replace")
    m = tiny_llama(seed=4)
    if not replace.quantize_model_(m, bits=4, group_size=32):
        pytest.skip("no packable layer in the tiny model")
    quant = [mod for mod in m.modules() if hasattr(mod, "scales")]
    kwargs = {"data_dir": data, "seq_len": 16, "progress": False}
    base = evaluate(m, tok, ["arc_easy", "wikitext"], batch_size=1, **kwargs)
    again = evaluate(m, tok, ["arc_easy", "wikitext"], batch_size=8, **kwargs)
    assert [r["value"] for r in base] == pytest.approx([r["value"] for r in again], rel=1e-5)
    with torch.no_grad():
        for mod in quant:
            mod.scales.mul_(1.5)
    delta = evaluate(m, tok, ["wikitext"], delta_name="x1.5", **kwargs)
    assert delta[0]["delta"] == "x1.5"
    assert delta[0]["value"] != pytest.approx(base[2]["value"], rel=1e-3)


def test_hub_sources_use_load_dataset(tok, model, data, monkeypatch):
    """hub=True reads the tasks' HF splits (faked here: no network) through the same code."""
    datasets = pytest.importorskip("datasets")
    local = {
        ("allenai/ai2_arc", "ARC-Easy", "test"): "arc_easy_test.jsonl",
        ("wikitext", "wikitext-2-raw-v1", "test"): "wikitext2_raw_test.jsonl",
    }
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if (path, name, split) not in local:
            raise ConnectionError("offline")
        lines = (data / local[(path, name, split)]).read_text().splitlines()
        return [json.loads(line) for line in lines]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    kwargs = {"seq_len": 16, "progress": False}
    hub_rows = evaluate(model, tok, ["arc_easy", "wikitext"], hub=True, **kwargs)
    file_rows = evaluate(model, tok, ["arc_easy", "wikitext"], data_dir=data, **kwargs)
    assert [r["value"] for r in hub_rows] == pytest.approx([r["value"] for r in file_rows])
    assert hub_rows[0]["settings"]["data"] == ["hf:allenai/ai2_arc/ARC-Easy:test"]
    assert set(calls) == set(local)
    with pytest.raises(InputError, match="cannot load hf:baber/piqa:validation: offline"):
        evaluate(model, tok, ["piqa"], hub=True, **kwargs)
