"""The layer implementations the suite compares, each built from the same frozen ``nn.Linear``.

=================  ==========================================================================
provider           what runs
=================  ==========================================================================
frozen             the frozen ``nn.Linear`` itself: the floor every adapter is measured against
sorsa_fused        ``SORSALinear`` with ``SORSA_KERNELS_BACKEND=triton`` (CUDA only)
sorsa_reference    ``SORSALinear`` with ``SORSA_KERNELS_BACKEND=reference`` (plain PyTorch)
lora               PEFT ``LoraConfig``/``get_peft_model`` on a module holding the linear
qlora              bitsandbytes ``Linear4bit`` (NF4, double quantization) + PEFT LoRA (CUDA only)
dense              the SORSA authors' formulation: ``y = x·(Wr + U·diag(S)·Vᵀ)ᵀ`` with the dense
                   weight rebuilt every call, autograd end to end
qsorsa             ``sorsa_kernels.nn.qlinear.QSORSALinear.from_linear(linear, rank)``
=================  ==========================================================================

Each library is used with its defaults (PEFT keeps LoRA factors in float32 on a bf16 base,
SORSA keeps U, S, V in float32), because that is what users get; ``adapter_dtype`` is
recorded with every figure.  LoRA layers are timed directly (the ``lora.Linear`` inside the
``PeftModel``), not through the ``PeftModel`` wrapper, so that the wrapper's per-call
Python work does not count against a single layer.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import harness

PROVIDERS = ("frozen", "sorsa_fused", "sorsa_reference", "lora", "qlora", "dense", "qsorsa")
#: Providers trained with the orthonormal regularizer in the "step" mode.
SORSA_FAMILY = ("sorsa_fused", "sorsa_reference", "dense", "qsorsa")
#: The paper's regularizer coefficient and the learning rate of the benchmark's AdamW.
GAMMA = 4e-4
LR = 3e-5


class Unavailable(Exception):
    """The provider cannot run on this machine; the message says why (becomes a skip)."""


@dataclass
class Built:
    """A provider's layer, ready to time."""

    module: nn.Module
    trainable: list[nn.Parameter]
    #: Adds the regularizer's gradient (called after backward, before the optimizer step).
    regularize: Optional[Callable[[], object]] = None
    #: ``SORSA_KERNELS_BACKEND`` to set while it runs (None: leave it alone).
    backend: Optional[str] = None
    #: What the module holds that is not an activation (excluded from saved bytes).
    state: list[Tensor] = field(default_factory=list)

    @property
    def adapter_dtype(self) -> Optional[torch.dtype]:
        return self.trainable[0].dtype if self.trainable else None


def base_linear(n: int, m: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Linear:
    """A frozen ``nn.Linear(n, m, bias=False)`` (Llama projections have no bias), seeded weights."""
    gen = torch.Generator(device=device).manual_seed(seed)
    lin = nn.Linear(n, m, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, n, device=device, generator=gen) / math.sqrt(n))
    lin.weight.requires_grad_(False)
    return lin


class AuthorsDenseSORSA(nn.Module):
    """The SORSA authors' formulation: ``y = x·(Wr + scale·U·diag(S)·Vᵀ)ᵀ + b``.

    The dense m×n weight is rebuilt from the factors at every call and autograd
    differentiates through it (so backward forms an m×n gradient and saves the dense
    weight).  The product is computed in the input's dtype, the cheapest choice for this
    formulation.  Shares its tensors with the :class:`SORSALinear` it is built from.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.residual = layer.residual
        self.U, self.S, self.V = layer.U, layer.S, layer.V
        self.bias = layer.bias
        self.scale = float(layer.scale)

    def forward(self, x: Tensor) -> Tensor:
        cd = x.dtype
        w = self.residual.to(cd) + (self.U.to(cd) * (self.S.to(cd) * self.scale)) @ self.V.to(cd).T
        return F.linear(x, w, None if self.bias is None else self.bias.to(cd))


class _Holder(nn.Module):
    """A module holding one linear layer, for PEFT to adapt."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def to_linear4bit(lin: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` (NF4, double quantization) holding ``lin``'s weight, on its device."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(
        lin.in_features, lin.out_features, bias=lin.bias is not None,
        compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4", device="meta",
    )
    q.weight = bnb.nn.Params4bit(
        lin.weight.detach().clone(), requires_grad=False, quant_type="nf4", compress_statistics=True, module=q,
    )
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return q.to(lin.weight.device)  # quantizes


