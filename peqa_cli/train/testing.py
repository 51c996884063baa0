"""Offline fixtures for trainer tests: a tiny Llama with a tokenizer, quantized, and data.

Everything is built in-process (no network): a random 2-layer Llama whose vocabulary fits
:func:`peqa_cli.data.testing.make_tiny_tokenizer`, saved as a fp16 HF folder with the
tokenizer beside it, then quantized with ``peqa quantize``'s own code path.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from peqa_cli.data.testing import make_tiny_tokenizer
from peqa_cli.testing import tiny_llama as _tiny_llama

VOCAB = 416  # >= the tiny tokenizer's 400 ids; a multiple of 32 like real vocabularies


def tiny_llama(seed: int = 0, **overrides):
    """The shared tiny Llama with a vocabulary that fits the tiny tokenizer."""
    return _tiny_llama(seed, **{"vocab_size": VOCAB, "max_position_embeddings": 256, **overrides})


def save_float_model(path: Path, seed: int = 0, **overrides) -> Path:
    """A fp16 HF folder (config, weights, tokenizer) of a tiny random Llama."""
    model = tiny_llama(seed, **overrides)
    model.half().save_pretrained(path, safe_serialization=True)
    make_tiny_tokenizer(bos=True).save_pretrained(path)
    return path


def save_quantized_model(path: Path, float_dir: Path, bits: int = 4, group_size: int = 32) -> Path:
    from peqa_cli.recipes.quantize import QuantizeRecipe, QuantSettings, run

    run(
        QuantizeRecipe(
            model=str(float_dir),
            out=str(path),
            quant=QuantSettings(bits=bits, group_size=group_size),
            device="cpu",
        )
    )
    return path


_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "hello",
    "world",
    "lobster",
    "species",
    "clawed",
    "instruction",
    "response",
    "input",
    "task",
    "model",
    "tiny",
    "test",
    "two",
    "plus",
    "four",
]


def write_text_jsonl(path: Path, rows: int = 60, seed: int = 0) -> Path:
    """WikiText-like rows (``{"text": ...}``) of a small repetitive vocabulary."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 30)))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def write_alpaca_jsonl(path: Path, rows: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(rows):
            inp = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 6)))
            out = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
            rec = {"instruction": f"Say it {i % 5}", "input": inp, "output": out}
            f.write(json.dumps(rec) + "\n")
    return path
