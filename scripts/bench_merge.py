"""Benchmark task switching and merging on SmolLM2: swap time, sizes, and what fp16 costs.

Steps (one run, one machine, so the ratios compare like with like):

1. quantize SmolLM2 (``--bits``/``--group-size``) unless ``--base`` names a checkpoint;
2. a scale delta: ``--delta`` (e.g. from ``peqa finetune``) or a synthetic one,
   Δs = ``--rel`` · s0 · N(0, 1) with a fixed seed, saved with ``save_delta``;
3. swap time: on the base loaded once, ``apply_delta`` + ``remove_delta``, median of
   ``--swaps`` rounds, against the baseline of reloading the checkpoint (``load_quantized``);
4. ``peqa merge`` as gptq and as an hf export: wall time and the sizes of base, delta,
   merged checkpoint and export;
5. perplexity on the first ``--windows`` windows of ``--seq-len`` tokens of WikiText-2 test
   (GPTQ protocol: rows joined with "\\n\\n", non-overlapping windows) for the base, the
   base + delta with fp32 scales (in memory), the same with scales rounded to fp16 (what a
   merged checkpoint stores), the merged checkpoint itself and the hf export.

    python scripts/bench_merge.py --out bench_merge.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from peqa_cli.io.checkpoint import load_quantized, quant_layers
from peqa_cli.io.delta import DELTA_FILE, apply_delta, load_delta, remove_delta
from peqa_cli.io.models import load_tokenizer
from peqa_cli.paths import data_file
from peqa_cli.recipes.merge import MergeRecipe
from peqa_cli.recipes.merge import run as merge
from peqa_cli.recipes.quantize import QuantizeRecipe, QuantSettings
from peqa_cli.recipes.quantize import run as quantize
from peqa_cli.testing import random_delta

console = Console(stderr=True)


def synthetic_delta(base: Path, out: Path, rel: float, seed: int = 0) -> Path:
    recipe = {"synthetic": True, "rel": rel, "seed": seed}
    return random_delta(base, out, rel=rel, seed=seed, recipe=recipe)


def windows(tokenizer, n: int, seq_len: int) -> torch.Tensor:
    rows = [json.loads(line)["text"] for line in data_file("wikitext2_raw_test.jsonl").open()]
    text, ids = "", []
    for row in rows:  # tokenize only as much of the corpus as the windows need
        text += ("\n\n" if text else "") + row
        if len(text) > 8 * n * seq_len:
            break
    ids = tokenizer(text, verbose=False)["input_ids"]
    assert len(ids) >= n * seq_len, "corpus too short for the windows asked"
    return torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)


@torch.inference_mode()
def perplexity(model: torch.nn.Module, wins: torch.Tensor) -> float:
    nll = 0.0
    for w in wins:
        logits = model(w[None]).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
    return math.exp(nll / (wins.shape[0] * (wins.shape[1] - 1)))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--base", help="an existing peqa/GPTQ checkpoint (skips quantizing)")
    ap.add_argument("--delta", help="an existing delta for --base (default: synthetic)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--rel", type=float, default=0.02, help="synthetic Δs / s0 (std)")
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--workdir", help="keep the checkpoints here (default: a temp folder)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if args.delta and not args.base:
        ap.error("--delta needs the --base it was trained on")

    tmp = tempfile.TemporaryDirectory(prefix="bench_merge-")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    base = Path(args.base) if args.base else work / "base"
    if not args.base:
        console.log(f"quantizing {args.model} w{args.bits} g{args.group_size}")
        quant = QuantSettings(bits=args.bits, group_size=args.group_size)
        quantize(QuantizeRecipe(model=args.model, out=str(base), quant=quant, overwrite=True))
    delta_path = Path(args.delta) if args.delta else synthetic_delta(base, work / "delta", args.rel)
    delta = load_delta(delta_path)
    res: dict = {"model": args.model, "base": str(base), "delta": str(delta_path)}
    res["delta_kind"] = "given" if args.delta else f"synthetic rel={args.rel}"

    t0 = time.perf_counter()
    q = load_quantized(base)
    res["reload_ms"] = (time.perf_counter() - t0) * 1e3
    apply_delta(q.model, delta)  # first application also remembers s0: not a swap
    remove_delta(q.model)
    apply_ms, swap_ms = [], []
    for _ in range(args.swaps):
        t0 = time.perf_counter()
        apply_delta(q.model, delta)
        t1 = time.perf_counter()
        remove_delta(q.model)
        t2 = time.perf_counter()
        apply_ms.append((t1 - t0) * 1e3)
        swap_ms.append((t2 - t0) * 1e3)
    res["apply_ms_median"] = statistics.median(apply_ms)
    res["swap_ms_median"] = statistics.median(swap_ms)
    res["swap_vs_reload"] = res["swap_ms_median"] / res["reload_ms"]

    merged, hf = work / "merged", work / "hf"
    for fmt, out in (("gptq", merged), ("hf", hf)):
        t0 = time.perf_counter()
        merge(MergeRecipe(str(base), str(delta_path), str(out), format=fmt, overwrite=True))
        res[f"merge_{fmt}_s"] = time.perf_counter() - t0
    res["bytes"] = {
        "base": dir_bytes(base),
        "delta": (delta_path / DELTA_FILE).stat().st_size,
        "merged": dir_bytes(merged),
        "hf_export_fp16": dir_bytes(hf),
    }

    tok = load_tokenizer(base)
    wins = windows(tok, args.windows, args.seq_len)
    ppl = {}
    remove_delta(q.model)
    ppl["base"] = perplexity(q.model, wins)
    apply_delta(q.model, delta)
    ppl["delta_fp32_scales"] = perplexity(q.model, wins)
    for layer in quant_layers(q.model).values():
        layer.scales.data.copy_(layer.scales.data.half().float())
    ppl["delta_fp16_scales"] = perplexity(q.model, wins)
    del q
    ppl["merged_checkpoint"] = perplexity(load_quantized(merged).model, wins)
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ppl["hf_export_fp16"] = perplexity(hf_model, wins)
    res["ppl"] = ppl
    res["ppl_fp16_rounding_cost"] = ppl["delta_fp16_scales"] - ppl["delta_fp32_scales"]
    res["protocol"] = f"wikitext2 test, first {args.windows} windows of {args.seq_len} tokens"

    table = Table(title=f"peqa merge / task switching: {args.model}, {res['delta_kind']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("reload checkpoint (baseline)", f"{res['reload_ms']:.1f} ms")
    table.add_row(f"apply delta (median of {args.swaps})", f"{res['apply_ms_median']:.2f} ms")
    table.add_row("apply + remove (swap)", f"{res['swap_ms_median']:.2f} ms")
    table.add_row("swap / reload", f"{res['swap_vs_reload']:.4f}")
    table.add_row(
        "merge gptq / hf export", f"{res['merge_gptq_s']:.1f} s / {res['merge_hf_s']:.1f} s"
    )
    for k, v in res["bytes"].items():
        table.add_row(f"size {k}", f"{v / 1e6:.2f} MB ({v / res['bytes']['base']:.3f}x base)")
    for k, v in ppl.items():
        table.add_row(f"ppl {k}", f"{v:.4f}")
    table.add_row("ppl cost of fp16 scales", f"{res['ppl_fp16_rounding_cost']:+.5f}")
    Console().print(table)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    tmp.cleanup()


if __name__ == "__main__":
    main()
