"""Hostile inputs for adapter files and the PEFT export (issue 10).

A tiny two-layer model keeps every case fast; the kill tests run a child process that
saves over an existing adapter and is SIGKILLed at each publication step (or at random
moments of a save loop), after which the folder must load the old or the new adapter,
never new weights with the old config.
"""
import errno
import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sorsa_kernels import SORSALinear, export_peft_lora, load_adapter, save_adapter
from sorsa_kernels.adapters import adapter_save, peft_export
from sorsa_kernels.adapters.adapter_io import (
    CONFIG_NAME,
    FORMAT,
    METADATA_KEY,
    WEIGHTS_NAME,
    AdapterError,
    read_adapter,
)

BASE_SRC = """
import torch
from torch import nn

def base():
    torch.manual_seed(0)
    m = nn.Module()
    m.a = nn.Linear(16, 12)
    m.b = nn.Linear(12, 10, bias=False)
    return m

def adapted(alpha=None, seed=1, adapter_dtype=None):
    from sorsa_kernels import SORSALinear
    m = base()
    m.a = SORSALinear.from_linear(m.a, 4, alpha=alpha, adapter_dtype=adapter_dtype)
    m.b = SORSALinear.from_linear(m.b, 3, alpha=alpha, adapter_dtype=adapter_dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # "training": move the factors away from their initial values
        for layer in (m.a, m.b):
            for p in (layer.U, layer.S, layer.V):
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))
    return m
"""
exec(BASE_SRC)  # defines base() and adapted(), shared with the child processes below


def _rewrite(directory, config_fn=None, tensors_fn=None, json_copy=True, embed=True):
    """Re-save ``directory``'s adapter with a mutated config and/or tensors."""
    w = directory / WEIGHTS_NAME
    tensors = load_file(w)
    with safe_open(w, "pt") as f:
        config = json.loads(f.metadata()[METADATA_KEY])
    if config_fn:
        config = config_fn(config) or config
    if tensors_fn:
        tensors = tensors_fn(tensors) or tensors
    metadata = {"format": FORMAT}
    if embed:
        metadata[METADATA_KEY] = json.dumps(config)
    save_file(tensors, w, metadata=metadata)
    c = directory / CONFIG_NAME
    if json_copy:
        c.write_text(json.dumps(config))
    elif c.exists():
        c.unlink()


def _same_adapter(a, b):
    (ca, ta), (cb, tb) = a, b
    return ca == cb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture
def saved(tmp_path):
    d = tmp_path / "adapter"
    save_adapter(adapted(), d)
    return d


# ------------------------------------------------------------------ the self-describing file
def test_config_is_embedded_in_the_weights_file_and_matches_the_json_copy(saved):
    with safe_open(saved / WEIGHTS_NAME, "pt") as f:
        embedded = json.loads(f.metadata()[METADATA_KEY])
    assert embedded == json.loads((saved / CONFIG_NAME).read_text())
    assert embedded["layers"]["a"]["rank"] == 4 and embedded["layers"]["b"]["rank"] == 3


def test_weights_file_alone_loads_without_the_json(saved):
    model = adapted()
    (saved / CONFIG_NAME).unlink()
    for path in (saved, saved / WEIGHTS_NAME):
        loaded = load_adapter(base(), path)
        x = torch.randn(5, 16)
        assert torch.equal(loaded.a(x), model.a(x))


def test_adapter_saved_in_the_old_format_still_loads(saved):
    model = adapted()
    _rewrite(saved, embed=False)  # JSON + safetensors without embedded config
    with safe_open(saved / WEIGHTS_NAME, "pt") as f:
        assert METADATA_KEY not in f.metadata()
    loaded = load_adapter(base(), saved)
    x = torch.randn(5, 16)
    assert torch.equal(loaded.a(x), model.a(x))


