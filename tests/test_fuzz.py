"""Property-based tests (hypothesis): random prompts, reward specs, annotation rows and captions meet either a
result that keeps the documented invariants or the documented clear error (ValueError with a one-line message;
argparse's exit 2 for the command line), never another exception. Few examples each, so the file runs in seconds."""
import contextlib
import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import data
import rewards
import sample
from model import WordTokenizer

NAMES = ("alignment", "sharpness", "cleanliness", "contrast")
# No example database (nothing written into the repository) and no "explain" phase (slow on a failure).
FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow],
                phases=[Phase.explicit, Phase.generate, Phase.shrink], report_multiple_bugs=False)

# Text that looks like what users type (names, numbers, '=' and ',') mixed with arbitrary unicode.
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-3, 3).map(str),
                    st.sampled_from(["0.5", "1", "0", "1e-3", "nan", "inf", "-0", "0x1", "1_0", " 0.2 ", ""]))
spec_items = st.one_of(st.builds(lambda n, v: f"{n}={v}", st.sampled_from(NAMES + ("beauty", "", " alignment")),
                                 numbers), st.text(max_size=12))
specs = st.lists(spec_items, max_size=5).map(",".join)


def assert_one_line_error(error):
    message = str(error)
    assert message and "\n" not in message, repr(message)


@FUZZ
@given(spec=specs, names=st.lists(st.sampled_from(NAMES), unique=True, max_size=4),
       default=st.sampled_from([0.0, 1.0]))
def test_parse_reward_targets(spec, names, default):
    try:
        targets = sample.parse_reward_targets(spec, names, default)
    except ValueError as e:
        assert_one_line_error(e)
        return
    assert targets.shape == (len(names),) and ((targets >= 0) & (targets <= 1)).all()
    if not spec:
        assert (targets == default).all()


@pytest.fixture(scope="module")
def out_dir():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@settings(FUZZ, max_examples=12)
@given(prompt=st.text(max_size=40), spec=specs, cfg=st.sampled_from(["0", "2", "-1", "nan", "1e9"]))
def test_sample_command_line(tiny_runs, out_dir, prompt, spec, cfg):
    """sample.py with any prompt, reward spec and cfg: images, or exit 2 with one error line (no traceback)."""
    out = out_dir / "grid.png"
    out.unlink(missing_ok=True)
    argv = ["--ckpt", str(tiny_runs / "miro"), f"--prompt={prompt}", f"--rewards={spec}", f"--cfg={cfg}",
            "--steps", "1", "--n", "1", "--out", str(out)]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            sample.main(argv)
    except SystemExit as e:
        lines = err.getvalue().strip().splitlines()
        assert e.code == 2 and lines and ": error: " in lines[-1], err.getvalue()
        assert not out.exists()
        return
    assert out.exists()


# ----------------------------------------------------------------------------------------------------------------
# Annotation rows and reward bins.

numeric = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30),
                    st.sampled_from([10**400, -10**400]))  # the last: JSON integers beyond any float
scores = st.one_of(numeric, st.booleans(), st.text(max_size=5), st.lists(st.floats(), max_size=2))
good_rows = st.fixed_dictionaries({"key": st.text(max_size=6)}, optional={n: numeric for n in NAMES})
bad_rows = st.one_of(
    st.fixed_dictionaries({"key": st.one_of(st.text(max_size=6), st.integers())},
                          optional={n: scores for n in NAMES}),
    st.dictionaries(st.text(max_size=6), scores, max_size=4),  # "key" usually missing
    st.sampled_from([[], 3, "row", None]),  # not an object
)


