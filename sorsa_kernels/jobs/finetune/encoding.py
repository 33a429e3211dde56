"""Turning prompt/response records into training batches, with the loss on the response only.

:func:`encode_example` tokenizes one pair (chat template or a plain prompt template,
prompt labels -100, EOS after the response), :func:`encode_all` does a whole split and
fails clearly when no example survives truncation, :class:`ResponseOnlyCollator`
right-pads a batch, and :class:`ListDataset` wraps the encoded rows for the Trainer.
Reading data files and the embedded data set live in :mod:`sorsa_kernels.training.data`.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import FinetuneConfig, is_main_process


def encode_example(
    tokenizer, prompt: str, response: str, template: str, max_length: int, use_chat_template: bool
) -> Optional[dict[str, list[int]]]:
    """Token ids and labels for one pair; prompt tokens get label -100 (loss on the response only).

    With ``use_chat_template`` the prompt is the tokenizer's chat template applied to one
    user turn (with the generation prompt); otherwise ``template.format(prompt=prompt)``
    tokenized with the tokenizer's special tokens (e.g. BOS).  The response is followed by
    EOS.  Sequences are cut to ``max_length``; returns None when no response token is left.

    Example::

        >>> ex = encode_example(tok, "2+2?", "4", "Q: {prompt}\\nA: ", 64, False)
        >>> ex["labels"][-2:] == ex["input_ids"][-2:]      # "4", EOS
        True
    """
    return _encode(tokenizer, prompt, response, template, max_length, use_chat_template)[0]


def _encode(tokenizer, prompt: str, response: str, template: str, max_length: int,
            use_chat_template: bool) -> tuple[Optional[dict[str, list[int]]], int]:
    """``(encode_example's result, the untruncated length)``."""
    prompt_tokens = prompt_ids(tokenizer, prompt, template, use_chat_template)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    full = len(prompt_tokens) + len(response_ids)
    ids = (prompt_tokens + response_ids)[:max_length]
    labels = ([-100] * len(prompt_tokens) + response_ids)[:max_length]
    if all(label == -100 for label in labels):
        return None, full
    return {"input_ids": ids, "labels": labels}, full


def prompt_ids(tokenizer, prompt: str, template: str, use_chat_template: bool) -> list[int]:
    """The prompt's token ids: the chat template of one user turn, or ``template`` filled in."""
    if use_chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(template.format(prompt=prompt))["input_ids"]


class ListDataset(torch.utils.data.Dataset):
    """A list of encoded rows as a map-style dataset for the Trainer."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


class ResponseOnlyCollator:
    """Right-pads ``input_ids`` (pad id) and ``labels`` (-100) to the longest sequence of a batch.

    Example::

        >>> batch = ResponseOnlyCollator(pad_token_id=0)([{"input_ids": [5, 6], "labels": [-100, 6]}])
        >>> sorted(batch)
        ['attention_mask', 'input_ids', 'labels']
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), n), -100, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


#: A split that loses more than this fraction of its records to ``--max-length`` stops the run.
MAX_DROPPED_FRACTION = 0.5


def encode_all(tokenizer, rows, cfg: FinetuneConfig, use_chat: bool, what: str,
               counts: Optional[dict] = None) -> list[dict]:
    """Encode every row of a split, counting what ``--max-length`` costs.

    A record whose prompt fills the max length (no response token left) is dropped; one
    whose response is cut is truncated.  Both are counted (into ``counts`` when given:
    ``{"records", "kept", "dropped", "truncated", "longest"}``) and reported in one line;
    a split that loses more than half its records (or all) is refused with the advice
    to raise ``--max-length``.
    """
    kept, truncated, longest = [], 0, 0
    for r in rows:
        ex, full = _encode(tokenizer, r["prompt"], r["response"], cfg.prompt_template, cfg.max_length, use_chat)
        longest = max(longest, full)
        if ex is not None:
            kept.append(ex)
            truncated += full > cfg.max_length
    dropped = len(rows) - len(kept)
    if counts is not None:
        counts.update(records=len(rows), kept=len(kept), dropped=dropped, truncated=truncated, longest=longest)
    advice = f"raise --max-length (the longest {what} example is {longest} tokens)"
    if not kept:
        raise ValueError(f"every {what} example's prompt fills the max length {cfg.max_length}; {advice}")
    if dropped > MAX_DROPPED_FRACTION * len(rows):
        raise ValueError(f"{dropped} of {len(rows)} {what} examples would be dropped: their prompt fills "
                         f"--max-length {cfg.max_length}, leaving no response token; {advice}")
    if (dropped or truncated) and is_main_process():
        print(f"{what} data: {dropped} of {len(rows)} examples dropped (prompt fills --max-length {cfg.max_length}), "
              f"{truncated} truncated (response cut); {advice} to keep them whole", flush=True)
    return kept
