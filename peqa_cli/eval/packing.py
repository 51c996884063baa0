"""Batch layout for log-likelihood scoring: one row per context, its continuations packed after it.

The choices of a multiple-choice item share their whole context. lm-eval runs ``context +
choice`` once per choice; here a row holds the context once followed by every choice's own
tokens, each branch attending only to the context and to itself (a 4-D additive attention mask)
and numbered as if it came straight after the context (explicit position ids). Leading tokens
that all choices share move into the context part and run once too. The model thus
computes exactly what separate rows would give, with the context's tokens run once and no
padding between branches. Requests without a partner (or a model without position ids) use
plain rows: one request per row, right padded, lm-eval's layout.

Request anatomy (lm-eval's truncation included)::

    inp     = (context + continuation)[-(max_length + 1):][:-1]
    shared  = inp[:len(inp) - len(continuation) + 1]   # through the last context token
    own     = inp[len(shared):]                        # continuation[:-1]
    scored  = logits at [len(shared) - 1] + own positions, predicting continuation
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from peqa_cli.errors import InputError


@dataclass(frozen=True)
class Request:
    index: int
    shared: tuple[int, ...]
    own: tuple[int, ...]
    targets: tuple[int, ...]


@dataclass
class Row:
    shared: tuple[int, ...]
    members: list[Request] = field(default_factory=list)

    @property
    def common(self) -> int:
        """Leading ``own`` tokens every member has: run once, in the shared part (PIQA's two
        solutions often start alike; their first words then cost nothing the second time)."""
        if len(self.members) < 2:
            return 0
        n = 0
        for column in zip(*(m.own for m in self.members), strict=False):  # to the shortest
            if any(t != column[0] for t in column):
                break
            n += 1
        return n

    @property
    def length(self) -> int:
        c = self.common
        return len(self.shared) + c + sum(len(m.own) - c for m in self.members)


def split_request(
    index: int, context: Sequence[int], continuation: Sequence[int], max_length: int
) -> Request:
    """Apply lm-eval's left truncation and cut the input into shared and own tokens."""
    if not continuation:
        raise InputError("a continuation encodes to no tokens; answer choices must be non-empty")
    if not context:
        raise InputError("a context encodes to no tokens (lm-eval uses the BOS/EOS token)")
    if len(continuation) > max_length:
        raise InputError(
            f"a continuation of {len(continuation)} tokens exceeds the model's max length {max_length}"
        )
    inp = (list(context) + list(continuation))[-(max_length + 1) :][:-1]
    cut = len(inp) - len(continuation) + 1
    return Request(index, tuple(inp[:cut]), tuple(inp[cut:]), tuple(continuation))


def make_rows(requests: Sequence[Request], pack: bool, max_length: int) -> list[Row]:
    """Rows of requests sharing their context (if ``pack``), each at most ``max_length`` tokens
    long unless a single request needs more; otherwise one row per request."""
    if not pack:
        return [Row(r.shared, [r]) for r in requests]
    rows: list[Row] = []
    open_rows: dict[tuple[int, ...], Row] = {}
    for r in requests:
        row = open_rows.get(r.shared)
        if row is None or row.length + len(r.own) > max_length:
            row = open_rows[r.shared] = Row(r.shared)
            rows.append(row)
        row.members.append(r)
    return rows


def make_batches(rows: list[Row], batch_size: int) -> list[list[Row]]:
    """Longest rows first (like lm-eval: an OOM shows at once and padding stays small), packed
    and single-request rows in separate batches, ``batch_size`` rows per batch."""

    def key(row: Row) -> tuple[int, int]:
        return (-row.length, row.members[0].index)

    packed = sorted((r for r in rows if len(r.members) > 1), key=key)
    single = sorted((r for r in rows if len(r.members) == 1), key=key)
    return [
        kind[i : i + batch_size]
        for kind in (packed, single)
        for i in range(0, len(kind), batch_size)
    ]


@dataclass
class Layout:
    """Model inputs for one batch and, per request, where its scored logits are."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None
    first_scored: int  # smallest scored position: logits before it are not needed
    rows: list[int]  # batch row of each scored token
    positions: list[int]  # sequence position of each scored token
    targets: list[int]
    spans: list[tuple[Request, int]]  # request and its number of scored tokens, in order


def layout(rows: Sequence[Row], pad_id: int, mask_dtype: torch.dtype | None) -> Layout:
    """Right-padded ids; a 2-D padding mask for single-request rows, or a 4-D additive
    branch mask and per-branch position ids when ``mask_dtype`` is given (packed rows)."""
    width = max(r.length for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)  # -1 pad, 0 shared, j+1 branch j
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    out_rows, out_pos, targets, spans = [], [], [], []
    for b, row in enumerate(rows):
        n, c = len(row.shared), row.common
        head = row.shared + row.members[0].own[:c]  # the context, then the common own tokens
        ids[b, : n + c] = torch.tensor(head)
        seg[b, : n + c] = 0
        pos[b, : n + c] = torch.arange(n + c)
        start = n + c
        for j, req in enumerate(row.members):
            k = len(req.own) - c
            ids[b, start : start + k] = torch.tensor(req.own[c:], dtype=torch.long)
            seg[b, start : start + k] = j + 1
            pos[b, start : start + k] = torch.arange(n + c, n + c + k)
            scored = [n - 1, *range(n, n + c), *range(start, start + k)]
            out_rows += [b] * len(scored)
            out_pos += scored
            targets += req.targets
            spans.append((req, len(scored)))
            start += k
    first = min(len(r.shared) for r in rows) - 1
    if mask_dtype is None:
        return Layout(ids, (seg >= 0).long(), None, first, out_rows, out_pos, targets, spans)
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    # A token sees earlier shared tokens and earlier tokens of its own branch; pad queries see
    # the shared tokens only, so no row of the mask is empty (an all-masked row gives NaNs).
    allowed = causal & ((k == 0) | (k == q))
    mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill(
        ~allowed, torch.finfo(mask_dtype).min
    )
    return Layout(ids, mask[:, None], pos, first, out_rows, out_pos, targets, spans)


def score(logits: torch.Tensor, lay: Layout, offset: int) -> list[tuple[Request, float, bool]]:
    """(request, sum log-prob, is-greedy) from ``logits`` whose position 0 is ``offset``.

    All scored positions of the batch are gathered first, so the float32 log-softmax runs on
    just those vectors rather than on every (padded) position as lm-eval does."""
    device = logits.device
    rows = torch.tensor(lay.rows, device=device)
    positions = torch.tensor(lay.positions, device=device) - offset
    return score_selected(logits[rows, positions], lay)


def score_selected(selected: torch.Tensor, lay: Layout) -> list[tuple[Request, float, bool]]:
    """:func:`score` from the logits of the scored positions alone, [n_scored, vocab] in the
    layout's order (when the caller projected just those hidden states)."""
    device = selected.device
    selected = selected.float()
    targets = torch.tensor(lay.targets, device=device)
    logprobs = F.log_softmax(selected, dim=-1).gather(1, targets[:, None]).squeeze(1)
    hits = selected.argmax(dim=-1) == targets
    out, start = [], 0
    for req, n in lay.spans:
        out.append(
            (req, float(logprobs[start : start + n].sum()), bool(hits[start : start + n].all()))
        )
        start += n
    return out
