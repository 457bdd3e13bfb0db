"""Train MIRO (or the same network without rewards, the baseline) with flow matching.

Launch:
    python train.py                                   # single process: the built-in shapes world on a CPU
    python train.py --no-rewards                      # the baseline: same network, no reward tokens, text CFG
    torchrun --standalone --nproc_per_node=8 train.py --preset paper ...             # one node, 8 GPUs
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
             --rdzv_id=miro train.py --preset paper ...                              # several nodes
    python train.py --resume runs/miro                # continue a run where its last checkpoint left it
    python train.py --data "shards/{00000..00099}.tar" --synthetic-caption-prob 0.5   # real data (data.py's formats)

Conventions: x_t = (1 - t) x0 + t eps with t = 0 data and t = 1 noise; the network predicts v = eps - x0 and the
loss is the MSE to it. Reward conditioning values are in [0, 1] (bin k of B is k / (B - 1)). Samples come from the
EMA weights. The global batch is split evenly over ranks (and gradient-accumulation micro-steps).

A run folder holds config.json (every setting), log.txt, samples/step_*.png and ckpt.pt (model, EMA, optimizer,
scheduler, step, bin edges, tokenizer), written atomically by rank 0 alone (so on several nodes, --runs-dir for
--resume and the built-in world's --data-dir, which rank 0 builds, must be on a filesystem every node sees, as
--data and the caches are). The step's random numbers
(timesteps, noise, dropout) are drawn for the whole global batch from a generator seeded by (seed, step), and each
rank takes the rows of its own samples: on the built-in data the result does not depend on the number of ranks, on
gradient accumulation or on where a run was resumed (tests/test_reliability.py checks all three); a streamed --data
run shards records per rank and draws fresh permutations on resume (data.stream_batches).
"""
import argparse
import contextlib
import dataclasses
import fcntl
import functools
import json
import itertools
import math
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import kernels
import rewards
from model import (EMPTY_CAPTION_KEY, MIRO, PRESETS, CacheMiss, LatentCache, ModelConfig, TextEmbeddingCache,
                   WordTokenizer, adapt_config, add_frozen_args, count_parameters, frozen_spec, get_config,
                   key_generator, load_checkpoint, load_frozen, save_checkpoint, trim_padding, uses_bf16)
from sample import generate, save_grid


@dataclass
class TrainConfig:
    """Optimisation settings; `TRAIN_PRESETS` pairs one with each model preset."""
    steps: int = 1400               # optimizer steps (the cpu default fits ~8 minutes on 2 cores)
    batch_size: int = 32            # global batch (all ranks and accumulation micro-steps together)
    grad_accum: int = 1             # micro-steps per optimizer step
    lr: float = 1e-3                # peak learning rate (AdamW)
    weight_decay: float = 0.01
    warmup: int = 200               # linear warm-up steps, then cosine decay to 0
    grad_clip: float = 2.0          # max global gradient norm
    ema_decay: float = 0.999        # paper: 0.9999 over 500k steps; shorter runs need a shorter horizon
    time_sampling: str = "logit_normal"  # "logit_normal" (t = sigmoid(N(0,1)), the authors' code) or "uniform"
    text_dropout: float = 0.0       # probability of an empty caption (the baseline needs it for text CFG)
    reward_dropout: float = 0.0     # per-reward probability of the null (zero) reward token; off in the paper
    cfg: float = 2.0                # default guidance weight stored with the run for sample.py / evaluate.py
    log_every: int = 100
    sample_every: int = 700         # preview grid of held-out prompts every this many steps (0: never)
    ckpt_every: int = 400           # overwrite run/ckpt.pt every this many steps
    keep_every: int = 0             # also keep run/ckpt_<step>.pt every this many steps (0: never)
    on_nan: str = "stop"            # a non-finite loss or gradient: "stop" (exit 1, last checkpoint kept) or "skip"
    max_nan_skips: int = 10         # with on_nan=skip: stop after this many non-finite steps in a row


TRAIN_PRESETS = {
    "tiny": TrainConfig(steps=20, batch_size=8, warmup=5, log_every=5, sample_every=0, ckpt_every=10),
    "cpu": TrainConfig(),
    "paper": TrainConfig(steps=500_000, batch_size=1024, lr=1e-3, warmup=5000, ema_decay=0.9999,
                         log_every=100, sample_every=10_000, ckpt_every=5000, cfg=7.0),
}


def kept_checkpoint(run_dir, step: int) -> Path:
    """The checkpoint --keep-every keeps at `step` (run/ckpt.pt is the one --resume reads)."""
    return Path(run_dir) / f"ckpt_{step:07d}.pt"


# ----------------------------------------------------------------------------------------------------------------
# The objective: one home for the flow-matching target and the timestep distribution.

def sample_timesteps(n, kind, generator):
    """t in (0, 1): logit-normal (sigmoid of a standard normal) or uniform."""
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    if kind == "uniform":
        return torch.rand(n, generator=generator)
    raise ValueError(f"unknown time sampling {kind!r}; use logit_normal or uniform")


def flow_matching_loss(model, x0, t, noise, **condition):
    """MSE between the predicted velocity at x_t = (1 - t) x0 + t eps and the target eps - x0."""
    t_ = t.view(-1, *([1] * (x0.dim() - 1)))
    x_t = (1 - t_) * x0 + t_ * noise
    v = model(x_t, t, **condition)
    return F.mse_loss(v.float(), (noise - x0).float())


