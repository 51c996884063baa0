"""Benchmark fine-tuning memory and speed: PEQA (W4, W3) against LoRA and full fine-tuning.

Per model (SmolLM2-135M, and a synthetic ~1.1B Llama with TinyLlama's shapes, random init,
written to disk tensor by tensor) and per method, a fresh worker process loads the model,
builds AdamW over what the method trains, and runs ``--warmup`` + ``--steps`` optimizer steps
on random tokens (same ``--batch`` x ``--seq-len`` everywhere). It reports its own peak RSS
(``getrusage`` ``ru_maxrss``; the parent stays small and never imports torch, so nothing
carries over) and tokens/s over the timed steps.

    method          | trains                      | base weights held, compute dtype
    ----------------+-----------------------------+------------------------------------------
    peqa-w4/w3      | quantization scales (AdamW) | packed ints + fp32 embeddings/norms/head
    peqa-w4/w3-bf16 | quantization scales (AdamW) | packed ints + bf16 embeddings/norms/head
    lora-fp32       | LoRA r=8 on every linear    | fp32
    lora-bf16       | LoRA r=8 (fp32 adapters)    | bf16
    full            | everything                  | fp32 (+ fp32 grads + AdamW moments)

Speed is compared with LoRA computing in the same dtype (the bf16 rows against LoRA on a
bf16 base, the fp32 rows against LoRA on an fp32 base); memory always with LoRA on bf16.

PEQA checkpoints come from ``peqa quantize`` (per channel by default, the paper's layout).
A memory model (weights + trainable state + activations + PEQA's transient dequantized
weight) is fitted per method on the measured runs, shown next to each measurement, and used
to predict LLaMA-7B/13B/65B. Targets at ~1B: PEQA W4 peak <= 0.5x LoRA-on-bf16, tokens/s >=
LoRA's. A configuration the memory model predicts will not fit in available RAM is skipped
and reported as such (e.g. 1B full fine-tuning needs ~18 GB).

    python scripts/bench_finetune.py --out bench_finetune.json            # both models
    python scripts/bench_finetune.py --models smollm2 --steps 2 --seq-len 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("peqa-w4", "peqa-w3", "peqa-w4-bf16", "peqa-w3-bf16", "lora-fp32", "lora-bf16", "full")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name: (hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings)
SHAPES = {
    "smollm2": (576, 1536, 30, 9, 3, 49152, True),
    "1b": (2048, 5632, 22, 32, 4, 32000, False),
    "llama-7b": (4096, 11008, 32, 32, 32, 32000, False),
    "llama-13b": (5120, 13824, 40, 40, 40, 32000, False),
    "llama-65b": (8192, 22016, 80, 64, 64, 32000, False),
}
MB = 2**20
GB = 2**30

# ------------------------------------------------------------------ memory model


def shape_counts(name: str, bits: int = 4, group_size: int = -1) -> dict:
    """Parameter counts of a Llama shape: block linears, float parts, PEQA scale count."""
    h, inter, layers, heads, kv, vocab, tied = SHAPES[name]
    head_dim = h // heads
    lin = [(h, h), (h, kv * head_dim), (h, kv * head_dim), (h, h), (h, inter), (h, inter),
           (inter, h)]  # fmt: skip  # (K, N) of q, k, v, o, gate, up, down
    n_lin = layers * sum(k * n for k, n in lin)
    groups = lambda k: 1 if group_size == -1 else -(-k // group_size)  # noqa: E731
    n_scales = layers * sum(groups(k) * n for k, n in lin)
    n_float = vocab * h * (1 if tied else 2) + (2 * layers + 1) * h
    n_lora = layers * sum(8 * (k + n) for k, n in lin)
    return {"linear": n_lin, "scales": n_scales, "float": n_float, "lora": n_lora,
            "params": n_lin + n_float, "layers": layers, "hidden": h, "vocab": vocab,
            "max_kn": max(k * n for k, n in lin)}  # fmt: skip


def static_bytes(method: str, c: dict) -> float:
    """Weights plus trainable state (param + grad + two AdamW moments = 16 B per fp32 param)."""
    if method.startswith("peqa"):
        bits, width = peqa_bits(method), 2 if is_bf16(method) else 4
        ints = c["linear"] * bits / 8 + c["scales"] * bits / 8  # qweight + qzeros
        # scales: param + grad + moments (fp32); the frozen float parts in the compute dtype;
        # 3 x max K*N: the reused Q_bar buffer, the unpacked uint8 and one product, which
        # exist for one layer at a time.
        return ints + c["scales"] * 16 + c["float"] * width + 3 * width * c["max_kn"]
    if method == "lora-fp32":
        return c["params"] * 4 + c["lora"] * 16
    if method == "lora-bf16":
        return c["params"] * 2 + c["lora"] * 16
    return c["params"] * 16  # full


def peqa_bits(method: str) -> int:
    return int(method.split("-")[1][1:])  # "peqa-w4-bf16" -> 4


def is_bf16(method: str) -> bool:
    return method.endswith("bf16")


def act_units(c: dict, tokens: int) -> float:
    """Activation size driver: tokens x (layers x hidden) plus the fp32 logits path."""
    return tokens * (c["layers"] * c["hidden"] + 3 * c["vocab"])


def fit_activation_coeffs(rows: list[dict]) -> dict[str, float]:
    """Bytes per activation unit per method: least squares through 0 on the measured peaks."""
    coeffs = {}
    for method in METHODS:
        pts = [r for r in rows if r["method"] == method and "peak_mb" in r]
        num = sum(
            (r["peak_mb"] * MB - r["runtime_mb"] * MB - r["static_b"]) * r["act_units"] for r in pts
        )
        den = sum(r["act_units"] ** 2 for r in pts)
        coeffs[method] = max(num / den, 0.0) if den else 4.0
    return coeffs


def predict_mb(method: str, name: str, tokens: int, coeff: float, runtime_mb: float) -> float:
    c = shape_counts(name)
    return runtime_mb + (static_bytes(method, c) + coeff * act_units(c, tokens)) / MB


# ------------------------------------------------------------------ workers (subprocesses)


def worker_prepare(model: str, workdir: Path) -> dict:
    """Write the float model (synthetic 1B) and quantize W4/W3 checkpoints; cached on disk."""
    import torch

    from peqa_cli.io.sources import resolve_model
    from peqa_cli.recipes.quantize import QuantizeRecipe, QuantSettings, run

    if model == "smollm2":
        float_dir = resolve_model("smollm2-135m").path
    else:
        float_dir = workdir / "llama-1b"
        if not (float_dir / "config.json").is_file():
            write_synthetic(float_dir, model, torch)
    out = {"float": str(float_dir)}
    for bits in (4, 3):
        q = workdir / f"{model}-w{bits}"
        if not (q / "peqa.json").is_file():
            gs = int(os.environ.get("BENCH_GROUP_SIZE", "-1"))
            run(QuantizeRecipe(model=str(float_dir), out=str(q), overwrite=True,
                               quant=QuantSettings(bits=bits, group_size=gs), device="cpu"))  # fmt: skip
        out[f"w{bits}"] = str(q)
    return out


def write_synthetic(path: Path, name: str, torch) -> None:
    """A random bf16 Llama written one tensor at a time (never the whole model in memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peqa_cli.io.stream import SafetensorsWriter, TensorSpec

    h, inter, layers, heads, kv, vocab, tied = SHAPES[name]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, max_position_embeddings=2048,
                      tie_word_embeddings=tied, torch_dtype="bfloat16")  # fmt: skip
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)
    specs = [TensorSpec(n, torch.bfloat16, tuple(p.shape)) for n, p in skeleton.named_parameters()]
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(tmp)
    gen = torch.Generator().manual_seed(0)
    w = SafetensorsWriter(tmp / "model.safetensors", specs, {"format": "pt"})
    for s in specs:
        if s.name.endswith("norm.weight"):
            t = torch.ones(s.shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(s.shape).normal_(0, 0.02, generator=gen).to(torch.bfloat16)
        w.write(s.name, t)
    w.close()
    os.replace(tmp, path)


def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker_train(
    method: str, path: str, batch: int, seq_len: int, warmup: int, steps: int, checkpointing: bool
) -> dict:
    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    from peqa_cli.io.checkpoint import load_quantized
    from peqa_cli.train.loop import enable_checkpointing
    from peqa_cli.train.optim import trainable_scales

    torch.manual_seed(0)
    runtime_mb = psutil.Process().memory_info().rss / MB  # interpreter + libraries
    if method.startswith("peqa"):
        dtype = torch.bfloat16 if is_bf16(method) else torch.float32  # the frozen float parts
        model = load_quantized(path, device="cpu", dtype=dtype).model
        params = list(trainable_scales(model).values())
    else:
        dtype = torch.bfloat16 if method == "lora-bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if method.startswith("lora"):
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                     target_modules=LORA_TARGETS))  # fmt: skip
        params = [p for p in model.parameters() if p.requires_grad]
    loaded_mb = psutil.Process().memory_info().rss / MB
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=False)
    if checkpointing:  # non-reentrant activation checkpointing, as `peqa finetune` does
        enable_checkpointing(model.get_base_model() if hasattr(model, "get_base_model") else model)
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    timed = times[warmup:]
    return {
        "runtime_mb": runtime_mb,
        "loaded_mb": loaded_mb,
        "peak_mb": _maxrss_mb(),
        "trainable": sum(p.numel() for p in params),
        "step_s": sum(timed) / len(timed),
        "tokens_per_s": batch * seq_len * len(timed) / sum(timed),
        "loss": float(loss),
    }