def test_old_format_without_json_names_the_missing_config(saved):
    _rewrite(saved, embed=False, json_copy=False)
    with pytest.raises(AdapterError, match=r"no embedded config .*adapter_config.json is missing"):
        read_adapter(saved)


def test_json_copy_that_disagrees_is_rejected_naming_the_field(saved):
    cfg = json.loads((saved / CONFIG_NAME).read_text())
    cfg["alpha"] = 8.0  # e.g. a hand edit, or the JSON of another save
    (saved / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"adapter_config.json disagrees .*alpha: 8.0 in the JSON, None embedded"):
        load_adapter(base(), saved)


def test_json_copy_that_is_not_json_is_rejected(saved):
    (saved / CONFIG_NAME).write_text("{half")
    with pytest.raises(AdapterError, match="adapter_config.json is not valid JSON"):
        read_adapter(saved)


# ------------------------------------------------------------------ config fields
@pytest.mark.parametrize("embed", [True, False], ids=["embedded", "old-format-json"])
def test_config_without_layers_is_rejected(saved, embed):
    _rewrite(saved, config_fn=lambda c: c.pop("layers") and None, embed=embed)
    with pytest.raises(AdapterError, match=r"has no 'layers'"):
        load_adapter(base(), saved)


@pytest.mark.parametrize("embed", [True, False], ids=["embedded", "old-format-json"])
def test_unknown_adapter_dtype_is_rejected(saved, embed):
    _rewrite(saved, config_fn=lambda c: c.update(adapter_dtype="nonsense"), embed=embed)
    with pytest.raises(AdapterError, match=r"adapter_dtype 'nonsense' is not a known dtype; allowed: float32"):
        load_adapter(base(), saved)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("format_version", 99, r"format_version 99 is unknown"),
        ("format", "something-else", r"is not a sorsa-kernels adapter config"),
        ("alpha", -1.0, r"alpha must be a finite number > 0 or null, got -1.0"),
        ("dropout", 1.5, r"dropout must be a number in \[0, 1\), got 1.5"),
    ],
)
def test_bad_top_level_field_is_rejected(saved, field, value, message):
    _rewrite(saved, config_fn=lambda c: c.update({field: value}))
    with pytest.raises(AdapterError, match=message):
        read_adapter(saved)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rank", 0, r"layer a: rank must be a positive integer, got 0"),
        ("in_features", "16", r"layer a: in_features must be a positive integer, got '16'"),
        ("residual_dtype", "int8", r"layer a: residual_dtype 'int8' is not a known dtype"),
        ("quantize", "int3", r"layer a: quantize 'int3' is unknown"),
        ("bias", "yes", r"layer a: bias must be true or false"),
        ("rank", 40, r"layer a: rank 40 exceeds min\(in_features, out_features\) = 12"),
    ],
)
def test_bad_layer_field_is_rejected(saved, field, value, message):
    _rewrite(saved, config_fn=lambda c: c["layers"]["a"].update({field: value}))
    with pytest.raises(AdapterError, match=message):
        read_adapter(saved)


def test_rank_that_disagrees_with_the_tensors_is_rejected(saved):
    _rewrite(saved, config_fn=lambda c: c["layers"]["a"].update(rank=3))
    with pytest.raises(AdapterError, match=r"adapter.safetensors: layer a: tensor U has shape \(12, 4\) but the "
                                           r"config \(out_features=12, in_features=16, rank=3\) needs \(12, 3\)"):
        load_adapter(base(), saved)


def test_tensor_with_wrong_rank_is_rejected(saved):
    def cut(t):
        t["b.S0"] = t["b.S0"][:2].contiguous()

    _rewrite(saved, tensors_fn=cut)
    msg = r"layer b: tensor S0 has shape \(2,\) but the config .*rank=3\) needs \(3,\)"
    with pytest.raises(AdapterError, match=msg):
        read_adapter(saved)


