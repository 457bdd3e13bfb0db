"""Tests of rewards.py: binning, the built-in rewards (pair rankings, detector accuracy). The annotation pass and
the command line: test_annotate.py."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import data
import rewards
from rewards import RewardBins

CFG = data.WorldConfig()
STRENGTHS = (0.15, 1.0)  # the training set's degradation strengths


def to_batch(images_uint8) -> torch.Tensor:
    return torch.from_numpy(np.stack(images_uint8)).permute(0, 3, 1, 2).float() / 255


def clean_scenes(n, seed=1):
    """(clean images, truth metadata, scenes) of n training-set compositions re-rendered without degradation."""
    images, truths, scenes = [], [], []
    for i in range(n):
        s = data.make_sample(i, CFG)
        rng = np.random.default_rng([seed, i])
        images.append(data.render_scene(s["scene"], CFG.image_size, rng))
        truths.append(s["truth"])
        scenes.append(s["scene"])
    return images, truths, scenes


# ----------------------------------------------------------------------------------------------------------------
# Binning.

def test_quantile_bins_match_hand_computed_edges():
    scores = np.random.default_rng(0).permutation(100).astype(float)  # 0..99 shuffled
    bins = RewardBins.fit({"r": scores}, num_bins=4)
    np.testing.assert_allclose(bins.edges["r"], [0, 24.75, 49.5, 74.25, 99])
    x = np.array([0, 24, 25, 49.5, 74.25, 99, 150, -5, np.nan])
    np.testing.assert_array_equal(bins.index("r", x), [0, 0, 1, 2, 3, 3, 3, 0, 0])  # clamped; NaN -> bin 0
    np.testing.assert_allclose(bins.values({"r": x})[:, 0], np.array([0, 0, 1, 2, 3, 3, 3, 0, 0]) / 3)
    assert bins.values({"r": x}).dtype == np.float32


def test_quantile_bins_use_unique_values():
    # over the raw values the median would be 0.5; over the unique values {0,1,2,3} it is 1.5
    bins = RewardBins.fit({"r": np.array([0, 0, 0, 0, 0, 1, 2, 3.0])}, num_bins=2)
    np.testing.assert_allclose(bins.edges["r"], [0, 1.5, 3])
    np.testing.assert_allclose(bins.values({"r": np.array([0, 1, 2, 3.0])})[:, 0], [0, 0, 1, 1])
    # few unique values among many bins: each value lands in its own bin, the ends at 0 and 1
    bins = RewardBins.fit({"r": np.array([0, 1, 2, 1, 0, 2.0])}, num_bins=64)
    np.testing.assert_allclose(bins.values({"r": np.array([0, 1, 2.0])})[:, 0], [0, 32 / 63, 1])


def test_uniform_bins_and_range_ends():
    bins = RewardBins.fit({"r": np.array([0, 10, 3, np.nan])}, num_bins=5, method="uniform")
    np.testing.assert_allclose(bins.edges["r"], [0, 2, 4, 6, 8, 10])
    np.testing.assert_allclose(bins.values({"r": np.array([3, 10, 11, -1, np.nan])})[:, 0], [0.25, 1, 1, 0, 0])
    # quantile edges come from a subsample, but the outer edges are the ends of the full range
    x = np.random.default_rng(1).normal(size=5000)
    bins = RewardBins.fit({"r": x}, num_bins=8, max_samples=100)
    assert bins.edges["r"][0] == x.min() and bins.edges["r"][-1] == x.max()
    with pytest.raises(ValueError, match="binning method"):
        RewardBins.fit({"r": x}, method="log")


def test_bins_equal_population_and_json_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    scores = {"a": rng.normal(size=6400), "b": rng.exponential(size=6400)}
    bins = RewardBins.fit(scores)  # 64 quantile bins by default
    values = bins.values(scores)
    assert values.shape == (6400, 2) and bins.names == ("a", "b")
    counts = np.bincount(np.rint(values[:, 0] * 63).astype(int), minlength=64)
    assert counts.min() >= 90 and counts.max() <= 110  # ~100 per bin
    bins.save(tmp_path / "bins.json")
    loaded = RewardBins.load(tmp_path / "bins.json")
    assert loaded.to_dict() == bins.to_dict()
    np.testing.assert_array_equal(loaded.values(scores), values)
    assert not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------------------------------------------------------
# Detector and GenEval rules.

def test_detector_on_hand_drawn_shapes():
    img = Image.new("RGB", (32, 32), (235, 235, 235))
    d = ImageDraw.Draw(img)
    d.rectangle([2, 3, 11, 12], fill=data.COLORS["red"])                     # square, box [2, 3, 12, 13]
    d.ellipse([18, 2, 29, 13], fill=data.COLORS["blue"])                      # circle
    d.polygon([(10, 29), (21, 29), (15.5, 18)], fill=data.COLORS["green"])    # upright triangle
    d.line([0, 31, 5, 26], fill=data.COLORS["yellow"])                        # clutter: a thin line
    d.rectangle([29, 29, 30, 30], fill=data.COLORS["purple"])                 # clutter: a speck
    dets = rewards.detect_shapes(to_batch([np.asarray(img)]))[0]
    found = {(o["class"], o["color"]) for o in dets}
    assert found == {("square", "red"), ("circle", "blue"), ("triangle", "green")}
    square = next(o for o in dets if o["class"] == "square")
    assert square["box"] == [2, 3, 12, 13] and square["center"] == [7, 8] and square["area"] == 100
    assert [o["area"] for o in dets] == sorted((o["area"] for o in dets), reverse=True)
    blank = torch.full((1, 3, 32, 32), 0.9)
    assert rewards.detect_shapes(blank) == [[]]


def test_detector_finds_nothing_in_noise():
    """Colour segmentation alone finds "shapes" in about 3 of 4 noise images; an image without a background
    (a model's untrained output: its initial Gaussian noise) has none, so it scores 0 on every caption."""
    torch.manual_seed(0)
    uniform = torch.rand(200, 3, 32, 32)
    gaussian = ((torch.randn(200, 3, 32, 32).clamp(-1, 1) + 1) * 127.5).round() / 255   # x_1 of the sampler, saved
    unguarded = rewards.DetectorConfig(min_background=0)
    assert np.mean([len(d) > 0 for d in rewards.detect_shapes(uniform, unguarded)]) > 0.5  # what the guard is for
    for noise in (uniform, gaussian):
        assert rewards.detect_shapes(noise) == [[] for _ in noise]
    captions = [f"a photo of a {c} {s}" for c in data.COLORS for s in ("circle", "square", "triangle")]
    assert rewards.alignment_score(uniform[:len(captions)], captions).max() == 0


def test_detector_reads_clean_scenes():
    images, truths, scenes = clean_scenes(300)
    dets = rewards.detect_shapes(to_batch(images))
    strict = [rewards.geneval_correct(m, d) for m, d in zip(truths, dets)]
    content = [sorted((o["class"], o["color"]) for o in s) == sorted((o["class"], o["color"]) for o in d)
               for s, d in zip(scenes, dets)]
    assert np.mean(strict) >= 0.95 and np.mean(content) >= 0.95
    # boxes: every true object has a detection with IoU > 0.5
    ious = []
    for s, d in zip(scenes, dets):
        for o in s:
            ious.append(max((box_iou(o["box"], q["box"]) for q in d), default=0))
    assert np.mean(np.array(ious) > 0.5) >= 0.95


def box_iou(a, b):
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_detector_tolerates_slight_blur():
    """Generated images are a little soft: the detector must still read them."""
    images, truths, _ = clean_scenes(200, seed=2)
    rng = np.random.default_rng(0)
    blurred = [data.degrade(im, "blur", rng.uniform(0.15, 0.4), rng) for im in images]
    dets = rewards.detect_shapes(to_batch(blurred))
    assert np.mean([rewards.geneval_correct(m, d) for m, d in zip(truths, dets)]) >= 0.95


def det(cls, color, box):
    return {"class": cls, "color": color, "box": box, "center": [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2],
            "area": (box[2] - box[0]) * (box[3] - box[1])}


def test_check_clauses_follows_geneval_rules():
    counting = data.caption_to_metadata("a photo of two red circles")
    two = [det("circle", "red", [0, 0, 8, 8]), det("circle", "red", [20, 0, 28, 8])]
    assert rewards.check_clauses(counting, two) == [True, True, True]          # count, colour, exclude (< 3)
    three = two + [det("circle", "red", [0, 20, 8, 28])]
    assert rewards.check_clauses(counting, three) == [True, True, False]
    assert rewards.check_clauses(counting, two[:1]) == [False, False, True]    # unreached colour check fails
    blue = [two[0], det("circle", "blue", [20, 0, 28, 8])]
    assert rewards.check_clauses(counting, blue) == [True, False, True]

    position = data.caption_to_metadata("a photo of a blue square left of a yellow triangle")
    tri, sq = det("triangle", "yellow", [20, 10, 28, 18]), det("square", "blue", [2, 10, 10, 18])
    assert rewards.check_clauses(position, [tri, sq]) == [True, True, True, True, True]
    moved = det("square", "blue", [20, 0, 28, 8])                           # above, not left of
    assert rewards.check_clauses(position, [tri, moved]) == [True, True, True, True, False]
    red = det("triangle", "red", [20, 10, 28, 18])                            # reference fails: no target
    assert rewards.check_clauses(position, [red, sq]) == [True, False, True, True, False]
    assert rewards.geneval_correct(position, [tri, sq]) and not rewards.geneval_correct(position, [tri, moved])


# ----------------------------------------------------------------------------------------------------------------
# Built-in rewards: pair rankings.

def test_reward_interface_and_registry():
    images, _, _ = clean_scenes(4)
    x = to_batch(images)
    captions = ["a photo of a circle"] * 4
    for name in rewards.BUILTIN_REWARDS:
        r = rewards.load_reward(name)
        s = r(x, captions)
        assert r.name == name and s.shape == (4,) and s.dtype == torch.float32
        assert ((s >= 0) & (s <= 1)).all() and torch.equal(s, r(x, captions))
    with pytest.raises(ValueError, match="known rewards: alignment, sharpness"):
        rewards.load_reward("aesthetic_typo")


def test_rewards_reject_images_in_another_convention():
    """uint8, 0-255 and [-1, 1] images are errors, not clamped into garbage (0-255 would score as all white);
    overshoot within RANGE_SLACK (float error, bicubic ringing) is clamped as before."""
    images, _, _ = clean_scenes(2)
    x, captions = to_batch(images), ["a photo of a circle"] * 2
    r = rewards.load_reward("contrast")
    uint8, outside = "must be float in \\[0, 1\\], got torch.uint8", "must be in \\[0, 1\\], got values in"
    for images, match in [((x * 255).round().byte(), uint8), (x * 255, outside), (x * 2 - 1, outside)]:
        with pytest.raises(ValueError, match="contrast: images " + match):
            r(images, captions)
    ragged = rewards.Reward("mean", lambda images, captions: torch.stack([i.mean() for i in images]), ragged=True)
    for images, match in [([x[0], (x[1, :, :20] * 255).byte()], uint8), ([x[0], x[1, :, :20] * 255], outside)]:
        with pytest.raises(ValueError, match="mean: images " + match):  # each image of a list is checked
            ragged(images, captions)
    overshoot = x.clone()
    overshoot[0, 0, 0, 0], overshoot[1, 0, 0, 0] = 1.3, -0.3  # ringing around an edge
    assert torch.equal(r(overshoot, captions), r(overshoot.clamp(0, 1), captions))
    for images, caps in [(x.numpy(), captions), (x, "ab")]:  # an array; a string (2 letters, not 2 captions)
        with pytest.raises(ValueError, match="a list of tensors and captions as a list of strings"):
            r(images, caps)
    assert r(x[:0], []).shape == (0,)  # an empty batch is fine


def test_reward_options_are_checked_when_parsed():
    """Every learned reward's options are known up front (REWARD_OPTIONS): a typo or a bad value fails when the
    command is parsed, with the same one-line error the reward's loader gives (before downloading anything),
    instead of hours into a run when that reward loads."""
    names = ["alignment", "clip", "aesthetic", "hpsv2", "pickscore", "sciscore", "imagereward", "vqascore",
             "shapes_clip"]
    assert set(rewards.REWARD_OPTIONS) == set(names) - {"alignment"}  # each learned reward declares its options
    bad = {"clip.chekpoint=/x.pt": "clip: unknown option(s) chekpoint; known: backend, checkpoint, model_config",
           "vqascore.varient=xl": "vqascore: unknown option(s) varient; known: variant, checkpoint",
           "vqascore.variant=xxxl": "vqascore: variant must be xxl or xl, got 'xxxl'",
           "vqascore.batch=0": "vqascore: batch must be a positive integer, got '0'",
           "vqascore.batch=two": "vqascore: batch must be a positive integer, got 'two'",
           "imagereward.dtype=bf16": "imagereward: dtype must be float32 or bfloat16 or float16, got 'bf16'",
           "hpsv2.version=3": "hpsv2: version must be 2.1 or 2.0, got '3'",
           "clip.precision=fp16": "clip: precision must be bf16 or fp32, got 'fp16'",
           "shapes_clip.ckpt=x": "shapes_clip: unknown option(s) ckpt; known: checkpoint",
           "alignment.size=3": "reward 'alignment' does not take ['size']",
           # Reward's own constructor arguments are not options (ragged="0" is a true string)
           "alignment.ragged=0": "reward 'alignment' does not take ['ragged']",
           "alignment.caption_field=synthetic_caption": "reward 'alignment' does not take ['caption_field']"}
    for spec, message in bad.items():
        with pytest.raises(ValueError) as e:
            rewards.parse_reward_options([spec], names)
        assert message in str(e.value) and "\n" not in str(e.value), spec
        name, _, kv = spec.partition(".")
        if name in rewards.REWARD_OPTIONS:  # the loader's own check, before any download: the same message
            with pytest.raises(ValueError) as e:
                rewards.load_reward(name, **dict([kv.split("=")]))
            assert message in str(e.value), spec
    good = ["clip.precision=fp32", "vqascore.variant=xl", "vqascore.batch=4", "vqascore.dtype=bfloat16",
            "imagereward.dtype=float16", "hpsv2.version=2.0", "pickscore.processor=laion/CLIP-ViT-H-14"]
    assert rewards.parse_reward_options(good, names) == {
        "clip": {"precision": "fp32"}, "vqascore": {"variant": "xl", "batch": "4", "dtype": "bfloat16"},
        "imagereward": {"dtype": "float16"}, "hpsv2": {"version": "2.0"},
        "pickscore": {"processor": "laion/CLIP-ViT-H-14"}}  # a hub id: not a path to check
    for spec in ["pickscore.processor=/p", "clip.checkpoint=model.safetensors", "aesthetic.head=~/no/head.pth"]:
        with pytest.raises(ValueError, match=f"--reward-option {spec.partition('.')[0]}: .* does not exist"):
            rewards.parse_reward_options([spec], names)
    assert rewards._reward_options("vqascore", {"batch": "4"})["batch"] == 4  # parsed once, for the factory


@pytest.mark.parametrize("reward,kinds", [("sharpness", ["blur"]), ("cleanliness", ["noise", "jpeg", "clutter"]),
                                          ("contrast", ["low_contrast"])])
def test_quality_rewards_rank_clean_above_degraded(reward, kinds):
    images, _, _ = clean_scenes(200, seed=3)
    r = rewards.load_reward(reward)
    clean = r(to_batch(images), [""] * len(images))
    for kind in kinds:
        rng = np.random.default_rng([4, len(kind)])
        degraded = [data.degrade(im, kind, rng.uniform(*STRENGTHS), rng) for im in images]
        win = (clean > r(to_batch(degraded), [""] * len(images))).float().mean().item()
        assert win >= 0.95, f"{reward} ranks clean above {kind} in only {win:.1%} of pairs"


def alignment_pairs(images, truths, seed=5):
    rng = np.random.default_rng(seed)
    wrong = [data.corrupt_metadata(m, rng)[0]["prompt"] for m in truths]
    r = rewards.load_reward("alignment")
    x = to_batch(images)
    return r(x, [m["prompt"] for m in truths]), r(x, wrong)


def test_alignment_ranks_correct_caption_above_wrong_one():
    images, truths, _ = clean_scenes(300, seed=6)
    good, bad = alignment_pairs(images, truths)
    assert (good > bad).float().mean() >= 0.95
    assert (good == 1).float().mean() >= 0.95
    generic = rewards.load_reward("alignment")(to_batch(images[:2]), ["a picture", "not a world caption"])
    assert generic.tolist() == [0, 0]


def test_alignment_on_the_training_distribution():
    """Training images (half of them degraded, some heavily) with their true caption vs a one-detail corruption."""
    samples = [data.make_sample(i, CFG) for i in range(300)]
    good, bad = alignment_pairs([s["image"] for s in samples], [s["truth"] for s in samples])
    assert (good > bad).float().mean() >= 0.9
