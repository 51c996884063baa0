"""Task prompts, data loading and metrics on tiny hand-made items (no model needed)."""

from __future__ import annotations

import json
import math

import pytest

from peqa_cli.errors import InputError
from peqa_cli.eval.metrics import argmax, mc_scores, mean_stderr
from peqa_cli.eval.tasks import (
    TASKS,
    arc_item,
    get_task,
    hellaswag_item,
    hellaswag_preprocess,
    load_items,
    mc_requests,
    mmlu_item,
    piqa_item,
    read_jsonl,
)

ARC_DOC = {
    "id": "x1",
    "question": "Which gas do plants absorb?",
    "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["A", "B", "C"]},
    "answerKey": "B",
}
ARC_NUMERIC = {
    "id": "NYSEDREGENTS_1",
    "question": "What is 2+2?",
    "choices": {"text": ["3", "4", "5", "6"], "label": ["1", "2", "3", "4"]},
    "answerKey": "2",
}
PIQA_DOC = {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0}
HS_DOC = {
    "ind": 4,
    "activity_label": "Cleaning windows",
    "ctx_a": "How to clean a window. [title] Spray the glass.",
    "ctx_b": "then you",
    "ctx": "unused",
    "split": "val",
    "split_type": "indomain",
    "label": 2,
    "endings": ["wipe  it. [step] Dry it.", "leave.", "[header] rinse it.", "sing."],
    "source_id": "wikihow~1",
}


def mmlu_doc(subject: str, i: int, answer: int = 0) -> dict:
    return {
        "question": f"  Q{i} about {subject}? ",
        "subject": subject,
        "choices": [f"a{i}", f"b{i}", f"c{i}", f"d{i}"],
        "answer": answer,
    }


def write_jsonl(path, docs) -> None:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")


def test_arc_prompt_and_labels():
    item = arc_item(ARC_DOC, {})
    assert item.context == "Question: Which gas do plants absorb?\nAnswer:"
    assert item.choices == ("oxygen", "carbon dioxide", "helium")
    assert item.gold == 1
    assert mc_requests([item]) == [
        ("Question: Which gas do plants absorb?\nAnswer:", " oxygen"),
        ("Question: Which gas do plants absorb?\nAnswer:", " carbon dioxide"),
        ("Question: Which gas do plants absorb?\nAnswer:", " helium"),
    ]
    # NY Regents items label choices "1".."4": the answer key indexes that list.
    assert arc_item(ARC_NUMERIC, {}).gold == 1


def test_piqa_prompt():
    item = piqa_item(PIQA_DOC, {})
    assert item.context == "Question: Open a jar\nAnswer:"
    assert item.choices == ("Twist the lid.", "Eat the lid.")
    assert item.gold == 0


def test_hellaswag_preprocess_like_lm_eval():
    assert hellaswag_preprocess(" a [title] b ") == "a. b"
    assert hellaswag_preprocess("x [step] y  z") == "x y z"
    item = hellaswag_item(HS_DOC, {})
    assert item.context == "Cleaning windows: How to clean a window.. Spray the glass. Then you"
    assert item.choices == ("wipe it. Dry it.", "leave.", " rinse it.", "sing.")
    assert item.gold == 2
    utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    for text in [HS_DOC["ctx_a"], *HS_DOC["endings"], "a  [x]  b [title] c"]:
        assert hellaswag_preprocess(text) == utils.preprocess(text)


def test_mmlu_five_shot_prompt():
    pools = {"high_school_physics": [mmlu_doc("high_school_physics", i, i % 4) for i in range(6)]}
    item = mmlu_item(mmlu_doc("high_school_physics", 9, 3), pools)
    shots = "".join(
        f"Q{i} about high_school_physics?\nA. a{i}\nB. b{i}\nC. c{i}\nD. d{i}\nAnswer: {'ABCD'[i % 4]}\n\n"
        for i in range(5)
    )
    assert item.context == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        + shots
        + "Q9 about high_school_physics?\nA. a9\nB. b9\nC. c9\nD. d9\nAnswer:"
    )
    assert item.choices == ("A", "B", "C", "D") and item.gold == 3
    assert mc_requests([item])[0][1] == " A"


