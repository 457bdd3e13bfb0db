"""Run the CUDA kernels of kernels/csrc on a CPU, to test their indexing and arithmetic where there is no GPU.

The .cu files are compiled by g++ against cpu_emulation/ (a stand-in for cuda_runtime.h and cuda_bf16.h that runs each
CUDA thread of a block as a fiber, all on one OS thread in a fixed order), after two textual rewrites that C++ needs:
`k<<<grid, block, smem, stream>>>(args)` becomes `emu::launch(k, grid, block, smem, stream, args)` and the dynamic
shared-memory declaration becomes a pointer to the emulated block's shared memory. `Emulated` then calls the launchers
exactly as ops.cpp does (same allocations, chunking and finishing sums), on CPU tensors. What this cannot check, the
GPU tests do: races (the fibers' fixed order hides them), real memory alignment, the torch bindings and speed.
"""
import ctypes
import re
import subprocess
from pathlib import Path

import torch

from .build import CSRC

EMULATION = Path(__file__).resolve().parent / "cpu_emulation"
_LAUNCH = re.compile(r"([\w:]+(?:<[\w\s,:]+>)?)<<<(.+?)>>>\((\w+)\);")
_SHARED = "extern __shared__ float smem[];"

_HARNESS = r"""
#include "launchers.h"
using namespace miro;
extern "C" {
int nm_fwd(const void* x, const void* shift, const void* scale, const void* weight, void* y, float* mean, float* rstd,
           int64_t B, int64_t N, int64_t D, int64_t ss, int64_t cs, int rms, float eps, int dtype) {
  return launch_norm_modulate_fwd({x, shift, scale, weight, y, mean, rstd, B, N, D, ss, cs, rms != 0, eps,
                                   DType(dtype)}, nullptr);
}
int nm_bwd(const void* dy, const void* x, const void* scale, const void* weight, const float* mean, const float* rstd,
           void* dx, float* ps, float* pc, int64_t B, int64_t N, int64_t D, int64_t cs, int64_t R, int rms, int dtype) {
  return launch_norm_modulate_bwd({dy, x, scale, weight, mean, rstd, dx, ps, pc, B, N, D, cs, R, rms != 0,
                                   DType(dtype)}, nullptr);
}
int gr_fwd(const void* x, const void* gate, const void* y, void* out, int64_t B, int64_t N, int64_t D, int64_t gs,
           int dtype, int branch_dtype) {
  return launch_gated_residual_fwd({x, gate, y, out, B, N, D, gs, DType(dtype), DType(branch_dtype)}, nullptr);
}
int gr_bwd(const void* dout, const void* gate, const void* y, void* dy, float* part, int64_t B, int64_t N, int64_t D,
           int64_t gs, int64_t R, int dtype, int branch_dtype) {
  return launch_gated_residual_bwd({dout, gate, y, dy, part, B, N, D, gs, R, DType(dtype), DType(branch_dtype)},
                                   nullptr);
}
int sw_fwd(const void* h, void* out, int64_t rows, int64_t H, int dtype) {
  return launch_swiglu_fwd({h, nullptr, out, rows, H, DType(dtype)}, nullptr);
}
int sw_bwd(const void* h, const void* dout, void* dh, int64_t rows, int64_t H, int dtype) {
  return launch_swiglu_bwd({h, dout, dh, rows, H, DType(dtype)}, nullptr);
}
int sum_chunks(const float* part, const void* mul, void* out, int64_t B, int64_t C, int64_t D, int dtype) {
  return launch_sum_chunks({part, mul, out, B, C, D, DType(dtype)}, nullptr);
}
int64_t chunk_rows(int64_t B, int64_t N) { return rows_per_chunk(B, N); }
}
"""


