"""``run_compare`` end to end on the embedded model with tiny budgets: the pretrained model is
evaluated once, step time is reported apart from recording and evaluation, seeds give a mean
and a range, only one pretrained copy and one working copy are alive, a prompt is never cut,
and ``--lr-sweep auto`` extends the sweep beyond an optimum at its edge."""
import gc

import pytest

import sorsa_kernels.jobs.compare.run as CMP
from sorsa_kernels.jobs.compare.run import CompareConfig, run_compare
from sorsa_kernels.jobs.finetune import FinetuneConfig

TINY = dict(max_steps=2, pretrain_steps=0, eval_samples=2, rank=2, progress=False)
LRS = (1e-3, 1e-2)


def _live_models() -> int:
    """Whole language models alive (their inner ``LlamaModel`` is not counted again)."""
    from transformers import GenerationMixin

    return sum(isinstance(o, GenerationMixin) for o in gc.get_objects())


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """One comparison (2 methods × 2 learning rates × 2 seeds) with the evaluations counted and
    the models alive at each training start."""
    mp = pytest.MonkeyPatch()
    calls, alive = [], []
    real_evaluator, real_train = CMP.evaluator, CMP.train_run

    def evaluator(*args, **kwargs):
        evaluate = real_evaluator(*args, **kwargs)
        return lambda model: (calls.append(1), evaluate(model))[1]

    def train_run(*args, **kwargs):
        gc.collect()
        alive.append(_live_models())
        return real_train(*args, **kwargs)

    import sorsa_kernels.training.drift_callback as DC

    real_spectrum = DC.spectrum
    mp.setattr(CMP, "evaluator", evaluator)
    mp.setattr(CMP, "train_run", train_run)
    mp.setattr(DC, "spectrum", lambda w: (svds_in_runs.append(1), real_spectrum(w))[1])
    svds_in_runs = []
    peak_before = CMP.peak_rss_bytes()
    try:
        cfg = FinetuneConfig(output_dir=str(tmp_path_factory.mktemp("runs") / "out"), **TINY)
        result = run_compare(CompareConfig(cfg, methods=("sorsa", "lora"), record_every=1, lr_sweep=LRS, seeds=2,
                                           plots=False))
    finally:
        mp.undo()
    result.svds_in_runs = svds_in_runs
    result.peak_before = peak_before
    return result, calls, alive


def test_the_pretrained_model_is_evaluated_once_per_comparison(watched):
    result, calls, _ = watched
    runs = [r for cells in result.report["lr_sweep"]["runs"].values() for r in cells]
    assert len(runs) == 4 and all(r["seeds"] == 2 for r in runs)
    evaluated_records = 3 * 8  # steps 0, 1, 2 of each of 8 runs; step 0 comes from the one evaluation
    assert len(calls) == 1 + evaluated_records - 8


def test_step_time_is_reported_apart_from_recording_and_evaluation(watched):
    result, _, _ = watched
    for v in result.report["methods"].values():
        assert 0 < v["step_s"] < v["train_s"] and v["record_s"] > 0 and v["evaluate_s"] > 0
        assert v["step_s"] * v["steps"] + v["record_s"] + v["evaluate_s"] <= v["train_s"] * 1.05
    md = (result.output_dir / "compare.md").read_text()
    assert "step (median)" in md and "of which recording" in md


def test_seeds_give_a_mean_and_a_min_max_range(watched):
    result, _, _ = watched
    for v in result.report["methods"].values():
        lo, hi = v["final_range"]["heldout_loss"]
        assert v["seeds_run"] == 2 and lo <= v["final"]["heldout_loss"] <= hi and lo < hi
    assert result.report["settings"]["seeds"] == 2


def test_one_pretrained_copy_and_one_working_copy_are_alive_while_training(watched):
    result, _, alive = watched
    # Two models: the pretrained copy and the method's working copy (the old code held a third for
    # every learning rate of a sweep but the last, and each method's model until the next was built).
    assert alive and max(alive) == 2, alive
    assert result.report["machine"]["peak_rss_bytes"] > 0


def test_peak_memory_of_a_small_compare_stays_below_its_bound(watched):
    result, _, _ = watched
    # Bound: the interpreter with torch, transformers and PEFT imported (≈ 0.5 GiB here) plus a few
    # copies of a 353,920-parameter model (1.4 MB each) and the data: 1.5 GiB leaves room for the test
    # process itself.  The peak is the process's: where an earlier test already set a higher one, the
    # comparison must not have raised it.
    bound = max(1.5 * 2**30, result.peak_before or 0)
    assert result.report["machine"]["peak_rss_bytes"] <= bound


def test_a_prompt_that_leaves_no_room_to_generate_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(CMP, "train_run", lambda *a, **k: pytest.fail("trained"))
    cfg = FinetuneConfig(output_dir=str(tmp_path / "o"), max_length=40, **TINY)
    with pytest.raises(ValueError, match=r"the longest held-out prompt has \d+ tokens and --max-length is 40: "
                                         r"no token is left to generate an answer"):
        run_compare(CompareConfig(cfg, methods=("sorsa",), record_every=1, plots=False))


