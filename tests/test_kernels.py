"""kernels/: reference formulas and float64 gradients, dispatch and fallback, the build machinery (lock, nvcc
register/spill report, the full cpp_extension build), the FLOP counter, train.py's flags; the CUDA kernels against
the reference on a CPU through the emulator (kernels/emulate.py); and, on a GPU, every output and gradient of the
real ops against the reference (skipped without CUDA; `bash kernels/gpu_check.sh` runs them).

The full build test takes ~1-2 min on 2 idle cores and runs in CI; MIRO_SKIP_BUILD_TEST=1 skips it locally.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import build, cuda, reference

ROOT = Path(__file__).resolve().parents[1]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_nvcc = pytest.mark.skipif(build.find_cuda_home() is None, reason="needs the CUDA toolkit (nvcc)")


def _inputs(dtype=torch.float64, B=2, N=5, D=8, seed=0, device="cpu", g=None):
    """x, shift, scale, weight drawn from g (default: a generator seeded with seed) on the CPU, then moved."""
    g = torch.Generator().manual_seed(seed) if g is None else g
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64) * 3 + 1  # non-zero mean so LayerNorm != RMSNorm
    shift, scale, weight = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((B, D), (B, D), (D,)))
    return tuple(t.to(device, dtype) for t in (x, shift, scale, weight))


# ---------------------------------------------------------------------------------------------------------------
# The references: exact formulas and float64 gradients.

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


def test_swiglu_is_the_models_previous_formula_in_float32():
    h = torch.randn(2, 5, 12)
    a, b = h.chunk(2, dim=-1)
    assert torch.equal(kernels.swiglu(h), F.silu(a) * b)  # CPU training is unchanged bit for bit
    assert kernels.swiglu(h).shape == (2, 5, 6)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("use_weight", [False, True])
def test_norm_modulate_gradcheck(norm, use_weight):
    x, shift, scale, weight = (t.requires_grad_() for t in _inputs(B=2, N=3, D=6))
    fn = lambda x, s, c, w: reference.norm_modulate(x, s, c, w if use_weight else None, norm=norm)
    assert torch.autograd.gradcheck(fn, (x, shift, scale, weight))


def test_pypi_kernels_clash_is_named_only_where_transformers_would_import_it(monkeypatch):
    """PyPI's `kernels` shares this package's import name: flagged only when it is installed and transformers deems
    it usable (then transformers would import this folder instead); the message says how to fix it."""
    import importlib.metadata

    import transformers.utils.import_utils as import_utils

    real_version = importlib.metadata.version

    def installed(version):  # importlib.metadata.version as if PyPI's kernels `version` (None: absent) were installed
        def fake(name):
            if name != "kernels":
                return real_version(name)
            if version is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return version
        return fake

    monkeypatch.setattr(import_utils, "is_kernels_available", lambda: True)
    monkeypatch.setattr(importlib.metadata, "version", installed(None))
    assert kernels.pypi_kernels_clash() is None  # not installed: nothing to shadow
    monkeypatch.setattr(importlib.metadata, "version", installed("0.19.1"))
    message = kernels.pypi_kernels_clash()
    assert "0.19.1" in message and "transformers<5.25" in message and "pip uninstall kernels" in message
    monkeypatch.setattr(import_utils, "is_kernels_available", lambda: False)
    assert kernels.pypi_kernels_clash() is None  # installed, but a version transformers does not import


def test_gated_residual_gradcheck():
    x, _, gate, _ = _inputs(B=2, N=3, D=6)
    y = torch.randn_like(x)
    assert torch.autograd.gradcheck(reference.gated_residual, tuple(t.requires_grad_() for t in (x, gate, y)))


def test_swiglu_gradcheck():
    h = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reference.swiglu, (h,))


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("use_weight", [False, True])
def test_low_precision_is_computed_in_float32(norm, use_weight):
    """bfloat16 inputs: the float32 computation on the same (bf16) values, rounded once to bfloat16 at the end; bit
    for bit (computing in bfloat16 rounds every intermediate and differs by a few bf16 ulps)."""
    x, shift, scale, weight = (t.bfloat16() for t in _inputs(dtype=torch.float32))
    weight = weight if use_weight else None
    out = kernels.norm_modulate(x, shift, scale, weight, norm=norm)
    assert out.dtype == torch.bfloat16
    ref = kernels.norm_modulate(x.float(), shift.float(), scale.float(), None if weight is None else weight.float(),
                                norm=norm)
    assert torch.equal(out, ref.bfloat16())
    h = torch.randn(3, 10)
    assert torch.equal(kernels.swiglu(h.bfloat16()), kernels.swiglu(h.bfloat16().float()).bfloat16())


# ---------------------------------------------------------------------------------------------------------------
# Dispatch: the reference on CPU, clear errors for impl="cuda", one warning and the reference after a failed build.

@pytest.fixture
def fresh_dispatch(monkeypatch):
    """A process that has not tried to build the kernels yet, whose build raises and is counted."""
    calls = []

    def failing_build(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("nvcc: simulated compiler error")

    monkeypatch.setattr(build, "build", failing_build)
    monkeypatch.setattr(cuda, "_state", {"loaded": False, "error": None})
    monkeypatch.setattr(kernels, "_warned", set())
    monkeypatch.setattr(kernels, "_settings", {"impl": "auto"})
    return calls


def _all_ops(x, shift, scale, weight, impl):
    return (kernels.norm_modulate(x, shift, scale, weight, norm="rms", impl=impl),
            kernels.gated_residual(x, scale, x, impl=impl), kernels.swiglu(x, impl=impl))


def test_auto_uses_the_reference_on_cpu_silently_without_building(fresh_dispatch):
    x, shift, scale, weight = _inputs(dtype=torch.float32, D=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outs = _all_ops(x, shift, scale, weight, impl=None)
    refs = (reference.norm_modulate(x, shift, scale, weight, "rms"), reference.gated_residual(x, scale, x),
            reference.swiglu(x))
    assert all(torch.equal(o, r) for o, r in zip(outs, refs))
    assert fresh_dispatch == []  # no build attempted for CPU inputs
    assert kernels.describe("cpu").startswith("PyTorch reference")


def test_cuda_impl_rejects_unsupported_inputs_before_building(fresh_dispatch):
    x, shift, scale, _ = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="impl='cuda': the CUDA kernels need inputs on one CUDA device, got cpu"):
        kernels.norm_modulate(x, shift, scale, impl="cuda")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        kernels.set_impl("cuda")
        kernels.describe("cpu")
    assert fresh_dispatch == []
    with pytest.raises(ValueError, match="unknown kernel impl 'triton'; available: auto, cuda, torch"):
        kernels.gated_residual(x, shift, x, impl="triton")
    with pytest.raises(ValueError, match="norm must be"):
        kernels.norm_modulate(x, shift, scale, norm="batch")


def test_failed_build_falls_back_to_the_reference_with_one_warning(fresh_dispatch, monkeypatch):
    monkeypatch.setattr(kernels, "_unsupported", lambda tensors: None)  # as if the inputs were on a GPU
    x, shift, scale, weight = _inputs(dtype=torch.float32)
    with pytest.warns(UserWarning) as record:
        first = _all_ops(x, shift, scale, weight, impl="auto")
        second = _all_ops(x, shift, scale, weight, impl=None)
    assert [str(w.message) for w in record] == [
        "kernels: using the PyTorch reference, RuntimeError: nvcc: simulated compiler error"]
    assert len(fresh_dispatch) == 1  # one build attempt per process
    assert torch.equal(first[0], reference.norm_modulate(x, shift, scale, weight, "rms"))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(RuntimeError, match="could not be built: RuntimeError: nvcc: simulated compiler error"):
        kernels.swiglu(x, impl="cuda")
    assert "PyTorch reference (--kernels auto; RuntimeError: nvcc" in kernels.describe("cuda")


def test_set_impl_sets_the_default(fresh_dispatch):
    assert kernels.set_impl("torch") == "auto" and kernels.get_impl() == "torch"
    with pytest.raises(ValueError, match="unknown kernel impl"):
        kernels.set_impl("fast")


def test_bench_times_and_profiles_each_step_under_its_own_impl(fresh_dispatch, monkeypatch):
    from kernels import bench
    seen = []
    monkeypatch.setattr(bench, "timed", lambda step, device, warmup, iters: seen.append(("timed", kernels.get_impl()))
                        or 1.0)
    monkeypatch.setattr(bench, "profile_step", lambda step, device: seen.append(("profile", kernels.get_impl())))
    rows = bench.bench_steps(torch.device("cpu"), ["eager"], "tiny", batch=2, bf16=False, iters=1, profile=True)
    assert seen == [("timed", "torch"), ("profile", "torch")]  # a profile under "auto" would recompile another step
    assert kernels.get_impl() == "auto" and [r["variant"] for r in rows] == ["eager"]


@pytest.mark.parametrize("flags, message", [
    (["--threads", "0"], "argument --threads: must be > 0, got 0"),
    (["--steps", "0"], "argument --steps: must be > 0, got 0"),  # not silently the default
    (["--batch", "0"], "argument --batch: must be > 0, got 0"),
    (["--batch", "-1"], "argument --batch: must be > 0, got -1"),  # was a failed row and exit 0
    (["--device", "foo"], "--device foo: not a torch device"),
    (["--device", "meta"], "--device meta: the benchmark runs on cpu or cuda"),
    (["--device", f"cuda:{torch.cuda.device_count()}"], "no such GPU"),
    (["--preset", "nope"], "--preset nope: unknown; known presets: tiny, cpu, paper"),
    (["--json", "."], "--json .: is a folder"),  # was found only after the op benchmark
    (["--json", "no/such/dir/out.json"], "--json no/such/dir/out.json: no folder no/such/dir"),
])
def test_bench_refuses_bad_flags_before_benchmarking(flags, message, monkeypatch, capsys):
    from kernels import bench
    monkeypatch.setattr(bench, "copy_bandwidth", lambda *a: pytest.fail("benchmarked despite a bad flag"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err.splitlines()[-1] and "Traceback" not in err, err


def test_bench_exits_1_when_a_step_variant_fails(tmp_path, monkeypatch, capsys):
    from kernels import bench
    monkeypatch.setattr(bench, "copy_bandwidth", lambda *a: 1.0)
    monkeypatch.setattr(bench, "bench_ops", lambda *a: [])
    monkeypatch.setattr(bench, "make_step", lambda *a: (_ for _ in ()).throw(RuntimeError("compiler error")))
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cpu", "--preset", "tiny", "--batch", "2", "--steps", "1", "--json",
                    str(tmp_path / "out.json")])
    assert e.value.code == 1 and "1 of 1 training-step variants failed" in capsys.readouterr().err
    assert "failed" in (tmp_path / "out.json").read_text()  # the numbers are still written


# ---------------------------------------------------------------------------------------------------------------
# Build machinery: the lock, the toolkit, the architecture list, nvcc's register report, the full build.

_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from kernels import build
    with build.file_lock({path!r}):
        print("locked", flush=True)
        time.sleep(60)
""")


