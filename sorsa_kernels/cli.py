"""``sorsa-kernels``: the command line.  Argument parsing and printing only; the work is in
:mod:`sorsa_kernels.jobs.finetune`.

Subcommands::

    sorsa-kernels finetune                      # the embedded default: tiny Llama, arithmetic problems, CPU
    sorsa-kernels finetune --model PATH_OR_ID --data train.jsonl --bf16 --output-dir out
    torchrun --nproc_per_node 8 -m sorsa_kernels.cli finetune --model ... --data ... --output-dir out [--fsdp]
    sorsa-kernels compare                       # SORSA vs PiSSA vs LoRA on the embedded default (or --model/--data)
    sorsa-kernels analyze --base out/base --adapter out/adapter      # ΔΣ/ΔD table + PNG (paper Fig. 2)
    sorsa-kernels merge --base out/base --adapter out/adapter --output merged
    sorsa-kernels export-lora --base out/base --adapter out/adapter --output lora
    sorsa-kernels plan --model Qwen/Qwen3-30B-A3B --quantize nf4 --rank 16 --gpu-memory 24GB   # memory, no weights

Every failure — bad input, a missing or corrupt file, a full disk, a refused resume —
ends with one line ``sorsa-kernels: error: …`` naming the file and the problem, and exit
status 1 (2 for a malformed command line, 130 for Ctrl-C); ``--debug`` (anywhere on the
command line) or ``SORSA_KERNELS_DEBUG=1`` shows the traceback instead.

The ``finetune`` and ``compare`` flags, their help and the defaults shown are generated from
the fields of their config dataclasses (:mod:`sorsa_kernels.jobs.options`;
an option is added there, not here) by :mod:`sorsa_kernels.jobs.flags`, where the
field names in the configs' errors become flags.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from .jobs.finetune import FinetuneConfig

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
        """One line naming the problem (with the nearest option or command), then where help is: not
        the whole usage, which for ``finetune`` is 37 lines that push the useful one off the screen."""
        self.exit(2, f"{self.prog}: error: {message}{_suggestion(message, self)}\nsee {self.prog} --help\n")


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


_FINETUNE = (
    "SORSA-fine-tune a causal LM on prompt/response pairs with the loss on the response only. "
    "Defaults for a real --model are the paper's (Table 3: AdamW, cosine schedule, global batch 128). "
    "With no --model, a tiny Llama is built and pretrained locally and fine-tuned on generated "
    "arithmetic word problems in under two minutes on a CPU, with its own rank, learning rate, batch "
    "and step count; each option's help gives both defaults.")
_COMPARE = (
    "Train SORSA (this package), PiSSA and LoRA (PEFT), and with {full:flag} full fine-tuning of the "
    "target matrices, with one budget (steps, batch, learning-rate schedule, seed, data order) and "
    "the same rank; record training loss, held-out loss, exact match, orthonormality and the paper's "
    "ΔΣ/ΔD every {record_every:flag} steps; write compare.json, compare.md and PNGs to {output_dir:flag} "
    "(default ./sorsa-compare-<time>). Takes the finetune flags; with none, the embedded default.")
_ANALYZE = (
    "Measure how far fine-tuning moved each adapted layer from its pretrained weight (the paper's Section 3): "
    "ΔΣ, the change of its singular values, and ΔD, of its singular vectors. Prints a row per layer and the "
    "mean, and draws ΔD against ΔΣ (Figure 2); several adapters (saved at successive steps) draw each layer's "
    "trajectory. The base must be the model the adapter was fitted to; it is only read.")
_MERGE = (
    "Fold a SORSA adapter into its base and save a plain transformers model (W0 + ΔW in every adapted layer, "
    "saved heads restored) that from_pretrained loads without sorsa-kernels; the tokenizer is copied when "
    "the base has one. Non-finite weights are refused; the folder is written whole or not at all.")
_EXPORT = (
    "Write a SORSA adapter as a standard PEFT LoRA adapter (rank 2r) for the original base: "
    "PeftModel.from_pretrained(base, OUTPUT) gives the fine-tuned model without sorsa-kernels. Saved heads "
    "become PEFT's modules_to_save; the task type follows the adapter's model class.")
_PLAN = (
    "Build the model on the meta device (only its config is read: a Hub id, folder, config.json or .gguf file) "
    "and print, per GPU, every component of a training step's memory and the peak; say whether it fits each "
    "GPU size and, if not, which memory levers would make it fit.")


def _add_configs(*which: int):
    """The adder of a command whose flags are those of the ``which``-th job configs
    (:func:`~sorsa_kernels.jobs.flags.config_classes`: 0 finetune, 1 compare, 2 plan)."""
    def add(p: argparse.ArgumentParser) -> None:
        from .jobs.flags import add_options, config_classes

        for i in which:
            add_options(p, config_classes()[i])
    return add


def _add_model_flags(p: argparse.ArgumentParser, nargs=None, what="adapter folder written by finetune / save_adapter",
                     output: bool = False) -> None:
    """The flags analyze, merge and export-lora share."""
    p.add_argument("--base", required=True, help="base model: a model folder, a Hub id, a .gguf file or 'embedded' "
                   "(loaded as the model class the adapter was trained on)")
    p.add_argument("--adapter", required=True, nargs=nargs, help=what)
    if output:
        p.add_argument("--output", required=True, help="folder to create")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="apply the adapter to a base other than the one it was fitted to, on purpose")


def _add_analyze(p: argparse.ArgumentParser) -> None:
    _add_model_flags(p, nargs="+", what="adapter folder(s); several give a trajectory")
    p.add_argument("--plot", metavar="PNG",
                   help="figure to write (default: singular_drift.png next to the (last) adapter)")
    p.add_argument("--no-plot", dest="draw", action="store_false", help="table only")


def _add_merge(p: argparse.ArgumentParser) -> None:
    _add_model_flags(p, output=True)
    p.add_argument("--allow-non-finite", action="store_true",
                   help="write the merged model even if a weight is NaN/Inf (refused by default)")


#: Every command: its help line, its description (a template of :func:`~sorsa_kernels.jobs.flags.cli_text`),
#: the function that adds its flags, and the name of the one that runs it.  Only the command run gets its
#: description and flags built: parsing never imports torch.
_COMMANDS = {
    "finetune": ("SORSA-fine-tune a causal LM (no arguments: the embedded offline demo)", _FINETUNE,
                 _add_configs(0), "_finetune"),
    "compare": ("train SORSA, PiSSA and LoRA side by side and record the paper's ΔΣ/ΔD analysis", _COMPARE,
                _add_configs(0, 1), "_compare"),
    "analyze": ("ΔΣ and ΔD per layer (paper Section 3) as a table and a PNG", _ANALYZE, _add_analyze, "_analyze"),
    "merge": ("merge an adapter into its base and save_pretrained the result", _MERGE, _add_merge, "_merge"),
    "export-lora": ("write an adapter as a standard PEFT LoRA adapter for the base", _EXPORT,
                    lambda p: _add_model_flags(p, output=True), "_export"),
    "plan": ("the GPU memory a finetune run needs, per component, from the model's config alone", _PLAN,
             _add_configs(2), "_plan"),
}


def build_parser(commands: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The ``sorsa-kernels`` argument parser; ``commands``: those whose flags are built (default: all).

    Example::

        >>> build_parser(["merge"]).parse_args(["merge", "--base", "b", "--adapter", "a", "--output", "o"]).output
        'o'
    """
    parser = _Parser(prog=PROG, description="Fast SORSA fine-tuning.")
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a failure (also accepted after the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_SubcommandParser)
    sub.required = True
    for name, (help_line, description, add, run) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_line)
        if commands is None or name in commands:
            p.description = description
            if "{" in description:  # names flags: loads the configs (and torch), so only for a template
                from .jobs.flags import cli_text

                p.description = cli_text(description)
            add(p)
        p.set_defaults(run=globals()[run])
    return parser


