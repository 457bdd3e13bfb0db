"""The built-in text-to-image dataset: a procedurally generated world of coloured shapes that mirrors GenEval.

    python data.py build --out data/shapes            # 20k training samples, a few seconds
    python data.py preview --out preview.png          # a captioned grid of samples to look at
    python data.py inspect shards/{00000..00009}.tar  # any real dataset: format, skip counts, records/s

Conventions (shared by the whole repo):
- Images are RGB, stored as uint8 (N, H, W, 3); rewards get float32 (B, 3, H, W) in [0, 1]; the generator works
  in [-1, 1] (`MiroDataset`). Boxes are [x0, y0, x1, y1] in pixels, x1/y1 exclusive, y pointing down.
- Every caption has GenEval metadata: {"tag", "include": [{"class", "count", ("color"), ("position")}],
  ("exclude"), "prompt"} with GenEval's six tags (TASKS). For "position" the REFERENCE object is include[0] and
  include[1] carries ["left of", 0] etc. (GenEval's order), so "a photo of a blue square left of a yellow
  triangle" has include[0] = the yellow triangle. Counting adds exclude {"class", "count": n + 1}.
  `caption_to_metadata(metadata_to_caption(m)) == m` for every caption the world writes; generic captions parse to
  None.
- Relations follow GenEval's rule (`relative_position`); position scenes satisfy the stated relation with a margin
  and no other relation, so a caption with a swapped relation is really wrong.
- Web-like quality (WorldConfig): `degrade_prob` of the images get 1-2 degradations (blur, noise, low contrast,
  JPEG, clutter) at random strengths; `wrong_caption_prob` of the captions are wrong in exactly one detail
  (colour, count, shape or relation) and `generic_caption_prob` say nothing ("a picture"). The rest are correct.
- Deterministic: sample i depends only on (cfg.seed, i) through np.random.default_rng([cfg.seed, i]).
- Held-out compositions: per task every composition (its include clauses, up to order: "a circle and a square"
  is "a square and a circle", "A left of B" is "B right of A") is enumerated and a seeded share is held out,
  at least one and at most all but one per task. With three shapes the single_object and two_object spaces have
  only 3 compositions each, so exactly 1 of 3 is held out there. No training caption (right or wrong) and no
  training sample's truth is a held-out composition; `heldout_prompts` lists them. What is held out is the
  caption, not every image of its content: details a caption leaves open are drawn at random, so an image
  captioned "a triangle left of a square" may be drawn orange and blue and show the held-out "an orange triangle
  left of a blue square" (with seed 0, some training image of the same task shows 7 of the 8 position and 5 of the
  8 counting evaluation prompts), and other tasks' images hold single objects and pairs.

Real image-text datasets (`open_dataset(path)` detects the format; every one is a stream of `Record`s):
- "folder": a folder of images (.jpg/.jpeg/.png/.webp, searched recursively), each with a same-name .txt caption
  and optionally a same-name .json ({"key", "caption", "short_caption", "synthetic_caption"}, other fields ignored).
- "manifest": a .jsonl or .csv file with columns image (or file_name; relative to the manifest's folder), caption,
  and optionally short_caption, synthetic_caption, key.
- "webdataset": tar shards as img2dataset writes them (key.jpg/.png/.webp + key.txt + key.json), given as a folder
  of .tar files, one .tar, or a brace pattern "shards/{00000..00009}.tar". Shards are streamed (tarfile "r|*", never
  extracted; member names are only split into key and extension, never used as paths).
- "shapes": the built-in world's folder (samples.jsonl + images.npy).
Keys: a "key" field (.json, manifest column) wins; otherwise the image's path relative to the folder / manifest
without extension, or the tar member name without extension. Captions: UTF-8 with invalid bytes replaced by U+FFFD
(a stray byte does not lose the sample), whitespace stripped, an empty optional caption counts as absent.
Skips: a sample that cannot be used is still yielded as a Record with image None and `error` one of SKIP_REASONS:
"no_caption" (missing / empty caption), "missing" (no such image file), "unreadable" (zero bytes, truncated, not an
image), "too_small" (shorter side < min_size), "too_large" (more than max_pixels pixels: the decompression-bomb guard,
read from the header before any decoding), "duplicate" (a key seen before: the first occurrence wins; folders and
manifests check the whole dataset, a webdataset stream checks what one consumer reads, so keys must be unique across
shards as img2dataset makes them; rewards.annotate counts and reports a key that two consumers met). Each source
counts its outcomes in `source.stats` ({"ok": n, reason: n, ...}, this process only).
"""
import argparse
import colorsys
import csv
import hashlib
import io
import json
import os
import posixpath
import re
import tarfile
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from itertools import combinations, permutations
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------------
# The world: vocabulary, GenEval metadata <-> caption.

SHAPES = ("circle", "square", "triangle")
COLORS = {  # saturated palette, hues about 0, 30, 54, 130, 223, 279 degrees apart
    "red": (215, 35, 35), "orange": (240, 130, 20), "yellow": (230, 210, 20),
    "green": (40, 160, 60), "blue": (40, 90, 215), "purple": (140, 50, 190)}
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
DEGRADATIONS = ("blur", "noise", "low_contrast", "jpeg", "clutter")
NUMBERS = {2: "two", 3: "three", 4: "four"}  # count 1 is the article "a"/"an"
GENERIC_CAPTIONS = ("a photo", "a picture", "an image", "a photo of some shapes", "an image of some shapes",
                    "a picture of shapes", "a photo of something", "a simple drawing")
PREFIX = "a photo of "
DATA_VERSION = 1  # bump when generation changes, so cached datasets get rebuilt


def vocabulary() -> list[str]:
    """Every word a caption can contain, in a fixed order (tokenizers index it)."""
    words = ["a", "an", "photo", "of", "and", *NUMBERS.values(), *COLORS, *SHAPES, *(s + "s" for s in SHAPES)]
    words += [w for rel in RELATIONS for w in rel.split()]
    words += [w for c in GENERIC_CAPTIONS for w in c.split()]
    return list(dict.fromkeys(words))


def _noun_phrase(clause: dict) -> str:
    n = clause["count"]
    words = ([clause["color"]] if clause.get("color") else []) + [clause["class"] + ("s" if n > 1 else "")]
    article = NUMBERS[n] if n > 1 else ("an" if words[0][0] in "aeiou" else "a")
    return " ".join([article] + words)


def metadata_to_caption(meta: dict) -> str:
    """GenEval metadata -> caption in GenEval's phrasing ("prompt" is ignored, recomputed)."""
    tag, inc = meta["tag"], meta["include"]
    if tag in ("single_object", "colors", "counting"):
        return PREFIX + _noun_phrase(inc[0])
    if tag in ("two_object", "color_attr"):
        return PREFIX + _noun_phrase(inc[0]) + " and " + _noun_phrase(inc[1])
    if tag == "position":
        return PREFIX + _noun_phrase(inc[1]) + f" {inc[1]['position'][0]} " + _noun_phrase(inc[0])
    raise ValueError(f"unknown tag {tag!r}; expected one of {TASKS}")


def _parse_noun_phrase(text: str) -> dict | None:
    words = text.split()
    if len(words) not in (2, 3):
        return None
    count = {"a": 1, "an": 1, **{w: n for n, w in NUMBERS.items()}}.get(words[0])
    noun = words[-1][:-1] if count and count > 1 and words[-1].endswith("s") else words[-1]
    color = words[1] if len(words) == 3 else None
    if count is None or noun not in SHAPES or (color is not None and color not in COLORS):
        return None
    clause = {"class": noun, "count": count, **({"color": color} if color else {})}
    return clause if _noun_phrase(clause) == text else None  # rejects "an red", "two circle", ...


def caption_to_metadata(caption: str) -> dict | None:
    """Caption -> GenEval metadata (with "prompt"), or None for generic / unparseable text."""
    if not caption.startswith(PREFIX):
        return None
    rest = caption[len(PREFIX):]
    for sep in [f" {rel} " for rel in RELATIONS] + [" and "]:
        if sep in rest:
            a, b = (_parse_noun_phrase(p) for p in rest.split(sep, 1))
            if not a or not b or a["count"] != 1 or b["count"] != 1 or ("color" in a) != ("color" in b):
                return None
            if sep == " and ":
                return make_metadata("color_attr" if "color" in a else "two_object", [a, b])
            return make_metadata("position", [b, {**a, "position": [sep.strip(), 0]}])  # reference first
    clause = _parse_noun_phrase(rest)
    if clause is None:
        return None
    return make_metadata("counting" if clause["count"] > 1 else "colors" if "color" in clause else "single_object",
                         [clause])


