"""Issue 28 item 3, chunked cross-entropy: the loss over sequence chunks equals transformers' causal
LM loss (value and gradients) and never creates the batch × sequence × vocabulary fp32 logits."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.loss.loss_utils import ForCausalLMLoss

from sorsa_kernels.training.loss import ChunkedLossTrainer, chunked_causal_lm_loss, hidden_states_only

B, T, H, V = 2, 11, 16, 50


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    head = nn.Linear(H, V, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g) * 0.3)
        head.bias.copy_(torch.randn(V, generator=g) * 0.1)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100  # a masked prompt
    labels[1, 7:] = -100  # padding
    return hidden, head, labels


def _grads(loss, hidden, head):
    return torch.autograd.grad(loss, [hidden, head.weight, head.bias])


@pytest.mark.parametrize("chunk", [1, 3, 4, 11, 0, 64])  # 3 and 4 divide no sequence of 11
@pytest.mark.parametrize("num_items", [None, 9])
def test_chunked_loss_and_gradients_equal_the_unchunked_loss_with_masking(chunk, num_items):
    hidden, head, labels = _case()
    expected = ForCausalLMLoss(head(hidden), labels, V, num_items_in_batch=num_items)
    got = chunked_causal_lm_loss(hidden, head, labels, chunk, num_items_in_batch=num_items)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for g, e in zip(_grads(got, hidden, head), _grads(expected, hidden, head)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


class _LargestLogits(TorchDispatchMode):
    """The largest fp32 tensor with a vocabulary-sized last dimension that any op allocates (views,
    such as the head's weight expanded for a batched matmul, allocate nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
                    and t.dtype == torch.float32 and t.dim() and t.shape[-1] == V):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_loss_never_creates_the_full_fp32_logits_in_forward_or_backward():
    hidden, head, labels = _case(1)
    head.requires_grad_(False)  # as in SORSA: the output head is frozen
    with _LargestLogits() as full:
        ForCausalLMLoss(head(hidden), labels, V).backward()
    assert full.largest >= B * T * V  # the tracker sees the unchunked loss's logits
    with _LargestLogits() as chunked:
        chunked_causal_lm_loss(hidden, head, labels, 4).backward()
    assert chunked.largest <= B * 4 * V


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def test_trainer_loss_with_chunks_equals_the_models_own_loss(tmp_path):
    from transformers import TrainingArguments

    model = _tiny_llama()
    _, _, labels = _case(2)
    inputs = {"input_ids": torch.randint(0, V, (B, T)), "attention_mask": torch.ones(B, T, dtype=torch.long),
              "labels": labels}
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = ChunkedLossTrainer(model=model, args=args, loss_chunk_size=4)
    got = trainer.compute_loss(model, dict(inputs))
    torch.testing.assert_close(got, model(**inputs).loss, rtol=1e-6, atol=1e-6)
    assert isinstance(model.lm_head, nn.Linear)  # the head is back in place


def test_chunked_loss_refuses_a_model_that_caps_its_logits_after_the_head():
    model = _tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0 .*use loss_chunk_size=0"):
        with hidden_states_only(model):
            pass


def test_chunked_loss_rejects_labels_that_do_not_match_hidden_states():
    hidden, head, labels = _case()
    with pytest.raises(ValueError, match=r"labels batch × sequence, got \(2, 11, 16\) and \(2, 10\)"):
        chunked_causal_lm_loss(hidden, head, labels[:, :10], 4)
