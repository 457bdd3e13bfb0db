"""The built-in text-to-image dataset: a procedurally generated world of coloured shapes that mirrors GenEval.

    python data.py build --out data/shapes            # 20k training samples, a few seconds
    python data.py preview --out preview.png          # a captioned grid of samples to look at

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
  only 3 compositions each, so exactly 1 of 3 is held out there. Training samples never show a held-out
  composition, neither in the image nor in the (possibly wrong) caption; `heldout_prompts` lists them.
"""
import argparse
import colorsys
import io
import json
import os
import textwrap
from dataclasses import asdict, dataclass
from functools import lru_cache
from itertools import combinations, permutations
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
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
    """Up to cfg.heldout_prompts_per_task held-out GenEval metadata dicts per task (never seen in training)."""
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


def render_scene(objects: list[dict], size=32, rng: np.random.Generator | None = None) -> np.ndarray:
    """Clean image uint8 (size, size, 3) of the objects on a light, low-saturation background.

    `size` may also be a WorldConfig (its image_size). Circles are discs, squares axis-aligned, triangles upright
    and isosceles, each filling its box; anti-aliased by rendering at SUPERSAMPLE x and box-downsampling.
    """
    size = getattr(size, "image_size", size)
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
    """write(file) to path.tmp, then rename over path (readers never see a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def build_shapes_dataset(cfg: WorldConfig, out_dir=None) -> Path:
    """Write out_dir/images.npy (N,H,W,3 uint8), samples.jsonl (one record per sample, no image) and world.json.

    world.json is written last and marks a complete dataset: nothing is done if it already matches cfg.
    out_dir defaults to cfg.default_dir().
    """
    out = Path(out_dir) if out_dir is not None else cfg.default_dir()
    world = {"version": DATA_VERSION, **asdict(cfg)}
    if (out / "world.json").exists() and json.loads((out / "world.json").read_text()) == world \
            and (out / "images.npy").exists() and (out / "samples.jsonl").exists():
        return out
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
            self.records = [json.loads(line) for line in f]
        self.images = np.load(path / "images.npy", mmap_mode="r")
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

    def __init__(self, path):
        self.samples = ImageTextSamples(path)

    def __len__(self):
        return len(self.samples)

    def iter_records(self, rank: int = 0, world_size: int = 1, worker_id: int = 0, num_workers: int = 1):
        """Records of sample i for i % (world_size * num_workers) == rank * num_workers + worker_id, in order."""
        consumer, consumers = rank * num_workers + worker_id, world_size * num_workers
        for i in range(consumer, len(self.samples), consumers):
            yield Record(self.samples.keys[i], Image.fromarray(np.asarray(self.samples.images[i])),
                         {"caption": self.samples.captions[i]})


def open_dataset(path):
    """A record source for the dataset at `path`, its format detected from what is there (see the module
    docstring). Every source has .format, .iter_records(rank, world_size, worker_id, num_workers) yielding each
    sample to exactly one of the world_size * num_workers consumers, and __len__ where the size is known up front.
    Raises FileNotFoundError / ValueError with a one-line message for a path that is not a dataset."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist")
    if path.is_dir() and (path / "samples.jsonl").exists() and (path / "images.npy").exists():
        return ShapesSource(path)
    raise ValueError(f"{path}: not a dataset this repo reads (expected a built-in dataset folder with "
                     f"samples.jsonl + images.npy)")


class MiroDataset(torch.utils.data.Dataset):
    """Training items (image float32 (3,H,W) in [-1,1], caption, rewards float32 (R,) in [0,1]; (0,) if None)."""

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
        return image, self.samples.captions[i], self.rewards[i]


def collate(batch):
    """List of items -> (images (B,3,H,W), captions list[str], rewards (B,R))."""
    images, captions, rewards = zip(*batch)
    return torch.stack(images), list(captions), torch.stack(rewards)


class ShardedSampler(torch.utils.data.Sampler):
    """Batches of indices for one rank (use as DataLoader(batch_sampler=...)).

    Epoch e is a permutation of range(n) seeded with seed + e, cut to a multiple of batch_size * world_size (the
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
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        mine = perm[: self.num_batches * self.batch_size * self.world_size][self.rank::self.world_size].tolist()
        return [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def __iter__(self):
        batches = self.batches(self.epoch)[self.batch_offset:]
        self.epoch, self.batch_offset = self.epoch + 1, 0
        return iter(batches)


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


def main():
    parser = argparse.ArgumentParser(description="The built-in shapes dataset.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("build", "generate the training set"), ("preview", "write a captioned grid of samples")):
        p = sub.add_parser(name, help=help_)
        default_out = None if name == "build" else "preview.png"
        p.add_argument("--out", default=default_out, help=f"output {'folder' if name == 'build' else 'PNG'} "
                                                          f"(default {default_out or 'runs/_data/shapes<size>_n<N>_seed<S>'})")
        p.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
        p.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    sub.choices["build"].add_argument("--num-train", type=int, default=WorldConfig.num_train,
                                      help=f"number of training samples (default {WorldConfig.num_train})")
    pv = sub.choices["preview"]
    pv.add_argument("--n", type=int, default=24, help="number of samples shown (default 24)")
    pv.add_argument("--start", type=int, default=0, help="index of the first sample shown (default 0)")
    pv.add_argument("--zoom", type=int, default=5, help="nearest-neighbour upscaling of each image (default 5)")
    args = parser.parse_args()
    if args.command == "build":
        cfg = WorldConfig(image_size=args.image_size, num_train=args.num_train, seed=args.seed)
        print(f"dataset in {build_shapes_dataset(cfg, args.out)}")
    else:
        preview(WorldConfig(image_size=args.image_size, seed=args.seed), args.out, n=args.n, start=args.start,
                zoom=args.zoom)


if __name__ == "__main__":
    main()
