"""QSORSA's error-reducing initialization: alternate the SVD split and NF4 quantization.

Plain QSORSA splits ``W0`` by SVD and stores the residual in NF4:
``Wp = U·diag(σ)·Vᵀ`` (top r of ``W0``), ``Q = NF4(W0 − Wp)``.  As QPiSSA and LoftQ
showed, alternating the two steps lowers what the layer actually computes with, i.e. the
error ``W0 − (deq(Q) + Wp)``::

    for T iterations:   Wp ← top-r SVD of (W0 − deq(Q));   Q ← NF4(W0 − Wp)

``T = 0`` is plain QSORSA.  Every iterate is evaluated with the factors cast to the
adapter dtype and the residual computed by :func:`sorsa_kernels.ops.reference.compute_residual`
— exactly how :meth:`sorsa_kernels.nn.QSORSALinear.from_factors` rebuilds the layer — and the
iterate with the smallest Frobenius error is kept, so more iterations never give a worse
layer.  This module owns the orchestration of the SVD (``ops``) and NF4 (``quant``) steps,
which is why it sits in ``nn/``, above both; the error report stays in :mod:`sorsa_kernels.quant.init`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..ops import reference
from ..quant.nf4 import dequantize_nf4, quantize_nf4

__all__ = ["error_reducing_split"]


def _check_iters(iters: int) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"quant_iters must be a non-negative int (0 = plain QSORSA), got {iters!r}")


def error_reducing_split(
    weight: Tensor,
    rank: int,
    *,
    iters: int = 1,
    scale: float = 1.0,
    svd: str = "full",
    niter: int = 2,
    oversample: int = 16,
    svd_dtype: torch.dtype = torch.float32,
    factor_dtype: torch.dtype = torch.float32,
    on_iterate: Optional[Callable[[int, tuple[Tensor, Tensor, Tensor], float], None]] = None,
) -> tuple[tuple[Tensor, Tensor, Tensor], list[float], int]:
    """Initial factors ``(U0, S0 = σ/scale, V0)`` after ``iters`` error-reducing iterations.

    Runs on ``weight``'s device (move the weight first to run the SVD elsewhere).  The
    factors come back in ``factor_dtype``; ``NF4(compute_residual(weight, U0, S0, V0, scale))``
    is the layer's residual.  Also returns the Frobenius error of each iterate
    ``0..iters`` and the index of the one kept (the smallest).  ``on_iterate(t, factors, err)``,
    if given, sees every iterate (for analysis: one call with ``iters=T`` then gives what
    ``iters=0..T`` would keep).

    Example::

        >>> (U0, S0, V0), hist, best = error_reducing_split(W0, 128, iters=1)
    """
    _check_iters(iters)
    w = weight.detach().float()

    def candidate(U: Tensor, sigma: Tensor, V: Tensor):
        factors = (U.to(factor_dtype), (sigma / scale).to(factor_dtype), V.to(factor_dtype))
        res = reference.compute_residual(w, *factors, scale)
        q = quantize_nf4(res)
        deq = dequantize_nf4(q, torch.float32)
        err = float(torch.linalg.matrix_norm(res - deq))
        return factors, deq, err

    split = dict(svd=svd, niter=niter, oversample=oversample, dtype=svd_dtype)
    factors, deq, err = candidate(*reference.principal_split(w, rank, **split))
    if on_iterate is not None:
        on_iterate(0, factors, err)
    best, best_err, history = factors, err, [err]
    best_iter = 0
    for it in range(1, iters + 1):
        target = w - deq
        del deq
        factors, deq, err = candidate(*reference.principal_split(target, rank, **split))
        del target
        if on_iterate is not None:
            on_iterate(it, factors, err)
        history.append(err)
        if err < best_err:
            best, best_err, best_iter = factors, err, it
    return best, history, best_iter