def make_metadata(tag: str, include: list[dict]) -> dict:
    """Complete GenEval metadata from tag and include clauses (adds the counting exclude and the prompt)."""
    meta = {"tag": tag, "include": include}
    if tag == "counting":
        meta["exclude"] = [{"class": include[0]["class"], "count": include[0]["count"] + 1}]
    meta["prompt"] = metadata_to_caption(meta)
    return meta


def _clause(shape, count=1, color=None, position=None) -> dict:
    return {"class": shape, "count": count, **({"color": color} if color else {}),
            **({"position": [position, 0]} if position else {})}


def composition_key(meta: dict) -> str:
    """A canonical string for a composition, the same for every phrasing of it (clause order, mirrored relation)."""
    inc = [dict(c) for c in meta["include"]]
    forms = [inc]
    if meta["tag"] in ("two_object", "color_attr"):
        forms.append(inc[::-1])
    elif meta["tag"] == "position":
        ref, tgt = inc
        rel = tgt["position"][0]
        forms.append([{k: v for k, v in tgt.items() if k != "position"}, {**ref, "position": [OPPOSITE[rel], 0]}])
    return min(json.dumps([meta["tag"], f], sort_keys=True) for f in forms)


# ----------------------------------------------------------------------------------------------------------------
# Configuration, compositions and the held-out split.

@dataclass
class WorldConfig:
    """Everything that determines the built-in dataset (saved as world.json beside it)."""
    image_size: int = 32                # pixels per side; object sizes, gaps and degradations scale with it
    num_train: int = 20000              # training samples (a fixed set, annotated once like a real dataset)
    seed: int = 0                       # sample i is a function of (seed, i) only
    degrade_prob: float = 0.5           # share of images with 1-2 degradations, strengths uniform in [0.15, 1]
    wrong_caption_prob: float = 0.2     # share of captions wrong in exactly one detail
    generic_caption_prob: float = 0.1   # share of captions that say nothing ("a picture"); the rest is correct
    colored_prob: float = 0.5           # share of counting / position captions that name colours
    heldout_fraction: float = 0.15      # share of each task's compositions held out (at least 1, at most n-1)
    heldout_prompts_per_task: int = 8   # held-out prompts listed per task by heldout_prompts

    def default_dir(self) -> Path:
        """Where train.py and `rewards.py annotate` build and annotate this world unless told otherwise."""
        return Path("runs") / "_data" / f"shapes{self.image_size}_n{self.num_train}_seed{self.seed}"


def _enumerate_compositions(tag: str) -> list[dict]:
    """All compositions of a task, one metadata dict per composition_key, in a fixed order."""
    pairs = list(combinations(SHAPES, 2))
    color_pairs = list(permutations(COLORS, 2))
    if tag == "single_object":
        incs = [[_clause(s)] for s in SHAPES]
    elif tag == "two_object":
        incs = [[_clause(a), _clause(b)] for a, b in pairs]
    elif tag == "counting":
        incs = [[_clause(s, n, c)] for n in NUMBERS for s in SHAPES for c in (None, *COLORS)]
    elif tag == "colors":
        incs = [[_clause(s, 1, c)] for s in SHAPES for c in COLORS]
    elif tag == "color_attr":
        incs = [[_clause(a, 1, ca), _clause(b, 1, cb)] for a, b in pairs for ca, cb in color_pairs]
    elif tag == "position":
        incs = [[_clause(a, 1, ca), _clause(b, 1, cb, rel)]
                for a, b in permutations(SHAPES, 2) for rel in RELATIONS for ca, cb in [(None, None), *color_pairs]]
    else:
        raise ValueError(f"unknown tag {tag!r}")
    unique = {}
    for inc in incs:
        meta = make_metadata(tag, inc)
        unique.setdefault(composition_key(meta), meta)
    return list(unique.values())


@lru_cache(maxsize=16)
def _heldout(seed: int, fraction: float) -> dict[str, list[dict]]:
    """Per task the held-out compositions (metadata dicts), in a seeded order."""
    out = {}
    for t, tag in enumerate(TASKS):
        comps = _enumerate_compositions(tag)
        rng = np.random.default_rng([seed, 2**32 - 1, t])  # a stream no sample index uses
        n = min(max(int(round(fraction * len(comps))), 1), len(comps) - 1)
        chosen = [comps[i] for i in rng.permutation(len(comps))[:n]]
        if tag == "position":  # show both phrasings of a relation across the held-out prompts
            chosen = [_mirror(m) if rng.random() < 0.5 else m for m in chosen]
        out[tag] = chosen
    return out


@lru_cache(maxsize=16)
def _heldout_keys(seed: int, fraction: float) -> frozenset[str]:
    return frozenset(composition_key(m) for ms in _heldout(seed, fraction).values() for m in ms)


def _mirror(meta: dict) -> dict:
    """'A left of B' -> 'B right of A' (the same composition)."""
    ref, tgt = meta["include"]
    tgt = dict(tgt)
    rel = tgt.pop("position")[0]
    return make_metadata("position", [tgt, {**ref, "position": [OPPOSITE[rel], 0]}])


def heldout_prompts(cfg: WorldConfig) -> list[dict]:
    """Up to cfg.heldout_prompts_per_task held-out GenEval metadata dicts per task (never a training caption)."""
    held = _heldout(cfg.seed, cfg.heldout_fraction)
    return [json.loads(json.dumps(m)) for tag in TASKS for m in held[tag][:cfg.heldout_prompts_per_task]]


def _pick(rng: np.random.Generator, seq):
    """A uniformly random element of a sequence, as its own Python type (rng.choice would give numpy scalars)."""
    return seq[rng.integers(len(seq))]


def _sample_composition(tag: str, cfg: WorldConfig, rng: np.random.Generator) -> dict:
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    colors = [list(COLORS)[i] for i in rng.permutation(len(COLORS))]
    colored = rng.random() < cfg.colored_prob
    if tag == "single_object":
        inc = [_clause(shapes[0])]
    elif tag == "two_object":
        inc = [_clause(shapes[0]), _clause(shapes[1])]
    elif tag == "counting":
        inc = [_clause(shapes[0], int(rng.integers(2, 5)), colors[0] if colored else None)]
    elif tag == "colors":
        inc = [_clause(shapes[0], 1, colors[0])]
    elif tag == "position":
        rel = _pick(rng, RELATIONS)
        ca, cb = colors[:2] if colored else (None, None)
        inc = [_clause(shapes[0], 1, ca), _clause(shapes[1], 1, cb, rel)]
    else:  # color_attr
        inc = [_clause(shapes[0], 1, colors[0]), _clause(shapes[1], 1, colors[1])]
    return make_metadata(tag, inc)


def corrupt_metadata(meta: dict, rng: np.random.Generator) -> tuple[dict, str]:
    """Change exactly one detail (colour, count, shape or relation) of a composition; returns (meta, detail).

    Shapes (and colours of two-object tasks) stay distinct, so the wrong caption is still a valid world caption.
    """
    inc = [dict(c) for c in meta["include"]]
    details = ["shape"] + (["color"] if any("color" in c for c in inc) else [])
    details += ["count"] if meta["tag"] == "counting" else []
    details += ["relation"] if meta["tag"] == "position" else []
    detail = _pick(rng, details)
    if detail == "shape":
        i = int(rng.integers(len(inc)))
        inc[i]["class"] = _pick(rng, [s for s in SHAPES if all(c["class"] != s for c in inc)])
    elif detail == "color":
        i = _pick(rng, [j for j, c in enumerate(inc) if "color" in c])
        inc[i]["color"] = _pick(rng, [k for k in COLORS if all(c.get("color") != k for c in inc)])
    elif detail == "count":
        inc[0]["count"] = _pick(rng, [n for n in NUMBERS if n != inc[0]["count"]])
    else:
        inc[1]["position"] = [_pick(rng, [r for r in RELATIONS if r != inc[1]["position"][0]]), 0]
    return make_metadata(meta["tag"], inc), detail


# ----------------------------------------------------------------------------------------------------------------
# Layout: non-overlapping boxes; GenEval's relation rule.