def test_in_features_that_disagree_with_the_base_layer_are_rejected(saved):
    import torch.nn as nn

    other = base()
    other.a = nn.Linear(20, 12)
    msg = r"layer a has weight shape \(12, 20\) but the adapter was trained on \(12, 16\)"
    with pytest.raises(AdapterError, match=msg):
        load_adapter(other, saved)
    assert not isinstance(other.b, SORSALinear)  # nothing changed before the error


def test_bias_that_disagrees_with_the_base_layer_is_rejected(saved):
    import torch.nn as nn

    other = base()
    other.b = nn.Linear(12, 10, bias=True)
    with pytest.raises(AdapterError, match=r"layer b has bias but the adapter says bias=False"):
        load_adapter(other, saved)


def test_extra_tensor_is_rejected(saved):
    _rewrite(saved, tensors_fn=lambda t: t.update({"c.U": torch.zeros(2, 2)}))
    with pytest.raises(AdapterError, match=r"hold tensors no layer in the config uses: c.U"):
        read_adapter(saved)


def test_missing_tensor_is_rejected_naming_it(saved):
    def drop(t):
        del t["b.V"]

    _rewrite(saved, tensors_fn=drop)
    with pytest.raises(AdapterError, match=r"lack tensor b.V"):
        read_adapter(saved)


# ------------------------------------------------------------------ tensor dtypes and values
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool], ids=["int32", "bool"])
def test_non_floating_factors_are_rejected_not_cast(saved, dtype):
    _rewrite(saved, tensors_fn=lambda t: t.update({"a.U": t["a.U"].to(dtype)}))
    name = str(dtype).replace("torch.", "")
    msg = rf"layer a: tensor U has dtype {name}; adapter factors must be floating point"
    with pytest.raises(AdapterError, match=msg):
        load_adapter(base(), saved)


def test_fp16_factors_under_a_float32_config_are_rejected(saved):
    _rewrite(saved, tensors_fn=lambda t: {k: v.half() for k, v in t.items()})
    with pytest.raises(AdapterError, match=r"tensor U has dtype float16 but the config says adapter_dtype float32"):
        load_adapter(base(), saved)


def test_fp16_adapter_loads_in_its_stored_dtype(tmp_path):
    model = adapted(adapter_dtype=torch.float16)
    save_adapter(model, tmp_path)
    loaded = load_adapter(base(), tmp_path)
    assert loaded.a.U.dtype == torch.float16
    assert torch.equal(loaded.a.U, model.a.U) and torch.equal(loaded.b.S, model.b.S)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("key", ["S", "V0"])
def test_non_finite_factors_are_rejected_naming_layer_and_tensor(saved, bad, key):
    def poison(t):
        t[f"b.{key}"].view(-1)[0] = bad

    _rewrite(saved, tensors_fn=poison)
    with pytest.raises(AdapterError, match=rf"adapter.safetensors: layer b: tensor {key} has 1 non-finite"):
        load_adapter(base(), saved)


def test_save_refuses_non_finite_factors(tmp_path):
    model = adapted()
    with torch.no_grad():
        model.a.S[1] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to save .* layer a: tensor S has 1 non-finite"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter" / WEIGHTS_NAME).exists()


@pytest.mark.parametrize("keep", [0, 7, 100, -10], ids=["empty", "in-length", "in-header", "in-data"])
def test_truncated_file_is_one_error_naming_the_file(saved, keep):
    w = saved / WEIGHTS_NAME
    data = w.read_bytes()
    w.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(AdapterError, match=rf"adapter weights {w} are corrupt or truncated"):
        load_adapter(base(), saved)


def test_file_that_is_not_safetensors_is_rejected(saved):
    (saved / WEIGHTS_NAME).write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(AdapterError, match=r"are corrupt or truncated"):
        read_adapter(saved)


def test_missing_adapter_names_both_files(tmp_path):
    msg = r"adapter.safetensors does not exist and .*adapter_config.json does not exist"
    with pytest.raises(FileNotFoundError, match=msg):
        read_adapter(tmp_path / "nowhere")


