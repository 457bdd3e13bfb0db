"""GenEval: the rule engine (rewards.check_clauses) against hand-built detections for each of the six tasks, and the
real detector path (evaluate.GenEvalDetector: Mask2Former + CLIP) with tiny random models saved in the original
transformers layout and loaded back through the same loader."""
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import data
import evaluate
import rewards
import tiny_rewards
from rewards import check_clauses, geneval_correct

GENEVAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "geneval"


def det(cls, box, color="red", score=1.0):
    """A hand-built detection in the detectors' format (boxes [x0, y0, x1, y1], y down)."""
    return {"class": cls, "color": color, "box": [float(v) for v in box],
            "center": [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], "score": score}


def shifted(box, dx=0.0, dy=0.0):
    return [box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy]


# ----------------------------------------------------------------------------------------------------------------
# The rule engine, task by task.

def test_single_and_two_object():
    one = {"tag": "single_object", "include": [{"class": "bench", "count": 1}]}
    assert not geneval_correct(one, [])
    assert not geneval_correct(one, [det("dog", [0, 0, 9, 9])])
    assert geneval_correct(one, [det("dog", [0, 0, 9, 9]), det("bench", [20, 0, 29, 9])])
    assert geneval_correct(one, [det("bench", [0, 0, 9, 9]), det("bench", [20, 0, 29, 9])])  # no exclude: extras ok
    two = {"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "dog", "count": 1}]}
    assert check_clauses(two, [det("dog", [0, 0, 9, 9])]) == [False, True]
    assert geneval_correct(two, [det("dog", [0, 0, 9, 9]), det("bench", [20, 0, 29, 9])])


def test_counting_needs_the_count_and_its_exclude_clause_caps_it():
    meta = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}]}
    clocks = [det("clock", shifted([0, 0, 9, 9], 20 * k)) for k in range(4)]
    assert check_clauses(meta, clocks[:1]) == [False, True]
    assert check_clauses(meta, clocks[:2]) == [True, True]
    assert check_clauses(meta, clocks[:3]) == [True, False]                 # a third clock fires the exclude clause
    assert geneval_correct(meta, clocks[:2] + [det("dog", [0, 40, 9, 49])] * 5)  # other classes do not count


def test_exclude_clauses():
    meta = {"tag": "x", "include": [{"class": "cat", "count": 1}],
            "exclude": [{"class": "dog", "count": 1}, {"class": "car", "count": 2}]}
    cat, dog, car = det("cat", [0, 0, 9, 9]), det("dog", [20, 0, 29, 9]), det("car", [40, 0, 49, 9])
    assert check_clauses(meta, [cat]) == [True, True, True]
    assert check_clauses(meta, [cat, dog]) == [True, False, True]           # any dog is one too many
    assert check_clauses(meta, [cat, car]) == [True, True, True]            # one car is fewer than 2
    assert check_clauses(meta, [cat, car, car]) == [True, True, False]
    assert check_clauses({"exclude": [{"class": "dog", "count": 1}]}, []) == [True]


def test_colors_judge_the_most_confident_objects_only():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert check_clauses(meta, [det("car", [0, 0, 9, 9], "red")]) == [True, True]
    assert check_clauses(meta, [det("car", [0, 0, 9, 9], "blue")]) == [True, False]
    # GenEval's "found" objects are the first `count` by confidence: a red car behind a blue one does not help
    blue_first = [det("car", [0, 0, 9, 9], "blue", 0.9), det("car", [20, 0, 29, 9], "red", 0.8)]
    assert not geneval_correct(meta, blue_first)
    assert geneval_correct(meta, blue_first[::-1])
    two = {"tag": "colors", "include": [{"class": "car", "count": 2, "color": "red"}]}
    cars = [det("car", shifted([0, 0, 9, 9], 20 * k), c) for k, c in enumerate(["red", "blue", "red"])]
    assert check_clauses(two, cars) == [True, False]                        # found: red, blue (the third is ignored)
    assert check_clauses(two, [cars[0], cars[2], cars[1]]) == [True, True]


