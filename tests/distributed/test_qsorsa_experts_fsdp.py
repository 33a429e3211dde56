"""QSORSA experts sharded by FSDP2 on the CPU (gloo, 2 processes), like the dense QSORSA layers.

One single-process run and one two-process run of the same script (3 AdamW steps with the
regularizer, global batch 4, one CPU thread per process) on a tiny Mixtral saved with
``save_pretrained``, adapted with ``apply_sorsa(quantize="nf4")``: the routed experts are
QSORSA experts whose packed NF4 stacks FSDP2 shards by expert.
"""
import sys
import textwrap

import pytest
import torch
import transformers

from sorsa_kernels import apply_sorsa, load_adapter, merge_sorsa
from sorsa_kernels.distributed import fsdp
from tests.conftest import rel_err
from tests.distributed.launch import one_and_two_process_runs

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs torch.distributed (gloo)")


def _tiny_mixtral(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
    )
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # a real routing in every layer
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)
    return model



_SCRIPT = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    from sorsa_kernels import add_regularizer_grad, apply_sorsa, save_adapter
    from sorsa_kernels.distributed import fsdp

    base, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    mesh = None
    if world > 1:
        dist.init_process_group("gloo")
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,))
    model = AutoModelForCausalLM.from_pretrained(base)
    apply_sorsa(model, 4, quantize="nf4", quant_report=None, progress=False)
    result = {}
    if mesh is not None:
        fsdp.shard_model(model, mesh)
        experts = model.model.layers[0].mlp.experts.gate_up_proj
        result["packed_local_shape"] = list(fsdp.local(experts.nf4_packed).shape)
        try:
            experts.nf4_tensors()
        except RuntimeError as e:
            result["nf4_error"] = str(e)
    nbytes = fsdp.local_nbytes(model)
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, 128, (3, 4, 16), generator=g)  # 3 steps, global batch 4
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(3):
        local = ids[step][rank * 4 // world:(rank + 1) * 4 // world]
        logits = model(local).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), local[:, 1:].reshape(-1),
                               reduction="sum") / (4 * 15)
        (loss * world).backward()  # FSDP averages gradients over the processes
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        add_regularizer_grad(model, 4e-4, 1e-2)
        opt.step()
        opt.zero_grad()
        losses.append(float(total))
    model.eval()
    with torch.no_grad():
        logits = model(ids[0]).logits
    save_adapter(model, out / "adapter")       # every rank calls; rank 0 writes
    fsdp.save_merged(model, out / "merged")
    per_rank = [None] * world
    if world > 1:
        dist.all_gather_object(per_rank, nbytes)
    else:
        per_rank = [nbytes]
    if rank == 0:
        torch.save(logits, out / "logits.pt")
        result.update(losses=losses, nbytes=per_rank)
        (out / "result.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()
''')


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("qsorsa_experts_fsdp")
    one, two = one_and_two_process_runs(d, _tiny_mixtral(), _SCRIPT, 28600)
    return d, one, two


def test_sharded_qsorsa_experts_losses_equal_single_process_losses(runs):
    _, one, two = runs
    assert len(one["losses"]) == len(two["losses"]) == 3
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-4)
    assert two["losses"][2] != pytest.approx(two["losses"][0], abs=1e-3)  # the adapters did train


def test_each_rank_holds_half_of_the_experts_packed_nf4(runs):
    _, one, two = runs
    assert two["packed_local_shape"] == [2, (24 * 2 * 32) // 2]  # 2 of the 4 experts' packed bytes
    single, ranks = one["nbytes"][0], two["nbytes"]
    for r in ranks:
        assert r["residual"] * 2 == single["residual"]
        assert r["adapters"] * 2 == single["adapters"]


def test_nf4_of_sharded_experts_outside_the_forward_names_the_fix(runs):
    _, _, two = runs
    assert "sharded by FSDP2" in two["nf4_error"] and "unsharded(model)" in two["nf4_error"]


def test_sharded_adapter_loads_in_one_process_and_reproduces_the_logits(runs):
    d, _, _ = runs
    model = load_adapter(transformers.AutoModelForCausalLM.from_pretrained(d / "base"), d / "two" / "adapter")
    ids = torch.randint(0, 128, (3, 4, 16), generator=torch.Generator().manual_seed(123))[0]
    with torch.no_grad():
        got = model(ids).logits
    assert rel_err(got, torch.load(d / "two" / "logits.pt")) < 1e-6


def test_sharded_save_merged_writes_the_fused_experts_of_a_single_process_merge(runs):
    d, _, _ = runs
    model = load_adapter(transformers.AutoModelForCausalLM.from_pretrained(d / "base"), d / "two" / "adapter")
    want = merge_sorsa(model).state_dict()
    got = transformers.AutoModelForCausalLM.from_pretrained(d / "two" / "merged").state_dict()
    assert got.keys() == want.keys() and "model.layers.0.mlp.experts.gate_up_proj" in got
    for k in want:
        assert rel_err(got[k], want[k]) < 1e-6, k


def test_local_nbytes_counts_the_experts_nf4_storage():
    model = apply_sorsa(_tiny_mixtral(), 4, quantize="nf4", quant_report=None, progress=False)
    got = fsdp.local_nbytes(model)
    experts = [m.gate_up_proj for m in (model.model.layers[0].mlp.experts, model.model.layers[1].mlp.experts)]
    packed = sum(e.nf4_packed.numel() for e in experts)
    assert got["residual"] >= packed > 0
