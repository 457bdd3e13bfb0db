"""Sample images from a MIRO checkpoint with multi-reward classifier-free guidance.

    python sample.py --prompt "a photo of two red circles" --rewards alignment=1
    python sample.py --prompts-file prompts.txt --cfg 3 --n 8 --seed 0
    python sample.py --prompt "a photo of a green square" --rewards sharpness=0 --best-of 4 --select-by alignment

Conventions (shared by the whole repo):
- t = 0 is data, t = 1 is noise, the network predicts v = eps - x0, so sampling integrates dx/dt = v from t = 1
  down to t = 0 with explicit Euler steps.
- Guidance: v = (1 + w) * v(x_t, c, s_pos) - w * v(x_t, c_neg, s_neg); w = 0 switches it off. s_pos defaults to all
  ones (the top bin of every reward) and s_neg to all zeros (the bottom bin), not to a null embedding. A model
  trained without rewards (the baseline) guides with an empty negative prompt instead (ordinary text CFG).
- Reward targets live in [0, 1]: bin k of B is k / (B - 1).
- Noise comes from a seeded CPU generator, so the same seed gives the same images on any device.
"""
import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data import seed_arg
from model import WordTokenizer, load_checkpoint, load_frozen, model_from_checkpoint, trim_padding, uses_bf16


# ----------------------------------------------------------------------------------------------------------------
# The sampler: guidance formula and Euler integration.

def cfg_combine(v_pos, v_neg, w):
    """The guidance formula, applied to every channel: (1 + w) v_pos - w v_neg."""
    return (1 + w) * v_pos - w * v_neg


def euler_sample(velocity, noise, steps=50):
    """Integrate dx/dt = velocity(x, t) from t = 1 (noise) to t = 0 (data) with `steps` Euler steps."""
    timesteps = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    x = noise
    for t_cur, t_next in zip(timesteps[:-1], timesteps[1:]):
        t = torch.full((x.shape[0],), t_cur, device=x.device, dtype=x.dtype)
        x = x + (t_next - t_cur) * velocity(x, t)
    return x


@torch.no_grad()
def generate(model, text_encoder, prompts, rewards_pos=None, rewards_neg=None, neg_prompts=None, cfg=3.0,
             steps=50, seed=0, device="cpu", batch_size=64, seeds=None, vae=None, bf16=False):
    """Sample one image per prompt; returns float images (N, 3, H, W) in [-1, 1] on the CPU.

    text_encoder: captions -> (text, mask), the checkpoint's WordTokenizer or its frozen encoder (model.load_frozen);
    vae: the frozen VAE whose latents the model generates (None: pixel space), decoded at the end.

    rewards_pos / rewards_neg: (N, R) targets in [0, 1] (None for a baseline). neg_prompts: the captions of the
    negative branch (default: the prompts themselves for MIRO, the empty caption for a baseline). Both branches go
    through the network as one batched forward; the condition sequence is encoded once and reused at every step.
    seeds: one noise seed per image (image i then does not depend on which other images share its call: sharded
    evaluation reproduces one process); by default all noise comes from one generator seeded with `seed`.
    bf16: the network runs under bfloat16 autocast (model.uses_bf16); the guidance and the Euler steps stay float32.
    """
    cfg_model = model.cfg
    n = len(prompts)
    if neg_prompts is None:
        neg_prompts = list(prompts) if cfg_model.reward_names else [""] * n
    shape = (cfg_model.in_channels, cfg_model.image_size, cfg_model.image_size)
    if seeds is None:
        noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
    else:
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
    images = []
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        text, mask = text_encoder(list(prompts[lo:hi]) + list(neg_prompts[lo:hi]))
        if not isinstance(text_encoder, WordTokenizer):  # frozen features: cut to the batch's longest caption
            text, mask = trim_padding(text, mask)
        rewards = None
        if cfg_model.reward_names:
            rewards = torch.cat([rewards_pos[lo:hi], rewards_neg[lo:hi]]).to(device)
        with autocast:
            cond, cond_mask = model.encode_condition(text.to(device), mask.to(device), rewards)

        def velocity(x, t):
            with autocast:
                v = model.denoise(torch.cat([x, x]), torch.cat([t, t]), cond, cond_mask)
            v_pos, v_neg = v.float().chunk(2)
            return cfg_combine(v_pos, v_neg, cfg)

        x = euler_sample(velocity, noise[lo:hi].to(device), steps)
        if vae is not None:
            x = vae.decode(x)
        images.append(x.clamp(-1, 1).cpu())
    return torch.cat(images)