# ------------------------------------------------------------------ issue 29: saved heads, PEFT folders
def _with_head():
    """``base()`` with ``a`` adapted and ``b`` kept as a trainable copy (``modules_to_save``)."""
    from sorsa_kernels import apply_sorsa

    return apply_sorsa(base(), 4, ["a"], modules_to_save=["b"], progress=False)


def test_saved_head_with_an_integer_dtype_is_refused_naming_it(tmp_path):
    save_adapter(_with_head(), tmp_path)

    def as_int(t):
        t["modules_to_save/b.weight"] = (t["modules_to_save/b.weight"] * 100).to(torch.int64)

    _rewrite(tmp_path, tensors_fn=as_int)
    with pytest.raises(AdapterError, match=r"saved module tensor b\.weight has dtype int64 but the base model's "
                                           r"b\.weight needs a floating-point dtype"):
        load_adapter(base(), tmp_path)


def test_saved_head_in_another_float_dtype_still_loads(tmp_path):
    model = _with_head()
    save_adapter(model, tmp_path)
    _rewrite(tmp_path, tensors_fn=lambda t: t.update({"modules_to_save/b.weight": t["modules_to_save/b.weight"].half()}))
    loaded = load_adapter(base(), tmp_path)
    assert loaded.b.trained.weight.dtype == torch.float32


def test_peft_folder_given_to_load_adapter_says_it_is_a_peft_adapter(tmp_path):
    export_peft_lora(adapted(), tmp_path / "lora")
    with pytest.raises(AdapterError, match=r"lora is a PEFT adapter \(adapter_config.json \+ adapter_model.safetensors\), "
                                           r"not a sorsa-kernels adapter \(adapter.safetensors\); load it with peft: "
                                           r"PeftModel.from_pretrained\(base_model, "):
        load_adapter(base(), tmp_path / "lora")


# ------------------------------------------------------------------ modes
def test_adapter_and_export_files_are_0644(tmp_path):
    old = os.umask(0o022)
    try:
        model = adapted()
        save_adapter(model, tmp_path / "adapter")
        save_adapter(model, tmp_path / "adapter")  # a replacing save too
        export_peft_lora(model, tmp_path / "lora")
    finally:
        os.umask(old)
    for p in [*(tmp_path / "adapter").iterdir(), *(tmp_path / "lora").iterdir()]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    assert stat.S_IMODE((tmp_path / "lora").stat().st_mode) == 0o755


# ------------------------------------------------------------------ full disk
def _enospc_after_partial_write(tensors, path, *args, **kwargs):
    with open(path, "wb") as f:
        f.write(b"\0" * 64)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_full_disk_while_writing_weights_keeps_previous_adapter(saved, monkeypatch):
    before = read_adapter(saved)
    listing = sorted(p.name for p in saved.parent.iterdir()), sorted(p.name for p in saved.iterdir())
    monkeypatch.setattr(adapter_save, "save_file", _enospc_after_partial_write)
    with pytest.raises(OSError) as info:
        save_adapter(adapted(alpha=8.0, seed=2), saved)
    assert info.value.errno == errno.ENOSPC
    assert _same_adapter(read_adapter(saved), before)
    assert (sorted(p.name for p in saved.parent.iterdir()), sorted(p.name for p in saved.iterdir())) == listing


