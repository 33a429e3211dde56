"""The architecture zoo: every architecture SORSA names as supported, built tiny from its ``transformers``
config class (hidden 64, 2 layers, random weights, no download), through the whole product with default targets.

Per architecture, once (cached): ``apply_sorsa`` with default targets → logits unchanged → 3 AdamW
steps with the regularizer → save → load on a fresh copy of the base → merge → PEFT export loaded by
``peft`` → QSORSA applied and trained.  Each check is its own test reading that run.  One thread.

The MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) adapt their fused routed experts with the default
targets (``SORSAExperts``); ``export_peft_lora`` writes them as LoRA on PEFT's ``target_parameters``,
which ``peft`` loads (checked here), and under ``quantize="nf4"`` the experts are QSORSA experts (NF4
residual per expert) and train with the linear layers.

``python tests/adapters/test_zoo.py`` prints the table of checks and max |Δlogits|.
"""
from __future__ import annotations

import copy
import functools
import logging
import time
import traceback

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from sorsa_kernels import (  # noqa: E402
    add_regularizer_grad,
    adaptation_summary,
    apply_sorsa,
    export_peft_lora,
    load_adapter,
    merge_sorsa,
    save_adapter,
)
from sorsa_kernels.adapters.experts import adapted_experts, find_fused_experts  # noqa: E402
from sorsa_kernels.adapters.modules_to_save import SavedModule  # noqa: E402
from sorsa_kernels.nn.qexperts import QSORSAExperts  # noqa: E402
from sorsa_kernels.nn.checks import is_conv1d  # noqa: E402
from sorsa_kernels.adapters.peft_export import peft_moe_renamed_targets  # noqa: E402
from sorsa_kernels.adapters.surgery import sorsa_layers  # noqa: E402
from sorsa_kernels.adapters.targets import EXPERTS, TARGETS_BY_MODEL_TYPE, is_linear_like  # noqa: E402

H, V, RANK = 64, 128, 4
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DEC = dict(hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=V, max_position_embeddings=64, **_IDS)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
_ENC = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=V,
            max_position_embeddings=64, num_labels=3, **_IDS)

#: architecture → (config class, model class, config kwargs, linear modules left alone (name suffixes),
#: fused routed experts (adapted by default))
ZOO = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DEC, ("lm_head",), False),
    "mistral": ("MistralConfig", "MistralForCausalLM", _DEC, ("lm_head",), False),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_DEC, num_local_experts=4, num_experts_per_tok=2),
                ("lm_head",), True),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DEC, ("lm_head",), False),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(_DEC, num_experts=4, shared_expert_intermediate_size=64, **_MOE),
                  ("lm_head", "shared_expert_gate"), True),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_DEC, head_dim=16), ("lm_head",), False),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(_DEC, head_dim=16, num_experts=4, **_MOE),
                  ("lm_head",), True),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_DEC, head_dim=16), ("lm_head",), False),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_DEC, head_dim=16), ("lm_head",), False),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_DEC, head_dim=16), ("lm_head",), False),
    "phi": ("PhiConfig", "PhiForCausalLM", _DEC, ("lm_head",), False),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _DEC, ("lm_head",), False),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=H, n_layer=2, n_head=4, vocab_size=V, n_positions=64, **_IDS),
             ("lm_head",), False),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _DEC, ("lm_head",), False),
    "gptj": ("GPTJConfig", "GPTJForCausalLM",
             dict(n_embd=H, n_layer=2, n_head=4, vocab_size=V, n_positions=64, rotary_dim=8, **_IDS), ("lm_head",), False),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, vocab_size=V, **_IDS), ("lm_head",), False),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=H, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
                 word_embed_proj_dim=H, max_position_embeddings=64, **_IDS), ("lm_head",), False),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=H, n_layer=2, n_head=4, vocab_size=V, **_IDS),
              ("lm_head",), False),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", _DEC, ("lm_head",), False),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(_DEC, num_experts=4, num_experts_per_tok=2), ("lm_head",), True),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(_DEC, intermediate_size=32, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                     layer_types=["sliding_attention", "full_attention"], sliding_window=8), ("lm_head",), True),
    # MLA attention, a dense first layer (first_k_dense_replace=1), shared + routed experts
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(_DEC, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                         q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                         n_group=1, topk_group=1, rope_scaling=None, **_MOE), ("lm_head",), True),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", _DEC, ("lm_head",), False),
    "t5": ("T5Config", "T5ForConditionalGeneration",
           dict(d_model=H, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=V, decoder_start_token_id=0, **_IDS),
           ("lm_head",), False),
    "bert": ("BertConfig", "BertForSequenceClassification", _ENC, ("pooler.dense",), False),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", _ENC, (), False),
    "vit": ("ViTConfig", "ViTForImageClassification",
            dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=16,
                 patch_size=8, num_labels=3), (), False),
    # a decoder with a classification head: PEFT's SEQ_CLS export with the `score` head
    "qwen2 (seq-cls)": ("Qwen2Config", "Qwen2ForSequenceClassification", dict(_DEC, num_labels=3), (), False),
}
CHECKS = ("targets", "init", "train", "save_load", "merge", "peft", "qsorsa")
#: max |Δlogits| allowed (float32 models; SORSA's split and PEFT's rank-2r LoRA round differently)
TOL = 1e-5


