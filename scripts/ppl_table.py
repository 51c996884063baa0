"""Quantize SmolLM2 at several widths and layouts; WikiText-2 perplexity of each vs float.

The main job of the README: every variant goes through ``peqa quantize`` (the streaming
path) and is reloaded from disk, then scored with peqa's perplexity (GPTQ protocol:
WikiText-2 raw test joined with "\\n\\n", non-overlapping windows). Prints a table to
stdout and writes JSON.

    python scripts/ppl_table.py --windows 8 --out ppl_table.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from peqa_cli.eval.perplexity import perplexity
from peqa_cli.io.models import load_model
from peqa_cli.paths import data_file
from peqa_cli.recipes.quantize import QuantizeRecipe, QuantSettings, run

VARIANTS = [(4, -1), (4, 128), (4, 64), (3, -1), (3, 128), (3, 64)]


def sample(lm, max_new_tokens: int = 16) -> str:
    tok = lm.tokenizer
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = lm.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument(
        "--windows", type=int, default=8, help="first N windows (0 = the whole test set)"
    )
    ap.add_argument(
        "--variants",
        default=",".join(f"{b}:{g}" for b, g in VARIANTS),
        help="bits:group_size list, e.g. 4:-1,3:128",
    )
    ap.add_argument("--workdir", default="", help="where checkpoints go (default: a temp dir)")
    ap.add_argument("--out", default="ppl_table.json")
    args = ap.parse_args()
    err = Console(stderr=True)
    corpus = data_file("wikitext2_raw_test.jsonl")
    limit = args.windows or None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="peqa-ppl-"))
    rows = []

    def score(name: str, spec: str, bits, gs, extra: dict) -> None:
        t0 = time.perf_counter()
        lm = load_model(spec)
        res = perplexity(
            lm.model, lm.tokenizer, corpus, seq_len=args.seq_len, limit=limit, progress=False
        )
        rows.append(
            {
                "variant": name,
                "bits": bits,
                "group_size": gs,
                "ppl": res["ppl"],
                "n_windows": res["n_windows"],
                "n_tokens": res["n_tokens"],
                "sample": sample(lm),
                "seconds": round(time.perf_counter() - t0, 1),
                **extra,
            }
        )
        err.print(f"{name}: ppl {res['ppl']:.2f} ({res['n_windows']} windows)")

    score("float", args.model, 16, None, {})
    for item in args.variants.split(","):
        bits, gs = (int(x) for x in item.split(":"))
        name = f"W{bits}" + ("" if gs == -1 else f" g{gs}")
        out = workdir / f"w{bits}g{gs}"
        summary = run(
            QuantizeRecipe(
                model=args.model,
                out=str(out),
                overwrite=True,
                quant=QuantSettings(bits=bits, group_size=gs),
            )
        )
        score(
            name,
            str(out),
            bits,
            gs,
            {
                "size_mb": round(summary["output_bytes"] / 2**20, 1),
                "mean_rel_error": summary["mean_relative_error"],
            },
        )

    table = Table(
        title=f"WikiText-2 test perplexity, seq_len {args.seq_len}, "
        f"{rows[0]['n_windows']} windows ({rows[0]['n_tokens']} predicted tokens)"
    )
    for col in ("variant", "ppl", "x float", "size MB", "mean rel. err", "greedy answer"):
        table.add_column(col, justify="left" if col in ("variant", "greedy answer") else "right")
    base = rows[0]["ppl"]
    for r in rows:
        table.add_row(
            r["variant"],
            f"{r['ppl']:.2f}",
            f"{r['ppl'] / base:.2f}",
            str(r.get("size_mb", "")),
            str(r.get("mean_rel_error", "")),
            r["sample"][:60],
        )
    Console(file=sys.stdout, width=160).print(table)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))
    err.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