def make_optimizer(model, lr, weight_decay, device):
    """AdamW with betas (0.9, 0.99). On CUDA the fused implementation, one pass over the weights, gradients and
    moments per step instead of the default's ten or so; elsewhere the default, so CPU runs repeat older ones."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99),
                             fused=torch.device(device).type == "cuda")


def load_optimizer_state(optimizer, state):
    """Load a checkpoint's optimizer state but keep this run's implementation: torch would take fused or not from
    the checkpoint (a run started on a GPU and resumed on a CPU, or the reverse, would keep the other device's)."""
    groups = [{**saved, "fused": group["fused"], "foreach": group["foreach"]}
              for group, saved in zip(optimizer.param_groups, state["param_groups"])]
    optimizer.load_state_dict({**state, "param_groups": groups})


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model for every parameter (buffers are copied)."""
    # One multi-tensor launch instead of one per parameter (~400 in the paper preset), as torch.optim.swa_utils does.
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


class InLine:
    """step_ahead's stand-in for a thread: each call runs when its result is asked for, in the caller's thread."""

    def submit(self, fn, *args):
        return SimpleNamespace(result=functools.partial(fn, *args))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def step_ahead(device, host_only=True):
    """Where the training loop prepares its next step (reads caches, draws noise, pins the batch). On CUDA a
    background thread, so that this overlaps the current step instead of idling the GPU after the step's sync
    (60-80 ms to read 128 FLAN-T5-XL captions from a text cache and 15-25 ms to draw a 1024 batch's noise, on
    one core); elsewhere in line, since the thread only takes cores from the step (10-20% fewer img/s on 2 cores).
    Also in line when the preparation runs a frozen encoder on the GPU (host_only=False: no --text-cache or
    --latent-cache): it would share the GPU with the step anyway, and add its activations to the step's peak."""
    device = torch.device(device)
    if device.type != "cuda" or not host_only:
        return InLine()
    # the thread's current device is the rank's, as the main thread's (CUDA keeps one per thread)
    return ThreadPoolExecutor(max_workers=1, initializer=torch.cuda.set_device,
                              initargs=(torch.device("cuda", device.index or 0),))


def map_batch(fn, batch):
    """fn applied to every tensor of a micro-batch (x0, t, noise, condition dict)."""
    return tuple({k: fn(v) for k, v in x.items()} if isinstance(x, dict) else fn(x) for x in batch)


def ema_decay(decay, step):
    """The EMA decay after `step` updates, warmed up as (1 + step) / (10 + step) so that short runs are not
    dominated by the initial (all-zero-output) weights."""
    return min(decay, (1 + step) / (10 + step))


def step_draws(seed, step, batch_size, image_shape, num_rewards, tc):
    """The random numbers of one optimizer step for all `batch_size` samples of the global batch, in global batch
    order: timesteps (B,), noise (B, *image_shape), text keep (B,) and reward drop (B, R) coins. The generator is
    seeded by (seed, step) alone, so every rank draws the same numbers (and takes its own rows) and a resumed run
    needs no saved RNG state."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**32)  # the CPU generator keeps 32 seed bits
    t = sample_timesteps(batch_size, tc.time_sampling, g)
    noise = torch.randn(batch_size, *image_shape, generator=g)
    keep_text = torch.rand(batch_size, generator=g) >= tc.text_dropout
    drop_rewards = torch.rand(batch_size, num_rewards, generator=g) < tc.reward_dropout
    return t, noise, keep_text, drop_rewards


def lr_factor(step, warmup, total):
    """Linear warm-up to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------------------------
# Speed accounting: MFU = 3 x forward FLOPs (model.flops_per_image) x images/s per GPU / the GPU's dense bf16 peak
# (also in fp32 runs, whose matmuls use TF32). The backward counts as 2x the forward; nothing is recomputed.

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak of one SXM GPU


def peak_flops(device):
    """Dense bf16 peak FLOP/s of `device`, or None where unknown (CPUs, GPUs not in PEAK_BF16_FLOPS)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def mfu_percent(flops_per_image, images_per_s, peak):
    """Model FLOPs utilisation in % of `peak`, for `images_per_s` training images per second on one device whose
    forward costs `flops_per_image` (model.flops_per_image at the batches' text length)."""
    return 100 * 3 * flops_per_image * images_per_s / peak


# ----------------------------------------------------------------------------------------------------------------
# Command line.

CHECKPOINT_KEYS = ("config", "tokenizer", "model", "ema", "optimizer", "scheduler", "step", "bins", "train")
NEW_RUN = {"preset": "cpu", "seed": 0, "num_train": 20000, "data_seed": 0, "min_image_size": 0,
           "synthetic_caption_prob": 0.0, "missing_rewards": "skip"}  # defaults of the run-defining flags
RUN_PATHS = ("data", "data_dir", "annotations")  # where the run's data lives: a resumed run may be pointed elsewhere
RESUME_MAY_CHANGE = ("steps", "grad_accum", "log_every", "sample_every", "ckpt_every", "keep_every", "on_nan",
                     "max_nan_skips", "cfg")  # TrainConfig fields a resumed run takes from the command line


def asked_reward_names(args):
    """The rewards the flags ask for: () for --no-rewards, else --rewards split at commas."""
    return () if args.no_rewards else tuple(r for r in args.rewards.split(",") if r)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " See the module docstring for launch lines.")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="model + optimisation preset (default cpu)")
    p.add_argument("--name", default=None, help="run name under --runs-dir (default: miro, or baseline)")
    p.add_argument("--runs-dir", default=None, help="folder holding the run folders (default: runs)")
    p.add_argument("--resume", default=None,
                   help="run folder (or ckpt.pt) to continue as it was trained (its preset, rewards, seed, data and "
                        "optimisation settings); flags may change only --steps (the cosine then spans the new total), "
                        "--grad-accum, --cfg, the data's paths (--data, --data-dir, --annotations) and the logging / "
                        "checkpoint / preview / NaN bookkeeping")
    p.add_argument("--no-rewards", action="store_true", help="train the baseline: same network, no reward tokens")
    p.add_argument("--rewards", default=None,
                   help="comma-separated rewards to condition on (default: the seven of the paper for --preset "
                        "paper, every built-in reward otherwise); names are annotation columns")
    p.add_argument("--data-dir", default=None,
                   help="built-in dataset folder (default: runs/_data/shapes<size>_n<N>_seed<S>; built if missing)")
    p.add_argument("--num-train", type=int, default=None, help="size of the built-in training set (default 20000)")
    p.add_argument("--data-seed", type=data.seed_arg, default=None, help="seed of the built-in world (default 0)")
    p.add_argument("--data", default=None,
                   help="train on a real dataset instead of the built-in world: an image folder, a .jsonl/.csv "
                        "manifest, a folder of WebDataset .tar shards or a pattern like 'shards/{00000..00099}.tar' "
                        "(data.py's docstring has the layouts)")
    p.add_argument("--annotations", default=None,
                   help="--data: rewards.py annotate's annotations.jsonl, joined by sample key (default: "
                        "annotations.jsonl in the --data folder, or beside the manifest / shards)")
    p.add_argument("--missing-rewards", default=None, choices=["skip", "lowest"],
                   help="--data: samples without every reward score are skipped (default), or trained at the "
                        "lowest bin")
    p.add_argument("--synthetic-caption-prob", type=float, default=None,
                   help="--data: probability of training on a sample's synthetic_caption (when it has one) with the "
                        "rewards scored on it (columns name@synthetic_caption); default 0, the paper: 0.5")
    p.add_argument("--min-image-size", type=int, default=None,
                   help="--data: skip images whose shorter side is below this many pixels (default 0: keep all)")
    p.add_argument("--data-workers", type=int, default=4, help="--data: dataloader worker processes per rank")
    add_frozen_args(p)
    p.add_argument("--text-cache", default=None,
                   help="a text-embedding cache of --data (model.py precompute's OUT/text, same encoder) read "
                        "instead of running the text encoder on training captions")
    p.add_argument("--latent-cache", default=None,
                   help="a latent cache of --data (OUT/latents, same VAE and image size) read instead of encoding")
    p.add_argument("--num-bins", type=int, default=64, help="reward bins B (value k/(B-1))")
    p.add_argument("--binning", default="quantile", choices=["quantile", "uniform"], help="bin edges")
    p.add_argument("--seed", type=data.seed_arg, default=None,
                   help="seed of initialisation, noise and data order (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device type")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="fp32, or bf16 autocast (float32 weights and optimizer); default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--kernels", default="auto", choices=kernels.IMPLS,
                   help="fused CUDA kernels of kernels/ (auto: when on CUDA and they build) or the PyTorch reference")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA; minutes of compilation)")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        p.add_argument(flag, type=field.type, default=None,
                       help=f"override the preset's {field.name} (cpu preset: {getattr(TRAIN_PRESETS['cpu'], field.name)})")
    args = p.parse_args(argv)
    args.given_train = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                        if getattr(args, f.name) is not None}  # what --resume checks against the run
    train_cfg = dataclasses.replace(TRAIN_PRESETS[args.preset or NEW_RUN["preset"]], **args.given_train)
    checks = [(train_cfg.steps > 0, "--steps must be > 0"), (train_cfg.batch_size > 0, "--batch-size must be > 0"),
              (train_cfg.grad_accum > 0, "--grad-accum must be > 0"),
              (0 < train_cfg.lr < math.inf, "--lr must be > 0 and finite"),
              (0 <= train_cfg.ema_decay < 1, "--ema-decay must be in [0, 1)"),
              (0 <= train_cfg.text_dropout < 1, "--text-dropout must be in [0, 1)"),
              (0 <= train_cfg.reward_dropout < 1, "--reward-dropout must be in [0, 1)"),
              (math.isfinite(train_cfg.cfg) and train_cfg.cfg >= 0, "--cfg must be >= 0 and finite"),
              (args.num_bins >= 2, "--num-bins must be >= 2"),
              (args.num_train is None or args.num_train > 0, "--num-train must be > 0"),
              (args.synthetic_caption_prob is None or 0 <= args.synthetic_caption_prob <= 1,
               "--synthetic-caption-prob must be in [0, 1]"),
              (args.min_image_size is None or args.min_image_size >= 0, "--min-image-size must be >= 0"),
              (args.data_workers >= 0, "--data-workers must be >= 0"),
              (args.data is None or args.data_dir is None, "--data and --data-dir exclude each other"),
              (train_cfg.time_sampling in ("logit_normal", "uniform"), "--time-sampling: logit_normal or uniform"),
              (train_cfg.warmup >= 0, "--warmup must be >= 0"), (train_cfg.grad_clip > 0, "--grad-clip must be > 0"),
              (0 <= train_cfg.weight_decay < math.inf, "--weight-decay must be >= 0 and finite"),
              (train_cfg.log_every > 0, "--log-every must be > 0"),
              (train_cfg.ckpt_every > 0, "--ckpt-every must be > 0"),
              (train_cfg.sample_every >= 0, "--sample-every must be >= 0"),
              (train_cfg.keep_every >= 0, "--keep-every must be >= 0"),
              (train_cfg.on_nan in ("stop", "skip"), "--on-nan: stop or skip"),
              (train_cfg.max_nan_skips >= 0, "--max-nan-skips must be >= 0")]
    try:
        checks.append((torch.device(args.device).type != "cuda" or torch.cuda.is_available(),
                       f"--device {args.device}: no CUDA GPU is visible"))
    except RuntimeError as e:
        checks.append((False, f"--device: {e}"))
    for ok, message in checks:
        if not ok:
            p.error(message)
    try:
        args.frozen = frozen_spec(args.text_encoder, args.text_encoder_option, args.vae, args.vae_option)
    except ValueError as e:
        p.error(str(e))
    if args.text_cache and args.text_encoder == "builtin" or args.latent_cache and args.vae == "none":
        p.error("--text-cache needs --text-encoder t5|clip, and --latent-cache needs --vae sdxl (the cached encoder)")
    if args.no_rewards and args.rewards is not None:
        p.error("--no-rewards trains the baseline, which takes no --rewards")
    if args.resume:  # the run's own settings fill what is not given (resumed_settings, once the run is open)
        return p, args, train_cfg
    for name, default in NEW_RUN.items():
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    if args.rewards is None:
        args.rewards = ",".join(PRESETS["paper"].reward_names if args.preset == "paper" else rewards.BUILTIN_REWARDS)
    args.reward_names = asked_reward_names(args)
    if len(set(args.reward_names)) < len(args.reward_names):
        p.error(f"--rewards names a reward twice: {args.rewards}")
    unknown = [r for r in args.reward_names if r not in rewards.REWARDS]
    if unknown and args.data is None:  # --data: checked against the annotation columns instead
        p.error(f"unknown reward(s) {', '.join(unknown)}; the built-in data is annotated with "
                f"{', '.join(rewards.BUILTIN_REWARDS)} (known rewards: {', '.join(rewards.REWARDS)})")
    if not args.no_rewards and not args.reward_names:
        p.error("--rewards is empty; use --no-rewards for the baseline")
    if args.no_rewards and train_cfg.text_dropout == 0 and args.text_dropout is None:
        train_cfg.text_dropout = 0.1  # the baseline guides with an empty prompt, so it must see some
    args.name = args.name or ("baseline" if args.no_rewards else "miro")
    return p, args, train_cfg


