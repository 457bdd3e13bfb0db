"""Tests of the annotation pass (rewards.annotate, `rewards.py annotate`, `rewards.py score`): every (key, reward)
pair scored exactly once across crashes, reruns, added rewards and ranks; unusable records counted, never scored."""
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import rewards
import tiny_rewards
from rewards import RewardBins

REPO = Path(__file__).resolve().parents[1]
N = 64  # samples of the test world


def probe_score(images, captions) -> torch.Tensor:
    """The test reward's value: mean brightness + len(caption) / 100; NaN (a failed score) if the caption says "nan",
    inf (a broken one) if it says "inf"."""
    return torch.tensor([float("nan") if "nan" in c else float("inf") if "inf" in c else x.mean().item() + len(c) / 100
                         for x, c in zip(images, captions)])


def make_probe(device="cpu", delay="0", calls=None):
    """Factory of the test reward "probe": ragged (images of any size), reads "short_caption" (else "caption"),
    sleeps `delay` seconds per batch, appends each batch size to `calls`."""
    def fn(images, captions):
        time.sleep(float(delay))
        if calls is not None:
            calls.append(len(captions))
        return probe_score(images, captions)
    return rewards.Reward("probe", fn, device, caption_field="short_caption", ragged=True)


@pytest.fixture
def probe(monkeypatch):
    """Registers "probe" for one test; returns the list of batch sizes it scored."""
    calls = []
    monkeypatch.setitem(rewards.REWARDS, "probe", partial(make_probe, calls=calls))
    return calls


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 64-sample built-in world, only read by the tests (their annotations go to --out folders)."""
    return data.build_shapes_dataset(data.WorldConfig(num_train=N), tmp_path_factory.mktemp("world"))


# what a finished run leaves
OUTPUTS = [".annotate.lock", "annotations.jsonl", "bins.json", "reward_versions.json", "summary.json"]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def image_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


class ListSource:
    """Records in memory, split over consumers as data.open_dataset sources are."""
    format = "list"

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def iter_records(self, rank=0, world_size=1, worker_id=0, num_workers=1, skip=(), need_caption=None):
        yield from (r for r in self.records[rank * num_workers + worker_id::world_size * num_workers]
                    if r.key not in skip and (need_caption is None or r.captions.get(need_caption)))


def mixed_records():
    """Images of two sizes, some with a short or a synthetic caption, one whose probe score fails (NaN), one whose
    probe score is infinite, three unusable."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(12):
        size = (16, 16) if i % 3 else (24, 20)
        image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        captions = {"caption": f"a long caption number {i}" + {4: " nan", 8: " inf"}.get(i, "")}
        if i % 2:
            captions["short_caption"] = f"short {i}"
        if i % 4 == 0:
            captions["synthetic_caption"] = f"a synthetic caption {i}"
        records.append(data.Record(f"r{i:02d}", image, captions))
    for i, error in [(12, "unreadable image"), (13, "too small"), (14, "unreadable image")]:
        records.append(data.Record(f"r{i:02d}", None, {"caption": "x"}, error))
    return records


# ----------------------------------------------------------------------------------------------------------------

