"""What both kernel benchmarks (``bench_cpu.py``, ``bench_gpu.py``) share: the case lists they parse, the bytes
a layer stores, markdown tables and the ``<out>.json`` / ``<out>.md`` pair they write.

Imports: stdlib and cmpq_kernels only (the GPU machine may have nothing else).
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Collection, Iterable, Sequence

from cmpq_kernels.format import GROUP_CODES, CMPQLayer


def parse_shape(text: str) -> tuple[int, int]:
    """'4096x11008' (or '4096×11008') -> (N, K) = (out_features, in_features)."""
    parts = text.strip().lower().replace("×", "x").split("x")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected NxK (out x in), e.g. 4096x11008")
    try:
        n, k = int(parts[0]), int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: N and K must be integers") from None
    if n <= 0 or k <= 0 or k % GROUP_CODES:
        raise argparse.ArgumentTypeError(f"shape {text!r}: need N > 0 and K > 0 a multiple of {GROUP_CODES}")
    return n, k


def _split(text: str) -> list[str]:
    items = [t for t in (s.strip() for s in text.split(",")) if t]
    if not items:
        raise argparse.ArgumentTypeError("empty list")
    return items


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(parse_shape(t) for t in _split(text))


def parse_batches(text: str) -> tuple[int, ...]:
    try:
        ms = tuple(int(t) for t in _split(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch list {text!r}: expected comma-separated integers") from None
    if any(m < 1 for m in ms):
        raise argparse.ArgumentTypeError(f"batch list {text!r}: every M must be >= 1")
    return ms


def parse_bits(text: str) -> tuple[float, ...]:
    try:
        bits = tuple(float(t) for t in _split(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits list {text!r}: expected comma-separated numbers") from None
    if any(not (2.0 <= b <= 4.0) for b in bits):
        raise argparse.ArgumentTypeError(f"bits list {text!r}: every value must be in [2, 4]")
    return bits


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def layer_bytes(layer: CMPQLayer) -> int:
    """All stored bytes of a layer (bias excluded, as in ``storage_bits``): what one call must read."""
    bits = sum(layer.storage_bits().values())
    assert bits % 8 == 0, bits
    return bits // 8


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]],
                   text_columns: Collection[int] = (0,)) -> list[str]:
    """Lines of a markdown table; columns are right-aligned (numbers) except ``text_columns``."""
    align = ["---" if i in text_columns else "---:" for i in range(len(header))]
    return [_row(header), "|" + "|".join(align) + "|", *(_row(r) for r in rows)]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def write_json_and_markdown(doc: dict, markdown: str, out: Path) -> None:
    """``<out>.json`` (strict JSON, replaced atomically so a killed run never leaves half a file) and
    ``<out>.md``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    tmp.replace(out.with_suffix(".json"))
    out.with_suffix(".md").write_text(markdown)