@FUZZ
@given(good=st.lists(good_rows, max_size=5), bad=st.lists(bad_rows, max_size=1), torn_tail=st.text(max_size=8))
def test_load_annotations(good, bad, torn_tail):
    """Any JSON-lines file (NaN / Infinity literals included, a torn last line) -> {key: {name: float}} or a
    ValueError naming the problem."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "annotations.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in good + bad) + torn_tail.replace("\n", " "))
        try:
            table = rewards.load_annotations(path)
        except ValueError as e:
            assert_one_line_error(e)
            with pytest.raises(ValueError):
                rewards.load_annotation_columns(path)
            return
        keys, columns = rewards.load_annotation_columns(path)  # train.py's reader: the same scores, as arrays
    assert all(isinstance(k, str) and all(isinstance(v, float) for v in s.values()) for k, s in table.items())
    expect_keys, expect = data.annotation_columns(table)
    assert np.array_equal(keys, np.array([k.encode() for k in expect_keys], dtype=bytes))
    assert list(columns) == list(expect) and all(np.array_equal(columns[c], expect[c], equal_nan=True) for c in expect)


values = st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                            st.sampled_from([0.0, 1.0, 0.5])), max_size=40)


@FUZZ
@given(scores=st.dictionaries(st.sampled_from(NAMES), values, min_size=1), num_bins=st.integers(2, 70),
       method=st.sampled_from(["quantile", "uniform"]))
@example(scores={"alignment": [1.3e303, -1.797e308]}, num_bins=2, method="quantile")  # found by CI: hi - lo overflowed
@example(scores={"alignment": [1.7e308, -1.7e308, 0.0]}, num_bins=3, method="uniform")
def test_reward_bins(scores, num_bins, method):
    """fit -> sorted edges, values in [0, 1] (NaN -> 0), the same after a to_dict round trip; or ValueError."""
    try:
        bins = rewards.RewardBins.fit(scores, num_bins=num_bins, method=method)
    except ValueError as e:
        assert_one_line_error(e)
        assert any(not np.isfinite(np.asarray(v, dtype=float)).any() for v in scores.values())
        return
    assert bins.num_bins == num_bins
    assert all(np.all(np.diff(e) >= 0) for e in bins.edges.values())
    n = max(len(v) for v in scores.values())
    full = {k: (list(v) + [math.nan] * n)[:n] for k, v in scores.items()}
    out = bins.values(full)
    assert out.shape == (n, len(scores)) and ((out >= 0) & (out <= 1)).all()
    assert all(out[i, j] == 0 for j, k in enumerate(bins.names) for i, x in enumerate(full[k]) if math.isnan(x))
    assert np.array_equal(rewards.RewardBins.from_dict(json.loads(json.dumps(bins.to_dict()))).values(full), out)


# ----------------------------------------------------------------------------------------------------------------
# Captions.

caption_words = st.sampled_from([*data.vocabulary(), "left of", "right of", "circles", "reds", "", "  ", "A", "of"])
captions = st.one_of(st.text(max_size=60),
                     st.lists(caption_words, max_size=8).map(lambda ws: data.PREFIX + " ".join(ws)))


@FUZZ
@given(caption=captions)
def test_caption_to_metadata(caption):
    """Any string -> None or GenEval metadata that writes back exactly the same caption."""
    meta = data.caption_to_metadata(caption)
    if meta is not None:
        assert meta["tag"] in data.TASKS and meta["prompt"] == caption == data.metadata_to_caption(meta)


@FUZZ
@given(prompt=st.text(max_size=80))
def test_tokenizer_takes_any_prompt(prompt):
    tokenizer = WordTokenizer(data.vocabulary(), max_len=8)
    ids, mask = tokenizer([prompt])
    assert ids.shape == (1, 8) and torch.equal(mask, ids != 0) and (ids < len(tokenizer)).all()


def _encoded(fmt: str, mode: str) -> bytes:
    """A small real image file, for mutations that keep a valid header and break the rest."""
    rng = np.random.default_rng(0)
    image = data.Image.fromarray(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


REAL_FILES = [_encoded(fmt, mode) for fmt, mode in [("PNG", "RGB"), ("PNG", "P"), ("PNG", "LA"), ("JPEG", "RGB"),
                                                     ("JPEG", "L"), ("GIF", "P"), ("BMP", "RGB")]]
mutated_files = st.builds(
    lambda base, cut, flips: bytes(b ^ x if i in flips else b for i, (b, x) in enumerate(zip(base[:cut], [0x5A] * cut))),
    st.sampled_from(REAL_FILES), st.integers(0, 400), st.sets(st.integers(0, 400), max_size=6))
image_bytes = st.one_of(st.binary(max_size=300), mutated_files, st.sampled_from(REAL_FILES))


@FUZZ
@given(files=st.lists(image_bytes, min_size=1, max_size=6), min_size=st.sampled_from([0, 4, 10]))
def test_random_bytes_as_images(files, min_size):
    """Random and mutated image files in an image folder: each decodes to an RGB image of the training size or is
    skipped and counted as unreadable / too small; nothing else happens and no sample is lost from the counts."""
    with tempfile.TemporaryDirectory() as d:
        for i, blob in enumerate(files):
            (Path(d) / f"{i}.png").write_bytes(blob)
            (Path(d) / f"{i}.txt").write_text(f"caption {i}")
        for i, blob in enumerate(files):
            image, reason = data.load_image(io.BytesIO(blob), min_size=min_size)
            assert (image is None) != (reason is None) and reason in (None, "unreadable", "too_small", "too_large")
            assert image is None or (image.mode == "RGB" and min(image.size) >= max(min_size, 1))
        dataset = data.RecordDataset(data.open_dataset(d, min_size=min_size), 8)
        items = list(dataset)
        assert all(x.shape == (3, 8, 8) and x.dtype == torch.float32 and x.abs().max() <= 1 for x, *_ in items)
        stats = dataset.stats
        assert stats["ok"] == len(items) and sum(v for k, v in stats.items() if k in data.SKIP_REASONS) + \
            len(items) == len(files), stats
