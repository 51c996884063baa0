"""Loss masks, text windows, truncation and packing on a tiny offline tokenizer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peqa_cli.data.encode import (
    IGNORE_INDEX,
    bos_prefix,
    encode_alpaca,
    encode_chat,
    encode_text,
    pack,
)
from peqa_cli.data.formats import alpaca_prompt
from peqa_cli.data.sources import Record
from peqa_cli.data.testing import make_tiny_tokenizer
from peqa_cli.errors import InputError

TOK = make_tiny_tokenizer(bos=True)
TOK_NOBOS = make_tiny_tokenizer(bos=False)

# Independent copies of tatsu-lab/stanford_alpaca PROMPT_DICT, filled in by hand.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nTranslate.\n\n### Input:\nHello world\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nTranslate.\n\n### Response:"
)


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def first_label(labels):
    return next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)


def test_alpaca_templates_verbatim():
    assert alpaca_prompt("Translate.", "Hello world") == ALPACA_WITH_INPUT
    assert alpaca_prompt("Translate.", "") == ALPACA_NO_INPUT


def test_bos_prefix_follows_the_tokenizer():
    assert bos_prefix(TOK) == [TOK.bos_token_id]
    assert bos_prefix(TOK_NOBOS) == []


@pytest.mark.parametrize("tok", [TOK, TOK_NOBOS], ids=["bos", "nobos"])
@pytest.mark.parametrize("inp", ["Hello world", ""], ids=["input", "noinput"])
def test_response_only_masks_exactly_the_prompt(tok, inp):
    row = {"instruction": "Translate.", "input": inp, "output": "Bonjour le monde."}
    (ex,), truncated = encode_alpaca([row], tok, max_length=1024, train_on_inputs=False)
    ids, labels = ex["input_ids"], ex["labels"]
    assert truncated == 0 and len(ids) == len(labels)
    k = first_label(labels)
    bos = [tok.bos_token_id] if tok is TOK else []
    prompt = alpaca_prompt("Translate.", inp)
    # First trained position == number of prompt tokens (BOS included once).
    assert k == len(bos) + len(tok(prompt, add_special_tokens=False).input_ids)
    assert ids[: len(bos)] == bos and ids.count(tok.bos_token_id) == len(bos)
    assert decode(tok, ids[:k]) == ("<s>" if bos else "") + prompt
    assert all(t == IGNORE_INDEX for t in labels[:k])
    assert labels[k:] == ids[k:]
    assert decode(tok, ids[k:]) == "Bonjour le monde.</s>"
    assert ids[-1] == tok.eos_token_id


def test_train_on_inputs_keeps_every_label():
    row = {"instruction": "Translate.", "input": "Hello", "output": "Bonjour"}
    (ex,), _ = encode_alpaca([row], TOK, max_length=1024, train_on_inputs=True)
    assert ex["labels"] == ex["input_ids"]
    (masked,), _ = encode_alpaca([row], TOK, max_length=1024, train_on_inputs=False)
    assert masked["input_ids"] == ex["input_ids"]  # same tokens either way, only labels differ


_texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(instruction=_texts, inp=_texts, output=_texts)
def test_mask_boundary_holds_for_any_text(instruction, inp, output):
    row = {"instruction": instruction, "input": inp, "output": output}
    (ex,), _ = encode_alpaca([row], TOK_NOBOS, max_length=4096, train_on_inputs=False)
    k = first_label(ex["labels"])  # the response always has at least its EOS
    assert decode(TOK_NOBOS, ex["input_ids"][:k]) == alpaca_prompt(instruction, inp)
    assert decode(TOK_NOBOS, ex["input_ids"][k:]) == output + "</s>"


def test_truncation_counts_and_cuts():
    short = {"instruction": "Hi", "input": "", "output": "Hello"}
    long = {"instruction": "Hi", "input": "", "output": "hello world " * 50}
    examples, truncated = encode_alpaca(
        [short, long, long], TOK, max_length=64, train_on_inputs=False
    )
    assert truncated == 2
    assert [len(e["input_ids"]) for e in examples][1:] == [64, 64]
    assert len(examples[0]["input_ids"]) < 64 and examples[0]["input_ids"][-1] == TOK.eos_token_id
    assert all(len(e["labels"]) == len(e["input_ids"]) for e in examples)


CHAT = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And hello?"},
    {"role": "assistant", "content": "Hello world"},
]


def label_runs(ex):
    """Decoded runs of trained and of masked tokens, in order."""
    runs, cur, cur_kind = [], [], None
    for tid, lab in zip(ex["input_ids"], ex["labels"], strict=True):
        kind = lab != IGNORE_INDEX
        if kind != cur_kind and cur:
            runs.append((cur_kind, decode(TOK, cur)))
            cur = []
        cur_kind = kind
        cur.append(tid)
    runs.append((cur_kind, decode(TOK, cur)))
    return runs


@pytest.mark.parametrize("with_system", [False, True])
def test_chat_masks_all_but_assistant_turns(with_system):
    messages = ([{"role": "system", "content": "Be brief."}] if with_system else []) + CHAT
    (ex,), _ = encode_chat(
        [Record("c.jsonl line 1", {"messages": messages})],
        TOK,
        max_length=1024,
        train_on_inputs=False,
    )
    runs = label_runs(ex)
    assert [text for trained, text in runs if trained] == [
        "Four.<|im_end|>\n",
        "Hello world<|im_end|>\n",
    ]
    full = TOK.apply_chat_template(messages, tokenize=False)
    assert "".join(text for _, text in runs) == full
    assert runs[0][1].endswith("<|im_start|>assistant\n")
    assert ("Be brief." in full) is with_system  # the template's default system turn otherwise
    (ex_all,), _ = encode_chat(
        [Record("x", {"messages": messages})], TOK, max_length=1024, train_on_inputs=True
    )
    assert ex_all["labels"] == ex_all["input_ids"]
    assert decode(TOK, ex_all["input_ids"]) == full


def test_chat_without_assistant_has_no_labels():
    (ex,), _ = encode_chat(
        [Record("x", {"messages": CHAT[:1]})], TOK, max_length=1024, train_on_inputs=False
    )
    assert set(ex["labels"]) == {IGNORE_INDEX}


def test_chat_template_that_rewrites_history_is_reported():
    # Drops earlier assistant replies, like templates that strip past reasoning.
    tmpl = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tok = make_tiny_tokenizer(chat_template=tmpl)
    with pytest.raises(
        InputError, match=r"c.jsonl line 3: cannot locate assistant turn messages\[1\]"
    ):
        encode_chat(
            [Record("c.jsonl line 3", {"messages": CHAT})],
            tok,
            max_length=512,
            train_on_inputs=False,
        )


def test_chat_needs_a_template():
    tok = make_tiny_tokenizer(chat_template=None)
    with pytest.raises(InputError, match="no chat template"):
        encode_chat([Record("x", {"messages": CHAT})], tok, max_length=512, train_on_inputs=False)


TEXTS = [" = Lobster = \n", "", " The European lobster is a species of clawed lobster .\n"] * 20


@pytest.mark.parametrize("tok", [TOK, TOK_NOBOS], ids=["bos", "nobos"])
def test_text_windows_exact_and_cover_the_concatenation(tok):
    L = 16
    windows, tail = encode_text(TEXTS, tok, max_length=L, join="\n\n")
    stream = bos_prefix(tok) + tok("\n\n".join(TEXTS), add_special_tokens=False).input_ids
    assert all(len(w["input_ids"]) == L for w in windows)
    assert [t for w in windows for t in w["input_ids"]] == stream[: len(windows) * L]
    assert tail == len(stream) - len(windows) * L and 0 <= tail < L
    assert all(w["labels"] == w["input_ids"] for w in windows)
    assert decode(tok, stream).removeprefix("<s>") == "\n\n".join(TEXTS)


def test_text_eos_join():
    windows, tail = encode_text(TEXTS, TOK_NOBOS, max_length=8, join="eos")
    stream = [t for w in windows for t in w["input_ids"]]
    rows = [t for t in TEXTS if t]  # empty rows add no EOS runs
    expected = [t for r in rows for t in TOK_NOBOS(r).input_ids + [TOK_NOBOS.eos_token_id]]
    assert stream + expected[len(stream) :] == expected and len(expected) - len(stream) == tail


def test_text_shorter_than_one_window():
    with pytest.raises(InputError, match=r"has \d+ tokens, fewer than data.max_length 4096"):
        encode_text(["tiny"], TOK, max_length=4096, join="\n\n")


def test_packing_keeps_labels_per_example():
    rows = [
        {"instruction": f"Say {w}.", "input": "", "output": w}
        for w in ["ab", "cd", "ef", "gh", "ij"]
    ]
    examples, _ = encode_alpaca(rows, TOK, max_length=512, train_on_inputs=False)
    n = len(examples[0]["input_ids"])
    L = 2 * n + 3  # two examples fit per row, not three
    packed = pack(examples, L)
    assert [len(p["input_ids"]) for p in packed][:2] == [
        len(examples[0]["input_ids"]) + len(examples[1]["input_ids"]),
        len(examples[2]["input_ids"]) + len(examples[3]["input_ids"]),
    ]
    assert len(packed) == 3 and all(len(p["input_ids"]) <= L for p in packed)
    flat = [t for p in packed for t in p["input_ids"]]
    assert flat == [t for e in examples for t in e["input_ids"]]
    # Labels: each piece keeps its own, except its first token (never a target once shifted).
    expected_labels = [t for e in examples for t in [IGNORE_INDEX] + e["labels"][1:]]
    assert [t for p in packed for t in p["labels"]] == expected_labels
    assert packed[0]["position_ids"] == list(range(len(examples[0]["input_ids"]))) + list(
        range(len(examples[1]["input_ids"]))
    )


def test_packing_an_example_of_exactly_max_length():
    ex = [{"input_ids": [5] * 4, "labels": [5] * 4}, {"input_ids": [6] * 2, "labels": [6] * 2}]
    assert [p["input_ids"] for p in pack(ex, 4)] == [[5] * 4, [6] * 2]


def test_packing_masks_each_pieces_first_token_with_train_on_inputs():
    ex = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    (row,) = pack(ex, 8)
    # Without this, the model would learn to predict 8 from the previous piece's last token 7.
    assert row["labels"] == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]
    assert row["position_ids"] == [0, 1, 2, 0, 1]


def test_an_example_of_exactly_max_length_is_not_truncated():
    row = {"instruction": "Hi", "input": "", "output": "Hello world"}
    (full,), _ = encode_alpaca([row], TOK, max_length=4096, train_on_inputs=False)
    n = len(full["input_ids"])
    (ex,), truncated = encode_alpaca([row], TOK, max_length=n, train_on_inputs=False)
    assert truncated == 0 and ex == full
    (ex,), truncated = encode_alpaca([row], TOK, max_length=n - 1, train_on_inputs=False)
    assert truncated == 1 and ex["input_ids"] == full["input_ids"][:-1]
