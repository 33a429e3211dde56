"""The optimizer of a SORSA run: AdamW in fp32 or 8-bit state, and bf16 adapters updated without bias.

:func:`make_optimizer` builds the optimizer ``--optim`` names for a model's trainable
parameters:

* ``adamw``: ``torch.optim.AdamW`` (fp32 state, 8 bytes per parameter).
* ``adamw8bit`` / ``paged_adamw8bit``: bitsandbytes' blockwise 8-bit AdamW (bitsandbytes ≥ 0.50
  runs it on CPU too; paged falls back to non-paged there, with bitsandbytes' own warning).
  bitsandbytes keeps fp32 state for tensors under ``min_8bit_size`` (4096 elements by default),
  which would cover every U and V of a small model; here every trainable matrix gets 8-bit
  state whatever its size, and SORSA's ``S`` and every vector (bias, norm) keep fp32 state:
  ``S`` is r numbers per layer (E·r for experts), so its state costs nothing, and it carries the
  singular values, the factor a quantized moment would disturb most.  Memory of the 8-bit state
  (what the plan counts): 2 bytes per element, plus an fp32 absmax per 256-element block for each
  moment (8 bytes per 256 elements), plus two 256-entry fp32 quantile maps per tensor (2 KiB).

**bf16 adapters** (``--adapter-dtype bfloat16``).  Stored bf16, U, S and V cannot take the
small steps training makes: bf16 keeps 8 significant bits, so an update below half an ulp
(relative 2⁻⁹ ≈ 0.2 %: an AdamW step of 3e-5 on an entry of 0.05, or any step on an S of
σ ≈ 5) rounds to nothing and training stalls.  The optimizer therefore steps each bf16
parameter in fp32 and writes the result back with **stochastic rounding** (round up with
probability equal to the remainder's fraction of an ulp), so ``E[p_bf16] = p_fp32`` and small
updates accumulate in expectation.  Chosen over an fp32 master copy, which would keep 4 more
bytes per parameter for the whole run (more than bf16 saves), and over fp32 ``S`` alone, which
leaves U and V stalled.  Costs: the optimizer state is fp32 (or 8-bit) as for fp32 adapters,
and during ``step()`` a transient fp32 copy of each bf16 parameter and its gradient (8 bytes per
parameter, all adapters at once; one parameter at a time under gradient release).
The rounding draws from the optimizer's own generator, seeded by (seed, step, parameter), never
the global RNG, so a run resumed from a checkpoint rounds as the uninterrupted one did.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

__all__ = ["OPTIMIZERS", "make_optimizer", "optimizer_for_params", "stochastic_round_", "adapter_scales"]

#: ``--optim`` values.
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
#: bitsandbytes' block of 8-bit optimizer state (one fp32 absmax per block and moment).
BNB_BLOCK = 256


def adapter_scales(model: nn.Module) -> set[int]:
    """``id`` of every SORSA ``S`` (singular values) in ``model``: their optimizer state stays fp32."""
    from ..nn.experts import SORSAExperts
    from ..nn.linear import SORSALinear

    return {id(m.S) for m in model.modules() if isinstance(m, (SORSALinear, SORSAExperts))}


def make_optimizer(model: nn.Module, name: str = "adamw", lr: float = 1e-3, *, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                   seed: int = 0) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) over ``model``'s trainable parameters.

    8-bit state for every trainable matrix, fp32 state for SORSA's ``S`` and every vector;
    bf16 parameters are stepped in fp32 and stochastically rounded back (module docstring).
    ``weight_decay`` applies to every trainable parameter (as the Trainer does for U, S, V).

    Example::

        >>> opt = make_optimizer(model, "adamw8bit", lr=3e-5)
        >>> loss.backward(); add_regularizer_grad(model); opt.step(); opt.zero_grad()
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; call sorsa_kernels.apply_sorsa first")
    return optimizer_for_params(params, name, lr, weight_decay=weight_decay, betas=betas, eps=eps,
                                fp32_state=adapter_scales(model), seed=seed)


def optimizer_for_params(params: Iterable[Tensor], name: str, lr: float, *, weight_decay: float = 0.0,
                         betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                         fp32_state: Optional[set[int]] = None, seed: int = 0) -> torch.optim.Optimizer:
    """:func:`make_optimizer` for a list of parameters; ``fp32_state`` holds the ``id`` of those
    whose 8-bit optimizer keeps fp32 state besides vectors (SORSA's ``S``)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not known; allowed: {', '.join(OPTIMIZERS)}")
    params = list(params)
    kw = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        opt = torch.optim.AdamW(params, **kw)
    else:
        fp32_state = fp32_state or set()
        wide = [p for p in params if p.dim() < 2 or id(p) in fp32_state]
        narrow = [p for p in params if not (p.dim() < 2 or id(p) in fp32_state)]
        groups = [g for g in ({"params": narrow}, {"params": wide, "optim_bits": 32}) if g["params"]]
        cls = _adapter_8bit_class(paged=name == "paged_adamw8bit")
        opt = cls(groups, min_8bit_size=0, **kw)
    if any(p.dtype == torch.bfloat16 for p in params):
        _StochasticRounding(opt, seed)
    return opt


_CLASSES: dict[bool, type] = {}


def _adapter_8bit_class(paged: bool) -> type:
    """bitsandbytes' (paged) AdamW8bit reading ``optim_bits`` per param group: its own ``get_config``
    takes one setting for the whole optimizer (or a process-wide override keyed by ``id``)."""
    if paged not in _CLASSES:
        import bitsandbytes as bnb

        base = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit

        def get_config(self, gindex, pindex, group):
            config = base.get_config(self, gindex, pindex, group)
            if "optim_bits" in group:
                config["optim_bits"] = group["optim_bits"]
            return config

        _CLASSES[paged] = type(f"Adapter{base.__name__}", (base,), {"get_config": get_config})
    return _CLASSES[paged]


def stochastic_round_(dst: Tensor, src: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Write fp32 ``src`` into bf16 ``dst`` rounding stochastically: up with probability equal to the
    dropped low 16 bits' fraction of a bf16 ulp, so ``E[dst] = src``.  Returns ``dst``.

    Example::

        >>> stochastic_round_(torch.empty(3, dtype=torch.bfloat16), torch.tensor([1.0, 1 + 2**-10, 3.0]))
    """
    bits = src.detach().float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded = torch.where(torch.isfinite(src), (bits + noise) & -65536, bits)  # clear the low 16 bits
    dst.copy_(rounded.view(torch.float32))  # exact: a float32 with 16 zero low bits is a bf16
    return dst


class _StochasticRounding:
    """Step hooks on an optimizer: bf16 parameters (and grads) are fp32 during ``step()``, then
    stochastically rounded back (module docstring).  The optimizer's state is keyed by the
    same ``Parameter`` objects, so it is created in fp32 on the first step."""

    def __init__(self, optimizer: torch.optim.Optimizer, seed: int) -> None:
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}
        self.stepping: list[tuple[Tensor, Tensor]] = []
        optimizer.register_step_pre_hook(self.widen)
        optimizer.register_step_post_hook(self.round)
        # loading a checkpoint casts floating state to its parameter's dtype: keep it fp32
        optimizer.register_load_state_dict_pre_hook(self.widen_for_load)
        optimizer.register_load_state_dict_post_hook(self.narrow_after_load)
        self.loading: list[tuple[Tensor, Tensor]] = []

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    def widen(self, optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.dtype != torch.bfloat16 or p.grad is None:
                    continue
                stored, grad = p.data, p.grad
                p.grad = None
                p.data = stored.float()
                p.grad = grad.float()
                self.stepping.append((p, stored))
                state = optimizer.state.get(p, {})
                for key, value in state.items():  # bitsandbytes' load casts fp32 state to the parameter's dtype
                    if torch.is_tensor(value) and value.dtype == torch.bfloat16:
                        state[key] = value.float()

    def widen_for_load(self, optimizer, state_dict) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.dtype == torch.bfloat16:
                    self.loading.append((p, p.data))
                    p.data = p.data.float()

    def narrow_after_load(self, optimizer) -> None:
        for p, stored in self.loading:
            p.data = stored
        self.loading.clear()

    def round(self, optimizer, args, kwargs) -> None:
        for i, (p, stored) in enumerate(self.stepping):
            # the noise is a function of (seed, step, parameter): a resumed run draws what the uninterrupted
            # one drew.  The step counter is a CPU tensor (torch) or an int (bitsandbytes): no device sync.
            step = int(optimizer.state[p].get("step", 0))
            generator = self.generator(stored.device).manual_seed(hash((self.seed, step, i)) & (2 ** 63 - 1))
            stochastic_round_(stored, p.data, generator)
            grad, p.grad = p.grad, None
            p.data = stored
            p.grad = grad.to(torch.bfloat16)
        self.stepping.clear()
