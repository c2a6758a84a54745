"""Text for calibration and evaluation: gensim's English corpora (offline, disjoint) or any UTF-8 file."""
from __future__ import annotations

import os

from .models import package_dir

BUILTIN_TEXTS = ("lee-train", "lee-test")


def gensim_text(file: str) -> str:
    """Text of a file in gensim's test data (``lee_background.cor``, ``lee.cor``); needs ``pip install gensim``."""
    directory = os.path.join(package_dir("gensim", "pip install gensim"), "test", "test_data")
    with open(os.path.join(directory, file), encoding="latin-1") as f:  # the Lee corpus is not UTF-8
        return f.read()


def lee_split(held_out_docs: int = 60) -> tuple[str, str]:
    """``(calibration, evaluation)`` prose with no shared document.

    Calibration: the first ``300 - held_out_docs`` documents of ``lee_background.cor``. Evaluation: the
    50 documents of ``lee.cor`` (disjoint from the background corpus) plus the held-out last
    ``held_out_docs`` background documents. One document per line in both files.
    """
    background = [d for d in gensim_text("lee_background.cor").splitlines() if d.strip()]
    lee = [d for d in gensim_text("lee.cor").splitlines() if d.strip()]
    calibration = background[:-held_out_docs]
    evaluation = lee + background[-held_out_docs:]
    if set(calibration) & set(evaluation):
        raise RuntimeError("calibration and evaluation texts share a document")
    return "\n\n".join(calibration), "\n\n".join(evaluation)


def read_text(spec: str) -> str:
    """Text of a file, or of a built-in corpus (``lee-train`` / ``lee-test``)."""
    if spec in BUILTIN_TEXTS:
        return lee_split()[BUILTIN_TEXTS.index(spec)]
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"text {spec!r} is neither a file nor one of {', '.join(BUILTIN_TEXTS)}")
    with open(spec, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"text file {spec!r} is empty")
    return text
