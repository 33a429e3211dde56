"""bench/providers.py: a provider whose library is missing is skipped with the reason, not an error."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import providers

REPO = Path(__file__).resolve().parents[1]


def _block(monkeypatch, *modules: str) -> None:
    for name in modules:  # a None entry makes `import name` raise ImportError
        monkeypatch.setitem(sys.modules, name, None)


def test_qsorsa_without_bitsandbytes_is_unavailable_naming_it(monkeypatch):
    _block(monkeypatch, "bitsandbytes")
    with pytest.raises(providers.Unavailable, match=r"qsorsa needs bitsandbytes \(NF4 quantization"):
        providers.check_available("qsorsa")


def test_qsorsa_build_without_bitsandbytes_raises_unavailable_not_import_error(monkeypatch):
    _block(monkeypatch, "bitsandbytes")
    lin = providers.base_linear(32, 24, torch.float32, torch.device("cpu"))
    with pytest.raises(providers.Unavailable, match="qsorsa needs bitsandbytes"):
        providers.build("qsorsa", lin, 4)


def test_lora_without_peft_is_unavailable_naming_it(monkeypatch):
    _block(monkeypatch, "peft")
    with pytest.raises(providers.Unavailable, match=r"lora needs peft \(LoRA layers\)"):
        providers.check_available("lora")


def test_library_failing_with_a_non_import_error_is_unavailable(monkeypatch):
    # bitsandbytes raises RuntimeError, not ImportError, when its native library does not load.
    def broken(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise RuntimeError("libbitsandbytes_cuda.so: cannot open shared object file")
        return real(name, *args, **kwargs)

    real = providers.importlib.import_module
    monkeypatch.setattr(providers.importlib, "import_module", broken)
    with pytest.raises(providers.Unavailable, match="RuntimeError: libbitsandbytes_cuda.so"):
        providers.check_available("qsorsa")


def test_benchmark_of_a_provider_missing_its_library_is_skipped_with_the_reason():
    # The whole path: pytest collects bench_linear.py, the qsorsa case is skipped with the
    # reason in the -rs summary, and pytest exits 0.
    code = (
        "import sys; sys.modules['bitsandbytes'] = None; import pytest; "
        "sys.exit(pytest.main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "bench/bench_linear.py", "-k", "qsorsa and fwd_bwd",
         "--benchmark-disable", "-p", "no:cacheprovider", "-rs", "-q"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SKIPPED" in proc.stdout and "qsorsa needs bitsandbytes" in proc.stdout, proc.stdout[-3000:]
    assert "passed" not in proc.stdout.splitlines()[-1], proc.stdout[-500:]


def test_benchmark_value_check_compares_the_module_with_itself_on_the_reference_backend(monkeypatch):
    import os

    import torch

    from bench.bench_linear import check_against_reference

    class BackendDependent(torch.nn.Module):
        def forward(self, x):
            return x * (2.0 if os.environ.get("SORSA_KERNELS_BACKEND") == "reference" else 1.0)

    monkeypatch.setenv("SORSA_KERNELS_BACKEND", "auto")
    x = torch.randn(8, 4)
    assert abs(check_against_reference(BackendDependent(), x, monkeypatch, "reference") - 0.5) < 1e-6
    assert check_against_reference(torch.nn.Linear(4, 3), x, monkeypatch, "reference") == 0.0
