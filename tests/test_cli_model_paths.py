"""What ``--model`` / ``--base`` names, checked at once: mistyped paths, empty folders, classifier
bases, bases without a tokenizer, a misspelt backend (issue 31 items 1–2, issue 29 items 13, 14, 23)."""
import json

import pytest
import torch

from sorsa_kernels.jobs.models import paths as P
from tests.cli_helpers import FAST, one_line_error, run_cli


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if the Hub is asked; ``calls`` counts the one lookup an ambiguous name gets."""
    import huggingface_hub

    calls = []

    class Session:
        def head(self, url, **kwargs):
            calls.append(url)
            raise OSError("offline in this test")

        get = head

    monkeypatch.setattr(huggingface_hub, "get_session", lambda: Session())
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


@pytest.fixture
def classifier(tmp_path_factory):
    """``(base folder without a tokenizer, adapter folder, adapted model)`` of a tiny BERT classifier."""
    import copy

    from transformers import BertConfig, BertForSequenceClassification

    import sorsa_kernels as sk

    root = tmp_path_factory.mktemp("clf")
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=48, vocab_size=64, num_labels=3)).eval()
    base.save_pretrained(root / "base")
    model = copy.deepcopy(base)
    sk.apply_sorsa(model, rank=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    sk.save_adapter(model, root / "adapter")
    return root / "base", root / "adapter", model.eval()


def _merge(capsys, base, adapter, output):
    return run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "--output", output)


def test_mistyped_local_path_fails_at_once_with_did_you_mean(tmp_path, monkeypatch, capsys, no_hub, classifier):
    _, adapter, _ = classifier
    (tmp_path / "out" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    line = one_line_error(*_merge(capsys, "./out/bsae", adapter, "m")[::2])
    assert line == "sorsa-kernels: error: cannot load model: no such model folder: ./out/bsae (did you mean out/base?)"
    assert no_hub == []  # a path that can only be local is never looked up on the Hub


def test_ambiguous_org_model_asks_the_hub_once_and_names_the_local_near_miss(tmp_path, monkeypatch, capsys, no_hub,
                                                                             classifier):
    _, adapter, _ = classifier
    (tmp_path / "out" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    line = one_line_error(*_merge(capsys, "out/bsae", adapter, "m")[::2])
    assert "no such model folder: out/bsae (did you mean out/base?), and the Hub could not be reached" in line
    assert len(no_hub) == 1


@pytest.mark.parametrize("holds, listing", [([], "it is empty"), (["notes.txt", "sub/"], "it holds notes.txt, sub/")])
def test_folder_without_a_model_says_what_a_model_folder_needs_and_what_it_holds(tmp_path, capsys, holds, listing,
                                                                                 classifier):
    _, adapter, _ = classifier
    folder = tmp_path / "m"
    folder.mkdir()
    for name in holds:
        (folder / name).mkdir() if name.endswith("/") else (folder / name).write_text("x")
    line = one_line_error(*_merge(capsys, folder, adapter, tmp_path / "out")[::2])
    assert f"{folder} is not a model folder (no config.json and weights): a model folder holds config.json" in line
    assert line.endswith(listing)


def test_merge_on_a_classifier_base_loads_the_class_the_adapter_was_trained_on(tmp_path, capsys, classifier):
    from transformers import AutoModelForSequenceClassification

    base, adapter, adapted = classifier
    rc, out, err = _merge(capsys, base, adapter, tmp_path / "merged")
    assert rc == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == [
        "BertForSequenceClassification"]
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=2e-5, rtol=0)


def test_export_lora_and_analyze_on_a_classifier_base_load_its_class(tmp_path, capsys, classifier):
    base, adapter, _ = classifier
    rc, _, err = run_cli(capsys, "export-lora", "--base", base, "--adapter", adapter, "--output", tmp_path / "lora")
    assert rc == 0, err
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    rc, out, err = run_cli(capsys, "analyze", "--base", base, "--adapter", adapter, "--no-plot")
    assert rc == 0 and "classifier" not in err, err


def test_merge_needs_no_tokenizer_and_writes_none_when_the_base_has_none(tmp_path, capsys, classifier):
    base, adapter, _ = classifier
    assert not (base / "tokenizer.json").exists()
    rc, _, err = _merge(capsys, base, adapter, tmp_path / "merged")
    assert rc == 0, err
    assert (tmp_path / "merged" / "config.json").is_file() and not (tmp_path / "merged" / "tokenizer.json").exists()


def test_misspelt_backend_is_refused_before_the_embedded_model_is_pretrained(tmp_path, capsys, monkeypatch):
    from sorsa_kernels.jobs.models import embedded

    monkeypatch.setenv("SORSA_KERNELS_BACKEND", "foo")
    monkeypatch.setattr(embedded, "pretrain", lambda *a, **k: pytest.fail("pretrained before the check"))
    rc, _, err = run_cli(capsys, "finetune", *FAST, "--pretrain-steps", "3", "--output-dir", tmp_path / "o")
    assert "SORSA_KERNELS_BACKEND must be one of" in one_line_error(rc, err)


def test_near_misses_replace_the_first_missing_part(tmp_path, monkeypatch):
    (tmp_path / "runs" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert P.near_misses("runz/base") == ["runs/base"]
    assert P.near_misses("zzz/qqq") == []


def test_finetune_on_a_folder_without_a_tokenizer_says_so_in_one_whole_line(tmp_path, capsys):
    from tests.conftest import build_tiny_llama

    build_tiny_llama().save_pretrained(tmp_path / "base")
    (tmp_path / "d.jsonl").write_text('{"prompt": "1+1", "response": "2"}\n' * 4)
    rc, _, err = run_cli(capsys, "finetune", *FAST, "--model", tmp_path / "base", "--data", tmp_path / "d.jsonl",
                         "--output-dir", tmp_path / "o")
    assert "the folder has no tokenizer (none of tokenizer.json" in one_line_error(rc, err)


def test_mistyped_base_fails_before_torch_is_imported(tmp_path):
    import subprocess
    import sys

    (tmp_path / "out" / "base").mkdir(parents=True)
    code = ("import sys\nfrom sorsa_kernels.cli import main\nrc = main(sys.argv[1:])\n"
            "print(rc, 'torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, "merge", "--base", "./out/bsae", "--adapter", "a",
                           "--output", "m"], capture_output=True, text=True, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert lines[-2].endswith("no such model folder: ./out/bsae (did you mean out/base?)"), done.stderr
    assert lines[-1] == "1 False"
