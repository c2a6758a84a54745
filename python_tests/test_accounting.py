"""Bit accounting (effective_bits, code_bits, reprs) and backends()."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cmpq_kernels
from cmpq_kernels import CMPQLinear
from conftest import make_layer


@pytest.mark.parametrize("n,k,seg_k,codebook_rows,nnz", [
    (37, 192, (64, 96, 32), 1, 50),
    (100, 96, (0, 0, 96), 4, 0),
    (8, 32, (32, 0, 0), 3, 8),
])
def test_effective_bits_is_the_hand_counted_storage(n, k, seg_k, codebook_rows, nnz):
    rows, cols = np.arange(nnz) % n, (7 * np.arange(nnz)) % k  # distinct positions for these sizes
    layer = make_layer(n, k, seg_k, codebook_rows=codebook_rows, bias=torch.float32, outliers=(rows, cols))
    codebook_count = -(-n // codebook_rows)
    expected = (
        n * (4 * seg_k[0] + 3 * seg_k[1] + 2 * seg_k[2])  # codes: exactly b bits per weight
        + codebook_count * 16 * sum(2**b for b, s in zip((4, 3, 2), seg_k) if s)  # fp16 codebooks, non-empty segments
        + (n + 1) * 32                                     # int32 row_ptr
        + nnz * (16 + 16)                                  # int16 col (k <= 32767) + fp16 val
        + k * 32                                           # int32 perm; the bias is not counted
    )
    assert layer.nnz == nnz
    assert layer.effective_bits == pytest.approx(expected / (n * k), rel=1e-12)
    assert layer.code_bits == pytest.approx((4 * seg_k[0] + 3 * seg_k[1] + 2 * seg_k[2]) / k, rel=1e-12)


def test_reprs_report_the_accounting():
    layer = make_layer(37, 96, outlier_density=0.05, seed=2)
    assert f"effective_bits={layer.effective_bits:.3f}" in repr(layer) and f"nnz={layer.nnz}" in repr(layer)
    assert "effective_bits=" in repr(CMPQLinear(layer)) and "format_version=1" in repr(CMPQLinear(layer))


def test_backends(monkeypatch):
    monkeypatch.delenv("CMPQ_CPU_SIMD", raising=False)
    info = cmpq_kernels.backends()
    assert info["cpu"] is True
    exact = [isa for isa in info["cpu_isas"] if isa != "avx512-int8"]  # auto never picks the int8 mode
    assert info["cpu_isa"] in {"avx512", "avx2", "scalar"} and info["cpu_isa"] == exact[-1]
    assert info["cpu_isas"][0] == "scalar"
    assert isinstance(info["cuda_built"], bool) and isinstance(info["cuda"], bool)
    assert (info["cuda_error"] is None) == info["cuda"]
    if not info["cuda_built"]:
        assert info["cuda_error"].startswith("not built")
    monkeypatch.setenv("CMPQ_CPU_SIMD", "0")  # the override is read on every call
    assert cmpq_kernels.backends()["cpu_isa"] == "scalar"


def test_backends_reports_why_the_cuda_extension_did_not_load():
    """A built extension the loader refuses (here: a finder that raises like a missing libcudart) is named with
    its import error, not just cuda: False."""
    code = (
        "import importlib.abc, sys\n"
        "class Refuse(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'cmpq_kernels._C_cuda':\n"
        "            raise ImportError('libcudart.so.13: cannot open shared object file')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "import cmpq_kernels\n"
        "info = cmpq_kernels.backends()\n"
        "print(info['cuda'], info['cuda_error'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(cmpq_kernels.__file__).parent.parent).stdout
    assert out.strip() == "False ImportError: libcudart.so.13: cannot open shared object file"
