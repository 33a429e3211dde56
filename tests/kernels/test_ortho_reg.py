"""The grouped orthonormal-regularizer kernels against ``ops/reference.py`` (float64 expected).

Without a GPU these run in the Triton interpreter (``TRITON_INTERPRET=1`` is set by
``tests/conftest.py`` before the kernel module is imported); bf16 runs there too, since the
kernels upcast every tile to float32 before ``tl.dot``.  Shapes are ragged (k from 3 to 300,
r from 1 to 130) and mix U-like (k×r) and V-like (stored r×k, ``transposed=True``)
matrices in one call; ``k_chunk`` and ``block_r`` are set small in some tests so that the
k-split, the several Gram tiles and the mirrored lower triangle all run on small shapes.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sorsa_kernels.ops import reference
from tests.conftest import rel_err, requires_cuda

ortho_reg = pytest.importorskip("sorsa_kernels.kernels.ortho_reg")
ortho_reg_configs = pytest.importorskip("sorsa_kernels.kernels.ortho_reg_configs")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = [
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.float16, id="float16"),
    pytest.param(torch.bfloat16, id="bfloat16"),
]
# The value is always accumulated in float32 from the (exactly upcast) parameter values.
VALUE_TOL = 1e-5

# (k, r, transposed): k from 3 to 300, r from 1 to 130, k < r included, both orientations.
RAGGED = [(3, 1, False), (300, 130, False), (17, 5, True), (130, 40, True), (64, 64, False),
          (100, 33, False), (5, 9, True)]
# Small ranks: 16-wide Gram tiles in several rows and columns with block_r=16.
SMALL = [(37, 21, False), (50, 7, True), (3, 1, False), (29, 35, True)]


def _matrices(shapes, dtype, seed, grad=None):
    """Random non-zero matrices ``randn/√k`` (so AᵀA − I is O(1)), as leaf tensors.

    ``grad``: None leaves ``.grad`` unset; a float gives random grads of that scale.
    """
    g = torch.Generator().manual_seed(seed)
    mats, flags = [], []
    for k, r, tr in shapes:
        a = torch.randn(k, r, generator=g) / k**0.5
        if tr:
            a = a.T.contiguous()
        a = a.to(device=DEVICE, dtype=dtype).requires_grad_()
        if grad is not None:
            a.grad = (grad * torch.randn(a.shape, generator=g)).to(device=DEVICE, dtype=dtype)
        mats.append(a)
        flags.append(tr)
    return mats, flags


def _expected(mats, flags, coeff):
    """Value and grads from the reference on float64 copies (taken before the kernel runs)."""
    copies = []
    for a in mats:
        c = a.detach().double().requires_grad_()
        if a.grad is not None:
            c.grad = a.grad.detach().double().clone()
        copies.append(c)
    value = reference.ortho_value_and_grad_(copies, coeff, flags)
    return value, [c.grad for c in copies]


def _assert_matches(mats, value, expected_value, expected_grads, tol):
    assert rel_err(value, expected_value) < VALUE_TOL
    for i, (a, g) in enumerate(zip(mats, expected_grads)):
        err = rel_err(a.grad, g)
        assert err < tol, f"matrix {i} {tuple(a.shape)}: grad rel err {err:.2e}"


def _orthonormal(k, r, dtype, seed):
    """An exactly orthonormal k×r matrix (signed columns of a permutation, entries ±1)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(k, r)
    rows = torch.randperm(k, generator=g)[:r]
    signs = torch.randint(0, 2, (r,), generator=g) * 2.0 - 1.0
    a[rows, torch.arange(r)] = signs
    return a.to(device=DEVICE, dtype=dtype).requires_grad_()


