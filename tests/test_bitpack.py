"""Packing: exact round trips for every width and awkward shapes, and the GPTQ layout by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peqa_cli.quant import bitpack


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    blocks=st.integers(1, 6),
    cols=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits, blocks, cols, seed):
    vals, words = bitpack.BLOCK[bits]
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (vals * blocks, cols), generator=g)
    packed = bitpack.pack_rows(q, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (words * blocks, cols)
    assert torch.equal(bitpack.unpack_rows(packed, bits), q.to(torch.uint8))
    # the column (qzeros) layout is the same stream along the other dimension
    z = q.t().contiguous()
    assert torch.equal(bitpack.unpack_cols(bitpack.pack_cols(z, bits), bits), z.to(torch.uint8))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_extreme_values_survive(bits):
    vals, _ = bitpack.BLOCK[bits]
    for fill in (0, (1 << bits) - 1):
        q = torch.full((vals * 2, 3), fill)
        assert torch.equal(bitpack.unpack_rows(bitpack.pack_rows(q, bits), bits), q.to(torch.uint8))


def _golden_pack(q: np.ndarray, bits: int) -> np.ndarray:
    """The published rule, bit by bit: value j of a column occupies stream bits j*b .. j*b+b-1,
    words filled lowest bit first, then read as signed int32."""
    rows, cols = q.shape
    nwords = rows * bits // 32
    out = np.zeros((nwords, cols), dtype=np.uint64)
    for c in range(cols):
        for j in range(rows):
            for t in range(bits):
                bit = (int(q[j, c]) >> t) & 1
                pos = j * bits + t
                out[pos // 32, c] |= np.uint64(bit) << np.uint64(pos % 32)
    return out.astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_gptq_layout_built_by_hand(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, size=(64, 5))
    ours = bitpack.pack_rows(torch.from_numpy(q), bits).numpy()
    assert np.array_equal(ours, _golden_pack(q, bits))


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    blocks=st.integers(1, 5),
    cols=st.integers(1, 7),
    seed=st.integers(0, 2**31 - 1),
)
def test_byte_level_fast_paths_equal_the_word_level_rule(bits, blocks, cols, seed):
    """pack_weight / unpack_rows read the words as little-endian bytes; the word-level code
    (the reference above, and the path for big-endian machines) must agree bit for bit."""
    vals, _ = bitpack.BLOCK[bits]
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (cols, vals * blocks), generator=g, dtype=torch.uint8)
    packed = bitpack.pack_weight(q, bits)  # weight orientation [N, K] -> [K*b/32, N]
    assert torch.equal(packed, bitpack.pack_rows(q.t(), bits))
    assert torch.equal(bitpack._unpack_bytes(packed, bits), bitpack._unpack_words(packed, bits))
    assert torch.equal(bitpack.unpack_rows(packed, bits), q.t())


def test_three_bit_straddling_values():
    # values 10 and 21 of each 32-value block cross word boundaries (stream bits 30-32, 63-65)
    q = torch.zeros(32, 1, dtype=torch.int64)
    q[10, 0] = 0b101
    q[21, 0] = 0b111
    w = bitpack.pack_rows(q, 3).view(-1).tolist()
    w = [x & 0xFFFFFFFF for x in w]
    assert w[0] == 0b01 << 30  # low two bits of value 10 at the top of word 0
    assert w[1] == (0b1) | (0b1 << 31)  # its high bit, and the low bit of value 21
    assert w[2] == 0b11  # the two high bits of value 21


def test_known_four_bit_word():
    # 8 values 0..7 -> nibbles lowest first: 0x76543210
    q = torch.arange(8).view(8, 1)
    assert bitpack.pack_rows(q, 4).item() == 0x76543210
