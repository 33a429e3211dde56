"""What ``compare``'s report says, on runs made up for the case (no training): ties are ties,
an optimum at the sweep's edge is flagged, tiny numbers stay readable, one definition of exact
match, the toy pointer only for the toy, plots that show equal series."""
import pytest

from sorsa_kernels.jobs.compare.config import CompareConfig
from sorsa_kernels.jobs.compare.markdown import markdown, ordering_line, scope_line, summary_table
from sorsa_kernels.jobs.compare.report import build_report, rank_groups
from sorsa_kernels.jobs.compare.sweep import next_auto_lr
from sorsa_kernels.jobs.finetune import FinetuneConfig


def fake_run(heldout, em, lr=1e-3, seed=0, **last):
    start = {"step": 0, "train_loss": None, "heldout_loss": 2.0, "exact_match": 0.0, "delta_sigma": 0.0,
             "delta_d": -9.252e-18, "relative_change": 0.0, "orthonormality": 0.0, "adapter_norm": 0.0}
    end = {**start, "step": 4, "train_loss": 1.5, "heldout_loss": heldout, "exact_match": em, "delta_sigma": 1e-3,
           "delta_d": 2e-4, "relative_change": 1.49e-4, **last}
    return {"records": [start, end], "trainable_params": 100, "steps": 4, "tokens": 64, "data_fingerprint": "ab",
            "train_s": 1.0, "step_s": 0.1, "record_s": 0.2, "evaluate_s": 0.3, "prepare_s": 0.0,
            "learning_rate": lr, "seed": seed}


def report_of(sweep, lr_sweep=None, model="embedded", answer_pattern=None, seeds=1):
    data_file = None if model == "embedded" else "train.jsonl"
    cfg = FinetuneConfig(model=model, data=data_file, answer_pattern=answer_pattern).resolved()
    config = CompareConfig(FinetuneConfig(model=model, data=data_file), lr_sweep=lr_sweep, seeds=seeds)
    data = {"model_parameters": 353_920, "heldout_examples": 100, "exact_match_examples": 8, "max_new_tokens": 6,
            "prompts_cut": 0, "answers_cut": 0, "chat_template": False}
    return build_report(config, cfg, sweep, {}, record_every=4, evaluate_every=1, data=data,
                        timing={"setup_s": 1.0, "total_s": 2.0, "cpu_s": 2.0},
                        machine={"peak_rss_bytes": 2**30})


def one_each(values):
    return {m: {1e-3: [fake_run(h, em)]} for m, (h, em) in values.items()}


def test_equal_exact_match_is_a_tie_not_an_order():
    report = report_of(one_each({"sorsa": (1.0, 0.0), "pissa": (1.1, 0.0), "lora": (1.2, 0.0)}))
    assert report["ordering"]["by_exact_match"] == [["sorsa", "pissa", "lora"]]
    assert report["ordering"]["agrees_exact_match"] is None
    line = ordering_line(report)
    assert "by exact match: SORSA = PiSSA = LoRA (tie)" in line and "exact match agrees" not in line
    assert report["ordering"]["by_heldout_loss"] == [["sorsa"], ["pissa"], ["lora"]]


def test_methods_rank_apart_only_where_their_seed_ranges_do_not_overlap():
    sweep = {"sorsa": {1e-3: [fake_run(1.00, 0.5), fake_run(1.20, 0.5, seed=1)]},
             "pissa": {1e-3: [fake_run(1.10, 0.5), fake_run(1.15, 0.5, seed=1)]},
             "lora": {1e-3: [fake_run(1.50, 0.25), fake_run(1.60, 0.25, seed=1)]}}
    report = report_of(sweep, seeds=2)
    assert report["methods"]["sorsa"]["final"]["heldout_loss"] == pytest.approx(1.10)
    assert report["methods"]["sorsa"]["final_range"]["heldout_loss"] == [1.00, 1.20]
    assert report["ordering"]["by_heldout_loss"] == [["sorsa", "pissa"], ["lora"]]
    assert "SORSA ≈ PiSSA (within noise) < LoRA" in ordering_line(report)
    assert "1.1000 [1.0000–1.2000]" in summary_table(report)


def test_an_optimum_at_the_sweep_edge_is_flagged_not_bracketed():
    sweep = {"sorsa": {1e-4: [fake_run(1.5, 0.0, 1e-4)], 3e-4: [fake_run(1.2, 0.0, 3e-4)],
                       1e-3: [fake_run(1.4, 0.0, 1e-3)]},
             "lora": {1e-4: [fake_run(1.5, 0.0, 1e-4)], 3e-4: [fake_run(1.4, 0.0, 3e-4)],
                      1e-3: [fake_run(1.3, 0.0, 1e-3)]}}
    report = report_of(sweep, lr_sweep=(1e-4, 3e-4, 1e-3))
    assert report["lr_sweep"]["bracketed"] == {"sorsa": True, "lora": False}
    assert report["methods"]["lora"]["bracketed"] is False
    table = summary_table(report)
    assert "0.001 (not bracketed)" in table and "0.0003 (not bracketed)" not in table
    assert "Not bracketed: LoRA" in markdown(report)


def test_auto_sweep_steps_by_three_beyond_the_edge_within_its_range():
    assert next_auto_lr([1e-4, 3e-4, 1e-3], 1e-3) == 3e-3
    assert next_auto_lr([1e-4, 3e-4, 1e-3], 1e-4) == pytest.approx(3.33e-5)
    assert next_auto_lr([1e-4, 3e-4, 1e-3], 3e-4) is None
    assert next_auto_lr([3e-2, 1e-1], 1e-1) is None  # 3e-1 is beyond 1e-1