def lora_config(rank: int, target_modules: list[str]):
    """The PEFT LoRA configuration used everywhere in the suite (dropout 0, alpha = rank)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=target_modules, bias="none")


def _require_cuda(provider: str, why: str) -> None:
    if not harness.ON_CUDA:
        raise Unavailable(f"{provider} needs a CUDA GPU ({why}); this machine has none")


def require_module(provider: str, module: str, why: str) -> None:
    """Raise :class:`Unavailable` naming ``module`` when it does not import here.

    Any exception of the import counts (bitsandbytes, for one, raises RuntimeError when
    its native library does not load), so a machine without the library skips the
    provider with the reason instead of failing the run.
    """
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure to import makes the provider unavailable
        raise Unavailable(f"{provider} needs {module} ({why}), which does not import here: "
                          f"{type(exc).__name__}: {exc}") from exc


def _import_qsorsa():
    require_module("qsorsa", "bitsandbytes", "NF4 quantization of the residual")
    try:
        from sorsa_kernels.nn.qlinear import QSORSALinear
    except ImportError as exc:
        raise Unavailable(f"qsorsa: sorsa_kernels.nn.qlinear.QSORSALinear does not import ({exc})") from exc
    return QSORSALinear


def check_available(provider: str) -> None:
    """Raise :class:`Unavailable` with the reason when ``provider`` cannot run here."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
    if provider == "sorsa_fused":
        _require_cuda(provider, "the Triton kernels run on CPU only in the interpreter, which is no benchmark")
        try:
            import sorsa_kernels.kernels.sorsa_linear  # noqa: F401
        except ImportError as exc:
            raise Unavailable(f"sorsa_fused: sorsa_kernels.kernels.sorsa_linear does not import ({exc})") from exc
    elif provider in ("lora", "qlora"):
        require_module(provider, "peft", "LoRA layers")
        if provider == "qlora":
            _require_cuda(provider, "bitsandbytes 4-bit training runs on the GPU")
            require_module(provider, "bitsandbytes", "NF4 Linear4bit")
    elif provider == "qsorsa":
        _import_qsorsa()


def _sorsa_layer(lin: nn.Linear, rank: int) -> nn.Module:
    from sorsa_kernels import SORSALinear

    # Randomized SVD only to build faster; it does not change what is timed.
    return SORSALinear.from_linear(lin, rank, svd="randomized", residual_dtype=lin.weight.dtype)


def _sorsa_regularizer(module: nn.Module) -> Callable[[], object]:
    from sorsa_kernels import add_regularizer_grad

    return lambda: add_regularizer_grad(module, gamma=GAMMA, lr_max=LR)


def build(provider: str, lin: nn.Linear, rank: int) -> Built:
    """Build ``provider``'s layer from the frozen ``lin`` (left untouched) at ``rank``.

    Raises :class:`Unavailable` when the provider cannot run here.
    """
    check_available(provider)
    if provider == "frozen":
        return Built(lin, [], state=harness.model_state(lin))
    if provider in ("sorsa_fused", "sorsa_reference"):
        layer = _sorsa_layer(lin, rank)
        backend = "triton" if provider == "sorsa_fused" else "reference"
        return Built(layer, [layer.U, layer.S, layer.V], _sorsa_regularizer(layer), backend, harness.model_state(layer))
    if provider == "dense":
        from sorsa_kernels.ops.regularizer import ortho_value

        dense = AuthorsDenseSORSA(_sorsa_layer(lin, rank))
        coeff = GAMMA / LR

        def regularize() -> Tensor:  # the authors compute the regularizer with autograd
            value = ortho_value([dense.U, dense.V])
            (coeff * value).backward()
            return value.detach()

        return Built(dense, [dense.U, dense.S, dense.V], regularize, None, harness.model_state(dense))
    if provider in ("lora", "qlora"):
        from peft import get_peft_model

        inner = lin if provider == "lora" else to_linear4bit(lin, lin.weight.dtype)
        holder = _Holder(inner)
        if provider == "qlora":
            holder.is_loaded_in_4bit = True  # how PEFT recognizes a bitsandbytes 4-bit model
        peft_model = get_peft_model(holder, lora_config(rank, ["proj"]))
        layer = peft_model.base_model.model.proj
        trainable = [p for p in layer.parameters() if p.requires_grad]
        return Built(layer, trainable, None, None, harness.model_state(layer))
    if provider == "qsorsa":
        QSORSALinear = _import_qsorsa()
        try:
            # Randomized SVD and no quantization report only to build faster; neither changes what is timed.
            layer = QSORSALinear.from_linear(lin, rank, svd="randomized", quant_report=None)
        except NotImplementedError as exc:
            raise Unavailable(f"qsorsa: QSORSALinear.from_linear is not implemented here ({exc})") from exc
        except ImportError as exc:  # a library it imports lazily is missing
            raise Unavailable(f"qsorsa: QSORSALinear.from_linear needs a library missing here ({exc})") from exc
        trainable = [p for p in layer.parameters() if p.requires_grad]
        return Built(layer, trainable, _sorsa_regularizer(layer), "auto", harness.model_state(layer))
    raise AssertionError(provider)  # check_available rejected unknown names
