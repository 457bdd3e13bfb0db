"""Train MIRO (or the same network without rewards, the baseline) with flow matching.

Launch:
    python train.py                                   # single process: the built-in shapes world on a CPU
    python train.py --no-rewards                      # the baseline: same network, no reward tokens, text CFG
    torchrun --standalone --nproc_per_node=8 train.py --preset paper ...             # one node, 8 GPUs
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
             --rdzv_id=miro train.py --preset paper ...                              # several nodes
    python train.py --resume runs/miro                # continue a run where its last checkpoint left it

Conventions: x_t = (1 - t) x0 + t eps with t = 0 data and t = 1 noise; the network predicts v = eps - x0 and the
loss is the MSE to it. Reward conditioning values are in [0, 1] (bin k of B is k / (B - 1)). Samples come from the
EMA weights. The global batch is split evenly over ranks (and gradient-accumulation micro-steps).

A run folder holds config.json (every setting), log.txt, samples/step_*.png and ckpt.pt (model, EMA, optimizer,
scheduler, step, RNG state, bin edges, tokenizer), written atomically by rank 0 alone.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import rewards
from model import MIRO, PRESETS, WordTokenizer, count_parameters, get_config, load_checkpoint, save_checkpoint
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


TRAIN_PRESETS = {
    "tiny": TrainConfig(steps=20, batch_size=8, warmup=5, log_every=5, sample_every=0, ckpt_every=10),
    "cpu": TrainConfig(),
    "paper": TrainConfig(steps=500_000, batch_size=1024, lr=1e-3, warmup=5000, ema_decay=0.9999,
                         log_every=100, sample_every=10_000, ckpt_every=5000, cfg=7.0),
}


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


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers are copied)."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def ema_decay(decay, step):
    """The EMA decay after `step` updates, warmed up as (1 + step) / (10 + step) so that short runs are not
    dominated by the initial (all-zero-output) weights."""
    return min(decay, (1 + step) / (10 + step))


def lr_factor(step, warmup, total):
    """Linear warm-up to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------------------------
# Command line.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " See the module docstring for launch lines.")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="model + optimisation preset")
    p.add_argument("--name", default=None, help="run name under --runs-dir (default: miro, or baseline)")
    p.add_argument("--runs-dir", default="runs", help="folder holding the run folders")
    p.add_argument("--resume", default=None, help="run folder (or ckpt.pt) to continue")
    p.add_argument("--no-rewards", action="store_true", help="train the baseline: same network, no reward tokens")
    p.add_argument("--rewards", default=",".join(rewards.BUILTIN_REWARDS),
                   help="comma-separated rewards to condition on (default: every built-in reward)")
    p.add_argument("--data-dir", default=None,
                   help="built-in dataset folder (default: runs/_data/shapes<size>_n<N>_seed<S>; built if missing)")
    p.add_argument("--num-train", type=int, default=20000, help="size of the built-in training set")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the built-in world")
    p.add_argument("--num-bins", type=int, default=64, help="reward bins B (value k/(B-1))")
    p.add_argument("--binning", default="quantile", choices=["quantile", "uniform"], help="bin edges")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, noise and data order")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device type")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off on CPU)")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        p.add_argument(flag, type=field.type, default=None,
                       help=f"override the preset's {field.name} (cpu preset: {getattr(TRAIN_PRESETS['cpu'], field.name)})")
    args = p.parse_args(argv)
    train_cfg = dataclasses.replace(TRAIN_PRESETS[args.preset],
                                    **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                                       if getattr(args, f.name) is not None})
    checks = [(train_cfg.steps > 0, "--steps must be > 0"), (train_cfg.batch_size > 0, "--batch-size must be > 0"),
              (train_cfg.grad_accum > 0, "--grad-accum must be > 0"), (train_cfg.lr > 0, "--lr must be > 0"),
              (0 <= train_cfg.ema_decay < 1, "--ema-decay must be in [0, 1)"),
              (0 <= train_cfg.text_dropout < 1, "--text-dropout must be in [0, 1)"),
              (0 <= train_cfg.reward_dropout < 1, "--reward-dropout must be in [0, 1)"),
              (train_cfg.cfg >= 0, "--cfg must be >= 0"), (args.num_bins >= 2, "--num-bins must be >= 2"),
              (args.num_train > 0, "--num-train must be > 0"),
              (train_cfg.time_sampling in ("logit_normal", "uniform"), "--time-sampling: logit_normal or uniform")]
    for ok, message in checks:
        if not ok:
            p.error(message)
    args.reward_names = () if args.no_rewards else tuple(r for r in args.rewards.split(",") if r)
    unknown = [r for r in args.reward_names if r not in rewards.BUILTIN_REWARDS]
    if unknown:
        p.error(f"unknown reward(s) {', '.join(unknown)}; the built-in data has: {', '.join(rewards.BUILTIN_REWARDS)}")
    if not args.no_rewards and not args.reward_names:
        p.error("--rewards is empty; use --no-rewards for the baseline")
    if args.no_rewards and train_cfg.text_dropout == 0 and args.text_dropout is None:
        train_cfg.text_dropout = 0.1  # the baseline guides with an empty prompt, so it must see some
    args.name = args.name or ("baseline" if args.no_rewards else "miro")
    return p, args, train_cfg


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


