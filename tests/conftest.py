"""Shared fixtures: a tiny random Llama saved like a real fp16 checkpoint."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("PEQA_QUIET", "1")


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    base.update(kw)
    return LlamaConfig(**base)


def make_tiny_llama(seed: int = 0, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**kw)).eval()
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
