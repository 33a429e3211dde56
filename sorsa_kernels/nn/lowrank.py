"""What every SORSA layer holds, declared once: its sizes, its scale, the trainable factors and the frozen bias.

:class:`~sorsa_kernels.nn.linear.SORSALinear` (one weight) and
:class:`~sorsa_kernels.nn.experts.SORSAExperts` (a stack of E expert weights), dense or NF4,
differ in the residual's storage (each class's ``allocate_residual``) and in the leading
expert dimension; the rest of their construction is :func:`init_low_rank`.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .checks import check_dtype, validate_rank
from .knobs import check_scale

__all__ = ["init_low_rank"]


def init_low_rank(module: nn.Module, in_features: int, out_features: int, rank: int, *, bias: bool,
                  alpha: Optional[float], residual_dtype: torch.dtype, adapter_dtype: torch.dtype,
                  device: Optional[Union[str, torch.device]], lead: tuple[int, ...] = ()) -> None:
    """Check the sizes, ``adapter_dtype`` and ``alpha`` (one-line errors), then give ``module`` its
    ``in_features``, ``out_features``, ``rank``, ``alpha``, ``scale``, its residual storage
    (``module.allocate_residual(residual_dtype, device)``), zero factors ``U`` (lead×out×r), ``S``
    (lead×r), ``V`` (lead×in×r) in ``adapter_dtype``, the frozen ``bias`` (lead×out, or None) and
    ``init_factors = None``.  ``lead`` is ``(num_experts,)`` for a stack of experts.

    Example::

        >>> init_low_rank(layer, 100, 72, 8, bias=True, alpha=16.0, residual_dtype=torch.bfloat16,
        ...               adapter_dtype=torch.float32, device="meta")
        >>> layer.scale, tuple(layer.U.shape)
        (2.0, (72, 8))
    """
    validate_rank(rank, in_features, out_features)
    check_dtype(adapter_dtype, "adapter_dtype")
    check_scale(alpha, rank, adapter_dtype)  # alpha = 0 would make S = σ / 0 = inf, 1e300 S = 0
    module.in_features = in_features
    module.out_features = out_features
    module.rank = rank
    module.alpha = alpha
    module.scale = 1.0 if alpha is None else float(alpha) / rank
    module.allocate_residual(residual_dtype, device)
    factor = dict(dtype=adapter_dtype, device=device)
    module.U = nn.Parameter(torch.zeros(*lead, out_features, rank, **factor))
    module.S = nn.Parameter(torch.zeros(*lead, rank, **factor))
    module.V = nn.Parameter(torch.zeros(*lead, in_features, rank, **factor))
    if bias:
        module.bias = nn.Parameter(torch.zeros(*lead, out_features, dtype=residual_dtype, device=device),
                                   requires_grad=False)
    else:
        module.register_parameter("bias", None)
    module.init_factors = None
