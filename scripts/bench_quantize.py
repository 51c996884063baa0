"""Benchmark ``peqa quantize``: wall time and peak RSS against model size.

For each size a synthetic random Llama (fp16) is written to disk tensor by tensor, so the
generator itself never holds more than one tensor; bigger models are sharded with a
``model.safetensors.index.json`` so the sharded-input path is exercised. Then, per size and
per page-cache state, three fresh subprocesses run:

* ``read``: read every input byte once (the I/O floor of any streaming quantizer);
* ``quantize``: ``peqa quantize DIR --bits 4 --group-size 128 --out OUT --overwrite``;
* once per run, ``bare``: the interpreter importing the same modules as the CLI and exiting.

Peak RSS comes from ``os.wait4`` (the child's own ``ru_maxrss``), so nothing carries over
between sizes. Targets: RSS above the bare interpreter flat across sizes and <= 1.5 GB;
quantize time within 2x of reading the input once. Timings on a shared machine are noisy,
which is why the report is ratios against baselines measured in the same run.

Cache states: ``warm`` reads right after the input was read (all pages cached); ``cold``
evicts only this benchmark's files from the page cache with ``posix_fadvise(DONTNEED)``
before each measurement (no root needed, other processes' caches are untouched).

    python scripts/bench_quantize.py --sizes 0.1,0.5,1,2 --out bench_quantize.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from peqa_cli.io.stream import SafetensorsWriter, TensorSpec, plan_shards

# Llama shapes per nominal size (billions of parameters): hidden, intermediate, layers.
# Heads use head_dim 64/128 with full KV heads; vocab 32000; untied embeddings.
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "0.1": (768, 2048, 8, 12),
    "0.5": (1024, 4096, 24, 16),
    "1": (2048, 5632, 16, 16),
    "2": (2560, 6912, 23, 20),
}
VOCAB = 32000
GB = 1e9
# What `peqa quantize` imports before doing any work: the bare-interpreter baseline.
BARE_IMPORTS = (
    "import torch, transformers, accelerate, safetensors, rich, typer; "
    "import peqa_cli.cli, peqa_cli.recipes.quantize; "
    "from transformers import AutoConfig, AutoModelForCausalLM; "
    "import transformers.models.llama.modeling_llama"
)


@dataclass
class Proc:
    seconds: float
    cpu_seconds: float  # user + sys: less sensitive than wall time to other load
    maxrss_mb: float
    stdout: str
    stderr: str
    returncode: int


# A tiny fresh process that forks+execs the command and reports the child's own rusage.
# Why not wait4 on a direct child: Linux seeds a process's ru_maxrss with the RSS high-water
# mark of the process that exec'd it (here: this benchmark, holding torch), so the figure
# would carry this process's peak. A bare wrapper's own footprint is a few MB.
_WRAPPER = """
import json, os, sys, time
res, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
sec = time.perf_counter() - t0
with open(res, "w") as f:
    json.dump({"seconds": sec, "cpu_seconds": ru.ru_utime + ru.ru_stime,
               "maxrss_kb": ru.ru_maxrss, "rc": os.waitstatus_to_exitcode(status)}, f)
"""


def run_measured(cmd: list[str], capture: bool = True) -> Proc:
    """Run ``cmd`` under a fresh wrapper; wall time and the command's own peak RSS.

    ``capture=False`` sends stdout to /dev/null (for ``cat``: the read-once baseline must
    not pay for writing the bytes anywhere)."""
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile(suffix=".json") as res,
    ):
        wrapper = [sys.executable, "-S", "-c", _WRAPPER, res.name, *cmd]
        stdout = out if capture else subprocess.DEVNULL
        subprocess.run(wrapper, stdout=stdout, stderr=err, check=True)
        m = json.loads(Path(res.name).read_text())
        out.seek(0)
        err.seek(0)
        return Proc(
            m["seconds"],
            m["cpu_seconds"],
            m["maxrss_kb"] / 1024,  # KiB on Linux
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            m["rc"],
        )


def llama_config(size: str):
    from transformers import LlamaConfig

    hidden, inter, layers, heads = SHAPES[size]
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        torch_dtype="float16",
    )
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def write_model(size: str, path: Path, shard_bytes: int, seed: int = 0) -> dict:
    """Write a random fp16 Llama to ``path`` one tensor at a time; return its stats."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(size)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)
    specs = [TensorSpec(n, torch.float16, tuple(p.shape)) for n, p in skeleton.named_parameters()]
    shards = plan_shards(([s] for s in specs), shard_bytes)
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    gen = torch.Generator().manual_seed(seed)
    names = []
    for i, shard in enumerate(shards):
        name = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        names.append(name)
        w = SafetensorsWriter(path / name, shard, {"format": "pt"})
        for s in shard:
            if s.name.endswith("norm.weight"):
                t = torch.ones(s.shape, dtype=torch.float16)
            else:
                t = torch.empty(s.shape, dtype=torch.float16).normal_(0, 0.02, generator=gen)
            w.write(s.name, t)
            del t
        w.close()
    total = sum(s.nbytes for s in specs)
    if len(shards) > 1:
        weight_map = {s.name: names[i] for i, sh in enumerate(shards) for s in sh}
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    return {
        "params": sum(int(torch.Size(s.shape).numel()) for s in specs),
        "input_bytes": total,
        "input_files": len(shards),
        "shape": dict(
            zip(("hidden", "intermediate", "layers", "heads"), SHAPES[size], strict=True)
        ),
    }


