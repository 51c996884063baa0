"""Pure tensor math of PEQA's weight decomposition; no modules, no I/O.

A linear weight ``W`` [N, K] (out x in) is split into groups of ``group_size`` input
columns (``-1`` = one group spanning all of K, i.e. per output channel; a size that does not
divide K leaves a shorter last group, as GPTQ does). Each (group, row) pair gets an
asymmetric scale ``s`` and integer zero-point ``z`` from its min and max (round-to-nearest,
the PEQA paper's starting point):

    q = clamp(round(W / s) + z, 0, 2^b - 1)          (frozen integers)
    W_hat = s * (q - z)                              (only s is trained later)

Orientation follows GPTQ: ``scales`` and ``zeros`` are [G, N]; ``g_idx`` [K] maps each
input column to its group.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8)
QMAX: dict[int, int] = {b: (1 << b) - 1 for b in SUPPORTED_BITS}


def num_groups(in_features: int, group_size: int) -> int:
    """G = ceil(K / g); per channel (``-1``) is one group."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def group_index(
    in_features: int, group_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """``g_idx`` [K] int32: the group of each input column (``k // g``, all zeros per channel)."""
    k = torch.arange(in_features, dtype=torch.int32, device=device)
    return torch.zeros_like(k) if group_size == -1 else k // group_size


def _group_minmax(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise min and max of each group of columns: two [G, N] tensors."""
    n, k = w.shape
    if group_size == -1 or group_size >= k:
        return w.amin(dim=1, keepdim=True).t(), w.amax(dim=1, keepdim=True).t()
    full = k // group_size * group_size
    body = w[:, :full].reshape(n, full // group_size, group_size)
    mins, maxs = [body.amin(dim=2)], [body.amax(dim=2)]
    if full < k:  # the partial last group only sees its own columns
        tail = w[:, full:]
        mins.append(tail.amin(dim=1, keepdim=True))
        maxs.append(tail.amax(dim=1, keepdim=True))
    return torch.cat(mins, dim=1).t(), torch.cat(maxs, dim=1).t()


def choose_qparams(
    w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max asymmetric scales and zero-points for ``w`` [N, K].

    Returns ``scales`` [G, N] (float32 holding values exactly representable in
    ``scale_dtype``, so the integers are computed against the very scales the checkpoint
    stores) and ``zeros`` [G, N] int32 in [0, 2^b - 1].

    The range is widened to include 0 (as GPTQ's quantizer does) so the zero-point always
    lands inside the integer range; an all-zero group gets the range [-1, 1].
    """
    qmax = QMAX[bits]
    wmin, wmax = _group_minmax(w.float(), group_size)
    wmin = wmin.clamp(max=0)
    wmax = wmax.clamp(min=0)
    dead = (wmin == 0) & (wmax == 0)
    wmin = torch.where(dead, -1.0, wmin)
    wmax = torch.where(dead, 1.0, wmax)
    scales = ((wmax - wmin) / qmax).to(scale_dtype).float()
    # fp16 can round a tiny range to 0; keep every scale strictly positive.
    tiny = torch.finfo(scale_dtype).tiny
    scales = scales.clamp(min=tiny)
    zeros = torch.round(-wmin / scales).clamp(0, qmax).to(torch.int32)
    return scales, zeros


def quantize(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> torch.Tensor:
    """Integers ``q`` [N, K] uint8 = clamp(round(W / s) + z, 0, 2^b - 1)."""
    gi = g_idx.long()
    s = scales.float()[gi].t()  # [N, K]
    z = zeros.float()[gi].t()
    return torch.clamp(torch.round(w.float() / s) + z, 0, QMAX[bits]).to(torch.uint8)


def dequantize(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``W_hat`` [N, K] = s * (q - z), with ``q`` [N, K] and ``scales``/``zeros`` [G, N]."""
    gi = g_idx.long()
    return ((q.to(dtype) - zeros.to(dtype)[gi].t()) * scales.to(dtype)[gi].t()).contiguous()


def _group_views(x: torch.Tensor, group_size: int):
    """Yield (columns slice, first group, [N, G', g] view) covering x's columns by group.

    Full groups come as one 3-D view, the partial last group (if any) as a second, so
    per-group math broadcasts instead of gathering an [N, K] matrix of scales.
    """
    n, k = x.shape
    g = k if group_size == -1 or group_size >= k else group_size
    full = k // g * g
    if full:
        yield slice(0, full), 0, x[:, :full].view(n, full // g, g)
    if full < k:
        yield slice(full, k), full // g, x[:, full:].view(n, 1, k - full)


def quantize_grouped(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, float]:
    """Fast path of :func:`quantize` for contiguous groups; also returns ||W - W_hat||^2.

    Works group-wise with broadcasting and in-place ops: one float temporary of W's size
    instead of several gathered [N, K] matrices, and no separate dequantize for the error.
    """
    qmax = QMAX[bits]
    w = w.float()
    q = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    sq_err = 0.0
    for cols, g0, view in _group_views(w, group_size):
        ng = view.shape[1]
        s = scales[g0 : g0 + ng].t().unsqueeze(-1).float()  # [N, G', 1]
        z = zeros[g0 : g0 + ng].t().unsqueeze(-1).float()
        tv = torch.div(view, s)
        tv.round_().add_(z).clamp_(0, qmax)
        q[:, cols] = tv.reshape(w.shape[0], -1).to(torch.uint8)
        tv.sub_(z).mul_(s).sub_(view)  # W_hat - W, in place
        sq_err += float(tv.pow_(2).sum())
    return q, sq_err


def quantize_weight(
    w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """One-call round-to-nearest quantization of ``w`` [N, K].

    Returns ``q`` [N, K] uint8, ``scales`` [G, N] float32, ``zeros`` [G, N] int32 and
    ``g_idx`` [K] int32.
    """
    if bits not in QMAX:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    g_idx = group_index(w.shape[1], group_size, device=w.device)
    scales, zeros = choose_qparams(w, bits, group_size, scale_dtype)
    q, sq_err = quantize_grouped(w, scales, zeros, bits, group_size)
    return {"q": q, "scales": scales, "zeros": zeros, "g_idx": g_idx, "sq_err": sq_err}


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F, the per-layer figure recorded in ``peqa.json``."""
    w = w.float()
    denom = torch.linalg.vector_norm(w).item()
    return torch.linalg.vector_norm(w - w_hat.float()).item() / denom if denom > 0 else 0.0
