"""The ``finetune --fsdp --quantize nf4`` wiring, piece by piece on the CPU (gloo, 2 processes).

The whole command needs GPUs (accelerate enables FSDP only there), so the Trainer run
itself is not exercised here; what is: the model the job builds (streamed from a local
folder, quantized and sharded as it loads; or the embedded model, adapted then sharded)
and the outputs the job writes from it (``adapter/``, ``merged/``, ``base/``), one layer
gathered at a time.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

from sorsa_kernels import load_adapter, merge_sorsa
from sorsa_kernels.jobs.models.embedded import build_tokenizer
from sorsa_kernels.jobs.finetune import FinetuneConfig
from tests.conftest import rel_err
from tests.distributed.launch import process_env

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs torch.distributed (gloo)")

_SCRIPT = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    from types import SimpleNamespace
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from sorsa_kernels.distributed import fsdp
    from sorsa_kernels.jobs.finetune import FinetuneConfig
    from sorsa_kernels.jobs.finetune.model import load_sharded_quantized
    from sorsa_kernels.jobs.finetune.outputs import FinetuneResult, save_outputs, sharded_quantized

    base, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    report = {}
    for label, cfg in (
        ("folder", FinetuneConfig(model=base, data="unused.jsonl", rank=8, quantize="nf4", fsdp=True,
                                  progress=False, output_dir=str(out / "folder"))),
        ("embedded", FinetuneConfig(rank=8, quantize="nf4", fsdp=True, pretrain_steps=2,
                                    progress=False, output_dir=str(out / "embedded"))),
    ):
        cfg = cfg.resolved()
        model, tok, base_copy = load_sharded_quantized(cfg, mesh)
        ids = torch.tensor([tok("1+2=3")["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits
        o = Path(cfg.output_dir)
        result = FinetuneResult(output_dir=o, adapter_dir=o / "adapter", merged_dir=o / "merged",
                                base_dir=(o / "base") if cfg.embedded else None, before={}, after={},
                                train_losses=[], train_runtime_s=0.0, total_runtime_s=0.0, settings={})
        trainer = SimpleNamespace(model=model, is_world_process_zero=lambda: rank == 0)
        save_outputs(trainer, tok, cfg, result, base_copy, None)
        if rank == 0:
            torch.save({"ids": ids, "logits": logits}, o / "probe.pt")
        report[label] = dict(sharded=sharded_quantized(model), nbytes=fsdp.local_nbytes(model))
    all_reports = [None, None]
    dist.all_gather_object(all_reports, report)
    if rank == 0:
        (out / "report.json").write_text(json.dumps(all_reports))
    dist.destroy_process_group()
''')



@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("finetune_fsdp_nf4")
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    (d / "run.py").write_text(_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(29400 + os.getpid() % 1000), str(d / "run.py"), str(d / "base"), str(d / "out")],
        capture_output=True, text=True, timeout=300, env=process_env(), cwd=d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d, json.loads((d / "out" / "report.json").read_text())


@pytest.mark.parametrize("label", ["folder", "embedded"])
def test_the_job_builds_qsorsa_sharded_in_halves(job, label):
    _, reports = job
    r0, r1 = (r[label] for r in reports)
    assert r0["sharded"] and r1["sharded"]
    assert r0["nbytes"]["residual"] == r1["nbytes"]["residual"] > 0


def test_outputs_of_the_streamed_folder_reload_in_one_process(job):
    d, _ = job
    out = d / "out" / "folder"
    probe = torch.load(out / "probe.pt")
    model = load_adapter(transformers.AutoModelForCausalLM.from_pretrained(d / "base"), out / "adapter")
    with torch.no_grad():
        assert rel_err(model(probe["ids"]).logits, probe["logits"]) < 1e-6
        merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged")
        assert rel_err(merged(probe["ids"]).logits, merge_sorsa(model)(probe["ids"]).logits) < 1e-6
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(d / "base")
    assert (out / "merged" / "tokenizer.json").is_file()


def test_outputs_of_the_embedded_model_include_its_base(job):
    d, _ = job
    out = d / "out" / "embedded"
    probe = torch.load(out / "probe.pt")
    model = load_adapter(transformers.AutoModelForCausalLM.from_pretrained(out / "base"), out / "adapter")
    with torch.no_grad():
        assert rel_err(model(probe["ids"]).logits, probe["logits"]) < 1e-6
    assert (out / "merged" / "model.safetensors").is_file()


def test_fsdp_nf4_with_a_hub_name_asks_for_a_local_folder(tmp_path):
    cfg = FinetuneConfig(model="org/some-model", data=str(tmp_path / "d.jsonl"), fsdp=True, quantize="nf4").resolved()
    with pytest.raises(ValueError, match=r"fsdp=True quantize='nf4' streams the checkpoint from a local folder; "
                                         r"download org/some-model first"):
        cfg.check_environment()
