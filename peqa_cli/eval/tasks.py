"""Evaluation tasks: local data files, lm-eval 0.4.x prompts and answer choices.

Every task is one row of :data:`TASKS`. Multiple-choice prompts reproduce lm-eval's task YAMLs
(lm_eval 0.4.13 ``tasks/{arc,piqa,hellaswag,mmlu}``) at 0-shot without chat template, where
the request for choice ``c`` is ``(context, target_delimiter + c)`` and acc_norm divides by
``len(c)`` (the choice text without the delimiter). Data are the JSONL files described in
``../shared/data/README.md``; any JSONL with the same fields works.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from peqa_cli.errors import InputError
from peqa_cli.paths import data_file

HubSplit = tuple[str, str | None, str]  # (dataset id, config name, split) for load_dataset
Source = Path | HubSplit


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question: the prompt, the choice texts and the gold index."""

    context: str
    choices: tuple[str, ...]
    gold: int
    group: str = ""  # MMLU subject: limits and few-shot exemplars are per subject


@dataclass(frozen=True)
class TaskSpec:
    """How to evaluate one task name."""

    name: str
    kind: str  # "multiple_choice" or "perplexity"
    files: tuple[str, ...]
    fields: tuple[str, ...] = ()
    to_item: Callable[[dict, dict], MCItem] | None = None  # (doc, few-shot pools) -> item
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    target_delimiter: str = " "
    fewshot_file: str | None = None
    hub: tuple[HubSplit, ...] = ()  # same layout as ``files`` (+ few-shot split), when online
    num_fewshot: int = 0
    limit_per_group: bool = False  # lm-eval's --limit applies per MMLU subtask


# ----------------------------------------------------------------------------------- reading


def _require(where: str, lineno: int, doc: object, fields: tuple[str, ...]) -> dict:
    if not isinstance(doc, dict):
        raise InputError(f"{where}:{lineno}: expected a JSON object per line")
    for name in fields:
        if name not in doc:
            raise InputError(
                f"{where}:{lineno}: missing field '{name}' (needs: {', '.join(fields)})"
            )
    return doc