# ---------------------------------------------------------------------- commands
def config_from_args(args: argparse.Namespace) -> "FinetuneConfig":
    """The finetune job's config from parsed ``finetune`` (or ``compare``) arguments: the one
    place argparse meets it.  Every option's ``dest`` is a field; the parser's own entries
    (``command``, ``run``) and ``compare``'s options are left out.

    Example::

        >>> config_from_args(build_parser().parse_args(["finetune", "--rank", "8"])).rank
        8
    """
    from .jobs.flags import config_classes, config_from_args as from_args

    return from_args(args, config_classes()[0])


def _bars_wanted() -> bool:
    """Progress bars only for a person at a terminal: redirected to a file they are a wall of ``\\r``."""
    return sys.stderr.isatty()  # tqdm draws on stderr


def _job_config(args: argparse.Namespace) -> "FinetuneConfig":
    cfg = config_from_args(args)
    cfg.progress = cfg.progress and _bars_wanted()  # --quiet, or not a terminal: no bars
    return cfg


def _finetune(args: argparse.Namespace) -> int:
    from .jobs.finetune import run_finetune
    from .jobs.finetune.config import is_main_process

    result = run_finetune(_job_config(args))
    if not is_main_process():
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
    from .jobs.compare.config import CompareConfig
    from .jobs.compare.run import run_compare
    from .jobs.compare.markdown import ordering_line, scope_line, summary_table, timing_line

    from .jobs.flags import config_from_args as from_args

    args.finetune = _job_config(args)
    result = run_compare(from_args(args, CompareConfig))
    report = result.report
    print()
    print(summary_table(report))
    print(ordering_line(report))
    print(scope_line(report))
    print(timing_line(report))
    for path in result.files:
        print(f"wrote {path}")
    if result.plot_note:
        print(result.plot_note)
    if result.failed:  # the finished methods' results are written; say which method failed, once
        m, why = next(iter(result.failed.items()))
        more = f" (and {len(result.failed) - 1} more)" if len(result.failed) > 1 else ""
        raise ValueError(f"compare: method {m} {why}{more}; the other methods' results are in "
                         f"{result.output_dir / 'compare.json'}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from .jobs.flags import config_from_args as from_args
    from .jobs.plan import PlanConfig, run_plan

    report = run_plan(from_args(args, PlanConfig))
    print(json.dumps(report.as_json(), indent=2) if args.json else report.text())
    return 0


def _check_base(base: str) -> None:
    """A mistyped ``--base`` fails before torch is imported (about 0.1 s, not 6)."""
    from .jobs.models.paths import check_model_name

    check_model_name(base)


def _analyze(args: argparse.Namespace) -> int:
    _check_base(args.base)
    from .jobs.finetune import analyze_job, default_plot_path, plot_drift

    drift = analyze_job(args.base, args.adapter, progress=_bars_wanted(),
                        allow_base_mismatch=args.allow_base_mismatch)
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
    _check_base(args.base)
    from .jobs.finetune import merge_job

    out = merge_job(args.base, args.adapter, args.output, progress=_bars_wanted(),
                    allow_base_mismatch=args.allow_base_mismatch, allow_non_finite=args.allow_non_finite)
    print(f"merged model: {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    _check_base(args.base)
    from .jobs.finetune import export_lora_job

    out = export_lora_job(args.base, args.adapter, args.output, progress=_bars_wanted(),
                          allow_base_mismatch=args.allow_base_mismatch)
    print(f"PEFT LoRA adapter: {out}")
    return 0


def _one_line(e: BaseException) -> str:
    """An exception as one line: its message (with the type for unexpected kinds)."""
    options = sys.modules.get(f"{__package__}.jobs.options")  # a ConfigError exists only once it is loaded
    is_config = options is not None and isinstance(e, options.ConfigError)
    if is_config:
        from .jobs.flags import cli_name
    message = " ".join((e.render(cli_name) if is_config else str(e)).split())
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
    command = next((a for a in argv if not a.startswith("-")), None)  # the first word is the command
    args = build_parser([command] if command in _COMMANDS else []).parse_args(argv)
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
        if int(os.environ.get("RANK", "0")) == 0:  # torchrun: rank 0 says it once
            print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    finally:
        if "sorsa_kernels.jobs.finetune" in sys.modules:  # a job ran (an early error imports no torch)
            from .jobs.finetune import shutdown_distributed

            shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
