"""Progress bars for the long quantization loops: tqdm when installed, a plain stderr counter otherwise."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

try:
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # tqdm is optional: the quantizer must run without it
    _tqdm = None


def progress(items: Iterable[T], desc: str, total: Optional[int] = None, enabled: bool = True) -> Iterator[T]:
    """Yield ``items`` while showing a progress bar labelled ``desc`` (silent when ``enabled`` is False)."""
    if not enabled:
        yield from items
        return
    if _tqdm is not None:
        yield from _tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    start = time.perf_counter()
    for i, item in enumerate(items):
        yield item
        sys.stderr.write(f"\r{desc}: {i + 1}/{total if total is not None else '?'} "
                         f"({time.perf_counter() - start:.1f} s)")
        sys.stderr.flush()
    sys.stderr.write("\n")
