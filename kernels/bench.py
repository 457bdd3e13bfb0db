"""Benchmark the ops of kernels/ (fused CUDA vs eager PyTorch vs torch.compile) and the training step.

    python -m kernels.bench                 # CUDA: DiT-XL/2 op shapes, the paper preset's step; CPU: small sizes
    python -m kernels.bench --json out.json # also write the numbers

Ops, at DiT-XL/2 shapes on CUDA (batch 32, 256 tokens, width 1152, SwiGLU hidden 3072, bf16) and small float32
shapes on a CPU: median time of the forward (no grad) and of forward + backward (torch.autograd.grad, so no .grad
accumulation is timed), called as a script calls them (Python, autograd and kernel launches included: at these
sizes a kernel takes tens of microseconds, about what launching it costs) and, on CUDA, replayed from a CUDA graph
(the GPU time of the kernels alone, as in a training step whose matmuls keep the GPU busy while Python launches the
next ops). From the graph time, the effective bandwidth: the bytes an ideal fused op moves (each (B, N, D) tensor read
or written once: norm_modulate 2 forward + 3 backward, gated_residual 3 + 3, swiglu 3 + 5 tensors of (B, N, H))
divided by the time, next to the device's copy bandwidth measured in the same run (dst.copy_(src) of one (B, N, D)
tensor: read + write).

Training step of a preset (paper on CUDA, in bf16 autocast; cpu on a CPU, float32), train.py's: forward, backward,
gradient clipping, AdamW step (fused on CUDA) and EMA update on random inputs with kernels off (eager: the
reference), on (fused: the CUDA kernels), torch.compile (compile: Inductor fusing the reference) and torch.compile
around the CUDA kernels (fused+compile: train.py --compile --kernels cuda); images/s, MFU = 3 x
model.flops_per_image() x images/s / the device's dense bf16 peak (train.py), and the peak memory allocated
(weights, gradients, AdamW state, EMA, activations: does a rank's batch fit the card, or does it need
--grad-accum?). Timings are medians within one run; other processes on the machine change absolute numbers, not
ratios much.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import kernels
from kernels import cuda


def timed(fn, device, warmup=3, iters=20):
    """Median milliseconds of fn() (CUDA events around each call on a GPU, wall time on a CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def graph_timed(fn, device, replays=10, iters=20):
    """Median milliseconds of fn()'s kernels replayed from a CUDA graph (`replays` back to back per timing, so the
    replay launch is amortised), or None if fn cannot be captured (the reason is printed)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph's documentation asks
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # an op that cannot be captured: report it, keep the launch-bound timing
        print(f"  (no CUDA graph: {type(e).__name__}: {str(e).splitlines()[0][:120]})", flush=True)
        torch.cuda.synchronize(device)
        return None

    def replay():
        for _ in range(replays):
            graph.replay()
    return timed(replay, device, iters=iters) / replays


def copy_bandwidth(device, numel, dtype):
    """GB/s of dst.copy_(src) (read + write) for tensors of `numel` elements: the speed of light for ops on such
    tensors (at DiT-XL/2 sizes on an H100 a (B, N, D) bf16 tensor is 19 MB, partly L2-resident)."""
    src = torch.randn(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)
    ms = (graph_timed(copy, device) if device.type == "cuda" else None) or timed(copy, device, iters=10)
    return 2 * src.numel() * src.element_size() / ms / 1e6


# ---------------------------------------------------------------------------------------------------------------
# Ops

def op_cases(B, N, D, H, dtype, device):
    """(name, fn(impl, *inputs), inputs, forward bytes, forward + backward bytes) at the given sizes."""
    x, y = (torch.randn(B, N, D, device=device, dtype=dtype) for _ in range(2))
    shift, scale, gate = torch.randn(B, 6 * D, device=device, dtype=dtype).chunk(6, dim=1)[:3]  # adaLN chunks
    h = torch.randn(B, N, 2 * H, device=device, dtype=dtype)
    S, SH = x.numel() * x.element_size(), B * N * H * h.element_size()
    return [
        ("norm_modulate LayerNorm", lambda impl, x, s, c: kernels.norm_modulate(x, s, c, norm="layer", impl=impl),
         (x, shift, scale), 2 * S, 5 * S),
        ("norm_modulate RMSNorm", lambda impl, x, s, c: kernels.norm_modulate(x, s, c, norm="rms", impl=impl),
         (x, shift, scale), 2 * S, 5 * S),
        ("gated_residual", lambda impl, x, g, y: kernels.gated_residual(x, g, y, impl=impl), (x, gate, y),
         3 * S, 6 * S),
        ("swiglu", lambda impl, h: kernels.swiglu(h, impl=impl), (h,), 3 * SH, 8 * SH),
    ]


def bench_op(fn, inputs, device):
    """(forward ms, forward + backward ms, forward + backward ms from a CUDA graph or None) of fn(*inputs)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    grad = torch.randn_like(fn(*leaves))

    def forward():
        with torch.no_grad():
            fn(*leaves)

    def forward_backward():
        torch.autograd.grad(fn(*leaves), leaves, grad)

    iters = 20 if device.type == "cuda" else 10
    graph = graph_timed(forward_backward, device) if device.type == "cuda" else None
    return timed(forward, device, iters=iters), timed(forward_backward, device, iters=iters), graph


def bench_ops(device, variants, sizes, dtype, copy_gbps):
    rows = []
    for name, fn, inputs, fwd_bytes, total_bytes in op_cases(*sizes, dtype, device):
        results = {}
        for variant in variants:
            if variant == "compile":
                torch._dynamo.reset()
                run = torch.compile(lambda *a, fn=fn: fn("torch", *a))
            else:
                run = lambda *a, fn=fn, impl=("torch" if variant == "eager" else "cuda"): fn(impl, *a)
            results[variant] = bench_op(run, inputs, device)
        eager_graph = results["eager"][2]
        for variant, (fwd, total, graph) in results.items():
            kernel_ms = graph or total  # the bandwidth of the kernels: graph replay where there is one
            rows.append({"op": name, "variant": variant, "fwd_ms": fwd, "fwd_bwd_ms": total, "fwd_bwd_graph_ms": graph,
                         "fwd_GBps": fwd_bytes / fwd / 1e6, "fwd_bwd_GBps": total_bytes / kernel_ms / 1e6,
                         "fwd_bwd_copy_pct": 100 * total_bytes / kernel_ms / 1e6 / copy_gbps,
                         "speedup_fwd": results["eager"][0] / fwd, "speedup_fwd_bwd": results["eager"][1] / total,
                         "speedup_graph": eager_graph / graph if graph and eager_graph else None})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Training step

def make_step(preset, batch, device, bf16, compile):
    """One training step (forward, backward, gradient clipping, finiteness check, AdamW, EMA) of `preset` on fixed
    random inputs, as train.py runs it."""
    import copy

    from model import MIRO, get_config
    from train import TrainConfig, flow_matching_loss, make_optimizer, update_ema
    torch.manual_seed(0)
    cfg = get_config(preset)
    with torch.device(device):  # initialised in place: seconds saved per variant for the 0.36B paper model
        model = MIRO(cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.01, device=device)
    x0 = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t, noise = torch.rand(batch, device=device), torch.randn_like(x0)
    if cfg.vocab_size > 0:
        text = torch.randint(0, cfg.vocab_size, (batch, cfg.max_text_len), device=device)
    else:  # precomputed encoder features, as the paper's frozen T5
        text = torch.randn(batch, cfg.max_text_len, cfg.text_dim, device=device)
    condition = {"text": text, "rewards": torch.rand(batch, len(cfg.reward_names), device=device)}
    forward = torch.compile(model) if compile else model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = flow_matching_loss(forward, x0, t, noise, **condition)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), TrainConfig.grad_clip)
        if torch.isfinite(torch.stack([loss.detach(), grad_norm])).all().item():  # train.py's NaN check: a host sync
            optimizer.step()
            update_ema(ema, model, 0.9999)
        optimizer.zero_grad(set_to_none=True)

    return model, step