def _flag_value(value):
    """A setting as its flag would spell it (reward names comma-separated, none for the baseline)."""
    return (",".join(value) or "none") if isinstance(value, tuple) else value


def resumed_settings(ckpt, args):
    """--resume: the TrainConfig and run-defining flags of the run in `ckpt`, as it was trained (args is filled in
    place). A flag given with --resume may change only RESUME_MAY_CHANGE (the length and the bookkeeping) and
    the data's paths, RUN_PATHS (a moved dataset); one that contradicts the run raises ValueError, so that no
    resumed run trains on other data, with another seed or schedule than the run it continues."""
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"not a train.py checkpoint (no {', '.join(missing)})")
    # What an older checkpoint did not record (the whole run before 2026-12-06), the flags decide.
    given = {n: getattr(args, n) for n in (*NEW_RUN, *RUN_PATHS) if getattr(args, n) is not None}
    run = {**NEW_RUN, **dict.fromkeys(RUN_PATHS), **given, **ckpt.get("run", {})}
    trained = TrainConfig(**ckpt["train"])
    saved = {**run, "rewards": tuple(ckpt["config"]["reward_names"])}
    asked = {name: getattr(args, name) for name in NEW_RUN}
    if args.rewards is not None or args.no_rewards:
        asked["rewards"] = asked_reward_names(args)
    if args.data is not None and run["data"] is None:
        asked["data"] = args.data  # the built-in world's run on a real dataset: a new run
    conflicts = [f"--{name.replace('_', '-')} {value} (the run's: {getattr(trained, name)})"
                 for name, value in args.given_train.items()
                 if name not in RESUME_MAY_CHANGE and value != getattr(trained, name)]
    conflicts += [f"--{name.replace('_', '-')} {_flag_value(value)} (the run's: {_flag_value(saved[name])})"
                  for name, value in asked.items() if value is not None and value != saved[name]]
    if conflicts:
        raise ValueError(f"a resumed run keeps its settings, but {'; '.join(conflicts)}: train a new run instead")
    for name in NEW_RUN:
        setattr(args, name, run[name])
    for name in RUN_PATHS:
        setattr(args, name, getattr(args, name) or run[name])
    args.reward_names, args.no_rewards = saved["rewards"], not saved["rewards"]
    return dataclasses.replace(trained, **{n: v for n, v in args.given_train.items() if n in RESUME_MAY_CHANGE})


