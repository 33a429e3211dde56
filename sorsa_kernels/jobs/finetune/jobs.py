"""The other commands' jobs: merge, export-lora and analyze, plus the drift plot and teardown.

:func:`merge_job`, :func:`export_lora_job` and :func:`analyze_job` load a base model and
an adapter (the adapter checked first, as it is cheaper) and merge it, export it as a
PEFT LoRA adapter (each output published whole, by one rename), or measure ΔΣ/ΔD per layer; :func:`plot_drift` draws the paper's
Figure 2 from that, by default to :func:`default_plot_path` (next to the adapter, in its run
folder); :func:`shutdown_distributed` ends a torchrun process group cleanly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..models.paths import check_on_disk
from ..progress import library_bars
from .config import check_model_path, check_output_dir
from .model import load_base
from .outputs import publishing


def _load_with_adapter(base: str, adapter: str, progress: bool = False, allow_base_mismatch: bool = False):
    """``(model with the adapter loaded, tokenizer or None)``: the base loaded as the class the adapter
    was trained on; these commands need no tokenizer (merge copies one when the base has it)."""
    from ...adapters.adapter_io import load_adapter, read_adapter

    check_model_path(base)  # a mistyped base fails first: it costs nothing
    config, _ = read_adapter(adapter)  # fail on a bad adapter before loading a (possibly large) base model
    with library_bars(progress):
        model, tokenizer = load_base(base, progress=progress, model_class=_adapter_model_class(config, base),
                                     need_tokenizer=False)
    return load_adapter(model, adapter, allow_base_mismatch=allow_base_mismatch), tokenizer


def _adapter_model_class(config: dict, base: str) -> Optional[str]:
    """The class to load the base as: the one the adapter records, else (an adapter with saved heads
    from before it recorded one) the class the base folder was saved as; None: a causal LM."""
    import json

    if config.get("model_class"):
        return config["model_class"]
    if config.get("modules_to_save") and (Path(base) / "config.json").is_file():
        try:
            architectures = json.loads((Path(base) / "config.json").read_text()).get("architectures") or []
        except (OSError, ValueError):
            return None
        return architectures[0] if architectures else None
    return None


def merge_job(base: str, adapter: str, output: str, progress: bool = False, *, allow_base_mismatch: bool = False,
              allow_non_finite: bool = False) -> Path:
    """Load ``base`` + ``adapter``, merge, and ``save_pretrained`` the model (and the tokenizer, when the
    base has one) to ``output``; the base is loaded as the class the adapter was trained on.

    ``base`` must be the model the adapter was fitted to (not one it is already merged into)
    unless ``allow_base_mismatch``; non-finite merged weights are refused unless ``allow_non_finite``.

    Example::

        >>> merge_job("out/base", "out/adapter", "merged")
    """
    from ...adapters.surgery import merge_sorsa

    out, model, tokenizer = _load_for_output(base, adapter, output, progress, allow_base_mismatch)
    merge_sorsa(model, allow_non_finite=allow_non_finite)
    with publishing(out) as tmp, library_bars(progress):  # whole or not at all: never only config.json
        model.save_pretrained(tmp)
        if tokenizer is not None:  # a base without a tokenizer merges all the same
            tokenizer.save_pretrained(tmp)
    return out


def export_lora_job(base: str, adapter: str, output: str, progress: bool = False, *,
                    allow_base_mismatch: bool = False) -> Path:
    """Write ``adapter`` as a standard PEFT LoRA adapter for the original ``base`` to ``output``.

    Example::

        >>> export_lora_job("meta-llama/Llama-2-7b-hf", "out/adapter", "lora")
    """
    from ...adapters.peft_export import export_peft_lora

    out, model, _ = _load_for_output(base, adapter, output, progress, allow_base_mismatch)
    with publishing(out) as tmp:
        export_peft_lora(model, tmp)
    return out


def _load_for_output(base: str, adapter: str, output: str, progress: bool,
                     allow_base_mismatch: bool) -> tuple[Path, Any, Any]:
    """``(output as a Path, model with the adapter, tokenizer or None)`` for a command that writes a
    new folder: ``output`` is checked (new, on a disk with room) before any model is loaded."""
    out = Path(output)
    check_output_dir(out)
    check_on_disk(out)
    return (out, *_load_with_adapter(base, adapter, progress, allow_base_mismatch))


def analyze_job(base: str, adapters: Sequence[str], progress: bool = False, *,
                allow_base_mismatch: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """ΔΣ and ΔD (the paper's Eq. 1–4) of every adapted layer, for each adapter in order.

    Returns ``[(adapter, {layer name: SingularDrift}), …]`` in the order given.

    Example::

        >>> drift = analyze_job("out/base", ["out/adapter"])
    """
    from ...adapters.analysis import model_singular_drift

    result = []
    for adapter in adapters:
        model, _ = _load_with_adapter(base, adapter, progress, allow_base_mismatch)
        result.append((str(adapter), model_singular_drift(model)))
        del model
    return result


#: The file name ``analyze`` gives its figure unless told otherwise.
DRIFT_PLOT_NAME = "singular_drift.png"


def default_plot_path(adapters: Sequence[str]) -> Path:
    """Where ``analyze`` writes its figure unless told otherwise: next to the (last) adapter it
    analyzes, so a run folder keeps its own figure (``out/adapter`` → ``out/singular_drift.png``).

    Example::

        >>> default_plot_path(["out/adapter"])
        PosixPath('out/singular_drift.png')
    """
    return Path(adapters[-1]).parent / DRIFT_PLOT_NAME


def _layer_number(name: str) -> Optional[int]:
    import re

    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def plot_drift(drift: Sequence[tuple[str, dict[str, Any]]], path: str) -> Path:
    """A PNG in the style of the paper's Figure 2: ΔD (x) against ΔΣ (y), one point per layer
    labelled with its layer number and coloured by projection; with several adapters (e.g.
    saved at successive steps) each layer's points are joined in order and a black dot
    marks each adapter's mean."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("the plot needs matplotlib (pip install matplotlib)") from None
    out = Path(path)
    if out.parent and not out.parent.exists():
        raise ValueError(f"cannot write {out}: folder {out.parent} does not exist")
    steps = [layers for _, layers in drift]
    names = list(steps[0])
    kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for name in names:
        kind = name.rsplit(".", 1)[-1]
        xs = [d[name].delta_d for d in steps if name in d]
        ys = [d[name].delta_sigma for d in steps if name in d]
        ax.plot(xs, ys, "-" if len(xs) > 1 else "", marker="o", ms=3, lw=0.8, color=colors[kind], alpha=0.8)
        number = _layer_number(name)
        if number is not None:
            ax.annotate(str(number), (xs[-1], ys[-1]), fontsize=7, color=colors[kind],
                        xytext=(2, 2), textcoords="offset points")
    means_x = [sum(v.delta_d for v in d.values()) / len(d) for d in steps]
    means_y = [sum(v.delta_sigma for v in d.values()) / len(d) for d in steps]
    ax.plot(means_x, means_y, "-" if len(steps) > 1 else "", color="k", marker="o", ms=6, label="mean")
    for k in kinds:
        ax.plot([], [], marker="o", ls="", color=colors[k], label=k)
    ax.set_xlabel("ΔD (singular vectors)")
    ax.set_ylabel("ΔΣ (singular values)")
    ax.set_title("SORSA: drift from the pretrained weights")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    try:
        with publishing(out, file=True) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out


def shutdown_distributed() -> None:
    """Destroy the process group a distributed run created, so gloo workers exit cleanly.

    Without it a worker can abort at interpreter exit ("terminate called without an
    active exception") after its work is done.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
