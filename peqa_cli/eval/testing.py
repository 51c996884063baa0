"""Tiny offline models and tokenizers for tests and smoke runs (no network, < 1 s to build).

The tokenizer is a byte-level BPE trained on a few sentences, so whitespace and word-boundary
behaviour is that of a real GPT-2 / llama-3 style tokenizer; ``bos=True`` adds a post-processor
that prepends ``<s>`` like llama tokenizers do.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from peqa_cli.testing import tiny_llama as shared_tiny_llama

TINY_CORPUS = (
    "Question: Which gas do plants absorb from the air?\nAnswer: carbon dioxide",
    "Question: What is the boiling point of water?\nAnswer: one hundred degrees",
    "Pole vault: A man runs with a pole. He jumps over the bar and lands on a mat.",
    "How to clean a window. [title] Spray the glass. [step] Wipe it with a cloth.",
    "The following are multiple choice questions (with answers) about astronomy.",
    " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor .",
)
SPECIALS = ("<pad>", "<s>", "</s>")


@functools.lru_cache(maxsize=2)
def tiny_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab 384); pad=0, bos=1, eos=2. Cached: treat it as read-only."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(TINY_CORPUS) * 4, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_llama(vocab_size: int = 384, seed: int = 0, max_positions: int = 512) -> LlamaForCausalLM:
    """The shared tiny Llama, untied and with weights scaled up from the default init so that
    log-probs differ clearly between tokens (near-uniform logits make ties)."""
    model = shared_tiny_llama(seed, vocab_size=vocab_size, intermediate_size=128,
                              max_position_embeddings=max_positions, pad_token_id=0,
                              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.eval()