def test_scores_captions_sizes_unusable_records_and_summary(tmp_path, probe):
    records = mixed_records()
    columns = ["probe", "probe@synthetic_caption", "contrast"]
    table = rewards.annotate(ListSource(records), columns, tmp_path, batch_size=4, verbose=False)
    usable = [r for r in records if r.image is not None]
    assert list(table) == [r.key for r in usable]  # unusable records are not written as scores
    for r in usable:
        caption = r.captions.get("short_caption", r.captions["caption"])  # probe reads short_caption if present
        expected = probe_score([image_tensor(r.image)], [caption]).item()
        expected = expected if np.isfinite(expected) else np.nan  # an infinite score counts as failed
        if "synthetic_caption" in r.captions:  # "name@field": the reward on that caption, where a record has it
            synthetic = probe_score([image_tensor(r.image)], [r.captions["synthetic_caption"]]).item()
            np.testing.assert_allclose(table[r.key]["probe@synthetic_caption"], synthetic, rtol=1e-6)
        else:
            assert "probe@synthetic_caption" not in table[r.key]
        contrast = rewards.contrast_score(image_tensor(r.image)[None]).item()  # one image alone, not in a batch
        np.testing.assert_allclose(table[r.key]["probe"], expected, rtol=1e-6)  # NaN == NaN here
        assert table[r.key]["contrast"] == pytest.approx(contrast, abs=1e-6)
    for i in (4, 8):  # failed and infinite scores: null in strict JSON, NaN in the table, bin 0 for training
        assert np.isnan(table[f"r{i:02d}"]["probe"]) and rows(tmp_path / "annotations.jsonl")[i]["probe"] is None

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["samples"] == 12 and summary["skipped"] == {"unreadable image": 2, "too small": 1}
    probe_stats = summary["rewards"]["probe"]
    x = np.array([v["probe"] for v in table.values()])
    x = x[np.isfinite(x)]
    assert (probe_stats["count"], probe_stats["nan"], probe_stats["missing"]) == (10, 2, 0)
    assert probe_stats["mean"] == pytest.approx(x.mean()) and probe_stats["std"] == pytest.approx(x.std())
    assert probe_stats["p50"] == pytest.approx(np.median(x)) and probe_stats["p5"] == pytest.approx(np.percentile(x, 5))
    assert probe_stats["min"] == pytest.approx(x.min()) and probe_stats["max"] == pytest.approx(x.max())
    bins = RewardBins.load(tmp_path / "bins.json")
    assert bins.names == ("contrast", "probe") and bins.values({"probe": [np.nan], "contrast": [9.0]}).tolist() == [[1, 0]]
    pooled = [v[c] for v in table.values() for c in ("probe", "probe@synthetic_caption") if c in v]
    assert bins.edges["probe"][[0, -1]].tolist() == [np.nanmin(pooled), np.nanmax(pooled)]  # one scale for both
    assert summary["rewards"]["probe@synthetic_caption"]["count"] == 3

    # decoding in DataLoader workers, each reading its own share of the records, gives the same files
    rewards.annotate(ListSource(records), columns, tmp_path / "workers", batch_size=4, num_workers=2, verbose=False)
    for name in ("annotations.jsonl", "bins.json", "summary.json"):
        assert (tmp_path / "workers" / name).read_bytes() == (tmp_path / name).read_bytes()


def test_added_reward_scores_only_itself(tmp_path, world, probe):
    rewards.annotate(world, ["probe"], tmp_path, batch_size=16, verbose=False)
    first = rewards.load_annotations(tmp_path / "annotations.jsonl")
    assert sum(probe) == N and len(first) == N
    both = rewards.annotate(world, ["probe", "alignment"], tmp_path, batch_size=16, verbose=False)
    assert sum(probe) == N  # probe was not loaded nor called again
    assert all(both[k]["probe"] == first[k]["probe"] and 0 <= both[k]["alignment"] <= 1 for k in first)
    table = rows(tmp_path / "annotations.jsonl")
    # one merged row per key; columns by name, whichever run scored them first (the files do not record history)
    assert len(table) == N and all(list(r) == ["key", "alignment", "probe"] for r in table)
    assert RewardBins.load(tmp_path / "bins.json").names == ("alignment", "probe")
    assert list(json.loads((tmp_path / "summary.json").read_text())["rewards"]) == ["alignment", "probe"]
    assert sorted(p.name for p in tmp_path.iterdir()) == OUTPUTS


