"""The MixLLM packed format (format_version 1): one linear layer whose output rows are 8-bit or 4-bit, validated.

MixLLM (arXiv 2412.14590) keeps a few salient *output* channels of every linear at 8 bits and the rest at 4 bits,
and multiplies them with 8-bit activations. This module is the data layer of that method: it knows nothing of
models, calibration or kernels. Layout (mirrors ``csrc/mixllm_layout.h``, the one C++ statement of it):

* input channels ``k`` fall in groups of :data:`GROUP` (128) along K; ``k`` must be a multiple of
  :data:`K_ALIGN` (32), and when ``k`` is not a multiple of 128 the **last group is partial**
  (``k - 128 * (G - 1)`` wide, ``G = ceil(k / 128)``). Activations use the same groups;
* 8-bit rows: ``q8`` int8 ``[n8, k]`` in ``[-127, 127]`` (symmetric), ``s8`` fp16 ``[n8, G]`` (absmax / 127);
  ``w = q * s``;
* 4-bit rows: ``q4`` uint8 ``[n4, k / 2]``, two codes per byte along K, the **low nibble holding the even k**;
  ``s4`` fp16 ``[n4, G]``; ``z4`` uint8 ``[n4, ceil(G / 2)]`` zero points packed the same way along the groups
  (an odd ``G`` leaves the last high nibble 0); ``w = (q - z) * s``;
* ``idx8`` / ``idx4`` int32: the output row of each stored row. Together they cover ``0 .. n-1`` exactly once.
* optional ``bias`` ``[n]`` fp16/bf16/fp32.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

from .format import check_tensor, is_int, tensor_bits

FORMAT_VERSION = 1
GROUP = 128  #: input channels per scale (weights and activations)
K_ALIGN = 32  #: in_features must be a multiple of this (the narrowest partial group)
QUANT_METHOD = "mixllm"

#: the packed tensors of a layer in op-argument order (module buffers, checkpoint names, ``torch.ops.cmpq.mixllm_*``)
LAYER_FIELDS = ("idx8", "q8", "s8", "idx4", "q4", "s4", "z4")
#: dtype of each packed tensor
FIELD_DTYPES = {"idx8": torch.int32, "q8": torch.int8, "s8": torch.float16, "idx4": torch.int32, "q4": torch.uint8,
                "s4": torch.float16, "z4": torch.uint8}


def groups_of(k: int) -> int:
    """Number of 128-wide groups along ``k`` (the last one partial when ``k % 128``)."""
    return -(-k // GROUP)


def check_in_features(k: int) -> None:
    """Raise ``ValueError`` unless ``k`` input channels can be grouped (positive, a multiple of 32)."""
    if k <= 0 or k % K_ALIGN:
        raise ValueError(f"in_features {k} is not a positive multiple of {K_ALIGN}: MixLLM groups channels by "
                         f"{GROUP} with a last partial group of a multiple of {K_ALIGN}; leave the layer unquantized")


def group_sizes(k: int) -> list[int]:
    """Width of each group along ``k``: 128, ..., 128, then the partial remainder (if any)."""
    return [min(GROUP, k - g * GROUP) for g in range(groups_of(k))]


# ---- nibble packing (twin of mixllm_layout.h) ----------------------------------------------------------------


def pack_nibbles(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, ceil(c / 2)]`` from integers ``[rows, c]`` in ``[0, 15]``: element ``2j`` in the low nibble of
    byte ``j``, ``2j + 1`` in the high nibble (0 when ``c`` is odd)."""
    v = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    if v.dim() != 2:
        raise ValueError(f"nibbles must be 2-D [rows, count], got shape {tuple(v.shape)}")
    if v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
        raise ValueError(f"nibbles must be integers, got {v.dtype}")
    if v.numel() and (int(v.min()) < 0 or int(v.max()) > 15):
        raise ValueError(f"nibbles must be in [0, 15], got [{int(v.min())}, {int(v.max())}]")
    v = v.to(torch.uint8)
    if v.shape[1] % 2:
        v = torch.cat([v, v.new_zeros(v.shape[0], 1)], dim=1)
    return (v[:, 0::2] | (v[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 ``[rows, count]`` from ``[rows, ceil(count / 2)]``."""
    if packed.dim() != 2 or packed.dtype != torch.uint8 or packed.shape[1] != -(-count // 2):
        raise ValueError(f"packed nibbles must be uint8 [rows, {-(-count // 2)}], got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    both = torch.stack([packed & 15, packed >> 4], dim=2).reshape(packed.shape[0], 2 * packed.shape[1])
    return both[:, :count].contiguous()


# ---- the layer container ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class MixLLMLayer:
    """One MixLLM-quantized linear layer ``y = x @ W.T + bias`` with ``W`` of shape ``[n, k]``.

    Build with :meth:`from_codes` (validated) or every field then :meth:`validate`. See the module docstring for
    the layout. All tensors live on one device.

    Attributes:
        n, k: out_features and in_features (``k % 32 == 0``).
        idx8, q8, s8: the 8-bit rows: output indices int32 ``[n8]``, codes int8 ``[n8, k]``, scales fp16 ``[n8, G]``.
        idx4, q4, s4, z4: the 4-bit rows: indices int32 ``[n4]``, packed codes uint8 ``[n4, k/2]``, scales fp16
            ``[n4, G]``, packed zero points uint8 ``[n4, ceil(G/2)]``.
        bias: optional ``[n]`` fp16/bf16/fp32.
        format_version: must equal :data:`FORMAT_VERSION`.
    """

    n: int
    k: int
    idx8: torch.Tensor
    q8: torch.Tensor
    s8: torch.Tensor
    idx4: torch.Tensor
    q4: torch.Tensor
    s4: torch.Tensor
    z4: torch.Tensor
    bias: Optional[torch.Tensor] = None
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_codes(cls, *, idx8: torch.Tensor | np.ndarray, q8: torch.Tensor, s8: torch.Tensor,
                   idx4: torch.Tensor | np.ndarray, q4: torch.Tensor, s4: torch.Tensor, z4: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> "MixLLMLayer":
        """A validated layer from unpacked parts: ``q8`` ints ``[n8, k]``, ``q4`` ints ``[n4, k]`` in [0, 15],
        ``z4`` ints ``[n4, G]`` in [0, 15]; scales are rounded to fp16 here."""
        q8, q4, z4 = (torch.as_tensor(t) for t in (q8, q4, z4))
        if q8.dim() != 2 or q4.dim() != 2:
            raise ValueError(f"q8, q4: must be 2-D, got {tuple(q8.shape)} and {tuple(q4.shape)}")
        k = q8.shape[1] if q8.shape[0] else q4.shape[1]
        if q8.numel() and (int(q8.min()) < -127 or int(q8.max()) > 127):
            raise ValueError(f"q8: codes must be in [-127, 127], got [{int(q8.min())}, {int(q8.max())}]")
        layer = cls(n=int(q8.shape[0] + q4.shape[0]), k=int(k),
                    idx8=torch.as_tensor(np.asarray(idx8), dtype=torch.int32).reshape(-1),
                    q8=q8.to(torch.int8).reshape(-1, k).contiguous(),
                    s8=torch.as_tensor(s8).to(torch.float16).contiguous(),
                    idx4=torch.as_tensor(np.asarray(idx4), dtype=torch.int32).reshape(-1),
                    q4=pack_nibbles(q4.reshape(-1, k)), s4=torch.as_tensor(s4).to(torch.float16).contiguous(),
                    z4=pack_nibbles(z4.reshape(q4.shape[0], groups_of(int(k)))), bias=bias)
        return layer.validate()

    # -- validation -----------------------------------------------------------------------------------

    @property
    def groups(self) -> int:
        """Scales per row (``ceil(k / 128)``)."""
        return groups_of(self.k)

    @property
    def n8(self) -> int:
        """Output rows stored at 8 bits."""
        return int(self.idx8.shape[0])

    def validate(self) -> "MixLLMLayer":
        """Check every field; raise ``ValueError`` naming the first bad one. Returns ``self``."""
        for name in ("n", "k", "format_version"):
            value = getattr(self, name)
            if not is_int(value):
                raise ValueError(f"{name}: must be an int, got {type(value).__name__} {value!r}")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version: this build reads MixLLM version {FORMAT_VERSION}, got "
                             f"{self.format_version}")
        if self.n <= 0:
            raise ValueError(f"n: must be positive, got {self.n}")
        try:
            check_in_features(self.k)
        except ValueError as err:
            raise ValueError(f"k: {err}") from None
        for name in (*LAYER_FIELDS, "bias"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) and not (name == "bias" and value is None):
                raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        device = self.idx8.device
        n8 = self.idx8.shape[0] if self.idx8.dim() == 1 else -1
        n4 = self.idx4.shape[0] if self.idx4.dim() == 1 else -1
        g = self.groups
        self._check_tensor("idx8", self.idx8, (n8,), device)
        self._check_tensor("idx4", self.idx4, (n4,), device)
        if n8 + n4 != self.n:
            raise ValueError(f"idx8, idx4: hold {n8} + {n4} rows, n is {self.n}")
        rows = torch.cat([self.idx8, self.idx4]).cpu().long()
        if not torch.equal(torch.sort(rows).values, torch.arange(self.n)):
            raise ValueError(f"idx8, idx4: together must cover output rows 0..{self.n - 1} exactly once")
        self._check_tensor("q8", self.q8, (n8, self.k), device)
        self._check_tensor("s8", self.s8, (n8, g), device)
        self._check_tensor("q4", self.q4, (n4, self.k // 2), device)
        self._check_tensor("s4", self.s4, (n4, g), device)
        self._check_tensor("z4", self.z4, (n4, -(-g // 2)), device)
        if n8 and bool((self.q8 == -128).any()):
            raise ValueError("q8: codes must be in [-127, 127] (symmetric), found -128")
        for name in ("s8", "s4"):
            scale = getattr(self, name)
            if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
                raise ValueError(f"{name}: scales must be finite and >= 0")
        if g % 2 and n4 and bool((self.z4[:, -1] >> 4).any()):
            raise ValueError(f"z4: the unused high nibble of the last byte must be 0 (G={g} is odd)")
        if self.bias is not None:
            if self.bias.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise ValueError(f"bias: dtype must be float16/bfloat16/float32, got {self.bias.dtype}")
            check_tensor("bias", self.bias, self.bias.dtype, (self.n,), device, anchor="idx8")
            if not bool(torch.isfinite(self.bias).all()):
                raise ValueError("bias: contains NaN or Inf")
        return self

    @staticmethod
    def _check_tensor(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
        check_tensor(name, t, FIELD_DTYPES[name], shape, device, anchor="idx8")

    # -- accounting -----------------------------------------------------------------------------------

    def storage_bits(self) -> dict[str, int]:
        """Bits stored per component, counted from the tensors (bias excluded, as for CMPQ: FP layers carry one)."""
        return {"codes": tensor_bits(self.q8) + tensor_bits(self.q4),
                "scales": tensor_bits(self.s8) + tensor_bits(self.s4),
                "zeros": tensor_bits(self.z4),
                "indices": tensor_bits(self.idx8) + tensor_bits(self.idx4)}

    @property
    def code_bits(self) -> float:
        """Average code width per weight (8 for the 8-bit rows, 4 for the rest), without overheads."""
        return (8 * self.n8 + 4 * (self.n - self.n8)) / self.n

    @property
    def effective_bits(self) -> float:
        """All stored bits (codes, scales, zero points, row indices) per weight."""
        return sum(self.storage_bits().values()) / (self.n * self.k)

    @property
    def nnz(self) -> int:
        """Outliers stored: MixLLM has none (kept so reports share one set of per-layer fields with CMPQ)."""
        return 0

    # -- access ---------------------------------------------------------------------------------------

    def fields(self) -> dict[str, torch.Tensor]:
        """The packed tensors by :data:`LAYER_FIELDS` name, in op-argument order (no copy)."""
        return {name: getattr(self, name) for name in LAYER_FIELDS}

    @classmethod
    def from_fields(cls, fields: dict[str, torch.Tensor], *, n: int, k: int,
                    bias: Optional[torch.Tensor] = None) -> "MixLLMLayer":
        """Inverse of :meth:`fields`. Not validated (callers that read untrusted data call :meth:`validate`)."""
        return cls(n=n, k=k, bias=bias, **{name: fields[name] for name in LAYER_FIELDS})

    def zeros(self) -> torch.Tensor:
        """Unpacked 4-bit zero points, uint8 ``[n4, G]``."""
        return unpack_nibbles(self.z4.cpu(), self.groups)

    def codes4(self) -> torch.Tensor:
        """Unpacked 4-bit codes, uint8 ``[n4, k]``."""
        return unpack_nibbles(self.q4.cpu(), self.k)

    def to(self, device: torch.device | str) -> "MixLLMLayer":
        """A copy with every tensor on ``device``."""
        moved = {name: t.to(device) for name, t in self.fields().items()}
        return dataclasses.replace(self, bias=None if self.bias is None else self.bias.to(device), **moved)

    def __repr__(self) -> str:
        return (f"MixLLMLayer(n={self.n}, k={self.k}, n8={self.n8}, groups={self.groups}, "
                f"effective_bits={self.effective_bits:.3f})")
