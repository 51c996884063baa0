"""The quantized linear layer: frozen packed integers, trainable scales.

State (names and layout are GPTQ's, so ``state_dict()`` *is* the checkpoint):

    qweight  int32 [K*b/32, N]  buffer     integers packed along the input dim
    qzeros   int32 [G, N*b/32]  buffer     zero-points packed along the output dim
    g_idx    int32 [K]          buffer     group of each input column
    scales   fp32  [G, N]       Parameter  the one trainable tensor (saved as fp16)
    bias     [N]                buffer     frozen, only where the source layer had one

The weight is never stored in float: every forward unpacks and dequantizes on the fly, and
backward recomputes it from the integers, so training memory is the compressed model plus
activations. :class:`ScaleMatmul` gives exact gradients for the scales and the input only.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from peqa_cli.quant import bitpack
from peqa_cli.quant.primitives import QMAX, num_groups


def unpack_centered(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype,
    scratch: bool = False,
) -> torch.Tensor:
    """Q_bar [K, N] = q - z[g_idx], in ``dtype``.

    |q - z| < 256, so the values are exact in fp16, bf16 and fp32 alike. ``scratch=True``
    returns a view of a reused per-thread buffer (see :func:`_scratch`), valid only until the
    next call: for the autograd function, which uses it at once and keeps nothing.
    """
    q = bitpack.unpack_rows(qweight, bits)
    z = bitpack.unpack_cols(qzeros, bits).to(dtype)
    out = _scratch(q.shape, dtype, q.device).copy_(q) if scratch else q.to(dtype)
    k, groups = out.shape[0], z.shape[0]
    if groups == 1:  # per channel: broadcast, no [K, N] gather
        return out.sub_(z)
    size = int((g_idx == 0).sum())  # the group size (the last group may be shorter)
    if size and _contiguous_groups(g_idx, size):  # groups in order: per block of rows
        full = k // size
        out[: full * size].view(full, size, -1).sub_(z[:full, None])
        out[full * size :].sub_(z[full:])
        return out
    return out.sub_(z[g_idx.long()])  # act-order (desc_act) checkpoints


_SCRATCH = threading.local()


def _scratch(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable CPU buffer for Q_bar. Every forward and backward of every layer needs one
    [K, N] float matrix for a moment; a fresh allocation of that size is mmap'd and
    page-faulted in by glibc each time, which costs ~10x the arithmetic on CPU. The buffer is
    only read before the next layer runs (nothing keeps a reference: ScaleMatmul saves x, not
    Q_bar), so one per thread and dtype is enough; it grows to the largest layer. CUDA's caching
    allocator already reuses memory, so there a plain allocation is used."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    n = shape.numel()
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < n:
        buf = bufs[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def _contiguous_groups(g_idx: torch.Tensor, size: int) -> bool:
    ref = torch.arange(g_idx.numel(), device=g_idx.device) // size
    return bool(torch.equal(g_idx.long(), ref))


class ScaleMatmul(torch.autograd.Function):
    """y = x @ (Q_bar * s[g_idx]); gradients for ``x`` and ``scales``, never for integers.

    Saves only the layer input (plus references to the existing buffers); Q_bar is
    recomputed from the packed integers in backward. With one group (per channel) the
    scale factors out of the matmul, y = s ⊙ (x @ Q_bar), so forward skips building the
    scaled weight and the scale gradient is the column sum of grad_y ⊙ (x @ Q_bar).
    """

    @staticmethod
    def forward(ctx, x, scales, qweight, qzeros, g_idx, bits: int):  # noqa: D102
        qbar = unpack_centered(qweight, qzeros, g_idx, bits, x.dtype, scratch=True)
        s = scales.to(x.dtype)
        y = (x @ qbar) * s[0] if s.shape[0] == 1 else x @ (qbar * s[g_idx.long()])
        ctx.save_for_backward(x, scales, qweight, qzeros, g_idx)
        ctx.bits = bits
        return y

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        x, scales, qweight, qzeros, g_idx = ctx.saved_tensors
        qbar = unpack_centered(qweight, qzeros, g_idx, ctx.bits, grad_y.dtype, scratch=True)
        s = scales.to(grad_y.dtype)
        gi = g_idx.long()
        grad_x = grad_s = None
        x2 = x.reshape(-1, x.shape[-1]).to(grad_y.dtype)
        gy2 = grad_y.reshape(-1, grad_y.shape[-1])
        if s.shape[0] == 1:
            if ctx.needs_input_grad[0]:
                grad_x = (grad_y * s[0]) @ qbar.t()
            if ctx.needs_input_grad[1]:
                grad_s = (gy2 * (x2 @ qbar)).sum(0, keepdim=True)
        else:
            if ctx.needs_input_grad[0]:
                grad_x = grad_y @ (qbar * s[gi]).t()
            if ctx.needs_input_grad[1]:
                # dL/ds[g, n] = sum over columns k of group g of dL/dW[k, n] * Q_bar[k, n]
                grad_w = x2.t() @ gy2  # [K, N]
                grad_s = torch.zeros(scales.shape, dtype=grad_w.dtype, device=grad_w.device)
                grad_s.index_add_(0, gi, grad_w * qbar)
        if grad_s is not None:
            grad_s = grad_s.to(scales.dtype)
        return grad_x, grad_s, None, None, None, None


class QuantLinear(nn.Module):
    """A ``nn.Linear`` replacement holding a PEQA/GPTQ-quantized weight."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        if bits not in QMAX:
            raise ValueError(f"bits must be one of {tuple(QMAX)}, got {bits}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = num_groups(in_features, group_size)
        kw = {"device": device}
        self.register_buffer(
            "qweight",
            torch.zeros(
                bitpack.packed_rows(in_features, bits), out_features, dtype=torch.int32, **kw
            ),
        )
        self.register_buffer(
            "qzeros",
            torch.zeros(groups, bitpack.packed_rows(out_features, bits), dtype=torch.int32, **kw),
        )
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, **kw))
        self.scales = nn.Parameter(torch.ones(groups, out_features, **kw), requires_grad=False)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, **kw))
        else:
            self.bias = None

    @classmethod
    def from_quantized(
        cls,
        q: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Build from unpacked integers ``q`` [N, K] and ``scales``/``zeros`` [G, N]."""
        n, k = q.shape
        layer = cls(
            k,
            n,
            bits,
            group_size,
            bias=bias is not None,
            device=q.device,
            bias_dtype=bias.dtype if bias is not None else torch.float16,
        )
        layer.qweight.copy_(bitpack.pack_rows(q.t(), bits))
        layer.qzeros.copy_(bitpack.pack_cols(zeros, bits))
        layer.g_idx.copy_(g_idx)
        layer.scales.data.copy_(scales.float())
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def integers(self) -> torch.Tensor:
        """Unpacked integers ``q`` [N, K] uint8."""
        return bitpack.unpack_rows(self.qweight, self.bits).t()

    def zeros(self) -> torch.Tensor:
        """Unpacked zero-points [G, N] uint8."""
        return bitpack.unpack_cols(self.qzeros, self.bits)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] this layer represents (for export and tests)."""
        qbar = unpack_centered(self.qweight, self.qzeros, self.g_idx, self.bits, dtype)
        return (qbar * self.scales.detach().to(dtype)[self.g_idx.long()]).t().contiguous()

    # Inference-only weight cache (off by default). Unpacking every layer on every forward
    # dominates CPU decoding, where each step multiplies a single token; evaluation and
    # generation may trade memory (one float weight per layer) for speed. Never used while the
    # scales train, and dropped whenever the scales change through apply/remove_delta.
    cache_weights: bool = False
    _weight_cache: torch.Tensor | None = None

    def clear_cache(self) -> None:
        self._weight_cache = None

    def _cached_weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = self._weight_cache
        if w is None or w.dtype != dtype or w.device != self.qweight.device:
            qbar = unpack_centered(self.qweight, self.qzeros, self.g_idx, self.bits, dtype)
            w = qbar * self.scales.detach().to(dtype)[self.g_idx.long()]
            self._weight_cache = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            x = x.to(torch.get_autocast_dtype(dev))
        training_scales = torch.is_grad_enabled() and self.scales.requires_grad
        # Autocast off inside: the Function picks its dtype from x, forward and backward alike.
        with torch.autocast(dev, enabled=False):
            if self.cache_weights and not training_scales:
                y = x @ self._cached_weight(x.dtype)
            else:
                self._weight_cache = None
                y = ScaleMatmul.apply(
                    x, self.scales, self.qweight, self.qzeros, self.g_idx, self.bits
                )
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}"
        )


def set_weight_cache(model: nn.Module, enabled: bool) -> int:
    """Turn the inference weight cache on or off for every QuantLinear; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.cache_weights = enabled
            m.clear_cache()
            n += 1
    return n


def linear_reference(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """The same layer through an explicit float weight (tests compare autograd against it)."""
    return F.linear(x, layer.dequantized_weight(x.dtype), layer.bias)
