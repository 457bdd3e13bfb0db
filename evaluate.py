"""Evaluation: GenEval-style accuracy, reward metrics, diversity, reward trade-offs, best-of-N, and the
convergence experiment that reproduces the paper's headline claim on the built-in benchmark.

    python evaluate.py geneval --ckpt runs/miro                  # GenEval's rules on the held-out built-in prompts
    python evaluate.py geneval --ckpt RUN --prompts ../shared/benchmarks/geneval/evaluation_metadata.jsonl \\
                               --detector mask2former            # the real protocol (needs the public weights)
    python evaluate.py rewards --ckpt runs/miro                  # mean and 95% CI of every reward
    python evaluate.py diversity --ckpt runs/miro                # mean pairwise distance between samples of a prompt
    python evaluate.py tradeoff --ckpt runs/miro --reward sharpness    # sweep one reward's positive target
    python evaluate.py tts --ckpt runs/miro --baseline runs/baseline --select-by alignment   # best-of-N
    python evaluate.py usage --ckpt runs/miro                    # does the model use each reward, and its caption?
    python evaluate.py convergence [--quick]                     # train baseline + MIRO and compare along the way
    torchrun --nproc_per_node=4 evaluate.py geneval ...          # sampling subcommands (not convergence) shard

Conventions:
- A setting is (positive targets, negative targets, guidance weight): MIRO samples with s_pos = 1, s_neg = 0 and the
  checkpoint's cfg unless told otherwise; a baseline uses text CFG with an empty negative prompt (sample.py).
- Image i of an evaluation gets its own noise seed (seed * 1_000_003 + i), so a sharded run (rank r samples the
  images i = r mod world_size) gives exactly the images and numbers of one process.
- GenEval's strict rule: an image is correct only if every include clause holds and no exclude clause fires; a
  task's score is the mean correctness of its images and `overall` the mean of the task scores. Reward metrics
  are separate soft judgements (the built-in `alignment` is the fraction of clauses satisfied).
- Every subcommand writes a JSON of its numbers and the settings behind them (and a PNG plot where a picture says
  more) into --out.
"""
import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import rewards
import train
from model import uses_bf16
from sample import as_saved, generate, open_checkpoint, parse_reward_targets, to_uint8

SEED_STRIDE = data.SEED_STRIDE  # image i of an evaluation with --seed s: noise from seed s * SEED_STRIDE + i
# Bump when the same images and settings would be judged differently, so that cached evaluations are not reused.
# 2: images judged on their 8-bit PNG levels; judges at rewards.REWARD_VERSIONS; the detector's noise guard.
EVALUATION_VERSION = 2


# ----------------------------------------------------------------------------------------------------------------
# GenEval's real detector: Mask2Former (COCO instances) + zero-shot CLIP colour on the masked crop.
#
# GenEval (djghosh13/geneval, evaluation/evaluate_images.py) runs mmdetection 2.x's Mask2Former Swin-S and open_clip's
# ViT-L-14 "openai". Here both come from transformers (the CLIP weights are the same; the Mask2Former weights are
# FAIR's original training of the same architecture, GenEval's are mmdetection's retraining), and every step
# around the networks follows GenEval and mmdetection's test pipeline:
# - input: the 8-bit image (GenEval reads PNGs), resized bilinearly so the short side is 800 unless the long side
#   would pass 1333, rounded to 8 bits, normalised, zero-padded to a multiple of 32;
# - instances: the 100 best (query, class) pairs by class probability; mask = mask logits > 0 at the original size
#   (upsampled to the padded input, cropped, resized); score = class probability x mean mask probability inside
#   the mask; box = the mask's bounding box [x0, y0, x1, y1], x1/y1 exclusive;
# - GenEval: per class the scores above 0.3 (0.9 for the counting task), most confident first, at most 16, no NMS;
# - colour: the image with everything outside the mask set to grey #999, cut to the box, CLIP's preprocessing
#   (bicubic short side, centre crop), then the nearest of 10 colour embeddings, each the normalised mean of the
#   normalised text embeddings of 3 templates naming the object's class (clip_benchmark's zero-shot classifier).