def test_auto_sweep_adds_one_step_beyond_an_edge_optimum_until_bracketed(tmp_path, monkeypatch):
    import math

    def fake_train(method, model, tokenizer, cfg, *args, **kwargs):  # best at 3e-3: one step beyond 1e-3
        loss = 1 + (math.log10(cfg.learning_rate) - math.log10(3e-3)) ** 2
        rec = {"step": 0, "heldout_loss": 2.0, "train_loss": None}
        return {"records": [rec, {**rec, "step": 2, "heldout_loss": loss, "train_loss": loss}],
                "trainable_params": 1, "steps": 2, "tokens": 1, "data_fingerprint": "x", "train_s": 0.0,
                "step_s": 0.0, "record_s": 0.0, "evaluate_s": 0.0}

    monkeypatch.setattr(CMP, "train_run", fake_train)
    cfg = FinetuneConfig(output_dir=str(tmp_path / "o"), **TINY)
    result = run_compare(CompareConfig(cfg, methods=("lora",), record_every=1, lr_sweep="auto", plots=False))
    sweep = result.report["lr_sweep"]
    assert sweep["learning_rates"] == [1e-4, 3e-4, 1e-3, 3e-3, 9e-3]
    assert sweep["best"] == {"lora": 3e-3} and sweep["bracketed"] == {"lora": True}


def test_auto_sweep_stops_after_three_extensions_and_says_not_bracketed(tmp_path, monkeypatch):
    def fake_train(method, model, tokenizer, cfg, *args, **kwargs):  # always better at a higher lr
        rec = {"step": 0, "heldout_loss": 2.0, "train_loss": None}
        return {"records": [rec, {**rec, "step": 2, "heldout_loss": 1 / cfg.learning_rate, "train_loss": 1.0}],
                "trainable_params": 1, "steps": 2, "tokens": 1, "data_fingerprint": "x", "train_s": 0.0,
                "step_s": 0.0, "record_s": 0.0, "evaluate_s": 0.0}

    monkeypatch.setattr(CMP, "train_run", fake_train)
    cfg = FinetuneConfig(output_dir=str(tmp_path / "o"), **TINY)
    result = run_compare(CompareConfig(cfg, methods=("lora",), record_every=1, lr_sweep="auto", plots=False))
    assert result.report["lr_sweep"]["learning_rates"] == [1e-4, 3e-4, 1e-3, 3e-3, 9e-3, 0.027]
    assert result.report["methods"]["lora"]["bracketed"] is False


def test_finetune_and_compare_report_the_same_heldout_loss_for_sorsa(tmp_path):
    from sorsa_kernels.jobs.finetune import run_finetune

    small = dict(max_steps=2, pretrain_steps=5, eval_samples=1, rank=2, progress=False)
    tuned = run_finetune(FinetuneConfig(output_dir=str(tmp_path / "ft"), **small))
    compared = run_compare(CompareConfig(FinetuneConfig(output_dir=str(tmp_path / "cmp"), **small),
                                         methods=("sorsa",), record_every=2, plots=False))
    final = compared.report["methods"]["sorsa"]["final"]
    # Both are the mean over every held-out response token (the Trainer's mean of batch means was not);
    # before training, finetune evaluates the SVD-split model and compare the pretrained one: rounding apart.
    assert final["heldout_loss_start"] == pytest.approx(tuned.before["loss"], rel=1e-6)
    assert final["heldout_loss"] == pytest.approx(tuned.after["loss"], rel=1e-9)


def test_compare_takes_randomized_svd_and_gives_pissa_its_niter_init():
    from sorsa_kernels.jobs.compare.training import pissa_init

    assert CompareConfig(FinetuneConfig(svd="randomized")).finetune.svd == "randomized"
    assert pissa_init("randomized") == "pissa_niter_2" and pissa_init("full") == "pissa"


def test_the_svd_of_w0_is_computed_once_in_setup_not_in_a_methods_time(watched):
    result, _, _ = watched
    assert result.svds_in_runs == []  # every recorder reused the setup's SVD of each pretrained matrix
    assert result.report["timing_s"]["w0_svd_s"] > 0


def test_every_prepared_method_evaluates_as_the_pretrained_model_so_one_start_evaluation_serves_all():
    import copy

    import torch

    from sorsa_kernels.adapters.surgery import find_targets
    from sorsa_kernels.jobs.compare.run import load_splits
    from sorsa_kernels.jobs.compare.training import evaluator, prepare
    from sorsa_kernels.jobs.finetune.encoding import ListDataset, encode_all
    from sorsa_kernels.jobs.finetune.model import load_base

    cfg = FinetuneConfig(pretrain_steps=5, rank=4, progress=False).resolved()
    _, held = load_splits(cfg)
    base, tok = load_base("embedded", pretrain_steps=5, progress=False)
    evaluate = evaluator(tok, ListDataset(encode_all(tok, held, cfg, False, "held-out")), held[:4], cfg, False, 6)
    with torch.no_grad():
        start = evaluate(base.eval())
        for method in ("sorsa", "pissa", "lora"):
            torch.manual_seed(0)
            got = evaluate(prepare(method, copy.deepcopy(base), cfg, find_targets(base)).eval())
            assert got["heldout_loss"] == pytest.approx(start["heldout_loss"], rel=1e-5), method
            assert got["exact_match"] == start["exact_match"], method
