"""The ``peqa`` command line: parse, call a recipe, print. Nothing else lives here.

Exit codes: 0 ok, 1 the job failed, 2 bad usage or input. Logs and progress go to stderr;
results go to stdout (``--json`` for machine-readable output) or to files.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
from typing import Annotated

import typer

from peqa_cli import __version__
from peqa_cli.config import dump_yaml, load_config
from peqa_cli.errors import PeqaError
from peqa_cli.recipe_files import copy_recipe, find_recipe, list_recipes

app = typer.Typer(
    help="PEQA: quantize LLMs to 2-8-bit integers and fine-tune only their scales.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipes_app = typer.Typer(
    help="List shipped recipes, or copy one to edit.", invoke_without_command=True
)
app.add_typer(recipes_app, name="recipes")

Overrides = Annotated[
    list[str] | None, typer.Argument(help="key=value overrides, e.g. quant.group_size=128")
]
PrintConfig = Annotated[
    bool, typer.Option("--print-config", help="Print the resolved recipe and exit.")
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")]


def _setup_logging(verbosity: int) -> None:
    level = {0: logging.INFO, -1: logging.WARNING, 1: logging.DEBUG}[max(-1, min(1, verbosity))]
    logging.basicConfig(stream=sys.stderr, level=level, format="%(message)s", force=True)
    for noisy in (
        "transformers",
        "datasets",
        "accelerate",
        "huggingface_hub",
        "urllib3",
        "filelock",
    ):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def _fail(message: str, code: int) -> None:
    typer.echo(f"peqa: error: {message}", err=True)
    raise typer.Exit(code)


def handle_errors(fn):
    """User errors become one line on stderr and an exit code; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PeqaError as exc:
            _fail(exc.message, exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except typer.Exit:
            raise
        except Exception as exc:  # a bug or an environment failure: still one line, exit 1
            if os.environ.get("PEQA_DEBUG"):
                raise
            _fail(f"{type(exc).__name__}: {exc} (set PEQA_DEBUG=1 for a traceback)", 1)

    return wrapper


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        for k, v in result.items():
            typer.echo(f"{k}: {v}")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"peqa {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs on stderr.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
) -> None:
    """PEQA: quantize LLMs to 2-8-bit integers and fine-tune only their scales."""
    _setup_logging(1 if verbose else -1 if quiet else 0)
    if quiet:
        os.environ["PEQA_QUIET"] = "1"


@app.command()
@handle_errors
def quantize(
    model_or_recipe: Annotated[
        str, typer.Argument(help="Model (folder, .gguf, hub id, alias) or a recipe YAML.")
    ],
    overrides: Overrides = None,
    bits: Annotated[
        int | None, typer.Option("--bits", "-b", help="Integer width: 2, 3, 4 or 8.")
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option("--group-size", "-g", help="-1 per channel (default), or columns per group."),
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Output checkpoint folder.")
    ] = None,
    overwrite: Overwrite = False,
    print_config: PrintConfig = False,
    as_json: JsonOut = False,
) -> None:
    """Quantize a float model into a GPTQ v2 checkpoint (streams tensor by tensor).

    Example: peqa quantize smollm2-135m --bits 3 --group-size 128 --out ckpt/smollm2-w3g128
    """
    from peqa_cli.recipes.quantize import QuantizeRecipe, run

    recipe = find_recipe(model_or_recipe)
    flags = {
        "quant.bits": bits,
        "quant.group_size": group_size,
        "out": out,
        "overwrite": overwrite or None,
        "model": None if recipe else model_or_recipe,
    }
    cfg = load_config(QuantizeRecipe, recipe, overrides, flags)
    if print_config:
        typer.echo(dump_yaml(cfg), nl=False)
        return
    _emit(run(cfg), as_json)


def _not_yet(name: str) -> None:
    _fail(f"'peqa {name}' is not available yet in peqa {__version__}", 2)