def test_tiny_numbers_are_scientific_and_rounding_noise_at_step_0_prints_as_0():
    report = report_of(one_each({"sorsa": (1.0, 0.0), "lora": (1.2, 0.0)}))
    md = markdown(report)
    assert "1.490e-04" in summary_table(report)  # ‖ΔW‖/‖W0‖, not 0.000
    step0 = next(l for l in md.splitlines() if l.startswith("| 0 |"))
    assert "e-18" not in step0 and "| 0 | 0 |" in step0  # ΔD −9.252e-18 → 0, ‖ΔW‖/‖W0‖ 0


@pytest.mark.parametrize("pattern", [None, r"#### (\S+)"])
def test_the_report_defines_exact_match_once_as_it_was_computed(pattern):
    md = markdown(report_of(one_each({"sorsa": (1.0, 0.0)}), answer_pattern=pattern))
    assert md.count("Exact match") == 1 and "equals the response." not in md
    assert ("#### (\\S+)" in md.split("Exact match")[1]) == (pattern is not None)


def test_report_states_counts_budget_and_pattern_so_a_percentage_reads_as_a_count():
    md = markdown(report_of(one_each({"sorsa": (1.0, 0.0)}), answer_pattern=r"#### (\S+)"))
    assert "exact match on 8 of them" in md and "max_new_tokens 6" in md and "answer pattern `#### (\\S+)`" in md
    assert "100 examples" in md and "prompts cut: 0" in md and "0.0 % (0/8)" in md


def test_only_the_embedded_toy_points_to_the_real_model_comparison_and_its_size_is_counted():
    toy = scope_line(report_of(one_each({"sorsa": (1.0, 0.0)})))
    real = scope_line(report_of(one_each({"sorsa": (1.0, 0.0)}), model="some/model"))
    assert "docs/results/compare-smollm2-cpu.md" in toy and "353,920-parameter" in toy and "0.6 M" not in toy
    assert "docs/results" not in real


def test_equal_series_stay_visible_and_exact_match_is_plotted_in_percent(tmp_path, monkeypatch):
    import matplotlib.figure

    from sorsa_kernels.jobs.compare.plots import STYLES, plot_all

    assert len({(marker, dash) for _, marker, dash, _ in STYLES.values()}) == len(STYLES)
    assert len({marker for _, marker, _, _ in STYLES.values()}) == len(STYLES)
    figures = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: (figures.append(self), real_savefig(self, *a, **k))[1])
    plot_all(report_of(one_each({"sorsa": (1.0, 0.5), "pissa": (1.0, 0.5), "lora": (1.0, 0.5)})), tmp_path)
    em_axis = figures[0].axes[2]
    lines = em_axis.get_lines()
    assert "%" in em_axis.get_ylabel() and max(lines[0].get_ydata()) == 50
    assert len({(l.get_marker(), l.get_linestyle()) for l in lines}) == 3


def test_rank_groups_compares_at_printed_precision():
    finals = {"a": {"heldout_loss": 1.00001}, "b": {"heldout_loss": 1.00002}}
    assert rank_groups(finals, {"a": {}, "b": {}}, "heldout_loss") == [["a", "b"]]


def test_different_targets_are_stated_per_method_never_as_the_same_targets():
    from sorsa_kernels.jobs.compare.report import parameter_matching
    from sorsa_kernels.jobs.compare.training import method_targets

    linear, experts = ["a.q_proj", "a.v_proj"], ["a.experts.gate_up_proj", "a.experts.down_proj"]
    targets = {m: method_targets(m, linear, experts) for m in ("sorsa", "pissa", "lora")}
    assert targets["lora"]["expert_parameters"] == experts and targets["pissa"]["expert_parameters"] == []
    text = parameter_matching(targets)
    assert "Same rank r and target matrices" not in text and "do not adapt the same weights" in text
    assert "PiSSA: 2 linear matrices only" not in text and "PEFT's PiSSA cannot initialize" in text
    assert "LoRA: 2 linear matrices and 2 fused routed-expert weights" in text
    same = parameter_matching({m: method_targets(m, linear, []) for m in ("sorsa", "pissa", "lora")})
    assert same.startswith("Same rank r and target matrices for every adapter")


def test_lora_gets_the_experts_sorsa_adapts_on_an_moe_model():
    import torch
    import transformers

    from sorsa_kernels.adapters.experts import expert_weight_names
    from sorsa_kernels.adapters.plan import plan_sorsa
    from sorsa_kernels.jobs.compare.training import prepare
    from sorsa_kernels.training.drift_callback import tracked_layers

    def mixtral():
        torch.manual_seed(0)
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(
            vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2))

    base = mixtral()
    plan = plan_sorsa(base, 2)
    linear = plan.linear
    experts = [f"{n}.{p}" for n in plan.experts for p in expert_weight_names(base.get_submodule(n))]
    cfg = FinetuneConfig(rank=2, progress=False).resolved()
    lora = prepare("lora", mixtral(), cfg, linear, tuple(experts))
    only_linear = prepare("lora", mixtral(), cfg, linear, ())
    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable(lora) > trainable(only_linear)
    assert set(tracked_layers(lora)) == set(linear)  # the recorder follows the matrices, not the ParamWrappers