def _build(arch: str):
    cfg_cls, model_cls, kwargs, _, _ = ZOO[arch]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config).eval()
    return model


def _inputs(arch: str, model) -> dict:
    g = torch.Generator().manual_seed(1)
    if arch == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    ids = torch.randint(3, V, (2, 8), generator=g)
    if arch == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, V, (2, 5), generator=g)}
    return {"input_ids": ids}


class _Records(logging.Handler):
    """The messages of the warnings logged while attached."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def _maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


def _train(model, inputs, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(**inputs).logits.float().square().mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        add_regularizer_grad(model, gamma=4e-4, lr_max=1e-2)
        opt.step()


@functools.lru_cache(maxsize=None)
def run_zoo(arch: str, tmp: str) -> dict:
    """Every check of one architecture: ``{check: (ok, detail)}``; detail is max |Δlogits| or the error."""
    from pathlib import Path

    tmp = Path(tmp)
    res: dict = {}
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = _build(arch)
        inputs = _inputs(arch, base)
        ref = _logits(base, inputs)
        model = copy.deepcopy(base)

        def stage(name, fn):
            try:
                res[name] = (True, fn())
            except Exception as e:  # recorded; the check's own test fails with it
                res[name] = (False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")
            return res[name][0]

        def targets():
            apply_sorsa(model, RANK, progress=False)
            s = adaptation_summary(model)
            left = [n for n in s.not_adapted if not n.endswith(ZOO[arch][3])]
            assert s.adapted > 0 and not left, f"linear modules not adapted: {left}"
            assert not s.fused_experts, f"fused expert weights not adapted: {s.fused_experts}"
            names = TARGETS_BY_MODEL_TYPE[model.config.model_type]
            assert all(any(n == t or n.endswith("." + t) for t in names) for n in sorsa_layers(model))
            experts = sorted(adapted_experts(model))  # every experts module of the base, both projections
            assert experts == sorted(find_fused_experts(base)) and bool(experts) == ZOO[arch][4], experts
            assert (EXPERTS in names) == ZOO[arch][4]
            for proj in ("gate_up_proj", "down_proj") if ZOO[arch][4] else ():
                assert s.layers[f"mlp.experts.{proj}"] == len(experts), s.layers
            return s

        def init():
            d = _maxdiff(_logits(model, inputs), ref)
            assert d < TOL, d
            return d

        def train():
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            _train(model, inputs)
            changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
            allowed = {n for n, p in model.named_parameters() if p.requires_grad}
            assert changed and changed <= allowed, sorted(changed - allowed)
            assert all(n.rsplit(".", 1)[-1] in "USV" or ".trained." in n for n in allowed), sorted(allowed)[:5]
            assert any(".experts." in n for n in changed) == ZOO[arch][4]  # the experts' factors train too
            heads = [n for n, m in model.named_modules() if isinstance(m, SavedModule)]
            assert all(any(c.startswith(h + ".trained.") for c in changed) for h in heads), heads
            return len(changed)

        trained_logits = {}

        def save_load():
            trained_logits["y"] = _logits(model, inputs)
            # training moved the logits far beyond TOL, so the comparisons below can fail
            assert _maxdiff(trained_logits["y"], ref) > 100 * TOL
            save_adapter(model, tmp / "adapter")
            fresh = load_adapter(copy.deepcopy(base), tmp / "adapter")
            trained_logits["fresh"] = fresh
            d = _maxdiff(_logits(fresh, inputs), trained_logits["y"])
            assert d < TOL, d
            return d

        def merge():
            merged = merge_sorsa(trained_logits["fresh"])
            assert not sorsa_layers(merged) and not any(isinstance(m, SavedModule) for m in merged.modules())
            assert not adapted_experts(merged) and find_fused_experts(merged) == find_fused_experts(base)
            # GPT-2's Conv1D layers merge back into Conv1D (an nn.Linear subclass such as FalconLinear into nn.Linear)
            kinds = lambda m: [is_conv1d(x) for x in m.modules() if is_linear_like(x)]  # noqa: E731
            assert kinds(merged) == kinds(base)
            d = _maxdiff(_logits(merged, inputs), trained_logits["y"])
            assert d < TOL, d
            return d

        def peft_export():
            renamed = peft_moe_renamed_targets(model, sorsa_layers(model))
            if renamed:  # PEFT's v4 → v5 MoE conversion would drop these dense layers: the export refuses
                with pytest.raises(ValueError, match="PEFT would load this .* LoRA wrongly") as e:
                    export_peft_lora(model, tmp / "lora")
                assert renamed[0] in str(e.value)
                return f"refused: PEFT renames {len(renamed)} dense layers"
            export_peft_lora(model, tmp / "lora")
            lora = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp / "lora").eval()
            d = _maxdiff(_logits(lora, inputs), trained_logits["y"])
            assert d < TOL, d
            return d

        def qsorsa():
            q = copy.deepcopy(base)
            warned = _Records()
            log = logging.getLogger("sorsa_kernels")
            log.addHandler(warned)
            try:
                apply_sorsa(q, RANK, quantize="nf4", quant_report=None, progress=False)
            finally:
                log.removeHandler(warned)
            # routed experts are adapted as QSORSA experts (NF4 residual per expert), no warning, and train
            experts = adapted_experts(q)
            assert sorted(experts) == sorted(find_fused_experts(base) if ZOO[arch][4] else []), sorted(experts)
            assert all(isinstance(m.down_proj, QSORSAExperts) for m in experts.values())
            assert not adaptation_summary(q).fused_experts
            assert not any("routed experts" in m for m in warned.messages), warned.messages
            d = _maxdiff(_logits(q, inputs), ref)
            before = {n: p.detach().clone() for n, p in q.named_parameters() if p.requires_grad}
            _train(q, inputs, steps=1)
            changed = {n for n, p in q.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
            assert changed
            assert any(".experts." in n for n in changed) == ZOO[arch][4]  # the QSORSA experts' factors train
            assert torch.isfinite(_logits(q, inputs)).all()
            return d  # the NF4 quantization error at init (not a defect)

        if stage("targets", targets) and stage("init", init) and stage("train", train):
            if stage("save_load", save_load):
                stage("merge", merge)
            if "y" in trained_logits:
                stage("peft", peft_export)
        stage("qsorsa", qsorsa)
    finally:
        torch.set_num_threads(threads)
    res["seconds"] = time.perf_counter() - t0
    return res


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return lambda arch: run_zoo(arch, str(root / arch.replace(" ", "_")))


def _check(zoo, arch, check):
    res = zoo(arch)
    if check not in res:
        pytest.fail(f"{arch}: {check} did not run (an earlier check failed: "
                    f"{[k for k, v in res.items() if k in CHECKS and not v[0]]})")
    ok, detail = res[check]
    assert ok, f"{arch}: {check}: {detail}"


ARCHS = list(ZOO)


@pytest.mark.parametrize("arch", ARCHS)
def test_default_targets_adapt_every_projection(zoo, arch):
    _check(zoo, arch, "targets")


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_right_after_adaptation(zoo, arch):
    _check(zoo, arch, "init")


@pytest.mark.parametrize("arch", ARCHS)
def test_training_changes_only_adapter_and_saved_head_parameters(zoo, arch):
    _check(zoo, arch, "train")


@pytest.mark.parametrize("arch", ARCHS)
def test_save_then_load_on_fresh_base_reproduces_logits(zoo, arch):
    _check(zoo, arch, "save_load")


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_reproduces_logits(zoo, arch):
    _check(zoo, arch, "merge")


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_export_loaded_by_peft_reproduces_logits(zoo, arch):
    _check(zoo, arch, "peft")


@pytest.mark.parametrize("arch", ARCHS)
def test_qsorsa_applies_and_trains(zoo, arch):
    _check(zoo, arch, "qsorsa")


def test_table_lists_every_architecture_the_issue_names():
    named = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
             "gemma3_text", "phi", "phi3", "gpt2", "gpt_neox", "gptj", "falcon", "opt", "bloom", "olmo", "olmoe",
             "starcoder2", "t5", "bert", "roberta", "vit", "gpt_oss", "deepseek_v3"}
    assert named <= set(TARGETS_BY_MODEL_TYPE) and named <= set(ZOO)


if __name__ == "__main__":  # the table for a closing note
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print("| architecture | " + " | ".join(CHECKS) + " | s |")
        print("|---" * (len(CHECKS) + 2) + "|")
        for arch in ARCHS:
            r = run_zoo(arch, f"{d}/{arch.replace(' ', '_')}")
            cells = []
            for c in CHECKS:
                ok, detail = r.get(c, (False, "not run"))
                if not ok:
                    cells.append("FAIL")
                elif isinstance(detail, float):
                    cells.append(f"ok {detail:.1e}")
                elif isinstance(detail, str):
                    cells.append(f"ok ({detail})")
                else:
                    cells.append("ok")
            print(f"| {arch} | " + " | ".join(cells) + f" | {r['seconds']:.1f} |")