def test_rescore_replaces_a_retrained_rewards_scores(tmp_path, world, probe, monkeypatch):
    """A scored pair is never scored again, even by a retrained model, unless its column is rescored: then that
    column alone is dropped and scored from scratch, the others kept, and the bins refitted."""
    first = rewards.annotate(world, ["probe", "alignment"], tmp_path, batch_size=16, verbose=False)
    retrained = lambda device="cpu": rewards.Reward("probe", lambda images, captions: torch.arange(len(captions)) + 7.0,
                                                    device, ragged=True)
    monkeypatch.setitem(rewards.REWARDS, "probe", retrained)
    kept = rewards.annotate(world, ["probe"], tmp_path, batch_size=16, verbose=False)
    assert kept == first
    new = rewards.annotate(world, ["probe"], tmp_path, batch_size=16, verbose=False, rescore=["probe"])
    assert all(new[k]["probe"] >= 7 and new[k]["alignment"] == first[k]["alignment"] for k in first)
    assert all(list(r) == ["key", "alignment", "probe"] for r in rows(tmp_path / "annotations.jsonl"))
    assert RewardBins.load(tmp_path / "bins.json").edges["probe"].min() >= 7  # refitted to the new scores
    assert sorted(p.name for p in tmp_path.iterdir()) == OUTPUTS


def test_rescore_drops_the_rewards_field_columns_too(tmp_path, probe, monkeypatch, capsys):
    """A NAME@FIELD column is NAME's model on another caption, sharing its bins: rescoring NAME drops it too, so no
    column mixes the old model's scores with the new one's (scored again when asked for, else left out)."""
    source = ListSource(mixed_records())
    names = ["probe", "probe@synthetic_caption"]
    first = rewards.annotate(source, names, tmp_path, batch_size=4, verbose=False)
    retrained = lambda device="cpu": rewards.Reward("probe", lambda images, captions: torch.arange(len(captions)) + 7.0,
                                                    device, ragged=True)
    monkeypatch.setitem(rewards.REWARDS, "probe", retrained)
    both = rewards.annotate(source, names, tmp_path, batch_size=4, verbose=False, rescore=["probe"])
    fields = [k for k in first if "probe@synthetic_caption" in first[k]]
    assert fields and all(both[k]["probe@synthetic_caption"] >= 7 for k in fields)  # the retrained model's
    assert all(both[k]["probe"] >= 7 for k in first)
    alone = rewards.annotate(source, ["probe"], tmp_path, batch_size=4, rescore=["probe"])
    assert "probe@synthetic_caption dropped and not scored by this run" in capsys.readouterr().out
    assert not any("probe@synthetic_caption" in row for row in alone.values())


def test_a_changed_reward_version_rescores_its_columns(tmp_path, probe, monkeypatch, capsys):
    """Scores of an older version of a reward (REWARD_VERSIONS; a folder without a record is at version 1) are
    dropped with their NAME@FIELD columns and scored again, before anything else; the other columns are kept."""
    source = ListSource(mixed_records())
    constant = lambda device="cpu": rewards.Reward("other", lambda images, captions: torch.full((len(captions),), 3.0),
                                                   device, ragged=True)
    monkeypatch.setitem(rewards.REWARDS, "other", constant)
    names = ["probe", "probe@synthetic_caption", "other"]
    first = rewards.annotate(source, names, tmp_path, batch_size=4, verbose=False)
    assert json.loads((tmp_path / "reward_versions.json").read_text()) == {"probe": 1, "other": 1}
    changed = lambda device="cpu": rewards.Reward("probe", lambda images, captions: torch.arange(len(captions)) + 7.0,
                                                  device, ragged=True)
    monkeypatch.setitem(rewards.REWARDS, "probe", changed)
    kept = rewards.annotate(source, names, tmp_path, batch_size=4, verbose=False)
    assert json.dumps(kept, sort_keys=True) == json.dumps(first, sort_keys=True)  # same version: kept (NaN too)
    monkeypatch.setitem(rewards.REWARD_VERSIONS, "probe", 2)
    new = rewards.annotate(source, ["probe", "other"], tmp_path, batch_size=4)
    out = capsys.readouterr().out
    assert "the scores of probe, probe@synthetic_caption were made by an older version" in out
    assert "probe@synthetic_caption dropped and not scored by this run (add them to --rewards" in out
    assert all(new[k]["probe"] >= 7 and new[k]["other"] == 3 for k in first)
    assert not any("probe@synthetic_caption" in row for row in new.values())  # stale: gone until asked for again
    assert json.loads((tmp_path / "reward_versions.json").read_text()) == {"probe": 2, "other": 1}
    assert rewards.annotate(source, ["probe"], tmp_path, batch_size=4, verbose=False) == new
    (tmp_path / "reward_versions.json").unlink()  # a folder annotated before versions were recorded: version 1
    monkeypatch.setitem(rewards.REWARD_VERSIONS, "other", 5)
    monkeypatch.setitem(rewards.REWARD_VERSIONS, "probe", 1)
    rewards.annotate(source, ["probe"], tmp_path, batch_size=4, verbose=False)
    table = rewards.load_annotations(tmp_path / "annotations.jsonl")
    assert all("probe" in row and "other" not in row for row in table.values())


