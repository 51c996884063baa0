"""Throughput of peqa's scorer vs lm-eval's HFLM: same model object, same requests, same run.

    python scripts/bench_eval.py --model smollm2-135m --task arc_easy --limit 100 \\
        --batch-size 8 --repeats 2 --out bench.json

Each repeat times both tools back to back (alternating who goes first, tokenization included
and peqa's token cache cleared, so neither profits from warm caches); the best time per tool is
reported, which damps noise from other jobs on a shared machine. ``--ablation`` also times
peqa without packing (lm-eval's layout: one row per choice, every choice re-runs its context).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from peqa_cli.eval import lm as peqa_lm
from peqa_cli.eval.tasks import get_task, load_items, mc_requests
from peqa_cli.io.sources import resolve_model


def time_peqa(model, tok, requests, batch_size: int, share: bool) -> tuple[float, list]:
    peqa_lm._ENCODE_CACHE.clear()
    scorer = peqa_lm.CausalLMScorer(
        model, tok, batch_size=batch_size, share_prefix=share, progress=False
    )
    start = time.perf_counter()
    res = scorer.loglikelihood(requests)
    return time.perf_counter() - start, [ll for ll, _ in res]


def time_lm_eval(hflm, requests) -> tuple[float, list]:
    from lm_eval.api.instance import Instance

    insts = [
        Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
        for i, r in enumerate(requests)
    ]
    start = time.perf_counter()
    res = hflm.loglikelihood(insts, disable_tqdm=True)
    return time.perf_counter() - start, [ll for ll, _ in res]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="HF folder, .gguf or alias")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 is fastest on a busy box)"
    )
    ap.add_argument("--ablation", action="store_true", help="also time peqa without packing")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(args.model).path  # an alias or .gguf: peqa's cached float folder
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    spec = get_task(args.task)
    items = load_items(spec, args.data_dir, args.limit)
    requests = mc_requests(items, spec.target_delimiter)
    hflm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)

    runners = {
        "peqa": lambda: time_peqa(model, tok, requests, args.batch_size, True),
        "lm-eval HFLM": lambda: time_lm_eval(hflm, requests),
    }
    if args.ablation:
        runners["peqa (no packing)"] = lambda: time_peqa(
            model, tok, requests, args.batch_size, False
        )
    times: dict[str, list[float]] = {name: [] for name in runners}
    lls: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        order = list(runners) if rep % 2 == 0 else list(reversed(runners))
        for name in order:
            seconds, lls[name] = runners[name]()
            times[name].append(seconds)
            print(f"repeat {rep}: {name} {seconds:.2f}s", file=sys.stderr)

    best = {name: min(t) for name, t in times.items()}
    ref = best["lm-eval HFLM"]
    max_diff = max(abs(a - b) for a, b in zip(lls["peqa"], lls["lm-eval HFLM"], strict=True))
    result = {
        "task": args.task,
        "items": len(items),
        "requests": len(requests),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "max_abs_loglik_diff": max_diff,
        "tools": {
            name: {
                "best_seconds": best[name],
                "all_seconds": times[name],
                "items_per_s": len(items) / best[name],
                "speedup_vs_lm_eval": ref / best[name],
            }
            for name in runners
        },
    }
    table = Table(title=f"{args.task}: {len(items)} items, {len(requests)} requests")
    for col in ("tool", "best s", "items/s", "x lm-eval"):
        table.add_column(col, justify="left" if col == "tool" else "right")
    for name, r in result["tools"].items():
        table.add_row(
            name,
            f"{r['best_seconds']:.2f}",
            f"{r['items_per_s']:.2f}",
            f"{r['speedup_vs_lm_eval']:.2f}",
        )
    Console().print(table)  # the result itself: stdout
    print(f"max |loglik peqa - lm-eval| = {max_diff:.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
