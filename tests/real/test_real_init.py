"""Full vs randomized SVD initialization on real weights: both reproduce the base model's logits, and the
randomized top-r spectrum is close to the full one (the first decoder layer; every layer in
``bench/real_qsorsa_error.py``)."""
import pytest

from bench.real_qsorsa_error import measure_init, targets


@pytest.fixture(scope="module")
def measured(smollm2):
    model, tokenizer = smollm2
    return measure_init(model, tokenizer, targets(model, (0,)), ranks=(16,), prompts=2)["by_rank"]["16"]


def test_full_and_randomized_init_both_reproduce_the_base_logits(measured):
    for key in ("full_vs_base", "randomized_vs_base", "randomized_vs_full"):
        assert measured[key]["rel"] < 1e-5, (key, measured[key])


def test_randomized_svd_finds_the_top_singular_values_within_a_few_percent(measured):
    # every layer at r = 16: 3.5 % mean, 6.5 % worst matrix (2 power iterations, oversampling 16)
    assert measured["s_rel_err_mean"] < 0.05 and measured["s_rel_err_max"] < 0.1, measured


def test_randomized_init_is_faster_than_full(measured):
    # every layer: 9× at r = 16 (docs/results/real-smollm2-qsorsa.md); both timed in the same process
    assert measured["randomized_s"] < measured["full_s"], measured
