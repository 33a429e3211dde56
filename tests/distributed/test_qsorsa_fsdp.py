"""QSORSA sharded by FSDP2 on the CPU (gloo, 2 processes), and the streaming loader.

One single-process run and one two-process run of the same script (3 AdamW steps with the
regularizer, global batch 4, one CPU thread per process) on a tiny Llama saved with
``save_pretrained``.  The two-process run also loads the model with the streaming loader
(sharding as it loads) and checks that its shards equal those of the API path.
"""
import json
import sys
import textwrap
import weakref

import pytest
import torch
import transformers
from safetensors.torch import load_file

from sorsa_kernels import (
    QSORSALinear, SORSALinear, apply_sorsa, export_peft_lora, load_adapter, merge_sorsa,
)
from sorsa_kernels.distributed import fsdp, streaming
from sorsa_kernels.distributed.streaming import load_sorsa_streaming
from tests.conftest import rel_err
from tests.distributed.launch import one_and_two_process_runs

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs torch.distributed (gloo)")

RANK = 8


def _tiny_llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw,
    )
    return transformers.LlamaForCausalLM(cfg).eval()



_SCRIPT = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    from sorsa_kernels import add_regularizer_grad, apply_sorsa, export_peft_lora, save_adapter
    from sorsa_kernels.distributed import fsdp
    from sorsa_kernels.distributed.streaming import load_sorsa_streaming

    base, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    mesh = None
    if world > 1:
        dist.init_process_group("gloo")
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,))
    model = AutoModelForCausalLM.from_pretrained(base)
    apply_sorsa(model, 8, quantize="nf4", quant_report=None, progress=False)
    result = {}
    if mesh is not None:
        fsdp.shard_model(model, mesh)
        # the streaming loader, sharding as it loads, must give the same local shards; with bf16
        # mixed precision (which must leave the integer NF4 storage alone) it computes the same loss
        from torch.distributed.fsdp import MixedPrecisionPolicy
        streamed = load_sorsa_streaming(base, 8, quantize="nf4", mesh=mesh,
                                        fsdp_kwargs={"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16)})
        a, b = model.state_dict(), streamed.state_dict()
        result["stream_same_shards"] = a.keys() == b.keys() and all(
            type(a[k]) is type(b[k]) and torch.equal(fsdp.local(a[k]), fsdp.local(b[k])) for k in a)
        probe = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            result["probe_losses"] = [float(model(probe, labels=probe).loss), float(streamed(probe, labels=probe).loss)]
        del streamed
        q = model.model.layers[0].self_attn.q_proj
        try:
            q.nf4()
        except RuntimeError as e:
            result["nf4_error"] = str(e)
        w = q.weight  # metadata of a sharded residual is still free
        result["weight_meta"] = [str(w.dtype), list(w.shape), str(w.device)]
        try:
            w + 1
        except RuntimeError as e:
            result["weight_error"] = str(e)
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
    export_peft_lora(model, out / "lora")
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
    d = tmp_path_factory.mktemp("qsorsa_fsdp")
    one, two = one_and_two_process_runs(d, _tiny_llama(), _SCRIPT, 29600)
    return d, one, two


def test_sharded_losses_equal_single_process_losses(runs):
    _, one, two = runs
    assert len(one["losses"]) == len(two["losses"]) == 3
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-4)
    assert two["losses"][2] != pytest.approx(two["losses"][0], abs=1e-3)  # the adapters did train


def test_each_rank_holds_half_of_the_packed_residual_and_of_the_adapters(runs):
    _, one, two = runs
    single, ranks = one["nbytes"][0], two["nbytes"]
    assert single["residual"] > 0
    for r in ranks:
        assert r["residual"] * 2 == single["residual"]
        assert r["adapters"] * 2 == single["adapters"]
        assert r["quant_tables"] == single["quant_tables"]  # the 16/256-entry tables stay replicated
    # absmax codes split evenly; each layer's one-element nested absmax lands on rank 0
    assert sum(r["quant_state"] for r in ranks) == single["quant_state"]
    assert max(r["quant_state"] for r in ranks) <= single["quant_state"] / 2 + 4 * 14


def test_nf4_of_a_sharded_layer_outside_the_forward_names_the_fix(runs):
    _, _, two = runs
    assert "sharded by FSDP2" in two["nf4_error"] and "unsharded(model)" in two["nf4_error"]
    assert two["weight_error"] == two["nf4_error"]


def test_weight_metadata_of_a_sharded_layer_is_the_dense_matrix(runs):
    _, _, two = runs
    assert two["weight_meta"] == ["torch.float32", [64, 64], "cpu"]


def test_streaming_loader_under_a_mesh_builds_the_api_paths_shards(runs):
    _, _, two = runs
    assert two["stream_same_shards"] is True


def test_bf16_mixed_precision_leaves_the_nf4_storage_exact(runs):
    _, _, two = runs
    fp32, bf16 = two["probe_losses"]
    assert bf16 == pytest.approx(fp32, abs=2e-2)  # a cast NF4 byte would be a random weight


def test_sharded_adapter_loads_in_one_process_and_reproduces_the_logits(runs):
    d, _, _ = runs
    model = load_adapter(transformers.AutoModelForCausalLM.from_pretrained(d / "base"), d / "two" / "adapter")
    ids = torch.randint(0, 128, (3, 4, 16), generator=torch.Generator().manual_seed(123))[0]
    with torch.no_grad():
        got = model(ids).logits
    assert rel_err(got, torch.load(d / "two" / "logits.pt")) < 1e-6


def test_sharded_adapter_file_has_the_single_process_layout_and_values(runs):
    d, _, _ = runs
    cfg_one = json.loads((d / "one" / "adapter" / "adapter_config.json").read_text())
    cfg_two = json.loads((d / "two" / "adapter" / "adapter_config.json").read_text())
    assert cfg_two == cfg_one
    a, b = load_file(d / "one" / "adapter" / "adapter.safetensors"), load_file(d / "two" / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
        assert rel_err(b[k], a[k]) < 1e-4, k


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' arithmetic, so files compare bit for bit
    yield
    torch.set_num_threads(threads)


def test_sharded_merge_and_export_write_the_files_of_a_single_process_run(runs, tmp_path, one_thread):
    d, _, _ = runs
    model = load_adapter(transformers.AutoModelForCausalLM.from_pretrained(d / "base"), d / "two" / "adapter")
    export_peft_lora(model, tmp_path / "lora")
    merge_sorsa(model).save_pretrained(tmp_path / "merged")
    for sub, name in (("lora", "adapter_model.safetensors"), ("merged", "model.safetensors")):
        want, got = load_file(tmp_path / sub / name), load_file(d / "two" / sub / name)
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), f"{sub}/{k}"
    for name in ("adapter_config.json",):
        assert json.loads((d / "two" / "lora" / name).read_text()) == json.loads((tmp_path / "lora" / name).read_text())
    assert json.loads((d / "two" / "merged" / "config.json").read_text()) == \
        json.loads((tmp_path / "merged" / "config.json").read_text())


# ---------------------------------------------------------------------- streaming loader, one process
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    _tiny_llama().save_pretrained(d / "single")
    _tiny_llama().save_pretrained(d / "sharded", max_shard_size="40KB")
    return d


@pytest.mark.parametrize("folder", ["single", "sharded"])
def test_streaming_loader_equals_apply_sorsa_on_the_loaded_model(saved, folder):
    ref = apply_sorsa(transformers.AutoModelForCausalLM.from_pretrained(saved / folder), RANK,
                      quantize="nf4", quant_report=None, progress=False)
    got = load_sorsa_streaming(saved / folder, RANK, quantize="nf4")
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [n for n, p in got.named_parameters() if p.requires_grad] == \
        [n for n, p in ref.named_parameters() if p.requires_grad]
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(got(ids).logits, ref(ids).logits)
    if folder == "sharded":
        assert len(set(streaming.checkpoint_files(saved / folder).values())) > 1


def test_streaming_loader_without_quantization_builds_dense_sorsa_layers(saved):
    ref = apply_sorsa(transformers.AutoModelForCausalLM.from_pretrained(saved / "single"), RANK, progress=False)
    got = load_sorsa_streaming(saved / "single", RANK, quantize=None)
    layer = got.model.layers[1].mlp.down_proj
    assert type(layer) is SORSALinear
    assert torch.equal(layer.residual, ref.model.layers[1].mlp.down_proj.residual)


def test_streaming_loader_never_holds_two_dense_target_weights(saved, monkeypatch):
    targets = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    alive: list[weakref.ref] = []
    most = []
    read = streaming._read

    def tracked(handle, key):
        t = read(handle, key)
        if key in targets:
            most.append(sum(r() is not None for r in alive) + 1)  # dense targets alive, this one included
            alive.append(weakref.ref(t))
        return t

    monkeypatch.setattr(streaming, "_read", tracked)
    model = load_sorsa_streaming(saved / "single", RANK, quantize="nf4")
    assert len(most) == len(targets)  # every target weight was read once
    assert max(most) == 1
    assert all(r() is None for r in alive)  # and none is kept by the model
    assert all(isinstance(model.get_submodule(k[: -len(".weight")]), QSORSALinear) for k in targets)


def test_streaming_loader_builds_the_skeleton_on_the_meta_device(saved, monkeypatch):
    seen = []
    empty = streaming.empty_model

    def spy(*a, **kw):
        m = empty(*a, **kw)
        seen.append(all(p.is_meta for p in m.parameters()))
        return m

    monkeypatch.setattr(streaming, "empty_model", spy)
    load_sorsa_streaming(saved / "single", RANK)
    assert seen == [True]


def test_streaming_loader_error_names_a_missing_tensor(tmp_path):
    from safetensors.torch import save_file

    _tiny_llama().save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.norm.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks model.norm.weight"):
        load_sorsa_streaming(tmp_path, RANK)


def test_streaming_loader_error_on_a_folder_without_safetensors(tmp_path):
    _tiny_llama().config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_sorsa_streaming(tmp_path, RANK)


def test_streaming_loader_error_on_an_unknown_quantization(saved):
    with pytest.raises(ValueError, match="quantize must be None or 'nf4', got 'int4'"):
        load_sorsa_streaming(saved / "single", RANK, quantize="int4")


# ---------------------------------------------------------------------- helpers, one process
def test_local_nbytes_of_an_unsharded_model_counts_the_nf4_storage():
    model = apply_sorsa(_tiny_llama(), RANK, quantize="nf4", quant_report=None, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QSORSALinear)]
    got = fsdp.local_nbytes(model)
    assert got["residual"] + got["quant_state"] + got["quant_tables"] == sum(l.nf4().nbytes() for l in layers)
    assert got["adapters"] == sum(4 * (l.U.numel() + l.S.numel() + l.V.numel()) for l in layers)