def evict(files: list[Path]) -> None:
    """Drop these files' pages from the page cache (clean pages only; no root needed)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prepare_cache(files: list[Path], state: str) -> None:
    if state == "cold":
        evict(files)
    else:  # warm: make sure every page is resident before measuring
        run_measured(["cat", *map(str, files)], capture=False)


def bench_size(size: str, workdir: Path, cache_states: list[str], bare_mb: float) -> dict:
    console = Console(stderr=True)
    src = workdir / f"llama-{size}b"
    out = workdir / f"llama-{size}b-w4g128"
    t0 = time.perf_counter()
    stats = write_model(size, src, shard_bytes=1 << 30)
    console.log(
        f"[{size}B] wrote {stats['params'] / 1e9:.3f}B params, "
        f"{stats['input_bytes'] / GB:.2f} GB in {stats['input_files']} file(s) "
        f"({time.perf_counter() - t0:.1f}s)"
    )
    files = sorted(src.glob("*.safetensors"))
    runs = {}
    for state in cache_states:
        prepare_cache(files, state)
        read = run_measured(["cat", *map(str, files)], capture=False)
        prepare_cache(files, state)
        load = os.getloadavg()[0]  # other users' load makes wall times noisy; record it
        cmd = [sys.executable, "-m", "peqa_cli.cli", "quantize", str(src)]
        cmd += ["--bits", "4", "--group-size", "128", "--out", str(out), "--overwrite", "--json"]
        q = run_measured(cmd)
        if q.returncode != 0:
            raise SystemExit(f"peqa quantize failed ({q.returncode}): {q.stderr.strip()[-2000:]}")
        summary = json.loads(q.stdout)
        runs[state] = {
            "read_seconds": round(read.seconds, 3),
            "quantize_seconds": round(q.seconds, 3),
            "cpu_seconds": round(q.cpu_seconds, 2),
            "job_seconds": summary["seconds"],
            "load_before": round(load, 2),
            "ratio": round(q.seconds / read.seconds, 2),
            "job_ratio": round(summary["seconds"] / read.seconds, 2),
            "peak_rss_mb": round(q.maxrss_mb, 1),
            "rss_above_bare_mb": round(q.maxrss_mb - bare_mb, 1),
            "output_bytes": summary["output_bytes"],
            "mean_relative_error": summary["mean_relative_error"],
        }
        console.log(f"[{size}B] {state}: {runs[state]}")
    shutil.rmtree(out, ignore_errors=True)
    return {"size": size, **stats, "runs": runs}


def render(results: list[dict], bare: dict, cache_states: list[str]) -> Table:
    t = Table(title="peqa quantize --bits 4 --group-size 128 (synthetic fp16 Llama)")
    for col in (
        "size",
        "params",
        "cache",
        "in GB",
        "out GB",
        "quantize s",
        "CPU s",
        "job s",
        "read-once s",
        "time/read",
        "peak RSS MB",
        "RSS above bare MB",
        "load",
    ):
        t.add_column(col, justify="right")
    for r in results:
        for state in cache_states:
            x = r["runs"][state]
            t.add_row(
                f"{r['size']}B",
                f"{r['params'] / 1e9:.3f}B",
                state,
                f"{r['input_bytes'] / GB:.2f}",
                f"{x['output_bytes'] / GB:.2f}",
                f"{x['quantize_seconds']:.1f}",
                f"{x['cpu_seconds']:.1f}",
                f"{x['job_seconds']:.1f}",
                f"{x['read_seconds']:.2f}",
                f"{x['ratio']:.1f}x",
                f"{x['peak_rss_mb']:.0f}",
                f"{x['rss_above_bare_mb']:.0f}",
                f"{x['load_before']:.1f}",
            )
    t.caption = (
        f"bare interpreter (same imports): {bare['peak_rss_mb']:.0f} MB RSS, "
        f"{bare['seconds']:.1f}s. Targets: RSS above bare flat and <= 1536 MB; "
        "time/read <= 2x."
    )
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.1,0.5,1,2", help=f"from {', '.join(SHAPES)}")
    ap.add_argument("--cache", default="warm,cold", help="page-cache states: warm, cold")
    ap.add_argument("--workdir", default=None, help="default: a temp dir under /tmp, removed")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic models")
    ap.add_argument("--out", default="bench_quantize.json", help="JSON results file")
    args = ap.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    states = [s.strip() for s in args.cache.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SHAPES] + [s for s in states if s not in ("warm", "cold")]
    if bad:
        ap.error(f"unknown size or cache state: {', '.join(bad)}")

    made = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="peqa-bench-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        bare_proc = run_measured([sys.executable, "-c", BARE_IMPORTS])
        bare = {
            "peak_rss_mb": round(bare_proc.maxrss_mb, 1),
            "seconds": round(bare_proc.seconds, 2),
        }
        results = []
        for size in sizes:
            results.append(bench_size(size, workdir, states, bare["peak_rss_mb"]))
            if not args.keep:
                shutil.rmtree(workdir / f"llama-{size}b", ignore_errors=True)
    finally:
        if made and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    Console(width=max(Console().width, 150)).print(render(results, bare, states))
    above = [x["rss_above_bare_mb"] for r in results for x in r["runs"].values()]
    ratios = [x["ratio"] for r in results for x in r["runs"].values()]
    report = {
        "command": "python scripts/bench_quantize.py " + " ".join(argv or sys.argv[1:]),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "bare": bare,
        "results": results,
        "targets": {
            "rss_above_bare_max_mb": max(above),
            "rss_above_bare_spread_mb": round(max(above) - min(above), 1),
            "rss_ok": max(above) <= 1536,
            "max_time_over_read": max(ratios),
            "time_ok": max(ratios) <= 2.0,
        },
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    Console(stderr=True).log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
