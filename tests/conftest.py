"""Shared fixtures: a tiny random Llama saved like a real fp16 checkpoint."""

from __future__ import annotations

import os

import pytest
import torch

from peqa_cli.testing import tiny_llama as build_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("PEQA_QUIET", "1")


def make_tiny_llama(seed: int = 0, **kw):
    model = build_tiny_llama(seed, **kw)
    # Round to fp16 and back: the model is then exactly what a fp16 checkpoint holds.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_llama_dir(tmp_path, tiny_llama):
    path = tmp_path / "tiny-llama"
    tiny_llama.half().save_pretrained(path, safe_serialization=True)
    tiny_llama.float()
    return path
