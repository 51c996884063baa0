"""Parity check: peqa's evaluation core against lm-evaluation-harness on the same model object.

Both tools score the same local JSONL files (lm-eval through the task YAMLs in
``scripts/lm_eval_tasks/``, which mirror lm-eval's own arc/piqa/hellaswag definitions) with
the same in-memory float model. Prints a markdown table to stdout and writes JSON + markdown.

    python scripts/parity_lm_eval.py --model smollm2-135m --limit 300 \\
        --out-json parity.json --out-md parity.md

``--model`` is an HF folder, a .gguf file or the alias ``smollm2-135m`` (the default).
Besides acc / acc_norm it compares every choice's log-likelihood (max |delta|) and counts the
items where the two tools pick a different answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from peqa_cli.eval.lm import CausalLMScorer
from peqa_cli.eval.metrics import argmax
from peqa_cli.eval.runner import aggregate, score_items
from peqa_cli.eval.tasks import TASKS, get_task, load_items
from peqa_cli.paths import data_dir as default_data_dir

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
# peqa task name -> lm-eval task name defined in scripts/lm_eval_tasks/.
LM_EVAL_TASKS = {
    "arc_easy": "peqa_arc_easy",
    "arc_challenge": "peqa_arc_challenge",
    "piqa": "peqa_piqa",
    "hellaswag": "peqa_hellaswag",
    "mmlu": "peqa_mmlu",  # generated per subject by write_mmlu_tasks (57 tasks + a group)
}
MMLU_TEST_FILES = TASKS["mmlu"].files
NUM_FEWSHOT = {"mmlu": 5}  # lm-eval's MMLU YAMLs default to 0-shot; the paper protocol is 5


def load_model(spec: str):
    """(model, tokenizer, name) from a float model spec peqa resolves: an HF folder, a .gguf,
    or the alias ``smollm2-135m`` (its GGUF converted once and cached by peqa)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peqa_cli.io.sources import resolve_model

    path = resolve_model(spec).path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tok, str(path)


def render_task_yamls(out_dir: Path, data: Path) -> None:
    """Copy the task YAMLs with data_files pointing at the absolute data directory."""
    for src in TASK_DIR.glob("*.yaml"):
        text = src.read_text(encoding="utf-8").replace("../shared/data/", f"{data}/")
        (out_dir / src.name).write_text(text, encoding="utf-8")


def write_mmlu_tasks(out_dir: Path, data: Path, subjects: list[str] | None = None) -> list[str]:
    """lm-eval MMLU on the local files: one task per subject that includes lm-eval's own
    ``mmlu/default/_default_template_yaml`` (prompt, choices, first_n few-shot sampler) and
    only swaps the dataset for per-subject JSONL splits, plus a ``peqa_mmlu`` group that
    weights subjects by size like lm-eval's ``mmlu`` group. Returns the subjects."""
    import lm_eval

    template = (
        Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default" / "_default_template_yaml"
    )
    rows: dict[str, dict[str, list[str]]] = {}
    for split, names in (("test", MMLU_TEST_FILES), ("dev", ("mmlu_dev.jsonl",))):
        for name in names:
            # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends.
            for line in (data / name).read_text(encoding="utf-8").split("\n"):
                if line.strip():
                    subject = json.loads(line)["subject"]
                    rows.setdefault(subject, {"test": [], "dev": []})[split].append(line)
    subjects = subjects or sorted(rows)
    split_dir = out_dir / "mmlu_data"
    split_dir.mkdir(exist_ok=True)
    for subject in subjects:
        files = {}
        for split, lines in rows[subject].items():
            files[split] = str(split_dir / f"{subject}_{split}.jsonl")
            Path(files[split]).write_text("\n".join(lines) + "\n", encoding="utf-8")
        config = {
            "include": str(template),
            "task": f"peqa_mmlu_{subject}",
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files},
            "description": "The following are multiple choice questions (with answers) about "
            f"{' '.join(subject.split('_'))}.\n\n",
        }
        (out_dir / f"peqa_mmlu_{subject}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    group = {
        "group": "peqa_mmlu",
        "task": [f"peqa_mmlu_{s}" for s in subjects],
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
        "metadata": {"version": 2},
    }
    (out_dir / "peqa_mmlu.yaml").write_text(yaml.safe_dump(group), encoding="utf-8")
    return subjects


