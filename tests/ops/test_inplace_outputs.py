"""Op outputs are safe to modify in place: ``y = layer(x); y += r`` backpropagates.

Models do this (Falcon: ``mlp_output += attention_output``).  Each backend (eager reference,
the Triton custom op under the interpreter, QSORSA on both paths, the dropout path) must give
the same gradients for ``y += r`` as for ``y = y + r``.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sorsa_kernels import QSORSALinear, SORSALinear
from sorsa_kernels.nn import make_sorsa_linear
from tests.conftest import rel_err

pytest.importorskip("triton")

SHAPES = [pytest.param((7, 40), id="2d"), pytest.param((2, 5, 40), id="3d")]


def _grads(layer, x, r, inplace: bool):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    if inplace:
        y += r
    else:
        y = y + r
    (y * y).sum().backward()
    out = [x.grad.clone()] + [p.grad.clone() for p in (layer.U, layer.S, layer.V)]
    layer.zero_grad(set_to_none=True)
    return out


def _check(layer, shape):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g)
    r = torch.randn(*shape[:-1], layer.U.shape[0], generator=g)
    want = _grads(layer, x, r, inplace=False)
    got = _grads(layer, x, r, inplace=True)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-6


def _dense(dropout: float = 0.0):
    torch.manual_seed(0)
    return SORSALinear.from_linear(nn.Linear(40, 24), 4, dropout=dropout)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["reference", "triton"])
def test_inplace_add_on_output_matches_out_of_place(backend, name, shape):
    backend(name)
    _check(_dense(), shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_inplace_add_on_dropout_path_output_matches_out_of_place(backend, shape):
    backend("reference")
    layer = _dense(dropout=0.1).train()
    # the same dropout mask for both runs
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g)
    r = torch.randn(*shape[:-1], 24, generator=g)
    torch.manual_seed(5)
    want = _grads(layer, x, r, inplace=False)
    torch.manual_seed(5)
    got = _grads(layer, x, r, inplace=True)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["reference", "triton"])
def test_inplace_add_on_qsorsa_output_matches_out_of_place(backend, name, shape):
    pytest.importorskip("bitsandbytes")
    backend(name)
    torch.manual_seed(0)
    layer = make_sorsa_linear(nn.Linear(40, 24), 4, quantize="nf4")
    assert isinstance(layer, QSORSALinear)
    _check(layer, shape)
