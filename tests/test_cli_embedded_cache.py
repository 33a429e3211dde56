"""The pretrained embedded model is cached in the user cache folder: only the first run pretrains."""
import pytest

from sorsa_kernels.jobs.models import embedded as E
from tests.cli_helpers import FAST, run_cli

TINY = (*FAST, "--pretrain-steps", "3")  # the last --pretrain-steps wins


@pytest.fixture
def pretraining_steps(monkeypatch):
    """The pretraining steps each run takes, counted batch by batch: ``[3, 0]`` is one run that
    pretrained and one that did not."""
    counts = []
    real = E.pretrain

    def counting(model, tokenizer, steps=E.PRETRAIN_STEPS, **kwargs):
        counts.append(0)
        batches = E._pretrain_batches

        def counted(*a, **k):
            for batch in batches(*a, **k):
                counts[-1] += 1
                yield batch

        monkeypatch.setattr(E, "_pretrain_batches", counted)
        try:
            return real(model, tokenizer, steps=steps, **kwargs)
        finally:
            monkeypatch.setattr(E, "_pretrain_batches", batches)

    monkeypatch.setattr(E, "pretrain", counting)
    return counts


def _finetune_twice(capsys, tmp_path, *extra):
    for run in ("a", "b"):
        rc, out, err = run_cli(capsys, "finetune", *TINY, *extra, "--output-dir", tmp_path / run)
        assert rc == 0, err
    return out


def test_second_finetune_reads_the_pretrained_embedded_model_from_the_cache(capsys, tmp_path, pretraining_steps):
    out = _finetune_twice(capsys, tmp_path)
    assert pretraining_steps == [3]  # the second run took 0 pretraining steps
    assert "pretrained weights read from the cache" in out
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / r / "base" / "model.safetensors") for r in "ab")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # the cached base is bit-identical


def test_no_cache_pretrains_again(capsys, tmp_path, pretraining_steps):
    _finetune_twice(capsys, tmp_path, "--no-cache")
    assert pretraining_steps == [3, 3]


def test_embedded_cache_lives_under_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("SORSA_KERNELS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    E.build_embedded(pretrain_steps=1, progress=False)
    assert [p.name.split("-")[0] for p in (tmp_path / "sorsa-kernels").iterdir()] == ["embedded"]


def test_unwritable_cache_still_builds_the_model_and_says_why(monkeypatch, tmp_path, capsys):
    (tmp_path / "file").write_text("")  # a cache folder that cannot be created (root may write anywhere)
    monkeypatch.setenv("SORSA_KERNELS_CACHE", str(tmp_path / "file" / "cache"))
    model, _ = E.build_embedded(pretrain_steps=1, progress=False)
    assert "cache not written" in capsys.readouterr().out