@app.command()
@handle_errors
def finetune(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML (path or shipped name).")],
    overrides: Overrides = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Output folder.")] = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Stop after N optimizer steps.")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue from the last checkpoint in the output folder."),
    ] = False,
    overwrite: Overwrite = False,
    print_config: PrintConfig = False,
    as_json: JsonOut = False,
) -> None:
    """Fine-tune only the quantization scales (PEQA).

    Example: peqa finetune smollm2_w3_wikitext --max-steps 200

    Multi-process (GPUs, or CPUs with gloo):
    accelerate launch --multi_gpu --num_processes 2 -m peqa_cli finetune RECIPE ...
    Default --out: runs/<recipe name>. Ctrl-C / SIGTERM save a checkpoint and exit 130 / 143;
    --resume continues from the latest checkpoint.
    """
    from pathlib import Path

    from peqa_cli.errors import InputError
    from peqa_cli.recipes.finetune import FinetuneRecipe, resolve_paths, run

    path = find_recipe(recipe)
    if path is None:
        names = ", ".join(r.name for r in list_recipes() if r.command == "finetune")
        raise InputError(f"recipe not found: {recipe} (a .yaml file, or one of: {names})")
    if out is None and not any(o.split("=", 1)[0].strip() == "out" for o in overrides or []):
        from peqa_cli.config import read_yaml

        if not read_yaml(path).get("out"):
            out = str(Path("runs") / path.stem)  # default run folder: runs/<recipe name>
    flags = {"out": out, "train.max_steps": max_steps, "overwrite": overwrite or None}
    cfg = load_config(FinetuneRecipe, path, overrides, flags)
    if print_config:
        typer.echo(dump_yaml(resolve_paths(cfg)), nl=False)
        return
    result = run(cfg, resume=resume)
    if result is not None:  # None on the non-main processes of a multi-process run
        _emit(result, as_json)


@app.command("eval")
@handle_errors
def evaluate(
    model: Annotated[
        str, typer.Argument(help="Model: float folder/alias, or a peqa/GPTQ checkpoint.")
    ],
    overrides: Overrides = None,
    delta: Annotated[
        list[str] | None, typer.Option("--delta", "-d", help="Scale delta(s) to evaluate in turn.")
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(
            "--tasks", "-t", help="Comma-separated: wikitext,arc_easy,arc_challenge,piqa,hellaswag."
        ),
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(
            "--data-dir",
            help="Folder of the JSONL datasets (default $PEQA_DATA or ../shared/data).",
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", help="Evaluate the first N items (windows for perplexity)."),
    ] = None,
    json_file: Annotated[
        str | None, typer.Option("--json", help="Write results to this JSON file.")
    ] = None,
    print_config: PrintConfig = False,
) -> None:
    """Perplexity and zero-shot accuracy, with lm-evaluation-harness's prompts and metrics.

    Example: peqa eval ckpt/smollm2-w3 --tasks wikitext,arc_easy --limit 200 --json results.json
    """
    from peqa_cli.eval.runner import render_table, write_json
    from peqa_cli.recipes.evaluate import EvalRecipe, run

    recipe = find_recipe(model)
    flags = {
        "model": None if recipe else model,
        "deltas": delta or None,
        "data_dir": data_dir,
        "limit": limit,
        "json": json_file,
        "tasks": [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
    }
    cfg = load_config(EvalRecipe, recipe, overrides, flags)
    if print_config:
        typer.echo(dump_yaml(cfg), nl=False)
        return
    rows = run(cfg)
    render_table(rows)
    if cfg.json:
        write_json(rows, cfg.json)
    for r in rows:
        err = f" ± {r['stderr']:.4f}" if r.get("stderr") is not None else ""
        delta_part = f"\t{r['delta']}" if r.get("delta") else ""
        typer.echo(f"{r['task']}\t{r['metric']}\t{r['value']:.4f}{err}\t{r['count']}{delta_part}")


@app.command()
@handle_errors
def merge(
    base: Annotated[str, typer.Argument(help="Base peqa/GPTQ checkpoint, or a merge recipe YAML.")],
    delta: Annotated[
        str | None,
        typer.Argument(help="Scale delta folder (from peqa finetune); omit with a recipe."),
    ] = None,
    overrides: Overrides = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Output folder.")] = None,
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="gptq (integer checkpoint) or hf (dequantized float)."),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="hf export: bfloat16, float16 (default) or float32."),
    ] = None,
    overwrite: Overwrite = False,
    print_config: PrintConfig = False,
    as_json: JsonOut = False,
) -> None:
    """Fold a scale delta into its base: a new integer checkpoint (or a float export).

    Example: peqa merge ckpt/smollm2-w4 runs/alpaca/final --out ckpt/smollm2-w4-alpaca
    """
    from peqa_cli.errors import InputError
    from peqa_cli.recipes.merge import MergeRecipe, run

    recipe = find_recipe(base)
    overrides = list(overrides or [])
    if recipe and delta and "=" in delta:  # `peqa merge recipe.yaml out=x`: an override
        overrides, delta = [delta, *overrides], None
    if not recipe and not delta:
        raise InputError("missing DELTA: peqa merge BASE DELTA --out DIR (or a recipe YAML)")
    flags = {
        "base": None if recipe else base,
        "delta": delta,
        "out": out,
        "format": fmt,
        "dtype": dtype,
        "overwrite": overwrite or None,
    }
    cfg = load_config(MergeRecipe, recipe, overrides, flags)
    if print_config:
        typer.echo(dump_yaml(cfg), nl=False)
        return
    _emit(run(cfg), as_json)