def test_color_attr():
    meta = {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "green"},
                                             {"class": "microwave", "count": 1, "color": "purple"}]}
    bus, oven = [0, 0, 9, 9], [20, 0, 29, 9]
    assert geneval_correct(meta, [det("bus", bus, "green"), det("microwave", oven, "purple")])
    assert check_clauses(meta, [det("bus", bus, "purple"), det("microwave", oven, "green")]) == [True, False] * 2
    assert check_clauses(meta, [det("bus", bus, "green")]) == [True, True, False, False]


POSITION = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["right of", 0]}]}


@pytest.mark.parametrize("size, dx, expected", [
    (10, 1.9, set()),            # centre offset inside the margin 0.1 * (10 + 10): no relation at all
    (10, 3.9, set()),            # outside it, but the shrunk offset is < half the offset: still none
    (10, 4.1, {"right of"}),     # > 2 x margin: right of
    (20, 7.9, set()),            # the margin grows with the objects' sizes
    (20, 8.1, {"right of"}),
    (10, -4.1, {"left of"}),
])
def test_position_margin(size, dx, expected):
    teddy = [50, 50, 50 + size, 50 + size]
    dog = shifted(teddy, dx)
    assert data.relative_position(dog, teddy) == expected
    assert geneval_correct(POSITION, [det("teddy bear", teddy), det("dog", dog)]) == ("right of" in expected)


def test_position_axes_and_diagonals():
    ref = [50, 50, 60, 60]
    assert data.relative_position(shifted(ref, dy=10), ref) == {"below"}    # y points down
    assert data.relative_position(shifted(ref, dy=-10), ref) == {"above"}
    assert data.relative_position(shifted(ref, 10, 10), ref) == {"right of", "below"}
    assert data.relative_position(shifted(ref, 6, 5), ref) == {"right of"}  # the shrunk offset (4, 3) / 7.8
    assert data.relative_position(shifted(ref, 6, 6), ref) == set()         # (4, 4) / 8.5: neither side > 0.5


def test_position_needs_a_matched_target_group():
    teddy, dog = [50, 50, 60, 60], [70, 50, 80, 60]
    assert check_clauses(POSITION, [det("dog", dog)]) == [False, True, False]        # no target to relate to
    coloured = {"tag": "position", "include": [{"class": "teddy bear", "count": 1, "color": "red"},
                                               {"class": "dog", "count": 1, "position": ["right of", 0]}]}
    # the target's group is None once its colour fails, however well the dog is placed
    assert check_clauses(coloured, [det("teddy bear", teddy, "blue"), det("dog", dog)]) == [True, False, True, False]
    assert geneval_correct(coloured, [det("teddy bear", teddy, "red"), det("dog", dog)])


def test_position_holds_for_every_found_pair():
    meta = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                           {"class": "dog", "count": 2, "position": ["right of", 0]}]}
    teddy = det("teddy bear", [50, 50, 60, 60])
    right, left = det("dog", [70, 50, 80, 60]), det("dog", [30, 50, 40, 60])
    assert geneval_correct(meta, [teddy, right, det("dog", [70, 70, 80, 80])])
    assert check_clauses(meta, [teddy, right, left]) == [True, True, False]
    # only the most confident teddy bear is the target: a second one on the far right does not matter
    far = det("teddy bear", [200, 50, 210, 60], score=0.5)
    assert geneval_correct(meta, [teddy, far, right, det("dog", [70, 70, 80, 80])])


def perfect_scene(meta):
    """Detections that satisfy a GenEval prompt: count objects per include clause with its colour, each clause's
    objects 40 px from the target group's in the asked direction, all 10 px boxes."""
    step = {"left of": (-40, 0), "right of": (40, 0), "above": (0, -40), "below": (0, 40)}
    found, origins = [], []
    for k, req in enumerate(meta["include"]):
        x, y = (200, 200 + 300 * k) if "position" not in req else \
            tuple(o + s for o, s in zip(origins[req["position"][1]], step[req["position"][0]]))
        origins.append((x, y))
        found += [det(req["class"], [x + 12 * j, y, x + 12 * j + 10, y + 10], req.get("color", "red"))
                  for j in range(req["count"])]
    return found


