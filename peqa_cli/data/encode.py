"""Tokenization of normalized records into training examples with loss masks.

An example is ``{"input_ids": [...], "labels": [...]}`` (plus ``position_ids`` once packed);
``labels`` is -100 where no loss is taken. The model shifts labels itself (HF causal-LM loss),
so ``labels[t]`` is the target predicted from tokens ``< t``.

Why prompt and response are tokenized separately and their ids concatenated: tokenizing
``prompt + response`` as one string lets BPE merge characters across the boundary (e.g. the
":" ending "### Response:" with the response's first characters), so the prompt's own ids need
not be a prefix of the full ids and "mask the first len(prompt_ids) labels" would mask a
token too many or too few (with SmolLM2's tokenizer this happens for 47 of the 2000 records
of alpaca_cleaned_sample2000.jsonl). Concatenating ids makes the boundary exact by construction; the
cost is that the boundary tokens can differ slightly from a joint tokenization, which is
harmless for training as the same rule is applied everywhere.
"""

from __future__ import annotations

import logging
from typing import Any

from peqa_cli.data.config import EOS_JOIN
from peqa_cli.data.formats import alpaca_prompt
from peqa_cli.data.sources import Record
from peqa_cli.errors import InputError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
Example = dict[str, list[int]]


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` if the tokenizer prepends BOS by default (Llama), else ``[]`` (GPT-2, SmolLM2).

    Probed by encoding a short string with and without special tokens, so it follows the
    tokenizer's actual post-processor rather than an ``add_bos_token`` flag that not every
    tokenizer class has.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and without[:1] != [bos] else []


def eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the tokenizer has no EOS token; it is needed to end each response")
    return int(eos)


def token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Ids of each text without special tokens (one batched call; fast tokenizers parallelize)."""
    if not texts:
        return []
    # verbose=False: long texts (format=text) are cut into windows later, so the "sequence
    # longer than the model maximum" warning would be noise.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _finish(ids: list[int], labels: list[int], max_length: int) -> tuple[Example, bool]:
    """Cut to ``max_length`` from the end (the response tail and its EOS go first)."""
    truncated = len(ids) > max_length
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}, truncated


def encode_alpaca(
    rows: list[dict[str, str]], tokenizer: Any, *, max_length: int, train_on_inputs: bool
) -> tuple[list[Example], int]:
    """Alpaca examples: ``BOS? + prompt`` (masked unless ``train_on_inputs``) ``+ output + EOS``.

    Returns the examples and how many were truncated.
    """
    eos = eos_id(tokenizer)
    bos = bos_prefix(tokenizer)
    prompts = token_ids(tokenizer, [alpaca_prompt(r["instruction"], r["input"]) for r in rows])
    responses = token_ids(tokenizer, [r["output"] for r in rows])
    examples, truncated = [], 0
    for p, r in zip(prompts, responses, strict=True):
        prompt, response = bos + p, r + [eos]
        ids = prompt + response
        labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt) + response
        ex, cut = _finish(ids, labels, max_length)
        examples.append(ex)
        truncated += cut
    return examples, truncated


def render_chat(tokenizer: Any, messages: list[dict[str, str]], where: str, gen: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    except Exception as e:  # jinja raises TemplateError / custom exceptions from the template
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"{where}: the tokenizer's chat template rejected the record: {msg}"
        ) from e


def chat_segments(
    tokenizer: Any, messages: list[dict[str, str]], where: str
) -> list[tuple[str, bool]]:
    """The rendered conversation split into (text, is_assistant_reply) pieces.

    Works with any template by rendering prefixes: the reply to assistant turn i is what
    ``render(messages[:i+1])`` adds beyond ``render(messages[:i], add_generation_prompt=True)``
    (so the "<|im_start|>assistant\\n" header stays in the prompt and the end-of-turn token
    the template writes after the reply is trained, letting the model learn to stop).
    A template that rewrites earlier turns (e.g. strips reasoning from past replies) breaks
    the prefix property; that is reported rather than silently mis-masked.
    """
    full = render_chat(tokenizer, messages, where, gen=False)
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], where, gen=True) if i else ""
        upto = render_chat(tokenizer, messages[: i + 1], where, gen=False)
        ok = (
            i > 0
            and full.startswith(before)
            and full.startswith(upto)
            and pos <= len(before) <= len(upto)
        )
        if not ok:
            raise InputError(
                f"{where}: cannot locate assistant turn messages[{i}] in the chat template's "
                "output (the template does not render a conversation's beginning as a prefix "
                "of the whole); set data.train_on_inputs: true to train on all tokens"
            )
        segments.append((full[pos : len(before)], False))
        segments.append((full[len(before) : len(upto)], True))
        pos = len(upto)
    segments.append((full[pos:], False))
    return [(text, trainable) for text, trainable in segments if text]


def encode_chat(
    records: list[Record], tokenizer: Any, *, max_length: int, train_on_inputs: bool
) -> tuple[list[Example], int]:
    """Chat examples through ``apply_chat_template``; loss on assistant replies only unless
    ``train_on_inputs``. The rendered text is tokenized without special tokens, as
    ``apply_chat_template(tokenize=True)`` does: templates write their own BOS if they want one.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            "the tokenizer has no chat template, which chat data (messages) needs; "
            "use alpaca or text data, or a model whose tokenizer has one"
        )
    examples, truncated = [], 0
    for r in records:
        messages = r.fields["messages"]
        if train_on_inputs:
            segments = [(render_chat(tokenizer, messages, r.where, gen=False), True)]
        else:
            segments = chat_segments(tokenizer, messages, r.where)
        ids: list[int] = []
        labels: list[int] = []
        for (_, trainable), seg in zip(
            segments, token_ids(tokenizer, [s for s, _ in segments]), strict=True
        ):
            ids += seg
            labels += seg if trainable else [IGNORE_INDEX] * len(seg)
        ex, cut = _finish(ids, labels, max_length)
        examples.append(ex)
        truncated += cut
    return examples, truncated


def encode_text(
    texts: list[str], tokenizer: Any, *, max_length: int, join: str
) -> tuple[list[Example], int]:
    """Language-model windows: all rows joined into one token stream cut into ``max_length`` chunks.

    ``join`` is the string placed between rows (GPTQ/PEQA WikiText protocol: "\\n\\n", then
    one tokenization of the whole string) or ``"eos"``: each non-empty row tokenized alone and
    followed by the EOS id. BOS, if the tokenizer adds one, starts the stream once. The tail
    shorter than a window is dropped (its token count is returned) so every window has exactly
    ``max_length`` tokens; labels equal input_ids (loss on every token).
    """
    bos = bos_prefix(tokenizer)
    if join == EOS_JOIN:
        eos = eos_id(tokenizer)
        ids = list(bos)
        # Empty rows (WikiText's blank lines) would only add runs of EOS.
        for row in token_ids(tokenizer, [t for t in texts if t]):
            ids += row + [eos]
    else:
        ids = bos + token_ids(tokenizer, [join.join(texts)])[0]
    n = len(ids) // max_length
    if n == 0:
        raise InputError(
            f"the text has {len(ids)} tokens, fewer than data.max_length {max_length}; "
            "lower max_length or use more text"
        )
    windows = [ids[i * max_length : (i + 1) * max_length] for i in range(n)]
    return [{"input_ids": w, "labels": list(w)} for w in windows], len(ids) - n * max_length


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate consecutive examples into sequences of at most ``max_length`` tokens.

    Greedy in order (deterministic, no reordering). Each piece keeps its own labels, and
    ``position_ids`` restart at 0 for each piece so the collator can either isolate them
    (block-diagonal attention, see ``Collator``) or drop them for plain causal attention
    across pieces, as most trainers do. Each piece's first label is set to -100: after the
    model's label shift it would be predicted from the *previous* piece's last token; in an
    unpacked example the first label is never a target anyway, so nothing is lost.
    """
    packed: list[Example] = []
    cur: Example | None = None
    for ex in examples:
        n = len(ex["input_ids"])
        if cur is not None and len(cur["input_ids"]) + n > max_length:
            packed.append(cur)
            cur = None
        if cur is None:
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += ex["input_ids"]
        cur["labels"] += [IGNORE_INDEX] + ex["labels"][1:]
        cur["position_ids"] += list(range(n))
    if cur is not None:
        packed.append(cur)
    return packed
