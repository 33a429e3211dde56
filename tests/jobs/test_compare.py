"""``run_compare`` and ``TrajectoryCallback``: the methods really differ, share one budget,
repeat exactly for one seed, and the report's files are written.

One tiny comparison (embedded model pretrained 5 steps, 4 training steps, a record every
2) is shared by the tests of this module; a second identical run checks reproducibility.
"""
import json
import sys

import pytest
import torch

from sorsa_kernels.jobs.compare.run import CompareConfig, run_compare
from sorsa_kernels.jobs.compare.report import PLOT_FILES, write_report
from sorsa_kernels.jobs.finetune import FinetuneConfig

RANK = 4
SMALL = dict(max_steps=4, pretrain_steps=5, eval_samples=8, rank=RANK, progress=False)


def _compare(out, plots=True):
    return run_compare(CompareConfig(FinetuneConfig(output_dir=str(out), **SMALL), record_every=2, plots=plots))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return _compare(tmp_path_factory.mktemp("cmp") / "out")


def _records(result, method, key):
    return [r[key] for r in result.report["methods"][method]["records"]]


def test_every_method_starts_from_the_pretrained_function(result):
    methods = result.report["methods"]
    assert list(methods) == ["sorsa", "pissa", "lora"]
    for m in methods:
        first = methods[m]["records"][0]
        assert first["step"] == 0 and abs(first["delta_sigma"]) < 1e-12 and abs(first["delta_d"]) < 1e-12, m
    losses = [methods[m]["records"][0]["heldout_loss"] for m in methods]
    assert max(losses) - min(losses) < 1e-5 * losses[0]


def test_lora_adapter_starts_at_zero_and_pissa_sorsa_at_the_top_r_svd_of_w0(result):
    from sorsa_kernels.jobs.models.embedded import build_embedded
    from sorsa_kernels.adapters.surgery import find_targets

    base, _ = build_embedded(pretrain_steps=SMALL["pretrain_steps"], progress=False)
    shares = []
    for name in find_targets(base):
        s = torch.linalg.svdvals(base.get_submodule(name).weight.detach().double())
        shares.append(float(s[:RANK].square().sum().sqrt() / s.square().sum().sqrt()))
    expected = sum(shares) / len(shares)
    assert _records(result, "lora", "adapter_norm")[0] == 0.0
    for m in ("pissa", "sorsa"):
        assert _records(result, m, "adapter_norm")[0] == pytest.approx(expected, rel=1e-5), m
    assert _records(result, "lora", "adapter_norm")[-1] > 0  # and then LoRA grows from zero


def test_methods_really_differ_after_training(result):
    final = {m: v["records"][-1] for m, v in result.report["methods"].items()}
    for m, rec in final.items():
        assert rec["delta_d"] > 0 and rec["delta_sigma"] > 0, m
    for key in ("delta_d", "heldout_loss"):
        values = sorted(rec[key] for rec in final.values())
        assert all(b > a * (1 + 1e-3) for a, b in zip(values, values[1:])), (key, values)


def test_sorsa_orthonormality_stays_below_pissas(result):
    sorsa, pissa = _records(result, "sorsa", "orthonormality"), _records(result, "pissa", "orthonormality")
    assert sorsa[0] < 1e-5  # orthonormal SVD factors at the start
    assert all(s < 0.5 * p for s, p in zip(sorsa, pissa)), (sorsa, pissa)


