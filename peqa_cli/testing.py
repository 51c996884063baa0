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


def random_delta(base, out, rel: float = 0.05, seed: int = 0, **config):
    """A synthetic scale delta for ``base`` (a checkpoint folder): Δs = rel * s0 * N(0, 1) on
    every quantized layer, keyed to the base's fingerprint; ``config`` adds delta metadata."""
    from peqa_cli.io.checkpoint import load_quantized, quant_layers
    from peqa_cli.io.delta import save_delta

    q = load_quantized(base)
    g = torch.Generator().manual_seed(seed)
    deltas = {
        n: rel * layer.scales.detach() * torch.randn(layer.scales.shape, generator=g)
        for n, layer in quant_layers(q.model).items()
    }
    meta = {"base_fingerprint": q.fingerprint, "bits": q.spec.bits,
            "group_size": q.spec.group_size, **config}  # fmt: skip
    return save_delta(out, deltas, meta)