STEP_VARIANTS = {"eager": "torch", "fused": "cuda", "compile": "auto", "fused+compile": "cuda"}  # -> kernels impl


def profile_step(step, device, rows=15):
    """Print the kernels that take the most device time over 3 steps (torch.profiler), after a warm step."""
    from torch.profiler import ProfilerActivity, profile
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for sort_by in (["self_device_time_total", "self_cuda_time_total"] if device.type == "cuda" else
                    ["self_cpu_time_total"]):  # the device column's name changed across torch versions
        try:
            print(prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=70), flush=True)
            return
        except (AttributeError, KeyError, ValueError) as e:
            reason = e
    print(f"(no profile table: {reason})")


def bench_steps(device, variants, preset, batch, bf16, iters, profile=False):
    from train import mfu_percent, peak_flops
    peak, rows = peak_flops(device), []
    for variant in variants:
        previous = kernels.set_impl(STEP_VARIANTS[variant])
        try:
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            model, step = make_step(preset, batch, device, bf16, "compile" in variant)
            ms = timed(step, device, warmup=3 if device.type == "cuda" or "compile" in variant else 1, iters=iters)
        except Exception as e:  # out of memory, a compiler error: report it and go on with the other variants
            why = "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else f"{type(e).__name__}: {e}"
            print(f"  step {variant} failed: {why}", flush=True)
            rows.append({"variant": f"{variant} (failed: {why.splitlines()[0][:80]})", "step_ms": float("nan"),
                         "images_per_s": 0.0, "TFLOPps": 0.0, "MFU_pct": None, "peak_GB": None})
            model = step = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        finally:
            kernels.set_impl(previous)
        images_per_s = batch / ms * 1000
        print(f"  step {variant}: {ms:.1f} ms", flush=True)  # progress: compiling a variant takes a minute
        if profile and variant == variants[-1]:
            print(f"\nWhere the time goes, step {variant} (3 steps):")
            previous = kernels.set_impl(STEP_VARIANTS[variant])  # the step's own impl: another would recompile it
            try:
                profile_step(step, device)
            finally:
                kernels.set_impl(previous)
        rows.append({"variant": variant, "step_ms": ms, "images_per_s": images_per_s,
                     "TFLOPps": 3 * model.flops_per_image() * images_per_s / 1e12,
                     "MFU_pct": mfu_percent(model.flops_per_image(), images_per_s, peak) if peak else None,
                     # weights, gradients, AdamW state, EMA and activations: does a rank's batch fit the card?
                     "peak_GB": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None})
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        row["speedup"] = rows[0]["step_ms"] / row["step_ms"]
    return rows


