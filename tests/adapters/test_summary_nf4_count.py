"""The adaptation summary counts the parameters an NF4 residual holds, not its packed bytes."""
import pytest


@pytest.mark.parametrize("target", [["q_proj", "v_proj"], ["experts"]])
def test_nf4_parameter_total_counts_parameters_not_packed_bytes(target):
    import torch

    from sorsa_kernels import apply_sorsa
    from sorsa_kernels.adapters.summary import adaptation_summary
    from tests.adapters.test_analysis import _tiny_mixtral

    model = _tiny_mixtral()
    dense_total = sum(p.numel() for p in model.parameters())
    apply_sorsa(model, 2, target_modules=target, quantize="nf4", progress=False)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = adaptation_summary(model)
    assert summary.total_parameters == dense_total + adapters
    assert any(isinstance(getattr(m, "nf4_packed", None), torch.Tensor) for m in model.modules())
