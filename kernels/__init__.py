"""Ops that later get fused CUDA kernels, called by model.py through this module.

Today every op runs its pure-PyTorch reference (`kernels/reference.py`), which is also the specification the
tests check. A later issue adds CUDA implementations with the same signatures, built lazily once and cached,
selected here (`impl="cuda"`) with a fallback to the reference when CUDA or the build is unavailable.
"""
from . import reference

IMPLS = ("ref",)  # the implementations available today


def _check(impl):
    if impl not in IMPLS:
        raise ValueError(f"unknown kernel impl {impl!r}; available: {', '.join(IMPLS)}")


def norm_modulate(x, shift, scale, weight=None, norm="layer", eps=1e-6, impl="ref"):
    """norm(x) * (1 + scale[:, None]) + shift[:, None], x (B,N,D), shift/scale (B,D); see reference.py."""
    _check(impl)
    return reference.norm_modulate(x, shift, scale, weight, norm, eps)


def gated_residual(x, gate, y, impl="ref"):
    """x + gate[:, None] * y, x/y (B,N,D), gate (B,D); see reference.py."""
    _check(impl)
    return reference.gated_residual(x, gate, y)


__all__ = ["norm_modulate", "gated_residual", "IMPLS"]
