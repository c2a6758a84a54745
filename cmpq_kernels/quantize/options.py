"""The quantizer's settings, written once: names, defaults, help, validation and the JSON form.

:class:`QuantOptions` is what :func:`~cmpq_kernels.quantize.quantize_model`,
:func:`~cmpq_kernels.quantize.quantize_weight`, :func:`~cmpq_kernels.quantize.quantize_linear`, the ``cmpq``
CLI and a checkpoint's ``quantization_config.settings`` all read. Functions that take ``options`` also take
its fields as keyword overrides (``quantize_model(model, text, allocator="cmpq")``), applied with
:meth:`QuantOptions.with_overrides` so an unknown or invalid name fails the same way everywhere.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Optional, Union

AUTO_ALLOCATORS = ("greedy", "cmpq")
#: rows per codebook that ``codebook_rows="auto"`` chooses from.
AUTO_CODEBOOK_ROWS = (1, 2, 4, 8)
ALLOCATORS = (*AUTO_ALLOCATORS, "auto")
BUDGETS = ("layer", "global")
FEEDBACK_ORDERS = ("act", "packed")


def _option(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    """Settings of the CMPQ quantizer (the bit budget and the calibration data are separate arguments)."""

    allocator: str = _option("greedy", "bit widths per input channel: 'greedy' (estimated output error, any "
                                       "2/3/4 mix) or 'cmpq' (the paper's salience rule, two adjacent widths; ahead "
                                       "at 3.0 effective bits on both test models, behind on Gemma3 at the default "
                                       "bits=3.0, DESIGN 1.9); 'auto' (needs effective_bits): per layer, whichever "
                                       "has the least output error")
    budget: str = _option("layer", "'layer': every layer meets the bit budget; 'global': the model-wide "
                                   "average does (needs allocator 'greedy')")
    codebook_rows: Union[int, str] = _option(4, "consecutive output rows sharing one codebook (4 cuts the codebook "
                                                "overhead 4x for a small error cost; measured better per effective "
                                                "bit than 1); 'auto' (needs effective_bits): per layer, whichever "
                                                "of 1/2/4/8 has the least output error at the budget")
    effective_bits: Optional[float] = _option(None, "budget in stored bits per weight (codes, codebooks, outliers, "
                                                    "row pointers, perm), met within 0.01 per layer (budget "
                                                    "'layer') or model-wide ('global'); the quantizer then picks "
                                                    "the code bits itself. None: the bit budget is in code bits")
    p_act: float = _option(0.0005, "fraction of weights kept exactly as activation-based outliers")
    p_err: float = _option(0.004, "fraction of weights kept exactly as error-based outliers")
    error_feedback: bool = _option(True, "GPTQ-style error feedback on the fitted codebooks (needs X^T X per "
                                         "layer, recorded during calibration)")
    codebook_refit: bool = _option(False, "after error feedback, refit the codebook entries to the layer's output "
                                          "error on the calibration data for the chosen codes (needs "
                                          "error_feedback; off by default: it did not win on validation text on "
                                          "both models, DESIGN 1.6)")
    feedback_order: str = _option("act", "column order of the error feedback: 'act' (descending Hessian "
                                         "diagonal) or 'packed' (segment order [4|3|2])")
    kmeans_iters: int = _option(20, "Lloyd iteration cap per codebook fit")
    share_input_widths: bool = _option(True, "layers reading the same input (q/k/v, gate/up) get one channel "
                                             "allocation and permutation, so a serving stack can run them as one "
                                             "fused matrix (vLLM); False allocates each layer alone")

    def __post_init__(self) -> None:
        _choice("allocator", self.allocator, ALLOCATORS)
        _choice("budget", self.budget, BUDGETS)
        _choice("feedback_order", self.feedback_order, FEEDBACK_ORDERS)
        if self.budget == "global" and self.allocator != "greedy":
            raise ValueError(f"budget='global' needs allocator='greedy', got {self.allocator!r} (pass allocator='greedy':"
                             " the paper rule ranks channels by salience s2, which is not comparable across layers)")
        if self.codebook_rows != "auto":
            _count("codebook_rows", self.codebook_rows)
        if self.automatic and (self.effective_bits is None or self.budget != "layer"):
            raise ValueError("allocator='auto' / codebook_rows='auto' compare settings at equal stored bits: they "
                             "need effective_bits and budget='layer'")
        _count("kmeans_iters", self.kmeans_iters)
        if self.effective_bits is not None:
            _budget(self.effective_bits)
        _fraction("p_act", self.p_act)
        _fraction("p_err", self.p_err)
        for name in ("error_feedback", "codebook_refit", "share_input_widths"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def automatic(self) -> bool:
        """Whether a setting is chosen per layer by measured error (``"auto"``)."""
        return self.allocator == "auto" or self.codebook_rows == "auto"

    def candidates(self) -> list["QuantOptions"]:
        """Every concrete setting these options stand for (``"auto"`` fields expanded; just ``self`` when none is)."""
        allocators = AUTO_ALLOCATORS if self.allocator == "auto" else (self.allocator,)
        rows = AUTO_CODEBOOK_ROWS if self.codebook_rows == "auto" else (self.codebook_rows,)
        return [self.with_overrides(allocator=a, codebook_rows=r) for a in allocators for r in rows]

    def with_overrides(self, **overrides: Any) -> "QuantOptions":
        """A copy with some fields replaced; ``TypeError`` names an unknown option."""
        unknown = sorted(set(overrides) - set(self.names()))
        if unknown:
            raise TypeError(f"unknown quantizer option(s) {unknown}; known: {', '.join(self.names())}")
        return dataclasses.replace(self, **overrides)

    @classmethod
    def resolve(cls, options: Optional["QuantOptions"], overrides: Mapping[str, Any]) -> "QuantOptions":
        """``options`` (defaults when None) with keyword ``overrides`` applied."""
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"options must be a QuantOptions, got {type(options).__name__}")
        return (options or cls()).with_overrides(**overrides)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every option name, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def help(cls, name: str) -> str:
        """The one-line description of option ``name`` (used by the CLI)."""
        return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (the ``settings`` of a checkpoint's ``quantization_config``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "QuantOptions":
        """Inverse of :meth:`to_json`; keys that are not options (calibration, ...) are ignored."""
        return cls(**{name: data[name] for name in cls.names() if name in data})


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _count(name: str, value: Any) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _budget(value: Any) -> None:
    # The per-layer range depends on the shape (overheads per weight shrink with K); quantize_model checks it.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 2):
        raise ValueError(f"effective_bits must be a finite number >= 2 (2-bit codes plus overheads) or None, "
                         f"got {value!r}")


def _fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and 0 <= value < 1):
        raise ValueError(f"{name} must be a fraction in [0, 1), got {value!r}")