@pytest.mark.parametrize("layout", ["folder", "webdataset"])
def test_a_rerun_decodes_only_what_it_scores(tmp_path, layout, monkeypatch):
    """Scored keys are left out before their image is decoded: a rerun with nothing left to score decodes nothing
    (at paper scale a resume would otherwise decode 16M images once per reward), an added reward decodes each
    image once, and a "reward@field" column only the images that have that caption."""
    import tarfile
    root = tmp_path / "data"
    for i in range(10):
        write_png(root / f"img{i}.png", i)
        (root / f"img{i}.txt").write_text(f"a red circle {i}")
        if i % 2:
            (root / f"img{i}.json").write_text(json.dumps({"synthetic_caption": f"a synthetic caption {i}"}))
    if layout == "webdataset":
        with tarfile.open(tmp_path / "shard.tar", "w") as tar:
            for f in sorted(root.iterdir()):
                tar.add(f, arcname=f.name)
    dataset = root if layout == "folder" else tmp_path / "shard.tar"
    decodes = []
    load_image = data.load_image
    monkeypatch.setattr(data, "load_image", lambda *a, **k: decodes.append(1) or load_image(*a, **k))
    runs = [["contrast", "sharpness"], ["contrast", "sharpness"], ["contrast", "sharpness", "cleanliness"],
            ["contrast@synthetic_caption"], ["contrast@synthetic_caption"]]
    counts = []
    for names in runs:
        decodes.clear()
        table = rewards.annotate(str(dataset), names, tmp_path / "ann", batch_size=4, verbose=False)
        counts.append(len(decodes))
    assert counts == [20, 0, 10, 5, 0] and len(table) == 10
    assert sorted(len(v) for v in table.values()) == [3] * 5 + [4] * 5  # the five with a synthetic caption


@pytest.mark.parametrize("workers", [0, 2])
def test_a_key_shared_by_two_shards_is_one_duplicate_for_any_split(tmp_path, workers, capsys):
    """Two img2dataset runs concatenated restart their keys: shards 0 and 1 both hold key 000000000. One consumer
    skips the second as "duplicate"; two consumers (a worker per shard) each score theirs, and the merge keeps the
    first and counts the other, so the table and the summary are the same for any split, with a warning."""
    import tarfile
    for shard, seed in [(0, 1), (1, 2)]:
        folder = tmp_path / f"s{shard}"
        write_png(folder / "000000000.png", seed)
        (folder / "000000000.txt").write_text("a red square")
        (folder / "000000001.png").write_bytes((folder / "000000000.png").read_bytes())  # a unique key in shard 0
        (folder / "000000001.txt").write_text("a red square")
        with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as tar:
            for f in sorted(folder.iterdir()):
                if shard == 0 or not f.stem.endswith("1"):
                    tar.add(f, arcname=f.name)
    source = data.open_dataset(f"{tmp_path}/{{00000..00001}}.tar")
    table = rewards.annotate(source, ["contrast"], tmp_path / "ann", batch_size=4, num_workers=workers,
                             verbose=False)
    first = rewards.annotate(data.open_dataset(tmp_path / "00000.tar"), ["contrast"], tmp_path / "first",
                             verbose=False)
    assert table == first  # shard 0's record of the shared key, the one a single pass keeps
    assert json.loads((tmp_path / "ann" / "summary.json").read_text())["skipped"] == {"duplicate": 1}
    warned = "1 key(s) of the dataset name two records each (first: 000000000)" in capsys.readouterr().out
    assert warned == (workers == 2)