# ---------------------------------------------------------------------------------------------------------------

def print_table(title, rows, columns):
    """A markdown table of `columns` (key, header, format) over `rows`."""
    print(f"\n{title}\n")
    print("| " + " | ".join(header for _, header, _ in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = [("-" if row[key] is None else fmt.format(row[key])) for key, _, fmt in columns]
        print("| " + " | ".join(cells) + " |")


def positive_int(text):
    """argparse type of the counts: 0 or less is no benchmark at all (and `or` would turn 0 into the default)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be > 0, got {n}")
    return n


def check_args(p, args):
    """Parser errors for what would otherwise fail minutes in (a preset, the --json file) or as a traceback (a
    device that is not there)."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: not a torch device (cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: the benchmark runs on cpu or cuda")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= gpus:
        p.error(f"--device {args.device}: no such GPU ({gpus} visible)")
    from model import PRESETS  # as make_step: the model lives at the repository's root
    if args.preset is not None and args.preset not in PRESETS:
        p.error(f"--preset {args.preset}: unknown; known presets: {', '.join(PRESETS)}")
    if args.json:
        path = Path(args.json)
        why = ("is a folder" if path.is_dir() else f"no folder {path.parent}" if not path.parent.is_dir() else
               "not writable" if not os.access(path if path.exists() else path.parent, os.W_OK) else None)
        if why:
            p.error(f"--json {path}: {why}")
    return device


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="include torch.compile variants (auto: on CUDA only; on a CPU compiling takes minutes)")
    p.add_argument("--preset", default=None, help="model preset of the training step (default: paper on CUDA, "
                                                  "cpu on a CPU)")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="training-step batch (default: 128 on CUDA = the paper's 1024 over 8 GPUs; 8 on a CPU)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="timed training steps per variant (default 10 CUDA, 5 CPU)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="CPU threads (default 1: steady timings on a shared CPU)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--profile", action="store_true", help="print the top kernels of the last training-step variant "
                                                          "(torch.profiler)")
    args = p.parse_args(argv)
    device = check_args(p, args)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(args.threads)
    if on_gpu:
        device = torch.device("cuda", device.index or 0)  # "cuda" alone is GPU 0
        torch.cuda.set_device(device)  # CUDA events, graphs and their streams belong to the current device
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with_compile = args.compile == "on" or (args.compile == "auto" and on_gpu)
    fused = on_gpu and cuda.available()
    variants = ["eager"] + (["fused"] if fused else []) + (["compile"] if with_compile else [])

    sizes, dtype = ((32, 256, 1152, 3072), torch.bfloat16) if on_gpu else ((4, 64, 256, 512), torch.float32)
    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    B, N, D, H = sizes
    copy_gbps = copy_bandwidth(device, B * N * D, dtype)
    print(f"device: {name}; torch {torch.__version__}; copy bandwidth {copy_gbps:.0f} GB/s (a (B, N, D) tensor); "
          f"variants {variants}"
          + ("" if fused or not on_gpu else f"; fused kernels unavailable: {cuda.error()}"))
    op_rows = bench_ops(device, variants, sizes, dtype, copy_gbps)
    print_table(f"Ops at B={B} N={N} D={D} (SwiGLU H={H}), {str(dtype).replace('torch.', '')}; speed-up vs eager",
                op_rows, [("op", "op", "{}"), ("variant", "variant", "{}"), ("fwd_ms", "fwd ms", "{:.3f}"),
                          ("fwd_bwd_ms", "fwd+bwd ms", "{:.3f}"), ("speedup_fwd", "fwd x", "{:.2f}"),
                          ("speedup_fwd_bwd", "fwd+bwd x", "{:.2f}"), ("fwd_bwd_graph_ms", "graph fwd+bwd ms", "{:.3f}"),
                          ("speedup_graph", "graph x", "{:.2f}"), ("fwd_bwd_GBps", "fwd+bwd GB/s", "{:.0f}"),
                          ("fwd_bwd_copy_pct", "% of copy", "{:.0f}")])

    preset = args.preset or ("paper" if on_gpu else "cpu")
    batch = args.batch if args.batch is not None else (128 if on_gpu else 8)
    results = {"device": name, "torch": torch.__version__, "copy_GBps": copy_gbps, "ops": op_rows, "step": [],
               "preset": preset, "batch": batch}
    write_json(args.json, results)  # the op numbers survive a step benchmark that runs out of time
    step_variants = variants + (["fused+compile"] if fused and with_compile else [])
    step_rows = bench_steps(device, step_variants, preset, batch, bf16=on_gpu,
                            iters=args.steps if args.steps is not None else (10 if on_gpu else 5),
                            profile=args.profile)
    print_table(f"Training step, preset {preset}, batch {batch}, {'bf16 autocast' if on_gpu else 'float32'}; "
                f"MFU vs dense bf16 peak", step_rows,
                [("variant", "variant", "{}"), ("step_ms", "ms/step", "{:.1f}"), ("images_per_s", "img/s", "{:.0f}"),
                 ("TFLOPps", "TFLOP/s", "{:.3g}"), ("MFU_pct", "MFU %", "{:.1f}"), ("speedup", "x eager", "{:.2f}"),
                 ("peak_GB", "peak GB", "{:.1f}")])
    write_json(args.json, dict(results, step=step_rows))
    failed = [row["variant"] for row in step_rows if math.isnan(row["step_ms"])]
    if failed:  # a table with a failed row is not a benchmark that ran: scripts and CI must see it
        print(f"{len(failed)} of {len(step_rows)} training-step variants failed", file=sys.stderr)
        sys.exit(1)


def write_json(path, results):
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
