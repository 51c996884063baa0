"""The tiny random Llama that tests, fixtures and smoke runs build in-process (no network).

One shape (2 layers, 64 wide, 4 heads over 2 KV heads); callers override what their test needs
(vocabulary to fit their tokenizer, context length, tied or untied head).
"""

from __future__ import annotations

import torch

TINY_SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_SHAPE, **overrides})


def tiny_llama(seed: int = 0, **overrides):
    """A randomly initialised ``LlamaForCausalLM`` in eval mode (``torch.manual_seed(seed)``)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