def test_a_field_column_needs_its_plain_column(tmp_path, world, probe):
    """"name@field" shares the bins of the plain "name" column: alone on a fresh folder it is refused before
    anything is scored (it would score everything, then find no bins to fit); beside "name", or once the folder
    has "name", it is scored."""
    with pytest.raises(ValueError, match="shares the bins of the plain NAME column.*add probe to --rewards"):
        rewards.annotate(world, ["probe@caption", "contrast"], tmp_path, verbose=False)
    assert probe == [] and not list(tmp_path.glob("annotations*"))  # nothing scored, nothing written
    rewards.annotate(world, ["probe"], tmp_path, batch_size=16, verbose=False)
    table = rewards.annotate(world, ["probe@caption"], tmp_path, batch_size=16, verbose=False)
    assert sum(probe) == 2 * N and all(set(v) == {"probe", "probe@caption"} for v in table.values())
    bins = RewardBins.load(tmp_path / "bins.json")
    pooled = [v[c] for v in table.values() for c in v]
    assert bins.names == ("probe",) and bins.edges["probe"][[0, -1]].tolist() == [min(pooled), max(pooled)]


ANNOTATE_WITH_PROBE = """import sys
sys.path[:0] = [{repo!r}, {tests!r}]
import rewards, test_annotate
rewards.register_reward("probe")(test_annotate.make_probe)
rewards.main(sys.argv[1:])
"""


def test_killed_run_resumes_without_rescoring(tmp_path, world, probe):
    """SIGKILL while the slow probe runs, a torn last line, and the rerun as another rank: nothing is scored twice
    and nothing is lost."""
    script = tmp_path / "annotate_with_probe.py"
    script.write_text(ANNOTATE_WITH_PROBE.format(repo=str(REPO), tests=str(REPO / "tests")))
    out = tmp_path / "ann"
    cmd = [sys.executable, str(script), "annotate", "--data", str(world), "--out", str(out), "--batch-size", "8",
           "--rewards", "contrast,probe", "--reward-option", "probe.delay=0.5"]  # 3 s to kill it in
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ,
                                                                                         "OMP_NUM_THREADS": "1"})
    part = out / "annotations.rank0.jsonl"
    deadline = time.time() + 90
    while sum("probe" in r for r in (rows(part) if part.exists() else [])) < 16:  # two probe batches landed
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the annotate subprocess made no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    written = rows(part)
    probe_keys = [r["key"] for r in written if "probe" in r]
    assert sum("contrast" in r for r in written) == N and 16 <= len(probe_keys) < N
    assert len(set(probe_keys)) == len(probe_keys)
    with open(part, "ab") as f:
        f.write(b'{"key": "shapes-s0-0000')  # a crash in the middle of writing a row
    part.rename(out / "annotations.rank1.jsonl")  # as if rank 1 of a two-rank run had crashed
    assert len(rewards.load_annotations(out / "annotations.rank1.jsonl")) == N  # the torn line is ignored

    table = rewards.annotate(world, ["contrast", "probe"], out, batch_size=8, verbose=False)
    assert sum(probe) == N - len(probe_keys)  # only the samples without a probe score, contrast not at all
    fresh = rewards.annotate(world, ["contrast", "probe"], tmp_path / "fresh", batch_size=8, verbose=False)
    assert table == fresh  # nothing lost: the same table as one uninterrupted run
    assert (out / "annotations.jsonl").read_bytes() == (tmp_path / "fresh" / "annotations.jsonl").read_bytes()
    assert not list(out.glob("annotations.rank*")) and not list(out.glob("*.tmp"))


