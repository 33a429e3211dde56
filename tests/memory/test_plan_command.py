"""``sorsa-kernels plan``: the plan from a config alone, as text and JSON, and its one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sorsa_kernels.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "bench" / "configs"


def test_plan_json_has_peak_components_levers_and_fits(capsys):
    assert main(["plan", "--json", "--gpu-memory", "24GB", "0.5GB", "--rank", "8"]) == 0  # the embedded model
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["peak_bytes"], int) and out["peak_bytes"] > 0
    assert {"frozen_base", "adapters", "gradients", "optimizer_state", "activations", "logits_loss",
            "cuda_context"} <= set(out["components"])
    assert out["components"]["cuda_context"] == int(0.75 * 2 ** 30)
    assert out["fits"] == {"24GB": True, "0.5GB": False}  # the 0.75 GiB context alone exceeds 0.5
    assert out["levers"]["optim"] == "adamw" and "to_fit" in out["levers"]


def test_plan_reads_a_config_json_and_counts_nf4_frozen_bytes(capsys):
    main(["plan", "--model", str(CONFIGS / "Llama-2-7B.json"), "--quantize", "nf4", "--rank", "16", "--json",
          "--batch-size", "1", "--gradient-checkpointing", "--bf16"])
    out = json.loads(capsys.readouterr().out)
    # 32 layers × (4·4096² + 3·4096·11008) weights at 4 bits = 3.016 GiB (bench/results/fsdp_memory.md)
    assert abs(out["components"]["frozen_base"] / 2 ** 30 - 3.016) < 0.01


def test_plan_refuses_a_bad_gpu_memory_size_in_one_line(capsys):
    assert main(["plan", "--gpu-memory", "lots"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'lots' is not a size" in err


def test_plan_refuses_a_missing_config_file(capsys):
    assert main(["plan", "--model", "no/such/config.json"]) == 1
    assert "no such config file: no/such/config.json" in capsys.readouterr().err


def test_finetune_check_prints_the_plan_line_on_cpu():
    from sorsa_kernels.jobs.finetune.config import FinetuneConfig
    from sorsa_kernels.jobs.plan import check_run_fits

    line = check_run_fits(FinetuneConfig().resolved())
    assert line.startswith("memory plan: peak ") and "GiB per GPU" in line


def test_finetune_refuses_when_the_plan_exceeds_the_gpu(monkeypatch):
    import torch

    from sorsa_kernels.jobs.finetune.config import FinetuneConfig
    from sorsa_kernels.jobs.plan import check_run_fits

    class Props:
        total_memory = 2 ** 20  # a 1 MiB GPU

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    with pytest.raises(ValueError, match="exceeds this GPU's 0.00 GiB.*--force runs anyway"):
        check_run_fits(FinetuneConfig().resolved())
    assert check_run_fits(FinetuneConfig().resolved(), force=True).startswith("memory plan: peak")


#: The issue's flagship run (Qwen3-30B-A3B QSORSA r=16, sequence 1024, one GPU) with the levers that fit it
#: under 20 GiB: 8-bit AdamW, gradient release, chunked loss, bf16 adapters (checkpointing, bf16 model).
QWEN3_30B_LEVERS = ["plan", "--model", str(CONFIGS / "Qwen3-30B-A3B.json"), "--quantize", "nf4", "--rank", "16",
                    "--max-length", "1024", "--batch-size", "1", "--gradient-checkpointing", "--bf16", "--optim",
                    "adamw8bit", "--gradient-release", "--loss-chunk-size", "256", "--adapter-dtype", "bfloat16",
                    "--gpu-memory", "24GB"]


def test_qwen3_30b_a3b_plan_fits_24gb_with_the_levers(capsys):
    assert main([*QWEN3_30B_LEVERS, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peak_bytes"] <= 20 * 2 ** 30 and out["fits"] == {"24GB": True}
    assert out["levers"]["optim"] == "adamw8bit" and out["levers"]["loss_chunk_size"] == 256
    assert out["levers"]["gradient_release"] is True


def test_qwen3_30b_a3b_plan_text_prints_the_peak_with_its_levers_and_fits_24gb(capsys):
    assert main(QWEN3_30B_LEVERS) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    peak = float(first.split("peak ")[1].split(" GiB")[0])
    assert peak <= 20, first
    assert all(lever in first for lever in ("adamw8bit", "gradient release", "loss chunk 256", "adapters bfloat16",
                                            "checkpointing")), first
    assert "\nfits 24GB: yes" in out


def test_plan_text_lists_every_component_and_a_fits_line_per_gpu(capsys):
    from sorsa_kernels.memory.plan import COMPONENTS

    assert main(["plan", "--gpu-memory", "24GB", "0.5GB"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("memory plan: peak ")
    assert all(f"\n{name} " in out for name in COMPONENTS)
    assert "fits 24GB: yes" in out and "fits 0.5GB: no; no combination of levers fits" in out
    assert "GiB with checkpointing" in out and "without" in out


@pytest.mark.parametrize("field,value,message", [
    ("optim", "sgd", "optim must be one of adamw, adamw8bit, paged_adamw8bit, got 'sgd'"),
    ("loss_chunk_size", -1, "loss_chunk_size must be 0 (unchunked) or a positive integer, got -1"),
    ("world_size", 0, "world_size must be a positive integer, got 0"),
    ("adapter_dtype", "int8", "adapter_dtype must be one of"),
])
def test_plan_settings_refuse_a_bad_value_naming_the_field(field, value, message):
    from sorsa_kernels.memory.plan import PlanSettings

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PlanSettings(**{field: value})


def test_plan_command_refuses_a_zero_world_size_in_one_line(capsys):
    assert main(["plan", "--world-size", "0"]) == 1
    assert "world-size must be a positive integer, got 0" in capsys.readouterr().err
