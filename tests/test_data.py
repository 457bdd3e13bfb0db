"""Tests of the built-in shapes world (data.py)."""
import argparse
import colorsys
import json
import os
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch

import data

CFG = data.WorldConfig()
N_SAMPLES = 3000


@pytest.fixture(scope="module")
def samples():
    return [data.make_sample(i, CFG) for i in range(N_SAMPLES)]


# ----------------------------------------------------------------------------------------------------------------
# Captions and metadata.

def test_caption_examples_follow_geneval_format():
    assert data.caption_to_metadata("a photo of two red circles") == {
        "tag": "counting", "include": [{"class": "circle", "count": 2, "color": "red"}],
        "exclude": [{"class": "circle", "count": 3}], "prompt": "a photo of two red circles"}
    assert data.caption_to_metadata("a photo of a blue square left of a yellow triangle") == {
        "tag": "position", "include": [{"class": "triangle", "count": 1, "color": "yellow"},
                                       {"class": "square", "count": 1, "color": "blue", "position": ["left of", 0]}],
        "prompt": "a photo of a blue square left of a yellow triangle"}
    assert data.caption_to_metadata("a photo of a red circle and a green square")["tag"] == "color_attr"
    assert data.caption_to_metadata("a photo of a circle and a square")["tag"] == "two_object"
    assert data.caption_to_metadata("a photo of an orange triangle")["tag"] == "colors"
    assert data.caption_to_metadata("a photo of a triangle")["tag"] == "single_object"
    assert data.caption_to_metadata("a photo of three squares")["exclude"] == [{"class": "square", "count": 4}]


@pytest.mark.parametrize("text", [*data.GENERIC_CAPTIONS, "", "a photo of a dog", "a photo of an red circle",
                                  "a photo of two circle", "a photo of a circles",
                                  "a photo of a red circle and a square",
                                  "a photo of a circle left of two squares", "photo of a circle"])
def test_generic_and_malformed_captions_parse_to_none(text):
    assert data.caption_to_metadata(text) is None


@pytest.mark.parametrize("tag", data.TASKS)
def test_round_trip_every_composition(tag):
    vocab = set(data.vocabulary())
    comps = data._enumerate_compositions(tag)
    phrasings = comps + [data._mirror(m) for m in comps if tag == "position"]
    for meta in phrasings:
        caption = data.metadata_to_caption(meta)
        assert caption == meta["prompt"]
        assert data.caption_to_metadata(caption) == meta
        assert set(caption.split()) <= vocab
        assert meta["tag"] == tag


def test_round_trip_and_vocabulary_on_samples(samples):
    vocab = set(data.vocabulary())
    for s in samples:
        assert set(s["caption"].split()) <= vocab
        if s["caption_kind"] == "generic":
            assert s["metadata"] is None and data.caption_to_metadata(s["caption"]) is None
        else:
            assert data.caption_to_metadata(s["caption"]) == s["metadata"]
            assert data.metadata_to_caption(s["metadata"]) == s["caption"]
        json.dumps({k: v for k, v in s.items() if k != "image"})  # records are plain JSON


def test_composition_key_identifies_phrasings():
    a = data.caption_to_metadata("a photo of a circle left of a square")
    b = data.caption_to_metadata("a photo of a square right of a circle")
    c = data.caption_to_metadata("a photo of a square left of a circle")
    assert data.composition_key(a) == data.composition_key(b) != data.composition_key(c)
    d = data.caption_to_metadata("a photo of a red circle and a blue square")
    e = data.caption_to_metadata("a photo of a blue square and a red circle")
    assert data.composition_key(d) == data.composition_key(e)


# ----------------------------------------------------------------------------------------------------------------
# Sampling: determinism, held-out split, wrong captions, layouts, proportions.

def test_make_sample_is_deterministic():
    a, b = data.make_sample(7, CFG), data.make_sample(7, CFG)
    assert np.array_equal(a.pop("image"), b.pop("image")) and a == b
    c = data.make_sample(7, data.WorldConfig(seed=1))
    d = data.make_sample(8, CFG)
    assert not np.array_equal(c["image"], data.make_sample(7, CFG)["image"])
    assert not np.array_equal(d["image"], data.make_sample(7, CFG)["image"])
    assert a["key"] != d["key"] and a["key"] != c["key"]