def _relation_offset(box_a, box_b) -> np.ndarray:
    """GenEval's (dx, dy) of A relative to B: centre offset shrunk by 0.1 * (dim_a + dim_b) per axis, / |offset|.

    Boxes are (..., 4) arrays (broadcast); returns (..., 2), zero where the shrunk offset vanishes.
    """
    a, b = np.asarray(box_a, float), np.asarray(box_b, float)
    offset = (a[..., :2] + a[..., 2:]) / 2 - (b[..., :2] + b[..., 2:]) / 2
    dims = (a[..., 2:] - a[..., :2]) + (b[..., 2:] - b[..., :2])
    revised = np.maximum(np.abs(offset) - 0.1 * dims, 0) * np.sign(offset)
    norm = np.linalg.norm(offset, axis=-1, keepdims=True)
    return np.where(np.abs(revised).max(-1, keepdims=True) < 1e-3, 0.0, revised / np.maximum(norm, 1e-12))


def relative_position(box_a, box_b) -> set[str]:
    """GenEval's relations of box A relative to box B (y down): subset of RELATIONS."""
    dx, dy = _relation_offset(box_a, box_b)
    return {r for r, hit in zip(RELATIONS, (dx < -0.5, dx > 0.5, dy < -0.5, dy > 0.5)) if hit}


SUPERSAMPLE = 4  # render at 4x then box-downsample: anti-aliased edges, boxes on a quarter-pixel grid


def _place(sizes, size, rng, relation=None, tries=64):
    """Boxes for objects of the given side lengths, inside the image, pairwise >= 2 px apart (scaled).

    Objects are placed one by one, each at the first of `tries` random candidates that fits. With `relation`, two
    objects (reference, target) are placed so that GenEval reads exactly that relation of the target to the
    reference, with a margin (main component >= 0.7, cross component <= 0.3). Returns None on failure.
    """
    scale = size / 32
    margin, gap = 1.0 * scale, 2.0 * scale
    boxes = np.zeros((0, 4))
    for s in sizes:
        xy = np.floor(rng.uniform(margin, size - margin - s, (tries, 2)) * SUPERSAMPLE) / SUPERSAMPLE
        cand = np.concatenate([xy, xy + s], 1)                                          # (T, 4)
        c, b = cand[:, None], boxes[None]                                               # (T, 1, 4), (1, K, 4)
        near = ((c[..., 0] < b[..., 2] + gap) & (b[..., 0] < c[..., 2] + gap)
                & (c[..., 1] < b[..., 3] + gap) & (b[..., 1] < c[..., 3] + gap))      # (T, K)
        ok = ~near.any(1)
        if relation and len(boxes):
            dx, dy = _relation_offset(cand, boxes[0]).T
            main, cross = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
            ok &= (main >= 0.7) & (np.abs(cross) <= 0.3)
        if not ok.any():
            return None
        boxes = np.concatenate([boxes, cand[ok.argmax()][None]])
    return boxes.tolist()


def scene_from_metadata(meta: dict, size: int, rng: np.random.Generator) -> list[dict]:
    """A random scene that satisfies the metadata: list of {"class", "color", "box"} (reference first).

    Clauses without a colour get random palette colours (per object). Side lengths are 7-12 px at 32 px (smaller
    when 3-4 objects must fit), scaled with the image size.
    """
    objects = [{"class": c["class"], "color": c.get("color") or _pick(rng, list(COLORS))}
               for c in meta["include"] for _ in range(c["count"])]
    relation = meta["include"][1]["position"][0] if meta["tag"] == "position" else None
    hi = {1: 12, 2: 12, 3: 11}.get(len(objects), 10)
    for attempt in range(100):
        side = max(hi - attempt / 4, 7)  # shrink the objects if they do not fit
        sizes = np.round(rng.uniform(7, side, len(objects)) * size / 32 * SUPERSAMPLE) / SUPERSAMPLE
        boxes = _place(sizes, size, rng, relation)
        if boxes is not None:
            return [{**o, "box": b} for o, b in zip(objects, boxes)]
    raise RuntimeError(f"could not lay out {meta['prompt']!r} at {size} px")


# ----------------------------------------------------------------------------------------------------------------
# Rendering and degradations.

def _jitter_color(rgb, rng):
    """Small jitter that keeps the colour's name: hue +-3.6 degrees, saturation and value a few percent."""
    h, s, v = colorsys.rgb_to_hsv(*(np.array(rgb) / 255))
    h = (h + rng.uniform(-0.01, 0.01)) % 1
    s, v = s * rng.uniform(0.85, 1.0), min(v * rng.uniform(0.85, 1.05), 1)
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v))