# --------------------------------------------------------------------------- values and grads
@pytest.mark.parametrize("dtype", DTYPES)
def test_ragged_mixed_orientations_match_reference(dtype):
    mats, flags = _matrices(RAGGED, dtype, seed=1)
    expected_value, expected_grads = _expected(mats, flags, coeff=3.0)
    value = ortho_reg.grouped_ortho_value_and_grad_(mats, 3.0, flags, k_chunk=64)
    _assert_matches(mats, value, expected_value, expected_grads, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_existing_grad_is_accumulated_not_overwritten(dtype):
    mats, flags = _matrices(SMALL, dtype, seed=2, grad=0.3)
    expected_value, expected_grads = _expected(mats, flags, coeff=len(SMALL))
    value = ortho_reg.grouped_ortho_value_and_grad_(mats, float(len(SMALL)), flags)
    _assert_matches(mats, value, expected_value, expected_grads, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_missing_grad_is_created_in_parameter_dtype(dtype):
    mats, flags = _matrices(SMALL, dtype, seed=3)
    expected_value, expected_grads = _expected(mats, flags, coeff=2.0)
    ortho_reg.grouped_ortho_value_and_grad_(mats, 2.0, flags)
    for a, g in zip(mats, expected_grads):
        assert a.grad is not None and a.grad.dtype == dtype and a.grad.shape == a.shape
        assert rel_err(a.grad, g) < TOL[dtype]


def test_several_gram_tiles_and_k_chunks_match_reference():
    # block_r=16 splits r=35 into 3×3 tiles (6 computed, 3 mirrored); k_chunk=8 gives up to
    # 7 partial Grams per tile, summed by the norm kernel.
    mats, flags = _matrices(SMALL, torch.float32, seed=4, grad=0.1)
    expected_value, expected_grads = _expected(mats, flags, coeff=1.5)
    value = ortho_reg.grouped_ortho_value_and_grad_(mats, 1.5, flags, k_chunk=8, block_r=16)
    _assert_matches(mats, value, expected_value, expected_grads, TOL[torch.float32])


def test_mixed_dtypes_in_one_call_match_reference():
    mats = []
    for i, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16, torch.float16)):
        m, _ = _matrices([SMALL[i]], dtype, seed=10 + i, grad=0.2)
        mats += m
    flags = [tr for _, _, tr in SMALL]
    expected_value, expected_grads = _expected(mats, flags, coeff=4.0)
    value = ortho_reg.grouped_ortho_value_and_grad_(mats, 4.0, flags)
    assert rel_err(value, expected_value) < VALUE_TOL
    for a, g in zip(mats, expected_grads):
        assert rel_err(a.grad, g) < TOL[a.dtype]


def test_strided_views_and_grad_layout_unlike_parameter_match_reference():
    # A k×r view with stride (1, k) (k axis contiguous although transposed=False), and a
    # .grad laid out r-contiguous; and the opposite for a transposed matrix.
    g = torch.Generator().manual_seed(5)
    a = (torch.randn(21, 45, generator=g) / 45**0.5).to(DEVICE).T.requires_grad_()  # 45×21
    a.grad = torch.randn(45, 21, generator=g).to(DEVICE)
    b = (torch.randn(30, 13, generator=g) / 30**0.5).to(DEVICE).T.requires_grad_()  # 13×30 stored
    b.grad = torch.randn(30, 13, generator=g).to(DEVICE).T
    assert a.stride() == (1, 45) and a.grad.stride() == (21, 1) and b.grad.stride() == (1, 13)
    mats, flags = [a, b], [False, True]
    expected_value, expected_grads = _expected(mats, flags, coeff=2.0)
    value = ortho_reg.grouped_ortho_value_and_grad_(mats, 2.0, flags)
    _assert_matches(mats, value, expected_value, expected_grads, TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
def test_exactly_orthonormal_matrix_gets_zero_update_and_no_nan(dtype):
    stored_transposed = _orthonormal(14, 9, dtype, seed=7).detach().T.contiguous().requires_grad_()
    ortho = [_orthonormal(40, 6, dtype, seed=6), stored_transposed]
    others, _ = _matrices([(33, 5, False)], dtype, seed=8, grad=0.5)
    mats = ortho + others
    before = [torch.randn(a.shape).to(device=DEVICE, dtype=dtype) for a in ortho]
    for a, g in zip(ortho, before):
        a.grad = g.clone()
    flags = [False, True, False]
    expected_value, expected_grads = _expected(mats, flags, coeff=3.0)
    value = ortho_reg.grouped_ortho_value_and_grad_(mats, 3.0, flags)
    for a, g in zip(ortho, before):
        assert torch.equal(a.grad, g)
    assert all(torch.isfinite(a.grad).all() for a in mats)
    assert rel_err(value, expected_value) < VALUE_TOL
    assert rel_err(others[0].grad, expected_grads[2]) < TOL[dtype]


def test_all_orthonormal_gives_zero_value():
    mats = [_orthonormal(12, 4, torch.float32, seed=9), _orthonormal(20, 20, torch.float32, seed=10)]
    value = ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0)
    assert float(value) == 0.0
    assert all(not a.grad.any() for a in mats)


