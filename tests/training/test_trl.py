"""SORSA through TRL's ``SFTTrainer``: ``apply_sorsa`` first, ``SORSACallback`` in ``callbacks``, no PEFT config.

The embedded model trains a few steps on prompt/completion rows (TRL puts the loss on the
completion only, as ``finetune`` does), with SFTConfig's own defaults for precision and
gradient checkpointing (``bf16=True``: autocast over a float32 model; checkpointing on).
"""
import copy

import pytest
import torch

pytest.importorskip("trl")

import sorsa_kernels as sk  # noqa: E402
from sorsa_kernels.jobs.models.embedded import EMBEDDED_PROMPT_TEMPLATE, build_embedded  # noqa: E402
from sorsa_kernels.training.data import arithmetic_problems  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def base():
    model, tokenizer = build_embedded(pretrain_steps=20, progress=False, cache=False)
    return model, tokenizer


def _dataset():
    from datasets import Dataset

    rows = arithmetic_problems(64, seed=1)
    return Dataset.from_list([{"prompt": EMBEDDED_PROMPT_TEMPLATE.format(prompt=r["prompt"]),
                               "completion": r["response"]} for r in rows])


def _train(base, tmp_path, quantize=None, gamma=4e-4):
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = copy.deepcopy(base[0]), base[1]
    sk.apply_sorsa(model, rank=8, quantize=quantize, progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=STEPS, per_device_train_batch_size=8,
                     learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                     disable_tqdm=True, seed=0)
    callbacks = [sk.SORSACallback(gamma=gamma)] if gamma else []
    trainer = SFTTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=tokenizer,
                         callbacks=callbacks)
    trainer.train()
    return trainer, before


def _orthonormality(model) -> float:
    from sorsa_kernels.adapters.surgery import sorsa_layers

    eye = torch.eye(8)
    with torch.no_grad():
        return max(max(float((l.U.T @ l.U - eye).norm()), float((l.V.T @ l.V - eye).norm()))
                   for l in sorsa_layers(model).values())


def test_sft_trainer_puts_the_loss_on_the_completion_only(base, tmp_path):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to="none",
                     use_cpu=True)
    trainer = SFTTrainer(model=copy.deepcopy(base[0]), args=args, train_dataset=_dataset(), processing_class=base[1])
    batch = next(iter(trainer.get_train_dataloader()))
    tok = base[1]
    first = batch["labels"][0]
    answer = tok.decode(first[first != -100], skip_special_tokens=True)
    assert answer == arithmetic_problems(64, seed=1)[0]["response"] or answer.isdigit(), answer


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_sft_trainer_trains_sorsa_with_the_regularizer_and_only_the_adapters(base, tmp_path, quantize):
    trainer, before = _train(base, tmp_path, quantize)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    assert all("orthonormality" in h for h in trainer.state.log_history if "loss" in h)  # the callback ran
    model = trainer.model
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(n.rsplit(".", 1)[-1] in ("U", "S", "V") for n in changed), changed
    assert _orthonormality(model) < 0.5


def test_the_regularizer_keeps_u_and_v_closer_to_orthonormal_than_without_it(base, tmp_path):
    with_reg, _ = _train(base, tmp_path / "a", gamma=0.3)
    without, _ = _train(base, tmp_path / "b", gamma=None)
    assert _orthonormality(with_reg.model) < _orthonormality(without.model)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_adapter_saved_after_sft_reloads_to_identical_logits(base, tmp_path, quantize):
    trainer, _ = _train(base, tmp_path, quantize)
    # accelerate leaves the trained model's forward wrapped in bf16 autocast: compare the plain forward
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    sk.save_adapter(model, tmp_path / "adapter")
    reloaded = sk.load_adapter(copy.deepcopy(base[0]), tmp_path / "adapter").eval()
    ids = base[1](["Q: 3+4?\nA: "], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    sk.export_peft_lora(model, tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_config.json").is_file()


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_sorsa_layers_run_under_bf16_autocast_on_a_float32_model(base, quantize):
    model = copy.deepcopy(base[0])
    sk.apply_sorsa(model, rank=8, quantize=quantize, progress=False)
    ids = torch.randint(4, 90, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    from sorsa_kernels.adapters.surgery import sorsa_layers

    layer = next(iter(sorsa_layers(model).values()))
    assert layer.U.dtype == torch.float32 and layer.U.grad is not None and torch.isfinite(layer.U.grad).all()