@pytest.mark.skipif(not (GENEVAL_DIR / "evaluation_metadata.jsonl").exists(), reason="GenEval metadata not present")
def test_every_geneval_prompt_accepts_its_scene_and_rejects_a_missing_object():
    metas = [json.loads(line) for line in (GENEVAL_DIR / "evaluation_metadata.jsonl").read_text().splitlines()]
    assert len(metas) == 553 and {m["tag"] for m in metas} == set(data.TASKS)
    for meta in metas:
        scene = perfect_scene(meta)
        assert geneval_correct(meta, scene), meta["prompt"]
        assert not geneval_correct(meta, scene[:-1]), meta["prompt"]
        n_checks = sum(1 + ("color" in r) + ("position" in r) for r in meta["include"]) + len(meta.get("exclude", []))
        assert len(check_clauses(meta, [])) == n_checks                      # the length depends on the metadata only
    names = (GENEVAL_DIR / "object_names.txt").read_text().split("\n")
    assert tuple(n for n in names if n) == evaluate.GENEVAL_CLASSES
    assert {r["class"] for m in metas for r in m["include"] + m.get("exclude", [])} <= set(evaluate.GENEVAL_CLASSES)
    assert {r["color"] for m in metas for r in m["include"] if "color" in r} <= set(evaluate.GENEVAL_COLORS)


# ----------------------------------------------------------------------------------------------------------------
# The real detector path with tiny random models.

