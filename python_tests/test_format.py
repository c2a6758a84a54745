"""The packed bit layout: NumPy pack/unpack, the diagram in csrc/cmpq_layout.h, and C++ == NumPy."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cmpq_kernels import format as fmt
from cmpq_kernels import ops

from conftest import make_layer

BITS = (2, 3, 4)
SHAPES = [(1, 32), (7, 32), (1, 96), (7, 96), (33, 4064), (3, 0)]  # (rows, channels); 0 = empty segment


def random_codes(rows: int, channels: int, bits: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << bits, size=(rows, channels), dtype=np.uint8)


def random_words(rows: int, groups: int, bits: int, seed: int = 0) -> np.ndarray:
    """uint32 words with all 32 bits random (not only values a packer would produce)."""
    return np.random.default_rng(seed).integers(0, 1 << 32, size=(rows, groups * bits), dtype=np.uint32)


def diagram_code(group_words: list[int], bits: int, j: int) -> int:
    """Code j of one group, read off the bit diagram in cmpq_layout.h with plain Python ints."""
    w = group_words
    if bits == 4:
        return (w[j // 8] >> (4 * (j % 8))) & 0xF
    if bits == 2:
        return (w[j // 16] >> (2 * (j % 16))) & 0x3
    if j < 30:
        return (w[j // 10] >> (3 * (j % 10))) & 0x7
    spare = (w[0] >> 30) | ((w[1] >> 30) << 2) | ((w[2] >> 30) << 4)
    return spare & 0x7 if j == 30 else spare >> 3


def diagram_pair(group_words: list[int], bits: int, i: int) -> int:
    """Pair field i (codes 2i, 2i+1) of one group, per the header's pair view."""
    w = group_words
    if bits == 3:
        if i == 15:
            return (w[0] >> 30) | ((w[1] >> 30) << 2) | ((w[2] >> 30) << 4)
        return (w[i // 5] >> (6 * (i % 5))) & 0x3F
    pairs_per_word = 16 // bits
    return (w[i // pairs_per_word] >> (2 * bits * (i % pairs_per_word))) & ((1 << (2 * bits)) - 1)


# ---- NumPy round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows,channels", SHAPES)
def test_pack_unpack_round_trip(bits, rows, channels):
    codes = random_codes(rows, channels, bits, seed=rows * 1000 + channels)
    words = fmt.pack_codes(codes, bits)
    assert words.dtype == np.uint32 and words.shape == (rows, channels // 32 * bits)
    unpacked = fmt.unpack_codes(words, bits)
    assert unpacked.dtype == np.uint8
    np.testing.assert_array_equal(unpacked, codes)
    # The int32 view (how CMPQLayer stores words) unpacks the same.
    np.testing.assert_array_equal(fmt.unpack_codes(words.view(np.int32), bits), codes)


@pytest.mark.parametrize("bits", BITS)
def test_pack_is_a_bijection_on_all_word_bits(bits):
    """32 b-bit codes fill exactly b words: re-packing unpacked random words restores every bit."""
    words = random_words(5, 9, bits, seed=bits)
    np.testing.assert_array_equal(fmt.pack_codes(fmt.unpack_codes(words, bits), bits), words)


# ---- the bit diagram --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_packed_words_follow_the_header_diagram(bits):
    """Every code and every pair field of a few groups sits where the diagram in cmpq_layout.h says."""
    codes = random_codes(3, 4 * 32, bits, seed=7)
    words = fmt.pack_codes(codes, bits)
    for row in range(codes.shape[0]):
        for g in range(4):
            group = [int(w) for w in words[row, g * bits:(g + 1) * bits]]
            group_codes = [int(c) for c in codes[row, g * 32:(g + 1) * 32]]
            assert [diagram_code(group, bits, j) for j in range(32)] == group_codes
            assert [diagram_pair(group, bits, i) for i in range(16)] == [
                group_codes[2 * i] | (group_codes[2 * i + 1] << bits) for i in range(16)]


@pytest.mark.parametrize("bits,codes_at,expected_words", [
    # 3-bit codes 30 = 0b101 and 31 = 0b110 form the spare field s = 0b110_101, spread two bits per word
    # over bits 31:30 of w0 (s[1:0] = 01), w1 (s[3:2] = 01) and w2 (s[5:4] = 11).
    (3, {30: 0b101, 31: 0b110}, [1 << 30, 1 << 30, 3 << 30]),
    (3, {9: 7}, [7 << 27, 0, 0]),                  # last body code of word 0: bits 27..29
    (3, {10: 1, 29: 5}, [0, 1, 5 << 27]),          # first code of w1, last body code of w2
    (4, {9: 0xA, 31: 0xF}, [0, 0xA0, 0, 0xF << 28]),
    (2, {17: 3, 0: 1}, [1, 0xC]),
])
def test_golden_words(bits, codes_at, expected_words):
    """Hand-written words for single codes, including the 3-bit spare bits (codes 30, 31)."""
    codes = np.zeros((1, 32), dtype=np.uint8)
    for j, c in codes_at.items():
        codes[0, j] = c
    words = fmt.pack_codes(codes, bits)
    assert words[0].tolist() == expected_words
    np.testing.assert_array_equal(fmt.unpack_codes(words, bits), codes)
    np.testing.assert_array_equal(ops.unpack_codes(torch.from_numpy(words.view(np.int32)), bits).numpy(), codes)


# ---- bad inputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("codes,bits,match", [
    (np.full((2, 32), 8), 3, "out of range"),
    (np.full((2, 32), 4), 2, "out of range"),
    (np.full((2, 32), 16), 4, "out of range"),
    (np.full((2, 32), -1), 4, "out of range"),
    (np.zeros((2, 33), dtype=np.uint8), 2, "multiple of 32"),
    (np.zeros((2, 48), dtype=np.uint8), 4, "multiple of 32"),
    (np.zeros(32, dtype=np.uint8), 3, "2-D"),
    (np.zeros((1, 2, 32), dtype=np.uint8), 3, "2-D"),
    (np.zeros((2, 32), dtype=np.uint8), 5, "bits must be one of"),
    (np.zeros((2, 32), dtype=np.uint8), 1, "bits must be one of"),
])
def test_pack_codes_rejects_bad_input(codes, bits, match):
    with pytest.raises(ValueError, match=match):
        fmt.pack_codes(codes, bits)


@pytest.mark.parametrize("words,bits,match", [
    (np.zeros((2, 4), dtype=np.uint32), 3, r"groups \* 3"),
    (np.zeros(6, dtype=np.uint32), 3, r"groups \* 3"),
    (np.zeros((2, 5), dtype=np.uint32), 5, "bits must be one of"),
])
def test_unpack_codes_rejects_bad_input(words, bits, match):
    with pytest.raises(ValueError, match=match):
        fmt.unpack_codes(words, bits)


# ---- C++ unpack (cmpq_layout.h) == NumPy unpack -----------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows,groups", [(1, 1), (7, 3), (33, 127), (4, 0)])
def test_cpp_unpack_matches_numpy_on_random_words(bits, rows, groups):
    words = random_words(rows, groups, bits, seed=rows + groups)
    cpp = ops.unpack_codes(torch.from_numpy(words.view(np.int32)), bits)
    assert cpp.dtype == torch.uint8 and tuple(cpp.shape) == (rows, groups * 32)
    np.testing.assert_array_equal(cpp.numpy(), fmt.unpack_codes(words, bits))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows,channels", SHAPES)
def test_cpp_unpack_inverts_numpy_pack(bits, rows, channels):
    codes = random_codes(rows, channels, bits, seed=channels + bits)
    words = torch.from_numpy(fmt.pack_codes(codes, bits).view(np.int32))
    np.testing.assert_array_equal(ops.unpack_codes(words, bits).numpy(), codes)


def test_cpp_unpack_rejects_bad_input():
    words = torch.zeros(2, 6, dtype=torch.int32)
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        ops.unpack_codes(words, 5)
    with pytest.raises(ValueError, match=r"groups\*4"):
        ops.unpack_codes(words, 4)
    with pytest.raises(TypeError, match="words must be Int"):
        ops.unpack_codes(words.long(), 3)


# ---- CMPQLayer.from_codes ---------------------------------------------------------------------------


def test_from_codes_packs_codes_and_sorts_outliers_into_csr():
    rng = np.random.default_rng(5)
    n, seg_k = 9, (64, 32, 96)
    codes = tuple(rng.integers(0, 1 << b, size=(n, s), dtype=np.uint8) for b, s in zip(fmt.SEGMENT_BITS, seg_k))
    codebooks = tuple(torch.randn(n, 1 << b).half() for b in fmt.SEGMENT_BITS)
    rows, cols = rng.integers(0, n, 40), rng.integers(0, sum(seg_k), 40)  # unsorted, with repeats
    vals = torch.from_numpy(rng.standard_normal(40).astype(np.float16))
    layer = fmt.CMPQLayer.from_codes(bits=3.0, perm=rng.permutation(192), codes=codes, codebooks=codebooks,
                                     outlier_rows=rows, outlier_cols=cols, outlier_vals=vals)
    assert (layer.n, layer.k, layer.seg_k, layer.nnz) == (n, 192, seg_k, 40)
    for s in range(3):
        np.testing.assert_array_equal(layer.unpacked_codes(s), codes[s])
    csr_rows = np.repeat(np.arange(n), np.diff(layer.row_ptr.numpy()))
    got = sorted(zip(csr_rows.tolist(), layer.col.tolist(), layer.val.tolist()))
    assert got == sorted(zip(rows.tolist(), cols.tolist(), vals.tolist()))
    for r in range(n):  # columns ascending within each row
        row_cols = layer.col[layer.row_ptr[r]:layer.row_ptr[r + 1]]
        assert bool((row_cols[1:] >= row_cols[:-1]).all())


@pytest.mark.parametrize("rows,cols,vals,match", [
    ([0, 1], [0], [1.0], "lengths differ"),
    ([0, 9], [0, 1], [1.0, 2.0], r"outlier rows must be in \[0, 9\)"),
    ([-1], [0], [1.0], r"outlier rows must be in \[0, 9\)"),
])
def test_from_codes_rejects_bad_outliers(rows, cols, vals, match):
    codes = tuple(np.zeros((9, 32), dtype=np.uint8) for _ in range(3))
    codebooks = tuple(torch.zeros(9, 1 << b, dtype=torch.float16) for b in fmt.SEGMENT_BITS)
    with pytest.raises(ValueError, match=match):
        fmt.CMPQLayer.from_codes(bits=3.0, perm=np.arange(96), codes=codes, codebooks=codebooks,
                                 outlier_rows=np.array(rows), outlier_cols=np.array(cols), outlier_vals=vals)


def test_empty_segments_store_no_codebook():
    """A width no channel uses costs nothing: from_codes drops its codebook, validate insists on 0 columns."""
    layer = make_layer(10, 64, (0, 64, 0), seed=1)
    assert [tuple(cb.shape) for cb in layer.codebooks] == [(10, 0), (10, 8), (10, 0)]
    full = dataclasses.replace(layer, codebooks=(torch.zeros(10, 16, dtype=torch.float16), *layer.codebooks[1:]))
    with pytest.raises(ValueError, match=r"codebooks\[0\] \(4-bit\): shape must be \(10, 0\)"):
        full.validate()