def _lock_holder(path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK.format(root=str(ROOT), path=str(path))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_file_lock_waits_for_a_live_holder_and_never_goes_stale(tmp_path):
    path = tmp_path / "build.lock"
    holder = _lock_holder(path)
    try:
        with pytest.raises(TimeoutError, match="held by another live process"):
            with build.file_lock(path, timeout=0.5):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # a build killed mid-way
        holder.wait()
    with build.file_lock(path, timeout=5):  # the dead holder's lock is gone
        assert path.exists()


@requires_nvcc
def test_find_cuda_home_finds_the_real_toolkit():
    root = Path(build.find_cuda_home())
    assert (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file()
    assert list(root.glob("lib*/libcudart.so*")) or list(root.glob("targets/*/lib/libcudart.so*"))


def test_arch_list_respects_the_environment_and_defaults_to_hopper(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert build.arch_list() == "8.0;9.0+PTX"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert build.arch_list() == "9.0"
    assert "sm9.0" in build.default_build_dir("9.0").name


@requires_nvcc
@pytest.mark.parametrize("source", sorted(p.name for p in build.CSRC.glob("*.cu")))
def test_cu_file_compiles_for_sm90_without_register_spills(source, tmp_path):
    nvcc = Path(build.find_cuda_home()) / "bin" / "nvcc"
    result = subprocess.run([str(nvcc), "-arch=sm_90", "-Xptxas", "-v", "-c", str(build.CSRC / source),
                             "-o", str(tmp_path / "out.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout + result.stderr
    kernels_compiled = re.findall(r"Compiling entry function '(\w+)'", report)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert kernels_compiled and len(spills) >= len(kernels_compiled), report[-3000:]
    assert all(s == ("0", "0") for s in spills), report


_BUILD_AND_CHECK = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    from kernels import build, cuda
    path = build.build({folder!r})
    cuda._register_rules()
    ops = torch.ops.miro_kernels
    # The autograd and fake rules, run end to end on meta tensors (shapes, dtypes, gradient arity).
    x = torch.empty(3, 17, 200, device="meta", dtype=torch.bfloat16, requires_grad=True)
    mod = torch.empty(3, 600, device="meta", dtype=torch.bfloat16, requires_grad=True)
    shift, scale, gate = mod.chunk(3, dim=1)
    w = torch.empty(200, device="meta", dtype=torch.bfloat16, requires_grad=True)
    h = torch.empty(3, 17, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y = cuda.gated_residual(x, gate, cuda.norm_modulate(x, shift, scale, w, True, 1e-6))
    out = cuda.swiglu(h)
    (y.sum() + out.sum()).backward()
    print(path)
    print(y.shape, out.shape, x.grad.shape, mod.grad.shape, w.grad.shape, h.grad.shape, y.dtype)
    print(sorted(n for n in dir(ops) if n.endswith(("_fwd", "_bwd"))))
""")


@requires_nvcc
@pytest.mark.skipif(os.environ.get("MIRO_SKIP_BUILD_TEST") == "1", reason="MIRO_SKIP_BUILD_TEST=1")
def test_full_extension_build_and_load(tmp_path):
    """The whole cpp_extension build (kernels + bindings) with the recipe of kernels/build.py, then loading the
    library, in a subprocess with a fresh build folder; a stale torch lock file left by a killed build is there
    first and must not hang it."""
    folder = tmp_path / "build"
    folder.mkdir()
    (folder / "lock").write_text("")  # what a killed cpp_extension build leaves behind
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
    env["MAX_JOBS"] = "2"
    result = subprocess.run([sys.executable, "-c", _BUILD_AND_CHECK.format(root=str(ROOT), folder=str(folder))],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    assert Path(lines[-3]).is_file() and Path(lines[-3]).parent == folder
    assert lines[-2] == ("torch.Size([3, 17, 200]) torch.Size([3, 17, 32]) torch.Size([3, 17, 200]) "
                         "torch.Size([3, 600]) torch.Size([200]) torch.Size([3, 17, 64]) torch.bfloat16")
    assert lines[-1] == str(["gated_residual_bwd", "gated_residual_fwd", "norm_modulate_bwd", "norm_modulate_fwd",
                             "swiglu_bwd", "swiglu_fwd"])


# ---------------------------------------------------------------------------------------------------------------
# The FLOP counter and train.py's flags.

def test_flops_per_image_counts_every_matmul():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from model import MIRO, get_config
    cfg = get_config("tiny")
    model = MIRO(cfg)
    B = 2
    x, t = torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size), torch.rand(B)
    text, r = torch.randint(0, cfg.vocab_size, (B, cfg.max_text_len)), torch.rand(B, len(cfg.reward_names))
    for length in (cfg.max_text_len, 3):  # the padded condition, and a batch trimmed to 3 tokens
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # MATH: attention as bmm
            model(x, t, text[:, :length], rewards=r)
        assert model.flops_per_image(length) == counter.get_total_flops() / B
    assert model.flops_per_image() == model.flops_per_image(cfg.max_text_len) > model.flops_per_image(3)


def test_train_flags():
    import train
    _, args, _ = train.parse_args(["--kernels", "torch", "--precision", "bf16", "--compile"])
    assert (args.kernels, args.precision, args.compile) == ("torch", "bf16", True)
    _, args, _ = train.parse_args([])
    assert (args.kernels, args.precision, args.compile) == ("auto", None, False)
    assert train.peak_flops("cpu") is None
    assert train.mfu_percent(1e12, 100.0, 989e12) == pytest.approx(100 * 3e14 / 989e12)
    with pytest.raises(SystemExit):
        train.parse_args(["--kernels", "triton"])


# ---------------------------------------------------------------------------------------------------------------
# The CUDA kernels against the reference: on a CPU through the emulator (kernels/emulate.py), on a GPU for real.
# Fresh random inputs each time, outputs start as NaN, every gradient. Every random tensor of a test (inputs, output
# gradients, model weights) comes from a CPU generator seeded with the test's seed, named in each failure message:
# MIRO_TEST_SEED=<seed> reruns a test on exactly the failing inputs. The global RNGs are left alone.

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2}  # relative norm error


def _fresh_seed():
    """$MIRO_TEST_SEED if set (to reproduce a failure), else a new random seed."""
    return int(os.environ.get("MIRO_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


def _randn(g, *shape, dtype=torch.float32, device="cpu"):
    """Standard normal draws from the CPU generator g, moved to dtype and device (same values on any device)."""
    return torch.randn(*shape, generator=g).to(device, dtype)


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _assert_matches(pairs, dtype, seed):
    """pairs: [(name, result, reference)]; same shape and dtype, relative norm error within TOLERANCE."""
    for name, a, b in pairs:
        assert a.shape == b.shape and a.dtype == b.dtype, name
        err = _rel_err(a, b)
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} (seed {seed}; MIRO_TEST_SEED={seed})"


def _reference_with_grads(fn, inputs, g):
    """(output, grad_output drawn from g, input gradients) of a reference op on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grad = _randn(g, *out.shape, dtype=out.dtype)
    return out, grad, torch.autograd.grad(out, leaves, grad)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    from kernels import emulate
    return emulate.Emulated(emulate.compile_emulator(tmp_path_factory.mktemp("emulated")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [67, 200, 1152])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("use_weight", [False, True])  # the model's adaLN norms have no weight, LayerNorm or RMS
def test_emulated_norm_modulate_kernels_match_reference(emulated, dtype, D, norm, use_weight):
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    x, _, _, weight = _inputs(dtype, B=3, N=17, D=D, g=g)
    mod = _randn(g, 3, 3 * D, dtype=dtype)
    shift, scale = mod[:, :D], mod[:, 2 * D:].contiguous()  # a strided chunk, as the model passes it
    weight = weight if use_weight else None
    inputs = [x, shift, scale] + ([weight] if use_weight else [])
    ref, grad, ref_grads = _reference_with_grads(
        lambda x, s, c, *w: reference.norm_modulate(x, s, c, *w, norm=norm), inputs, g)
    y, mean, rstd = emulated.norm_modulate(x, shift, scale, weight, norm == "rms", 1e-6)
    grads = emulated.norm_modulate_bwd(grad, x, scale, weight, mean, rstd, norm == "rms")
    names = ["grad x", "grad shift", "grad scale", "grad weight"]
    _assert_matches([("output", y, ref)] + list(zip(names, grads, ref_grads)), dtype, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [67, 200, 1152])
def test_emulated_gated_residual_and_swiglu_kernels_match_reference(emulated, dtype, D):
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    x, y, h = (torch.randn(*shape, generator=g).to(dtype) for shape in ((1, 17, D), (1, 17, D), (2, 17, 2 * D)))
    gate = torch.randn(1, 2 * D, generator=g).to(dtype)[:, D:]
    ref, grad, (rdx, rdgate, rdy) = _reference_with_grads(reference.gated_residual, [x, gate, y], g)
    dy, dgate = emulated.gated_residual_bwd(grad, gate, y)
    _assert_matches([("gated output", emulated.gated_residual(x, gate, y), ref), ("grad x (identity)", grad, rdx),
                     ("grad gate", dgate, rdgate), ("grad y", dy, rdy)], dtype, seed)
    h = h * 3  # silu's curved part and both tails
    ref, grad, (rdh,) = _reference_with_grads(reference.swiglu, [h], g)
    _assert_matches([("swiglu output", emulated.swiglu(h), ref), ("grad h", emulated.swiglu_bwd(grad, h), rdh)],
                    dtype, seed)


@pytest.mark.parametrize("D", [67, 200, 1152])
def test_emulated_gated_residual_takes_a_float32_stream_and_a_bfloat16_branch(emulated, D):
    """As under bf16 autocast: x float32 (the residual stream), gate and y bfloat16 (Linear outputs); the output
    and grad x are float32 and grad gate, grad y bfloat16, as in eager PyTorch."""
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, 17, D, generator=g), torch.randn(2, 17, D, generator=g).bfloat16()
    gate = torch.randn(2, 2 * D, generator=g).bfloat16()[:, D:]
    ref, grad, (rdx, rdgate, rdy) = _reference_with_grads(reference.gated_residual, [x, gate, y], g)
    dy, dgate = emulated.gated_residual_bwd(grad, gate, y)
    _assert_matches([("gated output", emulated.gated_residual(x, gate, y), ref), ("grad x (identity)", grad, rdx),
                     ("grad gate", dgate, rdgate), ("grad y", dy, rdy)], torch.bfloat16, seed)


def _poison(*likes):
    """Fill freed allocator blocks of the outputs' sizes with NaN, so an element a kernel fails to write shows up."""
    for like in likes:
        torch.full_like(like, float("nan"))
    torch.cuda.synchronize()


def _compare(fn, inputs, dtype, seed, g):
    """fn(impl, *inputs) -> output: the CUDA output and the gradients of every input against the reference, for an
    output gradient drawn from g."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    ref = fn("torch", *inputs)
    grad = _randn(g, *ref.shape, dtype=ref.dtype, device=ref.device)
    ref_grads = torch.autograd.grad(ref, inputs, grad)
    _poison(ref, *ref_grads, torch.empty(4 * ref.numel(), device=ref.device))  # also the float32 partial sums
    out = fn("cuda", *inputs)
    _poison(*ref_grads, torch.empty(4 * ref.numel(), device=ref.device))
    grads = torch.autograd.grad(out, inputs, grad)
    _assert_matches([("output", out, ref)] + [(f"grad {i}", g, r) for i, (g, r) in enumerate(zip(grads, ref_grads))],
                    dtype, seed)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("D", [67, 200, 1152])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("use_weight", [False, True])
def test_gpu_norm_modulate_matches_reference(dtype, B, D, norm, use_weight):
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    x, _, _, weight = _inputs(dtype, B=B, N=17, D=D, device="cuda", g=g)
    mod = _randn(g, B, 3 * D, dtype=dtype, device="cuda")  # shift as a strided chunk, as the model passes it
    shift, scale = mod[:, :D], mod[:, 2 * D:].contiguous()
    inputs = [x, shift, scale] + ([weight] if use_weight else [])
    _compare(lambda impl, x, s, c, *w: kernels.norm_modulate(x, s, c, *w, norm=norm, impl=impl), inputs, dtype, seed,
             g)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("D", [67, 200, 1152])
def test_gpu_gated_residual_matches_reference(dtype, B, D):
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    x, _, _, _ = _inputs(dtype, B=B, N=17, D=D, device="cuda", g=g)
    y, gate = _randn(g, *x.shape, dtype=dtype, device="cuda"), _randn(g, B, 2 * D, dtype=dtype, device="cuda")[:, D:]
    _compare(lambda impl, *a: kernels.gated_residual(*a, impl=impl), [x, gate, y], dtype, seed, g)


@requires_cuda
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("D", [67, 200, 1152])
def test_gpu_mixed_dtypes_as_under_autocast_match_reference(B, D):
    """bf16 autocast hands the ops a float32 residual stream x and bfloat16 Linear outputs (shift, scale, gate, y)."""
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    x, _, _, _ = _inputs(torch.float32, B=B, N=17, D=D, device="cuda", g=g)
    mod = _randn(g, B, 3 * D, dtype=torch.bfloat16, device="cuda")
    shift, scale, gate = mod.chunk(3, dim=1)
    _compare(lambda impl, *a: kernels.norm_modulate(*a, norm="layer", impl=impl), [x, shift, scale], torch.bfloat16,
             seed, g)
    y = _randn(g, *x.shape, dtype=torch.bfloat16, device="cuda")
    _compare(lambda impl, *a: kernels.gated_residual(*a, impl=impl), [x, gate, y], torch.bfloat16, seed, g)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("H", [67, 200, 1152])
def test_gpu_swiglu_matches_reference(dtype, B, H):
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    h = _randn(g, B, 17, 2 * H, dtype=dtype, device="cuda") * 3
    _compare(lambda impl, h: kernels.swiglu(h, impl=impl), [h], dtype, seed, g)


@requires_cuda
def test_gpu_errors_and_library_registration():
    cuda.load()
    x, shift, scale, weight = _inputs(torch.float32, B=2, N=5, D=64, device="cuda")
    with pytest.raises(ValueError, match="float32 or bfloat16, got torch.float64"):
        kernels.norm_modulate(x.double(), shift.double(), scale.double(), impl="cuda")
    with pytest.raises(ValueError, match="float32 or bfloat16, got torch.float16"):
        kernels.gated_residual(x, shift.half(), x, impl="cuda")
    with pytest.raises(RuntimeError, match="gate is BFloat16 but y is Float"):
        torch.ops.miro_kernels.gated_residual_fwd(x, shift.bfloat16(), x)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        torch.ops.miro_kernels.gated_residual_fwd(x.transpose(0, 1), shift, x.transpose(0, 1))
    with pytest.raises(RuntimeError, match=r"scale must be \(B, D\)"):
        torch.ops.miro_kernels.norm_modulate_fwd(x, shift, scale[:1], None, False, 1e-6)
    ops = torch.ops.miro_kernels
    mixed = (shift.bfloat16(), x.bfloat16())  # gate, y of a bfloat16 branch on a float32 stream
    for op, args in [(ops.norm_modulate_fwd, (x, shift, scale, weight, True, 1e-6)),
                     (ops.gated_residual_fwd, (x, shift, x)), (ops.gated_residual_fwd, (x, *mixed)),
                     (ops.swiglu_fwd, (x,))]:
        torch.library.opcheck(op.default, tuple(a.requires_grad_() if torch.is_tensor(a) else a for a in args))


@requires_cuda
def test_gpu_compiles_without_graph_breaks():
    cuda.load()  # built before tracing
    x, shift, scale, _ = _inputs(torch.bfloat16, B=2, N=17, D=200, device="cuda")
    fn = lambda x, s, c: kernels.swiglu(kernels.norm_modulate(x, s, c, norm="rms", impl="cuda"), impl="cuda")
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break is an error
    torch.testing.assert_close(compiled(x, shift, scale), fn(x, shift, scale))


@requires_cuda
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_gpu_model_gradients_match_the_reference(autocast):
    """The whole DiT, every parameter's gradient, fused kernels vs the reference; under bf16 autocast as train.py
    runs it (the matmuls round to bfloat16, so a kernel's float32 rounding can flip a few of them: a looser bound)."""
    from model import MIRO, get_config
    cfg = get_config("tiny")
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the random buffers (reward embedders' frequencies) from the seed too
        torch.manual_seed(seed)
        model = MIRO(cfg)
    for p in model.parameters():  # away from adaLN-Zero's zeros, so every kernel input matters
        p.data.normal_(0, 0.1, generator=g)
    model = model.cuda()
    x, t = _randn(g, 3, cfg.in_channels, cfg.image_size, cfg.image_size), torch.rand(3, generator=g)
    text, r = torch.randint(0, cfg.vocab_size, (3, cfg.max_text_len), generator=g), torch.rand(3, 2, generator=g)
    inputs = [a.cuda() for a in (x, t, text, r)]
    grads = {}
    for impl in ("torch", "cuda"):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = _forward(model, impl, *inputs)
        out.float().square().mean().backward()
        grads[impl] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(grads["cuda"]) == len(grads["torch"]) > 0
    for i, (a, b) in enumerate(zip(grads["cuda"], grads["torch"])):
        err = _rel_err(a, b)
        assert err <= (2e-2 if autocast else 1e-4), f"parameter {i}: relative error {err:.2e} (MIRO_TEST_SEED={seed})"


def _forward(model, impl, *inputs):
    previous = kernels.set_impl(impl)
    try:
        x, t, text, r = inputs
        return model(x, t, text, rewards=r)
    finally:
        kernels.set_impl(previous)
