"""The DiT's memory-bound ops, each with a pure-PyTorch reference (reference.py: the spec and the CPU path) and a
fused CUDA kernel (csrc/, loaded by cuda.py), as stylegan3's torch_utils/ops.

Ops (x, y (B, N, D) tokens; shift, scale, gate (B, D) per-sample vectors broadcast over the N tokens):
    norm_modulate(x, shift, scale, weight=None, norm="layer"|"rms")  norm(x) [* weight] * (1 + scale) + shift
    gated_residual(x, gate, y)                                       x + gate * y
    swiglu(h)                                                        silu(a) * b, [a | b] = h split in halves

Implementation, per call (`impl=`) or for the process (`set_impl`, train.py's --kernels):
    "torch"  the reference.
    "cuda"   the CUDA kernels, built on first use; bad inputs (CPU tensors, float16/float64) and a failed build
             raise a clear error.
    "auto"   (default) the CUDA kernels for CUDA float32/bfloat16 inputs when they build, else the reference:
             silently for CPU tensors (the designed CPU path), with one warning when CUDA inputs fall back (failed
             build, unsupported dtype). Under torch.compile, auto leaves the ops to Inductor, which fuses the
             reference with its neighbours; "cuda" keeps the custom ops (traced as single ops, no graph break).

Mixed float32/bfloat16 inputs, as under bf16 autocast (float32 residual stream, bfloat16 Linear outputs), give the
reference's output dtype (x's for norm_modulate; the promoted dtype for gated_residual) on both paths: the kernels
take x in float32 with a bfloat16 branch directly, and cast the small per-sample vectors.
"""
import importlib.metadata
import warnings

import torch

from . import cuda, reference


def pypi_kernels_clash() -> str | None:
    """Why transformers would break here, or None. PyPI's `kernels` (Hugging Face's hub kernels, a dependency of
    transformers >= 5.25) has this package's import name, and from this repository's root `import kernels` finds
    this folder first: where transformers thinks that package is usable, it imports it on loading any model and fails
    deep inside. requirements.txt pins transformers below 5.25, which does not require it."""
    try:
        installed = importlib.metadata.version("kernels")  # this folder has no distribution metadata
    except importlib.metadata.PackageNotFoundError:
        return None
    try:
        from transformers.utils.import_utils import is_kernels_available
    except ImportError:
        return None
    if not is_kernels_available():
        return None
    return (f"PyPI's `kernels` {installed} is installed and transformers imports it under the same name as this "
            "repository's kernels/, so loading any transformers model (real rewards, T5, Mask2Former) fails: "
            "pip install 'transformers<5.25' (as requirements.txt pins) and pip uninstall kernels")


if (_clash := pypi_kernels_clash()) is not None:
    warnings.warn(_clash, stacklevel=2)

IMPLS = ("auto", "cuda", "torch")
_settings = {"impl": "auto"}
_warned = set()


def set_impl(impl):
    """Set the implementation used when a call passes no `impl`; returns the previous one."""
    _check_impl(impl)
    previous, _settings["impl"] = _settings["impl"], impl
    return previous


def get_impl():
    return _settings["impl"]


def _check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"unknown kernel impl {impl!r}; available: {', '.join(IMPLS)}")


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _unsupported(tensors):
    """Why the CUDA kernels cannot take these inputs, or None."""
    devices = {t.device for t in tensors}
    if any(d.type != "cuda" for d in devices) or len(devices) > 1:
        return f"the CUDA kernels need inputs on one CUDA device, got {', '.join(sorted(map(str, devices)))}"
    other = sorted({str(t.dtype) for t in tensors if t.dtype not in (torch.float32, torch.bfloat16)})
    if other:
        return f"the CUDA kernels take float32 or bfloat16, got {', '.join(other)}"
    return None


def _use_cuda(op, impl, tensors):
    """Decide between the CUDA kernels and the reference for one call (see the module docstring)."""
    impl = _settings["impl"] if impl is None else impl
    _check_impl(impl)
    if impl == "torch" or (impl == "auto" and torch.compiler.is_compiling()):
        return False
    reason = _unsupported(tensors)
    if impl == "cuda":
        if reason:
            raise ValueError(f"kernels.{op} with impl='cuda': {reason}")
        cuda.load()  # RuntimeError with the build's error if it failed
        return True
    if reason:
        if tensors[0].is_cuda:  # CPU inputs take the reference by design, silently
            _warn_once(f"kernels.{op}: {reason}; using the PyTorch reference")
        return False
    if not cuda.available():
        _warn_once(f"kernels: using the PyTorch reference, {cuda.error()}")
        return False
    return True


def norm_modulate(x, shift, scale, weight=None, norm="layer", eps=1e-6, impl=None):
    """norm(x) [* weight] * (1 + scale[:, None]) + shift[:, None]: x (B, N, D), shift/scale (B, D), weight (D,)
    or None; norm "layer" or "rms" over D without affine terms, in float32. See reference.py."""
    reference.check_norm(norm)
    tensors = [x, shift, scale] + ([] if weight is None else [weight])
    if _use_cuda("norm_modulate", impl, tensors):  # the (B, D) and (D,) vectors in x's dtype: a negligible cast
        weight = None if weight is None else weight.to(x.dtype)
        return cuda.norm_modulate(x, shift.to(x.dtype), scale.to(x.dtype), weight, norm == "rms", eps)
    return reference.norm_modulate(x, shift, scale, weight, norm, eps)


def gated_residual(x, gate, y, impl=None):
    """x + gate[:, None] * y: x/y (B, N, D), gate (B, D). See reference.py."""
    if _use_cuda("gated_residual", impl, [x, gate, y]):  # x in the output dtype, gate in y's (no-ops in the model)
        branch_dtype = torch.promote_types(gate.dtype, y.dtype)
        out_dtype = torch.promote_types(x.dtype, branch_dtype)  # eager's type promotion, as the reference
        return cuda.gated_residual(x.to(out_dtype), gate.to(branch_dtype), y.to(branch_dtype))
    return reference.gated_residual(x, gate, y)


def swiglu(h, impl=None):
    """silu(a) * b with a, b = h.chunk(2, dim=-1): h (..., 2H) -> (..., H). See reference.py."""
    if _use_cuda("swiglu", impl, [h]):
        return cuda.swiglu(h)
    return reference.swiglu(h)


def describe(device):
    """One line for logs: which implementation the ops use on `device` under the current setting (building the
    CUDA kernels first if they would be used). For impl 'cuda': ValueError off CUDA, RuntimeError if the build fails."""
    impl, device = _settings["impl"], torch.device(device)
    if impl == "cuda" and device.type != "cuda":
        raise ValueError(f"kernels impl 'cuda' needs a CUDA device, got {device.type}")
    if impl == "torch" or device.type != "cuda":
        return f"PyTorch reference (--kernels {impl}, device {device.type})"
    if impl == "cuda":
        cuda.load()
    elif not cuda.available():
        return f"PyTorch reference (--kernels auto; {cuda.error()})"
    return f"fused CUDA kernels (--kernels {impl}; torch.compile uses {'them' if impl == 'cuda' else 'Inductor'})"


__all__ = ["norm_modulate", "gated_residual", "swiglu", "set_impl", "get_impl", "describe", "IMPLS"]