def tiny_mask2former(num_labels=80):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               dim_feedforward=32, num_queries=6, num_labels=num_labels)
    return Mask2FormerForUniversalSegmentation(config).eval()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Tiny random Mask2Former (+ its image processor) and CLIP (+ tokenizer) folders, as save_pretrained writes them."""
    from transformers import Mask2FormerImageProcessor
    root = tmp_path_factory.mktemp("geneval")
    torch.manual_seed(0)
    model = tiny_mask2former()
    model.save_pretrained(root / "mask2former")
    torch.save(model.state_dict(), root / "reference.pt")
    Mask2FormerImageProcessor().save_pretrained(root / "mask2former")
    clip, tokenizer = tiny_rewards.tiny_hf_clip()
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    return root


@pytest.fixture(scope="module")
def detector(tiny_dirs):
    torch.set_num_threads(1)
    # options as strings, the way --detector-option passes them; a small input scale keeps the test fast
    return evaluate.make_detector("mask2former", "cpu", mask2former=str(tiny_dirs / "mask2former"),
                                  clip=str(tiny_dirs / "clip"), short_edge="64", long_edge="128")


def test_loader_is_strict(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file
    model, processor = evaluate.load_mask2former(str(tiny_dirs / "mask2former"))
    reference = torch.load(tiny_dirs / "reference.pt", weights_only=True)
    loaded = model.state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)
    assert processor.size_divisor == 32
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    state = load_file(broken / "model.safetensors")
    state.pop(next(k for k in state if "class_predictor" in k))
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="weights do not match"):
        evaluate.load_mask2former(str(broken))
    with pytest.raises(ValueError, match="80"):                            # not a COCO-instance model
        evaluate.GenEvalDetector(tiny_mask2former(num_labels=10), processor, None)


def test_make_detector_names_and_options():
    images = torch.rand(2, 3, 32, 32)
    assert evaluate.make_detector("shapes")(images, None) == rewards.detect_shapes(images)
    with pytest.raises(ValueError, match="unknown detector"):
        evaluate.make_detector("yolo")
    with pytest.raises(ValueError, match="unknown mask2former detector option"):
        evaluate.make_detector("mask2former", checkpoint="x")
    with pytest.raises(ValueError, match="expected a float"):
        evaluate.make_detector("mask2former", threshold="high")


def test_output_format_and_determinism(detector, monkeypatch):
    # threshold 0: a random model's instances all count; 24 (query, class) pairs of 6 x 80 keep the test quick
    monkeypatch.setattr(detector, "cfg", replace(detector.cfg, threshold=0.0, counting_threshold=0.0,
                                                 max_per_image=24, max_objects=3))
    torch.manual_seed(1)
    images = torch.rand(2, 3, 40, 48)                                       # not square: resize + padding
    metas = [{"tag": "two_object"}, {"tag": "counting"}]
    out = detector(images, metas)
    assert len(out) == 2 and all(out)
    for found in out:
        scores = [d["score"] for d in found]
        assert scores == sorted(scores, reverse=True) and 0 < min(scores) and max(scores) <= 1
        for d in found:
            assert set(d) == {"class", "color", "box", "center", "score", "area"}
            assert d["class"] in evaluate.GENEVAL_CLASSES and d["color"] in evaluate.GENEVAL_COLORS
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 40 and all(v == int(v) for v in d["box"])
            assert d["center"] == [(x0 + x1) / 2, (y0 + y1) / 2]
            assert 0 < d["area"] <= (x1 - x0) * (y1 - y0)
        counts = {}
        for d in found:
            counts[d["class"]] = counts.get(d["class"], 0) + 1
        assert max(counts.values()) <= 3 and len(found) <= 24
    assert detector(list(images), metas) == out                              # deterministic, list input alike
    assert [check_clauses({"include": [{"class": d["class"], "count": 1}]}, f) for f in out for d in f[:1]] == \
        [[True], [True]]


def forced_outputs(specs, pixel_log=None):
    """A Mask2Former forward that returns chosen queries: specs = [(class index or None, probability, (row0, row1,
    col0, col1) in mask cells = 1/4 of the padded input)]; mask logits +-20 (mask score ~1), so score ~ probability."""
    def forward(pixel_values, pixel_mask=None):
        if pixel_log is not None:
            pixel_log.append((pixel_values.shape, pixel_mask))
        b, _, h, w = pixel_values.shape
        cls = torch.full((b, len(specs), 81), -1e4)
        masks = torch.full((b, len(specs), h // 4, w // 4), -20.0)
        for q, (label, p, (r0, r1, c0, c1)) in enumerate(specs):
            cls[:, q, 80] = 0.0 if label is None else torch.tensor(1 - p).log()
            if label is not None:
                cls[:, q, label] = torch.tensor(p).log()
            masks[:, q, r0:r1, c0:c1] = 20.0
        return SimpleNamespace(class_queries_logits=cls, masks_queries_logits=masks)
    return forward


CAT, DOG = evaluate.GENEVAL_CLASSES.index("cat"), evaluate.GENEVAL_CLASSES.index("dog")
SPECS = [(CAT, 0.95, (1, 5, 1, 5)), (CAT, 0.5, (1, 5, 9, 13)), (DOG, 0.35, (9, 13, 1, 5)),
         (DOG, 0.2, (9, 13, 9, 13)), (None, 0.0, (0, 16, 0, 16))]


def summary(found):
    return [(d["class"], d["box"]) for d in found]


def test_thresholds_max_objects_and_nms(detector, monkeypatch):
    monkeypatch.setattr(detector.segmenter, "forward", forced_outputs(SPECS))
    image = torch.rand(1, 3, 64, 64)                                        # 64 px: no resize, masks 16 x 16
    cat0, cat1, dog0 = ("cat", [4.0, 4.0, 20.0, 20.0]), ("cat", [36.0, 4.0, 52.0, 20.0]), ("dog", [4.0, 36.0, 20.0, 52.0])
    found = detector(image, [{"tag": "single_object"}])[0]
    assert summary(found) == [cat0, cat1, dog0]                              # > 0.3
    # score = class probability x mean mask probability (the bilinear edge of the mask costs a little)
    assert [d["score"] for d in found] == pytest.approx([0.95 * 0.9945, 0.5 * 0.9945, 0.35 * 0.9945], rel=1e-3)
    assert summary(detector(image, None)[0]) == [cat0, cat1, dog0]
    counting = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}
    found = detector(image, [counting])[0]
    assert summary(found) == [cat0]                                          # > 0.9 for counting
    assert not geneval_correct(counting, found)                              # so the second cat is not counted
    assert geneval_correct({**counting, "tag": "two_object"}, detector(image, [{"tag": "two_object"}])[0])
    monkeypatch.setattr(detector, "cfg", replace(detector.cfg, max_objects=1))
    assert summary(detector(image)[0]) == [cat0, dog0]                        # the most confident per class
    same_box = [SPECS[0], (CAT, 0.5, (1, 5, 1, 5))]
    monkeypatch.setattr(detector.segmenter, "forward", forced_outputs(same_box))
    monkeypatch.setattr(detector, "cfg", replace(detector.cfg, max_objects=16))
    assert len(detector(image)[0]) == 2                                      # GenEval's default: no NMS
    monkeypatch.setattr(detector, "cfg", replace(detector.cfg, max_overlap=0.5))
    assert summary(detector(image)[0]) == [cat0]


def test_masks_map_back_through_resize_and_padding(detector, monkeypatch):
    log = []
    monkeypatch.setattr(detector.segmenter, "forward", forced_outputs([(CAT, 0.95, (2, 6, 4, 8))], log))
    found = detector(torch.rand(1, 3, 32, 40))[0]                           # x2 -> 64 x 80, padded to 64 x 96
    (shape, valid), = log
    assert tuple(shape) == (1, 3, 64, 96) and valid[0, :64, :80].all() and not valid[0, :, 80:].any()
    assert [d["box"] for d in found] == [[8.0, 4.0, 16.0, 12.0]]            # cells x 4 = padded px, / 2 = image px
    assert found[0]["area"] == 64


def test_masked_crop():
    pixels = torch.arange(3 * 6 * 8, dtype=torch.float32).view(3, 6, 8)
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[2:4, 3:5] = True
    crop = evaluate.masked_crop(pixels, mask, [2, 1, 6, 5], 0.6)
    assert crop.shape == (3, 4, 4)
    inside = mask[1:5, 2:6]
    assert torch.equal(crop[:, inside], pixels[:, 1:5, 2:6][:, inside])
    assert (crop[:, ~inside] == 153).all()                                  # GenEval's '#999' background


def test_colour_is_the_nearest_colour_embedding(detector, monkeypatch):
    monkeypatch.setattr(detector.segmenter, "forward", forced_outputs(SPECS[:2]))
    monkeypatch.setattr(detector, "_classifiers", {})
    image = torch.full((1, 3, 64, 64), 0.5)
    image[0, :, 4:20, 4:20] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)   # the first cat red, the second blue
    image[0, :, 4:20, 36:52] = torch.tensor([0.1, 0.1, 0.9]).view(3, 1, 1)
    pixels = (image[0] * 255).round()
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 4:20, 4:20], masks[1, 4:20, 36:52] = True, True
    crops = [evaluate.masked_crop(pixels, m, b, 0.6) / 255 for m, b in zip(masks, evaluate.mask_boxes(masks).tolist())]
    emb = detector.clip.images(crops)
    assert (emb[0] @ emb[1]).item() < 0.9999
    # a classifier whose "blue" row is the first crop's embedding and "green" the second's
    classifier = torch.zeros(len(evaluate.GENEVAL_COLORS), emb.shape[1])
    classifier[evaluate.GENEVAL_COLORS.index("blue")] = emb[0]
    classifier[evaluate.GENEVAL_COLORS.index("green")] = emb[1]
    detector._classifiers["cat"] = classifier
    assert [d["color"] for d in detector(image)[0]] == ["blue", "green"]


def test_colour_classifier_is_clip_benchmarks_zero_shot(detector, monkeypatch):
    seen = []

    def texts(captions):
        seen.append(list(captions))
        return torch.eye(len(captions))                                     # orthonormal text embeddings
    monkeypatch.setattr(detector, "_classifiers", {})
    monkeypatch.setattr(detector.clip, "texts", texts)
    classifier = detector.color_classifier("wine glass")
    assert seen[0][:3] == ["a photo of a red wine glass", "a photo of a red-colored wine glass",
                           "a photo of a red object"]
    assert len(seen[0]) == 30 and seen[0][27] == "a photo of a white wine glass"
    expected = torch.zeros(10, 30)
    for k in range(10):
        expected[k, 3 * k:3 * k + 3] = 3 ** -0.5                            # normalised mean of the three templates
    assert torch.allclose(classifier, expected)
    detector.color_classifier("wine glass")
    assert len(seen) == 1                                                   # cached per class
