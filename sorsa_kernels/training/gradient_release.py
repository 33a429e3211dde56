"""Gradient release: each trainable parameter steps in its own backward hook, so at most one
parameter's gradient exists at a time instead of the whole model's.

:func:`enable_gradient_release` gives every trainable parameter its own optimizer and a
``register_post_accumulate_grad_hook`` that, as soon as backward has written the parameter's
gradient: clips it to ``max_grad_norm`` (its own norm), adds the orthonormal regularizer's
gradient (U and V only; it depends on the matrix alone), steps, and frees the gradient.  The
paper's order holds per parameter: the regularizer's gradient is added after clipping and
before the step, and never clipped.

What cannot hold: **gradient accumulation** (each backward steps; the job sets it to 1) and
**global-norm clipping** (no step sees all gradients; clipping is per parameter, or off with
``max_grad_norm=0``).  FSDP2 is refused: its hooks fire on the unsharded parameter before the
reduce-scatter, not on the sharded gradient an optimizer must step.

The regularizer is applied per matrix: ``coeff·nᵢ/N·∇(mean of that matrix's terms)``, where N
counts every adapter matrix of the model (a stack of E experts counts E), so the sum over the
hooks is exactly the grouped ``add_regularizer_grad``.  On CUDA that is 3 Triton launches per
U or V (per layer: 6) against 3 for the whole model in the grouped kernel; on CPU (reference
path) the work is the same loop either way.

The optimizer handed to a ``Trainer`` (or your loop) is a :class:`ReleasedOptimizer`: its
``param_groups`` carry the learning rate a scheduler sets (each hook copies it into its
parameter's optimizer), ``step()`` does nothing (the hooks already stepped), and its
``state_dict`` holds every parameter's optimizer state for checkpoints.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..nn.knobs import NON_NEGATIVE, check_gamma_rate, check_knob

__all__ = ["ReleasedOptimizer", "enable_gradient_release", "GRADIENT_RELEASE_NOTE"]

#: The one line a job prints when the lever is on.
GRADIENT_RELEASE_NOTE = ("gradient release: each adapter steps in its backward hook; gradient accumulation is 1 "
                         "and clipping is per parameter (a global norm cannot be taken)")

OptimizerFactory = Callable[[Sequence[Tensor]], torch.optim.Optimizer]


class ReleasedOptimizer(torch.optim.Optimizer):
    """The optimizer a scheduler and a Trainer see under gradient release (module docstring).

    Example::

        >>> opt = enable_gradient_release(model, lambda ps: torch.optim.AdamW(ps, lr=3e-5), gamma=4e-4, lr_max=3e-5)
        >>> loss.backward()          # every adapter has stepped
        >>> opt.step(); opt.zero_grad()  # nothing left to do
    """

    def __init__(self, params: list[Tensor], per_param: dict[int, torch.optim.Optimizer], lr: float) -> None:
        super().__init__(params, {"lr": lr})
        self.per_param = per_param
        self.handles: list = []
        self._value: Optional[Tensor] = None  # regularizer value summed over this step's hooks
        self._grad_sq: Optional[Tensor] = None  # squared gradient norms (before clipping) summed likewise

    @torch.no_grad()
    def step(self, closure=None):  # the hooks stepped each parameter during backward
        return closure() if closure is not None else None

    def pop_regularizer_value(self) -> Optional[Tensor]:
        """``L_reg`` accumulated by the hooks since the last call (None if no hook added it)."""
        value, self._value = self._value, None
        return value

    def pop_grad_norm(self) -> Optional[Tensor]:
        """The global norm of the gradients the hooks saw since the last call, before clipping and
        without the regularizer's part (what a Trainer logs as ``grad_norm``), or None."""
        sq, self._grad_sq = self._grad_sq, None
        return None if sq is None else sq.sqrt()

    def state_dict(self) -> dict:
        return {"per_param": [opt.state_dict() for opt in self.per_param.values()],
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict["per_param"]
        if len(states) != len(self.per_param):
            raise ValueError(f"the checkpoint holds {len(states)} per-parameter optimizers, this model "
                             f"{len(self.per_param)}; resume with the same targets and rank")
        for opt, s in zip(self.per_param.values(), states):
            opt.load_state_dict(s)
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)

    def remove(self) -> None:
        """Remove the hooks: the model trains with an ordinary optimizer again."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def enable_gradient_release(model: nn.Module, optimizer_factory: OptimizerFactory, gamma: float = 4e-4,
                            lr_max: float = 3e-5, *, max_grad_norm: float = 0.0) -> ReleasedOptimizer:
    """Step every trainable parameter of ``model`` in its post-accumulate-grad hook.

    Args:
        optimizer_factory: builds one parameter's optimizer from ``[p]`` (e.g.
            ``lambda ps: optimizer_for_params(ps, "adamw8bit", lr)``); its learning rate is
            overwritten each step by the returned optimizer's (what a scheduler sets).
        gamma, lr_max: the regularizer's strength; its gradient ``gamma/lr_max·∇L_reg`` is added
            to U and V (``gamma=0``: none).
        max_grad_norm: clip each parameter's gradient to this norm before the regularizer is
            added (0: no clipping).

    Returns the :class:`ReleasedOptimizer` to hand to a scheduler or ``Trainer``.  Refused on an
    FSDP2-sharded model.

    Example::

        >>> opt = enable_gradient_release(model, lambda ps: torch.optim.AdamW(ps, lr=3e-5), gamma=4e-4, lr_max=3e-5)
    """
    from ..dtensor import is_sharded

    check_knob("gamma", gamma, required=True)
    check_knob("lr_max", lr_max, required=True)
    NON_NEGATIVE.check(max_grad_norm, "max_grad_norm")  # a training option: not one of the layers' KNOBS
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; call sorsa_kernels.apply_sorsa first")
    if any(is_sharded(p) for p in params):
        raise ValueError("gradient release cannot run on an FSDP2-sharded model (its hooks see unsharded "
                         "gradients before the reduce-scatter); drop --gradient-release or --fsdp")
    matrices = {id(a): a for a in _regularized(model)} if gamma > 0 else {}
    if matrices:
        check_gamma_rate(gamma, lr_max, next(iter(matrices.values())).dtype)
    total = sum(_count(a) for a in matrices.values())
    per_param = {id(p): optimizer_factory([p]) for p in params}  # keyed by id: a Tensor's == is elementwise
    released = ReleasedOptimizer(params, per_param, lr=per_param[id(params[0])].param_groups[0]["lr"])

    def hook(p: Tensor) -> None:
        if max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_([p], max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(p.grad)
        sq = norm.detach().float().square()
        released._grad_sq = sq if released._grad_sq is None else released._grad_sq + sq
        if id(p) in matrices:
            from ..ops.regularizer import ortho_value_and_grad_

            value = ortho_value_and_grad_([p], gamma / lr_max * _count(p) / total) * (_count(p) / total)
            released._value = value.detach() if released._value is None else released._value + value.detach()
        opt = per_param[id(p)]
        opt.param_groups[0]["lr"] = released.param_groups[0]["lr"]
        opt.step()
        opt.zero_grad(set_to_none=True)

    released.handles = [p.register_post_accumulate_grad_hook(hook) for p in params]
    return released


def _regularized(model: nn.Module) -> list[Tensor]:
    from ..nn.experts import SORSAExperts
    from ..nn.linear import SORSALinear

    return [t for m in model.modules() if isinstance(m, (SORSALinear, SORSAExperts)) for t in (m.U, m.V)
            if t.requires_grad]


def _count(a: Tensor) -> int:
    """Matrices in ``a``: 1, or E for a stack of experts."""
    return 1 if a.dim() == 2 else a.shape[0]