def compile_emulator(folder):
    """Compile csrc/*.cu with the CPU stand-ins into folder/emulated_kernels.so; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    units = []
    for cu in sorted(CSRC.glob("*.cu")):
        text = _LAUNCH.sub(r"emu::launch(\1, \2, \3);", cu.read_text())
        units.append(folder / (cu.stem + ".cpp"))
        units[-1].write_text(text.replace(_SHARED, "float* smem = emu::shared_memory();"))
    units.append(folder / "harness.cpp")
    units[-1].write_text(_HARNESS)
    flags = ["-std=c++17", "-O1", "-fPIC", "-Wno-unknown-pragmas", f"-I{EMULATION}", f"-I{CSRC}"]
    jobs = [subprocess.Popen(["g++", *flags, "-c", str(u), "-o", str(u.with_suffix(".o"))], stderr=subprocess.PIPE,
                             text=True) for u in units]  # in parallel
    errors = [err for job, err in [(job, job.communicate()[1]) for job in jobs] if job.returncode]
    library = folder / "emulated_kernels.so"
    if not errors:
        link = subprocess.run(["g++", "-shared", *[str(u.with_suffix(".o")) for u in units], "-o", str(library)],
                              stderr=subprocess.PIPE, text=True)
        errors = [link.stderr] if link.returncode else []
    if errors:
        raise RuntimeError(f"compiling the emulated kernels failed:\n{errors[0][-4000:]}")
    return library


def _poisoned(*shape, dtype=torch.float32):
    """An output buffer full of NaN (where ops.cpp allocates with at::empty), so an unwritten element shows up."""
    return torch.full(shape, float("nan"), dtype=dtype)


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


class Emulated:
    """The launchers of csrc/ on CPU tensors, called as ops.cpp calls them (inputs laid out as ops.cpp checks);
    outputs start as NaN."""

    def __init__(self, library):
        self.lib = ctypes.CDLL(str(library))
        self.lib.chunk_rows.restype = ctypes.c_int64

    def _call(self, name, *args):
        ints = [ctypes.c_float(a) if isinstance(a, float) else ctypes.c_int64(a) if isinstance(a, int) else a
                for a in args]
        assert getattr(self.lib, name)(*ints) == 0, f"{name}: emulated launch failed"

    @staticmethod
    def _dtype(t):
        return {torch.float32: 0, torch.bfloat16: 1}[t.dtype]

    def _sum_chunks(self, part, like, mul=None):
        out = _poisoned(part.shape[0], part.shape[2], dtype=like.dtype)
        self._call("sum_chunks", _ptr(part), _ptr(mul), _ptr(out), *part.shape, ctypes.c_int(self._dtype(like)))
        return out

    def norm_modulate(self, x, shift, scale, weight, rms, eps):
        B, N, D = x.shape
        y, mean, rstd = _poisoned(*x.shape, dtype=x.dtype), _poisoned(B, N), _poisoned(B, N)
        self._call("nm_fwd", _ptr(x), _ptr(shift), _ptr(scale), _ptr(weight), _ptr(y), _ptr(mean), _ptr(rstd),
                   B, N, D, shift.stride(0), scale.stride(0), ctypes.c_int(rms), eps, ctypes.c_int(self._dtype(x)))
        return y, mean, rstd

    def norm_modulate_bwd(self, dy, x, scale, weight, mean, rstd, rms):
        B, N, D = x.shape
        R = self.lib.chunk_rows(B, N)
        part, dx = _poisoned(2, B, -(-N // R), D), _poisoned(*x.shape, dtype=x.dtype)
        self._call("nm_bwd", _ptr(dy), _ptr(x), _ptr(scale), _ptr(weight), _ptr(mean), _ptr(rstd), _ptr(dx),
                   _ptr(part[0]), _ptr(part[1]), B, N, D, scale.stride(0), R, ctypes.c_int(rms),
                   ctypes.c_int(self._dtype(x)))
        dweight = None if weight is None else (part[1].sum(1) * (scale.float() + 1)).sum(0).to(weight.dtype)
        return dx, self._sum_chunks(part[0], x), self._sum_chunks(part[1], x, weight), dweight

    def gated_residual(self, x, gate, y):
        out = _poisoned(*x.shape, dtype=x.dtype)
        self._call("gr_fwd", _ptr(x), _ptr(gate), _ptr(y), _ptr(out), *x.shape, gate.stride(0),
                   ctypes.c_int(self._dtype(x)), ctypes.c_int(self._dtype(y)))
        return out

    def gated_residual_bwd(self, dout, gate, y):
        B, N, D = y.shape
        R = self.lib.chunk_rows(B, N)
        part, dy = _poisoned(B, -(-N // R), D), _poisoned(*y.shape, dtype=y.dtype)
        self._call("gr_bwd", _ptr(dout), _ptr(gate), _ptr(y), _ptr(dy), _ptr(part), B, N, D, gate.stride(0), R,
                   ctypes.c_int(self._dtype(dout)), ctypes.c_int(self._dtype(y)))
        return dy, self._sum_chunks(part, y)

    def swiglu(self, h):
        out = _poisoned(*h.shape[:-1], h.shape[-1] // 2, dtype=h.dtype)
        self._call("sw_fwd", _ptr(h), _ptr(out), h.numel() // h.shape[-1], h.shape[-1] // 2,
                   ctypes.c_int(self._dtype(h)))
        return out

    def swiglu_bwd(self, dout, h):
        dh = _poisoned(*h.shape, dtype=h.dtype)
        self._call("sw_bwd", _ptr(h), _ptr(dout), _ptr(dh), h.numel() // h.shape[-1], h.shape[-1] // 2,
                   ctypes.c_int(self._dtype(h)))
        return dh
