"""Reference ops of kernels/: exact formulas, float64 gradients, dtype handling, dispatch."""
import pytest
import torch

import kernels
from kernels import reference


def _inputs(dtype=torch.float64, B=2, N=5, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=dtype) * 3 + 1  # non-zero mean so LayerNorm != RMSNorm
    shift, scale, weight = (torch.randn(*s, generator=g, dtype=dtype) for s in ((B, D), (B, D), (D,)))
    return x, shift, scale, weight


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("use_weight", [False, True])
def test_norm_modulate_matches_manual_formula(norm, use_weight):
    x, shift, scale, weight = _inputs()
    eps = 1e-6
    if norm == "layer":
        n = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    else:
        n = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if use_weight:
        n = n * weight
    expected = n * (1 + scale[:, None, :]) + shift[:, None, :]
    out = kernels.norm_modulate(x, shift, scale, weight if use_weight else None, norm=norm, eps=eps)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_gated_residual_matches_formula():
    x, shift, gate, _ = _inputs()
    y = torch.randn_like(x)
    torch.testing.assert_close(kernels.gated_residual(x, gate, y), x + gate[:, None, :] * y, rtol=0, atol=0)
    assert torch.equal(kernels.gated_residual(x, torch.zeros_like(gate), y), x)  # adaLN-Zero: identity at init


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("use_weight", [False, True])
def test_norm_modulate_gradcheck(norm, use_weight):
    x, shift, scale, weight = (t.requires_grad_() for t in _inputs(B=2, N=3, D=6))
    fn = lambda x, s, c, w: reference.norm_modulate(x, s, c, w if use_weight else None, norm=norm)
    assert torch.autograd.gradcheck(fn, (x, shift, scale, weight))


def test_gated_residual_gradcheck():
    x, _, gate, _ = _inputs(B=2, N=3, D=6)
    y = torch.randn_like(x)
    assert torch.autograd.gradcheck(reference.gated_residual, tuple(t.requires_grad_() for t in (x, gate, y)))


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_low_precision_is_normalised_in_float32(norm):
    x, shift, scale, _ = _inputs(dtype=torch.float32)
    out = kernels.norm_modulate(x.bfloat16(), shift.bfloat16(), scale.bfloat16(), norm=norm)
    assert out.dtype == torch.bfloat16
    ref = kernels.norm_modulate(x.bfloat16().float(), shift.bfloat16().float(), scale.bfloat16().float(), norm=norm)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)  # only the final bf16 rounding differs


def test_dispatch_and_errors():
    x, shift, scale, _ = _inputs()
    assert torch.equal(kernels.norm_modulate(x, shift, scale, norm="rms"),
                       reference.norm_modulate(x, shift, scale, norm="rms"))
    with pytest.raises(ValueError, match="norm must be"):
        kernels.norm_modulate(x, shift, scale, norm="batch")
    with pytest.raises(ValueError, match="available: ref"):
        kernels.gated_residual(x, shift, x, impl="cuda")
