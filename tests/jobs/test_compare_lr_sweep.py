"""``compare --lr-sweep``: every method trained at every learning rate with one budget, each reported at its best."""
import json
import math

import pytest

from sorsa_kernels.cli import main
from sorsa_kernels.jobs.compare.run import CompareConfig, best_learning_rate, run_compare
from sorsa_kernels.jobs.compare.config import parse_lr_sweep
from sorsa_kernels.jobs.compare.report import SWEEP_PLOT
from sorsa_kernels.jobs.finetune import FinetuneConfig

LRS = (1e-3, 1e-2)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    cfg = FinetuneConfig(output_dir=str(tmp_path_factory.mktemp("sweep") / "out"), max_steps=2, pretrain_steps=5,
                         eval_samples=4, rank=2, progress=False)
    return run_compare(CompareConfig(cfg, methods=("sorsa", "lora"), record_every=1, lr_sweep=LRS))


def test_each_method_is_reported_at_the_lr_with_its_lowest_final_heldout_loss(result):
    sweep = result.report["lr_sweep"]
    assert sweep["learning_rates"] == list(LRS)
    for method, runs in sweep["runs"].items():
        assert [r["learning_rate"] for r in runs] == list(LRS)
        best = min(runs, key=lambda r: r["heldout_loss"])
        assert sweep["best"][method] == best["learning_rate"]
        chosen = result.report["methods"][method]
        assert chosen["learning_rate"] == best["learning_rate"]
        assert chosen["final"]["heldout_loss"] == best["heldout_loss"]
    assert result.report["settings"]["learning_rate"] is None and result.report["settings"]["lr_sweep"] == list(LRS)


def test_every_run_of_the_sweep_gets_the_same_budget_and_data_order(result):
    runs = [r for runs in result.report["lr_sweep"]["runs"].values() for r in runs]
    for key in ("steps", "tokens", "data_fingerprint"):
        assert len({r[key] for r in runs}) == 1, key
    losses = {r["heldout_loss"] for r in result.report["lr_sweep"]["runs"]["sorsa"]}
    assert len(losses) == len(LRS)  # the learning rate really changed the run


def test_every_run_starts_from_the_same_initialization(result):
    for runs in result.report["lr_sweep"]["runs"].values():
        starts = {r["heldout_curve"][0][1] for r in runs}
        assert len(starts) == 1 and runs[0]["heldout_curve"][0][0] == 0


def test_sweep_table_plot_and_json_are_written(result):
    md = (result.output_dir / "compare.md").read_text()
    assert "## Learning-rate sweep" in md and "| method | lr 0.001 | lr 0.01 |" in md and "**" in md
    assert any(l.startswith("| method | best lr |") for l in md.splitlines())
    assert (result.output_dir / SWEEP_PLOT) in result.files and (result.output_dir / SWEEP_PLOT).stat().st_size > 10_000
    assert json.loads((result.output_dir / "compare.json").read_text())["lr_sweep"]["best"] == result.report["lr_sweep"]["best"]


def _run(loss):
    return {"records": [{"heldout_loss": 9.0}, {"heldout_loss": loss}]}


def test_a_diverged_run_never_wins_and_ties_go_to_the_smaller_lr():
    assert best_learning_rate({1e-3: _run(2.0), 1e-2: _run(math.nan), 1e-1: _run(math.inf)}) == 1e-3
    assert best_learning_rate({1e-2: _run(1.0), 1e-3: _run(1.0)}) == 1e-3
    assert best_learning_rate({1e-2: _run(math.nan), 1e-3: _run(None)}) == 1e-3


def test_parse_lr_sweep_reads_a_comma_separated_list_or_numbers():
    assert parse_lr_sweep("1e-4, 3e-4,1e-3") == (1e-4, 3e-4, 1e-3)
    assert CompareConfig(lr_sweep=[1e-3, 1]).lr_sweep == (1e-3, 1.0)


def test_a_bad_lr_sweep_in_python_names_the_field():
    from sorsa_kernels.jobs.options import ConfigError

    with pytest.raises(ConfigError, match="lr_sweep: every learning rate must be a positive finite number, got 0"):
        CompareConfig(lr_sweep=(1e-3, 0))


@pytest.mark.parametrize("argv, message", [
    (["--lr-sweep", "1e-3,fast"], "lr-sweep '1e-3,fast' is not a comma-separated list of learning rates"),
    (["--lr-sweep", "1e-3,-1"], "lr-sweep: every learning rate must be a positive finite number, got -1.0"),
    (["--lr-sweep", "1e-3,nan"], "lr-sweep: every learning rate must be a positive finite number, got nan"),
    (["--lr-sweep", "1e-3,0.001"], "lr-sweep lists a learning rate twice: 0.001, 0.001"),
    (["--lr-sweep", "1e-3", "--lr", "1e-2"], "compare takes --learning-rate or --lr-sweep, not both"),
])
def test_bad_lr_sweeps_are_one_line_errors(argv, message, tmp_path, capsys):
    rc = main(["compare", *argv, "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("sorsa-kernels: error:")]
    assert rc == 1 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "o").exists()


def _failing_at(monkeypatch, bad_lrs):
    import sorsa_kernels.jobs.compare.run as CMP

    real = CMP.train_run

    def train(method, model, tokenizer, cfg, *args):
        if cfg.learning_rate in bad_lrs:
            raise CMP.MethodFailed(f"diverged: training loss nan at step 1 (lr {cfg.learning_rate:g})")
        return real(method, model, tokenizer, cfg, *args)

    monkeypatch.setattr(CMP, "train_run", train)


def _sorsa_sweep(tmp_path):
    cfg = FinetuneConfig(output_dir=str(tmp_path / "out"), max_steps=1, pretrain_steps=0, eval_samples=2, rank=2,
                         progress=False)
    return run_compare(CompareConfig(cfg, methods=("sorsa",), record_every=1, lr_sweep=LRS, plots=False))


def test_a_learning_rate_that_diverges_is_left_out_of_the_choice_and_marked(tmp_path, monkeypatch):
    _failing_at(monkeypatch, {LRS[1]})
    result = _sorsa_sweep(tmp_path)
    assert result.report["methods"]["sorsa"]["learning_rate"] == LRS[0] and "failed" not in result.report
    assert result.report["lr_sweep"]["failed"] == {"sorsa": {"0.01": "diverged: training loss nan at step 1 (lr 0.01)"}}
    assert "| SORSA | **" in (result.output_dir / "compare.md").read_text()
    assert "| failed |" in (result.output_dir / "compare.md").read_text()


def test_a_method_fails_only_when_every_learning_rate_does(tmp_path, monkeypatch):
    _failing_at(monkeypatch, set(LRS))
    with pytest.raises(ValueError, match=r"every method failed: sorsa: every learning rate failed: lr 0.001: "
                                         r"diverged: .*; lr 0.01: diverged"):
        _sorsa_sweep(tmp_path)