def run_lm_eval(model, tok, tasks: list[str], limit, batch_size: int, data: Path) -> dict:
    """lm-eval results per peqa task name: metrics plus per-doc choice log-likelihoods."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    res = {}
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    with tempfile.TemporaryDirectory(prefix="peqa-lm-eval-tasks.") as tmp:
        render_task_yamls(Path(tmp), data)
        subjects = write_mmlu_tasks(Path(tmp), data) if "mmlu" in tasks else []
        manager = TaskManager(include_path=tmp, include_defaults=False)
        for shots in sorted({NUM_FEWSHOT.get(t, 0) for t in tasks}):
            batch = [t for t in tasks if NUM_FEWSHOT.get(t, 0) == shots]
            out = simple_evaluate(
                model=lm,
                tasks=[LM_EVAL_TASKS[t] for t in batch],
                num_fewshot=shots,
                limit=limit,
                task_manager=manager,
                log_samples=True,
                bootstrap_iters=0,
            )
            for t in batch:
                name = LM_EVAL_TASKS[t]
                # A group's samples live under its subtasks, in peqa's (file) subject order.
                parts = [f"peqa_mmlu_{s}" for s in subjects] if t == "mmlu" else [name]
                docs = [
                    d
                    for part in parts
                    for d in sorted(out["samples"][part], key=lambda d: d["doc_id"])
                ]
                metrics = out["results"][name]
                res[t] = {
                    m: metrics.get(f"{m},none")
                    for m in ("acc", "acc_norm")
                    if f"{m},none" in metrics
                } | {
                    "lls": [[float(r[0][0]) for r in d["resps"]] for d in docs],
                    "n": len(docs),
                }
    return res


def compare(args) -> dict:
    data = Path(args.data_dir or default_data_dir()).resolve()
    model, tok, name = load_model(args.model)
    tasks = args.tasks.split(",")
    peqa = {}
    scorer = CausalLMScorer(model, tok, batch_size=args.batch_size)
    for t in tasks:
        spec = get_task(t)
        items = load_items(spec, data, args.limit)
        start = time.perf_counter()
        lls = score_items(items, scorer, spec.target_delimiter)
        peqa[t] = {
            "metrics": aggregate(items, lls, spec.metrics),
            "lls": lls,
            "seconds": time.perf_counter() - start,
        }
        print(f"peqa {t}: {peqa[t]['seconds']:.1f}s", file=sys.stderr)
    start = time.perf_counter()
    ref = run_lm_eval(model, tok, tasks, args.limit, args.batch_size, data)
    print(f"lm-eval: {time.perf_counter() - start:.1f}s", file=sys.stderr)
    rows = []
    for t in tasks:
        p, r = peqa[t], ref[t]
        assert len(p["lls"]) == r["n"], f"{t}: peqa scored {len(p['lls'])} items, lm-eval {r['n']}"
        diffs = [
            abs(a - b)
            for pa, ra in zip(p["lls"], r["lls"], strict=True)
            for a, b in zip(pa, ra, strict=True)
        ]
        disagree = sum(argmax(pa) != argmax(ra) for pa, ra in zip(p["lls"], r["lls"], strict=True))
        for m, (value, stderr, n) in p["metrics"].items():
            rows.append(
                {
                    "task": t,
                    "metric": m,
                    "n": n,
                    "peqa": value,
                    "lm_eval": r[m],
                    "delta_points": 100 * (value - r[m]),
                    "peqa_stderr": stderr,
                    "max_abs_ll_diff": max(diffs),
                    "acc_pred_disagreements": disagree,
                }
            )
    return {
        "model": name,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "data_dir": str(data),
        "torch": torch.__version__,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    head = (
        f"model `{result['model']}`, limit {result['limit']}, batch size {result['batch_size']}\n\n"
        "| task | metric | n | peqa | lm-eval | Δ (points) | max abs Δ loglik | acc picks differing |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    lines = [
        f"| {r['task']} | {r['metric']} | {r['n']} | {100 * r['peqa']:.2f} | "
        f"{100 * r['lm_eval']:.2f} | {r['delta_points']:+.2f} | {r['max_abs_ll_diff']:.2e} | "
        f"{r['acc_pred_disagreements']} |"
        for r in result["rows"]
    ]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="HF folder, .gguf or alias")
    ap.add_argument("--tasks", default="arc_easy,arc_challenge,piqa,hellaswag")
    ap.add_argument("--limit", type=int, default=200, help="first N items per task (0 = all)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 is fastest on a busy box)"
    )
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--out-md", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.limit = args.limit or None
    unknown = set(args.tasks.split(",")) - LM_EVAL_TASKS.keys()
    if unknown:
        ap.error(f"no lm-eval twin for {sorted(unknown)}; choose from {sorted(LM_EVAL_TASKS)}")
    result = compare(args)
    md = markdown(result)
    print(md)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.out_md:
        Path(args.out_md).write_text(md, encoding="utf-8")
    worst = max(abs(r["delta_points"]) for r in result["rows"])
    return 0 if worst <= 0.2 else 1


if __name__ == "__main__":
    sys.exit(main())
