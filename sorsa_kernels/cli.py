"""``sorsa-kernels``: the command line.  Argument parsing and printing only; the work is in
:mod:`sorsa_kernels.integrations.training.finetune`.

Subcommands::

    sorsa-kernels finetune                      # the embedded default: tiny Llama, arithmetic problems, CPU
    sorsa-kernels finetune --model PATH_OR_ID --data train.jsonl --bf16 --output-dir out
    torchrun --nproc_per_node 8 -m sorsa_kernels.cli finetune --model ... --data ... --output-dir out [--fsdp]
    sorsa-kernels compare                       # SORSA vs PiSSA vs LoRA on the embedded default (or --model/--data)
    sorsa-kernels analyze --base out/base --adapter out/adapter      # ΔΣ/ΔD table + PNG (paper Fig. 2)
    sorsa-kernels merge --base out/base --adapter out/adapter --output merged
    sorsa-kernels export-lora --base out/base --adapter out/adapter --output lora

Every failure — bad input, a missing or corrupt file, a full disk, a refused resume —
ends with one line ``sorsa-kernels: error: …`` naming the file and the problem, and exit
status 1 (2 for a malformed command line, 130 for Ctrl-C); ``--debug`` (anywhere on the
command line) or ``SORSA_KERNELS_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from .integrations.training.finetune import FinetuneConfig

__all__ = ["main", "build_parser", "config_from_args"]

PROG = "sorsa-kernels"


class _Parser(argparse.ArgumentParser):
    """``ArgumentParser`` that suggests the nearest option or command for a misspelt one
    (``unrecognized arguments: --learnig-rate (did you mean --learning-rate?)``) and, in a
    subcommand, reports an unknown option with that subcommand's own usage, not the top-level one.
    (Python 3.14's ``suggest_on_error`` does the first half; this package supports 3.10+.)"""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._subcommand:  # the top-level parser would report them with its own usage
            self.error("unrecognized arguments: %s" % " ".join(extras))
        return namespace, extras

    _subcommand = False

    def error(self, message: str):
        return super().error(message + _suggestion(message, self))


class _SubcommandParser(_Parser):
    _subcommand = True


def _suggestion(message: str, parser: argparse.ArgumentParser) -> str:
    """`` (did you mean X?)`` for the unknown option or command named in an argparse error message."""
    import difflib
    import re

    if message.startswith("unrecognized arguments: "):
        words = [w.split("=", 1)[0] for w in message.split(": ", 1)[1].split() if w.startswith("--")]
        known = [o for a in parser._actions for o in a.option_strings]
    else:
        m = re.match(r"argument \S+: invalid choice: '([^']*)'", message)
        words = [m.group(1)] if m else []
        known = [c for a in parser._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices]
    near = [hit for w in words for hit in difflib.get_close_matches(w, known, n=1, cutoff=0.6)]
    return f" (did you mean {' '.join(near)}?)" if near else ""


def _add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="SORSA-fine-tune a causal LM (no arguments: the embedded offline demo)",
        description=(
            "SORSA-fine-tune a causal LM on prompt/response pairs with the loss on the response only. "
            "Defaults for a real --model are the paper's (rank 128, lr 3e-5, gamma 4e-4, AdamW, cosine, "
            "3% warm-up, 1 epoch, batch 8 x 16 accumulation, max length 512). With no --model, a tiny "
            "Llama is built and pretrained locally and fine-tuned on generated arithmetic word problems "
            "in under two minutes on a CPU; it uses rank 16, lr 3e-3, batch 16 and 250 steps."
        ),
    )
    _add_job_flags(p)
    p.set_defaults(run=_finetune)


