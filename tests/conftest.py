import copy
import os

import pytest
import torch
import transformers

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before any
# kernel module is imported.  Without a GPU the kernels can only run in the interpreter;
# the default backend ("auto") still sends CPU tensors to the reference path.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _user_cache_in_tmp(request, monkeypatch, tmp_path_factory):
    """Every test but the real tier's gets an empty user cache of its own (the pretrained embedded
    model, converted GGUF files), so no test reads what another wrote or writes to ~/.cache."""
    if "real" not in request.node.keywords:
        monkeypatch.setenv("SORSA_KERNELS_CACHE", str(tmp_path_factory.mktemp("cache")))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ computed in float64."""
    a = a.detach().double()
    b = b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture
def backend(monkeypatch):
    """Set SORSA_KERNELS_BACKEND for one test: ``backend("triton")``."""

    def _set(name: str) -> None:
        monkeypatch.setenv("SORSA_KERNELS_BACKEND", name)
        if name == "triton" and not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")

    return _set


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def k_sequential_dot(monkeypatch):
    """Make the interpreter's ``tl.dot`` add the k products one at a time, in k order.

    The interpreter computes ``tl.dot`` with ``numpy.matmul``, whose per-element summation
    order depends on the tile's row and column counts (OpenBLAS picks kernels by size).  On
    a GPU each output element of an MMA chain is accumulated along k in a fixed order,
    whatever the tile shape.  Bitwise-determinism tests patch the interpreter with this
    k-sequential dot so that they test the kernels' reduction structure (split boundaries,
    steps), not OpenBLAS.
    """
    import numpy as np
    from triton.runtime import interpreter

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        out = d.data.copy()
        av = a.data.astype(out.dtype)
        bv = b.data.astype(out.dtype)
        for k in range(av.shape[-1]):
            out += av[..., :, k:k + 1] * bv[..., k:k + 1, :]
        return interpreter.TensorHandle(out, d.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    return np


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a fine-tuning job loads a model (the checks must come first); the
    calls made are listed in the returned list."""
    from sorsa_kernels.jobs.finetune import training

    calls = []
    monkeypatch.setattr(training, "load_base", lambda *a, **k: calls.append(a) or pytest.fail("model loaded"))
    return calls


# Tiny models and training helpers shared by the model-facing tests (adapters, jobs, training, real).
def build_tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_llama():
    return build_tiny_llama()


@pytest.fixture
def token_ids():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 128, (2, 16), generator=g)


def train_steps(model, ids, steps=3, lr=1e-2):
    """A few real AdamW steps with the regularizer, so the factors move."""
    from sorsa_kernels import add_regularizer_grad

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        add_regularizer_grad(model, 4e-4, lr)
        opt.step()
        opt.zero_grad()
    return model.eval()


def fresh_copy(model):
    return copy.deepcopy(model)
