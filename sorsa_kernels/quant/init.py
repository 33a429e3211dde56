"""QSORSA's quantization-error report: how far the stored NF4 residual is from the weight.

The layer computes with ``deq(Q) + Wp`` where ``Wp = U0·diag(S0)·V0ᵀ`` is the principal
part and ``Q = NF4(W0 − Wp)``; its error ``W0 − (deq(Q) + Wp)`` equals the residual's own
quantization error ``Wr − deq(NF4(Wr))``, which is how :func:`layer_quant_report` computes
it.  The report compares that error with QLoRA's, ``W0 − deq(NF4(W0))``, in Frobenius and
nuclear norm, per layer (:class:`LayerQuantReport`) and in total (:class:`QuantReport`).
The error-reducing split that chooses ``Wp`` needs the SVD of :mod:`sorsa_kernels.ops.reference`
and so lives a layer up, in :mod:`sorsa_kernels.nn.qinit`; this module imports only torch
and :mod:`.nf4`.  Nothing here prints.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .nf4 import NF4Weight, dequantize_nf4, quantize_nf4

__all__ = [
    "REPORT_MODES",
    "LayerQuantReport",
    "QuantReport",
    "quantization_error",
    "layer_quant_report",
]

#: ``"full"``: Frobenius and nuclear norms; ``"fro"``: Frobenius only (no extra SVD);
#: ``None``: no report.
REPORT_MODES = ("full", "fro", None)


def quantization_error(w: Tensor, q: Optional[NF4Weight] = None) -> Tensor:
    """``w − deq(NF4(w))`` in float32 (``q`` may be given if ``w`` is already quantized).

    Example::

        >>> quantization_error(W0).norm()        # QLoRA's error on W0
    """
    w32 = w.detach().float()
    q = q if q is not None else quantize_nf4(w32)
    return w32 - dequantize_nf4(q, torch.float32).to(w32.device)


def _norms(err: Tensor, nuclear: bool) -> tuple[float, Optional[float]]:
    fro = float(torch.linalg.matrix_norm(err))
    nuc = float(torch.linalg.svdvals(err).sum()) if nuclear else None
    return fro, nuc


@dataclass
class LayerQuantReport:
    """Quantization error of one layer, QSORSA against NF4 of the whole weight.

    Attributes:
        name: the layer's module name ("" when unknown).
        shape: ``(out_features, in_features)``.
        rank, iters: r and the requested number of error-reducing iterations T.
        best_iter: which iterate (0..T) the layer keeps.
        fro, nuc: ``‖W0 − (deq(Q) + Wp)‖`` Frobenius / nuclear (nuc None if not computed).
        fro_nf4, nuc_nf4: ``‖W0 − deq(NF4(W0))‖``, the QLoRA baseline.
        fro_weight: ``‖W0‖_F``, for relative errors.
        fro_history: Frobenius error of iterate 0..T.

    Example::

        >>> layer.quant_report.fro_reduction      # e.g. 0.21: 21 % less error than QLoRA
    """

    name: str
    shape: tuple[int, int]
    rank: int
    iters: int
    best_iter: int
    fro: float
    fro_nf4: float
    fro_weight: float
    nuc: Optional[float] = None
    nuc_nf4: Optional[float] = None
    fro_history: list[float] = field(default_factory=list)

    @property
    def fro_reduction(self) -> float:
        """``1 − fro / fro_nf4``: the fraction of QLoRA's Frobenius error removed."""
        return 1.0 - self.fro / self.fro_nf4 if self.fro_nf4 > 0 else 0.0

    @property
    def nuc_reduction(self) -> Optional[float]:
        """``1 − nuc / nuc_nf4`` (None without nuclear norms)."""
        if self.nuc is None or self.nuc_nf4 is None:
            return None
        return 1.0 - self.nuc / self.nuc_nf4 if self.nuc_nf4 > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain-Python dict (JSON-serializable), with the reductions."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["fro_reduction"] = self.fro_reduction
        d["nuc_reduction"] = self.nuc_reduction
        return d