def _add_job_flags(p) -> None:
    """The finetune job's flags (model, data, SORSA, training, evaluation), shared with ``compare``."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="embedded", help="local path or Hub id of a causal LM (default: embedded)")
    g.add_argument("--data", help="training data: .jsonl, .json or .parquet with prompt/response fields "
                        "(default: the embedded arithmetic problems; required with --model)")
    g.add_argument("--eval-data", help="held-out data (default: --eval-fraction of --data)")
    g.add_argument("--prompt-field", default="prompt", help="name of the prompt field (default: prompt)")
    g.add_argument("--response-field", default="response", help="name of the response field (default: response)")
    g.add_argument("--prompt-template", help="layout for tokenizers without a chat template; must contain {prompt} "
                        "(default: Alpaca-style '### Instruction:' / '### Response:')")
    g.add_argument("--output-dir", help="where to write adapter/, merged/ … (default: a new ./sorsa-output-<time>[-N]); "
                        "refused if it holds anything but an unfinished run's leftovers")
    g = p.add_argument_group("SORSA")
    g.add_argument("--rank", type=int, help="adapter rank r (default: 128; embedded 16)")
    g.add_argument("--target-modules", nargs="+", metavar="NAME",
                   help="module names to adapt, or one regular expression (default: q,k,v,o,gate,up,down_proj)")
    g.add_argument("--alpha", type=float, help="scale = alpha / rank (default: scale 1)")
    g.add_argument("--gamma", type=float, default=4e-4, help="orthonormal regularizer strength (default: 4e-4)")
    g.add_argument("--svd", choices=("full", "randomized"), default="full",
                   help="SVD used at initialization (default: full)")
    g.add_argument("--residual-dtype", help="dtype of the frozen residual (default: the weight's)")
    g.add_argument("--adapter-dtype", help="dtype of U, S, V (default: float32)")
    g.add_argument("--quantize", choices=("nf4",), help="store residuals in NF4 (QSORSA) (default: none, dense residuals)")
    g = p.add_argument_group("training")
    g.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float,
                   help="peak learning rate (default: 3e-5; embedded 3e-3)")
    g.add_argument("--epochs", dest="num_train_epochs", type=float, help="epochs (default: 1)")
    g.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs (default: from --epochs; embedded 250)")
    g.add_argument("--batch-size", dest="per_device_train_batch_size", type=int,
                   help="per-device batch size (default: 8; embedded 16)")
    g.add_argument("--grad-accum", "--gradient-accumulation-steps", dest="gradient_accumulation_steps", type=int,
                   help="gradient accumulation steps (default: 16; embedded 1)")
    g.add_argument("--max-length", type=int, default=512, help="max tokens per example (default: 512)")
    g.add_argument("--warmup-ratio", type=float, default=0.03, help="warm-up fraction of the steps (default: 0.03)")
    g.add_argument("--scheduler", dest="lr_scheduler_type", default="cosine", help="learning-rate schedule (default: cosine)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm; 0 turns clipping off (default: 1)")
    g.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (under torchrun)")
    g.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    g.add_argument("--resume-from-checkpoint", metavar="DIR",
                   help="continue from a complete checkpoint folder (or 'last': the newest under "
                        "OUTPUT/checkpoints) with the same model, rank, targets, alpha and dtypes; writes into a "
                        "new --output-dir or the checkpoint's own run folder, never another run's (default: none, a fresh start)")
    g = p.add_argument_group("logging, evaluation, saving")
    g.add_argument("--logging-steps", type=int, help="log every N steps (default: 10; embedded 25)")
    g.add_argument("--eval-steps", type=int, help="held-out loss every N steps (default: only before and after)")
    g.add_argument("--save-steps", type=int, help="checkpoint every N steps (default: no checkpoints)")
    g.add_argument("--save-total-limit", type=int, help="keep at most N checkpoints (default: all)")
    g.add_argument("--eval-fraction", type=float, default=0.05, help="held-out fraction of --data (default: 0.05)")
    g.add_argument("--eval-samples", type=int, default=200, help="held-out examples for exact match (default: 200)")
    g.add_argument("--max-new-tokens", type=int, help="generation length for exact match (default: from responses)")
    g.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip the before/after evaluation")
    g.add_argument("--report-to", default="none", help="Trainer loggers: none, tensorboard, wandb … (default: none)")
    g.add_argument("--pretrain-steps", type=int, help="embedded model only: in-process pretraining steps (default: 300)")
    g.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="train SORSA, PiSSA and LoRA side by side and record the paper's ΔΣ/ΔD analysis",
        description=(
            "Train SORSA (this package), PiSSA and LoRA (PEFT), and with --full full fine-tuning of the "
            "target matrices, with one budget (steps, batch, learning-rate schedule, seed, data order) and "
            "the same rank; record training loss, held-out loss, exact match, orthonormality and the paper's "
            "ΔΣ/ΔD every --record-every steps; write compare.json, compare.md and PNGs to --output-dir "
            "(default ./sorsa-compare-<time>). Takes the finetune flags; with none, the embedded default."
        ),
    )
    _add_job_flags(p)
    g = p.add_argument_group("comparison")
    g.add_argument("--methods", nargs="+", choices=("sorsa", "pissa", "lora"), default=["sorsa", "pissa", "lora"],
                   help="adapters to compare (default: all three)")
    g.add_argument("--full", action="store_true", help="also full fine-tuning of the target matrices (small models)")
    g.add_argument("--record-every", type=int, metavar="N",
                   help="record every N steps (default: a tenth of the steps); --eval-steps, a multiple of N, "
                        "sets how often held-out loss and exact match are measured (default: every record)")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="compare.json and compare.md only")
    p.set_defaults(run=_compare)


def _add_model_commands(sub) -> None:
    p = sub.add_parser("analyze", help="ΔΣ and ΔD per layer (paper Section 3) as a table and a PNG")
    p.add_argument("--base", required=True, help="base model path / Hub id, or 'embedded'")
    p.add_argument("--adapter", required=True, nargs="+", help="adapter folder(s); several give a trajectory")
    p.add_argument("--plot", metavar="PNG",
                   help="figure to write (default: singular_drift.png next to the (last) adapter)")
    p.add_argument("--no-plot", dest="draw", action="store_false", help="table only")
    p.set_defaults(run=_analyze)
    for name, what in (("merge", "merge an adapter into its base and save_pretrained the result"),
                       ("export-lora", "write an adapter as a standard PEFT LoRA adapter for the base")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--base", required=True, help="base model path / Hub id, or 'embedded'")
        p.add_argument("--adapter", required=True, help="adapter folder written by finetune / save_adapter")
        p.add_argument("--output", required=True, help="folder to create")
        p.set_defaults(run=_merge if name == "merge" else _export)


def build_parser() -> argparse.ArgumentParser:
    """The ``sorsa-kernels`` argument parser (one subparser per command)."""
    parser = _Parser(prog=PROG, description="Fast SORSA fine-tuning.")
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a failure (also accepted after the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_SubcommandParser)
    sub.required = True
    _add_finetune(sub)
    _add_compare(sub)
    _add_model_commands(sub)
    return parser


# ---------------------------------------------------------------------- commands
def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def config_from_args(args: argparse.Namespace) -> "FinetuneConfig":
    """The finetune job's config from parsed ``finetune`` arguments: the one place argparse meets it.

    Every option's ``dest`` is a :class:`~sorsa_kernels.integrations.training.finetune.FinetuneConfig`
    field; the parser's own entries (``command``, ``run``) are left out.

    Example::

        >>> config_from_args(build_parser().parse_args(["finetune", "--rank", "8"])).rank
        8
    """
    from .integrations.training.finetune import FinetuneConfig

    fields = set(FinetuneConfig.__dataclass_fields__)
    return FinetuneConfig(**{k: v for k, v in vars(args).items() if k in fields})


def _bars_wanted() -> bool:
    """Progress bars only for a person at a terminal: redirected to a file they are a wall of ``\r``."""
    return sys.stderr.isatty()  # tqdm draws on stderr


def _job_config(args: argparse.Namespace) -> "FinetuneConfig":
    cfg = config_from_args(args)
    cfg.progress = cfg.progress and _bars_wanted()  # --quiet, or not a terminal: no bars
    return cfg


def _finetune(args: argparse.Namespace) -> int:
    from .integrations.training.finetune import run_finetune

    result = run_finetune(_job_config(args))
    if not _main_process():
        return 0
    print()
    if result.before or result.after:  # no empty table under --no-eval
        print(f"{'':24}{'before':>10}{'after':>10}")
    for key, label, fmt in (("loss", "held-out loss", "{:10.4f}"), ("exact_match", "exact match", "{:9.1%} ")):
        if key in result.before or key in result.after:
            b = fmt.format(result.before[key]) if key in result.before else f"{'-':>10}"
            a = fmt.format(result.after[key]) if key in result.after else f"{'-':>10}"
            print(f"{label:24}{b}{a}")
    print(f"training {result.train_runtime_s:.1f} s, total {result.total_runtime_s:.1f} s")
    print(f"adapter: {result.adapter_dir}")
    print(f"merged model: {result.merged_dir}")
    if result.base_dir is not None:
        print(f"base model: {result.base_dir}")
        print(f"next: {PROG} analyze --base {result.base_dir} --adapter {result.adapter_dir}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .integrations.training.compare import CompareConfig, run_compare
    from .integrations.training.compare_report import ordering_line, scope_line, summary_table

    result = run_compare(CompareConfig(_job_config(args), methods=tuple(args.methods), full=args.full,
                                       record_every=args.record_every, plots=args.plots))
    report = result.report
    print()
    print(summary_table(report))
    print(ordering_line(report))
    print(scope_line(report))
    print(f"setup {report['timing_s']['setup_s']:.1f} s, total {report['timing_s']['total_s']:.1f} s")
    for path in result.files:
        print(f"wrote {path}")
    if result.plot_note:
        print(result.plot_note)
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .integrations.training.finetune import analyze_job, default_plot_path, plot_drift

    drift = analyze_job(args.base, args.adapter, progress=_bars_wanted())
    for adapter, layers in drift:
        print(f"adapter {adapter}")
        width = max(len(n) for n in layers)
        print(f"  {'layer':{width}}  {'ΔΣ':>12}  {'ΔD':>12}")
        for name, d in layers.items():
            print(f"  {name:{width}}  {d.delta_sigma:12.4e}  {d.delta_d:12.4e}")
        n = len(layers)
        print(f"  {'mean':{width}}  {sum(d.delta_sigma for d in layers.values()) / n:12.4e}"
              f"  {sum(d.delta_d for d in layers.values()) / n:12.4e}")
    if args.draw:
        print(f"plot: {plot_drift(drift, args.plot or default_plot_path(args.adapter))}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .integrations.training.finetune import merge_job

    print(f"merged model: {merge_job(args.base, args.adapter, args.output, progress=_bars_wanted())}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .integrations.training.finetune import export_lora_job

    print(f"PEFT LoRA adapter: {export_lora_job(args.base, args.adapter, args.output, progress=_bars_wanted())}")
    return 0


def _one_line(e: BaseException) -> str:
    """An exception as one line: its message (with the type for unexpected kinds)."""
    message = " ".join(str(e).split())
    if isinstance(e, (ValueError, OSError, ImportError)) and message:
        return message
    if isinstance(e, KeyError):  # str(KeyError("x")) is "'x'"
        message = f"missing key {message}"
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sorsa-kernels`` console script; returns the exit status.

    Example::

        >>> main(["merge", "--base", "out/base", "--adapter", "out/adapter", "--output", "merged"])
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:  # accepted after the command too (`finetune ... --debug`), so take it out here
        argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    debug = debug or bool(os.environ.get("SORSA_KERNELS_DEBUG"))
    try:
        return args.run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every failure is one line; --debug shows the traceback
        if debug:
            raise
        if _main_process():
            print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    finally:
        from .integrations.training.finetune import shutdown_distributed

        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