def prepare_real_data(args, image_size, rank, world_size, reward_names, resume_bins):
    """--data: a data.RecordDataset streaming this rank's share, rewards joined by key from the annotations (bins
    fitted on them for a new run, the checkpoint's when resuming); returns (dataset, bins or None)."""
    source = data.open_dataset(args.data, min_size=args.min_image_size)
    table, bins = None, None
    if reward_names:
        folder = Path(args.data) if Path(args.data).is_dir() else Path(args.data).parent
        path = Path(args.annotations) if args.annotations else folder / rewards.ANNOTATIONS
        keys, columns = rewards.load_annotation_columns(path)  # arrays: 16M rows fit every rank's memory
        if not len(keys):
            raise FileNotFoundError(f"no annotations in {path}: run rewards.py annotate on --data first, or give "
                                    f"--annotations (or train the baseline with --no-rewards)")
        bins = (rewards.RewardBins.from_dict(resume_bins) if resume_bins else
                rewards.RewardBins.fit(data.annotation_scores(columns, reward_names), num_bins=args.num_bins,
                                       method=args.binning, seed=args.data_seed))
        table = data.RewardTable(keys, columns, bins)
    dataset = data.RecordDataset(source, image_size, table, args.missing_rewards, args.synthetic_caption_prob,
                                 rank, world_size, seed=args.seed, report=True,
                                 shuffle_buffer=256 if source.format == "webdataset" else 0)
    return dataset, bins


class ModelInputs:
    """A training batch -> the generator's inputs, with one behaviour whether frozen encoders run or their caches
    (model.py precompute) are read.

    text: the WordTokenizer's ids, or the frozen encoder's features cut to the batch's longest caption; a dropped
    caption is the empty one (EMPTY_CAPTION_KEY in a cache). images: pixels, or normalised VAE latents, each a
    posterior sample drawn with key_generator(key, seed), so a cached latent and one encoded now are the same sample.
    A key that a cache lacks ends the run with a one-line error (its last checkpoint is kept); a latent cache made
    with a larger --min-image-size than the run's, which would lack the small images, is refused at the start.
    """

    def __init__(self, tokenizer, text_encoder, vae, seed=0, text_cache=None, latent_cache=None,
                 image_size=None, min_image_size=0, data_identity=None):
        self.tokenizer, self.text_encoder, self.vae, self.seed = tokenizer, text_encoder, vae, seed
        self.text_cache = TextEmbeddingCache(text_cache) if text_cache else None
        self.latent_cache = LatentCache(latent_cache) if latent_cache else None
        if self.text_cache and (self.text_cache.name, self.text_cache.max_length) != (text_encoder.name,
                                                                                       text_encoder.max_length):
            raise ValueError(f"--text-cache {text_cache} holds {self.text_cache.name} features of "
                             f"{self.text_cache.max_length} tokens, not {text_encoder.name}'s {text_encoder.max_length}")
        if self.latent_cache and (self.latent_cache.name, self.latent_cache.image_size, self.latent_cache.seed) != (
                vae.name, image_size, seed):
            raise ValueError(f"--latent-cache {latent_cache} holds {self.latent_cache.name} latents of "
                             f"{self.latent_cache.image_size} px images (seed {self.latent_cache.seed}), not "
                             f"{vae.name} at {image_size} px (seed {seed})")
        if self.latent_cache and None not in (self.latent_cache.data, data_identity) and \
                self.latent_cache.data != data_identity:
            raise ValueError(f"--latent-cache {latent_cache} holds the images of {self.latent_cache.data}, not of "
                             f"{data_identity}: precompute one for this data (for a dataset that moved, correct "
                             f"\"data\" in the cache's meta.json)")
        if self.latent_cache and self.latent_cache.min_image_size > min_image_size:
            raise ValueError(f"--latent-cache {latent_cache} holds only images of at least "
                             f"{self.latent_cache.min_image_size} px: train with --min-image-size "
                             f"{self.latent_cache.min_image_size}, or precompute the cache with --min-image-size "
                             f"{min_image_size}")

    def text(self, captions, sources, keep):
        """(text, mask) for captions (list), their (key, field) sources and keep flags (bool (B,)): on the host, or
        on the device where a frozen encoder made them."""
        keep = keep.tolist()
        if self.text_encoder is None:
            ids, mask = self.tokenizer([c if k else "" for c, k in zip(captions, keep)])
        elif self.text_cache is not None:
            keys = [data.text_key(*s, c) if k else EMPTY_CAPTION_KEY for s, c, k in zip(sources, captions, keep)]
            ids, mask = self._read(self.text_cache, keys, trim=True)
        else:
            ids, mask = trim_padding(*self.text_encoder([c if k else "" for c, k in zip(captions, keep)]))
        return ids, mask

    def images(self, images, sources):
        """x0 for pixel images (B, 3, S, S) in [-1, 1]: the images, or their normalised latents."""
        if self.vae is None:
            return images
        keys = [key for key, _ in sources]
        if self.latent_cache is not None:
            return self._read(self.latent_cache, keys)
        return self.vae.encode(images, [key_generator(key, self.seed) for key in keys])

    @staticmethod
    def _read(cache, keys, **options):
        try:
            return cache(keys, **options)
        except CacheMiss as e:  # hours into a run: say what is wrong, not where
            raise SystemExit(f"error: {e} (the run stops; its last checkpoint is kept)") from None


