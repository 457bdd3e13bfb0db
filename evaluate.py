"""Evaluate a checkpoint on the held-out prompts of the built-in world.

    python evaluate.py --ckpt runs/miro            # reward means and GenEval-style accuracy, s_pos = 1 vs s_pos = 0
    python evaluate.py --ckpt runs/baseline        # the baseline (text CFG only)

Two different judgements, kept apart on purpose:
- reward metrics: the mean of every built-in reward (soft scores, alignment = fraction of clauses satisfied);
- GenEval's strict rule: an image is correct only if every include clause holds and no exclude clause fires; a
  task's score is the mean correctness of its images and `overall` the mean of the six task scores.
"""
import argparse
import json
import math
from pathlib import Path

import torch

import data
import rewards
from model import load_checkpoint, model_from_checkpoint
from sample import generate, latest_checkpoint, parse_reward_targets, save_grid


def geneval_scores(detections, metadatas):
    """Per-task and overall accuracy under GenEval's strict rule (every clause must hold)."""
    per_task = {}
    for found, meta in zip(detections, metadatas):
        per_task.setdefault(meta["tag"], []).append(float(all(rewards.check_clauses(meta, found))))
    scores = {task: sum(v) / len(v) for task, v in per_task.items()}
    scores["overall"] = sum(scores.values()) / len(scores)
    return scores


def heldout_images(metadatas, n_per_prompt, min_per_task):
    """One metadata entry per image to sample: n_per_prompt per prompt, more for tasks with few prompts."""
    images = []
    for task in dict.fromkeys(m["tag"] for m in metadatas):
        prompts = [m for m in metadatas if m["tag"] == task]
        repeats = max(n_per_prompt, math.ceil(min_per_task / len(prompts)))
        images += [m for m in prompts for _ in range(repeats)]
    return images


@torch.no_grad()
def evaluate_setting(model, tokenizer, prompts, pos, neg, cfg, steps, seed, device, reward_models):
    """Sample every held-out prompt with the targets (pos, neg) and score the images."""
    captions = [m["prompt"] for m in prompts]
    n = len(captions)
    images = generate(model, tokenizer, captions, pos.expand(n, -1), neg.expand(n, -1), cfg=cfg, steps=steps,
                      seed=seed, device=device)
    images01 = (images + 1) / 2
    metrics = {name: reward(images01, captions).mean().item() for name, reward in reward_models.items()}
    metrics["geneval"] = geneval_scores(rewards.detect_shapes(images01), prompts)
    return images, metrics


def format_table(rows, reward_names, tasks):
    """A markdown table: one row per setting, reward means then GenEval task accuracies and overall."""
    header = ["setting"] + list(reward_names) + [f"GenEval {t}" for t in tasks] + ["GenEval overall"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in rows.items():
        cells = [name] + [f"{m[r]:.3f}" for r in reward_names] + [f"{m['geneval'].get(t, float('nan')):.2f}"
                                                                   for t in tasks] + [f"{m['geneval']['overall']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="checkpoint or run folder (default: the latest runs/*/ckpt.pt)")
    p.add_argument("--n-per-prompt", type=int, default=4, help="images per held-out prompt (GenEval: 4)")
    p.add_argument("--min-per-task", type=int, default=16,
                   help="repeat the prompts of small tasks (the built-in single/two-object tasks hold out one "
                        "composition each) until every task has at least this many images")
    p.add_argument("--cfg", type=float, default=None, help="guidance weight (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=50, help="Euler steps")
    p.add_argument("--rewards", default="", help="positive targets 'name=value,...' for an extra setting")
    p.add_argument("--seed", type=int, default=0, help="noise seed (the same noise for every setting)")
    p.add_argument("--out", default=None, help="JSON with every number (default: RUN/eval.json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = p.parse_args(argv)
    if args.n_per_prompt <= 0 or args.steps <= 0:
        p.error("--n-per-prompt and --steps must be > 0")
    if args.cfg is not None and args.cfg < 0:
        p.error("--cfg must be >= 0")
    ckpt_path = Path(args.ckpt) if args.ckpt else latest_checkpoint()
    if ckpt_path is None:
        p.error("no checkpoint found under runs/; train one with `python train.py` or pass --ckpt")
    ckpt_path = ckpt_path / "ckpt.pt" if ckpt_path.is_dir() else ckpt_path
    try:
        ckpt = load_checkpoint(ckpt_path)
        model, tokenizer = model_from_checkpoint(ckpt, ema=True)
    except (OSError, ValueError, RuntimeError) as e:
        p.error(str(e))
    model = model.to(args.device).eval()
    names = list(model.cfg.reward_names)
    cfg = args.cfg if args.cfg is not None else ckpt["sampling"]["cfg"]

    world = data.WorldConfig(**ckpt["world"])
    prompts = heldout_images(data.heldout_prompts(world), args.n_per_prompt, args.min_per_task)
    reward_models = {name: rewards.load_reward(name, device=args.device) for name in rewards.BUILTIN_REWARDS}
    ones, zeros = torch.ones(len(names)), torch.zeros(len(names))
    if names:
        settings = {f"s_pos=1 (cfg {cfg:g})": (ones, zeros), "s_pos=0 (cfg 0)": (zeros, zeros)}
        if args.rewards:
            try:
                settings[f"s_pos={args.rewards} (cfg {cfg:g})"] = (parse_reward_targets(args.rewards, names, 1.0), zeros)
            except ValueError as e:
                p.error(str(e))
    else:
        if args.rewards:
            p.error("this checkpoint was trained without rewards (baseline); it takes no reward targets")
        settings = {f"baseline (text cfg {cfg:g})": (ones, zeros)}

    rows = {}
    for label, (pos, neg) in settings.items():
        w = 0.0 if (pos == neg).all() and names else cfg
        images, rows[label] = evaluate_setting(model, tokenizer, prompts, pos, neg, w, args.steps, args.seed,
                                               args.device, reward_models)
        save_grid(images[:64], ckpt_path.parent / f"eval_{len(rows)}.png", ncols=8)
    print(f"{ckpt_path} (step {ckpt['step']}), {len(prompts)} images of {len(set(m['prompt'] for m in prompts))} "
          f"held-out prompts")
    print(format_table(rows, rewards.BUILTIN_REWARDS, data.TASKS))
    out = Path(args.out) if args.out else ckpt_path.parent / "eval.json"
    out.write_text(json.dumps({"checkpoint": str(ckpt_path), "step": ckpt["step"], "settings": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