def test_heldout_split_sizes_and_prompts():
    held = data._heldout(CFG.seed, CFG.heldout_fraction)
    for tag in data.TASKS:
        n = len(data._enumerate_compositions(tag))
        assert 1 <= len(held[tag]) <= n - 1
    assert len(held["single_object"]) == len(held["two_object"]) == 1  # 1 of 3
    prompts = data.heldout_prompts(CFG)
    assert prompts == data.heldout_prompts(CFG)  # deterministic
    per_task = Counter(m["tag"] for m in prompts)
    for tag in data.TASKS:
        assert per_task[tag] == min(CFG.heldout_prompts_per_task, len(held[tag]))
    for m in prompts:
        assert data.caption_to_metadata(m["prompt"]) == m
    assert data.heldout_prompts(data.WorldConfig(seed=1)) != prompts


def test_heldout_compositions_never_in_training(samples):
    held = {data.composition_key(m) for ms in data._heldout(CFG.seed, CFG.heldout_fraction).values() for m in ms}
    assert len(held) > 50
    for s in samples:
        assert data.composition_key(s["truth"]) not in held
        if s["metadata"] is not None:
            assert data.composition_key(s["metadata"]) not in held
    captions = {s["caption"] for s in samples}
    for m in data.heldout_prompts(CFG):
        assert m["prompt"] not in captions


def _differences(a: dict, b: dict) -> list:
    assert a["tag"] == b["tag"] and len(a["include"]) == len(b["include"])
    return [(i, k) for i, (ca, cb) in enumerate(zip(a["include"], b["include"]))
            for k in ("class", "count", "color", "position") if ca.get(k) != cb.get(k)]


def test_wrong_captions_differ_in_exactly_one_detail(samples):
    field = {"shape": "class", "count": "count", "color": "color", "relation": "position"}
    details = Counter()
    for s in samples:
        if s["caption_kind"] == "correct":
            assert s["metadata"] == s["truth"] and s["wrong_detail"] is None
        elif s["caption_kind"] == "wrong":
            diff = _differences(s["metadata"], s["truth"])
            assert len(diff) == 1 and diff[0][1] == field[s["wrong_detail"]], (s["caption"], s["truth"])
            details[s["wrong_detail"]] += 1
    assert set(details) == {"shape", "count", "color", "relation"}


def test_scene_matches_truth(samples):
    for s in samples:
        expected = Counter((c["class"], c.get("color")) for c in s["truth"]["include"] for _ in range(c["count"]))
        got = Counter((o["class"], o["color"] if any("color" in c for c in s["truth"]["include"]) else None)
                      for o in s["scene"])
        assert got == expected


def test_position_scenes_satisfy_exactly_the_relation(samples):
    n = 0
    for s in samples:
        if s["truth"]["tag"] == "position":
            ref, target = s["scene"]
            rel = s["truth"]["include"][1]["position"][0]
            assert data.relative_position(target["box"], ref["box"]) == {rel}
            assert data.relative_position(ref["box"], target["box"]) == {data.OPPOSITE[rel]}
            n += 1
    assert n > 300


def test_relative_position_matches_geneval_rule():
    assert data.relative_position([0, 10, 10, 20], [20, 10, 30, 20]) == {"left of"}
    assert data.relative_position([20, 0, 30, 10], [20, 20, 30, 30]) == {"above"}
    assert data.relative_position([0, 0, 10, 10], [20, 20, 30, 30]) == {"left of", "above"}  # diagonal: both
    assert data.relative_position([0, 0, 10, 10], [1, 0, 11, 10]) == set()  # offset within 0.1 * (dims)


@pytest.mark.parametrize("size", [32, 64])
def test_objects_inside_and_apart(samples, size):
    cfg = data.WorldConfig(image_size=size)
    scenes = [s["scene"] for s in samples] if size == 32 else [data.make_sample(i, cfg)["scene"] for i in range(300)]
    scale = size / 32
    for scene in scenes:
        for o in scene:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 and 0 <= y0 and x1 <= size and y1 <= size
            assert 7 * scale - 1e-6 <= x1 - x0 <= 12 * scale + 0.25 and x1 - x0 == y1 - y0
        for a, b in combinations([o["box"] for o in scene], 2):
            gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
            assert gap >= 2 * scale


def test_proportions_near_config(samples):
    n = len(samples)
    kinds = Counter(s["caption_kind"] for s in samples)
    assert abs(kinds["wrong"] / n - CFG.wrong_caption_prob) < 0.03
    assert abs(kinds["generic"] / n - CFG.generic_caption_prob) < 0.025
    degraded = sum(bool(s["degradations"]) for s in samples) / n
    assert abs(degraded - CFG.degrade_prob) < 0.04
    assert all(1 <= len(s["degradations"]) <= 2 for s in samples if s["degradations"])
    assert {k for s in samples for k, _ in s["degradations"]} == set(data.DEGRADATIONS)
    tasks = Counter(s["truth"]["tag"] for s in samples)
    assert all(abs(tasks[t] / n - 1 / 6) < 0.03 for t in data.TASKS)
    cfg = data.WorldConfig(degrade_prob=0.0, wrong_caption_prob=0.0, generic_caption_prob=0.0)
    clean = [data.make_sample(i, cfg) for i in range(100)]
    assert all(s["caption_kind"] == "correct" and not s["degradations"] for s in clean)