def test_acc_and_acc_norm_pick_different_answers():
    # " a" is likelier in total, but " bbbbbbbb" is likelier per character.
    scores = mc_scores([-2.0, -3.0], ["a", "bbbbbbbb"], gold=1)
    assert scores == {"acc": 0.0, "acc_norm": 1.0}
    assert mc_scores([-2.0, -3.0], ["a", "bbbbbbbb"], gold=0) == {"acc": 1.0, "acc_norm": 0.0}
    assert argmax([1.0, 3.0, 3.0]) == 1  # ties go to the first, like numpy.argmax


def test_mean_stderr_matches_lm_eval():
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    metrics = pytest.importorskip("lm_eval.api.metrics")
    assert mean_stderr(values) == pytest.approx(metrics.mean_stderr(values))
    assert mean_stderr([1.0]) is None
    assert math.isclose(mean_stderr([0.0, 1.0]), 0.5)


def test_registry_and_unknown_task():
    assert {"wikitext", "arc_easy", "arc_challenge", "piqa", "hellaswag", "mmlu"} <= set(TASKS)
    with pytest.raises(InputError, match="unknown task 'arc_medium'.*arc_easy.*hellaswag"):
        get_task("arc_medium")


def test_missing_field_names_file_line_and_field(tmp_path):
    bad = dict(ARC_DOC)
    del bad["answerKey"]
    write_jsonl(tmp_path / "arc_easy_test.jsonl", [ARC_DOC, ARC_DOC, bad])
    with pytest.raises(InputError, match=r"arc_easy_test.jsonl:3: missing field 'answerKey'"):
        load_items(TASKS["arc_easy"], tmp_path)


def test_malformed_records_are_input_errors(tmp_path):
    path = tmp_path / "arc_easy_test.jsonl"
    path.write_text(json.dumps(ARC_DOC) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"arc_easy_test.jsonl:2: not valid JSON"):
        load_items(TASKS["arc_easy"], tmp_path)
    write_jsonl(path, [ARC_DOC, dict(ARC_DOC, answerKey="E")])
    with pytest.raises(InputError, match=r"arc_easy_test.jsonl:2: .*answerKey 'E'"):
        load_items(TASKS["arc_easy"], tmp_path)
    write_jsonl(tmp_path / "piqa_validation.jsonl", [dict(PIQA_DOC, label=5)])
    with pytest.raises(InputError, match=r"piqa_validation.jsonl:1: gold answer index 5"):
        load_items(TASKS["piqa"], tmp_path)


def test_missing_file_and_bad_limit(tmp_path):
    with pytest.raises(InputError, match="data file not found: .*piqa_validation.jsonl"):
        load_items(TASKS["piqa"], tmp_path)
    write_jsonl(tmp_path / "piqa_validation.jsonl", [PIQA_DOC] * 5)
    for bad in (0, -3, 1.5, True):
        with pytest.raises(InputError, match="limit must be a positive integer"):
            load_items(TASKS["piqa"], tmp_path, limit=bad)
    assert len(load_items(TASKS["piqa"], tmp_path, limit=2)) == 2
    assert len(load_items(TASKS["piqa"], tmp_path)) == 5


def test_mmlu_limit_is_per_subject(tmp_path):
    subjects = ["anatomy", "astronomy"]
    write_jsonl(tmp_path / "mmlu_dev.jsonl", [mmlu_doc(s, i) for s in subjects for i in range(5)])
    write_jsonl(tmp_path / "mmlu_test_part1.jsonl", [mmlu_doc("anatomy", i) for i in range(4)])
    write_jsonl(tmp_path / "mmlu_test_part2.jsonl", [mmlu_doc("astronomy", i) for i in range(4)])
    items = load_items(TASKS["mmlu"], tmp_path, limit=3)
    assert [it.group for it in items] == ["anatomy"] * 3 + ["astronomy"] * 3
    write_jsonl(tmp_path / "mmlu_dev.jsonl", [mmlu_doc("anatomy", i) for i in range(5)])
    with pytest.raises(InputError, match="only 0 few-shot exemplars for subject 'astronomy'"):
        load_items(TASKS["mmlu"], tmp_path)


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    assert list(read_jsonl(path, ("text",))) == [(1, {"text": "a"}), (3, {"text": "b"})]