def test_value_is_a_float32_scalar_on_the_matrices_device():
    mats, flags = _matrices(SMALL[:2], torch.float16, seed=11)
    value = ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0, flags)
    assert value.shape == () and value.dtype == torch.float32 and value.device == mats[0].device


# --------------------------------------------------------------------------- determinism
def test_every_gram_config_gives_identical_bits(monkeypatch, k_sequential_dot):
    # The autotuner picks a Gram config by timing; the k-chunks and the step inside a chunk
    # are fixed, so every config (the GPU list included) must give the same bits.
    shapes = SMALL + [(300, 40, False), (130, 20, True)]
    configs = ortho_reg_configs.gram_configs(interpret=True) + ortho_reg_configs.gram_configs(interpret=False)
    results = []
    for cfg in configs:
        monkeypatch.setattr(ortho_reg._ortho_gram_partial_kernel, "configs", [cfg])
        monkeypatch.setattr(ortho_reg._ortho_gram_partial_kernel, "cache", {})
        mats, flags = _matrices(shapes, torch.float32, seed=30, grad=0.1)
        value = ortho_reg.grouped_ortho_value_and_grad_(mats, 2.0, flags, k_chunk=64)
        results.append((value, [a.grad for a in mats]))
    for cfg, (value, grads) in zip(configs[1:], results[1:]):
        assert torch.equal(value, results[0][0]), cfg
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1])), cfg


@pytest.mark.parametrize("capability, precision, block_r, step", [
    (80, "tf32x3", 128, 32), (86, "tf32x3", 128, 32), (89, "tf32x3", 128, 32),  # fp32 below Hopper: 32 rows
    (90, "tf32x3", 128, 64), (80, "tf32", 128, 64), (80, "tf32x3", 64, 64),
])
def test_gram_step_is_fixed_per_gpu_family_and_precision(capability, precision, block_r, step):
    # 64-row steps spilled 484 B-1.3 KB per thread on sm_80 for fp32 sets at r = 128 (compile facts).
    from sorsa_kernels.kernels._launch import SMEM_PER_BLOCK, Target

    params = ortho_reg_configs.fixed_launch_params(Target(capability, SMEM_PER_BLOCK[capability]), block_r, precision)
    assert params.gram_step_k == step
    assert ortho_reg_configs.fixed_launch_params(None, block_r, precision).gram_step_k == ortho_reg_configs.GRAM_STEP_K


# --------------------------------------------------------------------------- the plan cache
def test_same_matrices_reuse_the_cached_plan():
    mats, flags = _matrices(SMALL, torch.float32, seed=12, grad=0.1)
    ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0, flags)
    builds = ortho_reg._plan_builds
    _, twice = _expected(mats, flags, coeff=1.0)  # from the grads after the first call
    ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0, flags)
    assert ortho_reg._plan_builds == builds
    for a, g in zip(mats, twice):
        assert rel_err(a.grad, g) < 1e-5


def test_grads_recreated_by_set_to_none_reuse_the_plan_and_get_the_update():
    # zero_grad(set_to_none=True) gives every matrix a new .grad each step: the plan is
    # kept (no rebuild) and its table is pointed at the new grads.
    mats, flags = _matrices(SMALL, torch.float32, seed=16, grad=0.1)
    ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0, flags)
    builds = ortho_reg._plan_builds
    old = [a.grad for a in mats]  # kept alive: a stale table would still add into them
    old_copies = [g.clone() for g in old]
    for a in mats:
        a.grad = None
    expected_value, expected_grads = _expected(mats, flags, coeff=1.0)
    value = ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0, flags)
    assert ortho_reg._plan_builds == builds
    _assert_matches(mats, value, expected_value, expected_grads, 1e-5)
    assert all(torch.equal(g, c) for g, c in zip(old, old_copies))


def test_plan_cache_is_capped():
    ortho_reg.clear_cache()
    alive = []  # every set kept alive: a freed set's addresses could be reused and hit its plan
    for seed in range(ortho_reg._MAX_PLANS + 3):
        mats, flags = _matrices(SMALL[:2], torch.float32, seed=40 + seed)
        alive.append(mats)
        ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0, flags)
    assert len(ortho_reg._PLANS) == ortho_reg._MAX_PLANS


