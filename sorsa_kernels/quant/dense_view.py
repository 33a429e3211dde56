"""A dense-looking view of an NF4 weight that dequantizes only when its values are used.

``QSORSALinear.weight`` / ``.residual`` return an :class:`NF4DenseView`: a ``torch.Tensor``
subclass without storage whose ``dtype``, ``shape``, ``device`` (and ``size()``, ``dim()``,
``numel()`` …) are the dequantized matrix's, read for free — so code that checks
``module.weight.dtype`` on every layer of a 7B model costs nothing.  Any use of the values
(``torch.equal``, arithmetic, ``.clone()``, ``.to()``, printing) dequantizes once per view
through :func:`~sorsa_kernels.quant.nf4.dequantize_nf4_bnb` and runs on the dense result,
which is a plain tensor.  :meth:`NF4DenseView.dequantize` gives that tensor explicitly.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils._pytree import tree_map_only

from .nf4 import NF4Weight, dequantize_nf4_bnb

__all__ = ["NF4DenseView"]

# Metadata reads answered from the view itself, without dequantizing.
_METADATA = {
    Tensor.dtype.__get__, Tensor.shape.__get__, Tensor.device.__get__, Tensor.ndim.__get__,
    Tensor.layout.__get__, Tensor.requires_grad.__get__, Tensor.is_cuda.__get__, Tensor.is_meta.__get__,
    Tensor.is_sparse.__get__, Tensor.is_quantized.__get__, Tensor.grad.__get__,
    Tensor.size, Tensor.dim, Tensor.numel, Tensor.nelement, Tensor.element_size,
    Tensor.is_floating_point, Tensor.is_complex, Tensor.__len__,
}


class NF4DenseView(Tensor):
    """The ``out×in`` matrix ``deq(q)`` in ``dtype``, materialized on first use of its values.

    Example::

        >>> w = NF4DenseView(quantize_nf4(W), torch.bfloat16)
        >>> w.dtype, w.shape                     # no dequantization
        (torch.bfloat16, torch.Size([72, 100]))
        >>> torch.equal(w, dequantize_nf4_bnb(w.nf4, torch.bfloat16))   # dequantizes once
        True
    """

    nf4: NF4Weight
    _dense: Optional[Tensor]

    @staticmethod
    def __new__(cls, q: NF4Weight, dtype: torch.dtype) -> "NF4DenseView":
        view = Tensor._make_wrapper_subclass(
            cls, tuple(q.shape), dtype=dtype, device=q.packed.device, requires_grad=False
        )
        view.nf4 = q
        view._dense = None
        return view

    def dequantize(self) -> Tensor:
        """The dense matrix (a plain tensor), computed on the first call and kept by this view."""
        if self._dense is None:
            with torch._C.DisableTorchFunctionSubclass():
                dtype = self.dtype
            self._dense = dequantize_nf4_bnb(self.nf4, dtype)
        return self._dense

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None) -> Any:
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        args, kwargs = tree_map_only(cls, cls.dequantize, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None) -> Any:
        # Reached only where torch-function handling is off (e.g. inside other subclasses).
        args, kwargs = tree_map_only(cls, cls.dequantize, (args, kwargs or {}))
        return func(*args, **kwargs)

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return repr(self.dequantize())
