"""Pure-PyTorch reference implementations of the ops that `kernels/` fuses.

These functions are the specification of each op and the path used on CPU. A later issue adds CUDA
implementations with exactly the same signatures; `kernels/__init__.py` will dispatch to them and the tests
will compare their outputs and gradients against these references (stylegan3 `torch_utils/ops` style).

Shapes: x, y (B, N, D) token sequences; shift, scale, gate (B, D) per-sample vectors broadcast over N.
Low-precision inputs (fp16/bf16) are normalised in float32 and the result is cast back to x.dtype.
"""
import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (numerics), the input dtype otherwise (so float64 gradcheck stays float64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def norm_modulate(x, shift, scale, weight=None, norm="layer", eps=1e-6):
    """y = norm(x) * (1 + scale[:, None]) + shift[:, None]; norm is LayerNorm or RMSNorm over D.

    The norm has no learned affine parameters (as in DiT's adaLN) unless `weight` (D,) is given, in which case
    norm(x) is multiplied by it before modulation.
    """
    if norm not in ("layer", "rms"):
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    dt = _compute_dtype(x.dtype)
    xf, w = x.to(dt), None if weight is None else weight.to(dt)
    if norm == "layer":
        n = F.layer_norm(xf, xf.shape[-1:], w, None, eps)
    else:
        n = F.rms_norm(xf, xf.shape[-1:], w, eps)
    y = n * (1 + scale.to(dt).unsqueeze(1)) + shift.to(dt).unsqueeze(1)
    return y.to(x.dtype)


def gated_residual(x, gate, y):
    """x + gate[:, None] * y: the gated residual update of an adaLN-Zero block."""
    return x + gate.unsqueeze(1) * y