# ----------------------------------------------------------------------------------------------------------------
# Reward targets from the command line.

def parse_reward_targets(spec, reward_names, default, owner="this checkpoint"):
    """'name=value,...' -> a (R,) tensor of targets in [0, 1]; unnamed rewards take `default`. `owner` names
    whatever defines reward_names, for the error messages.

    Raises ValueError with a one-line message for unknown names, malformed items or values outside [0, 1].
    """
    targets, named = torch.full((len(reward_names),), float(default)), set()
    if not spec:
        return targets
    if not reward_names:
        raise ValueError(f"{owner} was trained without rewards (baseline); it takes no reward targets")
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"reward target {item!r} is not of the form name=value")
        if name not in reward_names:
            raise ValueError(f"unknown reward {name!r}; {owner} supports: {', '.join(reward_names)}")
        if name in named:
            raise ValueError(f"reward {name!r} has two targets in {spec!r}")
        named.add(name)
        try:
            target = float(value)
        except ValueError:
            raise ValueError(f"reward target {item!r}: {value!r} is not a number") from None
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"reward target {name}={value} is outside [0, 1]")
        targets[reward_names.index(name)] = target
    return targets


# ----------------------------------------------------------------------------------------------------------------
# Images on disk.

def _levels(images):
    """(N, C, H, W) in [-1, 1] -> float 8-bit levels 0..255."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round()


def to_uint8(images):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    return _levels(images).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def as_saved(images):
    """(N, C, H, W) in [-1, 1] -> the same on the 8-bit levels a PNG keeps (to_uint8 of it is exact), so what is
    judged is what is written."""
    return _levels(images) / 127.5 - 1


def save_grid(images, path, ncols=None, scale=4):
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid, upscaled `scale` x with nearest neighbours."""
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    pad = 1
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = pixels[i]
    image = Image.fromarray(grid)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def latest_checkpoint(runs_dir="runs"):
    """The most recently written runs/*/ckpt.pt, or None."""
    candidates = sorted(Path(runs_dir).glob("*/ckpt.pt"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def open_checkpoint(ckpt=None, ema=True, device="cpu"):
    """Resolve a checkpoint file / run folder / None (the latest run) and build its sampling model on `device`.
    Returns (ckpt_path, checkpoint dict, model, text_encoder, vae): the WordTokenizer or the frozen text encoder the
    run trained with, and its VAE or None; FileNotFoundError / ValueError say what is wrong."""
    path = Path(ckpt) if ckpt else latest_checkpoint()
    if path is None:
        raise FileNotFoundError("no checkpoint found under runs/; train one with `python train.py` or pass --ckpt")
    path = path / "ckpt.pt" if path.is_dir() else path
    try:
        checkpoint = load_checkpoint(path)
        model, tokenizer = model_from_checkpoint(checkpoint, ema=ema)
        text_encoder, vae = load_frozen(checkpoint.get("frozen"), device)
    except RuntimeError as e:
        raise ValueError(f"{path}: {e}") from None
    return path, checkpoint, model.to(device).eval(), text_encoder or tokenizer, vae


# ----------------------------------------------------------------------------------------------------------------

def best_of_n(candidates, prompts, reward):
    """Keep, per prompt, the candidate with the highest reward. candidates: (N, K, C, H, W) in [-1, 1]."""
    n, k = candidates.shape[:2]
    flat = candidates.flatten(0, 1)
    scores = reward((flat + 1) / 2, [p for p in prompts for _ in range(k)]).view(n, k)
    best = scores.argmax(dim=1)
    return candidates[torch.arange(n), best], scores.max(dim=1).values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="checkpoint file or run folder (default: the latest runs/*/ckpt.pt)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--rewards", default="", help="positive targets 'name=value,...' in [0,1]; unnamed rewards: 1")
    p.add_argument("--neg-rewards", default="", help="negative targets 'name=value,...' in [0,1]; unnamed: 0")
    p.add_argument("--neg-prompt", default=None,
                   help="caption of the negative branch (default: the prompt itself for MIRO, the empty prompt "
                        "for a baseline; '' for an empty prompt)")
    p.add_argument("--cfg", type=float, default=None, help="guidance weight w >= 0 (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=50, help="Euler steps")
    p.add_argument("--n", type=int, default=8, help="images per prompt")
    p.add_argument("--seed", type=seed_arg, default=0, help="noise seed (same seed, same images)")
    p.add_argument("--best-of", type=int, default=1, help="draw N candidates per image and keep the best")
    p.add_argument("--select-by", default=None, help="reward that picks the best candidate (with --best-of)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--out", default=None, help="output PNG grid (default: RUN/samples/<prompt>.png)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="the network in fp32 or under bf16 autocast; default bf16 on CUDA, fp32 elsewhere")
    args = p.parse_args(argv)
    if args.steps <= 0:
        p.error("--steps must be > 0")
    if args.n <= 0:
        p.error("--n must be > 0")
    if args.best_of <= 0:
        p.error("--best-of must be > 0")
    if args.cfg is not None and not (math.isfinite(args.cfg) and args.cfg >= 0):
        p.error("--cfg must be >= 0 and finite")
    if args.best_of > 1 and not args.select_by:
        p.error("--best-of needs --select-by REWARD")
    if args.select_by and args.best_of == 1:
        p.error("--select-by picks among --best-of candidates: give --best-of N with N > 1")
    if args.out and Path(args.out).suffix.lower() != ".png":
        p.error(f"--out {args.out}: the grid is a PNG, so the name must end in .png")
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not a word
            args.prompt += [line.strip() for line in text.splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            p.error(f"cannot read --prompts-file: {e}")
    if not args.prompt:
        p.error("give at least one --prompt or a --prompts-file")
    return p, args


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        ckpt_path, ckpt, model, text_encoder, vae = open_checkpoint(args.ckpt, ema=not args.no_ema,
                                                                    device=args.device)
    except (OSError, ValueError, RuntimeError) as e:
        parser.error(str(e))
    names = list(model.cfg.reward_names)
    try:
        pos = parse_reward_targets(args.rewards, names, 1.0)
        neg = parse_reward_targets(args.neg_rewards, names, 0.0)
    except ValueError as e:
        parser.error(str(e))
    reward = None
    if args.select_by:
        from rewards import load_reward
        try:
            reward = load_reward(args.select_by, device=args.device)
        except (KeyError, ValueError, OSError, RuntimeError) as e:  # unknown name, bad options, weights not found
            message = " ".join(str(e).strip("'\"").split())  # a KeyError's quotes, a download error's lines
            parser.error(f"--select-by {args.select_by}: {message[:300]}")
    cfg = args.cfg if args.cfg is not None else ckpt["sampling"]["cfg"]
    if isinstance(text_encoder, WordTokenizer) and text_encoder.unknown(args.prompt):
        print(f"warning: words this model's tokenizer does not know, read as <unk>: "
              f"{', '.join(text_encoder.unknown(args.prompt)[:20])}", flush=True)

    prompts = [p for p in args.prompt for _ in range(args.n * args.best_of)]
    neg_prompts = None if args.neg_prompt is None else [args.neg_prompt] * len(prompts)
    images = generate(model, text_encoder, prompts, pos.expand(len(prompts), -1), neg.expand(len(prompts), -1),
                      neg_prompts, cfg=cfg, steps=args.steps, seed=args.seed, device=args.device, vae=vae,
                      bf16=uses_bf16(args.precision, args.device))
    if reward is not None:
        per_image = [p for p in args.prompt for _ in range(args.n)]
        images, _ = best_of_n(images.view(len(per_image), args.best_of, *images.shape[1:]), per_image, reward)

    slug = "".join(c if c.isalnum() else "_" for c in args.prompt[0])[:60].strip("_") or "samples"
    out = Path(args.out) if args.out else ckpt_path.parent / "samples" / f"{slug}.png"
    try:
        save_grid(images, out, ncols=args.n)
        single_dir = out.with_suffix("")
        single_dir.mkdir(parents=True, exist_ok=True)
        for stale in single_dir.glob("[0-9][0-9][0-9][0-9].png"):  # an earlier, larger call's images
            stale.unlink()
        for i, pixels in enumerate(to_uint8(images)):
            Image.fromarray(pixels).save(single_dir / f"{i:04d}.png")
    except OSError as e:
        parser.error(f"cannot write {out}: {e}")
    print(f"wrote {out} ({len(images)} images, cfg={cfg}, steps={args.steps}) and single images in {single_dir}/")


if __name__ == "__main__":
    main()
