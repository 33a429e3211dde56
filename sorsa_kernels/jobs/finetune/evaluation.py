"""Held-out evaluation before and after fine-tuning: loss and greedy exact-match accuracy.

:func:`exact_match` generates greedily (left-padded, optionally synced across FSDP ranks)
and compares stripped completions to the responses — or, with an answer pattern
(``--answer-pattern``, for chain-of-thought data where a worked solution precedes the
number), the answers :func:`answer_extractor` pulls out of both; :func:`evaluate` combines
it with the Trainer's held-out loss; :func:`default_max_new_tokens` sizes generation from
the responses and :func:`metrics_line` prints the result.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import regex

import torch
from tqdm.auto import tqdm

from .config import LAST_NUMBER, check_answer_pattern, distributed, is_main_process
from .encoding import ResponseOnlyCollator, prompt_ids


# A number: digits with thousands separators (groups of exactly three: "1,200") or plain digits,
# then decimals.  "4,5" is two numbers, 4 and 5, not 45.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
#: Seconds an answer pattern may spend on one text before the evaluation stops with an error.
ANSWER_TIMEOUT_S = 1.0


def _canonical(answer: str) -> str:
    """``answer`` stripped; a number loses thousands separators, a trailing dot and zero decimals."""
    text = answer.strip().rstrip(".").replace("$", "")
    if _NUMBER.fullmatch(text):
        text = text.replace(",", "")
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text
    return answer.strip()


def answer_extractor(pattern: Optional[str]) -> Callable[[str], Optional[str]]:
    """A function from a text to the answer compared by :func:`exact_match` (None: no answer found).

    ``None``: the whole text, stripped.  ``"last-number"``: the last number in the text
    (``1,200`` is one number, ``4,5`` two).  Otherwise a regular expression: its first match's
    group (or the whole match without a group); a match whose group did not take part
    (``'answer: (\\d+)|done'`` on ``done``) is no answer.  Numbers are compared without
    thousands separators and trailing zero decimals.  A pattern that runs longer than
    :data:`ANSWER_TIMEOUT_S` on one text raises a one-line ValueError naming it.

    Example::

        >>> answer_extractor("#### (\\S+)")("18 - 9 = 9 eggs\n#### 9")
        '9'
        >>> answer_extractor("last-number")("so she has 1,200.0 dollars.")
        '1200'
    """
    check_answer_pattern(pattern)
    if pattern is None:
        return lambda text: text.strip()
    if pattern == LAST_NUMBER:
        def last_number(text: str) -> Optional[str]:
            numbers = _NUMBER.findall(text)
            return _canonical(numbers[-1]) if numbers else None

        return last_number
    compiled = regex.compile(pattern)

    def search(text: str) -> Optional[str]:
        try:
            m = compiled.search(text, timeout=ANSWER_TIMEOUT_S)
        except TimeoutError:
            raise ValueError(f"answer pattern {pattern!r} ran over {ANSWER_TIMEOUT_S:g} s on a {len(text)}-character "
                             "text (catastrophic backtracking); use a simpler one such as '#### (\\S+)' or "
                             "last-number") from None
        if m is None:
            return None
        found = m.group(1) if compiled.groups else m.group(0)
        return None if found is None else _canonical(found)

    return search


def answers_match(completion: str, response: str, extract: Callable[[str], Optional[str]]) -> bool:
    """Whether the completion's extracted answer equals the response's (the whole response when it has none)."""
    expected = extract(response)
    if expected is None:
        expected = _canonical(response)
    got = extract(completion)
    return got is not None and got == expected


@torch.no_grad()
def exact_match(model, tokenizer, rows: list[dict], template: str, use_chat_template: bool,
                max_new_tokens: int, batch_size: int = 32, synced: bool = False,
                max_length: Optional[int] = None, progress: bool = False,
                answer_pattern: Optional[str] = None) -> float:
    """Fraction of ``rows`` whose greedy completion, stripped, equals the response, stripped
    (with ``progress``, an ``exact match`` bar over the examples).

    With ``max_length`` (the job's ``--max-length``) a prompt longer than
    ``max_length − max_new_tokens`` tokens keeps only its last ones, as many as fit: the
    sequence generated is never longer than the model was trained on.  With
    ``answer_pattern`` (see :func:`answer_extractor`) the answers extracted from the
    completion and the response are compared instead of the whole texts.

    Example::

        >>> exact_match(model, tok, [{"prompt": "3+4?", "response": "7"}], "Q: {prompt}\\nA: ", False, 4)
        1.0
    """
    if not rows:
        return float("nan")
    extract = answer_extractor(answer_pattern)
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(p for p in model.parameters()).device
    correct = 0
    bar = tqdm(total=len(rows), desc="exact match", unit="example", leave=False, disable=not progress)
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            prompts = [prompt_ids(tokenizer, r["prompt"], template, use_chat_template) for r in chunk]
            if max_length is not None:  # keep the end of a long prompt: the response follows it
                keep = max(1, max_length - max_new_tokens)
                cut = sum(len(p) > keep for p in prompts)
                if cut:  # generation_budget refuses this up front; a caller that skipped it is told
                    warnings.warn(f"exact match cut {cut} held-out prompt(s) to their last {keep} tokens "
                                  f"(max_length {max_length} − max_new_tokens {max_new_tokens})", stacklevel=2)
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
            correct += sum(answers_match(t, r["response"], extract) for t, r in zip(texts, chunk))
            bar.update(len(chunk))
    finally:
        bar.close()
        tokenizer.padding_side = side
        model.train(was_training)
    return correct / len(rows)


@torch.no_grad()
def heldout_loss(model, dataset, pad_token_id: int, batch_size: int) -> float:
    """Mean cross-entropy over every response token of ``dataset`` (encoded examples), in batches.

    The one held-out loss of ``finetune`` and ``compare``: a mean over tokens, not over batches
    (the Trainer's ``evaluate`` averages batch means, which weighs a short last batch as much as
    a full one — 4.1689 against 4.1706 on the embedded default).  Under FSDP every rank runs the
    same batches, so every rank gets the same number.
    """
    collate = ResponseOnlyCollator(pad_token_id)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def evaluate(trainer, model, tokenizer, eval_ds, em_rows, cfg, use_chat, max_new) -> dict[str, float]:
    """Held-out loss (:func:`heldout_loss`) and exact match (``{}`` when there is no held-out set
    or evaluation is off)."""
    out: dict[str, float] = {}
    if eval_ds is None or not cfg.evaluate:
        return out
    out["loss"] = heldout_loss(trainer.model, eval_ds, tokenizer.pad_token_id, cfg.eval_batch_size)
    if em_rows:
        out["exact_match"] = exact_match(
            trainer.model, tokenizer, em_rows, cfg.prompt_template, use_chat, max_new,
            cfg.eval_batch_size, synced=cfg.fsdp and distributed(), max_length=cfg.max_length,
            progress=cfg.progress and is_main_process(), answer_pattern=cfg.answer_pattern,
        )
    return out


def default_max_new_tokens(tokenizer, rows: list[dict]) -> int:
    """Generation length for exact match: the longest response plus 4 tokens (at most 512)."""
    if not rows:
        return 1
    longest = max(len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in rows)
    return min(512, longest + 4)


@dataclass(frozen=True)
class GenerationBudget:
    """How exact match generates: ``max_new_tokens`` beside prompts of at most ``longest_prompt``
    tokens; ``answers_cut`` reference responses are longer than ``max_new_tokens`` tokens (a
    completion cannot reproduce them whole); ``prompts_cut`` is always 0 (a prompt that does not
    fit is refused, never cut)."""

    max_new_tokens: int
    longest_prompt: int
    longest_answer: int
    answers_cut: int
    prompts_cut: int = 0


def generation_budget(tokenizer, rows: list[dict], template: str, use_chat_template: bool,
                      max_length: Optional[int], max_new_tokens: Optional[int] = None) -> GenerationBudget:
    """Fit exact match's generation beside the longest held-out prompt within ``max_length``.

    Without ``max_new_tokens`` the budget is :func:`default_max_new_tokens`, lowered to what the
    longest prompt leaves of ``max_length``; a given ``max_new_tokens`` that does not fit, or a
    prompt that leaves no room, is a one-line ValueError with the numbers — a prompt is never cut.

    Example::

        >>> generation_budget(tok, [{"prompt": "3+4?", "response": "7"}], "Q: {prompt}\\nA: ", False, 64)
        GenerationBudget(max_new_tokens=5, longest_prompt=8, longest_answer=1, answers_cut=0, prompts_cut=0)
    """
    if not rows:
        return GenerationBudget(max_new_tokens or 1, 0, 0, 0)
    longest_prompt = max(len(prompt_ids(tokenizer, r["prompt"], template, use_chat_template)) for r in rows)
    answers = [len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in rows]
    room = None if max_length is None else max_length - longest_prompt
    if room is not None and room < 1:
        raise ValueError(f"the longest held-out prompt has {longest_prompt} tokens and --max-length is {max_length}: "
                         f"no token is left to generate an answer; raise --max-length to at least "
                         f"{longest_prompt + max(answers) + 1}")
    if max_new_tokens is not None:
        if room is not None and max_new_tokens > room:
            raise ValueError(f"--max-new-tokens {max_new_tokens} does not fit beside the longest held-out prompt "
                             f"({longest_prompt} tokens) within --max-length {max_length}: lower it to {room} or "
                             f"raise --max-length to {longest_prompt + max_new_tokens}")
        budget = max_new_tokens
    else:
        budget = min(512, max(answers) + 4) if room is None else min(512, max(answers) + 4, room)
    return GenerationBudget(budget, longest_prompt, max(answers), sum(a > budget for a in answers))


def exact_match_definition(answer_pattern: Optional[str]) -> str:
    """The one sentence that says what exact match compared (the report's definition)."""
    if answer_pattern is None:
        return "Exact match: the greedy completion, stripped, equals the whole response, stripped."
    if answer_pattern == LAST_NUMBER:
        what = "the last number (a thousands separator is a comma before exactly three digits)"
    else:
        what = f"the answer the pattern `{answer_pattern}` extracts (its group; an unmatched group is no answer)"
    return (f"Exact match: {what} of the greedy completion equals that of the response (the whole response when "
            "it has none); numbers are compared without thousands separators and trailing zero decimals.")


def metrics_line(label: str, metrics: dict[str, float]) -> str:
    """One printable line of held-out loss and exact match."""
    parts = [f"held-out loss {metrics['loss']:.4f}"] if "loss" in metrics else []
    if "exact_match" in metrics:
        parts.append(f"exact match {100 * metrics['exact_match']:.1f}%")
    return f"{label}: " + ", ".join(parts)
