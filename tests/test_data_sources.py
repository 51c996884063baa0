"""Every bad input is a one-line InputError naming the file, line and field."""

from __future__ import annotations

import json
import time

import pytest

from peqa_cli.data import sources
from peqa_cli.data.config import DataConfig
from peqa_cli.data.formats import detect_format, normalize_records
from peqa_cli.data.pipeline import build_datasets, resolve_max_length
from peqa_cli.data.sources import Record, load_records
from peqa_cli.data.testing import make_tiny_tokenizer
from peqa_cli.errors import InputError

GOOD = {"instruction": "Say hi.", "input": "", "output": "Hello world"}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def build(path, **kw):
    cfg = DataConfig(path=str(path), max_length=kw.pop("max_length", 128), **kw)
    return build_datasets(cfg, make_tiny_tokenizer(), model_max_length=None)


def test_missing_file(tmp_path):
    with pytest.raises(InputError) as e:
        load_records(str(tmp_path / "nope.jsonl"))
    assert one_line(e) == f"data file not found: {tmp_path / 'nope.jsonl'}"


def test_relative_missing_file_is_not_taken_for_a_hub_id(monkeypatch):
    monkeypatch.setattr(sources, "load_hub_records", lambda *a, **k: pytest.fail("hub"))
    for p in ("data/train.jsonl", "./train", "missing.txt"):
        with pytest.raises(InputError, match="not found"):
            load_records(p)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    with pytest.raises(InputError) as e:
        load_records(str(p))
    assert "empty" in one_line(e) and str(p) in one_line(e)


def test_directory_and_unknown_suffix(tmp_path):
    with pytest.raises(InputError, match="directory"):
        load_records(str(tmp_path))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unsupported data file type '.csv'"):
        load_records(str(tmp_path / "d.csv"))


def test_invalid_json_names_the_line(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", GOOD, '{"instruction": "x", "output": '])
    with pytest.raises(InputError) as e:
        load_records(str(p))
    assert one_line(e).startswith("bad.jsonl line 4: invalid JSON")


def test_non_object_line(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "[1, 2]"])
    with pytest.raises(InputError, match="bad.jsonl line 2: expected a JSON object, got list"):
        load_records(str(p))


def test_pretty_printed_single_object_is_explained(tmp_path):
    p = tmp_path / "obj.json"
    p.write_text(json.dumps(GOOD, indent=2))
    with pytest.raises(InputError, match="single JSON object"):
        load_records(str(p))


def test_not_utf8(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(json.dumps(GOOD).encode() + b'\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match="latin.jsonl line 2: not valid UTF-8"):
        load_records(str(p))


@pytest.mark.parametrize("field", ["instruction", "output"])
def test_alpaca_missing_field_names_field_and_line(tmp_path, field):
    bad = {k: v for k, v in GOOD.items() if k != field}
    # A blank line in between must not shift the count: lines are physical file lines.
    p = write_jsonl(tmp_path / "a.jsonl", [GOOD, GOOD, "", bad, GOOD])
    with pytest.raises(InputError) as e:
        build(p)
    assert one_line(e) == f"a.jsonl line 4: record lacks required field {field!r}"


def test_alpaca_wrong_type(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [GOOD, dict(GOOD, output=None)])
    with pytest.raises(
        InputError, match="a.jsonl line 2: field 'output' must be a string, got null"
    ):
        build(p)


def test_alpaca_input_is_optional(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [GOOD, {"instruction": "x", "output": "y"}])
    train, _, stats = build(p)
    assert stats.records == 2 and len(train) == 2


def test_json_array_errors_name_the_line(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([GOOD, GOOD, {"instruction": "x"}], indent=2))
    expected_line = 12  # "[", 5 lines per element: the third element opens on line 12
    assert p.read_text().split("\n")[expected_line - 1] == "  {"
    with pytest.raises(InputError) as e:
        build(p)
    assert one_line(e) == f"a.json line {expected_line}: record lacks required field 'output'"


def test_json_array_invalid(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n {"a": 1},\n {"a": }\n]\n')
    with pytest.raises(InputError, match="a.json line 3: invalid JSON"):
        load_records(str(p))


def test_chat_errors(tmp_path):
    turn = {"role": "user", "content": "hi"}
    cases = [
        ({"messages": []}, "field 'messages' must be a non-empty list"),
        ({"messages": [turn, {"role": "assistant"}]}, "messages[1] lacks required field 'content'"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string"),
    ]
    for rec, needle in cases:
        p = write_jsonl(tmp_path / "c.jsonl", [{"messages": [turn]}, rec])
        with pytest.raises(InputError) as e:
            normalize_records(load_records(str(p)), "chat")
        assert one_line(e).startswith(f"c.jsonl line 2: {needle}")


def test_text_missing_field(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"txt": "b"}])
    with pytest.raises(InputError, match="t.jsonl line 2: record lacks required field 'text'"):
        build(p, format="text")


def test_format_detection():
    assert detect_format(Record("x", GOOD)) == "alpaca"
    assert detect_format(Record("x", {"messages": []})) == "chat"
    assert detect_format(Record("x", {"text": ""})) == "text"
    with pytest.raises(InputError, match="x: cannot detect the data format .*question"):
        detect_format(Record("x", {"question": "?"}))


def test_max_length_beyond_model_limit_names_both_numbers(tmp_path):
    tok = make_tiny_tokenizer()
    with pytest.raises(InputError) as e:
        resolve_max_length(4096, tok, 2048)
    assert "4096" in one_line(e) and "2048" in one_line(e)
    # Without a model limit the tokenizer's known model_max_length (2048) applies.
    with pytest.raises(InputError, match="4096 exceeds the tokenizer's model_max_length 2048"):
        resolve_max_length(4096, tok, None)
    resolve_max_length(2048, tok, 2048)  # equal is fine
    p = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    with pytest.raises(InputError, match="data.max_length 600 exceeds .* 512"):
        build_datasets(DataConfig(path=str(p), max_length=600), tok, model_max_length=512)


def test_changed_file_is_reread(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    assert len(load_records(str(p))) == 1
    write_jsonl(p, [GOOD, GOOD, GOOD])
    assert len(load_records(str(p))) == 3


def test_limit_stops_before_later_bad_lines(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [GOOD, GOOD, "not json"])
    assert len(load_records(str(p), limit=2)) == 2


def test_txt_file_is_one_text_record(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("line one\n\nline two\n")
    assert [r.fields for r in load_records(str(p))] == [{"text": "line one\n\nline two\n"}]


def test_hub_offline_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sources, "hub_reachable", lambda *a: pytest.fail("must not probe"))
    t0 = time.monotonic()
    with pytest.raises(InputError) as e:
        load_records("tatsu-lab/alpaca")
    assert time.monotonic() - t0 < 5
    msg = one_line(e)
    assert "hub is unreachable" in msg and "local" in msg and "tatsu-lab/alpaca" in msg


def test_hub_unreachable_without_offline_flag(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sources, "hub_reachable", lambda *a: False)
    with pytest.raises(InputError) as e:
        load_records("Salesforce/wikitext:wikitext-2-raw-v1", split="train")
    assert "hub is unreachable" in one_line(e) and "local" in one_line(e)
