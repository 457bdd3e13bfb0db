"""Build the CUDA kernels of kernels/csrc once per machine and load them into this process.

`build()` runs torch.utils.cpp_extension.load with the recipe that also works on machines without a GPU:
CUDA_HOME set to the real toolkit root (the `nvcc` on PATH may be a wrapper script whose parent
is not the toolkit), an explicit TORCH_CUDA_ARCH_LIST (torch's own detection fails with no GPU visible), MAX_JOBS,
and only c10/cuda headers in the bindings. The .cu files include no torch headers at all, so each one also compiles
alone: `nvcc -arch=sm_90 -Xptxas -v -c kernels/csrc/norm_modulate.cu`.

Once per machine: the build folder, `$MIRO_KERNELS_CACHE` or ~/.cache/miro_kernels, has one subfolder per torch
version, CUDA version, architecture list and source hash, and an exclusive flock on its `build.lock` lets one
process (any rank) compile while the others wait and then load the finished library. The kernel drops a flock when
its holder dies, however it dies, so a killed build leaves no stale lock; torch's own lock file, which a killed build
does leave behind and which would make later builds wait forever, is removed while we hold ours.
"""
import contextlib
import fcntl
import glob
import hashlib
import os
import re
import shutil
import time
from pathlib import Path

import torch

NAME = "miro_kernels"  # the extension and its TORCH_LIBRARY namespace (torch.ops.miro_kernels)
CSRC = Path(__file__).resolve().parent / "csrc"
DEFAULT_ARCH = "9.0"  # with no GPU visible (a CI build check): Hopper, the H100/H200 machines


def sources():
    """The translation units: every .cu (pure CUDA kernels) and ops.cpp (the torch bindings)."""
    return sorted(CSRC.glob("*.cu")) + [CSRC / "ops.cpp"]


def find_cuda_home():
    """The CUDA toolkit root: the first of $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, /usr/local/cuda-X.Y (newest
    first) and the folder above the resolved nvcc on PATH that holds bin/nvcc and include/cuda_runtime.h; None if
    there is none."""
    def version(path):
        return tuple(int(n) for n in re.findall(r"\d+", Path(path).name))
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  *sorted(glob.glob("/usr/local/cuda-*"), key=version, reverse=True)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for root in filter(None, candidates):
        if (Path(root) / "bin" / "nvcc").is_file() and (Path(root) / "include" / "cuda_runtime.h").is_file():
            return str(Path(root).resolve())
    return None


def arch_list():
    """TORCH_CUDA_ARCH_LIST if set, else the compute capabilities of the visible GPUs, else DEFAULT_ARCH."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return DEFAULT_ARCH


def default_build_dir(arch):
    """One folder per torch version, CUDA version, architectures and source contents."""
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    root = Path(os.environ.get("MIRO_KERNELS_CACHE") or Path.home() / ".cache" / "miro_kernels")
    name = f"torch{torch.__version__}-cuda{torch.version.cuda}-sm{arch}-{digest.hexdigest()[:12]}"
    return root / re.sub(r"[^\w.+-]", "_", name)


@contextlib.contextmanager
def file_lock(path, timeout=1800.0, poll=0.2):
    """Holds an exclusive flock on `path` (created if missing); waits for another holder at most `timeout` seconds,
    then raises TimeoutError. A dead holder's lock is released by the kernel, so it never goes stale."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {timeout:.0f} s for {path}, held by another live process") from None
                time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _build_environment(cuda_home, arch):
    """CUDA_HOME (environment and cpp_extension's copy, read once at its import), TORCH_CUDA_ARCH_LIST and
    MAX_JOBS for the duration of the build; everything is restored afterwards."""
    from torch.utils import cpp_extension
    env = {"CUDA_HOME": cuda_home, "TORCH_CUDA_ARCH_LIST": arch,
           "MAX_JOBS": os.environ.get("MAX_JOBS") or str(max(1, min(len(sources()), os.cpu_count() or 1)))}
    saved_env = {k: os.environ.get(k) for k in env}
    saved_home = cpp_extension.CUDA_HOME
    os.environ.update(env)
    cpp_extension.CUDA_HOME = cuda_home
    try:
        yield
    finally:
        cpp_extension.CUDA_HOME = saved_home
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build(build_dir=None, verbose=False, timeout=1800.0):
    """Compile kernels/csrc if this folder has no up-to-date build, and load the library (registering
    torch.ops.miro_kernels). Returns the library path; raises RuntimeError (no toolkit, compiler errors) or
    TimeoutError."""
    from torch.utils import cpp_extension
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("no CUDA toolkit found: set CUDA_HOME to the folder that holds bin/nvcc")
    arch = arch_list()
    folder = Path(build_dir) if build_dir else default_build_dir(arch)
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / "build.lock", timeout), _build_environment(cuda_home, arch):
        (folder / "lock").unlink(missing_ok=True)  # torch's FileBaton; stale if present, since we hold build.lock
        return cpp_extension.load(NAME, [str(s) for s in sources()], extra_cflags=["-O3"],
                                  extra_cuda_cflags=["-O3", "-lineinfo"], build_directory=str(folder),
                                  is_python_module=False, verbose=verbose)
