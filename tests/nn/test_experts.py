"""``SORSAExperts``: per-expert SVD split of a fused 3-D expert weight, merge, regularizer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sorsa_kernels.nn.experts import SORSAExperts
from sorsa_kernels.nn.regularizer import add_regularizer_grad, orthonormal_regularizer
from sorsa_kernels.ops import reference
from tests.conftest import rel_err

COUNTS = torch.tensor([3, 0, 6, 2])


def _per_expert_dense(w, x, counts):
    out, start = [], 0
    for e, c in enumerate(counts.tolist()):
        out.append(x[start:start + c] @ w[e].T)
        start += c
    return torch.cat(out)


@pytest.mark.parametrize("svd", ["full", "randomized"])
def test_init_preserves_every_experts_output(svd):
    torch.manual_seed(0)
    w = torch.randn(4, 20, 14)
    layer = SORSAExperts.from_weight(w, rank=3, svd=svd, alpha=6.0)
    x = torch.randn(int(COUNTS.sum()), 14)
    assert rel_err(layer(x, COUNTS), _per_expert_dense(w, x, COUNTS)) < 1e-5


def test_split_is_each_experts_top_singular_part():
    torch.manual_seed(0)
    w = torch.randn(3, 12, 10)
    layer = SORSAExperts.from_weight(w, rank=4, alpha=8.0)
    for e in range(3):
        s = torch.linalg.svdvals(w[e])[:4]
        assert torch.allclose(layer.S[e] * layer.scale, s, atol=1e-5)
        assert torch.allclose(layer.U[e].T @ layer.U[e], torch.eye(4), atol=1e-5)


def test_merged_weight_is_residual_plus_trained_principal_part():
    torch.manual_seed(0)
    w = torch.randn(5, 9, 11, dtype=torch.float64)
    layer = SORSAExperts.from_weight(w, rank=2, alpha=4.0, expert_chunk=2)
    with torch.no_grad():
        layer.U.add_(0.1 * torch.randn_like(layer.U))
        layer.S.mul_(1.3)
    want = torch.stack([
        layer.residual[e] + layer.scale * (layer.U[e] * layer.S[e]) @ layer.V[e].T for e in range(5)
    ])
    assert rel_err(layer.merged_weight(torch.float64), want) < 1e-6  # computed in float32, as SORSALinear.merge


def test_from_factors_rebuilds_the_residual_bit_for_bit():
    torch.manual_seed(0)
    w = torch.randn(4, 10, 8, dtype=torch.bfloat16)
    layer = SORSAExperts.from_weight(w, rank=3)
    again = SORSAExperts.from_factors(w, *layer.init_factors)
    assert torch.equal(again.residual, layer.residual)
    assert again.residual.dtype == torch.bfloat16


def test_rank_above_expert_size_names_the_layer():
    with pytest.raises(ValueError, match="rank 9 exceeds min.* = 8 for layer model.layers.0.mlp.experts.down_proj"):
        SORSAExperts.from_weight(torch.randn(2, 10, 8), 9, name="model.layers.0.mlp.experts.down_proj")


def test_two_dimensional_weight_rejected():
    with pytest.raises(ValueError, match="3-D stack E×out×in"):
        SORSAExperts.from_weight(torch.randn(10, 8), 2)


def _model():
    torch.manual_seed(0)
    m = nn.Module()
    m.a = SORSAExperts.from_weight(torch.randn(3, 10, 7), rank=2)
    m.b = SORSAExperts.from_weight(torch.randn(2, 6, 9), rank=3)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return m


def _expected_mean(m):
    norms = []
    for layer in (m.a, m.b):
        for stack in (layer.U, layer.V):
            for e in range(stack.shape[0]):  # one matrix per expert
                a = stack[e].detach().double()
                norms.append(torch.linalg.matrix_norm(a.T @ a - torch.eye(a.shape[1], dtype=torch.float64)))
    return torch.stack(norms).mean()


def test_regularizer_counts_experts_one_by_one():
    m = _model()
    assert rel_err(orthonormal_regularizer(m), _expected_mean(m)) < 1e-5


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_regularizer_grad_matches_per_expert_reference(path, backend):
    pytest.importorskip("triton")
    m = _model()
    oracle = []
    for layer in (m.a, m.b):
        for stack in (layer.U, layer.V):
            oracle.extend(stack[e].detach().clone() for e in range(stack.shape[0]))
    value_ref = reference.ortho_value_and_grad_(oracle, 5.0)
    backend(path)
    value = add_regularizer_grad(m, gamma=5.0, lr_max=1.0)
    assert rel_err(value, value_ref) < 1e-5
    got = [g for layer in (m.a, m.b) for stack in (layer.U, layer.V) for g in stack.grad.unbind(0)]
    for g, o in zip(got, oracle):
        assert rel_err(g, o.grad) < 1e-5
    assert m.a.S.grad is None


# --------------------------------------------------------------------------- routed forward
def _qwen3_moe_experts(dtype=torch.float64, quantize=None):
    transformers = pytest.importorskip("transformers")
    from sorsa_kernels.adapters.experts import adapt_experts

    cfg = transformers.Qwen3MoeConfig(hidden_size=12, moe_intermediate_size=10, num_experts=5, num_experts_per_tok=2,
                                      intermediate_size=20, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=6, vocab_size=16)
    torch.manual_seed(0)
    block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg).to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    adapt_experts(block.experts, 3, name="experts", alpha=6.0, quantize=quantize)
    with torch.no_grad():
        for p in block.experts.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return block.experts


def _routing_inputs(tokens=9, E=5, k=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    idx[idx == 3] = 1  # expert 3 gets no rows
    return torch.randn(tokens, 12, generator=g, dtype=dtype), idx, torch.rand(tokens, k, generator=g, dtype=dtype)


def _grads_of(fn, experts, hidden, idx, w, dy):
    leaves = [hidden.clone().requires_grad_(), w.clone().requires_grad_()]
    out = fn(leaves[0], idx, leaves[1])
    params = [p for p in experts.parameters() if p.requires_grad]
    return (out.detach(), *torch.autograd.grad(out, leaves + params, dy))


def test_routed_experts_forward_equals_the_grouping_forward_with_every_gradient():
    # The fused routing (gather, weights, scatter in the op) against the surgery's grouping
    # forward (gathered copy, bincount, weight multiply and inverse permutation in PyTorch).
    from sorsa_kernels.nn.experts import routed_experts_forward

    experts = _qwen3_moe_experts()
    hidden, idx, w = _routing_inputs()
    dy = torch.randn(hidden.shape, dtype=hidden.dtype)
    want = _grads_of(experts, experts, hidden, idx, w, dy)
    got = _grads_of(lambda h, i, ww: routed_experts_forward(experts.gate_up_proj, experts.down_proj, h, i, ww,
                                                            experts._apply_gate), experts, hidden, idx, w, dy)
    for a, e in zip(got, want):  # y, d hidden, d routing weights, dU, dS, dV of both projections
        assert rel_err(a, e) < 1e-12


class _Routed(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, hidden, idx, w):
        from sorsa_kernels.nn.experts import routed_experts_forward

        e = self.experts
        return routed_experts_forward(e.gate_up_proj, e.down_proj, hidden, idx, w, e._apply_gate)


def test_experts_compile_to_one_graph_without_breaks():
    layer = SORSAExperts.from_weight(torch.randn(4, 20, 14), rank=3)
    explained = torch._dynamo.explain(layer)(torch.randn(11, 14), COUNTS)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_routed_experts_forward_compiles_to_one_graph_without_breaks():
    experts = _qwen3_moe_experts(torch.float32)
    hidden, idx, w = _routing_inputs(dtype=torch.float32)
    explained = torch._dynamo.explain(_Routed(experts))(hidden, idx, w)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_routed_experts_forward_with_a_post_expert_norm_equals_the_grouping_forward():
    # A norm between the experts and the routing multiply keeps down's rows grouped, then
    # weights and adds them into their tokens.
    from sorsa_kernels.nn.experts import routed_experts_forward

    experts = _qwen3_moe_experts()
    experts.has_post_expert_norm = True
    experts.post_expert_norm = nn.LayerNorm(12, dtype=torch.float64)
    hidden, idx, w = _routing_inputs()
    dy = torch.randn(hidden.shape, dtype=hidden.dtype)
    want = _grads_of(experts, experts, hidden, idx, w, dy)
    got = _grads_of(lambda h, i, ww: routed_experts_forward(experts.gate_up_proj, experts.down_proj, h, i, ww,
                                                            experts._apply_gate, experts.post_expert_norm),
                    experts, hidden, idx, w, dy)
    for a, e in zip(got, want):
        assert rel_err(a, e) < 1e-12


@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["dense", "nf4"])
def test_routed_experts_forward_compiles_fullgraph_with_the_eager_gradients(quantize):
    # fullgraph through AOTAutograd: the custom ops' fake kernels and autograd formulas (forward
    # and backward graphs) give the eager values.
    experts = _qwen3_moe_experts(torch.float32, quantize)
    hidden, idx, w = _routing_inputs(dtype=torch.float32)
    dy = torch.randn(hidden.shape)
    module = _Routed(experts)
    want = _grads_of(module, experts, hidden, idx, w, dy)
    got = _grads_of(torch.compile(module, backend="aot_eager", fullgraph=True), experts, hidden, idx, w, dy)
    for a, e in zip(got, want):
        assert rel_err(a, e) < 1e-6
