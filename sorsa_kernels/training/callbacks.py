"""transformers integration: a ``TrainerCallback`` that applies the orthonormal regularizer."""
from __future__ import annotations

from typing import Optional

from transformers import TrainerCallback

from ..nn.knobs import check_gamma_rate, check_knob
from ..nn.regularizer import add_regularizer_grad
from .gradient_release import ReleasedOptimizer

__all__ = ["SORSACallback"]


class SORSACallback(TrainerCallback):
    """Adds ``gamma / lr_max · ∇L_reg`` to the adapters' grads once per optimizer step.

    It runs in ``on_pre_optimizer_step``, which the Trainer calls after gradient clipping
    and before ``optimizer.step()``, so the regularizer's gradient is never clipped.  Under
    gradient release (:func:`~sorsa_kernels.training.gradient_release.enable_gradient_release`)
    each parameter's backward hook adds it, in the same order, and this callback only logs the
    value the hooks summed, and the global gradient norm they saw as ``grad_norm`` (the
    Trainer cannot take it: no gradient is left when it clips).  The
    value of ``L_reg`` is logged as ``orthonormality`` (averaged over the logging window).
    ``lr_max`` defaults to the Trainer's peak learning rate (``args.learning_rate``).

    Example::

        >>> trainer = Trainer(model=model, args=args, train_dataset=ds,
        ...                   callbacks=[SORSACallback(gamma=4e-4)])
    """

    def __init__(self, gamma: float = 4e-4, lr_max: Optional[float] = None) -> None:
        check_knob("gamma", gamma, required=True)
        check_knob("lr_max", lr_max)  # None: the Trainer's learning rate
        if lr_max is not None:
            check_gamma_rate(gamma, lr_max)
        self.gamma = gamma
        self.lr_max = lr_max
        self._sum = None
        self._count = 0
        self._grad_norm = None  # under gradient release: the last step's global gradient norm

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        released = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the Trainer's optimizer
        if isinstance(released, ReleasedOptimizer):  # the backward hooks added the gradient already
            value = released.pop_regularizer_value()
            self._grad_norm = released.pop_grad_norm()
            if value is None:
                return control
        else:
            value = add_regularizer_grad(model, self.gamma, self.lr_max or args.learning_rate)
        self._sum = value.detach() if self._sum is None else self._sum + value.detach()
        self._count += 1
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._grad_norm is not None and "loss" in logs:
            logs["grad_norm"] = float(self._grad_norm)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["grad_norm"] = logs["grad_norm"]
        if logs is not None and self._count:
            value = float(self._sum) / self._count  # one host sync per logging step
            logs["orthonormality"] = value
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["orthonormality"] = value
            self._sum, self._count = None, 0
        return control

    def install(self, trainer) -> "SORSACallback":
        """Put this callback first in ``trainer``'s list, so printers and loggers see ``orthonormality``.

        Example::

            >>> SORSACallback(gamma=4e-4).install(trainer)
        """
        trainer.callback_handler.callbacks.insert(0, self)
        return self