def endless_batches(dataset, sampler, micro_steps_done):
    """This rank's batches from the data position that `micro_steps_done` micro-batches reach, epoch after epoch
    (each pass over the sampler continues with the next epoch), so a resumed run sees the same data."""
    sampler.set_position(*divmod(micro_steps_done, len(sampler)))
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


def main(argv=None):
    parser, args, tc = parse_args(argv)
    wall_start = time.time()

    # --- distributed setup: one process per device; a plain process when not launched by torchrun ---
    distributed = "RANK" in os.environ
    if distributed:
        backend = "nccl" if args.device == "cuda" else "gloo"
        dist.init_process_group(backend)
        rank, world_size, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    else:
        rank, world_size, local_rank = 0, 1, 0
    device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    micro_batches = world_size * tc.grad_accum
    if tc.batch_size % micro_batches:
        parser.error(f"--batch-size {tc.batch_size} must be divisible by world size x grad accum = {micro_batches}")
    micro_batch = tc.batch_size // micro_batches
    use_bf16 = args.bf16 if args.bf16 is not None else device.type == "cuda"

    # --- run folder and resume ---
    resume_ckpt = None
    if args.resume:
        resume_path = Path(args.resume)
        resume_path = resume_path / "ckpt.pt" if resume_path.is_dir() else resume_path
        try:
            resume_ckpt = load_checkpoint(resume_path)
        except (OSError, ValueError, RuntimeError) as e:
            parser.error(str(e))
        run_dir = resume_path.parent
    else:
        run_dir = Path(args.runs_dir) / args.name
    if rank == 0:
        try:
            (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            parser.error(f"cannot create run folder {run_dir}: {e}")
    log = Logger(run_dir / "log.txt", rank)

    # --- model ---
    model_cfg = get_config(args.preset, reward_names=args.reward_names)
    if resume_ckpt is not None:
        model_cfg = type(model_cfg)(**resume_ckpt["config"])
        if tuple(model_cfg.reward_names) != args.reward_names:
            parser.error(f"--resume: the checkpoint conditions on {list(model_cfg.reward_names)}, "
                         f"not {list(args.reward_names)}")
    world, data_dir, samples = prepare_builtin_data(args, model_cfg.image_size, rank)
    tokenizer = WordTokenizer(data.vocabulary(), model_cfg.max_text_len)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=len(tokenizer.words) + 2)
    torch.manual_seed(args.seed)
    model = MIRO(model_cfg).to(device)
    ema = MIRO(model_cfg).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    log(f"model: preset {args.preset}, {count_parameters(model) / 1e6:.2f}M parameters, "
        f"rewards {list(model_cfg.reward_names) or 'none (baseline)'}")

    # --- data: reward scores -> bin values in [0, 1] ---
    reward_values, bins = None, None
    if model_cfg.reward_names:
        annotations = rewards.load_annotations(data_dir / "annotations.jsonl")
        scores = {name: [annotations.get(key, {}).get(name, float("nan")) for key in samples.keys]
                  for name in model_cfg.reward_names}  # a missing score is NaN, which the binner maps to 0
        if resume_ckpt is not None:  # the run keeps its bin edges, so sampling targets keep their meaning
            bins = rewards.RewardBins.from_dict(resume_ckpt["bins"])
        else:
            bins = rewards.RewardBins.fit(scores, num_bins=args.num_bins, method=args.binning, seed=args.data_seed)
        reward_values = bins.values(scores)
    dataset = data.MiroDataset(samples, reward_values)
    sampler = data.ShardedSampler(len(dataset), micro_batch, rank=rank, world_size=world_size, seed=args.seed)
    steps_per_epoch = len(sampler) // tc.grad_accum

    # --- optimisation ---
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tc.warmup, tc.steps))
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)  # noise, timesteps and dropout
    start_step = 0
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        ema.load_state_dict(resume_ckpt["ema"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        generator.set_state(resume_ckpt["rng"][rank] if rank < len(resume_ckpt["rng"]) else resume_ckpt["rng"][0])
        start_step = resume_ckpt["step"]
        log(f"resumed {run_dir} at step {start_step}")
    train_model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None) if distributed else model

    meta = {"train": dataclasses.asdict(tc), "model": dataclasses.asdict(model_cfg), "world": dataclasses.asdict(world),
            "data_dir": str(data_dir), "world_size": world_size, "args": vars(args)}
    if rank == 0:
        (run_dir / "config.json").write_text(json.dumps(meta, indent=2, default=str))
    heldout = [m["prompt"] for m in data.heldout_prompts(world)]
    preview_prompts = heldout[:: max(1, len(heldout) // 8)][:8]  # 8 held-out prompts spread over the tasks

    def checkpoint(step):
        """Everything needed to resume exactly, and to sample: written by rank 0 after gathering RNG states."""
        rng = [generator.get_state()]
        if distributed:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, generator.get_state())
            rng = gathered
        if rank == 0:
            save_checkpoint(run_dir / "ckpt.pt", {
                "config": dataclasses.asdict(model_cfg), "tokenizer": tokenizer.state_dict(),
                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "rng": rng,
                "bins": bins.to_dict() if bins else None, "sampling": {"cfg": tc.cfg},
                "world": dataclasses.asdict(world), "train": dataclasses.asdict(tc)})
            if tc.keep_every and step % tc.keep_every == 0:
                shutil.copyfile(run_dir / "ckpt.pt", run_dir / f"ckpt_{step:07d}.pt")

    def preview(step):
        if rank != 0 or not tc.sample_every:
            return
        ema.eval()
        n = len(preview_prompts)
        ones = torch.ones(n, len(model_cfg.reward_names))
        images = generate(ema, tokenizer, preview_prompts, ones, torch.zeros_like(ones), cfg=tc.cfg,
                          steps=50, seed=0, device=device)
        save_grid(images, run_dir / "samples" / f"step_{step:07d}.png", ncols=n)

    # --- the loop ---
    log(f"training {tc.steps} steps, global batch {tc.batch_size} = {world_size} ranks x {tc.grad_accum} accum x "
        f"{micro_batch}, {len(dataset)} samples ({steps_per_epoch} steps/epoch), device {device}, bf16 {use_bf16}")
    train_start, last_log, loss_sum, loss_count = time.time(), time.time(), 0.0, 0
    step = start_step
    batches = endless_batches(dataset, sampler, step * tc.grad_accum)
    model.train()
    while step < tc.steps:
        for micro in range(tc.grad_accum):
            images, captions, reward_batch = next(batches)
            n = images.shape[0]
            if tc.text_dropout > 0:
                keep = torch.rand(n, generator=generator) >= tc.text_dropout
                captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
            ids, mask = tokenizer(captions)
            condition = {"text": ids.to(device), "text_mask": mask.to(device)}
            if model_cfg.reward_names:
                condition["rewards"] = reward_batch.to(device)
                if tc.reward_dropout > 0:
                    drop = torch.rand(reward_batch.shape, generator=generator) < tc.reward_dropout
                    condition["drop_rewards"] = drop.to(device)
            t = sample_timesteps(n, tc.time_sampling, generator)
            noise = torch.randn(images.shape, generator=generator)
            sync = not distributed or micro == tc.grad_accum - 1
            with train_model.no_sync() if not sync else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = flow_matching_loss(train_model, images.to(device), t.to(device), noise.to(device),
                                              **condition)
                (loss / tc.grad_accum).backward()
            if not torch.isfinite(loss):
                log(f"non-finite loss {loss.item()} at step {step}; stopping, the last checkpoint is kept")
                sys.exit(1)
            loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        update_ema(ema, model, ema_decay(tc.ema_decay, step))

        if step % tc.log_every == 0 or step == tc.steps:
            now = time.time()
            mean_loss = torch.tensor(loss_sum / loss_count, device=device)
            if distributed:
                dist.all_reduce(mean_loss)  # the logged loss is the mean over ranks
                mean_loss /= world_size
            log(f"step {step:7d}/{tc.steps}  loss {mean_loss.item():.4f}  grad {grad_norm.item():.3f}  "
                f"lr {scheduler.get_last_lr()[0]:.2e}  {tc.log_every * tc.batch_size / (now - last_log):.0f} img/s")
            last_log, loss_sum, loss_count = now, 0.0, 0
        if tc.sample_every and step % tc.sample_every == 0:
            preview(step)
        if step % tc.ckpt_every == 0 or step == tc.steps or (tc.keep_every and step % tc.keep_every == 0):
            checkpoint(step)

    preview(step)
    log(f"done: {step} steps in {(time.time() - train_start) / 60:.1f} min of training, "
        f"{(time.time() - wall_start) / 60:.1f} min wall time in all; checkpoint {run_dir / 'ckpt.pt'}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