def read_jsonl(path: Path, fields: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; a bad line or missing field is an
    InputError naming file, line and field."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            yield lineno, _require(str(path), lineno, doc, fields)


def source_label(source: Source) -> str:
    """A file path, or ``hf:<id>[/<config>]:<split>`` for a hub split."""
    if isinstance(source, Path):
        return str(source)
    path, name, split = source
    return f"hf:{path}{'/' + name if name else ''}:{split}"


def read_docs(source: Source, fields: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """(row number, record) from a local JSONL file or, when online, a Hugging Face hub split."""
    if isinstance(source, Path):
        yield from read_jsonl(source, fields)
        return
    from datasets import load_dataset  # only on the (optional) hub path

    try:
        rows = load_dataset(source[0], source[1], split=source[2])
    except Exception as exc:  # offline, unknown id, ...: the user's input either way
        raise InputError(f"cannot load {source_label(source)}: {exc}") from None
    for i, doc in enumerate(rows, start=1):
        yield i, _require(source_label(source), i, dict(doc), fields)


def _converted(lineno: int, where: str, check: Callable[[], MCItem]) -> MCItem:
    """Run a conversion that may fail on malformed values; report file and line if it does."""
    try:
        return check()
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(
            f"{where}:{lineno}: malformed record ({type(exc).__name__}: {exc})"
        ) from None


# ------------------------------------------------------------------------------ doc -> item
def arc_item(doc: dict, _pools: dict) -> MCItem:
    """lm-eval arc_easy/arc_challenge: gold is ``choices.label.index(answerKey)``, which also
    covers the numeric labels "1".."4" of the NY Regents questions."""
    labels = list(doc["choices"]["label"])
    if doc["answerKey"] not in labels:
        raise ValueError(f"answerKey {doc['answerKey']!r} is not one of the labels {labels}")
    return MCItem(
        context=f"Question: {doc['question']}\nAnswer:",
        choices=tuple(doc["choices"]["text"]),
        gold=labels.index(doc["answerKey"]),
    )


def piqa_item(doc: dict, _pools: dict) -> MCItem:
    return MCItem(
        f"Question: {doc['goal']}\nAnswer:", (doc["sol1"], doc["sol2"]), int(doc["label"])
    )


def hellaswag_preprocess(text: str) -> str:
    """lm-eval ``hellaswag/utils.py: preprocess`` (brackets are WikiHow artefacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_item(doc: dict, _pools: dict) -> MCItem:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return MCItem(
        context=hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
        choices=tuple(hellaswag_preprocess(e) for e in doc["endings"]),
        gold=int(doc["label"]),
    )


MMLU_LETTERS = ("A", "B", "C", "D")


def mmlu_question(doc: dict) -> str:
    """lm-eval mmlu default ``doc_to_text``."""
    c = doc["choices"]
    return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def mmlu_item(doc: dict, pools: dict) -> MCItem:
    """5-shot as lm-eval ``mmlu`` with ``--num_fewshot 5``: description, then the first five dev
    exemplars of the subject (``first_n`` sampler), each ``question + " " + letter + "\\n\\n"``."""
    subject = doc["subject"]
    shots = pools.get(subject, [])[:5]
    if len(shots) < 5:
        raise ValueError(f"only {len(shots)} few-shot exemplars for subject {subject!r}, need 5")
    description = (
        f"The following are multiple choice questions (with answers) about "
        f"{' '.join(subject.split('_'))}.\n\n"
    )
    examples = "".join(f"{mmlu_question(s)} {MMLU_LETTERS[s['answer']]}\n\n" for s in shots)
    return MCItem(
        description + examples + mmlu_question(doc), MMLU_LETTERS, int(doc["answer"]), subject
    )


_ARC_FIELDS = ("question", "choices", "answerKey")
_MMLU_FIELDS = ("question", "subject", "choices", "answer")

TASKS: dict[str, TaskSpec] = {
    "wikitext": TaskSpec(
        "wikitext",
        "perplexity",
        ("wikitext2_raw_test.jsonl",),
        ("text",),
        hub=(("wikitext", "wikitext-2-raw-v1", "test"),),
    ),
    "arc_easy": TaskSpec(
        "arc_easy",
        "multiple_choice",
        ("arc_easy_test.jsonl",),
        _ARC_FIELDS,
        arc_item,
        hub=(("allenai/ai2_arc", "ARC-Easy", "test"),),
    ),
    "arc_challenge": TaskSpec(
        "arc_challenge",
        "multiple_choice",
        ("arc_challenge_test.jsonl",),
        _ARC_FIELDS,
        arc_item,
        hub=(("allenai/ai2_arc", "ARC-Challenge", "test"),),
    ),
    "piqa": TaskSpec(
        "piqa",
        "multiple_choice",
        ("piqa_validation.jsonl",),
        ("goal", "sol1", "sol2", "label"),
        piqa_item,
        hub=(("baber/piqa", None, "validation"),),
    ),
    "hellaswag": TaskSpec(
        "hellaswag",
        "multiple_choice",
        ("hellaswag_validation_subset1000.jsonl",),
        ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
        hellaswag_item,
        hub=(("Rowan/hellaswag", None, "validation"),),  # the full 10042-item split
    ),
    "mmlu": TaskSpec(
        "mmlu",
        "multiple_choice",
        ("mmlu_test_part1.jsonl", "mmlu_test_part2.jsonl"),
        _MMLU_FIELDS,
        mmlu_item,
        metrics=("acc",),
        fewshot_file="mmlu_dev.jsonl",
        num_fewshot=5,
        limit_per_group=True,
        hub=(("cais/mmlu", "all", "test"), ("cais/mmlu", "all", "dev")),
    ),
}


def get_task(name: str) -> TaskSpec:
    """The spec of a task name; unknown names are an InputError listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise InputError(f"unknown task '{name}' (known: {', '.join(TASKS)})") from None


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise InputError(f"limit must be a positive integer or None, got {limit!r}")


def task_sources(
    spec: TaskSpec, data_dir: str | Path | None = None, hub: bool = False
) -> list[Source]:
    """Where a task's records come from, few-shot pool last: local files (checked to exist,
    so a long run fails before it starts) or, with ``hub``, its Hugging Face splits."""
    if hub:
        return list(spec.hub)
    names = spec.files + ((spec.fewshot_file,) if spec.fewshot_file else ())
    return [data_file(n, data_dir) for n in names]


def load_items(
    spec: TaskSpec,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    *,
    hub: bool = False,
) -> list[MCItem]:
    """The task's items in file order; ``limit`` keeps the first N (per group for MMLU)."""
    check_limit(limit)
    if spec.kind != "multiple_choice" or spec.to_item is None:
        raise InputError(f"task '{spec.name}' is not a multiple-choice task")
    sources = task_sources(spec, data_dir, hub)
    pools: dict[str, list[dict]] = {}
    if spec.fewshot_file:
        for _, doc in read_docs(sources[-1], spec.fields):
            pools.setdefault(doc["subject"], []).append(doc)
        sources = sources[:-1]
    items: list[MCItem] = []
    per_group: dict[str, int] = {}
    for source in sources:
        where = source_label(source)
        for lineno, doc in read_docs(source, spec.fields):
            item = _converted(lineno, where, lambda d=doc: spec.to_item(d, pools))
            if not 0 <= item.gold < len(item.choices):
                raise InputError(
                    f"{where}:{lineno}: gold answer index {item.gold} is outside the "
                    f"{len(item.choices)} choices"
                )
            if limit is not None:
                key = item.group if spec.limit_per_group else ""
                if per_group.get(key, 0) >= limit:
                    if not spec.limit_per_group:
                        return items
                    continue
                per_group[key] = per_group.get(key, 0) + 1
            items.append(item)
    return items


def mc_requests(items: list[MCItem], target_delimiter: str = " ") -> list[tuple[str, str]]:
    """lm-eval's loglikelihood requests, item by item, choice by choice."""
    return [(it.context, target_delimiter + c) for it in items for c in it.choices]
