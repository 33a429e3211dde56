"""Two-process runs on the CPU (gloo): DDP through the Trainer, FSDP2 by hand.

A single process with a global batch of 8 and two processes with 4 each must log the same
losses.  Every process runs one CPU thread (torchrun's default), and so does the single
process here, so their arithmetic agrees.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from tests.distributed.launch import process_env

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None and sys.platform != "linux",
                                reason="needs torch.distributed")

STEPS = ("--pretrain-steps", "20", "--max-steps", "4", "--logging-steps", "1", "--no-eval", "--quiet")



def _torchrun(args, tmp_path, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29500 + os.getpid() % 1000), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=process_env(), cwd=tmp_path)


def _single(args, tmp_path, timeout=180):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=process_env(), cwd=tmp_path)


def _losses(out_dir):
    return [loss for _, loss in json.loads((out_dir / "metrics.json").read_text())["train_losses"]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU/gloo launch is what is tested here")
def test_ddp_two_processes_log_single_process_losses_and_save_a_loadable_adapter(tmp_path):
    single = _single(["-m", "sorsa_kernels", "finetune", "--output-dir", str(tmp_path / "one"),
                      "--batch-size", "8", *STEPS], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _torchrun(["-m", "sorsa_kernels.cli", "finetune", "--output-dir", str(tmp_path / "two"),
                     "--batch-size", "4", *STEPS], tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, abs=1e-4)

    from transformers import AutoModelForCausalLM

    from sorsa_kernels import load_adapter
    from tests.conftest import rel_err

    def adapted(run):
        base = AutoModelForCausalLM.from_pretrained(tmp_path / run / "base")
        return load_adapter(base, tmp_path / run / "adapter")

    a, b = adapted("one"), adapted("two")
    ua = a.model.layers[1].mlp.down_proj.U
    ub = b.model.layers[1].mlp.down_proj.U
    assert rel_err(ub, ua) < 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="on GPUs --fsdp is supported")
def test_fsdp_flag_under_torchrun_on_cpu_is_a_one_line_error(tmp_path):
    proc = _torchrun(["-m", "sorsa_kernels.cli", "finetune", "--fsdp", "--output-dir", str(tmp_path / "o"),
                      *STEPS], tmp_path, timeout=120)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("sorsa-kernels: error:")]
    assert errors == ["sorsa-kernels: error: --fsdp needs GPUs: accelerate does not enable FSDP for CPU "
                      "(gloo) processes; drop --fsdp to train with DDP"]
    # torchrun itself prints a ChildFailedError traceback; the workers print none of their own.
    assert "sorsa_kernels/" not in proc.stderr
    assert not (tmp_path / "o").exists()


# FSDP2 by hand: fully_shard on each decoder layer and the root over a CPU mesh (gloo), the
# loss over all response tokens of the global batch, AdamW, and the regularizer.  ``MODE``
# picks the regularizer: "sorsa" is sorsa_kernels.add_regularizer_grad; "full" gathers each
# DTensor factor, applies the reference gradient and scatters it back.
_FSDP2_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    from sorsa_kernels import add_regularizer_grad, apply_sorsa
    from sorsa_kernels.training.data import arithmetic_problems
    from sorsa_kernels.jobs.models.embedded import EMBEDDED_PROMPT_TEMPLATE, build_embedded
    from sorsa_kernels.jobs.finetune import ResponseOnlyCollator, encode_example
    from sorsa_kernels.nn.regularizer import adapter_matrices
    from sorsa_kernels.ops import reference

    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    model, tok = build_embedded(pretrain_steps=20, progress=False)
    apply_sorsa(model, 16, progress=False)
    rows = arithmetic_problems(24, seed=0)
    ex = [encode_example(tok, r["prompt"], r["response"], EMBEDDED_PROMPT_TEMPLATE, 512, False) for r in rows]
    collate = ResponseOnlyCollator(tok.pad_token_id)
    if world > 1:
        dist.init_process_group("gloo")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    def full_regularizer(coeff):
        from torch.distributed.tensor import distribute_tensor
        mats = adapter_matrices(model)
        full = [m.full_tensor().detach() for m in mats]
        for f in full:
            f.grad = torch.zeros_like(f)
        value = reference.ortho_value_and_grad_(full, coeff)
        for m, f in zip(mats, full):
            m.grad.add_(distribute_tensor(f.grad, m.device_mesh, m.placements))
        return value

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(3):
        batch = ex[8 * step: 8 * step + 8]
        n_tokens = sum(sum(l != -100 for l in e["labels"][1:]) for e in batch)
        b = collate(batch[rank * 8 // world:(rank + 1) * 8 // world])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1), reduction="sum") / n_tokens
        (loss * world).backward()  # FSDP averages gradients over the processes
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if mode == "full" and world > 1:
            full_regularizer(4e-4 / 3e-3)
        else:
            add_regularizer_grad(model, 4e-4, 3e-3)
        opt.step()
        opt.zero_grad()
        losses.append(float(total))
    if rank == 0:
        json.dump(losses, open(out, "w"))
    if world > 1:
        dist.destroy_process_group()
''')


@pytest.fixture(scope="module")
def fsdp2_single(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp2")
    (d / "run.py").write_text(_FSDP2_SCRIPT)
    proc = _single([str(d / "run.py"), "sorsa", str(d / "single.json")], d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d, json.loads((d / "single.json").read_text())


def test_fsdp2_fully_shard_on_gloo_matches_single_process_losses(fsdp2_single):
    d, single = fsdp2_single
    proc = _torchrun([str(d / "run.py"), "full", str(d / "fsdp.json")], d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads((d / "fsdp.json").read_text())
    assert len(sharded) == 3
    assert sharded == pytest.approx(single, abs=1e-4)
    assert sharded[2] != pytest.approx(sharded[0], abs=1e-3)  # the adapters did train


def test_fsdp2_with_add_regularizer_grad_matches_single_process_losses(fsdp2_single):
    d, single = fsdp2_single
    proc = _torchrun([str(d / "run.py"), "sorsa", str(d / "fsdp_sorsa.json")], d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((d / "fsdp_sorsa.json").read_text()) == pytest.approx(single, abs=1e-4)