def test_cache_notices_replaced_parameter_storage():
    mats, flags = _matrices(SMALL, torch.float32, seed=13)
    ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0, flags)
    old = mats[0].data  # kept alive: a stale table would still read it
    mats[0].data = torch.randn_like(old) / 6
    for a in mats:
        a.grad = None
    expected_value, expected_grads = _expected(mats, flags, coeff=1.0)
    value = ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0, flags)
    _assert_matches(mats, value, expected_value, expected_grads, 1e-5)


def test_cache_notices_replaced_grad_tensor():
    mats, flags = _matrices(SMALL, torch.float32, seed=14, grad=0.1)
    ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0, flags)
    old_grad = mats[2].grad  # kept alive: a stale table would still add into it
    old_copy = old_grad.clone()
    mats[2].grad = torch.zeros_like(old_grad)
    expected_value, expected_grads = _expected(mats, flags, coeff=1.0)
    value = ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0, flags)
    _assert_matches(mats, value, expected_value, expected_grads, 1e-5)
    assert torch.equal(old_grad, old_copy)


def test_cache_notices_new_shape_at_the_same_address():
    storage = torch.randn(240, device=DEVICE) / 5
    grads = torch.zeros(240, device=DEVICE)
    a = storage[:120].view(20, 6).requires_grad_()
    a.grad = grads[:120].view(20, 6)
    ortho_reg.grouped_ortho_value_and_grad_([a], 1.0)
    grads.zero_()
    b = storage[:108].view(18, 6).requires_grad_()  # same address and strides, fewer rows
    b.grad = grads[:108].view(18, 6)
    assert (b.data_ptr(), b.stride(), b.grad.data_ptr()) == (a.data_ptr(), a.stride(), a.grad.data_ptr())
    expected_value, expected_grads = _expected([b], [False], coeff=1.0)
    value = ortho_reg.grouped_ortho_value_and_grad_([b], 1.0)
    _assert_matches([b], value, expected_value, expected_grads, 1e-5)


def test_cache_notices_a_model_whose_adapter_set_changes(backend):
    import copy

    from sorsa_kernels import SORSALinear
    from sorsa_kernels.nn.regularizer import add_regularizer_grad, adapter_matrices

    torch.manual_seed(15)
    model = nn.Sequential(SORSALinear.from_linear(nn.Linear(40, 24), 6), SORSALinear.from_linear(nn.Linear(24, 30), 3))
    model.to(DEVICE)

    def step_and_check():
        with torch.no_grad():
            for a in adapter_matrices(model):
                a.add_(0.05 * torch.randn_like(a))
        ref = copy.deepcopy(model)  # deepcopy drops .grad: copy it over
        for a, b in zip(adapter_matrices(model), adapter_matrices(ref)):
            b.grad = None if a.grad is None else a.grad.clone()
        backend("reference")
        expected = add_regularizer_grad(ref, gamma=4e-4, lr_max=3e-5)
        backend("triton")
        value = add_regularizer_grad(model, gamma=4e-4, lr_max=3e-5)
        assert rel_err(value, expected) < 1e-5
        for a, b in zip(adapter_matrices(model), adapter_matrices(ref)):
            assert rel_err(a.grad, b.grad) < 1e-5

    step_and_check()
    model.append(SORSALinear.from_linear(nn.Linear(30, 17), 5).to(DEVICE))  # a new layer
    step_and_check()
    old = model[0].U.data
    model[0].U.data = old.clone()  # new storage for one adapter
    step_and_check()
    model.zero_grad(set_to_none=True)  # every .grad recreated
    step_and_check()
    del old


# --------------------------------------------------------------------------- bad input
def test_empty_list_is_rejected():
    with pytest.raises(ValueError, match="at least one adapter matrix"):
        ortho_reg.grouped_ortho_value_and_grad_([], 1.0)


def test_transposed_flags_must_match_matrix_count():
    mats, _ = _matrices(SMALL[:2], torch.float32, seed=16)
    with pytest.raises(ValueError, match="transposed has 1 flags for 2 matrices"):
        ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0, [False])


def test_non_2d_matrix_is_rejected():
    a = torch.randn(4, 3, 2, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match=r"matrix 0 has shape \(4, 3, 2\).*2-D"):
        ortho_reg.grouped_ortho_value_and_grad_([a], 1.0)