@dataclass
class QuantReport:
    """Per-layer :class:`LayerQuantReport` s and their totals.

    Totals treat the model's adapted weights as one block-diagonal matrix: Frobenius
    totals are ``sqrt(Σ fro²)``, nuclear totals ``Σ nuc``.

    Example::

        >>> rep = QuantReport.from_model(model)   # after apply_sorsa(..., quantize="nf4")
        >>> rep.total()["fro_reduction"]
    """

    layers: dict[str, LayerQuantReport] = field(default_factory=dict)

    def add(self, report: LayerQuantReport, name: Optional[str] = None) -> None:
        """Add one layer's report (under ``name``, default ``report.name``)."""
        key = name if name is not None else report.name
        if key in self.layers:
            raise ValueError(f"the report already has a layer named {key!r}")
        self.layers[key] = report

    @classmethod
    def from_model(cls, model: nn.Module) -> "QuantReport":
        """Collect ``quant_report`` of every module that has one (QSORSA layers built by from_linear)."""
        rep = cls()
        for name, module in model.named_modules():
            r = getattr(module, "quant_report", None)
            if isinstance(r, LayerQuantReport):
                rep.add(r, name)
        return rep

    def total(self) -> dict[str, Optional[float]]:
        """Model-wide ``fro``, ``fro_nf4``, ``nuc``, ``nuc_nf4`` and the two reductions."""
        ls = list(self.layers.values())
        fro = math.sqrt(sum(r.fro**2 for r in ls))
        fro_nf4 = math.sqrt(sum(r.fro_nf4**2 for r in ls))
        have_nuc = bool(ls) and all(r.nuc is not None and r.nuc_nf4 is not None for r in ls)
        nuc = sum(r.nuc for r in ls) if have_nuc else None
        nuc_nf4 = sum(r.nuc_nf4 for r in ls) if have_nuc else None
        return {
            "layers": len(ls),
            "fro": fro,
            "fro_nf4": fro_nf4,
            "fro_reduction": 1.0 - fro / fro_nf4 if fro_nf4 > 0 else 0.0,
            "nuc": nuc,
            "nuc_nf4": nuc_nf4,
            "nuc_reduction": (1.0 - nuc / nuc_nf4) if have_nuc and nuc_nf4 > 0 else None,
        }

    def as_dict(self) -> dict[str, Any]:
        """``{"layers": {name: layer dict}, "total": totals}``, JSON-serializable."""
        return {"layers": {k: v.as_dict() for k, v in self.layers.items()}, "total": self.total()}


def layer_quant_report(
    weight: Tensor,
    residual: Tensor,
    q: NF4Weight,
    *,
    rank: int,
    iters: int,
    best_iter: int = 0,
    history: Optional[list[float]] = None,
    nuclear: bool = True,
    name: str = "",
) -> LayerQuantReport:
    """The report of one layer from ``W0``, its float32 residual ``Wr`` and the stored ``NF4(Wr)``.

    Computes ``‖Wr − deq(Q)‖`` (= ``‖W0 − (deq(Q) + Wp)‖``) and the QLoRA baseline
    ``‖W0 − deq(NF4(W0))‖``; ``nuclear=True`` adds nuclear norms (two SVDs of m×n).

    Example::

        >>> rep = layer_quant_report(W0, Wr, layer.nf4(), rank=8, iters=1)
    """
    w = weight.detach().float()
    err = residual.detach().float() - dequantize_nf4(q, torch.float32).to(w.device)
    fro, nuc = _norms(err, nuclear)
    del err
    base = quantization_error(w)
    fro_nf4, nuc_nf4 = _norms(base, nuclear)
    del base
    return LayerQuantReport(
        name=name or "", shape=(int(w.shape[0]), int(w.shape[1])), rank=rank, iters=iters,
        best_iter=best_iter, fro=fro, fro_nf4=fro_nf4, fro_weight=float(torch.linalg.matrix_norm(w)),
        nuc=nuc, nuc_nf4=nuc_nf4, fro_history=list(history) if history is not None else [fro],
    )