@app.command()
@handle_errors
def generate(
    model: Annotated[
        str, typer.Argument(help="peqa/GPTQ checkpoint, or a float model (folder, .gguf, alias).")
    ],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt to answer.")],
    delta: Annotated[
        list[str] | None,
        typer.Option("--delta", "-d", help="Scale delta; repeat to answer with each in turn."),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate.")
    ] = 128,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat",
            help="Wrap the prompt in the chat template (default: on when the tokenizer has one).",
        ),
    ] = None,
    temperature: Annotated[
        float, typer.Option("--temperature", help="0 = greedy (default); > 0 samples.")
    ] = 0.0,
    top_p: Annotated[
        float | None, typer.Option("--top-p", help="Nucleus sampling (with --temperature).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")] = "auto",
) -> None:
    """Answer a prompt, streaming; with several --delta, one loaded base answers with each.

    Example: peqa generate ckpt/smollm2-w4 --delta runs/alpaca/final --prompt "Name three colors."
    """
    from peqa_cli.recipes.generate import GenerateSettings, run

    settings = GenerateSettings(max_new_tokens, chat, temperature, top_p, seed)
    run(model, list(delta or []), prompt, settings, device)


@recipes_app.callback()
def _recipes(ctx: typer.Context) -> None:
    """List shipped recipes (one line each)."""
    if ctx.invoked_subcommand is None:
        _list_recipes()


def _list_recipes() -> None:
    items = list_recipes()
    width = max((len(r.name) for r in items), default=0)
    for r in items:
        typer.echo(f"{r.name:<{width}}  {r.command:<8}  {r.description}")


@recipes_app.command("ls")
def recipes_ls() -> None:
    """List shipped recipes (one line each)."""
    _list_recipes()


@recipes_app.command("cp")
@handle_errors
def recipes_cp(
    name: Annotated[str, typer.Argument(help="Shipped recipe name (see `peqa recipes`).")],
    dest: Annotated[str, typer.Argument(help="Destination file or folder.")],
) -> None:
    """Copy a shipped recipe to edit it."""
    typer.echo(str(copy_recipe(name, dest)))


def _sigterm(signum, frame) -> None:
    # A job scheduler's SIGTERM unwinds like Ctrl-C, so temporary output folders are removed
    # (and training saves a checkpoint) instead of being left half-written.
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _sigterm)
    app()


if __name__ == "__main__":
    main()
