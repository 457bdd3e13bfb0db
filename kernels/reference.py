"""Pure-PyTorch reference implementations of the ops that `kernels/` fuses.

These functions are the specification of each op and the path used on CPU; the CUDA kernels (csrc/) compute the
same values and gradients, and the tests compare them against these references (stylegan3 `torch_utils/ops` style).

Shapes and output dtypes: see kernels/__init__.py. Half-precision inputs (fp16/bf16) are computed in float32 and
rounded once at the end, as the kernels do; float32 inputs take exactly the eager ops (so CPU training is unchanged).
"""
import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (numerics), the input dtype otherwise (so float64 gradcheck stays float64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_norm(norm):
    if norm not in ("layer", "rms"):
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")


def norm_modulate(x, shift, scale, weight=None, norm="layer", eps=1e-6):
    """y = norm(x) * (1 + scale[:, None]) + shift[:, None]; norm is LayerNorm or RMSNorm over D.

    The norm has no learned affine parameters (as in DiT's adaLN) unless `weight` (D,) is given, in which case
    norm(x) is multiplied by it before modulation.
    """
    check_norm(norm)
    dt = _compute_dtype(x.dtype)
    xf, w = x.to(dt), None if weight is None else weight.to(dt)
    if norm == "layer":
        n = F.layer_norm(xf, xf.shape[-1:], w, None, eps)
    else:
        n = F.rms_norm(xf, xf.shape[-1:], w, eps)
    y = n * (1 + scale.to(dt).unsqueeze(1)) + shift.to(dt).unsqueeze(1)
    return y.to(x.dtype)


def gated_residual(x, gate, y):
    """x + gate[:, None] * y: the gated residual update of an adaLN-Zero block (dtype: eager type promotion)."""
    out_dtype = torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype))
    dt = _compute_dtype(out_dtype)
    return (x.to(dt) + gate.to(dt).unsqueeze(1) * y.to(dt)).to(out_dtype)


def swiglu(h):
    """silu(a) * b with a, b = h.chunk(2, dim=-1): the gate of a SwiGLU MLP, (..., 2H) -> (..., H)."""
    a, b = h.to(_compute_dtype(h.dtype)).chunk(2, dim=-1)
    return (F.silu(a) * b).to(h.dtype)
