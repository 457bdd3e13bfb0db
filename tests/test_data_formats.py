"""Tests of the real dataset formats (data.py): decoding and screening, the folder / manifest / WebDataset formats,
the rank x worker split, rewards joined by key, synthetic captions, and training steps from each format.

The images are real photographs that ship inside scikit-image's wheel (skimage/data/*.png|jpg, read as files: no
pooch download), converted into the modes web data comes in and written into each format in a temp folder.
"""
import importlib.util
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import data
import rewards

SKIMAGE = importlib.util.find_spec("skimage")
if SKIMAGE is None:  # a hard requirement of the tests (requirements.txt), never a silent skip
    raise ImportError("tests/test_data_formats.py needs scikit-image's bundled sample images: pip install scikit-image")
MIN_SIZE, MAX_PIXELS = 24, 1_000_000  # the screening the fixtures are built for


def skimage_photo(name: str, side: int = 96) -> Image.Image:
    """A bundled scikit-image sample, shrunk so that its longer side is `side` (fast tests)."""
    image = Image.open(Path(SKIMAGE.submodule_search_locations[0]) / "data" / name)
    image.load()
    return ImageOps.contain(image, (side, side), Image.BICUBIC) if side else image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny 1-bit PNG whose header claims width x height (a decompression bomb for large sizes)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def make_samples() -> list[dict]:
    """The canonical sample list: dict(name, key, ext, image bytes, caption bytes, meta {json sidecar}, expect)."""
    astro, camera = skimage_photo("astronaut.png"), skimage_photo("camera.png")
    coffee = skimage_photo("coffee.png").quantize(32)
    coffee.info["transparency"] = int(np.asarray(coffee)[0, 0])  # the top-left colour becomes transparent
    rocket = skimage_photo("rocket.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    moon16 = Image.fromarray(np.asarray(skimage_photo("moon.png")).astype(np.uint16) * 257)  # I;16
    gradient = Image.fromarray(np.tile(np.arange(1100, dtype=np.uint8), (1000, 1)))  # 1.1M pixels > MAX_PIXELS
    jpeg = encode(astro, "JPEG", quality=90)
    rows = [  # name, ext, image bytes, caption bytes, expected error
        ("astro", "jpg", jpeg, b"an astronaut with a flag", None),
        ("camera", "png", encode(camera, "PNG"), b"a man with a camera, greyscale", None),
        ("coffee", "png", encode(coffee, "PNG"), b"a cup of coffee, palette with transparency", None),
        ("logo", "png", encode(skimage_photo("logo.png"), "PNG"), b"the scikit-image logo, RGBA", None),
        ("chelsea", "jpg", encode(skimage_photo("chelsea.png").convert("CMYK"), "JPEG", quality=95),
         b"a cat called Chelsea, CMYK", None),
        ("moon", "png", encode(moon16, "PNG"), b"the moon, 16-bit", None),
        ("rocket", "jpg", encode(rocket, "JPEG", exif=exif), b"a rocket on its pad, EXIF rotated", None),
        ("horse", "png", encode(skimage_photo("horse.png").convert("LA"), "PNG"), b"a horse silhouette, LA", None),
        ("color", "webp", encode(skimage_photo("color.png"), "WEBP", quality=90), b"colour wheel, webp", None),
        ("coins", "png", encode(skimage_photo("coins.png"), "PNG"), b"coins \xff\xfe not UTF-8", None),
        ("hubble", "jpg", encode(skimage_photo("hubble_deep_field.jpg"), "JPEG"), b"  deep field  \n", None),
        ("tiny", "png", encode(skimage_photo("astronaut.png", 20), "PNG"), b"too small", "too_small"),
        ("empty", "jpg", b"", b"zero bytes", "unreadable"),
        ("trunc", "jpg", jpeg[: len(jpeg) // 2], b"truncated", "unreadable"),
        ("notimg", "png", b"this is not an image", b"text bytes", "unreadable"),
        ("bomb", "png", png_header_only(30000, 30000), b"decompression bomb", "too_large"),
        ("big", "png", encode(gradient, "PNG"), b"more than MAX_PIXELS", "too_large"),
        ("nocap", "png", encode(camera, "PNG"), b"   ", "no_caption"),
        ("astro_again", "png", encode(astro, "PNG"), b"a second astro key", "duplicate"),
    ]
    samples = []
    for i, (name, ext, image, caption, expect) in enumerate(rows):
        meta = {"key": "k000_astro" if name == "astro_again" else f"k{i:03d}_{name}"}
        if i % 2 == 0:
            meta[data.SYNTHETIC] = f"synthetic caption of {name}"
        if i % 3 == 0:
            meta["short_caption"] = f"short {name}"
        samples.append({"name": f"{i:03d}_{name}", "ext": ext, "image": image, "caption": caption, "meta": meta,
                        "expect": expect})
    return samples


def write_folder(samples, root: Path) -> Path:
    for i, s in enumerate(samples):
        stem = root / f"part{i // 10}" / s["name"]  # recursive, and sorted paths keep the canonical order
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix("." + s["ext"]).write_bytes(s["image"])
        stem.with_suffix(".txt").write_bytes(s["caption"])
        stem.with_suffix(".json").write_text(json.dumps(s["meta"]))
    return root


def write_manifest(samples, path: Path) -> Path:
    """A .jsonl or .csv manifest beside an images/ folder."""
    rows = []
    for s in samples:
        image = Path("images") / f"{s['name']}.{s['ext']}"
        (path.parent / image).parent.mkdir(parents=True, exist_ok=True)
        (path.parent / image).write_bytes(s["image"])
        rows.append({"image": image.as_posix(), "caption": s["caption"].decode("utf-8", "replace"), **s["meta"]})
    if path.suffix == ".csv":
        import csv
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, ["image", "caption", "key", "short_caption", data.SYNTHETIC])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_shards(samples, folder: Path, num_shards: int) -> Path:
    """img2dataset layout: NNNNN.tar with key.ext + key.txt + key.json, samples dealt in order to shards."""
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(samples) // num_shards)
    for shard in range(num_shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for s in samples[shard * per_shard:(shard + 1) * per_shard]:
                for ext, payload in ((s["ext"], s["image"]), ("txt", s["caption"]),
                                     ("json", json.dumps(s["meta"]).encode())):
                    info = tarfile.TarInfo(f"{s['name']}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return folder


@pytest.fixture(scope="module")
def samples():
    return make_samples()


@pytest.fixture(scope="module")
def datasets(samples, tmp_path_factory):
    """The same samples in every format: {name: path or pattern}."""
    root = tmp_path_factory.mktemp("formats")
    shards = write_shards(samples, root / "shards", 4)
    return {"folder": write_folder(samples, root / "folder"),
            "jsonl": write_manifest(samples, root / "jsonl" / "manifest.jsonl"),
            "csv": write_manifest(samples, root / "csv" / "manifest.csv"),
            "shard_folder": shards, "shard_pattern": f"{shards}/{{00000..00003}}.tar",
            "one_tar": write_shards(samples, root / "one", 1) / "00000.tar"}


def read_all(path, **screening):
    source = data.open_dataset(path, **{"min_size": MIN_SIZE, "max_pixels": MAX_PIXELS, **screening})
    return source, list(source.iter_records())


# ----------------------------------------------------------------------------------------------------------------
# Decoding and screening.

def test_every_mode_decodes_to_the_right_rgb(samples):
    decoded = {s["name"].split("_", 1)[1]: data.load_image(io.BytesIO(s["image"]), MIN_SIZE, MAX_PIXELS)
               for s in samples}
    for name, (image, error) in decoded.items():
        expect = next(s["expect"] for s in samples if s["name"].endswith("_" + name))
        expect = None if expect in ("no_caption", "duplicate") else expect  # record-level reasons, good images
        assert error == expect, name
        assert (image is None) == (expect is not None) and (image is None or image.mode == "RGB"), name
    px = {n: np.asarray(im).astype(int) for n, (im, _) in decoded.items() if im is not None}
    camera = np.asarray(skimage_photo("camera.png")).astype(int)
    assert (px["camera"] == camera[..., None]).all()  # L: the grey in every channel
    moon = np.asarray(skimage_photo("moon.png")).astype(int)
    assert (px["moon"] == moon[..., None]).all()  # 16-bit: 0..65535 scaled back exactly, not clipped at 255
    assert (px["coffee"][0, 0] == 255).all()  # the transparent palette colour composited on white
    logo = np.asarray(skimage_photo("logo.png").convert("RGBA")).astype(float)
    alpha = logo[..., 3:] / 255
    assert np.abs(px["logo"] - (logo[..., :3] * alpha + 255 * (1 - alpha))).max() <= 1  # RGBA over white
    chelsea = np.asarray(skimage_photo("chelsea.png")).astype(int)
    assert np.abs(px["chelsea"] - chelsea).mean() < 6  # CMYK JPEG back to RGB (JPEG loss only)
    rocket = skimage_photo("rocket.jpg")
    assert decoded["rocket"][0].size == rocket.size[::-1]  # EXIF orientation applied: portrait now
    assert np.abs(px["rocket"] - np.asarray(rocket.transpose(Image.Transpose.ROTATE_270)).astype(int)).mean() < 6


def test_screening_thresholds_and_bombs():
    photo = skimage_photo("astronaut.png", 0)  # 512 x 512
    data_png = io.BytesIO(encode(photo, "PNG"))
    assert data.load_image(data_png, min_size=512)[1] is None
    assert data.load_image(data_png, min_size=513) == (None, "too_small")
    assert data.load_image(data_png, max_pixels=512 * 512 - 1) == (None, "too_large")
    bomb = io.BytesIO(png_header_only(30000, 30000))  # Pillow's own hard limit: refused before any decoding
    assert data.load_image(bomb, max_pixels=10**12) == (None, "too_large")


def test_center_crop_resize_matches_the_reward_preprocessing():
    photo = skimage_photo("coffee.png", 0)  # 600 x 400, landscape
    ours = data.center_crop_resize(photo, 64)
    assert ours.dtype == torch.uint8 and ours.shape == (3, 64, 64)
    x = torch.from_numpy(np.array(photo)).permute(2, 0, 1).float() / 255
    theirs = rewards.resize_center_crop([x], 64)[0]
    assert (ours.float() / 255 - theirs).abs().mean() < 0.01  # same geometry and filter, sub-pixel offsets aside
    crop = photo.crop((100, 0, 500, 400)).resize((64, 64), Image.BICUBIC)  # the centred square by hand
    diff = (ours.int() - torch.from_numpy(np.array(crop)).permute(2, 0, 1).int()).abs()
    assert diff[:, :, 1:-1].max() <= 2  # the same square; at its left/right edges the filter reads the real
    assert diff[:, :, [0, -1]].max() > 2  # pixels beyond it instead of clamping like crop-then-resize


# ----------------------------------------------------------------------------------------------------------------
# The formats.

EXPECTED_STATS = {"ok": 11, "no_caption": 1, "unreadable": 3, "too_small": 1, "too_large": 2, "duplicate": 1}


@pytest.mark.parametrize("fmt", ["folder", "jsonl", "csv", "shard_folder", "shard_pattern", "one_tar"])
def test_every_format_yields_the_same_records(fmt, datasets, samples):
    source, records = read_all(datasets[fmt])
    assert source.format == {"folder": "folder", "jsonl": "manifest", "csv": "manifest"}.get(fmt, "webdataset")
    assert [r.key for r in records] == [s["meta"]["key"] for s in samples]
    assert [r.error for r in records] == [s["expect"] for s in samples]
    assert {k: v for k, v in source.stats.items() if v} == EXPECTED_STATS  # counted, nothing raised
    folder_source, reference = read_all(datasets["folder"])
    for r, ref, s in zip(records, reference, samples):
        assert r.captions == ref.captions
        if r.error is None:
            assert r.captions["caption"] == s["caption"].decode("utf-8", "replace").strip()
            assert r.captions.get(data.SYNTHETIC) == s["meta"].get(data.SYNTHETIC)
            assert np.array_equal(np.asarray(r.image), np.asarray(ref.image))
    assert records[9].captions["caption"] == "coins \ufffd\ufffd not UTF-8"  # invalid bytes replaced, kept
    if fmt in ("folder", "jsonl", "csv"):
        assert len(source) == len(samples)


def test_default_keys_and_bad_input_errors(tmp_path, samples):
    good = [s for s in samples if s["expect"] is None][:3]
    for s in good:
        s = {**s, "meta": {}}
        write_folder([s], tmp_path / "plain")
    keys = [r.key for r in data.open_dataset(tmp_path / "plain").iter_records()]
    assert keys == [f"part0/{s['name']}" for s in good]  # no .json key: the relative path without extension
    manifest = tmp_path / "m" / "list.jsonl"
    write_manifest([{**s, "meta": {}} for s in good], manifest)
    assert [r.key for r in data.open_dataset(manifest).iter_records()] == [f"images/{s['name']}" for s in good]
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        data.open_dataset(tmp_path / "bad.jsonl")
    (tmp_path / "noimage.jsonl").write_text('{"caption": "x"}\n')
    bom = tmp_path / "bom" / "excel.csv"  # Excel writes a byte-order mark before the header
    write_manifest([{**s, "meta": {}} for s in good], bom)
    bom.write_bytes(b"\xef\xbb\xbf" + bom.read_bytes())
    assert [r.error for r in data.open_dataset(bom).iter_records()] == [None] * 3
    (bom.parent / f"images/{good[0]['name']}.{good[0]['ext']}").unlink()  # a file the manifest names is gone
    source = data.open_dataset(bom)
    assert [r.error for r in source.iter_records()] == ["missing", None, None] and source.stats["missing"] == 1
    with pytest.raises(ValueError, match="no image path"):
        data.open_dataset(tmp_path / "noimage.jsonl")
    (tmp_path / "long.csv").write_text("image,caption\na.png," + "x" * 200_000 + "\n")  # over csv's field limit
    with pytest.raises(ValueError, match="long.csv: not a readable CSV manifest"):
        data.open_dataset(tmp_path / "long.csv")
    with pytest.raises(FileNotFoundError, match="shard"):
        data.open_dataset(f"{tmp_path}/{{00000..00002}}.tar")
    with pytest.raises(FileNotFoundError):
        data.open_dataset(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        data.open_dataset(tmp_path / "empty")
    assert data.expand_braces("s/{08..11}.tar") == ["s/08.tar", "s/09.tar", "s/10.tar", "s/11.tar"]


def test_a_byte_order_mark_is_not_part_of_a_caption(tmp_path, samples):
    good = next(s for s in samples if s["expect"] is None)
    write_folder([{**good, "meta": {}, "caption": b"\xef\xbb\xbfa red circle\n"}], tmp_path / "f")  # Notepad's .txt
    [record] = data.open_dataset(tmp_path / "f").iter_records()
    assert record.captions["caption"] == "a red circle"  # not "\ufeffa red circle": its first word unknown


@pytest.mark.parametrize("fmt", ["folder", "csv", "one_tar"])
def test_a_captions_only_pass_decodes_no_image(fmt, datasets, monkeypatch):
    """decode=False (model.py precompute's text pass): the same keys and captions, and no image read."""
    decoded = [(r.key, r.captions) for r in data.open_dataset(datasets[fmt]).iter_records()
               if r.error in (None, "missing", "unreadable", "too_small", "too_large")]
    monkeypatch.setattr(data, "load_image", lambda *a, **k: pytest.fail("an image was decoded"))
    records = list(data.open_dataset(datasets[fmt], decode=False).iter_records())
    assert all(r.image is None for r in records)
    assert [(r.key, r.captions) for r in records if r.error is None] == decoded


def test_a_truncated_shard_is_counted_and_the_rest_read(tmp_path, samples):
    good = [s for s in samples if s["expect"] is None]
    folder = write_shards(good, tmp_path / "shards", 2)
    raw = (folder / "00001.tar").read_bytes()
    (folder / "00001.tar").write_bytes(raw[: len(raw) // 2])
    source, records = read_all(folder)
    assert [r.key for r in records[:6]] == [s["meta"]["key"] for s in good[:6]]  # shard 0 whole
    assert 6 <= len(records) < len(good) and source.stats["bad_shard"] == 1


# ----------------------------------------------------------------------------------------------------------------
# The rank x worker split.

def many_samples(samples, n=26):
    """n decodable samples with unique keys and captions (bytes reused), two bad ones among them."""
    good = [s for s in samples if s["expect"] is None]
    out = []
    for i in range(n):
        s = good[i % len(good)]
        out.append({**s, "name": f"{i:03d}", "caption": f"caption {i}".encode(), "meta": {"key": f"m{i:03d}"}})
    out[5] = {**out[5], "image": b""}
    out[17] = {**out[17], "caption": b""}
    return out


def captions_seen(path, rank, world_size, num_workers, epoch=0):
    dataset = data.RecordDataset(data.open_dataset(path), 16, rank=rank, world_size=world_size, seed=3,
                                 shuffle_buffer=4)
    dataset.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return [caption for _, caption, *_ in loader]


@pytest.mark.parametrize("num_shards", [6, 3])  # at least as many shards as the 4 consumers, and fewer
def test_two_ranks_two_workers_see_every_sample_once(num_shards, samples, tmp_path):
    many = many_samples(samples)
    expected = sorted(s["caption"].decode() for i, s in enumerate(many) if i not in (5, 17))
    folder = write_shards(many, tmp_path / "shards", num_shards)
    per_rank = [captions_seen(folder, rank, 2, 2) for rank in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == expected and all(per_rank)
    if num_shards == 6:
        again = captions_seen(folder, 0, 2, 2, epoch=1)
        assert sorted(again) != sorted(per_rank[0]) or again != per_rank[0]  # another epoch, another order


def test_indexed_sources_split_and_shuffle_exactly_once(samples, tmp_path):
    manifest = write_manifest(many_samples(samples), tmp_path / "m.jsonl")
    source = data.open_dataset(manifest)
    for seed in (None, [0, 0, 1]):
        parts = [[r.key for r in source.iter_records(rank, 2, worker, 3, seed=seed)]
                 for rank in range(2) for worker in range(3)]
        assert sorted(sum(parts, [])) == sorted(e[0] for e in source.entries)
    shuffled = [r.key for r in source.iter_records(seed=[0, 0, 1])]
    assert shuffled != [e[0] for e in source.entries]


# ----------------------------------------------------------------------------------------------------------------
# Rewards joined by key, the missing-annotation policy, synthetic captions.

@pytest.fixture(scope="module")
def annotated(datasets, samples, tmp_path_factory):
    """An annotations.jsonl for the folder dataset: alignment (caption-dependent, scored on both captions where a
    synthetic one exists) and sharpness (image-only, plain column); k001 has no row, k002 a null score, and
    k004's synthetic caption was never scored."""
    rows = []
    for i, s in enumerate(samples):
        key = s["meta"]["key"]
        if s["expect"] is not None or i == 1:
            continue
        row = {"key": key, "alignment": i / 20, "sharpness": None if i == 2 else 1 - i / 20}
        if data.SYNTHETIC in s["meta"] and i != 4:
            row["alignment@synthetic_caption"] = 0.5 + i / 40
        rows.append(row)
    path = tmp_path_factory.mktemp("ann") / "annotations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    annotations = rewards.load_annotations(path)
    keys, columns = rewards.load_annotation_columns(path)  # as train.py reads them
    bins = rewards.RewardBins.fit(data.annotation_scores(columns, ["alignment", "sharpness"]), num_bins=8)
    return annotations, bins, data.RewardTable(keys, columns, bins)


def items_by_key(datasets, samples, table, **options):
    dataset = data.RecordDataset(data.open_dataset(datasets["folder"], min_size=MIN_SIZE, max_pixels=MAX_PIXELS),
                                 16, rewards=table, **options)
    by_caption = {}
    for s in samples:
        by_caption[s["caption"].decode("utf-8", "replace").strip()] = (s["meta"]["key"], "caption")
        by_caption[s["meta"].get(data.SYNTHETIC)] = (s["meta"]["key"], data.SYNTHETIC)
    out = {}
    for image, caption, values, source in dataset:
        assert image.shape == (3, 16, 16) and -1 <= image.min() and image.max() <= 1
        key, field = by_caption[caption]
        assert source == (key, field)  # the item names the sample and the caption field it trains on
        out[key] = (field, values.numpy())
    return dataset, out


def expected_values(annotations, bins, key, columns):
    row = annotations.get(key, {})
    return bins.values({n: np.array([row.get(c, np.nan)]) for n, c in zip(bins.names, columns)})[0]


def test_rewards_joined_by_key_and_missing_policy(annotated, datasets, samples):
    annotations, bins, table = annotated
    ok_keys = [s["meta"]["key"] for s in samples if s["expect"] is None]
    dataset, skip = items_by_key(datasets, samples, table, missing_rewards="skip")
    assert sorted(skip) == sorted(set(ok_keys) - {"k001_camera", "k002_coffee"})  # no row / a null score
    assert dataset.stats["no_annotation"] == 2 and dataset.stats["ok"] == 11
    for key, (field, values) in skip.items():
        assert field == "caption"
        assert np.array_equal(values, expected_values(annotations, bins, key, ["alignment", "sharpness"]))
    _, lowest = items_by_key(datasets, samples, table, missing_rewards="lowest")
    assert sorted(lowest) == sorted(ok_keys)
    assert (lowest["k001_camera"][1] == 0).all()  # no annotation row: the lowest bin of every reward
    coffee = expected_values(annotations, bins, "k002_coffee", ["alignment", "sharpness"])
    assert np.array_equal(lowest["k002_coffee"][1], coffee) and coffee[1] == 0  # the null score: lowest bin


def test_synthetic_captions_use_their_own_reward_columns(annotated, datasets, samples):
    annotations, bins, table = annotated
    assert table.plain_for[data.SYNTHETIC] == ["sharpness"]  # image-only: no @synthetic_caption column anywhere
    _, items = items_by_key(datasets, samples, table, synthetic_caption_prob=1.0)
    for s in samples:
        key = s["meta"]["key"]
        if key not in items:
            continue
        field, values = items[key]
        scored = "alignment@synthetic_caption" in annotations[key]
        assert field == (data.SYNTHETIC if scored else "caption")  # k004: synthetic caption unscored -> real one
        columns = ["alignment@synthetic_caption" if scored else "alignment", "sharpness"]
        assert np.array_equal(values, expected_values(annotations, bins, key, columns))
    assert sum(f == data.SYNTHETIC for f, _ in items.values()) == 4
    _, never = items_by_key(datasets, samples, table, synthetic_caption_prob=0.0)
    assert all(f == "caption" for f, _ in never.values())
    _, lowest = items_by_key(datasets, samples, table, synthetic_caption_prob=1.0, missing_rewards="lowest")
    assert lowest["k004_chelsea"][0] == data.SYNTHETIC and lowest["k004_chelsea"][1][0] == 0  # unscored: lowest
    with pytest.raises(ValueError, match="no scores for reward"):
        data.RewardTable(*data.annotation_columns(annotations), rewards.RewardBins({"clip": np.arange(3.0)}))


def test_synthetic_choice_is_seeded_and_near_p(samples, tmp_path):
    many = [{**s, "meta": {**s["meta"], data.SYNTHETIC: "syn " + s["caption"].decode()}}
            for s in many_samples(samples, 200)]
    source = data.open_dataset(write_manifest(many, tmp_path / "m.jsonl"))
    dataset = data.RecordDataset(source, 8, synthetic_caption_prob=0.5, seed=1)
    first, second = ([c.startswith("syn ") for _, c, *_ in dataset] for _ in range(2))
    assert first == second and 0.35 < np.mean(first) < 0.65
    assert [field == data.SYNTHETIC for *_, (_, field) in dataset] == first  # the item names the field it chose
    dataset.set_epoch(1)
    assert [c.startswith("syn ") for _, c, *_ in dataset] != first



def test_stream_batches_are_reproducible_and_a_resume_draws_fresh_epochs(samples, tmp_path):
    source = data.open_dataset(write_manifest(many_samples(samples), tmp_path / "m.jsonl"))
    def first_batches(resume, n=8):  # 24 usable samples, 6 batches of 4 per epoch: n = 8 crosses an epoch
        batches = data.stream_batches(data.RecordDataset(source, 8, seed=2), 4, resume=resume)
        return [tuple(next(batches)[1]) for _ in range(n)]
    run = first_batches(0)
    assert run == first_batches(0)  # the same seed reads the same stream
    assert sorted(sum(map(list, run[:6]), [])) == sorted(f"caption {i}" for i in range(26) if i not in (5, 17))
    assert first_batches(5) != run  # a run resumed at step 5 reads its own seeded permutation


def test_inspect_cli_counts_a_dataset(datasets, capsys):
    data.main(["inspect", str(datasets["shard_pattern"]), "--min-size", str(MIN_SIZE), "--image-size", "16"])
    out = capsys.readouterr().out
    assert "webdataset, 19 records" in out and "ok 12" in out and "too_large 1" in out and "duplicate 1" in out


# ----------------------------------------------------------------------------------------------------------------
# A few training steps from each format (train.py --data).

def real_train_args(runs, dataset, annotations, *extra):
    """A seconds-long tiny run on a real dataset (like conftest.tiny_train_args, without the built-in world)."""
    return ["--preset", "tiny", "--runs-dir", str(runs), "--data", str(dataset), "--annotations", str(annotations),
            "--rewards", "alignment,sharpness", "--steps", "3", "--batch-size", "4", "--log-every", "1",
            "--ckpt-every", "3", "--min-image-size", str(MIN_SIZE), *extra]


@pytest.fixture(scope="module")
def annotation_file(annotated, tmp_path_factory):
    annotations = annotated[0]
    path = tmp_path_factory.mktemp("train_ann") / "annotations.jsonl"
    rows = [{"key": k, **{n: None if v != v else v for n, v in row.items()}} for k, row in annotations.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt,workers", [("folder", "0"), ("csv", "0"), ("shard_pattern", "2")])
def test_a_few_training_steps_from_each_format(fmt, workers, datasets, annotated, annotation_file, tmp_path, capfd):
    import train
    from model import load_checkpoint
    train.main(real_train_args(tmp_path, datasets[fmt], annotation_file, "--data-workers", workers,
                               "--synthetic-caption-prob", "0.5"))
    ckpt = load_checkpoint(tmp_path / "miro" / "ckpt.pt")
    assert ckpt["step"] == 3
    annotations, bins, _ = annotated  # the run fitted the same bins on the same annotations
    assert ckpt["bins"]["edges"] == rewards.RewardBins.fit(
        data.annotation_scores(data.annotation_columns(annotations)[1], ["alignment", "sharpness"]),
        num_bins=64).to_dict()["edges"]
    log = (tmp_path / "miro" / "log.txt").read_text()
    assert "streamed" in log and "loss nan" not in log and log.count("step ") >= 3
    assert "no '@synthetic_caption' scores for ['sharpness']" in log
    assert "caption words are not among the built-in tokenizer's" in log  # real captions, shapes-world words
    out = capfd.readouterr().out  # every data worker reports its pass: the skips were counted, not fatal
    assert "no_annotation" in out and "unreadable" in out


def test_a_resumed_real_data_run_keeps_its_data_settings(datasets, annotation_file, tmp_path, capsys):
    """--resume alone trains on the samples and captions the run was started with (size floor, synthetic
    captions, missing rewards, annotations); a flag that contradicts them is a one-line error."""
    import train
    from model import load_checkpoint
    train.main(real_train_args(tmp_path, datasets["folder"], annotation_file, "--data-workers", "0",
                               "--synthetic-caption-prob", "0.5", "--missing-rewards", "lowest"))
    run = load_checkpoint(tmp_path / "miro" / "ckpt.pt")["run"]
    assert (run["min_image_size"], run["synthetic_caption_prob"], run["missing_rewards"], run["annotations"]) == \
        (MIN_SIZE, 0.5, "lowest", str(annotation_file))
    for flag, value, theirs in [("--min-image-size", "0", MIN_SIZE), ("--synthetic-caption-prob", "0.25", 0.5),
                                ("--missing-rewards", "skip", "lowest")]:
        with pytest.raises(SystemExit):
            train.main(["--resume", str(tmp_path / "miro"), "--steps", "4", flag, value])
        assert f"{flag} {value} (the run's: {theirs})" in capsys.readouterr().err
    train.main(["--resume", str(tmp_path / "miro"), "--steps", "4", "--data-workers", "0"])
    resumed = load_checkpoint(tmp_path / "miro" / "ckpt.pt")
    assert resumed["step"] == 4 and resumed["run"] == run
    log = (tmp_path / "miro" / "log.txt").read_text()  # both runs trained on synthetic captions
    assert log.count("no '@synthetic_caption' scores for ['sharpness']") == 2 and "resumed" in log


def test_real_data_cli_errors_are_one_line(datasets, annotation_file, tmp_path, capsys):
    import train
    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(uncaptioned / f"{i}.png")
    cases = [(["--data", str(uncaptioned), "--no-rewards", "--data-workers", "0"],
              "an epoch gave no full batch of"),(["--data", str(tmp_path / "missing")], "does not exist"),
             (["--data", str(datasets["folder"]), "--annotations", str(tmp_path / "none.jsonl")], "no annotations"),
             (["--data", str(datasets["folder"]), "--annotations", str(annotation_file), "--rewards", "contrast"],
              "no scores for reward(s) contrast"),
             (["--data", str(datasets["folder"]), "--synthetic-caption-prob", "2"], "must be in [0, 1]")]
    for flags, message in cases:
        with pytest.raises(SystemExit):
            train.main(["--preset", "tiny", "--runs-dir", str(tmp_path / "runs"), *flags])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in err and "Traceback" not in err


def test_training_steps_with_frozen_clip_text_and_sdxl_vae(datasets, annotation_file, clip_files, vae_dir, tmp_path):
    """Real images through the frozen parts of a real run: WebDataset shards, the CLIP text tower and the VAE."""
    import train
    from model import ModelConfig, load_checkpoint
    options = [f for k, v in clip_files.items() for f in ("--text-encoder-option", f"{k}={v}")]
    train.main(real_train_args(tmp_path, datasets["shard_pattern"], annotation_file, "--text-encoder", "clip",
                               *options, "--vae", "sdxl", "--vae-option", f"source={vae_dir}", "--data-workers", "2"))
    ckpt = load_checkpoint(tmp_path / "miro" / "ckpt.pt")
    cfg = ModelConfig(**ckpt["config"])
    assert ckpt["step"] == 3 and (cfg.in_channels, cfg.vocab_size, cfg.text_dim, cfg.max_text_len) == (4, 0, 24, 77)
    assert "loss nan" not in (tmp_path / "miro" / "log.txt").read_text()