def test_concurrent_runs_on_one_folder_serialise(tmp_path, world):
    """Two independent annotate processes on one folder (two train.py jobs of a sweep): the lock serialises them,
    so the table is the one a single run writes, every pair scored once."""
    single = tmp_path / "single"
    rewards.annotate(world, ["alignment", "contrast"], single, batch_size=16, verbose=False)
    cmd = [sys.executable, str(REPO / "rewards.py"), "annotate", "--data", str(world), "--out", str(tmp_path / "two"),
           "--rewards", "alignment,contrast", "--batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
            for _ in range(2)]
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err[-2000:]
    assert (tmp_path / "two" / "annotations.jsonl").read_bytes() == (single / "annotations.jsonl").read_bytes()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == OUTPUTS


def test_a_run_waiting_for_the_folder_lock_says_so(tmp_path, capsys):
    import fcntl
    import threading
    entered = threading.Event()

    def second_run():
        with rewards._directory_lock(tmp_path, rank=0, world_size=1):
            entered.set()
    with open(tmp_path / ".annotate.lock", "a") as first:  # the first run holds the folder
        fcntl.flock(first, fcntl.LOCK_EX)
        waiting = threading.Thread(target=second_run)
        waiting.start()
        assert not entered.wait(1.0)  # it waits ...
        assert f"waiting for another annotation run on {tmp_path} to finish" in capsys.readouterr().out  # ... and says so
    waiting.join(timeout=10)
    assert entered.is_set()  # and goes on once the first run is done


def test_torchrun_two_ranks_give_the_single_process_table(tmp_path, world):
    single = tmp_path / "single"
    rewards.annotate(world, rewards.BUILTIN_REWARDS, single, batch_size=16, verbose=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "rewards.py"), "annotate", "--data", str(world), "--out", str(tmp_path / "two"),
           "--batch-size", "16"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote" in result.stdout and result.stdout.count("alignment") == 1  # rank 0 alone reports
    for name in ("annotations.jsonl", "bins.json", "summary.json"):
        assert (tmp_path / "two" / name).read_bytes() == (single / name).read_bytes(), name
    assert len(rows(single / "annotations.jsonl")) == N
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == OUTPUTS
    # a corrupt versions record: a one-line error, and torchrun stops the rank that waits for rank 0
    (tmp_path / "two" / "reward_versions.json").write_text("{")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and "reward_versions.json: not valid JSON" in result.stderr


