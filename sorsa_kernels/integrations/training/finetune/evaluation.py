"""Held-out evaluation before and after fine-tuning: loss and greedy exact-match accuracy.

:func:`exact_match` generates greedily (left-padded, optionally synced across FSDP ranks)
and compares stripped completions to the responses; :func:`evaluate` combines it with the
Trainer's held-out loss; :func:`default_max_new_tokens` sizes generation from the
responses and :func:`metrics_line` prints the result.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import distributed
from .encoding import prompt_ids


@torch.no_grad()
def exact_match(model, tokenizer, rows: list[dict], template: str, use_chat_template: bool,
                max_new_tokens: int, batch_size: int = 32, synced: bool = False,
                max_length: Optional[int] = None) -> float:
    """Fraction of ``rows`` whose greedy completion, stripped, equals the response, stripped.

    With ``max_length`` (the job's ``--max-length``) a prompt longer than
    ``max_length − max_new_tokens`` tokens keeps only its last ones, as many as fit: the
    sequence generated is never longer than the model was trained on.

    Example::

        >>> exact_match(model, tok, [{"prompt": "3+4?", "response": "7"}], "Q: {prompt}\\nA: ", False, 4)
        1.0
    """
    if not rows:
        return float("nan")
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(p for p in model.parameters()).device
    correct = 0
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            prompts = [prompt_ids(tokenizer, r["prompt"], template, use_chat_template) for r in chunk]
            if max_length is not None:  # keep the end of a long prompt: the response follows it
                keep = max(1, max_length - max_new_tokens)
                prompts = [p[-keep:] for p in prompts]
            n = max(map(len, prompts))
            ids = torch.full((len(chunk), n), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(prompts):
                ids[i, n - len(p):] = torch.tensor(p)
                mask[i, n - len(p):] = 1
            gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            if synced:
                gen_kwargs["synced_gpus"] = True
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
            texts = tokenizer.batch_decode(out[:, n:], skip_special_tokens=True)
            correct += sum(t.strip() == r["response"].strip() for t, r in zip(texts, chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return correct / len(rows)


def evaluate(trainer, model, tokenizer, eval_ds, em_rows, cfg, use_chat, max_new) -> dict[str, float]:
    """Held-out loss and exact match (``{}`` when there is no held-out set or evaluation is off)."""
    out: dict[str, float] = {}
    if eval_ds is None or not cfg.evaluate:
        return out
    out["loss"] = float(trainer.evaluate(eval_ds, metric_key_prefix="heldout")["heldout_loss"])
    if em_rows:
        out["exact_match"] = exact_match(
            trainer.model, tokenizer, em_rows, cfg.prompt_template, use_chat, max_new,
            cfg.eval_batch_size, synced=cfg.fsdp and distributed(), max_length=cfg.max_length,
        )
    return out


def default_max_new_tokens(tokenizer, rows: list[dict]) -> int:
    """Generation length for exact match: the longest response plus 4 tokens (at most 512)."""
    if not rows:
        return 1
    longest = max(len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in rows)
    return min(512, longest + 4)


def metrics_line(label: str, metrics: dict[str, float]) -> str:
    """One printable line of held-out loss and exact match."""
    parts = [f"held-out loss {metrics['loss']:.4f}"] if "loss" in metrics else []
    if "exact_match" in metrics:
        parts.append(f"exact match {100 * metrics['exact_match']:.1f}%")
    return f"{label}: " + ", ".join(parts)
