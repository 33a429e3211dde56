"""Chunked cross-entropy: a causal LM's loss without its full fp32 logits.

A causal LM's loss upcasts its logits to fp32: batch × sequence × vocabulary floats at once
(0.58 GiB per 1024 tokens at Qwen3's 151,936-word vocabulary), plus as much again for the
log-softmax autograd keeps and the gradient backward makes.  :func:`chunked_causal_lm_loss`
takes the decoder's hidden states and the output head instead, and sums the loss over chunks
of ``chunk`` positions, each under activation checkpointing: a chunk's logits exist only while
its loss (forward) or its gradient (backward) is computed, so the largest logits-shaped tensor
is batch × chunk × vocabulary.  The cost is one more head matmul per chunk (the recompute in
backward): ``2·B·T·H·V`` more flops, a third of the head's training cost.

:class:`ChunkedLossTrainer` is the ``transformers.Trainer`` that computes its loss so: the
model's forward runs with its output head replaced by the identity (it returns hidden states),
then the chunked loss applies the real head.  Models that transform their logits after the head
(final soft-capping, logit scaling) are refused: the identity would skip that step.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import Trainer

__all__ = ["chunked_causal_lm_loss", "hidden_states_only", "ChunkedLossTrainer", "LOGIT_TRANSFORMS"]

#: Config attributes of models that change their logits after the output head (Gemma 2/3, Cohere,
#: Granite); their loss cannot be chunked around the head.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _chunk_loss_sum(hidden: Tensor, labels: Tensor, head: nn.Module, ignore_index: int) -> Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                           reduction="sum")


def chunked_causal_lm_loss(hidden: Tensor, lm_head: nn.Module, labels: Tensor, chunk: int, *,
                           num_items_in_batch: Optional[Union[Tensor, int]] = None,
                           ignore_index: int = -100) -> Tensor:
    """The causal LM loss of ``lm_head(hidden)`` against ``labels``, ``chunk`` positions at a time.

    Equal (value and gradients, to fp32 rounding) to transformers' ``ForCausalLMLoss``: position
    t predicts ``labels[:, t + 1]``, ``ignore_index`` positions count for nothing, and the sum is
    divided by ``num_items_in_batch`` when given, else by the number of counted positions.
    ``chunk`` ≤ 0 or ≥ the sequence length computes it in one piece.  The full batch × sequence ×
    vocabulary fp32 logits never exist, in forward or backward (module docstring).

    Example::

        >>> hidden = model.model(input_ids).last_hidden_state
        >>> loss = chunked_causal_lm_loss(hidden, model.lm_head, labels, chunk=256)
        >>> loss.backward()
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be batch × sequence × hidden and labels batch × sequence, got "
                         f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
    T = hidden.shape[1]
    chunk = T if chunk <= 0 else min(int(chunk), T)
    shifted = F.pad(labels, (0, 1), value=ignore_index)[:, 1:].to(hidden.device)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, T, chunk):
        h, y = hidden[:, start:start + chunk], shifted[:, start:start + chunk]
        total = total + checkpoint(_chunk_loss_sum, h, y, lm_head, ignore_index, use_reentrant=False)
    if num_items_in_batch is None:
        return total / (shifted != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


@contextlib.contextmanager
def hidden_states_only(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model``'s output head is the identity (its forward returns hidden states
    as ``logits``); yields the real head.  Refuses models that transform logits after the head.

    Example::

        >>> with hidden_states_only(model) as head:
        ...     hidden = model(input_ids).logits
        >>> loss = chunked_causal_lm_loss(hidden, head, labels, chunk=256)
    """
    config = getattr(model, "config", None)
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"the chunked loss cannot serve {type(model).__name__}: its config sets {name}={value} "
                             "(logits are transformed after the output head); use loss_chunk_size=0")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"the chunked loss needs an output head; {type(model).__name__} has none "
                         "(get_output_embeddings() is None); use loss_chunk_size=0")
    model.set_output_embeddings(nn.Identity())
    try:
        yield head
    finally:
        model.set_output_embeddings(head)


class ChunkedLossTrainer(Trainer):
    """A ``Trainer`` whose causal LM loss is :func:`chunked_causal_lm_loss` over ``loss_chunk_size``
    positions (0: the model's own loss).  The Trainer's own reductions (``num_items_in_batch``,
    averaging over processes) apply unchanged.

    Example::

        >>> trainer = ChunkedLossTrainer(model=model, args=args, train_dataset=ds, loss_chunk_size=256)
    """

    def __init__(self, *args, loss_chunk_size: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_chunk_size = int(loss_chunk_size)
        self._head: Optional[nn.Module] = None
        if self.loss_chunk_size > 0:
            self.compute_loss_func = self._loss_from_hidden

    def _loss_from_hidden(self, outputs, labels: Tensor, num_items_in_batch=None) -> Tensor:
        return chunked_causal_lm_loss(outputs.logits, self._head, labels, self.loss_chunk_size,
                                      num_items_in_batch=num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_chunk_size <= 0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if "labels" not in inputs:  # no loss to chunk: the model's own forward
            self.compute_loss_func = None
            try:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                self.compute_loss_func = self._loss_from_hidden
        with hidden_states_only(self.accelerator.unwrap_model(model)) as head:
            self._head = head
            try:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                self._head = None
