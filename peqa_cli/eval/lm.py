"""Log-likelihood scoring with an in-memory causal LM, with lm-evaluation-harness 0.4.x semantics.

:class:`CausalLMScorer` has lm-eval's ``LM`` interface (``loglikelihood``,
``loglikelihood_rolling``) and reproduces ``HFLM``'s tokenization exactly (lm_eval 0.4.13,
``models/huggingface.py`` and ``api/model.py``):

* trailing whitespace of a context moves onto its continuation;
* context+continuation and context are encoded separately, continuation tokens are
  ``whole[len(context_enc):]``;
* special tokens: the tokenizer's own default (``add_special_tokens`` left unset, so a llama
  tokenizer adds its BOS and a GPT-2 style one adds nothing), or ``add_bos_token`` when given;
  a string that already starts with the BOS text is encoded without special tokens;
* an empty context is replaced by the prefix token (BOS, else EOS);
* ``(context + continuation)[-(max_length + 1):][:-1]`` is fed, i.e. left truncation.

Speed comes from not recomputing shared contexts: all choices of an item are packed into one
row after their common context (see ``packing.py``), so the context runs once. A model whose
forward takes no ``position_ids``, or that fails a one-time packed-vs-plain check, is scored with
lm-eval's layout (one right-padded row per request). Either way each request sees only its own
real tokens, so results do not depend on batch size or packing beyond float rounding.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence

import torch
from rich.console import Console

from peqa_cli.errors import InputError
from peqa_cli.eval.packing import (
    Request,
    Row,
    layout,
    make_batches,
    make_rows,
    score,
    score_selected,
    split_request,
)
from peqa_cli.progress import progress_bar, stderr_console

# lm-eval's fallbacks when neither config nor tokenizer state a context length.
DEFAULT_MAX_LENGTH = 2048
_TOKENIZER_INFINITY = 1000000000000000019884624838656
_SEQLEN_CONFIG_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")

# Token ids per tokenizer and string. Evaluating several deltas re-encodes the same prompts with
# the same tokenizer; a weak key drops the entries with the tokenizer. Capped, not LRU: a run that
# overflows it is one huge evaluation, and clearing keeps memory bounded.
_ENCODE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ENCODE_CACHE_MAX = 200_000


def resolve_max_length(model: torch.nn.Module, tokenizer, default: int = DEFAULT_MAX_LENGTH) -> int:
    """The model's context length, looked up like lm-eval's ``resolve_max_length``."""
    config = getattr(model, "config", None)
    cfg = getattr(config, "text_config", None) or config
    for attr in _SEQLEN_CONFIG_ATTRS:
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and model_max != _TOKENIZER_INFINITY:
        return int(model_max)
    return default


def rolling_windows(
    tokens: list[int], prefix_token: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, continuation) windows covering ``tokens``, as lm-eval's
    ``get_rolling_token_windows(..., context_len=1)`` followed by ``make_disjoint_window``."""
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_token], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n_pred = min(len(tokens) - predicted, max_length)
        end = predicted + n_pred
        # lm-eval's window input is the max_length tokens before ``end``; made disjoint, the
        # context is what precedes the predicted tokens (one token, more for a short last window).
        ctx = tokens[end - max_length - 1 : end - 1]
        windows.append((ctx[: len(ctx) - (n_pred - 1)], tokens[end - n_pred : end]))
        predicted = end
    return windows


