"""The error-reducing QSORSA split (nn/qinit.py), on matrices with a power-law spectrum."""
import pytest
import torch

from sorsa_kernels.nn.qinit import error_reducing_split
from sorsa_kernels.ops import reference
from sorsa_kernels.quant.init import quantization_error
from sorsa_kernels.quant.nf4 import dequantize_nf4, quantize_nf4

pytest.importorskip("bitsandbytes")


def _powerlaw(m, n, alpha, seed):
    """U·diag(i^-α)·Vᵀ with random orthonormal U, V (a Gaussian matrix has no such spectrum)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -alpha
    return (U * s) @ V.T


@pytest.mark.parametrize("alpha,seed", [(0.5, 0), (1.0, 1)])
def test_iterations_do_not_increase_the_error_on_power_law_spectrum(alpha, seed):
    W = _powerlaw(160, 96, alpha, seed)
    _, history, best = error_reducing_split(W, 16, iters=3)
    assert len(history) == 4
    assert all(b <= a for a, b in zip(history, history[1:])), history
    assert best == 3


@pytest.mark.parametrize("alpha,seed", [(0.5, 2), (1.0, 3)])
def test_qsorsa_error_beats_nf4_of_the_whole_weight_on_power_law_spectrum(alpha, seed):
    W = _powerlaw(160, 96, alpha, seed)
    (U0, S0, V0), history, _ = error_reducing_split(W, 16, iters=1)
    res = reference.compute_residual(W, U0, S0, V0, 1.0)
    err = W - (dequantize_nf4(quantize_nf4(res)) + (U0 * S0) @ V0.T)
    base = quantization_error(W).norm()
    assert err.norm() < 0.9 * base
    assert history[1] < history[0] < base


def test_returned_factors_rebuild_the_reported_error():
    W = _powerlaw(72, 100, 0.7, 4)
    (U0, S0, V0), history, best = error_reducing_split(W, 8, iters=2, scale=0.5)
    res = reference.compute_residual(W, U0, S0, V0, 0.5)
    err = res - dequantize_nf4(quantize_nf4(res))
    assert float(torch.linalg.matrix_norm(err)) == history[best] == min(history)


def test_zero_iterations_is_nf4_of_the_svd_residual():
    W = _powerlaw(72, 100, 0.7, 5)
    (U0, S0, V0), history, best = error_reducing_split(W, 8, iters=0)
    U, s, V = reference.principal_split(W, 8)
    assert torch.equal(U0, U) and torch.equal(S0, s) and torch.equal(V0, V)
    assert len(history) == 1 and best == 0


def test_factors_come_back_in_factor_dtype_with_sigma_over_scale():
    W = _powerlaw(72, 100, 0.7, 6)
    (U0, S0, V0), _, _ = error_reducing_split(W, 8, iters=0, scale=2.0, factor_dtype=torch.float64)
    _, s, _ = reference.principal_split(W, 8)
    assert U0.dtype == S0.dtype == V0.dtype == torch.float64
    assert torch.allclose(S0, (s / 2.0).double())


@pytest.mark.parametrize("iters", [-1, 1.5, True])
def test_bad_iteration_count_is_named(iters):
    with pytest.raises(ValueError, match="quant_iters must be a non-negative int"):
        error_reducing_split(torch.randn(16, 64), 2, iters=iters)


def test_on_iterate_sees_every_iterate_and_each_iters_keeps_the_best_so_far():
    torch.manual_seed(3)
    W = torch.randn(48, 40) @ torch.diag(torch.logspace(0, -2, 40))
    seen = []
    _, history, _ = error_reducing_split(W, 6, iters=3, on_iterate=lambda t, f, e: seen.append((t, f, e)))
    assert [t for t, _, _ in seen] == [0, 1, 2, 3] and [e for _, _, e in seen] == history
    for k in range(4):
        (U0, S0, V0), _, best = error_reducing_split(W, 6, iters=k)
        kept = min(range(k + 1), key=lambda t: history[t])
        assert best == kept and torch.equal(U0, seen[kept][1][0]) and torch.equal(S0, seen[kept][1][1])