# ----------------------------------------------------------------------------------------------------------------

class Logger:
    """Prints and appends to run/log.txt on rank 0; silent elsewhere."""

    def __init__(self, path, rank):
        self.file = open(path, "a") if rank == 0 else None

    def __call__(self, message):
        if self.file is not None:
            print(message, flush=True)
            self.file.write(message + "\n")
            self.file.flush()


def endless_batches(dataset, sampler, steps_done):
    """This rank's batches (one per optimizer step) from the data position that `steps_done` steps reach, epoch
    after epoch (each pass over the sampler continues with the next epoch), so a resumed run sees the same data."""
    sampler.set_position(*divmod(steps_done, len(sampler)))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=data.collate)
    while True:
        yield from loader


def prepare_builtin_data(args, image_size, rank):
    """Build and annotate the built-in world once (rank 0; the others wait), then open it on every rank."""
    world = data.WorldConfig(image_size=image_size, num_train=args.num_train, seed=args.data_seed)
    data_dir = Path(args.data_dir) if args.data_dir else world.default_dir()
    if rank == 0:
        data.build_shapes_dataset(world, data_dir)
        rewards.annotate(data.ImageTextSamples(data_dir), rewards.BUILTIN_REWARDS, data_dir,
                         num_bins=args.num_bins, binning=args.binning)
    if dist.is_initialized():
        dist.barrier()
    return world, data_dir, data.ImageTextSamples(data_dir)


def builtin_rewards(args, data_dir, samples, reward_names, resume_bins, log):
    """The built-in world's reward values (N, R) in [0, 1] and their bins: fitted for a new run, the checkpoint's
    when resuming (so sampling targets keep their meaning)."""
    annotations = rewards.load_annotations(data_dir / rewards.ANNOTATIONS)
    unscored = [n for n in reward_names if not any(n in s for s in annotations.values())]
    if unscored:  # a registry reward beyond the built-in ones (e.g. a learned one) is annotated separately
        raise ValueError(f"no {', '.join(unscored)} scores in {data_dir / rewards.ANNOTATIONS}: add them with "
                         f"python rewards.py annotate --data-dir {data_dir} --rewards {','.join(unscored)} ...")
    scores = data.sample_scores(annotations, samples.keys, reward_names)
    if resume_bins is not None:
        bins = rewards.RewardBins.from_dict(resume_bins)
        differ = bins_mismatch(bins, data_dir / "bins.json")
        if differ:
            log(f"warning: {data_dir / 'bins.json'} has other bin edges for {differ} than the checkpoint; "
                "the run keeps the checkpoint's, so reward values keep their meaning")
    else:
        try:
            bins = rewards.RewardBins.fit(scores, num_bins=args.num_bins, method=args.binning, seed=args.data_seed)
        except ValueError as e:
            raise ValueError(f"cannot fit the reward bins: {e}") from None
    return bins.values(scores), bins