def test_full_disk_while_writing_the_json_keeps_previous_adapter(saved, monkeypatch):
    import pathlib

    before = read_adapter(saved)
    real = pathlib.Path.write_text

    def full(self, *a, **k):
        if self.name.startswith(".adapter_config.json.tmp-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(adapted(alpha=8.0, seed=2), saved)
    assert _same_adapter(read_adapter(saved), before)
    assert sorted(p.name for p in saved.iterdir()) == [WEIGHTS_NAME, CONFIG_NAME]


def test_full_disk_on_first_save_leaves_no_adapter_files(tmp_path, monkeypatch):
    monkeypatch.setattr(adapter_save, "save_file", _enospc_after_partial_write)
    with pytest.raises(OSError):
        save_adapter(adapted(), tmp_path / "adapter")
    assert list((tmp_path / "adapter").iterdir()) == []


def test_full_disk_during_export_keeps_previous_export(tmp_path, monkeypatch):
    out = tmp_path / "lora"
    export_peft_lora(adapted(), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(peft_export, "save_file", _enospc_after_partial_write)
    with pytest.raises(OSError):
        export_peft_lora(adapted(alpha=8.0, seed=2), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


def test_full_disk_during_first_export_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(peft_export, "save_file", _enospc_after_partial_write)
    with pytest.raises(OSError):
        export_peft_lora(adapted(), tmp_path / "lora")
    assert list(tmp_path.iterdir()) == []  # no folder holding only adapter_config.json


def test_export_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files that are not part of a PEFT adapter \(notes.txt\)"):
        export_peft_lora(adapted(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ kill between writes
CHILD_HEADER = BASE_SRC + """
import os, sys, time
from sorsa_kernels import load_adapter, save_adapter
from sorsa_kernels.adapters import adapter_save
"""


def _child(script, **kw):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.Popen([sys.executable, "-c", CHILD_HEADER + textwrap.dedent(script)], env=env,
                            stdout=subprocess.PIPE, text=True, cwd=os.getcwd(), **kw)


def _wait_for_line(proc, want, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.strip() == want:
            return
    proc.kill()
    pytest.fail(f"child never printed {want!r} (rc={proc.poll()})")


@pytest.fixture
def old_and_new(tmp_path):
    """Two reference adapters that differ in factors *and* config (alpha → scale)."""
    old, new = tmp_path / "ref_old", tmp_path / "ref_new"
    save_adapter(adapted(alpha=None, seed=1), old)
    save_adapter(adapted(alpha=8.0, seed=2), new)
    return old, new


@pytest.mark.parametrize("step, survivor", [("written", "old"), ("config_removed", "old"),
                                            ("weights_published", "new")])
def test_kill_between_writes_leaves_old_or_new_never_a_mix(tmp_path, old_and_new, step, survivor):
    old, new = old_and_new
    target = tmp_path / "adapter"
    save_adapter(load_adapter(base(), old), target)
    proc = _child(f"""
        def pause(name):
            if name == {step!r}:
                print(name, flush=True)
                time.sleep(600)
        adapter_save._between_steps = pause
        save_adapter(load_adapter(base(), {str(new)!r}), {str(target)!r})
    """)
    _wait_for_line(proc, step)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    got = read_adapter(target)
    assert _same_adapter(got, read_adapter(old if survivor == "old" else new))
    x = torch.randn(3, 16)
    want = load_adapter(base(), old if survivor == "old" else new)
    assert torch.equal(load_adapter(base(), target).a(x), want.a(x))
    save_adapter(load_adapter(base(), new), target)  # the next save works and clears the leftovers
    assert sorted(p.name for p in target.iterdir()) == [WEIGHTS_NAME, CONFIG_NAME]


def test_sigkill_at_random_moments_of_a_save_loop_never_mixes(tmp_path, old_and_new):
    old, new = old_and_new
    refs = [read_adapter(old), read_adapter(new)]
    target = tmp_path / "adapter"
    rng = random.Random(0)
    for _ in range(3):
        proc = _child(f"""
            models = [load_adapter(base(), {str(old)!r}), load_adapter(base(), {str(new)!r})]
            save_adapter(models[0], {str(target)!r})
            print("ready", flush=True)
            i = 1
            while True:
                save_adapter(models[i % 2], {str(target)!r})
                i += 1
        """)
        _wait_for_line(proc, "ready")
        time.sleep(rng.uniform(0.05, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        got = read_adapter(target)
        assert any(_same_adapter(got, ref) for ref in refs)
