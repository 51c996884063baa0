"""Pack b-bit integers into int32 words the way GPTQ does.

Values are laid into 32-bit words lowest bits first as one continuous bit stream along
dimension 0: value ``j`` of a column occupies stream bits ``j*b .. j*b+b-1``. A *block*
is the smallest run of values that fills whole words:

    bits | values per block | words per block
    -----+------------------+----------------
      2  |        16        |        1
      3  |        32        |        3   (values 10 and 21 straddle a word boundary)
      4  |         8        |        1
      8  |         4        |        1

``qweight`` packs a [K, N] integer matrix along K; ``qzeros`` packs [G, N] along N, which
is the same operation on the transpose (``pack_cols``).
"""

from __future__ import annotations

import functools
import sys

import torch

# bits -> (values per block, words per block); one continuous stream, so one code path.
BLOCK: dict[int, tuple[int, int]] = {2: (16, 1), 3: (32, 3), 4: (8, 1), 8: (4, 1)}
_MASK32 = (1 << 32) - 1


def packed_rows(rows: int, bits: int) -> int:
    """Number of int32 words that ``rows`` values of ``bits`` bits occupy."""
    assert (rows * bits) % 32 == 0, f"{rows} values of {bits} bits do not fill whole words"
    return rows * bits // 32


def can_pack(rows: int, bits: int) -> bool:
    return (rows * bits) % 32 == 0


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers ``q`` [R, C] (values in [0, 2^bits)) along dim 0 into int32 [R*bits/32, C]."""
    vals, words = BLOCK[bits]
    rows, cols = q.shape
    assert rows % vals == 0, f"{rows} rows is not a multiple of {vals} for {bits}-bit packing"
    # int64 so shifts past bit 31 and the sign bit never overflow before we fold to 32 bits.
    blocks = q.to(torch.int64).reshape(rows // vals, vals, cols)
    out = torch.zeros(rows // vals, words, cols, dtype=torch.int64, device=q.device)
    for j in range(vals):
        word, shift = divmod(j * bits, 32)
        v = blocks[:, j]
        out[:, word] |= (v << shift) & _MASK32
        if shift + bits > 32:  # the value straddles into the next word
            out[:, word + 1] |= v >> (32 - shift)
    # Reinterpret the low 32 bits as signed int32 (two's complement), as GPTQ stores them.
    out = torch.where(out >= 1 << 31, out - (1 << 32), out)
    return out.reshape(rows // vals * words, cols).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, rows: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 [R*bits/32, C] -> uint8 [R, C]."""
    vals, words = BLOCK[bits]
    nwords, cols = packed.shape
    assert nwords % words == 0, f"{nwords} words is not a multiple of {words} for {bits} bits"
    if rows is not None:
        assert rows == nwords // words * vals, (
            f"expected {rows} rows, packed {nwords // words * vals}"
        )
    return _unpack_bytes(packed, bits) if sys.byteorder == "little" else _unpack_words(packed, bits)


