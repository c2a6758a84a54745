"""The least-squares codebook refit (quantize/refit.py): the exact optimum of the output error, never worse."""
import pytest
import torch

from cmpq_kernels.quantize import quantize_weight
from cmpq_kernels.quantize.refit import refit_codebooks
from cmpq_kernels.reference import dequantize


def _problem(n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * k, k, generator=gen) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=gen))
    hessian = (x.T @ x / x.shape[0]).double()
    return torch.randn(n, k, generator=gen), hessian, gen


def _output_error(w: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor) -> float:
    d = (w - q).double()
    return float(((d @ hessian) * d).sum())


def _dense_optimum(w, hessian, codebooks, codes, seg_k, keep, exact, rows):
    """The normal equations built from explicit one-hot matrices, solved per block of rows."""
    n, k = w.shape
    sizes = [cb.shape[1] for cb in codebooks]
    offsets = [0, sizes[0], sizes[0] + sizes[1]]
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(seg_k))
    level = codes + torch.tensor(offsets)[seg]
    out = []
    for b in range(-(-n // rows)):
        m = torch.zeros(sum(sizes), sum(sizes), dtype=torch.float64)
        rhs = torch.zeros(sum(sizes), dtype=torch.float64)
        for i in range(b * rows, min(n, (b + 1) * rows)):
            p = torch.zeros(k, sum(sizes), dtype=torch.float64)
            used = ~keep[i]
            p[torch.arange(k)[used], level[i][used]] = 1.0
            m += p.T @ hessian @ p
            rhs += p.T @ hessian @ torch.where(keep[i], w[i] - exact[i], w[i]).double()
        out.append(torch.linalg.solve(m, rhs))
    return torch.stack(out)


@pytest.mark.parametrize("rows", [1, 4])
def test_refit_reaches_the_least_squares_optimum(rows):
    n, k, seg_k = 8, 96, (32, 32, 32)
    w, hessian, gen = _problem(n, k, 3)
    groups = -(-n // rows)
    codebooks = [torch.sort(torch.randn(groups, 1 << b, generator=gen), 1).values for b in (4, 3, 2)]
    codes = torch.cat([torch.randint(0, 1 << b, (n, s), generator=gen) for b, s in zip((4, 3, 2), seg_k)], 1)
    # Every entry used by every block, so the dense system is regular.
    codes[:, :16], codes[:, 32:40], codes[:, 64:68] = torch.arange(16), torch.arange(8), torch.arange(4)
    keep = torch.zeros(n, k, dtype=torch.bool)
    keep[torch.arange(n), torch.randint(16, k, (n,), generator=gen)] = True
    exact = w + 0.01
    refit = refit_codebooks(w, hessian, codebooks, codes, seg_k, keep, exact, rows, steps=60)
    optimum = _dense_optimum(w, hessian, codebooks, codes, seg_k, keep, exact, rows).float()
    got = torch.cat(refit, 1)
    assert torch.equal(got, got.half().float()), "entries stay fp16-representable"
    torch.testing.assert_close(got, optimum, rtol=2e-3, atol=2e-3)


def test_quantize_weight_refit_lowers_the_output_error_and_keeps_the_layout():
    w, hessian, _ = _problem(64, 128, 5)
    s2 = torch.diagonal(hessian).float()
    base = quantize_weight(w, s2, 3.0, hessian=hessian, codebook_refit=False)
    refit = quantize_weight(w, s2, 3.0, hessian=hessian, codebook_refit=True)
    assert refit.effective_bits == base.effective_bits and torch.equal(refit.perm, base.perm)
    assert [c.shape for c in refit.codebooks] == [c.shape for c in base.codebooks]
    before, after = (_output_error(w, dequantize(layer), hessian) for layer in (base, refit))
    assert after < 0.995 * before, (before, after)