def test_torchrun_with_tiny_real_rewards_gives_the_single_process_table(tmp_path, world):
    """The built-in rewards plus tiny random versions of all seven paper rewards (in their original file layouts,
    through their real loaders): one process and two ranks write the same table."""
    options = {**tiny_rewards.tiny_clip_family(tmp_path / "clip"), **tiny_rewards.tiny_blip_t5(tmp_path / "blip")}
    names = list(rewards.BUILTIN_REWARDS) + sorted(options)
    assert {"clip", "aesthetic", "pickscore", "hpsv2", "imagereward", "vqascore", "sciscore"} <= set(names)
    flags = ["annotate", "--data", str(world), "--rewards", ",".join(names), "--batch-size", "16",
             *[f for n, opts in options.items() for k, v in opts.items() for f in ("--reward-option", f"{n}.{k}={v}")]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])):
        result = subprocess.run([sys.executable, *launcher, str(REPO / "rewards.py"), *flags, "--out", str(tmp_path / out)],
                                capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    one = rows(tmp_path / "one" / "annotations.jsonl")
    assert len(one) == N and all(set(r) == {"key", *names} for r in one)
    assert all(np.isfinite(r[n]) for r in one for n in names)
    two = rows(tmp_path / "two" / "annotations.jsonl")  # the same rows in the same order; the scores agree to float
    assert [list(r) for r in two] == [list(r) for r in one]  # precision (a rank's batches hold other images, and
    np.testing.assert_allclose([[r[n] for n in names] for r in two],  # BLAS results depend on the batch)
                               [[r[n] for n in names] for r in one], rtol=1e-5, atol=1e-6)


def test_cli_annotates_the_data_folder_by_default(tmp_path, capsys):
    data.build_shapes_dataset(data.WorldConfig(num_train=N), tmp_path)
    rewards.main(["annotate", "--data-dir", str(tmp_path), "--rewards", "alignment,contrast", "--num-bins", "8",
                  "--binning", "uniform"])
    out = capsys.readouterr().out
    assert "wrote" in out and "p95" in out and "contrast" in out
    bins = RewardBins.load(tmp_path / "bins.json")
    assert bins.names == ("alignment", "contrast") and bins.method == "uniform" and bins.num_bins == 8
    ann = rewards.load_annotations(tmp_path / "annotations.jsonl")
    assert len(ann) == N and all(0 <= v["alignment"] <= 1 for v in ann.values())


def write_png(path: Path, seed: int, size=(20, 20)) -> torch.Tensor:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255


def test_score_folder_and_geneval_layout(tmp_path, probe, capsys):
    images = tmp_path / "flat"
    pixels = {name: write_png(images / name, i, (20 + i, 20)) for i, name in enumerate(["img10.png", "img2.png",
                                                                                        "img1.png"])}
    (images / "img5.png").write_bytes(b"\x89PNG not really")  # an unreadable file: scored as null
    (tmp_path / "prompts.txt").write_text("first prompt\nsecond\n\nfifth\nthird, the tenth image\n")
    rewards.main(["score", "--images", str(images), "--prompts", str(tmp_path / "prompts.txt"),
                  "--rewards", "probe,contrast", "--batch-size", "2"])
    scored = rows(images / "scores.jsonl")
    assert [r["image"] for r in scored] == ["img1.png", "img2.png", "img5.png", "img10.png"]  # numbers as numbers
    assert [r["prompt"] for r in scored] == ["first prompt", "second", "fifth", "third, the tenth image"]
    assert scored[2] == {"image": "img5.png", "prompt": "fifth", "probe": None, "contrast": None, "error": "unreadable"}
    del scored[2]
    for r in scored:
        assert r["probe"] == pytest.approx(probe_score([pixels[r["image"]]], [r["prompt"]]).item(), abs=1e-6)
        assert r["contrast"] == pytest.approx(rewards.contrast_score(pixels[r["image"]][None]).item(), abs=1e-6)
    out = capsys.readouterr().out
    assert f"mean {np.mean([r['probe'] for r in scored]):.4f}" in out

    geneval = tmp_path / "geneval"
    for i, prompt in enumerate(["a photo of a red circle", "a photo of two squares"]):
        for j in range(2):
            write_png(geneval / f"{i:05d}" / "samples" / f"{j:04d}.png", 10 * i + j)
        (geneval / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps({"tag": "x", "prompt": prompt}) + "\n")
    rewards.main(["score", "--images", str(geneval), "--rewards", "alignment", "--out", str(tmp_path / "g.jsonl")])
    scored = rows(tmp_path / "g.jsonl")
    assert [(r["image"], r["prompt"]) for r in scored] == [
        ("00000/samples/0000.png", "a photo of a red circle"), ("00000/samples/0001.png", "a photo of a red circle"),
        ("00001/samples/0000.png", "a photo of two squares"), ("00001/samples/0001.png", "a photo of two squares")]


def test_score_prompts_drop_a_byte_order_mark(tmp_path):
    (tmp_path / "p.txt").write_text("\ufeffa red circle\nsecond\n", encoding="utf-8")  # Notepad's byte-order mark
    (tmp_path / "p.jsonl").write_text('\ufeff{"prompt": "a red circle"}\n', encoding="utf-8")
    assert rewards._read_prompts(tmp_path / "p.txt") == ["a red circle", "second"]  # not stored as "\ufeffa red..."
    assert rewards._read_prompts(tmp_path / "p.jsonl") == ["a red circle"]


def test_cli_errors_are_one_line(tmp_path, world, capsys):
    (tmp_path / "file").write_text("not a folder")
    images = tmp_path / "images"
    write_png(images / "0.png", 0)
    (tmp_path / "two.txt").write_text("a\nb\n")
    (tmp_path / "list.jsonl").write_text('{"prompt": "a"}\n[1]\n')  # rows that are not objects, or not JSON
    (tmp_path / "text.jsonl").write_text('"a"\n')
    (tmp_path / "garbage.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": \n')
    cases = {
        "unknown reward(s) nope; known rewards: alignment": ["annotate", "--data", str(world), "--rewards",
                                                            "alignment,nope"],
        "unknown caption field(s) long in --rewards NAME@FIELD": ["annotate", "--data", str(world), "--rewards",
                                                                   "alignment@long"],
        "expected NAME.KEY=VALUE": ["annotate", "--data", str(world), "--reward-option", "alignment"],
        "'clip9' is not one of --rewards": ["annotate", "--data", str(world), "--reward-option", "clip9.x=1"],
        "reward 'contrast' does not take ['size']": ["annotate", "--data", str(world), "--reward-option",
                                                     "contrast.size=3"],
        "clip: unknown option(s) chekpoint; known: backend, checkpoint": [
            "annotate", "--data", str(world), "--rewards", "clip", "--reward-option", "clip.chekpoint=/x.pt"],
        f"--reward-option aesthetic: head {tmp_path / 'none.pth'} does not exist": [
            "annotate", "--data", str(world), "--rewards", "contrast,aesthetic", "--reward-option",
            f"aesthetic.head={tmp_path / 'none.pth'}"],  # refused before contrast is scored
        "--reward-option pickscore: checkpoint ./no/such/folder does not exist": [
            "annotate", "--data", str(world), "--rewards", "pickscore", "--reward-option",
            "pickscore.checkpoint=./no/such/folder"],
        "vqascore: batch must be a positive integer, got '0'": [
            "annotate", "--data", str(world), "--rewards", "vqascore", "--reward-option", "vqascore.batch=0"],
        "NAME@FIELD shares the bins of the plain NAME column": [
            "annotate", "--data", str(world), "--out", str(tmp_path / "ann"), "--rewards", "alignment@caption"],
        "does not exist": ["annotate", "--data", str(tmp_path / "missing"), "--rewards", "contrast"],
        "--rescore sharpness: only rewards named in --rewards": ["annotate", "--data", str(world), "--rewards",
                                                                  "contrast", "--rescore", "sharpness"],
        "cannot write to": ["annotate", "--data", str(world), "--out", str(tmp_path / "file" / "sub")],
        "could be scored": ["annotate", "--data", str(images), "--out", str(tmp_path / "none"), "--rewards",
                            "contrast"],  # its one image has no caption
        "1 image(s) in": ["score", "--images", str(images), "--prompts", str(tmp_path / "two.txt")],
        "is not a folder": ["score", "--images", str(tmp_path / "nothing"), "--prompts", str(tmp_path / "two.txt")],
        f"{tmp_path / 'list.jsonl'}:2: every row needs to be a JSON object with a \"prompt\" string": [
            "score", "--images", str(images), "--prompts", str(tmp_path / "list.jsonl")],  # was an AttributeError
        f"{tmp_path / 'text.jsonl'}:1: every row needs to be a JSON object": [
            "score", "--images", str(images), "--prompts", str(tmp_path / "text.jsonl")],
        f"{tmp_path / 'garbage.jsonl'}:3: not a JSON line": [
            "score", "--images", str(images), "--prompts", str(tmp_path / "garbage.jsonl")],
        "argument --seed: must be in [0, ": ["train-clip", "--seed", "99999999999999999999"],
    }
    for message, argv in cases.items():
        with pytest.raises(SystemExit) as e:
            rewards.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err.splitlines()[-1] and "Traceback" not in err, (argv, err)
    assert not (world / "annotations.jsonl").exists()