def test_float64_matrix_is_rejected_with_the_allowed_dtypes():
    mats, _ = _matrices(SMALL[:1], torch.float32, seed=17)
    mats.append(torch.randn(5, 3, device=DEVICE, dtype=torch.float64, requires_grad=True))
    with pytest.raises(TypeError, match="matrix 1 has dtype torch.float64.*float32, float16 and bfloat16"):
        ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0)


def test_matrices_on_two_devices_are_rejected():
    mats, _ = _matrices(SMALL[:1], torch.float32, seed=18)
    mats.append(torch.randn(5, 3, device="meta", requires_grad=True))
    with pytest.raises(ValueError, match="matrix 1 is on meta but matrix 0 is on"):
        ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0)


def test_matrix_without_a_unit_stride_is_rejected():
    a = torch.randn(12, 10, device=DEVICE)[::2, ::2].requires_grad_()
    with pytest.raises(ValueError, match=r"matrix 0 has strides \(20, 2\).*one axis with stride 1"):
        ortho_reg.grouped_ortho_value_and_grad_([a], 1.0)


def test_grad_without_a_unit_stride_is_rejected():
    a = torch.randn(6, 5, device=DEVICE, requires_grad=True)
    a.grad = torch.zeros(12, 10, device=DEVICE)[::2, ::2]
    with pytest.raises(ValueError, match=r"the .grad of matrix 0 has strides \(20, 2\)"):
        ortho_reg.grouped_ortho_value_and_grad_([a], 1.0)


def test_the_same_matrix_twice_is_rejected():
    mats, flags = _matrices(SMALL, torch.float32, seed=20)
    with pytest.raises(ValueError, match="matrices 1 and 4 share one .grad tensor"):
        ortho_reg.grouped_ortho_value_and_grad_(mats + mats[1:2], 1.0, flags + flags[1:2])


@pytest.mark.parametrize("kwargs, message", [
    ({"k_chunk": 0}, "k_chunk must be positive, got 0"),
    ({"block_r": 24}, "block_r must be a power of two ≥ 16, got 24"),
    ({"block_r": 8}, "block_r must be a power of two ≥ 16, got 8"),
], ids=["k_chunk-0", "block_r-24", "block_r-8"])
def test_bad_split_parameters_are_rejected(kwargs, message):
    mats, _ = _matrices(SMALL[:1], torch.float32, seed=19)
    with pytest.raises(ValueError, match=message):
        ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0, **kwargs)


# --------------------------------------------------------------------------- GPU only
LLAMA_SHAPES = [(4096, 128, False), (11008, 128, False), (4096, 128, True), (11008, 128, True)]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_shapes_match_reference_on_gpu(dtype):
    # k up to 32768: G − I cancels most of AᵀA, so any float32 accumulation loses digits.
    # The bar is the float64 reference with each dtype's tolerance, or twice the error of the
    # plain-PyTorch float32 reference on the same inputs where that is larger.
    shapes = LLAMA_SHAPES + [(32768, 256, False), (32768, 200, True), (1000, 1, False)]
    mats, flags = _matrices(shapes, dtype, seed=20)
    coeff = float(len(shapes))
    expected_value, expected_grads = _expected(mats, flags, coeff)
    fp32 = [a.detach().float().requires_grad_() for a in mats]
    fp32_value = reference.ortho_value_and_grad_(fp32, coeff, flags)
    value = ortho_reg.grouped_ortho_value_and_grad_(mats, coeff, flags)
    assert rel_err(value, expected_value) < max(VALUE_TOL, 2 * rel_err(fp32_value, expected_value))
    for i, (a, b, g) in enumerate(zip(mats, fp32, expected_grads)):
        tol = max(TOL[dtype], 2 * rel_err(b.grad, g))
        assert rel_err(a.grad, g) < tol, f"matrix {i} {tuple(a.shape)}"


@requires_cuda
def test_steady_state_call_is_three_launches_without_host_sync():
    mats, flags = _matrices(LLAMA_SHAPES * 3, torch.bfloat16, seed=21)
    ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0, flags)  # builds the plan, autotunes
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.cuda.set_sync_debug_mode("error")  # any host synchronization raises
        try:
            ortho_reg.grouped_ortho_value_and_grad_(mats, 1.0, flags)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) <= 3, [e.name for e in kernels]