GENEVAL_CLASSES = (  # COCO's 80 instance classes in label order, spelled as in GenEval's object_names.txt
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {color} {cls}", "a photo of a {color}-colored {cls}", "a photo of a {color} object")


@dataclass
class GenEvalDetectorConfig:
    """The real GenEval detector; defaults are GenEval's (its --options) and mmdetection's test pipeline."""
    mask2former: str = "facebook/mask2former-swin-small-coco-instance"  # hub id or local folder: model + processor
    clip: str = "openai/clip-vit-large-patch14"  # hub id or local folder: CLIPModel + tokenizer
    clip_precision: str = "bf16"     # CLIP under bf16 autocast on CUDA, or fp32
    threshold: float = 0.3           # keep instances scoring above this,
    counting_threshold: float = 0.9  #   above this for the counting task,
    max_objects: int = 16            #   at most this many per class, most confident first,
    max_overlap: float = 1.0         #   skipping those with IoU >= this with a kept one of the class (1: no NMS)
    max_per_image: int = 100         # (query, class) pairs ranked by class probability before the thresholds
    short_edge: int = 800            # detector input: short side resized to this unless the long side would
    long_edge: int = 1333            #   pass this (mmdetection's test scale), aspect kept,
    size_divisor: int = 32           #   zero-padded to a multiple of this
    background: float = 0.6          # grey (#999) that replaces everything outside the mask on the colour crop
    batch_size: int = 8              # images per Mask2Former forward


def load_mask2former(source: str):
    """Mask2FormerForUniversalSegmentation (float32, eval) and its image processor from a hub id or a local folder;
    strict: missing, unexpected or mis-shaped weights raise ValueError (transformers would only log them)."""
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation
    from model import _check_loading
    model, info = Mask2FormerForUniversalSegmentation.from_pretrained(source, output_loading_info=True)
    _check_loading(source, Mask2FormerForUniversalSegmentation, info)
    return model.float().eval().requires_grad_(False), AutoImageProcessor.from_pretrained(source)


def _normalize(x255: torch.Tensor, processor) -> torch.Tensor:
    """Pixel values 0..255 (B,3,H,W) -> Mask2Former's input, with the processor's rescale factor, mean and std."""
    x = x255 * processor.rescale_factor if processor.do_rescale else x255
    mean = torch.tensor(processor.image_mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _as_pixels(image) -> torch.Tensor:
    """An image (3,H,W) tensor in [0, 1] or a PIL image -> float (3,H,W) on 8-bit levels 0..255."""
    if not torch.is_tensor(image):
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float()
    return (image.detach().float() * 255).round().clamp(0, 255)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """mmdetection's mask2bbox: boxes (N,4) [x0, y0, x1, y1] (x1/y1 exclusive) of masks (N,H,W); zeros if empty."""
    def span(hit):                                          # (N,L) bool -> first index with a pixel, last + 1
        return hit.float().argmax(1), hit.shape[1] - hit.flip(1).float().argmax(1)
    rows, cols = masks.any(2), masks.any(1)
    (x0, x1), (y0, y1) = span(cols), span(rows)
    return torch.stack([x0, y0, x1, y1], 1).float() * rows.any(1, keepdim=True)


def masked_crop(pixels: torch.Tensor, mask: torch.Tensor, box, background: float) -> torch.Tensor:
    """GenEval's colour crop: pixels (3,H,W) with everything outside mask (H,W) set to background (a fraction of
    255), cut to box [x0, y0, x1, y1] (rounded, as PIL's crop does)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return torch.where(mask, pixels, round(background * 255))[:, y0:y1, x0:x1]


def box_iou_inclusive(a, b) -> float:
    """GenEval's IoU of two boxes, counting both end pixels (width x1 - x0 + 1): used only by its optional NMS."""
    def area(x0, y0, x1, y1):
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)
    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return inter / union if union else 0.0


class GenEvalDetector:
    """GenEval's detector: __call__(images, metadatas) -> per image a list of {"class", "color", "box", "center",
    "score", "area"} (area: mask pixels), most confident first: the format of rewards.detect_shapes, so
    rewards.check_clauses applies unchanged. Images: a (B,3,H,W) tensor or a list of (3,H,W) tensors in [0, 1] or
    PIL images; metadatas: GenEval metadata per image (its "tag" picks the threshold) or None (threshold 0.3).

    Mask2Former runs in float32 (its scores meet thresholds); CLIP (a rewards.ClipEncoder) under bf16 autocast on
    CUDA unless clip_precision=fp32 (GenEval's clip_benchmark used fp16 autocast). Mask2Former's input size comes
    from the config, not from the hub processor (which squashes images to 384 x 384); the processor gives the
    pixel statistics.
    """

    def __init__(self, segmenter, seg_processor, clip, cfg=GenEvalDetectorConfig(), device="cpu"):
        if segmenter.config.num_labels != len(GENEVAL_CLASSES):
            raise ValueError(f"the detector has {segmenter.config.num_labels} classes; GenEval needs COCO's 80 "
                             f"instance classes (a *-coco-instance Mask2Former)")
        self.device = torch.device(device)
        self.segmenter, self.seg_processor = segmenter.to(self.device), seg_processor
        self.clip = clip
        self.cfg = cfg
        self._classifiers: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, cfg=GenEvalDetectorConfig(), device="cpu") -> "GenEvalDetector":
        clip = rewards.load_hf_clip(cfg.clip, cfg.clip, device, cfg.clip_precision)
        return cls(*load_mask2former(cfg.mask2former), clip, cfg, device)

    def _segment(self, pixels: torch.Tensor):
        """Mask2Former on same-size images (B,3,H,W) 0..255 -> class logits (B,Q,81), mask logits (B,Q,H,W)."""
        c = self.cfg
        b, _, h, w = pixels.shape
        scale = min(c.short_edge / min(h, w), c.long_edge / max(h, w))
        rh, rw = int(h * scale + 0.5), int(w * scale + 0.5)
        x = F.interpolate(pixels, size=(rh, rw), mode="bilinear", align_corners=False).round().clamp(0, 255)
        ph, pw = math.ceil(rh / c.size_divisor) * c.size_divisor, math.ceil(rw / c.size_divisor) * c.size_divisor
        x = F.pad(_normalize(x, self.seg_processor), (0, pw - rw, 0, ph - rh))
        valid = torch.zeros(b, ph, pw, dtype=torch.long, device=x.device)
        valid[:, :rh, :rw] = 1
        out = self.segmenter(pixel_values=x, pixel_mask=valid)
        masks = F.interpolate(out.masks_queries_logits.float(), size=(ph, pw), mode="bilinear", align_corners=False)
        masks = F.interpolate(masks[:, :, :rh, :rw], size=(h, w), mode="bilinear", align_corners=False)
        return out.class_queries_logits.float(), masks

    def _instances(self, class_logits: torch.Tensor, mask_logits: torch.Tensor):
        """mmdetection's Mask2Former instance results of one image: labels (N,), scores (N,), masks (N,H,W) bool."""
        probs = class_logits.softmax(-1)[:, :-1]                          # the last class is "no object"
        top, idx = probs.flatten().topk(min(self.cfg.max_per_image, probs.numel()))
        query, labels = idx // probs.shape[1], idx % probs.shape[1]
        binary = mask_logits > 0
        mask_score = (mask_logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        return labels, top * mask_score[query], binary[query]

    def _select(self, labels, scores, boxes, threshold: float) -> list[int]:
        """GenEval's filter: per class the instances scoring above threshold, most confident first, at most
        max_objects, greedy NMS if max_overlap < 1. Returns indices, most confident first over all classes."""
        keep = []
        for c in labels.unique().tolist():
            idx = ((labels == c) & (scores > threshold)).nonzero()[:, 0]
            kept = []
            for i in idx[scores[idx].argsort(descending=True, stable=True)][:self.cfg.max_objects].tolist():
                if self.cfg.max_overlap >= 1 or all(box_iou_inclusive(boxes[i], boxes[j]) < self.cfg.max_overlap
                                                    for j in kept):
                    kept.append(i)
            keep += kept
        return sorted(keep, key=lambda i: -scores[i].item())

    @torch.no_grad()
    def color_classifier(self, classname: str) -> torch.Tensor:
        """(10, D): row k the normalised mean of the normalised text embeddings of the templates with colour k."""
        if classname not in self._classifiers:
            texts = [t.format(color=c, cls=classname) for c in GENEVAL_COLORS for t in COLOR_TEMPLATES]
            emb = self.clip.texts(texts).view(len(GENEVAL_COLORS), len(COLOR_TEMPLATES), -1).mean(1)
            self._classifiers[classname] = F.normalize(emb, dim=-1)
        return self._classifiers[classname]

    @torch.no_grad()
    def __call__(self, images, metadatas=None) -> list[list[dict]]:
        pixels = [_as_pixels(im).to(self.device) for im in images]
        metadatas = metadatas if metadatas is not None else [{}] * len(pixels)
        results = []
        for lo in range(0, len(pixels), self.cfg.batch_size):
            chunk = pixels[lo:lo + self.cfg.batch_size]
            groups = [torch.stack(chunk)] if len({p.shape for p in chunk}) == 1 else [p[None] for p in chunk]
            outputs = [o for g in groups for o in zip(*self._segment(g))]
            results += [self._detect(p, *o, m) for p, o, m in zip(chunk, outputs, metadatas[lo:lo + len(chunk)])]
        return results

    def _detect(self, pixels, class_logits, mask_logits, metadata) -> list[dict]:
        """One image: instances -> GenEval's filter -> boxes and colours."""
        labels, scores, masks = self._instances(class_logits, mask_logits)
        boxes = mask_boxes(masks).tolist()
        threshold = self.cfg.counting_threshold if metadata.get("tag") == "counting" else self.cfg.threshold
        keep = [i for i in self._select(labels, scores, boxes, threshold) if boxes[i][2] > 0]   # empty masks score 0
        crops = [masked_crop(pixels, masks[i], boxes[i], self.cfg.background) / 255 for i in keep]
        embeddings = self.clip.images(crops) if crops else []                       # CLIP's own preprocessing
        found = []
        for i, emb in zip(keep, embeddings):
            name, box = GENEVAL_CLASSES[int(labels[i])], boxes[i]
            found.append({"class": name, "color": GENEVAL_COLORS[int((self.color_classifier(name) @ emb).argmax())],
                          "box": box, "center": [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2],
                          "score": float(scores[i]), "area": float(masks[i].sum())})
        return found


def make_detector(name: str = "shapes", device="cpu", **options):
    """A GenEval detector by name: detector(images, metadatas) -> per image its detections, most confident first.
    "shapes": the built-in world's rules-based rewards.detect_shapes (no options, metadata unused);
    "mask2former": GenEvalDetector, options = GenEvalDetectorConfig fields (strings from the command line are
    converted to the field's type)."""
    if name == "shapes":
        if options:
            raise ValueError(f"the shapes detector takes no options (got {', '.join(options)})")
        return lambda images, metadatas=None: rewards.detect_shapes(
            images if torch.is_tensor(images) else torch.stack(list(images)))
    if name != "mask2former":
        raise ValueError(f"unknown detector {name!r}: choose shapes or mask2former")
    types = {f.name: type(f.default) for f in fields(GenEvalDetectorConfig)}
    config = {}
    for key, value in options.items():
        if key not in types:
            raise ValueError(f"unknown mask2former detector option {key!r}; known: {', '.join(types)}")
        try:
            config[key] = types[key](value)
        except ValueError:
            raise ValueError(f"detector option {key}={value!r}: expected a {types[key].__name__}") from None
    return GenEvalDetector.from_pretrained(GenEvalDetectorConfig(**config), device)

# ---- end of the real GenEval detector --------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# Prompt sets: the held-out built-in prompts, GenEval's metadata, PartiPrompts, or a plain list.

def load_prompts(spec: str, world: data.WorldConfig | None) -> list[dict]:
    """'heldout' (the built-in world's held-out compositions) or a file: GenEval metadata .jsonl (one JSON object
    with "prompt" per line, GenEval fields kept), PartiPrompts .tsv (column "Prompt"), or .txt (a prompt per line).
    Returns one dict per prompt with at least "prompt"."""
    if spec == "heldout":
        if world is None:
            raise ValueError("--prompts heldout needs a checkpoint trained on the built-in world")
        return data.heldout_prompts(world)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {spec}: no such file (or use 'heldout')")
    text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark would hide the first column's name
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if path.suffix == ".jsonl":
        prompts = [data._json_line(line, path, n) for n, line in numbered]
    elif path.suffix == ".tsv":
        rows = csv.DictReader(text.splitlines(), delimiter="\t")
        if "Prompt" not in (rows.fieldnames or []):
            raise ValueError(f"{path}: no 'Prompt' column (PartiPrompts' layout: Prompt<TAB>Category<TAB>...)")
        prompts = [{"prompt": row["Prompt"], "tag": row.get("Category") or ""} for row in rows]
    else:
        prompts = [{"prompt": line.strip()} for _, line in numbered]
    if not prompts or not all(isinstance(p, dict) and isinstance(p.get("prompt"), str) for p in prompts):
        raise ValueError(f"{path}: expected prompts (a 'prompt' string per JSON line, a 'Prompt' column, or lines)")
    with_metadata = [p for p in prompts if "include" in p]
    if 0 < len(with_metadata) < len(prompts):  # a mix's GenEval score would depend on the batching (Judges)
        raise ValueError(f"{path}: {len(with_metadata)} of {len(prompts)} prompts carry GenEval metadata ('include'); "
                         f"a prompt file must be all GenEval metadata or all plain prompts")
    if with_metadata:  # only a .jsonl has metadata, one object per non-blank line
        for (n, _), p in zip(numbered, prompts):
            check_metadata(p, f"{path}:{n}")
    return prompts


def check_metadata(meta: dict, where: str):
    """ValueError naming `where` (file:line) unless GenEval metadata is what rewards.check_clauses reads: a task
    tag; include clauses (at least one) with a class, a count >= 1, maybe a colour and a position [relation, index
    of an earlier include]; exclude clauses with a class and a count >= 1."""
    if meta.get("tag") not in data.TASKS:
        raise ValueError(f"{where}: GenEval metadata needs a 'tag' (its task: {', '.join(data.TASKS)}) with every "
                         f"'include', not {meta.get('tag')!r}")
    for kind in ("include", "exclude"):
        clauses = meta.get(kind, [])
        if not isinstance(clauses, list) or (kind == "include" and not clauses):
            raise ValueError(f"{where}: '{kind}' must be a list of clauses, not {clauses!r}")
        for k, c in enumerate(clauses):
            clause = f"{where}: {kind}[{k}]"
            if not isinstance(c, dict) or not isinstance(c.get("class"), str):
                raise ValueError(f"{clause} needs a 'class' string")
            if type(c.get("count")) is not int or c["count"] < 1:
                raise ValueError(f"{clause} needs a 'count' integer >= 1, not {c.get('count')!r}")
            if kind == "include" and "color" in c and not isinstance(c["color"], str):
                raise ValueError(f"{clause}: 'color' must be a string, not {c['color']!r}")
            if kind == "include" and "position" in c:
                position = c["position"]
                if not (isinstance(position, list) and len(position) == 2 and position[0] in data.RELATIONS
                        and type(position[1]) is int and 0 <= position[1] < k):
                    raise ValueError(f"{clause}: 'position' must be [relation, index of an earlier include], "
                                     f"relation one of {', '.join(data.RELATIONS)}; not {position!r}")


def evaluation_items(spec: str, world: data.WorldConfig | None, n_per_prompt: int, min_per_task: int = 0):
    """The images of an evaluation of --prompts `spec`: n_per_prompt per prompt, and on the built-in held-out set
    (whose tasks have few prompts) more, so that every task has min_per_task images. A prompt file is taken as
    it is (GenEval's own metadata: 4 images per prompt), so every subcommand scores the same images."""
    return repeat_prompts(load_prompts(spec, world), n_per_prompt, min_per_task if spec == "heldout" else 0)


def repeat_prompts(prompts: list[dict], n_per_prompt: int, min_per_task: int = 0) -> list[dict]:
    """One item per image: n_per_prompt per prompt (more for GenEval tasks with few prompts, so that every task has
    at least min_per_task images), each with "index" (the prompt's position) and "sample" (its k-th image)."""
    per_task: dict[str, int] = {}
    for p in prompts:
        per_task[p.get("tag", "")] = per_task.get(p.get("tag", ""), 0) + 1
    items = []
    for index, p in enumerate(prompts):
        repeats = max(n_per_prompt, math.ceil(min_per_task / per_task[p.get("tag", "")]))
        items += [{**p, "index": index, "sample": k} for k in range(repeats)]
    return items


# ----------------------------------------------------------------------------------------------------------------
# Sharded sampling and scoring.

def gather_rows(local: dict[int, dict], n: int) -> list[dict]:
    """Merge every rank's {item index: row} into one list of n rows in item order (all ranks get it)."""
    parts = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
    merged = {i: row for part in parts for i, row in part.items()}
    if sorted(merged) != list(range(n)):
        raise RuntimeError(f"sharded evaluation lost or duplicated images: {len(merged)} of {n}")
    return [merged[i] for i in range(n)]


def pixel_features(images01: torch.Tensor) -> torch.Tensor:
    """The offline diversity feature: the image area-averaged to 8x8 RGB (192 values in [0, 1]). Distances are
    RMS colour differences of the coarse layout: what a prompt leaves free (placement, size, hue jitter)."""
    return F.adaptive_avg_pool2d(images01, 8).flatten(1)


class Judges:
    """Everything that scores an image: reward models (soft scores), a GenEval detector (strict correctness of
    items that carry GenEval metadata) and a feature extractor for diversity."""

    def __init__(self, reward_models: dict, detector=None, features=pixel_features):
        self.rewards, self.detector, self.features = reward_models, detector, features

    def __call__(self, images01: torch.Tensor, items: list[dict]) -> list[dict]:
        prompts = [it["prompt"] for it in items]
        scores = {name: r(images01, prompts).tolist() for name, r in self.rewards.items()}
        rows = [{"rewards": {name: s[j] for name, s in scores.items()}} for j in range(len(items))]
        if self.detector is not None and all("include" in it for it in items):
            for row, it, found in zip(rows, items, self.detector(images01, items)):
                row["correct"] = rewards.geneval_correct(it, found)
        if self.features is not None:
            for row, f in zip(rows, self.features(images01).tolist()):
                row["features"] = f
        return rows


@torch.no_grad()
def sample_and_judge(model, text_encoder, items, pos, neg, cfg, judges, steps=50, seed=0, device="cpu",
                     batch_size=64, on_images=None, vae=None, neg_prompt=None, bf16=False) -> list[dict]:
    """Generate and judge this rank's share of `items` (image i with its own noise seed), then gather: returns
    one row per item, identical on every rank. on_images(indices, images in [-1, 1]) sees each local batch. The
    images are judged (and seen) as written to PNG, on 8-bit levels, so a saved folder rescored gives the same.
    neg_prompt: the negative branch's caption for every image (None: sample.generate's default); bf16: generate under
    bf16 autocast."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(range(rank, len(items), world_size))
    local = {}
    for lo in range(0, len(mine), batch_size):
        idx = mine[lo:lo + batch_size]
        batch = [items[i] for i in idx]
        n = len(idx)
        pos_n, neg_n = (None if r is None else r.expand(n, -1) for r in (pos, neg))
        images = as_saved(generate(model, text_encoder, [it["prompt"] for it in batch], pos_n, neg_n,
                                   None if neg_prompt is None else [neg_prompt] * n, cfg=cfg, steps=steps,
                                   device=device, batch_size=batch_size, seeds=[seed * SEED_STRIDE + i for i in idx],
                                   vae=vae, bf16=bf16))
        if on_images is not None:
            on_images(idx, images)
        local.update(zip(idx, judges((images + 1) / 2, batch)))
    return gather_rows(local, len(items))


# ----------------------------------------------------------------------------------------------------------------
# Metrics from per-image rows.

def mean_ci(values, groups=None) -> dict:
    """Mean of the finite values and the half-width of its 95% confidence interval (normal approximation, 1.96
    standard errors). groups (one label per value, e.g. the prompt): the values of a group are not independent
    (images of one prompt), so the standard error is cluster-robust: sqrt(G / (G - 1) * sum_g r_g^2) / N, r_g the
    sum of group g's deviations from the mean, G groups, N values; with as many values in every group this is the
    standard error of the group means. No groups: every value its own group (the usual s / sqrt(N)). The interval
    is NaN with fewer than 2 groups."""
    x = np.asarray(values, dtype=np.float64)
    g = np.arange(len(x)) if groups is None else np.asarray(groups)
    keep = np.isfinite(x)
    x, g = x[keep], g[keep]
    labels, g = np.unique(g, return_inverse=True)
    n, k = len(x), len(labels)
    half = float("nan")
    if k > 1:
        residual_sums = np.bincount(g, weights=x - x.mean(), minlength=k)
        half = 1.96 * math.sqrt(k / (k - 1) * (residual_sums ** 2).sum()) / n
    return {"mean": float(x.mean()) if n else float("nan"), "ci95": half, "n": n, "prompts": k}


def geneval_summary(rows: list[dict], items: list[dict]) -> dict:
    """GenEval's numbers: per-task accuracy (mean correctness of its images) and overall = mean over tasks."""
    per_task: dict[str, list[float]] = {}
    for row, it in zip(rows, items):
        if "correct" in row:
            per_task.setdefault(it["tag"], []).append(float(row["correct"]))
    scores = {task: float(np.mean(v)) for task, v in per_task.items()}
    if scores:
        scores["overall"] = float(np.mean(list(scores.values())))
    return scores


def diversity(rows: list[dict], items: list[dict]) -> float:
    """Mean over prompts (with >= 2 images) of the mean pairwise RMS feature difference between their images: the
    Euclidean distance / sqrt(D) for D features (for pixel features: the RMS colour difference), so the number
    does not grow with the feature size."""
    groups: dict[int, list[list[float]]] = {}
    for row, it in zip(rows, items):
        groups.setdefault(it["index"], []).append(row["features"])
    per_prompt = []
    for feats in groups.values():
        if len(feats) > 1:
            f = torch.tensor(feats)
            d = torch.cdist(f, f) / math.sqrt(f.shape[1])
            per_prompt.append(d.sum().item() / (len(f) * (len(f) - 1)))
    return float(np.mean(per_prompt)) if per_prompt else float("nan")


def summarize(rows: list[dict], items: list[dict]) -> dict:
    """Every metric of one setting: reward means (with 95% CI clustered by prompt), GenEval per task and overall,
    diversity."""
    prompts = [it["index"] for it in items]
    out = {"rewards": {name: mean_ci([r["rewards"][name] for r in rows], prompts) for name in rows[0]["rewards"]}}
    if "correct" in rows[0]:  # judged with a detector
        out["geneval"] = geneval_summary(rows, items)
    if "features" in rows[0]:
        out["diversity"] = diversity(rows, items)
    return out


def flat_metrics(summary: dict) -> dict:
    """{metric name: value} of a summary: each reward mean, 'geneval' (overall), 'diversity'."""
    flat = {name: v["mean"] for name, v in summary["rewards"].items()}
    if "overall" in summary.get("geneval", {}):
        flat["geneval"] = summary["geneval"]["overall"]
    if "diversity" in summary:
        flat["diversity"] = summary["diversity"]
    return flat


def reach_step(steps, curve, target) -> float | None:
    """The step from which `curve` (evaluated at `steps`) is at or above `target` and stays there, linearly
    interpolated between evaluated steps; steps[0] if it always is; None if it ends below. "Stays" because a barely
    trained model's blobs can satisfy a metric by luck, and such an early fluke says nothing about convergence."""
    below = [k for k, v in enumerate(curve) if v < target]
    if not below:
        return steps[0]
    k = below[-1] + 1  # the first evaluation of the final stretch at or above the target
    if k == len(steps):
        return None
    s0, v0, s, v = steps[k - 1], curve[k - 1], steps[k], curve[k]
    return s0 + (s - s0) * (target - v0) / (v - v0)


def speedup(steps, baseline, miro, matched=False) -> float | None:
    """Convergence speedup for a higher-is-better metric, the target being the baseline's final value. The paper's
    (matched=False): the baseline's last step / the step from which MIRO reaches the target (reach_step). When the
    baseline got there before its last step (it plateaued, or fell back to it), that ratio credits MIRO with the
    baseline's idle steps, and two identical curves get more than 1x; matched=True times both models to the target:
    reach_step(baseline) / reach_step(miro), 1x for identical curves and the paper's number for a baseline still
    rising at its end. A lower bound when MIRO is above the target from the first evaluation on; None if MIRO ends
    below it."""
    target = baseline[-1]
    miro_step = reach_step(steps, miro, target)
    if miro_step is None:
        return None
    return (reach_step(steps, baseline, target) if matched else steps[-1]) / miro_step


def format_table(rows: dict[str, dict], columns: list[str]) -> str:
    """A markdown table: one row per setting, one column per flat metric."""
    lines = ["| setting | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, m in rows.items():
        cells = [f"{m[c]:.3f}" if isinstance(m.get(c), float) and np.isfinite(m[c]) else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_seed_table(seeds: dict[str, dict[str, dict]], columns: list[str]) -> str:
    """A markdown table of the seed spread at the end of the budget: per model (seeds[label][seed] = flat metrics),
    the mean and sample standard deviation over seeds, then in how many seeds MIRO >= the baseline (runs of one seed
    share data order, noise draws and evaluation noise, so they pair)."""
    (base_label, base), (miro_label, miro) = seeds.items()
    lines = [f"| {len(base)} seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, runs in seeds.items():
        cells = [np.array([m[c] for m in runs.values()]) for c in columns]
        lines.append(f"| {label} | " + " | ".join(f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" for v in cells) + " |")
    wins = [sum(miro[s][c] >= base[s][c] for s in base) for c in columns]
    lines.append(f"| {miro_label} >= {base_label} | " + " | ".join(f"{w}/{len(base)}" for w in wins) + " |")
    return "\n".join(lines)


def format_speedup(s: float | None) -> str:
    return "not reached" if s is None else f"{s:.1f}x"


def format_speedup_table(rows: dict[str, dict[str, float | None]], title="speed-up") -> str:
    """A markdown table of speed-ups, one row per label ("seed 0", ...): rows[label][metric] = speedup() (None: not
    reached)."""
    columns = list(next(iter(rows.values())))
    lines = [f"| {title} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, row in rows.items():
        cells = [format_speedup(row[c]) for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(path, x, curves: dict[str, dict[str, list]], xlabel: str, title: str = "", styles=None):
    """One panel per metric, one line per model/setting: curves[metric][label] = values along x (or (x, values));
    styles: {label: matplotlib line keywords} for some labels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(curves)
    cols = min(n, 4)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.6 * cols, 2.8 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, (metric, lines) in zip(axes.flat, curves.items()):
        for label, ys in lines.items():
            xs, ys = ys if isinstance(ys, tuple) else (x, ys)
            ax.plot(xs, ys, **{"marker": "o", "ms": 3, **(styles or {}).get(label, {})}, label=label)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_file(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def log(*parts):
    """print on rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*parts, flush=True)


def write_file(path: Path, write):
    """write(file) to path atomically (data._atomic_write): a reader or an interrupted run never sees half a file."""
    data._atomic_write(Path(path), write)


def write_text(path: Path, text: str):
    write_file(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj):
    """obj as strict JSON, atomically: NaN and infinities (a metric of too few images) become null."""
    def finite(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        return [finite(v) for v in x] if isinstance(x, (list, tuple)) else x
    write_text(path, json.dumps(finite(obj), indent=1, allow_nan=False))


# ----------------------------------------------------------------------------------------------------------------
# Subcommands. Each gets (args, context) and returns the JSON-able result that main writes.

class Context:
    """What every sampling subcommand needs: the model, its sampling setting and the judges."""

    def __init__(self, args, ckpt_arg=None):
        self.path, self.ckpt, self.model, self.text_encoder, self.vae = open_checkpoint(ckpt_arg or args.ckpt,
                                                                                        device=args.device)
        self.names = list(self.model.cfg.reward_names)
        self.world = data.WorldConfig(**self.ckpt["world"]) if self.ckpt.get("world") else None
        self.cfg = args.cfg if args.cfg is not None else self.ckpt["sampling"]["cfg"]
        if args.rewards and not self.names and ckpt_arg is None:  # (tts' --baseline takes no targets)
            raise ValueError(f"--rewards {args.rewards}: {self.path} was trained without rewards (a baseline)")
        self.pos = parse_reward_targets(args.rewards, self.names, 1.0) if self.names else None
        self.neg = torch.zeros(len(self.names)) if self.names else None
        self.args = args

    def judges(self, detector=True, features=True, reward_names=None):
        a = self.args
        names = [n for n in a.judge_rewards.split(",") if n] if reward_names is None else reward_names
        models = {n: rewards.load_reward(n, device=a.device, **a.reward_options.get(n, {})) for n in names}
        det = make_detector(a.detector, a.device, **a.detector_options) if detector else None
        return Judges(models, det, pixel_features if features else None)

    def run(self, items, judges, pos=None, cfg=None, on_images=None):
        a = self.args
        pos = self.pos if pos is None else pos
        return sample_and_judge(self.model, self.text_encoder, items, pos, self.neg,
                                self.cfg if cfg is None else cfg, judges, steps=a.steps, seed=a.seed, device=a.device,
                                batch_size=a.batch_size, on_images=on_images, vae=self.vae,
                                neg_prompt=getattr(a, "neg_prompt", None),  # convergence has none
                                bf16=uses_bf16(a.precision, a.device))


def not_written_by_geneval(folder: Path) -> list[str]:
    """What in `folder` is not GenEval's layout as cmd_geneval writes it (NNNNN/metadata.jsonl, NNNNN/samples/
    XXXX.png, and temporary files of a killed write): it must not be deleted with the rest."""
    def ours(path: Path, pattern: str) -> bool:
        return path.name.endswith(".tmp") or re.fullmatch(pattern, path.name) is not None
    foreign = []
    for sub in sorted(folder.iterdir()):
        if not (sub.is_dir() and re.fullmatch(r"\d{5}", sub.name)):
            foreign.append(str(sub))
            continue
        for entry in sorted(sub.iterdir()):
            if entry.name == "samples" and entry.is_dir():
                foreign += [str(p) for p in sorted(entry.iterdir()) if not ours(p, r"\d{4}\.png")]
            elif not ours(entry, r"metadata\.jsonl"):
                foreign.append(str(entry))
    return foreign


def cmd_geneval(args, ctx):
    """GenEval: 4 images per prompt (the built-in held-out set repeats small tasks to --min-per-task images),
    written in GenEval's folder layout (NNNNN/metadata.jsonl, NNNNN/samples/XXXX.png, replacing what an earlier run
    left there) so that the official evaluator can score them too, and judged here with --detector."""
    from PIL import Image
    items = evaluation_items(args.prompts, ctx.world, args.n_per_prompt, args.min_per_task)
    if not all("include" in it for it in items):
        raise ValueError(f"--prompts {args.prompts}: GenEval needs metadata (tag, include) with every prompt")
    folder = args.out / "geneval"
    if args.rank == 0:
        if folder.exists():
            foreign = not_written_by_geneval(folder)
            if foreign:
                raise ValueError(f"{folder} holds files that evaluate.py geneval did not write ({foreign[0]}), and "
                                 f"geneval replaces that folder: give another --out")
            shutil.rmtree(folder)  # an earlier run's extra images would be scored by the official evaluator too
        (args.out / "geneval.json").unlink(missing_ok=True)  # its numbers: not those of the images written now
    if dist.is_initialized():
        dist.barrier()  # no rank writes before the folder is cleared

    def write(indices, images):
        for i, pixels in zip(indices, to_uint8(images)):
            it = items[i]
            sub = folder / f"{it['index']:05d}"
            (sub / "samples").mkdir(parents=True, exist_ok=True)
            if it["sample"] == 0:
                meta = {k: v for k, v in it.items() if k not in ("index", "sample")}
                write_text(sub / "metadata.jsonl", json.dumps(meta) + "\n")
            write_file(sub / "samples" / f"{it['sample']:04d}.png", lambda f: Image.fromarray(pixels).save(f, "PNG"))

    rows = ctx.run(items, ctx.judges(features=False, reward_names=[]), on_images=write)
    result = {"geneval": geneval_summary(rows, items), "images": len(items), "folder": str(folder)}
    per_task = result["geneval"]
    log(" | ".join(f"{t} {per_task[t]:.3f}" for t in per_task))
    return result


def cmd_rewards(args, ctx):
    """Mean and 95% confidence interval of every judge reward over a prompt set. The images of one prompt are not
    independent draws, so the interval is clustered by prompt (cluster-robust standard error; see mean_ci)."""
    items = evaluation_items(args.prompts, ctx.world, args.n_per_prompt, args.min_per_task)
    summary = summarize(ctx.run(items, ctx.judges(detector=False, features=False)), items)
    for name, v in summary["rewards"].items():
        log(f"{name:>14}: {v['mean']:.4f} +- {v['ci95']:.4f} (95% CI, {v['n']} images of {v['prompts']} prompts)")
    return {**summary, "images": len(items)}


def cmd_diversity(args, ctx):
    """Per prompt, the mean pairwise distance between its samples (pixel features offline)."""
    items = evaluation_items(args.prompts, ctx.world, args.n_per_prompt, args.min_per_task)
    value = diversity(ctx.run(items, Judges({}, None, pixel_features)), items)
    log(f"diversity (mean pairwise RMS distance of 8x8 colour layouts): {value:.4f}")
    return {"diversity": value, "images": len(items)}


def cmd_tradeoff(args, ctx):
    """Sweep one reward's positive target (the others stay at 1), or with --reward cfg the guidance weight w (any
    checkpoint, the baseline's too), and report every metric along the sweep."""
    try:
        values = [float(v) for v in args.values.split(",")]
    except ValueError:
        raise ValueError(f"--values {args.values!r}: expected comma-separated numbers") from None
    by_cfg = args.reward == "cfg"
    if by_cfg:
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError("--values: guidance weights must be >= 0 and finite")
    elif args.reward not in ctx.names:
        raise ValueError(f"--reward {args.reward!r}: this checkpoint is conditioned on "
                         f"{', '.join(ctx.names) or 'nothing'} (--reward cfg sweeps the guidance weight)")
    elif not all(0 <= v <= 1 for v in values):
        raise ValueError("--values must lie in [0, 1]")
    items = evaluation_items(args.prompts, ctx.world, args.n_per_prompt, args.min_per_task)
    judges = ctx.judges()
    sweep = {}
    for v in values:
        if by_cfg:
            rows = ctx.run(items, judges, cfg=v)
        else:
            pos = ctx.pos.clone()
            pos[ctx.names.index(args.reward)] = v
            rows = ctx.run(items, judges, pos=pos)
        sweep[v] = flat_metrics(summarize(rows, items))
    name = "w" if by_cfg else args.reward
    log(format_table({f"{name}={v:g}": m for v, m in sweep.items()}, list(next(iter(sweep.values())))))
    if args.rank == 0:
        metrics, model = list(next(iter(sweep.values()))), "MIRO" if ctx.names else "baseline"
        plot_curves(args.out / "tradeoff.png", values, {m: {model: [sweep[v][m] for v in values]} for m in metrics},
                    "guidance weight w" if by_cfg else f"{args.reward} target")
    return {"reward": args.reward, "sweep": {str(v): m for v, m in sweep.items()}, "images": len(items)}


def cmd_tts(args, ctx):
    """Best-of-N test-time scaling: max-n candidates per prompt once, then for N = 1, 2, 4, ... and max-n the
    candidate with the highest --select-by reward among the first N; every metric of the selected images, MIRO vs
    the baseline."""
    ns = sorted({*(2 ** k for k in range(args.max_n.bit_length())), args.max_n})  # every candidate drawn counts
    items = repeat_prompts(load_prompts(args.prompts, ctx.world), args.max_n)  # each prompt's max-n candidates
    results = {}
    runs = [("MIRO" if ctx.names else "baseline", ctx)]
    if args.baseline:
        runs.append(("baseline" if ctx.names else "--baseline", Context(args, args.baseline)))
    judges = ctx.judges(features=False)  # the same judges for both checkpoints: load them once
    for label, c in runs:
        rows = c.run(items, judges)
        by_prompt = {}
        for row, it in zip(rows, items):
            by_prompt.setdefault(it["index"], []).append((row, it))
        curve = {}
        for n in ns:
            chosen = [max(cands[:n], key=lambda ri: ri[0]["rewards"][args.select_by]) for cands in by_prompt.values()]
            curve[n] = flat_metrics(summarize([r for r, _ in chosen], [i for _, i in chosen]))
        results[label] = curve
    metrics = list(results[runs[0][0]][1])
    for label, curve in results.items():
        log(label)
        log(format_table({f"N={n}": m for n, m in curve.items()}, metrics))
    if args.rank == 0:
        plot_curves(args.out / "tts.png", ns, {m: {lab: [c[n][m] for n in ns] for lab, c in results.items()}
                                               for m in metrics}, f"N (best of, by {args.select_by})")
    result = {"curves": {lab: {str(n): m for n, m in c.items()} for lab, c in results.items()}}
    if args.baseline:  # its own checkpoint and guidance weight (the settings' cfg is --ckpt's)
        c = runs[1][1]
        result["baseline_run"] = {"checkpoint": str(c.path), "step": c.ckpt["step"], "cfg": c.cfg}
    return result


def condition_usage(model, encode_text, images, captions, reward_values, names, time_sampling="logit_normal",
                    batch_size=256, seed=0) -> dict:
    """Does a model use its conditions? Permutation importance on the training objective: the flow-matching loss on
    (image, caption, rewards) samples, and how much it rises when one input is shuffled across the samples (each
    reward's values in turn, then the captions), which cuts that input's link to its image and keeps its
    distribution. Every variant sees the same t, noise and shuffle, so a difference is the shuffled input's alone;
    ~0 means the model ignores that input. images (N, C, H, W) in [-1, 1] on the model's device; reward_values
    (N, R) in [0, 1] (R = len(names), 0 for a baseline); encode_text(captions) -> (text, mask), as sample.py's
    text encoders. Returns {"loss": L, "increase": {reward name or "caption": L_shuffled / L - 1}}."""
    n, device = len(images), images.device
    g = torch.Generator().manual_seed(seed)
    t = train.sample_timesteps(n, time_sampling, g).to(device)
    noise = torch.randn(images.shape, generator=g).to(device)
    shuffle = torch.randperm(n, generator=g)
    values = torch.as_tensor(reward_values, dtype=torch.float32).to(device)

    @torch.no_grad()
    def loss(caps, vals):
        total = 0.0
        for a in range(0, n, batch_size):
            s = slice(a, a + batch_size)
            text, mask = encode_text(caps[s])
            total += len(images[s]) * train.flow_matching_loss(
                model, images[s], t[s], noise[s], text=text.to(device), text_mask=mask.to(device),
                rewards=vals[s] if names else None).item()
        return total / n

    base = loss(list(captions), values)
    increase = {}
    for j, name in enumerate(names):
        shuffled = values.clone()
        shuffled[:, j] = values[shuffle.to(device), j]
        increase[name] = loss(list(captions), shuffled) / base - 1
    increase["caption"] = loss([captions[i] for i in shuffle.tolist()], values) / base - 1
    return {"loss": base, "increase": increase}


def run_data_dir(ckpt_path: Path, world: data.WorldConfig) -> Path:
    """The data folder a built-in run trained on: its config.json's data_dir, else the world's default folder."""
    config = ckpt_path.parent / "config.json"
    if config.is_file():
        try:
            return Path(json.loads(config.read_text())["data_dir"])
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    return world.default_dir()


def cmd_usage(args, ctx):
    """How much the model uses each condition: the rise of its training loss (flow matching, fixed t and noise) on
    --samples training samples of its built-in world when one input is shuffled across them: each reward's
    conditioning values (binned with the checkpoint's own bins), then the captions. ~0: the model ignores it."""
    if ctx.world is None or ctx.vae is not None:
        raise ValueError("usage reads the built-in world's training images: this run trained on other data "
                         "(--data) or on VAE latents")
    data_dir = Path(args.data_dir) if args.data_dir else run_data_dir(ctx.path, ctx.world)
    samples = data.ImageTextSamples(data_dir)
    pick = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed))[:args.samples]
    pick = pick.sort().values.numpy()
    keys = [samples.keys[i] for i in pick]
    values = np.zeros((len(pick), 0), np.float32)
    if ctx.names:
        annotations = rewards.load_annotations(data_dir / "annotations.jsonl")
        bins = rewards.RewardBins.from_dict(ctx.ckpt["bins"])
        values = bins.values(data.sample_scores(annotations, keys, ctx.names))
    images = (samples.images_01(pick) * 2 - 1).to(args.device)
    result = condition_usage(ctx.model, ctx.text_encoder, images, [samples.captions[i] for i in pick], values,
                             ctx.names, ctx.ckpt["train"]["time_sampling"], args.batch_size, args.seed)
    log(f"training loss on {len(pick)} samples of {data_dir}: {result['loss']:.5f}; rise when shuffled:")
    for name, rise in result["increase"].items():
        log(f"{name:>14}: {100 * rise:+.2f}%")
    return {**result, "samples": len(pick), "data_dir": str(data_dir)}


# ----------------------------------------------------------------------------------------------------------------
# The headline experiment: baseline vs MIRO (and ablations) trained and evaluated on the built-in benchmark.

# Sized for the 45 minutes the experiment may take on 2 CPU cores: ten runs trained two at a time (one core each,
# ~45 images/s each) and the evaluations of 146 held-out images two at a time (~55 s each); the first run on a
# machine adds ~3 min to build the world and train shapes_clip on it. The budget is short, so the shared recipe is
# tuned for it, on the baseline's own training loss:
# - lr 5e-3 after a short warm-up: with the cpu preset's 1e-3 both models were still near their zero-output
#   initialisation at step 100 (mean loss over steps 51-100 1.05-1.08 against 0.44-0.70);
# - batch 16, not the cpu preset's 32: the same images per second on one core, so twice the optimizer steps for
#   the same 16k images and CPU time, and far more progress (baseline loss after 8k images 0.12 against 0.18,
#   at the end 0.095 against 0.124; its metrics then level off instead of still climbing at the end).
# Evaluations are denser early, where speedups are decided. quick: a few minutes, just the baseline and MIRO.
CONVERGENCE_PRESETS = {
    "full": dict(steps=1000, batch_size=16, warmup=50, lr=5e-3, eval_steps=(100, 200, 300, 400, 600, 800, 1000),
                 n_per_prompt=4, min_per_task=16, sample_steps=20, ablations=True),
    "quick": dict(steps=400, batch_size=16, warmup=50, lr=5e-3, eval_steps=(200, 400), n_per_prompt=2,
                  min_per_task=8, sample_steps=10, ablations=False),
}


# As in the paper, the judge of alignment is not a signal the generator was conditioned on: MIRO conditions on the
# learned, imperfect shapes_clip (rewards.py), while the rule-based `alignment` reward and the GenEval-style
# detector only judge. shapes_clip is reported as one more metric.
CONVERGENCE_CONDITION = ("shapes_clip", "sharpness", "cleanliness", "contrast")


def prepare_convergence_data(condition: list[str], judges: list[str]) -> dict[str, dict]:
    """Before any training run (parallel runs would otherwise race to do it): build the default built-in world,
    train shapes_clip on it once if it conditions or judges (into the world's folder; skipped when there, unless an
    older training recipe made it), and annotate the world with the built-in rewards and the condition. Returns the
    judges' reward options.
    shapes_clip lives beside the annotations it made, one per world, so every experiment on that world is judged by
    the model whose scores it was conditioned on."""
    script = str(Path(__file__).with_name("rewards.py"))
    options, rescore = {}, []
    if "shapes_clip" in {*condition, *judges}:
        ckpt = data.WorldConfig().default_dir() / rewards.SHAPES_CLIP_FILE
        if rewards.shapes_clip_recipe(ckpt) != rewards.TRAIN_CLIP_RECIPE:  # missing, or trained the old way
            subprocess.run([sys.executable, script, "train-clip", "--out", str(ckpt)], check=True)
            rescore = ["--rescore", "shapes_clip"]  # scores of an earlier shapes_clip would otherwise be kept
        options["shapes_clip"] = {"checkpoint": str(ckpt)}
    names = ",".join(dict.fromkeys([*rewards.BUILTIN_REWARDS, *condition]))
    flags = [f for name, o in options.items() for k, v in o.items() for f in ("--reward-option", f"{name}.{k}={v}")]
    flags += rescore
    subprocess.run([sys.executable, script, "annotate", "--rewards", names, *flags], check=True)
    return options


def convergence_runs(condition: list[str], ablations: bool, extra_seeds=()) -> dict[str, list[str]]:
    """Run name -> extra train.py flags: the baseline, MIRO on every reward, and (ablations) one model per single
    reward and one leaving each reward out, all with the same seed, data, architecture and budget; then the
    baseline and MIRO again with each of `extra_seeds` (baseline_seedS, miro_seedS) to measure the seed spread."""
    runs = {"baseline": ["--no-rewards"], "miro": ["--rewards", ",".join(condition)]}
    if ablations:
        for r in condition:
            runs[f"only_{r}"] = ["--rewards", r]
        for r in condition:
            runs[f"without_{r}"] = ["--rewards", ",".join(x for x in condition if x != r)]
    for s in extra_seeds:  # a later --seed overrides the common one
        runs.update({f"{pair}_seed{s}": [*runs[pair], "--seed", str(s)] for pair in ("baseline", "miro")})
    return runs


def train_runs(runs: dict[str, list[str]], common: list[str], out: Path, jobs: int):
    """Train every run with train.py in subprocesses, `jobs` at a time (1 torch thread each when jobs > 1: two
    single-thread runs beat one two-thread run on 2 cores). A finished run is skipped, a started one resumed."""
    pending, active = list(runs.items()), []
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if jobs > 1 else {})}
    while pending or active:
        while pending and len(active) < jobs:
            name, flags = pending.pop(0)
            run = out / name
            if (run / "done").exists():
                continue
            resume = ["--resume", str(run)] if (run / "ckpt.pt").exists() else []
            cmd = [sys.executable, str(Path(__file__).with_name("train.py")), "--runs-dir", str(out), "--name", name,
                   *common, *flags, *resume]
            logfile = open(out / f"{name}.train.log", "a")
            active.append((name, subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env), logfile))
            log(f"training {name}: {' '.join(cmd[1:])}")
        time.sleep(1)
        for entry in list(active):
            name, proc, logfile = entry
            if proc.poll() is not None:
                active.remove(entry)
                logfile.close()
                if proc.returncode != 0:
                    raise RuntimeError(f"training {name} failed (exit {proc.returncode}); see {out / name}.train.log")
                (out / name / "done").touch()
                log(f"trained {name}")


def eval_key(run, step, targets=None) -> str:
    """The evals.json key of one evaluation: run/step, plus /targets for non-default positive targets."""
    return f"{run}/{step}" + (f"/{targets}" if targets else "")


def evaluate_all(jobs, cache, cache_path, args, out, total):
    """Evaluate every (run, step, targets) not yet in `cache` on the held-out prompts, --jobs at a time in threads
    with 1 torch thread each (as for training, two single-thread evaluations beat one two-thread one on 2 cores;
    torch releases the GIL in its kernels), writing the cache after each so an interrupted run resumes."""

    def evaluate_one(job):
        run, step, targets = job
        ckpt = train.kept_checkpoint(out / run, step) if step != total else out / run / "ckpt.pt"
        ctx = Context(argparse.Namespace(**{**vars(args), "rewards": targets or ""}), ckpt)
        items = evaluation_items("heldout", ctx.world, args.n_per_prompt, args.min_per_task)
        return flat_metrics(summarize(ctx.run(items, ctx.judges()), items))

    todo = [job for job in dict.fromkeys(jobs) if eval_key(*job) not in cache]
    threads = torch.get_num_threads()
    if args.jobs > 1:
        torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            for job, future in [(job, pool.submit(evaluate_one, job)) for job in todo]:
                key = eval_key(*job)
                cache[key] = future.result()
                write_json(cache_path, cache)
                log(f"evaluated {key}: " + ", ".join(f"{k} {v:.3f}" for k, v in cache[key].items()))
    finally:
        torch.set_num_threads(threads)


def check_convergence_settings(out: Path, runs: dict[str, list[str]], evaluation: dict):
    """Refuse an --out made with other settings, else record them in out/settings.json: runs (name -> its train.py
    flags) and the evaluation's settings. A rerun skips finished runs and reuses cached evaluations, so without
    this their numbers would silently be those of the old settings. New runs (ablations, seeds) may be added."""
    path = out / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        changed = [name for name in runs if old["runs"].get(name, runs[name]) != runs[name]]
        changed += ["the evaluation"] if old["evaluation"] != evaluation else []
        if changed:
            raise ValueError(f"{out} holds runs and evaluations made with other settings ({', '.join(changed)}): "
                             f"use another --out, or delete it")
        runs = {**old["runs"], **runs}
    elif (out / "evals.json").exists() or any((out / name).exists() for name in runs):
        raise ValueError(f"{out} holds runs or evaluations but no settings.json (an older evaluate.py made them): "
                         f"use another --out, or delete it")
    write_json(path, {"runs": runs, "evaluation": evaluation})


def cmd_convergence(args, _ctx=None):
    """Train, evaluate every kept checkpoint of the baseline and MIRO and the final ones of the ablations, then
    compute the paper's speedup (and the matched one, see speedup) for every metric and write the curves (PNG) and
    a Table-1-style table. MIRO is conditioned on --condition (by default the learned shapes_clip, trained once on
    the built-in world, in place of the rule-based alignment); the judges are the built-in rewards, the condition
    and the GenEval-style detector."""
    preset = dict(CONVERGENCE_PRESETS["quick" if args.quick else "full"])
    total = preset["steps"] = args.train_steps or preset["steps"]
    steps = (list(range(args.eval_every, total + 1, args.eval_every)) if args.eval_every else
             [s for s in preset["eval_steps"] if s < total])
    steps = preset["eval_steps"] = sorted({*steps, total})  # the final checkpoint is always evaluated
    keep_every = math.gcd(*steps)
    out = args.out
    condition = [r for r in args.condition.split(",") if r]
    extra_seeds = [args.seed + k for k in range(1, args.repeat_seeds + 1)]
    runs = convergence_runs(condition, preset["ablations"] and not args.no_ablations, extra_seeds)
    pairs = [("baseline", "miro"), *((f"baseline_seed{s}", f"miro_seed{s}") for s in extra_seeds)]
    curve_runs = [run for pair in pairs for run in pair]
    for run in curve_runs:  # only the curves need their intermediate checkpoints
        runs[run] += ["--keep-every", str(keep_every)]
    common = ["--preset", "cpu", "--seed", str(args.seed), "--steps", str(total), "--batch-size",
              str(preset["batch_size"]), "--warmup", str(preset["warmup"]), "--lr", str(preset["lr"]),
              "--ckpt-every", str(keep_every), "--sample-every", "0", "--log-every", str(keep_every)]
    judges = args.judge_rewards.split(",")  # the built-in rewards and the condition (parse_args)
    args.steps, args.n_per_prompt = preset["sample_steps"], preset["n_per_prompt"]
    args.min_per_task = preset["min_per_task"]
    # What the evaluations' numbers depend on (not --jobs, --batch-size or --device: at most rounding).
    evaluation = {"version": EVALUATION_VERSION, "seed": args.seed, "sample_steps": args.steps,
                  "n_per_prompt": args.n_per_prompt, "min_per_task": args.min_per_task, "cfg": args.cfg,
                  "judges": judges, "reward_options": args.reward_options, "detector": args.detector,
                  "detector_options": args.detector_options,
                  **({"bf16": True} if uses_bf16(args.precision, args.device) else {})}  # (fp32: as older folders)
    check_convergence_settings(out, {name: [*common, *flags] for name, flags in runs.items()}, evaluation)
    t0 = time.time()
    args.reward_options = {**args.reward_options, **prepare_convergence_data(condition, judges)}
    train_runs(runs, common, out, args.jobs)
    train_minutes = (time.time() - t0) / 60

    cache_path = out / "evals.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    ablations = [run for run in runs if run not in curve_runs]
    repeats = curve_runs[2:]  # the repeated seeds' curves, evaluated last
    jobs = [(run, s, None) for run in ("baseline", "miro") for s in steps]
    jobs += [("miro", total, args.tuned_target), *((run, total, None) for run in ablations)]
    jobs += [(run, s, None) for run in repeats for s in steps]
    evaluate_all(jobs, cache, cache_path, args, out, total)

    def metrics_of(run, step, targets=None):
        return cache[eval_key(run, step, targets)]

    curves = {run: [metrics_of(run, s) for s in steps] for run in curve_runs}
    metrics = list(curves["miro"][-1])
    table = {"baseline": curves["baseline"][-1], "MIRO": curves["miro"][-1],
             f"MIRO, target {args.tuned_target}": metrics_of("miro", total, args.tuned_target)}
    table.update({run: metrics_of(run, total) for run in ablations})
    seed_pairs = {str(seed): pair for seed, pair in zip([args.seed, *extra_seeds], pairs)}
    series = {run: {m: [c[m] for c in curves[run]] for m in metrics} for run in curve_runs}

    def speedups_of(base, miro, matched):  # diversity has no better direction to reach
        return {m: speedup(steps, base[m], miro[m], matched) for m in metrics if m != "diversity"}
    seed_speedups, seed_matched = ({seed: speedups_of(series[base], series[miro], matched)
                                    for seed, (base, miro) in seed_pairs.items()} for matched in (False, True))
    speedups, matched_speedups = seed_speedups[str(args.seed)], seed_matched[str(args.seed)]

    def spell(row):
        return ", ".join(f"{m} {format_speedup(s)}" for m, s in row.items())
    log(format_table(table, metrics))
    log(f"speedup (baseline steps / MIRO steps to reach the baseline's final value and stay): {spell(speedups)}")
    log(f"matched speedup (steps the baseline needed to reach its final value and stay / MIRO's): "
        f"{spell(matched_speedups)}")
    lines = {m: {"baseline": series["baseline"][m], "MIRO": series["miro"][m]} for m in metrics}
    styles, mean_speedups, mean_matched = {}, {}, {}
    if extra_seeds:  # one seed's curves wander by about the gap between the models: show the mean over seeds too
        mean = {label: {m: np.mean([series[pair[i]][m] for pair in seed_pairs.values()], 0).tolist()
                        for m in metrics} for i, label in enumerate(("baseline", "MIRO"))}
        mean_speedups, mean_matched = (speedups_of(mean["baseline"], mean["MIRO"], m) for m in (False, True))
        for label, color in (("baseline", "C0"), ("MIRO", "C1")):
            mean_label = f"{label}, {len(seed_pairs)}-seed mean"
            styles.update({label: {"color": color, "alpha": 0.45},
                           mean_label: {"color": color, "linestyle": "--", "marker": "s"}})
            for m in metrics:
                lines[m][mean_label] = mean[label][m]
    plot_curves(out / "convergence.png", steps, lines, "training step",
                "baseline vs MIRO on the held-out built-in prompts" +
                (f" (solid: seed {args.seed}; dashed: mean of {len(seed_pairs)} seeds)" if extra_seeds else ""), styles)
    write_text(out / "table.md", format_table(table, metrics) + "\n")
    seeds = {}
    if extra_seeds:
        seeds = {label: {seed: curves[pair[i]][-1] for seed, pair in seed_pairs.items()}
                 for i, label in enumerate(("baseline", "MIRO"))}
        tables = [format_seed_table(seeds, metrics)]
        for title, per_seed, on_mean in (("speed-up", seed_speedups, mean_speedups),
                                         ("matched speed-up", seed_matched, mean_matched)):
            rows = {f"seed {seed}": row for seed, row in per_seed.items()}
            rows[f"mean curve of {len(seed_pairs)} seeds"] = on_mean
            tables.append(format_speedup_table(rows, title))
        text = "\n\n".join(tables)
        log(text)
        write_text(out / "seeds.md", text + "\n")
    return {"steps": steps, "curves": curves, "table": table, "speedup": speedups, "matched_speedup": matched_speedups,
            "seeds": seeds, "seed_speedups": seed_speedups if extra_seeds else {},
            "seed_matched_speedups": seed_matched if extra_seeds else {}, "mean_speedups": mean_speedups,
            "mean_matched_speedups": mean_matched,
            "train_minutes": train_minutes, "total_minutes": (time.time() - t0) / 60, "preset": preset}


# ----------------------------------------------------------------------------------------------------------------
# Command line.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    commands = {"geneval": "GenEval's protocol, images written in GenEval's folder layout",
                "rewards": "mean and 95%% CI (clustered by prompt) of every reward over a prompt set",
                "diversity": "mean pairwise distance between the samples of each prompt",
                "tradeoff": "sweep one reward's positive target, or the guidance weight, and report every metric",
                "tts": "best-of-N test-time scaling, MIRO vs the baseline",
                "usage": "how much the model uses each reward and the caption (loss rise when shuffled)",
                "convergence": "train the baseline and MIRO (and ablations), curves, speedups and a table"}
    ckpt_help = "checkpoint or run folder (default: the latest runs/*/ckpt.pt)"
    for name, help_ in commands.items():
        s = sub.add_parser(name, help=help_, description=globals()[f"cmd_{name}"].__doc__)  # shown as written
        s.add_argument("--out", default=None, help="output folder (default: RUN/eval, or runs/convergence)")
        s.add_argument("--seed", type=data.seed_arg, default=0, help="noise seed (training seed for convergence)")
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
        s.add_argument("--batch-size", type=int, default=64, help="images per batch")
        if name == "usage":  # no sampling, no judges: a checkpoint and its training data
            s.add_argument("--ckpt", default=None, help=ckpt_help)
            s.add_argument("--samples", type=int, default=2000, help="training samples the loss is measured on")
            s.add_argument("--data-dir", default=None,
                           help="the run's built-in data folder (default: the one in its config.json)")
            s.set_defaults(reward_option=[], detector_option=[], judge_rewards="", cfg=None, rewards="")
            continue
        s.add_argument("--reward-option", action="append", default=[], metavar="NAME.KEY=VALUE",
                       help="an option for a judge reward, e.g. aesthetic.head=PATH (repeatable)")
        s.add_argument("--detector", default="shapes", choices=["shapes", "mask2former"],
                       help="GenEval detector: the built-in shapes detector or the real Mask2Former + CLIP")
        s.add_argument("--detector-option", action="append", default=[], metavar="KEY=VALUE",
                       help="an option for the mask2former detector (a GenEvalDetectorConfig field), e.g. "
                            "mask2former=DIR or clip=DIR for local copies (repeatable)")
        s.add_argument("--cfg", type=float, default=None, help="guidance weight (default: the checkpoint's)")
        s.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                       help="the generator in fp32 or under bf16 autocast; default bf16 on CUDA, fp32 elsewhere")
        if name == "convergence":  # its judges are the built-in rewards and --condition; its targets all 1
            s.add_argument("--quick", action="store_true", help="baseline and MIRO only, 400 steps: a few minutes")
            s.add_argument("--train-steps", type=int, default=None,
                           help="training budget of every run, in optimizer steps of batch "
                                f"{CONVERGENCE_PRESETS['full']['batch_size']}")
            s.add_argument("--eval-every", type=int, default=None,
                           help="evaluate a checkpoint every this many steps (default: the preset's schedule, "
                                "denser early)")
            s.add_argument("--condition", default=",".join(CONVERGENCE_CONDITION),
                           help="rewards MIRO is conditioned on (default: the learned shapes_clip in place of the "
                                "rule-based alignment, which only judges; any annotated registry reward works)")
            s.add_argument("--no-ablations", action="store_true", help="skip the single-reward and leave-one-out runs")
            s.add_argument("--repeat-seeds", type=int, default=0,
                           help="also train the baseline and MIRO with this many more seeds (--seed + 1, ...) and "
                                "report the spread of their final metrics and their speed-ups in seeds.md "
                                "(~12 min more per seed)")
            s.add_argument("--tuned-target", default="contrast=0.625",
                           help="the positive targets of the table's tuned-target MIRO row (the paper's recipe: "
                                "the saturating image-statistics reward, aesthetic there, at 0.625, the rest at 1)")
            s.add_argument("--jobs", type=int, default=2,
                           help="training runs and evaluations at a time (1 torch thread each)")
            s.set_defaults(rewards="")
            continue
        s.add_argument("--judge-rewards", default=",".join(rewards.BUILTIN_REWARDS),
                       help="rewards that judge the images (default: the built-in ones)")
        s.add_argument("--rewards", default="", help="positive targets 'name=value,...' (default: all 1)")
        s.add_argument("--ckpt", default=None, help=ckpt_help)
        s.add_argument("--neg-prompt", default=None,
                       help="caption of MIRO's negative branch (default: the prompt itself, the paper's formula; "
                            "'' for the empty prompt, the authors' release option)")
        s.add_argument("--prompts", default="heldout",
                       help="'heldout' (the built-in world's held-out prompts) or a .jsonl (GenEval metadata), .tsv "
                            "(PartiPrompts) or .txt prompt file")
        if name != "tts":  # best-of-N draws --max-n candidates per prompt
            s.add_argument("--n-per-prompt", type=int, default=4, help="images per prompt (GenEval: 4)")
            s.add_argument("--min-per-task", type=int, default=16,
                           help="with --prompts heldout, repeat the prompts of small built-in tasks until each task "
                                "has this many images (prompt files are taken as they are)")
        s.add_argument("--steps", type=int, default=50, help="Euler steps")
        if name == "tradeoff":
            s.add_argument("--reward", required=True,
                           help="the reward whose positive target is swept, or 'cfg' for the guidance weight")
            s.add_argument("--values", default="0,0.25,0.5,0.75,1", help="targets (or guidance weights) of the sweep")
        if name == "tts":
            s.add_argument("--baseline", default=None, help="baseline checkpoint or run folder to compare with")
            s.add_argument("--select-by", default="alignment", help="the reward that picks the best of N")
            s.add_argument("--max-n", type=int, default=32, help="largest N (N = 1, 2, 4, ... and it)")
    args = p.parse_args(argv)
    for flag in ("batch_size", "n_per_prompt", "steps", "max_n", "jobs", "train_steps", "eval_every", "samples"):
        if getattr(args, flag, None) is not None and getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0")
    if args.cfg is not None and not (math.isfinite(args.cfg) and args.cfg >= 0):
        p.error("--cfg must be >= 0 and finite")
    if getattr(args, "min_per_task", 0) < 0:
        p.error("--min-per-task must be >= 0")
    if args.command == "diversity" and args.n_per_prompt < 2:
        p.error("--n-per-prompt: diversity compares a prompt's samples, so it needs at least 2")
    if getattr(args, "repeat_seeds", 0) < 0:
        p.error("--repeat-seeds must be >= 0")
    if args.seed + getattr(args, "repeat_seeds", 0) > data.MAX_SEED:  # the repeats train with --seed + 1, 2, ...
        p.error(f"--seed + --repeat-seeds must be <= {data.MAX_SEED}")
    if args.command in ("convergence", "usage") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # not sharded: every rank would run it whole (convergence: build, train and write into the same folder)
        jobs = "; it runs trainings and evaluations in parallel with --jobs" if args.command == "convergence" else ""
        p.error(f"{args.command} runs as one process, not under torchrun{jobs}")
    if args.command == "convergence":
        condition = [r for r in args.condition.split(",") if r]
        unknown = [r for r in condition if r not in rewards.REWARDS]
        if unknown or not condition:
            p.error(f"--condition: unknown reward(s) {', '.join(unknown) or '(none given)'}; known rewards: "
                    f"{', '.join(rewards.REWARDS)}")
        args.judge_rewards = ",".join(dict.fromkeys([*rewards.BUILTIN_REWARDS, *condition]))
    try:
        judges = [n for n in (args.judge_rewards + "," + getattr(args, "select_by", "")).split(",") if n]
        args.reward_options = rewards.parse_reward_options(args.reward_option, judges)
        args.detector_options = {}
        for item in args.detector_option:
            key, eq, value = item.partition("=")
            if not (eq and key):
                raise ValueError(f"--detector-option {item!r} is not of the form KEY=VALUE")
            args.detector_options[key] = value
        if args.command == "convergence":
            try:
                parse_reward_targets(args.tuned_target, args.condition.split(","), 1.0, owner="--condition")
            except ValueError as e:
                raise ValueError(f"--tuned-target: {e}") from None
    except ValueError as e:
        p.error(str(e))
    if args.command == "tts" and args.select_by not in args.judge_rewards.split(","):
        args.judge_rewards += "," + args.select_by
    return p, args


def run_settings(args, ctx) -> dict:
    """The settings behind a result's numbers: the parsed command line (paths as strings; the reward and detector
    options parsed, not as given; not the rank) and the guidance weight sampled with (--cfg or the checkpoint's)."""
    internal = {"command", "rank", "reward_option", "detector_option"}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in internal}
    if ctx is not None and args.command != "usage":  # usage does not sample
        settings["cfg"] = ctx.cfg
    return settings


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        args.rank, _, device = data.init_distributed(args.device)
        args.device = str(device)
        ctx = None if args.command == "convergence" else Context(args)
        default_out = Path("runs/convergence") if ctx is None else ctx.path.parent / "eval"
        args.out = Path(args.out) if args.out else default_out
        args.out.mkdir(parents=True, exist_ok=True)
        result = globals()[f"cmd_{args.command}"](args, ctx)
    except (OSError, ValueError, RuntimeError, subprocess.CalledProcessError) as e:
        parser.error(str(e))
    if args.rank == 0:
        path = args.out / f"{args.command}.json"
        write_json(path, {"command": args.command, "checkpoint": str(ctx.path) if ctx else None,
                          "step": ctx.ckpt["step"] if ctx else None, "settings": run_settings(args, ctx), **result})
        log(f"wrote {path}")
    if dist.is_initialized():
        dist.barrier()  # every rank leaves together, after rank 0 has written (as train.py)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