# ----------------------------------------------------------------------------------------------------------------
# Rendering and degradations.

def _hsv(image):
    return np.array([colorsys.rgb_to_hsv(*(p / 255)) for p in image.reshape(-1, 3)]).reshape(*image.shape[:2], 3)


@pytest.mark.parametrize("shape,fill", [("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5)])
def test_render_fill_ratio_colour_and_background(shape, fill):
    rng = np.random.default_rng(0)
    for color in data.COLORS:
        img = data.render_scene([{"class": shape, "color": color, "box": [8.0, 8.0, 20.0, 20.0]}], 32, rng)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        hsv = _hsv(img)
        bg, fg = img[0, 0].astype(float), img[15, 14].astype(float)  # pixels are mixes bg + a (fg - bg)
        coverage = np.clip((img - bg) @ (fg - bg) / ((fg - bg) @ (fg - bg)), 0, 1)
        assert abs(coverage.sum() / 144 - fill) < 0.04
        assert hsv[:6, :6, 1].max() < 0.1 and hsv[:6, :6, 2].min() > 0.8  # light, low-saturation background
        palette_hue = colorsys.rgb_to_hsv(*(np.array(data.COLORS[color]) / 255))[0]
        d = abs(hsv[15, 14, 0] - palette_hue)
        assert min(d, 1 - d) < 0.02 and hsv[15, 14, 1] > 0.6


def test_render_is_antialiased_and_scales():
    """Edges are anti-aliased; a scene rendered at 64 px (boxes doubled, same seed) and averaged over 2x2 pixels is
    the 32-px render: same place, size, colours and background (only edge pixels differ, mean |diff| ~0.2 / 255)."""
    scene = [{"class": "circle", "color": "blue", "box": [8.25, 8.25, 20.25, 20.25]},
             {"class": "triangle", "color": "red", "box": [20.5, 3.0, 30.75, 13.25]},
             {"class": "square", "color": "green", "box": [3.5, 22.0, 13.75, 30.0]}]
    img = data.render_scene(scene, 32, np.random.default_rng(0))
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 5  # partial-coverage edge pixels exist
    big_scene = [{**o, "box": [2 * v for v in o["box"]]} for o in scene]
    big = data.render_scene(big_scene, 64)  # the default rng: seed 0 too
    assert img.shape == (32, 32, 3) and big.shape == (64, 64, 3)
    pooled = big.astype(float).reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))  # 2x2 average pooling
    err = float(np.abs(pooled - img).mean())
    assert err < 1.0, err


@pytest.mark.parametrize("kind", data.DEGRADATIONS)
def test_degrade_changes_image_monotonically(kind):
    cfg = data.WorldConfig(degrade_prob=0.0)
    clean = data.make_sample(3, cfg)["image"]
    errors = []
    for strength in (0.2, 0.6, 1.0):
        out = data.degrade(clean, kind, strength, np.random.default_rng(1))
        assert out.shape == clean.shape and out.dtype == np.uint8
        errors.append(np.abs(out.astype(float) - clean).mean())
    assert errors[0] > 0
    if kind != "jpeg":  # JPEG error is not strictly monotonic in quality on tiny images
        assert errors[0] < errors[1] < errors[2]
    assert np.array_equal(data.degrade(clean, kind, 0.5, np.random.default_rng(2)),
                          data.degrade(clean, kind, 0.5, np.random.default_rng(2)))


def test_clutter_is_small():
    clean = np.full((32, 32, 3), 240, np.uint8)
    for seed in range(20):
        out = data.degrade(clean, "clutter", 1.0, np.random.default_rng(seed))
        changed = np.abs(out.astype(int) - clean).max(-1) > 30
        assert 0 < changed.sum() < 0.12 * changed.size
    with pytest.raises(ValueError):
        data.degrade(clean, "sepia", 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError):
        data.degrade(clean, "blur", 0.0, np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------------------------
# Files, datasets, sampler.

def test_build_dataset_and_views(tmp_path):
    cfg = data.WorldConfig(num_train=40, seed=3)
    out = data.build_shapes_dataset(cfg, tmp_path / "shapes")
    assert sorted(p.name for p in out.iterdir()) == ["images.npy", "samples.jsonl", "world.json"]
    mtime = os.path.getmtime(out / "images.npy")
    data.build_shapes_dataset(cfg, out)  # same config: no-op
    assert os.path.getmtime(out / "images.npy") == mtime

    samples = data.ImageTextSamples(out)
    assert len(samples) == 40 and samples.images.shape == (40, 32, 32, 3) and samples.world == cfg
    s5 = data.make_sample(5, cfg)
    assert np.array_equal(samples.images[5], s5.pop("image")) and samples.records[5] == s5
    assert samples.keys[5] == s5["key"] and samples.captions[5] == s5["caption"] and len(set(samples.keys)) == 40
    x = samples.images_01([0, 5])
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.allclose(x[1], torch.from_numpy(samples.images[5].copy()).permute(2, 0, 1).float() / 255)

    rewards = np.random.default_rng(0).random((40, 3)).astype(np.float32)
    ds = data.MiroDataset(samples, rewards)
    img, cap, r, source = ds[5]
    assert source == (s5["key"], "caption")
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and -1 <= img.min() and img.max() <= 1
    assert torch.allclose((img + 1) / 2, x[1], atol=1e-6) and cap == s5["caption"]
    assert torch.equal(r, torch.from_numpy(rewards[5]))
    assert data.MiroDataset(samples, None)[0][2].shape == (0,)
    with pytest.raises(ValueError):
        data.MiroDataset(samples, rewards[:10])

    loader = torch.utils.data.DataLoader(ds, batch_sampler=data.ShardedSampler(40, 8), collate_fn=data.collate)
    batches = list(loader)
    assert len(batches) == 5
    images, captions, rw, sources = batches[0]
    assert sources == [(samples.keys[i], "caption") for i in data.ShardedSampler(40, 8).batches(0)[0]]
    assert images.shape == (8, 3, 32, 32) and len(captions) == 8 and rw.shape == (8, 3)

    real = tmp_path / "real"  # someone's dataset given as --data-dir by mistake: refused, left as it was
    real.mkdir()
    (real / "annotations.jsonl").write_text('{"key": "a", "clip": 0.3}\n')
    (real / "a.jpg").write_bytes(b"jpeg")
    with pytest.raises(ValueError, match=r"real/? is not a built-in world's folder \(it holds a.jpg, annotations.jsonl\)"):
        data.build_shapes_dataset(data.WorldConfig(num_train=12), real)
    assert sorted(p.name for p in real.iterdir()) == ["a.jpg", "annotations.jsonl"]
    data.build_shapes_dataset(data.WorldConfig(num_train=12), tmp_path / "new" / "world")  # new folders are fine

    with pytest.raises(ValueError, match=r"holds another built-in world \(num_train 40, not 12\)"):
        data.build_shapes_dataset(data.WorldConfig(num_train=12, seed=3), out)  # not rebuilt under its runs
    assert len(data.ImageTextSamples(out)) == 40
    world = json.loads((out / "world.json").read_text())
    (out / "world.json").write_text(json.dumps({**world, "version": data.DATA_VERSION - 1}))
    data.build_shapes_dataset(data.WorldConfig(num_train=12, seed=3), out)  # an older generator's world: rebuilt
    assert len(data.ImageTextSamples(out)) == 12
    assert data.inspect(out) == {"ok": 12}  # the built-in folder is a record source like any other
    import rewards  # train.py hands its open world to annotate, which wraps it without reading the folder again
    table = rewards.annotate(data.ImageTextSamples(out), ["contrast"], tmp_path / "ann", verbose=False)
    assert sorted(table) == sorted(data.ImageTextSamples(out).keys)
    assert all(0 <= row["contrast"] <= 1 for row in table.values())
    with open(out / "samples.jsonl", "a") as f:
        f.write("\n")  # a trailing blank line (an editor's) is not a record
    assert len(data.ImageTextSamples(out)) == 12
    (out / "images.npy").write_bytes((out / "images.npy").read_bytes()[:1000])
    with pytest.raises(ValueError, match="images.npy: not a complete image array"):
        data.ImageTextSamples(out)


def test_collate_keeps_each_caption_and_reward_with_its_image(tmp_path):
    """Row i of a collated batch is one sample: its image, caption and rewards all belong to sources[i]'s key."""
    samples = data.ImageTextSamples(data.build_shapes_dataset(data.WorldConfig(num_train=12, seed=3), tmp_path))
    ds = data.MiroDataset(samples, np.arange(24, dtype=np.float32).reshape(12, 2))  # rewards name their row
    picks = [7, 2, 9, 4]
    assert len({samples.captions[i] for i in picks}) == len(picks)  # distinct, so a shuffle would show
    images, captions, rewards, sources = data.collate([ds[i] for i in picks])
    row = {key: i for i, key in enumerate(samples.keys)}
    for b, (key, field) in enumerate(sources):
        i = row[key]
        assert field == "caption" and i == picks[b] and captions[b] == samples.captions[i]
        assert torch.equal(images[b], ds[i][0]) and rewards[b].tolist() == [2.0 * i, 2.0 * i + 1]


def test_sharded_sampler_disjoint_covering_and_resume():
    for n in (96, 103):
        samplers = [data.ShardedSampler(n, 4, rank=r, world_size=3, seed=5) for r in range(3)]
        per_rank = [[i for b in s.batches(0) for i in b] for s in samplers]
        assert all(len(s) == 8 and all(len(b) == 4 for b in s.batches(0)) for s in samplers)
        flat = [i for ids in per_rank for i in ids]
        assert len(flat) == len(set(flat)) == 96 and set(flat) <= set(range(n))
        if n == 96:
            assert set(flat) == set(range(96))
    s = data.ShardedSampler(103, 4, rank=1, world_size=3, seed=5)
    epoch0, epoch1 = list(iter(s)), list(iter(s))  # each iter() is one epoch
    assert epoch0 == s.batches(0) and epoch1 == s.batches(1) and epoch0 != epoch1
    s.set_position(1, 3)
    assert list(iter(s)) == epoch1[3:] and list(iter(s)) == s.batches(2)
    resumed = data.ShardedSampler(103, 4, rank=1, world_size=3, seed=5)
    resumed.set_position(0, 5)
    assert list(iter(resumed)) == epoch0[5:]
    assert data.ShardedSampler(103, 4, seed=6).batches(0) != data.ShardedSampler(103, 4, seed=5).batches(0)
    orders = {(seed, epoch): data.ShardedSampler(103, 4, seed=seed).batches(epoch) for seed in range(4)
              for epoch in range(3)}  # runs of nearby seeds share no epoch's order
    assert len({str(b) for b in orders.values()}) == len(orders)
    with pytest.raises(ValueError):
        data.ShardedSampler(10, 4, rank=0, world_size=3)


def test_preview_writes_png(tmp_path, capsys):
    data.preview(data.WorldConfig(), str(tmp_path / "grid.png"), n=4, cols=2)
    assert (tmp_path / "grid.png").stat().st_size > 1000
    assert data.make_sample(0, data.WorldConfig())["caption"] in capsys.readouterr().out


def test_atomic_write_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "table.json"
    data._atomic_write(path, lambda f: f.write(b"old"))
    data._atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"

    def fails(f):
        f.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        data._atomic_write(path, fails)
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["table.json"]


def test_seed_arg_keeps_every_derived_seed_in_torchs_range():
    """One bound for every --seed: evaluate.py's per-image seeds seed * SEED_STRIDE + i (i < SEED_STRIDE) stay
    below 2**63; train.py and sample.py seed torch with it directly."""
    assert data.seed_arg("0") == 0 and data.seed_arg(str(data.MAX_SEED)) == data.MAX_SEED
    assert data.MAX_SEED * data.SEED_STRIDE + data.SEED_STRIDE - 1 < 2**63
    for bad in ("-1", str(data.MAX_SEED + 1), "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            data.seed_arg(bad)


@pytest.mark.parametrize("argv, message", [
    (["build", "--num-train", "-5"], "--num-train must be >= 1"),
    (["build", "--image-size", "0"], "--image-size must be >= 8"),
    (["preview", "--n", "0"], "--n must be >= 1"),
    (["preview", "--zoom", "0"], "--zoom must be >= 1"),
    (["preview", "--start", "-3"], "--start must be >= 0"),
    (["preview", "--n", "1", "--out", "{tmp}/grid.txt"], "unknown file extension: .txt"),
    (["build", "--num-train", "4", "--out", "{tmp}/a_file/world"], "{tmp}/a_file/world"),
    (["inspect", "{tmp}", "--limit", "0"], "--limit must be >= 1"),
    (["build", "--num-train", "4", "--seed", "-1", "--out", "{tmp}/w"], "argument --seed: must be in [0, "),
    (["build", "--num-train", "4", "--seed", "99999999999999999999", "--out", "{tmp}/w"], "must be in [0, "),
])
def test_cli_errors_are_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")  # a file where a folder should be
    with pytest.raises(SystemExit) as exit_info:
        data.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and message.format(tmp=tmp_path) in err[-1] and "Traceback" not in "\n".join(err)
