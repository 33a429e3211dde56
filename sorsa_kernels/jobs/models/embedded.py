"""The embedded default: a tiny Llama-architecture model and character tokenizer, built offline.

``sorsa-kernels finetune`` with no ``--model`` fine-tunes this model, so that the
command works with no download and finishes on a laptop CPU in well under two minutes.
The model is pretrained briefly, in process, on arithmetic equations (``"3+4=7"``), so
its weights have the structure SORSA's SVD initialization relies on; fine-tuning then
teaches it to answer word problems (see :mod:`sorsa_kernels.training.data`).

Everything is deterministic for a given seed: pretraining runs on one CPU thread, so
every process of a distributed run — and every later ``--base embedded`` — rebuilds
bit-identical weights.  The pretrained weights are cached (:func:`cached_pretrained`, in the
user cache folder, keyed by package version, seed, step count and configuration), so only the
first run on a machine pretrains; ``--no-cache`` pretrains again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import string
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm.auto import tqdm

from ...training.data import arithmetic_equations
from ..progress import phase_line

__all__ = [
    "EMBEDDED_NAME",
    "EMBEDDED_PROMPT_TEMPLATE",
    "build_tokenizer",
    "build_model",
    "pretrain",
    "build_embedded",
    "cache_folder",
]

#: The value of ``--model`` / ``--base`` that selects the embedded default.
EMBEDDED_NAME = "embedded"
#: How prompts are laid out for the embedded model (it has no chat template).
EMBEDDED_PROMPT_TEMPLATE = "Q: {prompt}\nA: "

_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
# Printable ASCII without the rarely useful control whitespace, plus newline.
_CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]

# Model size: small enough for ~20 ms per training step of 16 sequences on one CPU core,
# large enough (hidden 128, rank up to 128) that rank-16 SORSA has a spectrum to split.
_MODEL = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
)
PRETRAIN_STEPS = 300
_PRETRAIN_BATCH = 32
_PRETRAIN_SEQ = 64
_PRETRAIN_LR = 3e-3


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` built in memory (no files, no download).

    Every printable ASCII character and newline is one token; ``<pad>``, ``<s>``, ``</s>``,
    ``<unk>`` are ids 0–3.  ``save_pretrained`` writes a ``tokenizer.json`` that
    ``AutoTokenizer.from_pretrained`` reloads.

    Example::

        >>> tok = build_tokenizer()
        >>> tok("3+4=7")["input_ids"][0] == tok.bos_token_id
        True
        >>> tok.decode(tok("3+4=7")["input_ids"], skip_special_tokens=True)
        '3+4=7'
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
    # A BPE model with no merges splits text into single characters.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    # Like Llama's tokenizer: BOS in front of every encoded text (add_special_tokens=True).
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=_MODEL["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    return tok


def build_model(tokenizer, seed: int = 0):
    """The untrained tiny ``LlamaForCausalLM`` (float32, CPU), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **_MODEL,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pretrain_batches(tokenizer, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """Packed sequences of ``<s>a+b=c</s>`` equations, ``_PRETRAIN_BATCH × _PRETRAIN_SEQ``."""
    need = steps * _PRETRAIN_BATCH * _PRETRAIN_SEQ
    ids: list[int] = []
    lines = arithmetic_equations(need // 6 + 64, seed=seed)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for line in lines:
        ids.append(bos)
        ids.extend(tokenizer.convert_tokens_to_ids(list(line)))
        ids.append(eos)
    data = torch.tensor(ids[:need], dtype=torch.long).view(steps, _PRETRAIN_BATCH, _PRETRAIN_SEQ)
    yield from data


def pretrain(model, tokenizer, steps: int = PRETRAIN_STEPS, seed: int = 0, progress: bool = True):
    """Full-parameter training on equation text for ``steps`` steps (AdamW, cosine), in place.

    Runs on one CPU thread so the result is bit-identical wherever it is rebuilt.
    """
    if steps <= 0:
        return model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=_PRETRAIN_LR, weight_decay=0.0)
    # OneCycleLR divides by each phase's length: at least 2 warm-up steps and one to anneal
    # (10 % warm-up from 20 steps on; fewer than 3 steps train at a constant rate).
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=_PRETRAIN_LR, total_steps=steps,
                                                pct_start=max(0.1, 2 / steps)) if steps >= 3 else None
    bar = tqdm(total=steps, desc="pretraining embedded model", unit="step", disable=not progress)
    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in _pretrain_batches(tokenizer, steps, seed):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if sched is not None:
                sched.step()
            opt.zero_grad(set_to_none=True)
            bar.update(1)  # no loss shown: reading it back every step costs a sync and says little
    bar.close()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


def cache_folder(pretrain_steps: int, seed: int) -> Path:
    """Where the embedded model pretrained ``pretrain_steps`` steps from ``seed`` is cached: a folder of
    the user cache (:func:`~sorsa_kernels.jobs.models.gguf.cache_root`) named by a hash of
    everything the weights depend on (package and torch versions, seed, steps, model and
    pretraining configuration)."""
    from ..._version import __version__
    from .gguf import cache_root

    recipe = dict(version=__version__, torch=torch.__version__.split("+")[0], seed=seed, steps=pretrain_steps,
                  model=_MODEL, batch=_PRETRAIN_BATCH, seq=_PRETRAIN_SEQ, lr=_PRETRAIN_LR, chars="".join(_CHARS),
                  schedule="one-cycle, warm-up max(10 %, 2 steps)")
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / f"embedded-{key}"


_WEIGHTS = "model.safetensors"


def _read_cache(model, folder: Path) -> bool:
    """Load cached weights into ``model``; False when there are none or they cannot be read."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(folder / _WEIGHTS))
        model.load_state_dict(state, strict=True)
    except Exception:  # absent, truncated, from another layout: pretrain again (and rewrite it)
        return False
    return True


def _write_cache(model, folder: Path) -> Optional[str]:
    """Publish ``model``'s weights to ``folder`` whole; the reason when the cache cannot be written."""
    from safetensors.torch import save_file

    from ...adapters.atomic import atomic_dir

    try:
        with atomic_dir(folder) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / _WEIGHTS))
    except OSError as e:
        return f"{e.strerror or e} ({folder.parent})"
    return None


def build_embedded(pretrain_steps: int = PRETRAIN_STEPS, seed: int = 0, progress: bool = True,
                   cache: bool = True):
    """Tokenizer and briefly pretrained tiny Llama: the embedded default base model.

    With ``cache`` the pretrained weights are read from :func:`cache_folder` when a previous run
    wrote them there (and written there otherwise), so pretraining runs once per machine;
    ``cache=False`` pretrains and leaves the cache alone.  Without ``progress`` each phase
    is one plain line (for a log file).

    Example::

        >>> model, tok = build_embedded()
        >>> model.config.model_type
        'llama'
    """
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed)
    if pretrain_steps <= 0:
        return model, tokenizer
    folder = cache_folder(pretrain_steps, seed) if cache else None
    if folder is not None and _read_cache(model, folder):
        model.eval()
        phase_line(f"embedded model: pretrained weights read from the cache {folder}", progress)
        return model, tokenizer
    phase_line(f"pretraining the embedded model: {pretrain_steps} steps", progress)
    start = time.perf_counter()
    pretrain(model, tokenizer, steps=pretrain_steps, seed=seed, progress=progress)
    note = _write_cache(model, folder) if folder is not None else None
    cached = (f"; cache not written: {note}" if note else f"; cached in {folder}") if folder is not None else ""
    phase_line(f"pretraining finished in {time.perf_counter() - start:.1f} s{cached}", progress)
    return model, tokenizer
