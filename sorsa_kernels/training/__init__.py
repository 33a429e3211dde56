"""Training with SORSA: the Trainer callbacks, data, and the memory levers.

The levers' Python API (each loaded on first use, PEP 562): :func:`make_optimizer` (``--optim``:
fp32 or 8-bit AdamW; bf16 adapters stochastically rounded), :func:`enable_gradient_release`
(``--gradient-release``) and :func:`chunked_causal_lm_loss` (``--loss-chunk-size``).
"""
_EXPORTS = {
    "make_optimizer": ".optim",
    "OPTIMIZERS": ".optim",
    "enable_gradient_release": ".gradient_release",
    "ReleasedOptimizer": ".gradient_release",
    "chunked_causal_lm_loss": ".loss",
    "ChunkedLossTrainer": ".loss",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sorsa_kernels.training' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