def test_nf4_storage_is_frozen_parameters_and_tables_are_buffers():
    layer = QSORSALinear.from_linear(torch.nn.Linear(100, 72), RANK, quant_report=None)
    params = dict(layer.named_parameters())
    for name in ("nf4_packed", "nf4_absmax", "nf4_nested_absmax"):
        assert name in params and not params[name].requires_grad
    assert {"nf4_nested_code", "nf4_offset", "nf4_code"} <= dict(layer.named_buffers()).keys()
    half = layer.half()  # a dtype cast leaves the integer-held NF4 state exact
    assert half.nf4_packed.dtype == torch.uint8 and half.nf4_nested_absmax.dtype == torch.int32


def test_save_merged_of_an_unsharded_model_equals_merge_sorsa_save_pretrained(tmp_path):
    model = apply_sorsa(_tiny_llama(), RANK, quantize="nf4", quant_report=None, progress=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QSORSALinear):
                m.U.add_(0.01)
    fsdp.save_merged(model, tmp_path / "a")
    merge_sorsa(model).save_pretrained(tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_decoder_layers_are_the_no_split_modules():
    model = _tiny_llama()
    assert fsdp.decoder_layers(model) == list(model.model.layers)
    with pytest.raises(ValueError, match="declares no _no_split_modules"):
        fsdp.decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
