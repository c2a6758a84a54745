"""The CMPQ packed format (format_version 1): one quantized linear layer, validated.

This module is the only thing the rest of the package trusts: kernels, the reference path, the module
and checkpoint IO all read a :class:`CMPQLayer`. It knows nothing of models or calibration.

Layout (mirrors ``csrc/cmpq_layout.h`` bit for bit; see the diagram there):

* input channels are permuted so each bit width forms one contiguous segment, in memory order
  ``[4-bit | 3-bit | 2-bit]``; ``perm[j]`` is the original channel of packed column ``j``;
* every segment width is a multiple of :data:`GROUP_CODES` (32) channels, so ``K % 32 == 0`` is
  required (all common LLM layer widths are; pad the layer otherwise);
* ``codes[s]``: int32 ``[N, seg_k[s] // 32 * bits]`` (the bits are uint32 words; torch has no general
  uint32 arithmetic, so they are held as int32 and viewed back as uint32 where needed);
* ``codebooks[s]``: fp16 ``[ceil(N / codebook_rows), 2**bits]``, or ``[ceil(N / codebook_rows), 0]`` for an
  empty segment (nothing is stored for a width no channel uses);
* outliers: CSR over packed columns holding the residual ``W - Q(W)``: ``row_ptr`` int32 ``[N + 1]``,
  ``col`` int16 (``K <= 32767``) or int32, sorted within each row (repeats legal: they add), ``val`` fp16;
* optional ``bias`` fp16/bf16/fp32 ``[N]``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional

import numpy as np
import torch

FORMAT_VERSION = 1
GROUP_CODES = 32
SEGMENT_BITS: tuple[int, int, int] = (4, 3, 2)
MIN_BITS, MAX_BITS = 2.0, 4.0
_INT16_MAX_K = 32767

#: the packed tensors of a layer in op-argument order; CMPQLinear buffers and checkpoint tensors
#: (``<module>.cmpq.<field>``) use these names, and ``torch.ops.cmpq.*`` take them in this order.
LAYER_FIELDS = ("perm", "codes4", "codes3", "codes2", "codebook4", "codebook3", "codebook2", "row_ptr", "col", "val")


def check_in_features(k: int) -> None:
    """Raise ``ValueError`` unless ``k`` input channels can be packed (positive, a multiple of 32)."""
    if k <= 0 or k % GROUP_CODES:
        raise ValueError(f"in_features {k} is not a multiple of {GROUP_CODES} (or not positive): CMPQ packs channels "
                         f"in groups of {GROUP_CODES}; pad the layer or leave it unquantized")


def outlier_col_dtype(k: int) -> torch.dtype:
    """dtype of the outlier column indices of a layer with ``k`` input channels (int16 while they fit)."""
    return torch.int16 if k <= _INT16_MAX_K else torch.int32


def field_dtype(field: str, k: int) -> torch.dtype:
    """dtype of packed tensor ``field`` (a :data:`LAYER_FIELDS` name) of a layer with ``k`` input channels."""
    if field.startswith("codebook") or field == "val":
        return torch.float16
    return outlier_col_dtype(k) if field == "col" else torch.int32


def field_shapes(n: int, k: int, seg_k: tuple[int, int, int], codebook_rows: int, nnz: int) -> dict[str, tuple[int, ...]]:
    """Shape of every packed tensor (:data:`LAYER_FIELDS` name) of a layer: the layout :meth:`CMPQLayer.validate`
    checks and the accounting (:func:`layout_storage_bits`) counts, so a planned layer costs what a built one does."""
    groups = -(-n // codebook_rows)
    shapes: dict[str, tuple[int, ...]] = {"perm": (k,)}
    shapes.update({f"codes{b}": (n, s // GROUP_CODES * b) for s, b in zip(seg_k, SEGMENT_BITS)})
    # An empty segment stores a codebook with 0 columns: nothing is stored for a width no channel uses.
    shapes.update({f"codebook{b}": (groups, (1 << b) if s else 0) for s, b in zip(seg_k, SEGMENT_BITS)})
    shapes.update({"row_ptr": (n + 1,), "col": (nnz,), "val": (nnz,)})
    return shapes


def layout_field_bits(n: int, k: int, seg_k: tuple[int, int, int], codebook_rows: int, nnz: int) -> dict[str, int]:
    """Bits stored per packed tensor (:data:`LAYER_FIELDS` name) by a layer of this layout."""
    return {f: math.prod(shape) * field_dtype(f, k).itemsize * 8
            for f, shape in field_shapes(n, k, seg_k, codebook_rows, nnz).items()}


def layout_storage_bits(n: int, k: int, seg_k: tuple[int, int, int], codebook_rows: int, nnz: int) -> dict[str, int]:
    """Bits stored per component (codes, codebooks, outliers, perm; bias excluded) by a layer of this layout.

    The one accounting formula: :meth:`CMPQLayer.storage_bits` (a built layer) and the quantizer's effective-bit
    budget (a planned layer, before any k-means) both call it.
    """
    bits = layout_field_bits(n, k, seg_k, codebook_rows, nnz)
    return {"codes": sum(bits[f"codes{b}"] for b in SEGMENT_BITS),
            "codebooks": sum(bits[f"codebook{b}"] for b in SEGMENT_BITS),
            "outliers": bits["row_ptr"] + bits["col"] + bits["val"],
            "perm": bits["perm"]}


def layout_effective_bits(n: int, k: int, seg_k: tuple[int, int, int], codebook_rows: int, nnz: int) -> float:
    """All stored bits per weight of a layer of this layout (what :attr:`CMPQLayer.effective_bits` reports)."""
    return sum(layout_storage_bits(n, k, seg_k, codebook_rows, nnz).values()) / (n * k)


def segment_sizes_of(codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[int, int, int]:
    """``seg_k`` implied by packed code tensors ``[n, groups * bits]`` (memory order 4/3/2-bit)."""
    sizes = []
    for c, bits in zip(codes, SEGMENT_BITS):
        if c.dim() != 2 or c.shape[1] % bits:  # else the sizes below would be silently rounded
            raise ValueError(f"codes{bits}: shape must be [out_features, groups * {bits}], got {tuple(c.shape)}")
        sizes.append(c.shape[1] // bits * GROUP_CODES)
    return tuple(sizes)  # type: ignore[return-value]


# ---- NumPy pack / unpack (twin of cmpq_layout.h) -----------------------------------------------------


def _check_bits(bits: int) -> None:
    if bits not in SEGMENT_BITS:
        raise ValueError(f"bits must be one of {SEGMENT_BITS}, got {bits}")


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes ``[N, C]`` (``C % 32 == 0``, values ``< 2**bits``) into uint32 ``[N, C // 32 * bits]``."""
    _check_bits(bits)
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [rows, channels], got shape {codes.shape}")
    n, c = codes.shape
    if c % GROUP_CODES:
        raise ValueError(f"codes has {c} channels; must be a multiple of {GROUP_CODES}")
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit: min {codes.min()}, max {codes.max()}")
    groups = codes.astype(np.uint32).reshape(n, c // GROUP_CODES, GROUP_CODES)
    if bits == 3:
        body = groups[:, :, :30].reshape(n, -1, 3, 10)
        words = np.bitwise_or.reduce(body << (3 * np.arange(10, dtype=np.uint32)), axis=-1)
        spare = groups[:, :, 30] | (groups[:, :, 31] << 3)
        words |= ((spare[:, :, None] >> (2 * np.arange(3, dtype=np.uint32))) & 3) << 30
    else:
        per_word = 32 // bits
        body = groups.reshape(n, -1, bits, per_word)
        words = np.bitwise_or.reduce(body << (bits * np.arange(per_word, dtype=np.uint32)), axis=-1)
    return words.reshape(n, -1).astype(np.uint32)


def unpack_codes(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint32 (or int32) ``[N, G * bits]`` -> uint8 codes ``[N, G * 32]``."""
    _check_bits(bits)
    words = np.asarray(words)
    if words.ndim != 2 or words.shape[1] % bits:
        raise ValueError(f"packed {bits}-bit codes must be [rows, groups * {bits}], got shape {words.shape}")
    words = words.view(np.uint32) if words.dtype == np.int32 else words.astype(np.uint32)
    n = words.shape[0]
    grouped = words.reshape(n, -1, bits)
    if bits == 3:
        body = (grouped[:, :, :, None] >> (3 * np.arange(10, dtype=np.uint32))) & 7
        spare = (grouped[:, :, 0] >> 30) | ((grouped[:, :, 1] >> 30) << 2) | ((grouped[:, :, 2] >> 30) << 4)
        tail = np.stack([spare & 7, spare >> 3], axis=-1)
        codes = np.concatenate([body.reshape(n, -1, 30), tail], axis=-1)
    else:
        per_word = 32 // bits
        codes = (grouped[:, :, :, None] >> (bits * np.arange(per_word, dtype=np.uint32))) & ((1 << bits) - 1)
    return codes.reshape(n, -1).astype(np.uint8)


# ---- the layer container ------------------------------------------------------------------------------


def is_int(value: object) -> bool:
    """An integer that is not a bool (``True == 1`` would otherwise pass a count check)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def tensor_bits(t: Optional[torch.Tensor]) -> int:
    """Bits a stored tensor takes (0 for None): what effective-bits accounting counts."""
    return 0 if t is None else t.numel() * t.element_size() * 8


def check_tensor(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device,
                 anchor: str) -> None:
    """Raise ``ValueError`` naming field ``name`` unless ``t`` is a contiguous tensor of ``dtype`` and ``shape`` on
    ``device`` (the device of the layer's field ``anchor``)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{name}: dtype must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: shape must be {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, but the layer's {anchor} is on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")


@dataclasses.dataclass(frozen=True, eq=False)
class CMPQLayer:
    """One CMPQ-quantized linear layer ``y = x @ W.T + bias`` with ``W`` of shape ``[n, k]``.

    Construct with every field, then call :meth:`validate` (done by :meth:`from_codes` and by the
    checkpoint loader). All tensors live on one device; ``to(device)`` moves them together.

    Attributes:
        n, k: out_features and in_features.
        bits: target average code bits per weight (the budget the quantizer was given).
        seg_k: channels per segment in memory order (4-bit, 3-bit, 2-bit); multiples of 32 summing to k.
        perm: int32 ``[k]``, original input channel of each packed column.
        codes: per segment, int32 ``[n, seg_k[s] // 32 * bits]`` packed words.
        codebooks: per segment, fp16 ``[ceil(n / codebook_rows), 2**bits]`` (0 columns if the segment is empty).
        row_ptr, col, val: CSR outlier residuals over packed columns (int32, int16|int32, fp16).
        bias: optional ``[n]`` fp16/bf16/fp32.
        codebook_rows: output rows sharing one codebook row.
        format_version: must equal :data:`FORMAT_VERSION`.
    """

    n: int
    k: int
    bits: float
    seg_k: tuple[int, int, int]
    perm: torch.Tensor
    codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    codebooks: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    row_ptr: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor
    bias: Optional[torch.Tensor] = None
    codebook_rows: int = 1
    format_version: int = FORMAT_VERSION

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_codes(
        cls,
        *,
        bits: float,
        perm: torch.Tensor | np.ndarray,
        codes: tuple[np.ndarray, np.ndarray, np.ndarray],
        codebooks: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        outlier_rows: np.ndarray | torch.Tensor | None = None,
        outlier_cols: np.ndarray | torch.Tensor | None = None,
        outlier_vals: np.ndarray | torch.Tensor | None = None,
        bias: Optional[torch.Tensor] = None,
        codebook_rows: int = 1,
    ) -> "CMPQLayer":
        """Pack unpacked codes (uint8 ``[n, seg_k[s]]`` per segment, memory order 4/3/2-bit) into a layer.

        Outliers are given as COO triplets over *packed* columns (residuals ``W - Q(W)``); they are sorted
        into CSR here. Codebooks of empty segments are dropped (stored with 0 columns). The result is
        validated.
        """
        if len(codes) != 3 or len(codebooks) != 3:
            raise ValueError("codes and codebooks need one entry per segment (4-bit, 3-bit, 2-bit)")
        n = int(np.asarray(codes[0]).shape[0])
        seg_k = tuple(int(np.asarray(c).shape[1]) for c in codes)
        k = sum(seg_k)
        packed = tuple(
            torch.from_numpy(pack_codes(np.asarray(c).reshape(n, -1), b).view(np.int32)) for c, b in zip(codes, SEGMENT_BITS)
        )
        rows = np.asarray(outlier_rows if outlier_rows is not None else [], dtype=np.int64)
        cols = np.asarray(outlier_cols if outlier_cols is not None else [], dtype=np.int64)
        vals = torch.as_tensor(outlier_vals if outlier_vals is not None else [], dtype=torch.float16).reshape(-1)
        if not (rows.shape == cols.shape == tuple(vals.shape)):
            raise ValueError(f"outlier rows/cols/vals lengths differ: {rows.shape}, {cols.shape}, {tuple(vals.shape)}")
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise ValueError(f"outlier rows must be in [0, {n}), got range [{rows.min()}, {rows.max()}]")
        order = np.lexsort((cols, rows))
        row_ptr = np.zeros(n + 1, dtype=np.int32)
        np.add.at(row_ptr, rows + 1, 1)
        layer = cls(
            n=n,
            k=k,
            bits=float(bits),
            seg_k=seg_k,  # type: ignore[arg-type]
            perm=torch.as_tensor(np.asarray(perm), dtype=torch.int32),
            codes=packed,  # type: ignore[arg-type]
            codebooks=tuple(torch.as_tensor(cb).to(torch.float16)[:, :(1 << b) if s else 0].contiguous()  # type: ignore[arg-type]
                            for cb, b, s in zip(codebooks, SEGMENT_BITS, seg_k)),
            row_ptr=torch.from_numpy(np.cumsum(row_ptr, dtype=np.int32)),
            col=torch.from_numpy(cols[order]).to(outlier_col_dtype(k)),
            val=vals[torch.from_numpy(order)].contiguous(),
            bias=bias,
            codebook_rows=codebook_rows,
        )
        layer.validate()
        return layer

    # -- validation -----------------------------------------------------------------------------------

    def validate(self) -> "CMPQLayer":
        """Check every field; raise ``ValueError`` naming the first bad one. Returns ``self``."""
        self._check_field_types()
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version: this build reads version {FORMAT_VERSION}, got {self.format_version}")
        if self.n <= 0 or self.k <= 0:
            raise ValueError(f"n, k: must be positive, got n={self.n}, k={self.k}")
        try:
            check_in_features(self.k)
        except ValueError as err:
            raise ValueError(f"k: {err}") from None
        if not (math.isfinite(self.bits) and MIN_BITS <= self.bits <= MAX_BITS):
            raise ValueError(f"bits: target must be in [{MIN_BITS}, {MAX_BITS}], got {self.bits}")
        if self.codebook_rows < 1:
            raise ValueError(f"codebook_rows: must be >= 1, got {self.codebook_rows}")
        if len(self.seg_k) != 3 or any(s < 0 or s % GROUP_CODES for s in self.seg_k) or sum(self.seg_k) != self.k:
            raise ValueError(f"seg_k: need three multiples of {GROUP_CODES} summing to k={self.k}, got {self.seg_k}")
        device = self.perm.device  # a tensor: checked by _check_field_types
        nnz = self.col.numel()
        shapes = field_shapes(self.n, self.k, self.seg_k, self.codebook_rows, nnz)
        self._check_tensor("perm", self.perm, field_dtype("perm", self.k), shapes["perm"], device)
        perm = self.perm.cpu()
        if not torch.equal(torch.sort(perm.long()).values, torch.arange(self.k)):
            raise ValueError(f"perm: is not a permutation of range({self.k})")
        for s, bits in enumerate(SEGMENT_BITS):
            self._check_tensor(f"codes[{s}] ({bits}-bit)", self.codes[s], field_dtype(f"codes{bits}", self.k),
                               shapes[f"codes{bits}"], device)
            cb = self.codebooks[s]
            self._check_tensor(f"codebooks[{s}] ({bits}-bit)", cb, field_dtype(f"codebook{bits}", self.k),
                               shapes[f"codebook{bits}"], device)
            if not bool(torch.isfinite(cb).all()):
                raise ValueError(f"codebooks[{s}] ({bits}-bit): contains NaN or Inf")
        self._check_tensor("row_ptr", self.row_ptr, field_dtype("row_ptr", self.k), shapes["row_ptr"], device)
        self._check_tensor("col", self.col, field_dtype("col", self.k), shapes["col"], device)
        self._check_tensor("val", self.val, field_dtype("val", self.k), shapes["val"], device)
        row_ptr = self.row_ptr.cpu().long()
        if row_ptr[0] != 0 or row_ptr[-1] != nnz or bool((row_ptr[1:] < row_ptr[:-1]).any()):
            raise ValueError(f"row_ptr: must start at 0, be non-decreasing and end at nnz={nnz}")
        if nnz:
            col = self.col.cpu().long()
            if int(col.min()) < 0 or int(col.max()) >= self.k:
                raise ValueError(f"col: outlier columns must be in [0, {self.k}), got [{int(col.min())}, {int(col.max())}]")
            rows = torch.repeat_interleave(torch.arange(self.n), row_ptr[1:] - row_ptr[:-1])
            if bool(((col[1:] < col[:-1]) & (rows[1:] == rows[:-1])).any()):
                raise ValueError("col: outlier columns must be sorted within each row (from_codes sorts them)")
            if not bool(torch.isfinite(self.val).all()):
                raise ValueError("val: outlier values contain NaN or Inf")
        if self.bias is not None:
            if self.bias.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                raise ValueError(f"bias: dtype must be a floating-point type, got {self.bias.dtype}")
            self._check_tensor("bias", self.bias, self.bias.dtype, (self.n,), device)
            if not bool(torch.isfinite(self.bias).all()):
                raise ValueError("bias: contains NaN or Inf")
        return self

    def _check_field_types(self) -> None:
        # Wrong types (a str, a float count, a list perm) would otherwise fail later with an unrelated
        # TypeError/AttributeError, or pass a comparison by accident (True == 1, 37.0 == 37).
        for name in ("n", "k", "codebook_rows", "format_version"):
            value = getattr(self, name)
            if not is_int(value):
                raise ValueError(f"{name}: must be an int, got {type(value).__name__} {value!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, numbers.Real):
            raise ValueError(f"bits: must be a real number, got {type(self.bits).__name__} {self.bits!r}")
        if not isinstance(self.seg_k, (tuple, list)) or len(self.seg_k) != 3 or not all(map(is_int, self.seg_k)):
            raise ValueError(f"seg_k: need three multiples of {GROUP_CODES} summing to k={self.k}, got {self.seg_k!r}")
        for name in ("codes", "codebooks"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) != 3:
                size = f" of {len(value)}" if isinstance(value, (tuple, list)) else ""
                raise ValueError(f"{name}: need one tensor per segment (4-bit, 3-bit, 2-bit), got a "
                                 f"{type(value).__name__}{size}")
        if not isinstance(self.perm, torch.Tensor):
            raise ValueError(f"perm: expected a torch.Tensor, got {type(self.perm).__name__}")
        if self.bias is not None and not isinstance(self.bias, torch.Tensor):
            raise ValueError(f"bias: expected a torch.Tensor or None, got {type(self.bias).__name__}")

    @staticmethod
    def _check_tensor(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device) -> None:
        check_tensor(name, t, dtype, shape, device, anchor="perm")

    # -- accounting -----------------------------------------------------------------------------------

    @property
    def nnz(self) -> int:
        """Number of stored outliers."""
        return self.col.numel()

    def storage_bits(self) -> dict[str, int]:
        """Bits stored per component (bias excluded: FP layers have it too), from :func:`layout_storage_bits`:
        :meth:`validate` guarantees every tensor has exactly the shape and dtype that formula counts."""
        return layout_storage_bits(self.n, self.k, self.seg_k, self.codebook_rows, self.nnz)

    @property
    def code_bits(self) -> float:
        """Average code bits per weight actually allocated (the nominal width, without any overhead)."""
        return sum(b * s for b, s in zip(SEGMENT_BITS, self.seg_k)) / self.k

    @property
    def effective_bits(self) -> float:
        """All stored bits (codes, codebooks, outlier values + indices + row pointers, perm) per weight."""
        return sum(self.storage_bits().values()) / (self.n * self.k)

    # -- movement -------------------------------------------------------------------------------------

    def to(self, device: torch.device | str) -> "CMPQLayer":
        """Return a copy with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(
            self,
            perm=move(self.perm),
            codes=tuple(move(c) for c in self.codes),
            codebooks=tuple(move(c) for c in self.codebooks),
            row_ptr=move(self.row_ptr),
            col=move(self.col),
            val=move(self.val),
            bias=move(self.bias),
        )

    def fields(self) -> dict[str, torch.Tensor]:
        """The packed tensors by :data:`LAYER_FIELDS` name, in op-argument order (no copy)."""
        return dict(zip(LAYER_FIELDS, (self.perm, *self.codes, *self.codebooks, self.row_ptr, self.col, self.val)))

    @classmethod
    def from_fields(cls, fields: dict[str, torch.Tensor], *, n: int, k: int, bits: float, codebook_rows: int,
                    bias: Optional[torch.Tensor] = None) -> "CMPQLayer":
        """Inverse of :meth:`fields` (``seg_k`` follows from the code shapes). Not validated: a module's forward
        builds one per call, so loaders call :meth:`validate` themselves."""
        codes = tuple(fields[f"codes{b}"] for b in SEGMENT_BITS)
        seg_k = segment_sizes_of(codes)  # type: ignore[arg-type]
        if sum(seg_k) != k:
            raise ValueError(f"codes4/codes3/codes2: hold {sum(seg_k)} packed channels, in_features is {k}")
        return cls(n=n, k=k, bits=float(bits), seg_k=seg_k, perm=fields["perm"], codes=codes,  # type: ignore[arg-type]
                   codebooks=tuple(fields[f"codebook{b}"] for b in SEGMENT_BITS),  # type: ignore[arg-type]
                   row_ptr=fields["row_ptr"], col=fields["col"], val=fields["val"], bias=bias,
                   codebook_rows=codebook_rows)

    def unpacked_codes(self, segment: int) -> np.ndarray:
        """uint8 codes ``[n, seg_k[segment]]`` of one segment (NumPy unpack)."""
        return unpack_codes(self.codes[segment].cpu().numpy(), SEGMENT_BITS[segment])

    def __repr__(self) -> str:
        return (f"CMPQLayer(n={self.n}, k={self.k}, bits={self.bits:g}, seg_k={self.seg_k}, nnz={self.nnz}, "
                f"codebook_rows={self.codebook_rows}, effective_bits={self.effective_bits:.3f})")