def render_scene(objects: list[dict], size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """Clean image uint8 (size, size, 3) of the objects on a light, low-saturation background.

    Circles are discs, squares axis-aligned, triangles upright and isosceles, each filling its box; anti-aliased by
    rendering at SUPERSAMPLE x and box-downsampling.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    bg = np.clip(rng.uniform(225, 250) + rng.uniform(-8, 8, 3), 0, 255).astype(int)
    k = SUPERSAMPLE
    canvas = Image.new("RGB", (size * k, size * k), tuple(bg))
    draw = ImageDraw.Draw(canvas)
    for o in objects:
        x0, y0, x1, y1 = (int(round(v * k)) for v in o["box"])
        x1, y1 = x1 - 1, y1 - 1  # PIL boxes are inclusive
        fill = _jitter_color(COLORS[o["color"]], rng)
        if o["class"] == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif o["class"] == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif o["class"] == "triangle":
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o['class']!r}")
    return np.asarray(canvas.resize((size, size), Image.BOX))


def degrade(image: np.ndarray, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """One web-like degradation of a uint8 (H, W, 3) image at strength in (0, 1] (1 = strongest); returns uint8.

    blur: gaussian, sigma 0.4-1.6 px; noise: gaussian, std 0-30 / 255; low_contrast: blend towards the mean gray,
    keeping 100-25% of the contrast; jpeg: quality 60 down to 10; clutter: 2-9 thin lines (<= 6 px) and specks
    (1-2 px), gray or coloured, too small to pass for shapes. Pixel sizes are for 32 px and scale with the image.
    """
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    scale = image.shape[0] / 32
    if kind == "blur":
        return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur((0.4 + 1.2 * strength) * scale)))
    if kind == "noise":
        return np.clip(np.rint(image + rng.normal(0, 30 * strength, image.shape)), 0, 255).astype(np.uint8)
    if kind == "low_contrast":
        mean = image.mean()
        return np.clip(mean + (image - mean) * (1 - 0.75 * strength) + 0.5, 0, 255).astype(np.uint8)
    if kind == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=int(round(60 - 50 * strength)))
        return np.asarray(Image.open(buf).convert("RGB"))
    if kind == "clutter":
        img = Image.fromarray(image)
        draw = ImageDraw.Draw(img)
        h = image.shape[0]
        width = max(1, int(round(scale)))
        for _ in range(2 + int(round(7 * strength))):
            color = tuple(int(v) for v in (_jitter_color(_pick(rng, list(COLORS.values())), rng) if rng.random() < 0.5
                                           else np.full(3, rng.integers(40, 160))))
            x, y = rng.uniform(0, h, 2)
            if rng.random() < 0.5:  # a short thin line
                length, angle = rng.uniform(2, 6) * scale, rng.uniform(0, np.pi)
                draw.line([x, y, x + length * np.cos(angle), y + length * np.sin(angle)], fill=color, width=width)
            else:                   # a speck
                r = int(rng.integers(1, 3)) * width
                draw.rectangle([int(x), int(y), int(x) + r - 1, int(y) + r - 1], fill=color)
        return np.asarray(img)
    raise ValueError(f"unknown degradation {kind!r}; expected one of {DEGRADATIONS}")


# ----------------------------------------------------------------------------------------------------------------
# Samples.

def make_sample(index: int, cfg: WorldConfig) -> dict:
    """Training sample `index`, a function of (cfg.seed, index) only: dict(
        key, image uint8 (H,W,3), caption,
        metadata     GenEval metadata of the caption (None if generic),
        truth        GenEval metadata of what the image shows (the caption a correct sample would have),
        scene        the true content: list of {"class", "color", "box"},
        degradations [[kind, strength], ...] in the order applied,
        caption_kind "correct" | "wrong" | "generic", wrong_detail "color" | "count" | "shape" | "relation" | None)."""
    rng = np.random.default_rng([cfg.seed, index])
    tag = _pick(rng, TASKS)
    u = rng.random()  # the caption kind is drawn once, before resampling, so the shares stay as configured
    kind = ("generic" if u < cfg.generic_caption_prob else
            "wrong" if u < cfg.generic_caption_prob + cfg.wrong_caption_prob else "correct")
    heldout = _heldout_keys(cfg.seed, cfg.heldout_fraction)
    for _ in range(1000):  # resample until neither the scene nor the caption is a held-out composition
        truth = _sample_composition(tag, cfg, rng)
        meta, detail = corrupt_metadata(truth, rng) if kind == "wrong" else (truth, None)
        if composition_key(truth) not in heldout and composition_key(meta) not in heldout:
            break
    else:
        raise RuntimeError(f"no {tag} composition outside the held-out set; lower heldout_fraction")
    if kind == "generic":
        caption, meta = _pick(rng, GENERIC_CAPTIONS), None
    else:
        caption = meta["prompt"]
    scene = scene_from_metadata(truth, cfg.image_size, rng)
    image = render_scene(scene, cfg.image_size, rng)
    degradations = []
    if rng.random() < cfg.degrade_prob:
        for d in rng.choice(DEGRADATIONS, int(rng.integers(1, 3)), replace=False):
            strength = round(float(rng.uniform(0.15, 1.0)), 3)
            image = degrade(image, str(d), strength, rng)
            degradations.append([str(d), strength])
    return {"key": f"shapes-s{cfg.seed}-{index:06d}", "image": image, "caption": caption, "metadata": meta,
            "truth": truth, "scene": scene, "degradations": degradations, "caption_kind": kind, "wrong_detail": detail}


def _atomic_write(path: Path, write):
    """write(file) to a temporary file, fsync it, then rename it over path (readers never see a half-written file,
    nor a crash a torn one). The temporary name carries the process id, so two processes writing the same file
    never clobber each other's; a failed write removes it."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_shapes_dataset(cfg: WorldConfig, out_dir=None) -> Path:
    """Write out_dir/images.npy (N,H,W,3 uint8), samples.jsonl (one record per sample, no image) and world.json.

    world.json is written last and marks a complete dataset: nothing is done if it already matches cfg, and a
    folder holding another world (other WorldConfig fields) is a ValueError rather than rebuilt under the runs that
    read it; one written by an older DATA_VERSION of this module is rebuilt. out_dir defaults to cfg.default_dir().
    """
    out = Path(out_dir) if out_dir is not None else cfg.default_dir()
    world = {"version": DATA_VERSION, **asdict(cfg)}
    if (out / "world.json").exists():
        try:
            found = json.loads((out / "world.json").read_text())
        except (OSError, ValueError):
            found = {}
        other = [f"{k} {found.get(k)}, not {v}" for k, v in asdict(cfg).items() if found.get(k) != v]
        if other and found.get("version") == DATA_VERSION:
            raise ValueError(f"{out} holds another built-in world ({'; '.join(other[:3])}): give another folder, "
                             f"or delete this one")
        if found == world and (out / "images.npy").exists() and (out / "samples.jsonl").exists():
            return out
    elif out.is_dir():  # no world.json: empty, a build cut short, or someone's real data (never written into)
        foreign = sorted(p.name for p in out.iterdir()
                         if p.name not in ("images.npy", "samples.jsonl") and not p.name.endswith(".tmp"))
        if foreign:
            raise ValueError(f"{out} is not a built-in world's folder (it holds {', '.join(foreign[:3])}): real data "
                             f"is given with --data; the built-in world needs a folder of its own")
    out.mkdir(parents=True, exist_ok=True)
    (out / "world.json").unlink(missing_ok=True)
    images = np.empty((cfg.num_train, cfg.image_size, cfg.image_size, 3), np.uint8)
    lines = []
    for i in tqdm(range(cfg.num_train), desc="building shapes dataset", mininterval=1):
        s = make_sample(i, cfg)
        images[i] = s.pop("image")
        lines.append(json.dumps(s) + "\n")
    _atomic_write(out / "images.npy", lambda f: np.save(f, images))
    _atomic_write(out / "samples.jsonl", lambda f: f.write("".join(lines).encode()))
    _atomic_write(out / "world.json", lambda f: f.write(json.dumps(world, indent=1).encode()))
    return out


class ImageTextSamples:
    """A built dataset folder: .keys, .captions, .records (list of dicts), .images uint8 (N,H,W,3), .world
    (the WorldConfig, or None for data not made by this module)."""

    def __init__(self, path=None):
        path = Path(path) if path is not None else WorldConfig().default_dir()
        with open(path / "samples.jsonl") as f:
            self.records = [_json_line(line, path / "samples.jsonl", n) for n, line in enumerate(f, 1) if line.strip()]
        try:
            self.images = np.load(path / "images.npy", mmap_mode="r")
        except ValueError as e:  # a truncated or foreign file
            raise ValueError(f"{path / 'images.npy'}: not a complete image array ({e}); rebuild the dataset") from e
        if len(self.images) != len(self.records):
            raise ValueError(f"{path}: {len(self.images)} images but {len(self.records)} records")
        self.keys = [r["key"] for r in self.records]
        self.captions = [r["caption"] for r in self.records]
        world = json.loads((path / "world.json").read_text()) if (path / "world.json").exists() else None
        self.world = WorldConfig(**{k: v for k, v in world.items() if k != "version"}) if world else None

    def __len__(self):
        return len(self.records)

    def images_01(self, indices) -> torch.Tensor:
        """Float images (B, 3, H, W) in [0, 1] for a list / array / slice of indices."""
        batch = np.ascontiguousarray(self.images[indices])
        return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255


# ----------------------------------------------------------------------------------------------------------------
# Any image-text dataset as a stream of records (what rewards.py annotates; real formats plug in here).

@dataclass
class Record:
    """One sample of any dataset format: image is an RGB PIL image, or None when it could not be used (`error` then
    says why: unreadable, too small, ...); captions maps a caption field ("caption", "short_caption", ...) to text."""
    key: str
    image: "Image.Image | None"
    captions: dict
    error: str | None = None


class ShapesSource:
    """The built-in dataset folder (ImageTextSamples layout) as a record source."""
    format = "shapes"

    def __init__(self, path_or_samples):
        """A folder path, or an ImageTextSamples already open (as train.py has the built-in world)."""
        self.samples = (path_or_samples if isinstance(path_or_samples, ImageTextSamples)
                        else ImageTextSamples(path_or_samples))
        self.stats = {"ok": 0}  # every built sample is usable

    def __len__(self):
        return len(self.samples)

    def iter_records(self, rank: int = 0, world_size: int = 1, worker_id: int = 0, num_workers: int = 1,
                     seed=None, skip=(), need_caption=None):
        """Records of this consumer's samples (`consumer_indices`): in order, or shuffled by `seed`."""
        if need_caption not in (None, "caption"):
            return  # the built-in world captions each sample once
        for i in consumer_indices(len(self.samples), rank, world_size, worker_id, num_workers, seed):
            if self.samples.keys[i] in skip:
                continue
            self.stats["ok"] += 1
            yield Record(self.samples.keys[i], Image.fromarray(np.asarray(self.samples.images[i])),
                         {"caption": self.samples.captions[i]})


def consumer_indices(n: int, rank: int, world_size: int, worker_id: int, num_workers: int, seed=None) -> list[int]:
    """Sample indices of consumer rank * num_workers + worker_id out of world_size * num_workers: every consumer
    takes every consumers-th position of range(n), or of its permutation by np.random.default_rng(seed), so the
    consumers partition the samples (the same seed on every consumer)."""
    consumer, consumers = _consumer(rank, world_size, worker_id, num_workers)
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    return order[consumer::consumers].tolist()


def _consumer(rank: int, world_size: int, worker_id: int, num_workers: int) -> tuple[int, int]:
    """(consumer index, number of consumers) of a dataloader worker on a rank."""
    if not (0 <= rank < world_size and 0 <= worker_id < num_workers):
        raise ValueError(f"need 0 <= rank < world_size and 0 <= worker_id < num_workers, got rank {rank}, "
                         f"world_size {world_size}, worker_id {worker_id}, num_workers {num_workers}")
    return rank * num_workers + worker_id, world_size * num_workers


# ----------------------------------------------------------------------------------------------------------------
# Real image-text datasets: decoding and screening, then the three formats (module docstring: layouts and policies).

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SYNTHETIC = "synthetic_caption"  # the caption field of the paper's synthetic (re-)captions
CAPTION_FIELDS = ("caption", "short_caption", SYNTHETIC)
SKIP_REASONS = ("no_caption", "missing", "unreadable", "too_small", "too_large", "duplicate")
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb threshold (~89M pixels); Pillow itself refuses 2x


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency (alpha, or a palette / tRNS transparent colour) is composited on white;
    16- and 32-bit integer greys (16-bit PNG) are scaled from 0..65535 (Pillow's own convert would clip at 255);
    float greys are read as 0..1; L, 1, P, CMYK, YCbCr, LAB, HSV go through Pillow's convert."""
    if image.mode.startswith("I") or image.mode == "F":
        scale = 255 / 65535 if image.mode.startswith("I") else 255
        grey = np.asarray(image, dtype=np.float64) * scale
        image = Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(file, min_size: int = 0, max_pixels: int = MAX_PIXELS) -> tuple["Image.Image | None", str | None]:
    """Decode an image (path or binary file object) to RGB with its EXIF orientation applied: (image, None), or
    (None, reason) with reason "too_large" (more than max_pixels pixels, judged from the header before decoding),
    "too_small" (shorter side < min_size), "missing" (no such file) or "unreadable" (empty, truncated, not an image)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides, not a warning
            with Image.open(file) as image:
                if image.width * image.height > max_pixels:
                    return None, "too_large"
                if min(image.size) < min_size:
                    return None, "too_small"
                image.load()
                ImageOps.exif_transpose(image, in_place=True)  # no copy when there is no orientation tag
                return to_rgb(image), None
    except Image.DecompressionBombError:  # Pillow's own hard limit (2x its threshold), raised by Image.open
        return None, "too_large"
    except FileNotFoundError:  # told apart: a manifest with a wrong base folder misses every file
        return None, "missing"
    except Exception:  # corrupt data makes Pillow raise OSError, SyntaxError, ValueError, EOFError, zlib errors...
        return None, "unreadable"


def center_crop_resize(image: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, size, size): the centred min(W, H) square resized to size x size with Pillow's
    antialiased bicubic filter. The geometry of rewards.resize_center_crop (shorter side to `size`, centre crop),
    without its rounding of the crop offset to whole pixels."""
    w, h = image.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    out = image.resize((size, size), Image.BICUBIC, box=box)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)


def _text(raw) -> str:
    """Caption bytes or str (or None) -> stripped text; invalid UTF-8 bytes become U+FFFD, a leading byte-order
    mark (a Windows editor's .txt) is dropped."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8-sig", errors="replace")
    return raw.strip() if isinstance(raw, str) else ""


def _sidecar_fields(txt, meta) -> dict:
    """Caption fields and the raw "key" (None if absent) from a .txt caption (bytes or None) and a .json sidecar
    (bytes or None): the .txt gives "caption" (falling back to the .json's), the .json the other fields. A .json that
    does not parse is ignored: it is optional metadata, the sample is still good."""
    try:
        fields = json.loads(meta) if meta else {}
    except ValueError:
        fields = {}
    fields = fields if isinstance(fields, dict) else {}
    out = {f: _text(fields.get(f)) for f in CAPTION_FIELDS}
    out["caption"] = _text(txt) or out["caption"]
    return {**out, "key": fields.get("key")}


def _key(value, default: str) -> str:
    """A sample key from a "key" field (any JSON scalar, as text), or `default` when there is none."""
    return default if value in (None, "") else str(value)


class RealSource:
    """What the real formats share: the screening settings and `stats`, the outcome counts of the records this
    process has yielded ({"ok": n, skip reason: n}); subclasses yield records through `_record`."""

    def __init__(self, min_size: int = 0, max_pixels: int = MAX_PIXELS, decode: bool = True):
        self.min_size, self.max_pixels, self.decode = min_size, max_pixels, decode
        self.stats = dict.fromkeys(("ok", *SKIP_REASONS), 0)

    def _record(self, key: str, file, captions: dict, duplicate: bool = False) -> Record:
        """A counted Record; `file` (a path or binary file object) is decoded only when the sample is otherwise good
        and the source decodes (decode=False: captions only, image None, the image unread and unscreened)."""
        captions = {f: t for f, t in captions.items() if f in CAPTION_FIELDS and t}
        image, error = None, ("duplicate" if duplicate else None if captions.get("caption") else "no_caption")
        if error is None and self.decode:
            image, error = load_image(file, self.min_size, self.max_pixels)
        self.stats[error or "ok"] += 1
        return Record(key, image, captions, error)


class IndexedSource(RealSource):
    """A folder of images with .txt/.json sidecars ("folder") or a .jsonl/.csv manifest ("manifest"), indexed when
    opened: entries (key, image path, caption fields) in a fixed order, the first of each key marked to keep. The
    index lives in memory (a few hundred bytes per sample): fine up to a few million samples; beyond, use shards."""

    def __init__(self, format: str, entries: list[tuple[str, str, dict]], **screening):
        super().__init__(**screening)
        self.format, self.entries = format, entries
        seen = set()
        self.first = []  # False for a key seen before (yielded as a "duplicate" record)
        for key, _, _ in entries:
            self.first.append(key not in seen)
            seen.add(key)

    @classmethod
    def from_folder(cls, root: Path, **screening) -> "IndexedSource":
        entries = []
        for image in sorted(p for p in root.rglob("*") if p.suffix[1:].lower() in IMAGE_EXTENSIONS and p.is_file()):
            txt, meta = image.with_suffix(".txt"), image.with_suffix(".json")
            fields = _sidecar_fields(txt.read_bytes() if txt.is_file() else None,
                                     meta.read_bytes() if meta.is_file() else None)
            key = _key(fields.pop("key"), image.relative_to(root).with_suffix("").as_posix())
            entries.append((key, str(image), fields))
        if not entries:
            raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in this folder")
        return cls("folder", entries, **screening)

    @classmethod
    def from_manifest(cls, path: Path, **screening) -> "IndexedSource":
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:  # -sig: Excel's byte-order mark
            if path.suffix.lower() == ".csv":
                try:
                    rows = list(csv.DictReader(f))
                except csv.Error as e:  # e.g. a field over the csv module's 128 KiB limit
                    raise ValueError(f"{path}: not a readable CSV manifest ({e})") from None
            else:
                rows = [_json_line(line, path, n) for n, line in enumerate(f, 1) if line.strip()]
        entries = []
        for n, row in enumerate(rows, 1):
            image = (row.get("image") or row.get("file_name")) if isinstance(row, dict) else None
            if not image:
                raise ValueError(f"{path}: row {n} has no image path (columns: image or file_name, caption, "
                                 f"optional short_caption, synthetic_caption, key)")
            key = _key(row.get("key"), Path(str(image)).with_suffix("").as_posix())
            entries.append((key, str(path.parent / str(image)), {f: _text(row.get(f)) for f in CAPTION_FIELDS}))
        return cls("manifest", entries, **screening)

    def __len__(self):
        return len(self.entries)

    def iter_records(self, rank: int = 0, world_size: int = 1, worker_id: int = 0, num_workers: int = 1,
                     seed=None, skip=(), need_caption=None):
        """Records of this consumer's entries (`consumer_indices`): in index order, or shuffled by `seed`."""
        for i in consumer_indices(len(self.entries), rank, world_size, worker_id, num_workers, seed):
            key, image, captions = self.entries[i]
            if key in skip or (need_caption and not captions.get(need_caption)):
                continue
            yield self._record(key, image, captions, duplicate=not self.first[i])


def _json_line(line: str, path, n: int):
    try:
        return json.loads(line)
    except ValueError as e:
        raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None


def expand_braces(pattern: str) -> list[str]:
    """'shards/{00000..00009}.tar' -> the ten names, zero-padded to the width of the first bound; several ranges
    multiply out. A pattern without a range comes back alone."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    first, last = m.groups()
    return [name for i in range(int(first), int(last) + 1)
            for name in expand_braces(pattern[:m.start()] + str(i).zfill(len(first)) + pattern[m.end():])]


def tar_samples(path, stats: dict | None = None):
    """(key, {extension: bytes}) for each run of consecutive regular members sharing a key (the member name up to
    the first dot of its base name), streamed with tarfile "r|*": no seeking, nothing written to disk, and member
    names only split into key and extension. A shard that turns out truncated or corrupt ends there (its last,
    possibly partial, sample dropped) and counts in stats["bad_shard"]."""
    key, files = None, {}
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                folder, base = posixpath.split(member.name)
                stem, dot, ext = base.partition(".")
                if not member.isreg() or not dot:
                    continue
                if posixpath.join(folder, stem) != key:
                    if files:
                        yield key, files
                    key, files = posixpath.join(folder, stem), {}
                files[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError):
        if stats is not None:
            stats["bad_shard"] = stats.get("bad_shard", 0) + 1
        return
    if files:
        yield key, files


class WebDatasetSource(RealSource):
    """img2dataset tar shards, streamed. Consumers (world_size ranks x num_workers dataloader workers) split the
    work so that each sample is read by exactly one of them: with at least as many shards as consumers, shards are
    dealt round-robin (whole shards per consumer; counts differ by at most one shard); with fewer shards, the
    consumers c = s, s + S, s + 2S, ... share shard s (S shards) and take every k-th of its samples (k of them
    sharing), each reading the whole shard but decoding only its own samples. `seed` shuffles the shard order."""
    format = "webdataset"

    def __init__(self, shards: list[Path], **screening):
        super().__init__(**screening)
        missing = [str(s) for s in shards if not Path(s).is_file()]
        if not shards:
            raise ValueError("no shards given")
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) missing, first {missing[0]}")
        self.shards = [Path(s) for s in shards]
        self.stats["bad_shard"] = 0  # shards that ended early (truncated / corrupt tar)

    def __len__(self):
        """The sum of img2dataset's per-shard "successes" (NNNNN_stats.json beside NNNNN.tar); TypeError when a
        shard has no stats file (the size of a stream is then unknown until read)."""
        stats = [s.with_name(s.stem + "_stats.json") for s in self.shards]
        if not all(p.is_file() for p in stats):
            raise TypeError("size unknown: not every shard has an img2dataset *_stats.json beside it")
        return sum(int(json.loads(p.read_text())["successes"]) for p in stats)

    def iter_records(self, rank: int = 0, world_size: int = 1, worker_id: int = 0, num_workers: int = 1,
                     seed=None, skip=(), need_caption=None):
        """This consumer's records, shard after shard (see the class docstring for the split)."""
        n = len(self.shards)
        consumer, consumers = _consumer(rank, world_size, worker_id, num_workers)
        order = consumer_indices(n, 0, 1, 0, 1, seed)  # the shard order, the same on every consumer
        if n >= consumers:
            mine, stride, offset = order[consumer::consumers], 1, 0
        else:
            mine, stride, offset = [order[consumer % n]], len(range(consumer % n, consumers, n)), consumer // n
        seen = set()
        for shard in mine:
            for j, (member_key, files) in enumerate(tar_samples(self.shards[shard], self.stats)):
                if j % stride != offset:
                    continue
                fields = _sidecar_fields(files.get("txt"), files.get("json"))
                key = _key(fields.pop("key"), member_key)
                if key in skip:
                    continue
                if need_caption and not fields.get(need_caption):
                    seen.add(key)  # a later record of this key stays a duplicate, as if this one had been read
                    continue
                ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
                image = io.BytesIO(files[ext]) if ext else io.BytesIO(b"")  # no image member -> "unreadable"
                yield self._record(key, image, fields, duplicate=key in seen)
                seen.add(key)


def is_shard_pattern(text: str) -> bool:
    """Whether a --data value is a WebDataset shard pattern such as 'shards/{00000..00099}.tar'."""
    return re.search(r"\{\d+\.\.\d+\}", text) is not None


def open_dataset(path, min_size: int = 0, max_pixels: int = MAX_PIXELS, decode: bool = True):
    """A record source for the dataset at `path`, its format detected from what is there (see the module docstring).
    Every source has .format, .iter_records(rank, world_size, worker_id, num_workers, seed=None, skip=(),
    need_caption=None) yielding each sample to exactly one of the world_size * num_workers consumers (seed: a
    shuffled order, the same seed on every consumer; skip: keys left out before their image is decoded, as
    rewards.annotate's resumes need; need_caption: a caption field without which a record is left out before its
    image is decoded, as a "reward@field" pass needs), and __len__ where the size is known up front. min_size /
    max_pixels screen the images of real formats; decode=False reads a real format's captions only (every record's
    image None: a text-only pass). Raises FileNotFoundError / ValueError with a one-line message for a path that is
    not a dataset."""
    screening = {"min_size": min_size, "max_pixels": max_pixels, "decode": decode}
    text, path = str(path), Path(path)
    if is_shard_pattern(text):
        return WebDatasetSource([Path(p) for p in expand_braces(text)], **screening)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist")
    if path.is_dir() and (path / "samples.jsonl").exists() and (path / "images.npy").exists():
        return ShapesSource(path)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        return WebDatasetSource(shards, **screening) if shards else IndexedSource.from_folder(path, **screening)
    suffix = path.suffix.lower()
    if suffix == ".tar":
        return WebDatasetSource([path], **screening)
    if suffix in (".jsonl", ".csv"):
        return IndexedSource.from_manifest(path, **screening)
    raise ValueError(f"{path}: not a dataset this repo reads (expected a folder of images or of .tar shards, a "
                     f".tar, a shard pattern like shards/{{00000..00009}}.tar, a .jsonl / .csv manifest, or a "
                     f"built-in dataset folder)")


class MiroDataset(torch.utils.data.Dataset):
    """Training items (image float32 (3,H,W) in [-1,1], caption, rewards float32 (R,) in [0,1] ((0,) if None),
    (key, "caption")): the item layout of every training dataset here (RecordDataset too)."""

    def __init__(self, samples: ImageTextSamples, reward_values: np.ndarray | None = None):
        if reward_values is not None and (reward_values.ndim != 2 or len(reward_values) != len(samples)):
            raise ValueError(f"reward_values must be (N={len(samples)}, R), got {reward_values.shape}")
        self.samples = samples
        self.rewards = torch.from_numpy(np.asarray(reward_values if reward_values is not None
                                                   else np.zeros((len(samples), 0)), np.float32))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        image = torch.from_numpy(np.array(self.samples.images[i])).permute(2, 0, 1).float() / 127.5 - 1
        return image, self.samples.captions[i], self.rewards[i], (self.samples.keys[i], "caption")


def collate(batch):
    """List of items -> (images (B,3,H,W), captions list[str], rewards (B,R), sources list[(key, caption field)])."""
    images, captions, rewards, sources = zip(*batch)
    return torch.stack(images), list(captions), torch.stack(rewards), list(sources)


def text_key(key: str, field: str, caption: str) -> str:
    """The name of one caption of a sample in a text-embedding cache: its key, or "key@field" for another caption
    field (as annotation columns name a reward scored on another field), then "#" and 12 hex digits of the caption's
    SHA-1, so that a cache of other captions under the same keys (an edited dataset, or another one whose keys are
    positions, as img2dataset's) misses instead of feeding them."""
    digest = hashlib.sha1(caption.encode()).hexdigest()[:12]
    return f"{key}#{digest}" if field == "caption" else f"{key}@{field}#{digest}"


def dataset_identity(path) -> str:
    """Where a dataset lives, as a cache records the data it was made from: the resolved path (a shard pattern's
    folder resolved, the pattern kept)."""
    text = str(path)
    if is_shard_pattern(text):
        return str(Path(text).parent.resolve() / Path(text).name)
    return str(Path(path).resolve())


# ----------------------------------------------------------------------------------------------------------------
# Seeds and ranks: every --seed within what torch takes; one process per device under torchrun (train.py,
# evaluate.py, rewards.py annotate, model.py precompute), each reading its own share of the data.

SEED_STRIDE = 1_000_003  # image i of an evaluation with --seed s draws its noise from seed s * SEED_STRIDE + i
MAX_SEED = 2**63 // SEED_STRIDE - 1  # so that every such seed (i < SEED_STRIDE) fits torch's signed 64 bits


def seed_arg(text: str) -> int:
    """The argparse type of every --seed / --data-seed: an integer in [0, MAX_SEED], so that no seed derived from
    it overflows torch.manual_seed (a larger one would fail there, in train.py only after the slow data setup)."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_SEED}], got {text}")
    return seed


def rank_device(device: str, local_rank: int = 0, local_world_size: int = 1) -> tuple[str, str]:
    """(this rank's device, its process-group backend) for --device: "cuda" is the rank's own GPU, cuda:LOCAL_RANK,
    with NCCL (which needs one GPU per rank); any other device uses gloo."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type != "cuda":
        return str(dev), "gloo"
    if dev.index is not None and local_world_size > 1:
        raise ValueError(f"--device {device} would put all {local_world_size} ranks on one GPU: use --device cuda "
                         f"(rank r takes cuda:r)")
    return f"cuda:{local_rank if dev.index is None else dev.index}", "nccl"


def init_distributed(device: str, timeout=None) -> tuple[int, int, torch.device]:
    """(rank, world_size, this rank's torch.device): joins torchrun's process group when launched by it (see
    rank_device; timeout: a datetime.timedelta for jobs whose ranks finish unevenly), else (0, 1, device)."""
    device, backend = rank_device(device, int(os.environ.get("LOCAL_RANK", 0)),
                                  int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    if "RANK" not in os.environ:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group(backend, **({"timeout": timeout} if timeout else {}))
    return dist.get_rank(), dist.get_world_size(), device


class ShardedSampler(torch.utils.data.Sampler):
    """Batches of indices for one rank (use as DataLoader(batch_sampler=...)).

    Epoch e is a permutation of range(n) seeded with seed + 1_000_003 e (seed + e would give seed s + 1 the order
    of seed s one epoch later), cut to a multiple of batch_size * world_size (the
    tail is dropped) and dealt round-robin, so ranks get disjoint, equal-size slices. Each iter() yields the rest of
    the current epoch from the current batch offset and then moves to the next epoch. To resume after `step`
    batches: set_position(step // len(sampler), step % len(sampler)).
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if not 0 <= rank < world_size or n < batch_size * world_size:
            raise ValueError(f"need 0 <= rank < world_size and n >= batch_size * world_size, got n={n}, "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.n, self.batch_size, self.rank, self.world_size, self.seed = n, batch_size, rank, world_size, seed
        self.num_batches = n // (batch_size * world_size)
        self.epoch, self.batch_offset = 0, 0

    def __len__(self):
        return self.num_batches

    def set_position(self, epoch: int, batch_offset: int = 0):
        self.epoch, self.batch_offset = epoch, batch_offset

    def batches(self, epoch: int) -> list[list[int]]:
        """All of this rank's batches of an epoch."""
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + 1_000_003 * epoch))
        mine = perm[: self.num_batches * self.batch_size * self.world_size][self.rank::self.world_size].tolist()
        return [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def __iter__(self):
        batches = self.batches(self.epoch)[self.batch_offset:]
        self.epoch, self.batch_offset = self.epoch + 1, 0
        return iter(batches)


# ----------------------------------------------------------------------------------------------------------------
# Training on real data: rewards joined by key, synthetic captions, one stream for every format.

def annotation_columns(annotations: dict) -> tuple[list[str], dict[str, np.ndarray]]:
    """{key: {column: score}} (rewards.load_annotations) -> (keys, {column: float64 (N,) in key order}), NaN where a
    key has no score: the layout of rewards.load_annotation_columns, which RewardTable and annotation_scores take."""
    keys = list(annotations)
    names = dict.fromkeys(c for row in annotations.values() for c in row)
    return keys, {c: np.array([annotations[k].get(c, np.nan) for k in keys], np.float64) for c in names}


def _check_plain_columns(columns: dict, names=()):
    """ValueError if a reward in `names` has no plain column among the annotation `columns`."""
    absent = [n for n in names if n not in columns]
    if absent:
        raise ValueError(f"the annotations have no scores for reward(s) {', '.join(absent)} "
                         f"(columns: {', '.join(sorted(columns)) or 'none'})")


def annotation_scores(columns: dict[str, np.ndarray], names) -> dict[str, np.ndarray]:
    """{name: every finite score of that reward}, its plain column and its "name@field" columns pooled (what the
    bins are fitted on, so that scores on the real and on the synthetic caption share one scale), row by row.
    columns: {column: scores (N,)} (annotation_columns, rewards.load_annotation_columns)."""
    _check_plain_columns(columns, names)
    out = {}
    for name in names:
        pooled = np.stack([columns[c] for c in sorted(columns) if c == name or c.startswith(name + "@")], 1).ravel()
        out[name] = pooled[np.isfinite(pooled)]
    return out


def sample_scores(annotations: dict, keys, names) -> dict[str, list[float]]:
    """{name: the score of each key, in order}: the built-in world's per-sample reward columns, NaN where a key has
    no score (the binner maps NaN to the lowest bin). annotations: {key: {column: score}}."""
    return {name: [annotations.get(key, {}).get(name, float("nan")) for key in keys] for name in names}


class RewardTable:
    """Reward conditioning values joined by sample key, per caption field.

    Annotation columns: "name" is reward `name` scored on a record's "caption"; "name@field" the same reward scored
    on caption `field` ("alignment@synthetic_caption"). For a field other than "caption", a reward that has an
    "@field" column anywhere is caption-dependent and read from it (missing for keys without one); a reward with
    none is taken as image-only (aesthetic, sharpness) and read from its plain column: `plain_for[field]` lists
    those, so that a forgotten column shows in the log. Missing and NaN scores map to bin 0 (RewardBins' rule).
    Keys live in one sorted fixed-width bytes array, not a dict: no per-key Python objects, so 10M+ keys stay cheap
    in forked dataloader workers (every entry is as wide as the longest key: 16M img2dataset keys of 9 bytes take
    144 MB, one stray 200-byte key would make it 3.2 GB)."""

    def __init__(self, keys, columns: dict[str, np.ndarray], bins, fields=("caption", SYNTHETIC)):
        """keys: N distinct keys (str, or a bytes array); columns: {column: float64 (N,)}, NaN where a key has no
        score (data.annotation_columns, rewards.load_annotation_columns)."""
        self.names = tuple(bins.names)
        _check_plain_columns(columns, self.names)
        encoded = keys if isinstance(keys, np.ndarray) else np.array([k.encode() for k in keys], dtype=bytes)
        order = np.argsort(encoded, kind="stable")
        self.keys = encoded[order]
        self.values, self.complete, self.plain_for = {}, {}, {}
        for field in fields:
            column = {n: f"{n}@{field}" if field != "caption" and f"{n}@{field}" in columns else n for n in self.names}
            self.plain_for[field] = [n for n in self.names if field != "caption" and column[n] == n]
            scores = {n: columns[column[n]][order] for n in self.names}
            self.values[field] = bins.values(scores)  # (N, R) float32, NaN -> 0
            self.complete[field] = np.isfinite(np.stack([scores[n] for n in self.names], 1)).all(1)

    def __len__(self):
        return len(self.keys)

    def lookup(self, key: str, field: str = "caption"):
        """(values float32 (R,), whether every score was present) of a key's `field` caption, or None when the key
        has no annotation row."""
        k = key.encode()
        i = int(np.searchsorted(self.keys, k))
        if i == len(self.keys) or self.keys[i] != k:
            return None
        return self.values[field][i], bool(self.complete[field][i])


def shuffled(items, buffer_size: int, rng: np.random.Generator):
    """A shuffle buffer: holds buffer_size items, emits a random one as each new one arrives, then the rest."""
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = int(rng.integers(buffer_size))
        yield buffer[j]
        buffer[j] = item
    yield from (buffer[j] for j in rng.permutation(len(buffer)))


class RecordDataset(torch.utils.data.IterableDataset):
    """Training items (image float32 (3,S,S) in [-1,1], caption, rewards float32 (R,) in [0,1], (key, caption field))
    streamed from any record source (`open_dataset`) for one rank. Each DataLoader worker reads its own share
    (`iter_records`), so an epoch yields every usable sample exactly once over all ranks and workers (stream_batches
    then drops each worker's last partial batch). Epoch e (`set_epoch`) permutes
    indexed sources and the shard order with seed [seed, resume, e]; shuffle_buffer > 1 also mixes within shards.

    rewards: a RewardTable, or None (rewards are (0,) tensors). missing_rewards: "skip" (a sample without every
    score is skipped and counted as "no_annotation") or "lowest" (missing scores read as NaN -> bin 0).
    synthetic_caption_prob: with this probability a record's synthetic caption (when it has one) is trained on,
    with the rewards scored on it; under "skip", a synthetic caption without its scores falls back to the caption.
    Images are centre-cropped and resized (`center_crop_resize`). Outcomes are counted in `stats` (source counts
    plus "no_annotation" and "synthetic"; this process only); report=True prints a pass's counts at its end."""

    def __init__(self, source, image_size: int, rewards: RewardTable | None = None, missing_rewards: str = "skip",
                 synthetic_caption_prob: float = 0.0, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 0, report: bool = False):
        if missing_rewards not in ("skip", "lowest"):
            raise ValueError(f"missing_rewards must be 'skip' or 'lowest', got {missing_rewards!r}")
        if not 0 <= synthetic_caption_prob <= 1:
            raise ValueError(f"synthetic_caption_prob must be in [0, 1], got {synthetic_caption_prob}")
        self.source, self.image_size, self.rewards, self.missing = source, image_size, rewards, missing_rewards
        self.synthetic_caption_prob, self.rank, self.world_size = synthetic_caption_prob, rank, world_size
        self.seed, self.shuffle_buffer, self.report = seed, shuffle_buffer, report
        self.epoch, self.resume = 0, 0
        self.counts = {"no_annotation": 0, "synthetic": 0}

    def set_epoch(self, epoch: int, resume: int = 0):
        self.epoch, self.resume = epoch, resume

    @property
    def stats(self) -> dict:
        return {**getattr(self.source, "stats", {}), **self.counts}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, self.resume, self.epoch, self.rank, worker_id])  # this consumer's
        records = self.source.iter_records(self.rank, self.world_size, worker_id, num_workers,
                                           seed=[self.seed, self.resume, self.epoch])
        before = self.stats
        items = (item for item in (self._item(r, rng) for r in records) if item is not None)
        for image, *rest in shuffled(items, self.shuffle_buffer, rng) if self.shuffle_buffer > 1 else items:
            yield image.float() / 127.5 - 1, *rest  # uint8 until here: 4x less memory in the buffer
        if self.report:  # this pass's counts
            print(f"data: rank {self.rank} worker {worker_id} epoch {self.epoch}: "
                  + ", ".join(f"{k} {v - before.get(k, 0)}" for k, v in self.stats.items()), flush=True)

    def _item(self, record: Record, rng: np.random.Generator):
        if record.error:
            return None
        synthetic = rng.random() < self.synthetic_caption_prob  # drawn for every usable record: reproducible
        field = SYNTHETIC if synthetic and record.captions.get(SYNTHETIC) else "caption"
        values = np.zeros(0, np.float32)
        if self.rewards is not None:
            hit = self.rewards.lookup(record.key, field)
            if self.missing == "skip" and field != "caption" and not (hit and hit[1]):
                field, hit = "caption", self.rewards.lookup(record.key, "caption")
            if self.missing == "skip" and not (hit and hit[1]):
                self.counts["no_annotation"] += 1
                return None
            values = hit[0] if hit else np.zeros(len(self.rewards.names), np.float32)  # no row: every bin 0
        self.counts["synthetic"] += field == SYNTHETIC
        return (center_crop_resize(record.image, self.image_size), record.captions[field],
                torch.from_numpy(np.array(values, np.float32)), (record.key, field))


def stream_batches(dataset: RecordDataset, batch_size: int, num_workers: int = 0, resume: int = 0):
    """Endless batches (images, captions, rewards, sources) of a RecordDataset, epoch after epoch, one DataLoader
    pass each (each worker drops its last partial batch). resume: the step a resumed run restarts at; its epochs come
    from a seed stream of their own, so it reads fresh, reproducible permutations instead of the rest of the
    interrupted epoch (a stream's position within an epoch is not stored)."""
    epoch = 0
    while True:
        dataset.set_epoch(epoch, resume)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=collate, drop_last=True)
        count = 0
        for batch in loader:
            count += 1
            yield batch
        if count == 0:
            counted = f"this process counted {dataset.stats}" if num_workers == 0 else \
                "each data worker printed its counts above"
            raise ValueError(f"rank {dataset.rank}: an epoch gave no full batch of {batch_size} usable samples "
                             f"({counted}; `python data.py inspect` counts a dataset's skips)")
        epoch += 1