def test_every_method_gets_the_same_budget_and_data_order(result):
    methods = result.report["methods"]
    for key in ("steps", "tokens", "data_fingerprint"):
        assert len({v[key] for v in methods.values()}) == 1, key
    assert len({tuple(_records(result, m, "learning_rate")) for m in methods}) == 1
    assert len({tuple(_records(result, m, "step")) for m in methods}) == 1
    assert _records(result, "sorsa", "step") == [0, 2, 4]
    assert all(x is not None for x in _records(result, "sorsa", "train_loss")[1:])
    n_matrices = len(methods["sorsa"]["records"][0]["layers"])
    assert methods["pissa"]["trainable_params"] == methods["lora"]["trainable_params"]
    assert methods["sorsa"]["trainable_params"] == methods["lora"]["trainable_params"] + RANK * n_matrices


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if not k.endswith("_s") and k != "machine"}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def test_same_seed_gives_the_same_json(result, tmp_path):
    again = _compare(tmp_path / "again", plots=False)
    first = json.loads((result.output_dir / "compare.json").read_text())
    second = json.loads((again.output_dir / "compare.json").read_text())
    assert "timing_s" in first and "train_s" in first["methods"]["sorsa"]
    assert _without_timings(first) == _without_timings(second)


def test_each_png_is_written_and_not_blank(result):
    import matplotlib.image

    for name in PLOT_FILES:
        path = result.output_dir / name
        assert path in result.files and path.stat().st_size > 10_000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(path).std() > 0.01, name


def test_markdown_holds_the_summary_and_every_trajectory(result):
    md = (result.output_dir / "compare.md").read_text()
    for label in ("| SORSA |", "| PiSSA |", "| LoRA |", "## SORSA", "## PiSSA", "## LoRA", "paper's ordering"):
        assert label in md, label


def test_without_matplotlib_json_and_markdown_are_written_and_the_note_says_how(result, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    files, note = write_report(result.report, tmp_path / "nomp")
    assert [f.name for f in files] == ["compare.json", "compare.md"]
    assert "pip install matplotlib" in note


# ---------------------------------------------------------------------- the public callback
def _trainer(model, tmp_path, recorder, steps=3):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Ids(Dataset):
        ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps,
                             learning_rate=1e-2, logging_steps=100, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=Ids(), callbacks=[recorder])


def test_trajectory_callback_on_a_users_sorsa_run(tmp_path):
    from sorsa_kernels import TrajectoryCallback, apply_sorsa
    from tests.conftest import build_tiny_llama

    model = apply_sorsa(build_tiny_llama(), 4, ["q_proj", "v_proj"], progress=False)
    calls = []
    recorder = TrajectoryCallback(every=2, evaluate=lambda m: calls.append(m.training) or {"x": 1.0},
                                  evaluate_every=2)
    _trainer(model, tmp_path, recorder).train()
    assert [r["step"] for r in recorder.records] == [0, 2, 3]  # start, every 2, and the last step
    assert [("x" in r) for r in recorder.records] == [True, False, True]  # first, every 2nd record, last
    assert calls == [False, False]  # evaluated in eval mode
    assert abs(recorder.records[0]["delta_d"]) < 1e-12 and recorder.records[-1]["delta_d"] > 0
    assert recorder.records[1]["train_loss"] is not None  # it makes the Trainer log at record steps
    assert len(recorder.records[0]["layers"]) == 4  # q and v of two decoder layers


def test_trajectory_callback_follows_fully_trained_linear_layers(tmp_path):
    from sorsa_kernels import TrajectoryCallback
    from tests.conftest import build_tiny_llama

    model = build_tiny_llama()
    recorder = TrajectoryCallback(every=1, target_modules=["q_proj"])
    _trainer(model, tmp_path, recorder, steps=2).train()
    last = recorder.records[-1]
    assert last["orthonormality"] is None and last["adapter_norm"] is None
    assert last["delta_sigma"] > 0 and set(last["layers"]) == {f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)}


def test_trajectory_callback_without_adapters_or_targets_says_what_to_pass(tmp_path):
    from sorsa_kernels import TrajectoryCallback
    from tests.conftest import build_tiny_llama

    with pytest.raises(ValueError, match="pass target_modules="):
        _trainer(build_tiny_llama(), tmp_path, TrajectoryCallback()).train()


def test_trajectory_callback_rejects_a_non_positive_interval():
    from sorsa_kernels import TrajectoryCallback

    with pytest.raises(ValueError, match="every must be a positive number of steps, got 0"):
        TrajectoryCallback(every=0)