def _unpack_words(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The word-level unpacker (any byte order): int32 shifts per value position."""
    vals, words = BLOCK[bits]
    nwords, cols = packed.shape
    mask = (1 << bits) - 1
    # One slice per run of values that sit wholly inside a word (vectorized shifts), plus
    # the few values that straddle two words; concatenated in stream order. Arithmetic
    # shifts of negative int32 words are harmless because every piece is masked.
    blocks = packed.reshape(nwords // words, words, cols)
    pieces = []
    for kind, word, arg in _unpack_plan(bits):
        if kind == "run":
            pieces.append((blocks[:, word : word + 1] >> arg.to(packed.device)) & mask)
        else:  # straddle: low part from the end of `word`, high part from the next word
            low_bits = arg
            lo = (blocks[:, word] >> (32 - low_bits)) & ((1 << low_bits) - 1)
            hi = (blocks[:, word + 1] & ((1 << (bits - low_bits)) - 1)) << low_bits
            pieces.append((lo | hi).unsqueeze(1))
    return torch.cat(pieces, dim=1).reshape(nwords // words * vals, cols).to(torch.uint8)


def _unpack_bytes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Read the words as little-endian bytes, i.e. each column's bit stream in order, and cut
    it into values with uint8/int32 work only (no int64 temporaries of the whole matrix): the
    training forward and backward unpack every layer each step. 2/4/8 bits: byte ``j`` of a
    word holds ``8/b`` whole values. 3 bits: every 3 bytes hold 8 values (24 bits)."""
    nwords, cols = packed.shape
    # reshape(-1): contiguous() keeps odd strides on size-1 dims, which view(uint8) rejects
    b = packed.contiguous().reshape(-1).view(torch.uint8).view(nwords, cols, 4).permute(0, 2, 1)
    mask = (1 << bits) - 1
    if bits == 3:
        t = b.reshape(nwords * 4 // 3, 3, cols)
        v = (
            t[:, 0].to(torch.int32)
            | (t[:, 1].to(torch.int32) << 8)
            | (t[:, 2].to(torch.int32) << 16)
        )
        out = torch.empty(v.shape[0], 8, cols, dtype=torch.uint8, device=packed.device)
        for j in range(8):
            out[:, j] = (v >> (3 * j)) & mask
        return out.view(-1, cols)
    per = 8 // bits
    if per == 1:
        return b.reshape(nwords * 4, cols)
    out = torch.empty(nwords, 4, per, cols, dtype=torch.uint8, device=packed.device)
    for h in range(per):
        torch.bitwise_and(b >> (h * bits), mask, out=out[:, :, h])
    return out.view(nwords * 4 * per, cols)


@functools.cache
def _unpack_plan(bits: int) -> list[tuple[str, int, object]]:
    """Per bit width: runs of whole values per word (with their shifts) and straddlers."""
    vals, _ = BLOCK[bits]
    plan: list[tuple[str, int, object]] = []
    run: list[int] = []
    run_word = 0
    for j in range(vals):
        word, shift = divmod(j * bits, 32)
        if shift + bits <= 32:
            if run and word != run_word:
                plan.append(("run", run_word, torch.tensor(run, dtype=torch.int32).view(1, -1, 1)))
                run = []
            run_word = word
            run.append(shift)
        else:
            if run:
                plan.append(("run", run_word, torch.tensor(run, dtype=torch.int32).view(1, -1, 1)))
                run = []
            plan.append(("straddle", word, 32 - shift))
    if run:
        plan.append(("run", run_word, torch.tensor(run, dtype=torch.int32).view(1, -1, 1)))
    return plan


def pack_weight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``qweight`` from integers in weight orientation: uint8 [N, K] -> int32 [K*bits/32, N].

    Same result as ``pack_rows(q.t(), bits)``. For 2, 4 and 8 bits the values are first
    packed into bytes along K (contiguous in this orientation) and the bytes read as
    little-endian int32 words, which avoids int64 temporaries of the whole matrix.
    """
    if sys.byteorder != "little":
        return pack_rows(q.t(), bits)
    n, k = q.shape
    if bits == 3:  # 8 values -> 24 bits -> 3 little-endian bytes of the stream
        v = q.to(torch.int32).reshape(n, k // 8, 8)
        word = v[..., 0].clone()
        for j in range(1, 8):
            word |= v[..., j] << (3 * j)
        b = torch.stack([word & 255, (word >> 8) & 255, word >> 16], dim=-1).to(torch.uint8)
        return b.reshape(n, k * 3 // 8).view(torch.int32).t().contiguous()
    per_byte = 8 // bits
    qb = q.to(torch.uint8).reshape(n, k // per_byte, per_byte)
    packed = qb[..., 0].clone()
    for j in range(1, per_byte):
        packed |= qb[..., j] << (j * bits)
    return packed.view(torch.int32).t().contiguous()


def pack_cols(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack [R, C] along dim 1 into int32 [R, C*bits/32] (GPTQ's ``qzeros`` layout)."""
    return pack_rows(q.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_cols`: int32 [R, C*bits/32] -> uint8 [R, C]."""
    return unpack_rows(packed.t(), bits).t().contiguous()
