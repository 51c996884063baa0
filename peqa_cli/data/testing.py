"""A tiny offline tokenizer for tests (data, trainer, CLI) that must not touch the network.

Byte-level BPE trained in-process on a few sentences (decoding is lossless, so tests can
compare decoded spans with rendered text), ChatML special tokens and a ChatML chat template
that, like SmolLM2's, injects a default system turn when the conversation has none (the case
that makes naive prefix-based masking go wrong).
"""

from __future__ import annotations

import functools
from typing import Any

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:",
    "The quick brown fox jumps over the lazy dog. Hello world, hello tokenizer!",
    " = Homarus gammarus = \n The European lobster is a species of clawed lobster.",
    "user assistant system You are a tiny test model. What is two plus two? Four.",
]


@functools.lru_cache(maxsize=4)
def _backend(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok


def make_tiny_tokenizer(
    *, bos: bool = True, chat_template: str | None = CHATML_TEMPLATE, vocab_size: int = 400
) -> Any:
    """A ``PreTrainedTokenizerFast``; ``bos=True`` prepends ``<s>`` by default (Llama-like),
    ``bos=False`` adds nothing (GPT-2/SmolLM2-like). EOS ``</s>``, pad ``<pad>``."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    # A copy per call: the post-processor differs between bos=True/False.
    tok = Tokenizer.from_str(_backend(vocab_size).to_str())
    if bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    t = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    t.chat_template = chat_template
    return t
