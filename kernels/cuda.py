"""The CUDA path of kernels/: the compiled ops (kernels/csrc, torch.ops.miro_kernels) with their autograd and
fake-tensor rules, registered the torch.library way (as pytorch/extension-cpp), so they work under autograd and are
traced by torch.compile as single ops.

`load()` builds the extension on first use (kernels/build.py: once per machine, other processes wait) and registers
the Python rules; a failed build is remembered, so a process tries once. The wrappers below take any layout and
hand the kernels what they need: contiguous token tensors and (B, D) vectors with unit stride along D (the adaLN
chunks qualify without a copy).
"""
import torch

from . import build

_state = {"loaded": False, "error": None}


def load():
    """Build (or find) and load the kernels once per process; raises RuntimeError with the reason if they cannot be."""
    if _state["loaded"]:
        return
    if _state["error"] is None:
        try:
            build.build()
            _register_rules()
            _state["loaded"] = True
            return
        except Exception as e:  # compiler errors, missing toolkit, lock timeout: all mean "no kernels"
            lines = str(e).strip().splitlines() or [""]
            _state["error"] = f"{type(e).__name__}: {' | '.join(lines[-6:])}"  # the tail holds the compiler's error
    raise RuntimeError(f"the CUDA kernels could not be built: {_state['error']}")


def available():
    """True when the kernels are loaded (building them on first call); False, with `error()` set, otherwise."""
    try:
        load()
        return True
    except RuntimeError:
        return False


def error():
    """Why the kernels are unavailable (None if they are, or were never tried)."""
    return _state["error"]


def _per_sample(v):
    return v if v.stride(-1) == 1 else v.contiguous()


# ---- the public ops of the CUDA path (same signatures as reference.py, norm given as rms: bool) ----

def norm_modulate(x, shift, scale, weight, rms, eps):
    weight = None if weight is None else weight.contiguous()
    y, _, _ = torch.ops.miro_kernels.norm_modulate_fwd(x.contiguous(), _per_sample(shift), _per_sample(scale),
                                                       weight, rms, eps)
    return y


def gated_residual(x, gate, y):
    return torch.ops.miro_kernels.gated_residual_fwd(x.contiguous(), _per_sample(gate), y.contiguous())


def swiglu(h):
    return torch.ops.miro_kernels.swiglu_fwd(h.contiguous())


# ---- autograd and fake-tensor rules, registered once the library is loaded ----

def _norm_modulate_setup(ctx, inputs, output):
    x, _, scale, weight, rms, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, weight, mean, rstd)
    ctx.rms = rms
    ctx.set_materialize_grads(False)  # mean and rstd never get gradients; don't allocate zeros for them


def _norm_modulate_backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, scale, weight, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale, dweight = torch.ops.miro_kernels.norm_modulate_bwd(grad_y.contiguous(), x, scale, weight,
                                                                           mean, rstd, ctx.rms)
    return dx, dshift, dscale, None if weight is None else dweight, None, None


def _gated_residual_setup(ctx, inputs, output):
    _, gate, y = inputs
    ctx.save_for_backward(gate, y)


def _gated_residual_backward(ctx, grad_out):
    gate, y = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    dy, dgate = torch.ops.miro_kernels.gated_residual_bwd(grad_out, gate, y)
    return grad_out, dgate, dy  # d/dx (x + gate * y) is the identity


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, grad_out):
    (h,) = ctx.saved_tensors
    return torch.ops.miro_kernels.swiglu_bwd(grad_out.contiguous(), h)


def _register_rules():
    lib = "miro_kernels::"
    fake = torch.library.register_fake

    @fake(lib + "norm_modulate_fwd")
    def _(x, shift, scale, weight, rms, eps):
        stats = x.new_empty(x.shape[:2], dtype=torch.float32)
        return torch.empty_like(x), stats, torch.empty_like(stats)

    @fake(lib + "norm_modulate_bwd")
    def _(grad_y, x, scale, weight, mean, rstd, rms):
        per_sample = x.new_empty(x.shape[0], x.shape[2])
        dweight = x.new_empty(0) if weight is None else torch.empty_like(weight)
        return torch.empty_like(x), per_sample, torch.empty_like(per_sample), dweight

    @fake(lib + "gated_residual_fwd")
    def _(x, gate, y):
        return torch.empty_like(x)

    @fake(lib + "gated_residual_bwd")
    def _(grad_out, gate, y):
        return torch.empty_like(y), y.new_empty(y.shape[0], y.shape[2])

    @fake(lib + "swiglu_fwd")
    def _(h):
        return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)

    @fake(lib + "swiglu_bwd")
    def _(grad_out, h):
        return torch.empty_like(h)

    torch.library.register_autograd(lib + "norm_modulate_fwd", _norm_modulate_backward,
                                    setup_context=_norm_modulate_setup)
    torch.library.register_autograd(lib + "gated_residual_fwd", _gated_residual_backward,
                                    setup_context=_gated_residual_setup)
    torch.library.register_autograd(lib + "swiglu_fwd", _swiglu_backward, setup_context=_swiglu_setup)