# ----------------------------------------------------------------------------------------------------------------
# Command line.

def preview(cfg: WorldConfig, out: str, n=24, cols=6, zoom=5, start=0):
    """Write a grid of samples start..start+n-1 with caption, caption kind and degradations under each image."""
    samples = [make_sample(start + i, cfg) for i in range(n)]
    cell, text_h = cfg.image_size * zoom, 48
    rows = (n + cols - 1) // cols
    grid = Image.new("RGB", (cols * (cell + 8), rows * (cell + text_h + 8)), "white")
    draw = ImageDraw.Draw(grid)
    for i, s in enumerate(samples):
        x, y = (i % cols) * (cell + 8) + 4, (i // cols) * (cell + text_h + 8) + 4
        grid.paste(Image.fromarray(s["image"]).resize((cell, cell), Image.NEAREST), (x, y))
        tags = s["caption_kind"] + "".join(f" {k}:{v:.2f}" for k, v in s["degradations"])
        text = "\n".join(textwrap.wrap(s["caption"].removeprefix(PREFIX), cell // 6)[:2] + [tags])
        draw.multiline_text((x, y + cell + 2), text, fill="black", spacing=1)
        print(f"{start + i:5d} [{tags}] {s['caption']}")
    grid.save(out)
    print(f"wrote {out}")


def inspect(path, min_size: int = 0, image_size: int = 256, limit: int | None = None) -> dict:
    """Read a dataset once (or its first `limit` records) in one process as training would (decode, screen, crop and
    resize to image_size), print the outcome counts and the speed, and return the counts."""
    source = open_dataset(path, min_size=min_size)
    start, n = time.time(), 0
    for record in source.iter_records():
        if record.image is not None:
            center_crop_resize(record.image, image_size)
        n += 1
        if limit and n >= limit:
            break
    seconds = time.time() - start
    print(f"{path}: {source.format}, {n} records in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} records/s in one "
          f"process at {image_size} px): " + ", ".join(f"{k} {v}" for k, v in source.stats.items()))
    return dict(source.stats)


def main(argv=None):
    parser = argparse.ArgumentParser(description="The built-in shapes dataset, and a check of any dataset.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("build", "generate the training set"), ("preview", "write a captioned grid of samples")):
        p = sub.add_parser(name, help=help_)
        default_out = None if name == "build" else "preview.png"
        p.add_argument("--out", default=default_out, help=f"output {'folder' if name == 'build' else 'PNG'} "
                                                          f"(default {default_out or 'runs/_data/shapes<size>_n<N>_seed<S>'})")
        p.add_argument("--seed", type=seed_arg, default=0, help="world seed (default 0)")
        p.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    sub.choices["build"].add_argument("--num-train", type=int, default=WorldConfig.num_train,
                                      help=f"number of training samples (default {WorldConfig.num_train})")
    pv = sub.choices["preview"]
    pv.add_argument("--n", type=int, default=24, help="number of samples shown (default 24)")
    pv.add_argument("--start", type=int, default=0, help="index of the first sample shown (default 0)")
    pv.add_argument("--zoom", type=int, default=5, help="nearest-neighbour upscaling of each image (default 5)")
    ins = sub.add_parser("inspect", help="read any dataset open_dataset reads once: outcome counts and speed")
    ins.add_argument("path", help="image folder, .jsonl/.csv manifest, .tar shards folder or pattern like "
                                  "shards/{00000..00009}.tar")
    ins.add_argument("--min-size", type=int, default=0, help="skip images whose shorter side is smaller (default 0)")
    ins.add_argument("--image-size", type=int, default=256, help="training resolution to resize to (default 256)")
    ins.add_argument("--limit", type=int, default=None, help="stop after this many records (default: all)")
    args = parser.parse_args(argv)
    for flag, low in (("num_train", 1), ("image_size", 8), ("n", 1), ("zoom", 1), ("start", 0), ("limit", 1),
                      ("min_size", 0)):
        if getattr(args, flag, None) is not None and getattr(args, flag) < low:
            parser.error(f"--{flag.replace('_', '-')} must be >= {low}")
    try:
        if args.command == "inspect":
            inspect(args.path, args.min_size, args.image_size, args.limit)
        elif args.command == "build":
            cfg = WorldConfig(image_size=args.image_size, num_train=args.num_train, seed=args.seed)
            print(f"dataset in {build_shapes_dataset(cfg, args.out)}")
        else:
            preview(WorldConfig(image_size=args.image_size, seed=args.seed), args.out, n=args.n, start=args.start,
                    zoom=args.zoom)
    except (OSError, ValueError) as e:  # an unwritable --out, another world in it, an unknown image extension
        parser.error(str(e))


if __name__ == "__main__":
    main()