def resume_config(ckpt, wanted, preset):
    """The model config of a checkpoint to resume, checked against `wanted` (what --preset and --rewards ask
    for); ValueError says what differs and which preset would match (vocab_size is exempt: the tokenizer sets it)."""
    try:
        cfg = ModelConfig(**ckpt["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"the checkpoint's model config is not valid here: {e}") from None
    if cfg.reward_names != wanted.reward_names:
        raise ValueError(f"the checkpoint conditions on {list(cfg.reward_names)}, not {list(wanted.reward_names)}")
    if cfg.reward_names and not ckpt["bins"]:
        raise ValueError("the checkpoint has no reward bins")
    diff = [f"{f.name} {getattr(cfg, f.name)} (--preset {preset}: {getattr(wanted, f.name)})"
            for f in dataclasses.fields(cfg)
            if f.name != "vocab_size" and getattr(cfg, f.name) != getattr(wanted, f.name)]
    if diff:
        same = [n for n in PRESETS if dataclasses.replace(get_config(n, reward_names=cfg.reward_names),
                                                          vocab_size=cfg.vocab_size) == cfg]
        hint = f"; resume with --preset {same[0]}" if same else ""
        raise ValueError(f"the checkpoint is another model: {', '.join(diff[:3])}{', ...' * (len(diff) > 3)}{hint}")
    return cfg


def bins_mismatch(bins, path):
    """Rewards whose edges in `path` (a data folder's bins.json) differ from `bins` (all of them if the file is
    unreadable); [] when the file is absent or agrees."""
    if not Path(path).exists():
        return []
    try:
        edges = rewards.RewardBins.load(path).to_dict()["edges"]
    except (OSError, ValueError, KeyError):
        return list(bins.names)
    return [n for n in bins.names if edges.get(n) != bins.to_dict()["edges"][n]]


@contextlib.contextmanager
def stop_requests():
    """SIGTERM (a scheduler's preemption; torchrun forwards it to every rank) and SIGINT (Ctrl-C) during training ask
    the loop to stop after the current step, checkpoint and exit, instead of losing the steps since the last
    checkpoint; a second SIGINT interrupts at once. Yields {"signal": None, or the number of the first signal}."""
    request = {"signal": None}
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield request
        return

    def handle(signum, frame):
        if request["signal"] is not None and signum == signal.SIGINT:  # asked twice: the user will not wait
            raise KeyboardInterrupt
        request["signal"] = request["signal"] or signum
    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# The process group's timeout. Rank 0 alone builds and annotates the built-in world (waiting for another run's
# annotation lock, if any) and the others wait at a barrier, and a cold node may first download the frozen
# encoders: minutes that the defaults (10 min on NCCL) would turn into a dead job.
SETUP_TIMEOUT = timedelta(hours=1)


def main(argv=None):
    parser, args, tc = parse_args(argv)
    wall_start = time.time()

    # --- distributed setup: one process per device; a plain process when not launched by torchrun ---
    try:
        rank, world_size, device = data.init_distributed(args.device, timeout=SETUP_TIMEOUT)
    except ValueError as e:
        parser.error(str(e))
    distributed = "RANK" in os.environ
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        # The cores shared among this machine's ranks, unless OMP_NUM_THREADS says otherwise (oversubscribed cores
        # make a CPU run several times slower).
        shared = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        threads = os.environ.get("OMP_NUM_THREADS") or shared
        torch.set_num_threads(max(1, int(threads)))

    # --- run folder and resume ---
    resume_ckpt = None
    if args.resume:
        resume_path = Path(args.resume)
        resume_path = resume_path / "ckpt.pt" if resume_path.is_dir() else resume_path
        try:
            resume_ckpt = load_checkpoint(resume_path)
            tc = resumed_settings(resume_ckpt, args)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            parser.error(f"--resume {resume_path}: {e}")
        run_dir = resume_path.parent
        elsewhere = Path(args.runs_dir or run_dir.parent) / (args.name or run_dir.name)
        if elsewhere.resolve() != run_dir.resolve():
            parser.error(f"--resume {resume_path}: the run continues in its own folder {run_dir}, not in {elsewhere} "
                         f"(--runs-dir / --name)")
        if resume_ckpt["step"] > tc.steps:
            parser.error(f"--resume {resume_path}: the run is at step {resume_ckpt['step']}, past --steps "
                         f"{tc.steps}; give a larger --steps to train on")
        latest = run_dir / "ckpt.pt"
        if latest.exists() and not latest.samefile(resume_path):  # a kept copy: its run would overwrite ckpt.pt
            try:
                latest_step = torch.load(latest, map_location="cpu", weights_only=True, mmap=True)["step"]
            except Exception:  # torn or foreign: nothing worth keeping
                latest_step = -1
            if latest_step > resume_ckpt["step"]:
                parser.error(f"--resume {resume_path}: {latest} holds the run at step {latest_step}, which this "
                             f"resume from step {resume_ckpt['step']} would overwrite; to roll the run back, move "
                             f"{latest.name} aside first")
    else:
        run_dir = Path(args.runs_dir or "runs") / args.name
        if (run_dir / "ckpt.pt").exists():  # before the slow parts: kernels, frozen encoders
            parser.error(f"{run_dir} already holds a run: continue it with --resume {run_dir}, or give another --name")
    micro_batches = world_size * tc.grad_accum
    if tc.batch_size % micro_batches:
        parser.error(f"--batch-size {tc.batch_size} must be divisible by world size x grad accum = {micro_batches}")
    micro_batch = tc.batch_size // micro_batches
    use_bf16 = uses_bf16(args.precision, device)
    kernels.set_impl(args.kernels)
    try:
        kernels_used = kernels.describe(device)  # builds the CUDA kernels once per machine (others wait)
    except (ValueError, RuntimeError) as e:
        parser.error(f"--kernels {args.kernels}: {e}")
    if resume_ckpt is not None and not args.frozen:  # --resume alone: the run's own frozen parts
        args.frozen = resume_ckpt.get("frozen", {})
    if resume_ckpt is not None and resume_ckpt.get("frozen", {}) != args.frozen:
        parser.error(f"--resume {resume_path}: the run was trained with frozen parts {resume_ckpt.get('frozen', {})}, "
                     f"not {args.frozen} (--text-encoder / --vae and their options)")
    try:  # the frozen text encoder and VAE (None: the built-in word embedding, pixel space)
        text_encoder, vae = load_frozen(args.frozen, device)
    except (OSError, ValueError, RuntimeError) as e:
        parser.error(f"cannot load the frozen text encoder / VAE {args.frozen}: {' '.join(str(e).split())[:300]}")
    model_cfg = adapt_config(get_config(args.preset, reward_names=args.reward_names), text_encoder, vae)
    pixel_size = model_cfg.image_size * (vae.factor if vae is not None else 1)  # the data's image side
    if resume_ckpt is not None:
        try:
            model_cfg = resume_config(resume_ckpt, model_cfg, args.preset)
        except ValueError as e:
            parser.error(f"--resume {resume_path}: {e}")
    try:
        if rank == 0:
            (run_dir / "samples").mkdir(parents=True, exist_ok=True)
            # One writer per run folder: held until this process exits (a kill releases it, so nothing goes stale).
            run_lock = open(run_dir / ".train.lock", "a")
            try:
                fcntl.flock(run_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                parser.error(f"another process is training {run_dir} (it holds {run_dir / '.train.lock'})")
        log = Logger(run_dir / "log.txt", rank)
    except OSError as e:
        parser.error(f"cannot write the run folder {run_dir}: {e}")

    # --- model ---
    try:
        if args.data is None:
            world, data_dir, samples = prepare_builtin_data(args, pixel_size, rank)
        else:  # the world config stays in config.json / the checkpoint; nothing is built
            world, data_dir = data.WorldConfig(image_size=pixel_size), args.data
    except (OSError, ValueError) as e:
        parser.error(f"cannot prepare the data: {e}")
    tokenizer = WordTokenizer(data.vocabulary(), model_cfg.max_text_len)  # kept in checkpoints either way
    if text_encoder is None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=len(tokenizer))
    try:
        inputs = ModelInputs(tokenizer, text_encoder, vae, args.seed, args.text_cache, args.latent_cache,
                             pixel_size, args.min_image_size, data.dataset_identity(data_dir))
    except (OSError, ValueError) as e:
        parser.error(str(e))
    torch.manual_seed(args.seed)
    model = MIRO(model_cfg).to(device)
    ema = MIRO(model_cfg).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    log(f"model: preset {args.preset}, {count_parameters(model) / 1e6:.2f}M parameters, "
        f"rewards {list(model_cfg.reward_names) or 'none (baseline)'}")

    # --- data: reward scores -> bin values in [0, 1] ---
    reward_values, bins = None, None
    if model_cfg.reward_names and args.data is None:
        try:
            reward_values, bins = builtin_rewards(args, data_dir, samples, model_cfg.reward_names,
                                                  resume_ckpt["bins"] if resume_ckpt is not None else None, log)
        except ValueError as e:
            parser.error(str(e))
    if args.data is None:
        dataset = data.MiroDataset(samples, reward_values)
        if len(dataset) < tc.batch_size:
            parser.error(f"the dataset has {len(dataset)} samples, fewer than one global batch ({tc.batch_size})")
        # One sampler batch is this rank's share of a global batch: ShardedSampler deals each global batch
        # round-robin, so this rank holds positions rank, rank + world_size, ... (`mine` below); micro-steps split it.
        sampler = data.ShardedSampler(len(dataset), micro_batch * tc.grad_accum, rank=rank, world_size=world_size,
                                      seed=args.seed)
        steps_per_epoch = len(sampler)
        data_summary = f"{len(dataset)} samples ({steps_per_epoch} steps/epoch)"
    else:  # a stream: this rank's share of each epoch, decoded by --data-workers processes
        try:
            dataset, bins = prepare_real_data(args, pixel_size, rank, world_size, model_cfg.reward_names,
                                              resume_ckpt["bins"] if resume_ckpt is not None else None)
        except (OSError, ValueError) as e:
            parser.error(f"--data: {e}")
        plain = dataset.rewards.plain_for[data.SYNTHETIC] if dataset.rewards is not None and args.synthetic_caption_prob \
            else []
        if plain:
            log(f"synthetic captions: no '@{data.SYNTHETIC}' scores for {plain}, so their scores on the real caption "
                f"are used (right for image-only rewards)")
        data_summary = f"{dataset.source.format} data {args.data} (streamed, {args.data_workers} workers per rank)"

    # --- optimisation ---
    optimizer = make_optimizer(model, tc.lr, tc.weight_decay, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tc.warmup, tc.steps))
    start_step, nan_skipped = 0, 0
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        ema.load_state_dict(resume_ckpt["ema"])
        load_optimizer_state(optimizer, resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        start_step, nan_skipped = resume_ckpt["step"], resume_ckpt.get("nan_skipped", 0)
        # The optimizer holds the learning rate of the old --steps; a longer run's cosine spans the new total from
        # its first step on (the same value when --steps is unchanged: resumed runs stay bit-identical).
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * lr_factor(start_step, tc.warmup, tc.steps)
        if tc.steps != resume_ckpt["train"]["steps"]:
            log(f"--steps {resume_ckpt['train']['steps']} -> {tc.steps}: the cosine schedule now spans {tc.steps} "
                f"steps, so the learning rate at step {start_step} is {optimizer.param_groups[0]['lr']:.3g}")
        if distributed:  # a stale copy of the checkpoint on one node would silently train a different model
            steps = [None] * world_size
            dist.all_gather_object(steps, start_step)
            if len(set(steps)) > 1:
                raise SystemExit(f"--resume: the ranks loaded checkpoints of different steps {steps}")
        log(f"resumed {run_dir} at step {start_step} on all {world_size} rank(s)"
            + (" (already at --steps: nothing to train)" if start_step == tc.steps else ""))
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if distributed else model
    train_model = torch.compile(train_model) if args.compile else train_model  # checkpoints keep the bare model

    meta = {"train": dataclasses.asdict(tc), "model": dataclasses.asdict(model_cfg), "world": dataclasses.asdict(world),
            "data_dir": str(data_dir), "world_size": world_size, "args": vars(args)}
    if rank == 0:
        data._atomic_write(run_dir / "config.json", lambda f: f.write(json.dumps(meta, indent=2, default=str).encode()))
    heldout = [m["prompt"] for m in data.heldout_prompts(world)]
    preview_prompts = heldout[:: max(1, len(heldout) // 8)][:8]  # 8 held-out prompts spread over the tasks

    def checkpoint(step):
        """Everything needed to resume exactly, and to sample: written by rank 0 (each file atomically)."""
        if rank != 0:
            return
        state = {"config": dataclasses.asdict(model_cfg), "tokenizer": tokenizer.state_dict(),
                 "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "step": step, "nan_skipped": nan_skipped,
                 "bins": bins.to_dict() if bins else None, "sampling": {"cfg": tc.cfg},
                 "world": dataclasses.asdict(world), "train": dataclasses.asdict(tc), "frozen": args.frozen,
                 "run": {name: getattr(args, name) for name in (*NEW_RUN, *RUN_PATHS)}}
        # The kept copy first: a kill between the two writes then leaves ckpt.pt one save behind, and the resumed
        # run redoes this step and writes both (the other order would resume past a kept copy never written).
        if tc.keep_every and step % tc.keep_every == 0:
            save_checkpoint(kept_checkpoint(run_dir, step), state)
        save_checkpoint(run_dir / "ckpt.pt", state)

    def preview(step):
        if rank != 0 or not tc.sample_every:
            return
        ema.eval()
        n = len(preview_prompts)
        ones = torch.ones(n, len(model_cfg.reward_names))
        images = generate(ema, text_encoder or tokenizer, preview_prompts, ones, torch.zeros_like(ones), cfg=tc.cfg,
                          steps=50, seed=0, device=device, vae=vae, bf16=use_bf16)
        save_grid(images, run_dir / "samples" / f"step_{step:07d}.png", ncols=n)

    # --- the loop ---
    if tc.warmup >= tc.steps:
        log(f"warning: --warmup {tc.warmup} >= --steps {tc.steps}: the learning rate never reaches its peak")
    log(f"training {tc.steps} steps, global batch {tc.batch_size} = {world_size} ranks x {tc.grad_accum} accum x "
        f"{micro_batch}, {data_summary}, device {device}, bf16 {use_bf16}")
    log(f"kernels: {kernels_used}; compile {args.compile}; {model.flops_per_image() / 1e9:.3g} GFLOP per image forward "
        f"(text of {model_cfg.max_text_len} tokens)")
    peak, flops_per_image = peak_flops(device), functools.lru_cache(model.flops_per_image)  # by text length
    train_start, last_log, loss_sum, loss_count, forward_flops = time.time(), time.time(), 0.0, 0, 0.0
    step, nan_streak, last_log_step = start_step, 0, start_step
    if args.data is None:
        batches = endless_batches(dataset, sampler, step)
    else:
        batches = data.stream_batches(dataset, micro_batch * tc.grad_accum, args.data_workers, resume=step)
        try:
            first = next(batches)
        except ValueError as e:  # not one usable batch: no captions, unreadable or too small images, ...
            parser.error(f"--data {args.data}: {e}")
        preview_prompts, batches = first[1][:8], itertools.chain([first], batches)  # the first training captions
        words = [w for caption in first[1] for w in tokenizer.split(caption)] if text_encoder is None else []
        unknown = sum(w not in tokenizer.index for w in words) / max(1, len(words))
        if unknown > 0.2:  # real captions read by the built-in tokenizer, which knows the shapes world's words only
            log(f"warning: {unknown:.0%} of the first batch's caption words are not among the built-in tokenizer's "
                f"{len(tokenizer.words)} words (read as <unk>, e.g. {', '.join(tokenizer.unknown(first[1])[:5])}); "
                f"real captions need --text-encoder t5 or clip")
    model_shape = (model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size)  # pixels or latents
    mine = torch.arange(tc.batch_size)[rank::world_size]  # this rank's positions in the global batch

    def prepare(step):
        """Step `step`'s micro-batches (x0, t, noise, condition), on the host (pinned on CUDA, for asynchronous
        copies) or, made by a frozen encoder, on the device. On a GPU it runs a step ahead (step_ahead), so it reads
        only the data, `step` and the frozen encoders, never the model."""
        images, captions, reward_batch, sources = next(batches)
        t, noise, keep_text, drop_rewards = (x[mine] for x in step_draws(
            args.seed, step, tc.batch_size, model_shape, len(model_cfg.reward_names), tc))
        images = inputs.images(images, sources)
        micro_batches = []
        for micro in range(tc.grad_accum):
            part = slice(micro * micro_batch, (micro + 1) * micro_batch)
            text, mask = inputs.text(captions[part], sources[part], keep_text[part])
            condition = {"text": text, "text_mask": mask}
            if model_cfg.reward_names:
                condition["rewards"] = reward_batch[part]
                if tc.reward_dropout > 0:
                    condition["drop_rewards"] = drop_rewards[part]
            micro_batches.append((images[part], t[part], noise[part], condition))
        if device.type != "cuda":
            return micro_batches
        return [map_batch(lambda x: x.pin_memory() if x.device.type == "cpu" else x, batch) for batch in micro_batches]

    model.train()
    encoders_on_the_fly = (text_encoder is not None and inputs.text_cache is None) or \
        (vae is not None and inputs.latent_cache is None)
    with stop_requests() as stop, step_ahead(device, host_only=not encoders_on_the_fly) as ahead:
        next_step = ahead.submit(prepare, step) if step < tc.steps else None
        while step < tc.steps:
            micro_batches = next_step.result()  # re-raises whatever stopped the preparation
            if step + 1 < tc.steps:
                next_step = ahead.submit(prepare, step + 1)
            step_loss = torch.zeros((), device=device)
            for micro, batch in enumerate(micro_batches):
                # from pinned host memory the copies are queued on the stream without blocking the host
                x0, t, noise, condition = map_batch(lambda x: x.to(device, non_blocking=True), batch)
                forward_flops += flops_per_image(condition["text"].shape[1]) * micro_batch  # trimmed captions: less
                sync = not distributed or micro == tc.grad_accum - 1
                with train_model.no_sync() if not sync else contextlib.nullcontext():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        loss = flow_matching_loss(train_model, x0, t, noise, **condition)
                    (loss / tc.grad_accum).backward()
                step_loss += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            finite = torch.isfinite(torch.stack([step_loss, grad_norm])).all()
            flags = torch.stack([finite, torch.tensor(stop["signal"] is None, device=device)]).float()
            if distributed:  # one rank's NaN (or stop request) is every rank's: they decide together
                dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            finite, go_on = flags.tolist()
            step += 1
            if finite:
                optimizer.step()
                update_ema(ema, model, ema_decay(tc.ema_decay, step))
                nan_streak, loss_sum, loss_count = 0, loss_sum + step_loss.item(), loss_count + tc.grad_accum
            else:  # the step keeps its number, batch and learning rate, but model, optimizer and EMA stay unchanged
                nan_streak, nan_skipped = nan_streak + 1, nan_skipped + 1
                what = f"non-finite loss {step_loss.item() / tc.grad_accum:.4g} / grad norm {grad_norm.item():.4g}"
                if tc.on_nan == "stop" or nan_streak > tc.max_nan_skips:
                    why = "--on-nan stop" if tc.on_nan == "stop" else f"{nan_streak} non-finite steps in a row"
                    log(f"error: {what} at step {step}; stopping ({why}), the last checkpoint is kept")
                    sys.exit(1)
                log(f"step {step}: {what}; skipped ({nan_streak} in a row, {nan_skipped} in all)")
            optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]["lr"]  # this step's (logged below)
            scheduler.step()

            if step % tc.log_every == 0 or step == tc.steps:
                now = time.time()
                mean_loss = torch.tensor(loss_sum / loss_count if loss_count else float("nan"), device=device)
                if distributed:
                    dist.all_reduce(mean_loss)  # the logged loss is the mean over ranks
                    mean_loss /= world_size
                images_per_s = (step - last_log_step) * tc.batch_size / (now - last_log)
                rank_images = (step - last_log_step) * micro_batch * tc.grad_accum
                mfu = (f"  MFU {mfu_percent(forward_flops / rank_images, images_per_s / world_size, peak):.1f}%"
                       if peak else "")
                log(f"step {step:7d}/{tc.steps}  loss {mean_loss.item():.4f}  grad {grad_norm.item():.3f}  "
                    f"lr {lr:.2e}  {images_per_s:.0f} img/s{mfu}")
                last_log, last_log_step, loss_sum, loss_count, forward_flops = now, step, 0.0, 0, 0.0
            if tc.sample_every and step % tc.sample_every == 0:
                preview(step)
            if step % tc.ckpt_every == 0 or step == tc.steps or (tc.keep_every and step % tc.keep_every == 0) \
                    or not go_on:
                checkpoint(step)
            if not go_on and step < tc.steps:
                name = signal.Signals(stop["signal"]).name if stop["signal"] else "another rank's signal"
                log(f"stopped by {name} after step {step}: checkpoint {run_dir / 'ckpt.pt'} written; continue with "
                    f"--resume {run_dir}")
                if distributed:
                    dist.barrier()  # rank 0's checkpoint is written before any rank exits
                    dist.destroy_process_group()
                sys.exit(128 + (stop["signal"] or signal.SIGTERM))

    if not (tc.sample_every and step % tc.sample_every == 0):  # the last step's preview, unless just made
        preview(step)
    log(f"done: {step} steps ({nan_skipped} skipped as non-finite) in {(time.time() - train_start) / 60:.1f} min "
        f"of training, {(time.time() - wall_start) / 60:.1f} min wall time in all; checkpoint {run_dir / 'ckpt.pt'}")
    if distributed:
        dist.barrier()  # every rank leaves together, after rank 0's last checkpoint (a rank that exits early can abort)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