# ------------------------------------------------------------------ driver (never imports torch)


def run_worker(args: list[str], timeout: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as res:
        cmd = [sys.executable, __file__, "--worker", res.name, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
            return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
        return json.loads(Path(res.name).read_text())


def available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def render(rows: list[dict], predictions: list[dict], checks: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="fine-tuning: peak RSS and speed (same batch x seq len per model)")
    for col in ("model", "method", "trainable", "peak MB", "model fit MB", "x LoRA-bf16",
                "tokens/s", "x LoRA", "note"):  # fmt: skip
        t.add_column(col, justify="left" if col in ("model", "method", "note") else "right")
    for r in rows:
        if "peak_mb" not in r:
            t.add_row(r["model"], r["method"], "", "", f"{r.get('predicted_mb', 0):.0f}", "",
                      "", "", r.get("error") or r.get("skipped", ""))  # fmt: skip
            continue
        t.add_row(r["model"], r["method"], f"{r['trainable'] / 1e6:.2f}M", f"{r['peak_mb']:.0f}",
                  f"{r['predicted_mb']:.0f}", f"{r.get('peak_vs_lora_bf16', float('nan')):.2f}",
                  f"{r['tokens_per_s']:.1f}", f"{r.get('speed_vs_lora', float('nan')):.2f}",
                  "")  # fmt: skip
    Console().print(t)
    p = Table(title="memory model: predicted peak (GB) at the same batch x seq len, CPU dtypes")
    p.add_column("model")
    for m in METHODS:
        p.add_column(m, justify="right")
    for row in predictions:
        p.add_row(row["model"], *(f"{row[m] / 1024:.1f}" for m in METHODS))
    Console().print(p)
    for name, ok in checks.items():
        Console().print(f"{'PASS' if ok else 'FAIL' if ok is False else 'n/a '}  {name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,1b", help="smollm2, 1b")
    ap.add_argument("--methods", default=",".join(METHODS), help=", ".join(METHODS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps")
    ap.add_argument("--group-size", type=int, default=-1, help="PEQA scales: -1 per channel")
    ap.add_argument("--checkpointing", action="store_true",
                    help="activation checkpointing for every method (the large-model setting)")  # fmt: skip
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "peqa-bench-ft"))
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    ap.add_argument("--out", default="bench_finetune.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # inside a subprocess: do one job, write its JSON, exit
        task = json.loads(args.task)
        if task["kind"] == "prepare":
            os.environ["BENCH_GROUP_SIZE"] = str(task["group_size"])
            result = worker_prepare(task["model"], Path(task["workdir"]))
        else:
            result = worker_train(task["method"], task["path"], task["batch"], task["seq_len"],
                                  task["warmup"], task["steps"], task["checkpointing"])  # fmt: skip
        Path(args.worker).write_text(json.dumps(result))
        return 0

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokens = args.batch * args.seq_len
    rows: list[dict] = []
    for model in args.models.split(","):
        prep_task = {"kind": "prepare", "model": model, "workdir": str(workdir),
                     "group_size": args.group_size}  # fmt: skip
        paths = run_worker(["--task", json.dumps(prep_task)], args.timeout)
        if "error" in paths:
            print(f"{model}: preparation failed: {paths['error']}", file=sys.stderr)
            return 1
        c = shape_counts(model, group_size=args.group_size)
        for method in args.methods.split(","):
            path = paths[f"w{peqa_bits(method)}"] if method.startswith("peqa") else paths["float"]
            row = {"model": model, "method": method, "static_b": static_bytes(method, c),
                   "act_units": act_units(c, tokens)}  # fmt: skip
            # Rough guard before running: static bytes + 25% + 1 GB of runtime.
            need = row["static_b"] * 1.25 / MB + 1024
            if need > 0.9 * available_mb():
                row["skipped"] = f"needs ~{need / 1024:.0f} GB, {available_mb() / 1024:.0f} GB free"
                rows.append(row)
                print(f"{model} {method}: skipped ({row['skipped']})", file=sys.stderr)
                continue
            task = {"kind": "train", "method": method, "path": path, "batch": args.batch,
                    "seq_len": args.seq_len, "warmup": args.warmup, "steps": args.steps,
                    "checkpointing": args.checkpointing}  # fmt: skip
            print(f"{model} {method} ...", file=sys.stderr, flush=True)
            row.update(run_worker(["--task", json.dumps(task)], args.timeout))
            rows.append(row)

    coeffs = fit_activation_coeffs(rows)
    runtime = min((r["runtime_mb"] for r in rows if "runtime_mb" in r), default=400.0)
    for r in rows:
        r["predicted_mb"] = predict_mb(r["method"], r["model"], tokens, coeffs[r["method"]],
                                       r.get("runtime_mb", runtime))  # fmt: skip
        if "peak_mb" in r:
            r["model_error"] = r["predicted_mb"] / r["peak_mb"] - 1
    by = {(r["model"], r["method"]): r for r in rows}
    for r in rows:
        # Speed against LoRA computing in the same dtype (bf16 methods: LoRA on a bf16 base).
        ref_mem = by.get((r["model"], "lora-bf16"))
        ref_speed = by.get((r["model"], "lora-bf16" if is_bf16(r["method"]) else "lora-fp32"))
        if "peak_mb" in r and ref_mem and "peak_mb" in ref_mem:
            r["peak_vs_lora_bf16"] = r["peak_mb"] / ref_mem["peak_mb"]
        if "tokens_per_s" in r and ref_speed and "tokens_per_s" in ref_speed:
            r["speed_vs_lora"] = r["tokens_per_s"] / ref_speed["tokens_per_s"]
    predictions = [
        {"model": name, **{m: predict_mb(m, name, tokens, coeffs[m], runtime) for m in METHODS}}
        for name in ("llama-7b", "llama-13b", "llama-65b")
    ]

    def get(method: str) -> dict:
        return by.get(("1b", method), {})

    def check(a: dict, b: dict, key: str, factor: float, le: bool) -> bool | None:
        if key not in a or key not in b:
            return None
        return a[key] <= factor * b[key] if le else a[key] >= factor * b[key]

    checks = {
        "1B: PEQA W4 (bf16 parts) peak <= 0.5x LoRA-on-bf16":
            check(get("peqa-w4-bf16"), get("lora-bf16"), "peak_mb", 0.5, True),
        "1B: PEQA W4 (fp32 parts) peak <= 0.5x LoRA-on-bf16":
            check(get("peqa-w4"), get("lora-bf16"), "peak_mb", 0.5, True),
        "1B: PEQA W4 bf16 tokens/s >= LoRA-on-bf16":
            check(get("peqa-w4-bf16"), get("lora-bf16"), "tokens_per_s", 1.0, False),
        "1B: PEQA W4 fp32 tokens/s >= LoRA-on-fp32":
            check(get("peqa-w4"), get("lora-fp32"), "tokens_per_s", 1.0, False),
    }  # fmt: skip
    render(rows, predictions, checks)
    report = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "task")},
        "tokens_per_step": tokens,
        "rows": rows,
        "activation_bytes_per_unit": coeffs,
        "predictions_mb": predictions,
        "checks": checks,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