class CausalLMScorer:
    """lm-eval-compatible scorer for any causal LM called as ``model(input_ids=, attention_mask=)``.

    ``batch_size`` counts rows per forward pass; a row holds one context with all of its
    continuations packed after it. Weights are read at call time; nothing that depends on them
    is cached (token ids are).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        share_prefix: bool | None = None,
        progress: bool = True,
        console: Console | None = None,
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or resolve_max_length(model, tokenizer)
        self.add_bos_token = add_bos_token
        self.progress = progress
        self.console = console
        params = inspect.signature(model.forward).parameters
        # Packing needs per-branch position ids; the 4-D mask is verified on first use.
        can_pack = "position_ids" in params
        self.share_prefix = can_pack if share_prefix is None else (share_prefix and can_pack)
        self._pack_checked = False
        self._keep_kw = "logits_to_keep" in params
        self._split: tuple[torch.nn.Module, torch.nn.Module] | None = None
        self._split_checked = False
        pad = getattr(tokenizer, "pad_token_id", None)
        self._pad_id = pad if pad is not None else 0
        self._prefix_text = tokenizer.decode(self.prefix_token_id)

    # ----------------------------------------------------------------- tokenization (HFLM's)
    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of ``string`` exactly as ``HFLM.tok_encode`` makes them (cached)."""
        kwargs = {}
        if add_special_tokens is not None:
            kwargs["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kwargs["add_special_tokens"] = self.add_bos_token
        # HFLM: a string that already carries the BOS text must not get a second BOS.
        if add_special_tokens is None and string.startswith(self._prefix_text):
            kwargs["add_special_tokens"] = False
        cache = _ENCODE_CACHE.setdefault(self.tokenizer, {})
        key = (string, kwargs.get("add_special_tokens"))
        if key not in cache:
            if len(cache) >= _ENCODE_CACHE_MAX:
                cache.clear()
            cache[key] = self.tokenizer.encode(string, **kwargs)
        return list(cache[key])

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens) as lm-eval's ``LM.loglikelihood`` builds them."""
        if context == "":
            cont = self.tok_encode(continuation, add_special_tokens=False)
            if not cont or cont[0] != self.prefix_token_id:
                return [self.prefix_token_id], cont
            return cont[:1], cont[1:]
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx) :]

    # ----------------------------------------------------------------------- public scoring
    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], *, desc: str = "loglikelihood"
    ) -> list[tuple[float, bool]]:
        """Sum log-prob of each continuation given its context, and whether it is the greedy decode."""
        pairs = [self.encode_pair(ctx, cont) for ctx, cont in requests]
        return self.loglikelihood_tokens(pairs, desc=desc)

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Full log-likelihood of each text, in disjoint windows of the model's max length."""
        pairs, owner = [], []
        for i, text in enumerate(texts):
            windows = rolling_windows(self.tok_encode(text), self.prefix_token_id, self.max_length)
            pairs.extend(windows)
            owner.extend([i] * len(windows))
        totals = [0.0] * len(texts)
        scored = self.loglikelihood_tokens(pairs, desc="loglikelihood_rolling")
        for i, (ll, _) in zip(owner, scored, strict=True):
            totals[i] += ll
        return totals

    @torch.inference_mode()
    def loglikelihood_tokens(
        self, pairs: Sequence[tuple[list[int], list[int]]], desc: str = "scoring"
    ) -> list[tuple[float, bool]]:
        """Score tokenized (context, continuation) pairs; results in input order."""
        reqs = [split_request(i, c, k, self.max_length) for i, (c, k) in enumerate(pairs)]
        rows = make_rows(reqs, self.share_prefix, self.max_length)
        results: list[tuple[float, bool] | None] = [None] * len(reqs)
        with progress_bar(
            desc, len(reqs), show=self.progress, console=self.console, transient=True
        ) as advance:
            for batch in make_batches(rows, self.batch_size):
                scored = self._run(batch)
                for req, ll, greedy in scored:
                    results[req.index] = (ll, greedy)
                advance(len(scored))
        return results  # type: ignore[return-value]

    def _mask_dtype(self) -> torch.dtype:
        """The dtype attention runs in: an additive mask must match it (SDPA and eager)."""
        emb = getattr(self.model, "get_input_embeddings", lambda: None)()
        weight = getattr(emb, "weight", None)
        if weight is not None and weight.is_floating_point():
            return weight.dtype
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def _forward(self, rows: list[Row], packed: bool) -> list[tuple[Request, float, bool]]:
        lay = layout(rows, self._pad_id, self._mask_dtype() if packed else None)
        width = lay.input_ids.shape[1]
        kwargs = {
            "input_ids": lay.input_ids.to(self.device),
            "attention_mask": lay.attention_mask.to(self.device),
        }
        if lay.position_ids is not None:
            kwargs["position_ids"] = lay.position_ids.to(self.device)
        if self._keep_kw:
            # Project to the vocabulary only from the first scored position on.
            kwargs["logits_to_keep"] = width - lay.first_scored
        if self._split is not None:
            # Backbone, then the vocabulary projection of the scored positions only: no
            # [batch, length, vocab] logits (most of them unscored) are ever built.
            decoder, head = self._split
            kwargs.pop("logits_to_keep", None)
            hidden = decoder(**kwargs, use_cache=False).last_hidden_state
            rows_ = torch.tensor(lay.rows, device=hidden.device)
            positions = torch.tensor(lay.positions, device=hidden.device)
            return score_selected(head(hidden[rows_, positions]), lay)
        logits = self.model(**kwargs).logits
        return score(logits, lay, offset=width - logits.shape[1])

    def _run(self, rows: list[Row]) -> list[tuple[Request, float, bool]]:
        if not self._split_checked:
            self._check_split(rows)
        packed = len(rows[0].members) > 1
        if packed and not self.share_prefix:  # packing was switched off earlier in this call
            return self._forward([Row(r.shared, [r]) for row in rows for r in row.members], False)
        result = self._forward(rows, packed)
        if packed and not self._pack_checked:
            self._pack_checked = True
            if not self._packing_agrees(rows[0], result):
                self.share_prefix = False
                return self._run(rows)
        return result

    def _check_split(self, rows: list[Row]) -> None:
        """Once per scorer: use ``get_decoder()`` + ``get_output_embeddings()`` if, on the first
        row, they give what the model's own forward gives (a model that scales or caps its
        logits after the projection fails this and keeps the plain path)."""
        self._split_checked = True
        get_decoder = getattr(self.model, "get_decoder", None)
        get_head = getattr(self.model, "get_output_embeddings", None)
        decoder = get_decoder() if callable(get_decoder) else None
        head = get_head() if callable(get_head) else None
        if decoder is None or head is None or decoder is self.model:
            return
        probe = [Row(rows[0].shared, [rows[0].members[0]])]
        reference = self._forward(probe, False)
        self._split = (decoder, head)
        try:
            split = self._forward(probe, False)
        except (TypeError, AttributeError, RuntimeError):
            split = None
        tol = max(1e-4, 50 * torch.finfo(self._mask_dtype()).eps)
        if split is None or any(
            abs(a[1] - b[1]) > tol * (1 + abs(a[1])) or a[2] != b[2]
            for a, b in zip(reference, split, strict=True)
        ):
            self._split = None

    def _packing_agrees(self, row: Row, packed: list[tuple[Request, float, bool]]) -> bool:
        """Once per scorer: a model that ignores 4-D masks or position ids must not be packed.
        Compares the first packed row against plain rows; on mismatch warns and falls back."""
        plain = self._forward([Row(r.shared, [r]) for r in row.members], False)
        got = {req.index: ll for req, ll, _ in packed}
        tol = max(1e-3, 50 * torch.finfo(self._mask_dtype()).eps)
        if all(abs(got[req.index] - ll) <= tol * (1 + abs(ll)) for req, ll, _ in plain):
            return True
        (self.console or stderr_console).print(
            "[yellow]warning:[/] this model does not honour packed attention masks; "
            "scoring one request per row (slower, same results)"
        )
        return False
