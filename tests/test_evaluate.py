"""evaluate.py: metrics on hand-built rows, the speedup on curves with a known answer, prompt sets, GenEval's
folder layout, sharded evaluation equal to one process, and clear CLI errors."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import rewards

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "benchmarks"


def test_speedup_interpolates_between_evaluated_steps():
    steps = [100, 200, 300, 400]
    baseline = [0.1, 0.2, 0.3, 0.4]
    # MIRO reaches 0.4 halfway between steps 100 (0.3) and 200 (0.5): at step 150, so 400 / 150.
    assert evaluate.speedup(steps, baseline, [0.3, 0.5, 0.6, 0.7]) == pytest.approx(400 / 150)
    # Exactly equal at step 200.
    assert evaluate.speedup(steps, baseline, [0.2, 0.4, 0.5, 0.5]) == pytest.approx(2.0)
    # Already above at the first evaluation: that step counts (a lower bound).
    assert evaluate.speedup(steps, baseline, [0.9, 0.9, 0.9, 0.9]) == pytest.approx(4.0)
    # Never reached within the budget.
    assert evaluate.speedup(steps, baseline, [0.1, 0.2, 0.3, 0.39]) is None
    # Identical curves: reached at the last step, speedup 1.
    assert evaluate.speedup(steps, baseline, baseline) == pytest.approx(1.0)
    # An early fluke does not count: above at step 100, below at 200, then for good from halfway to 300.
    assert evaluate.speedup(steps, baseline, [0.5, 0.3, 0.5, 0.6]) == pytest.approx(400 / 250)
    # Reached, then lost by the end: not reached within the budget.
    assert evaluate.speedup(steps, baseline, [0.1, 0.5, 0.6, 0.39]) is None


def test_matched_speedup_times_both_models_to_the_baselines_final_value():
    """A baseline that plateaus or falls back reaches its final value before its last step: the paper's ratio
    credits MIRO with those idle steps, the matched one does not (and equals it for a baseline still rising)."""
    steps = [100, 200, 300, 400]
    falling = [0.4, 0.3, 0.25, 0.2]  # worse with training, as the baseline's sharpness here
    assert evaluate.speedup(steps, falling, falling) == pytest.approx(4.0)  # the paper's: 4x against itself
    assert evaluate.speedup(steps, falling, falling, matched=True) == pytest.approx(1.0)
    plateau = [0.1, 0.4, 0.4, 0.4]  # at its final value from step 200 on
    miro = [0.3, 0.5, 0.6, 0.7]  # there at step 150
    assert evaluate.speedup(steps, plateau, miro) == pytest.approx(400 / 150)
    assert evaluate.speedup(steps, plateau, miro, matched=True) == pytest.approx(200 / 150)
    rising = [0.1, 0.2, 0.3, 0.4]
    assert evaluate.speedup(steps, rising, miro, matched=True) == evaluate.speedup(steps, rising, miro)
    assert evaluate.speedup(steps, plateau, [0.1, 0.2, 0.3, 0.39], matched=True) is None
    assert evaluate.reach_step(steps, [0.5, 0.3, 0.5, 0.6], 0.4) == pytest.approx(250)  # an early fluke does not count


def test_mean_ci_and_geneval_summary():
    ci = evaluate.mean_ci([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert ci["n"] == 4 and ci["mean"] == pytest.approx(2.5)
    assert ci["ci95"] == pytest.approx(1.96 * torch.tensor([1.0, 2, 3, 4]).std().item() / 2)
    # Clustered by prompt, by hand: mean 21/5 = 4.2; per-prompt sums of deviations -5.4, -0.4, 5.8;
    # SE^2 = 3/2 * (5.4^2 + 0.4^2 + 5.8^2) / 5^2 = 3.7776.
    ci = evaluate.mean_ci([1.0, 2.0, 3.0, 5.0, 10.0, float("nan")], groups=[0, 0, 1, 1, 2, 2])
    assert (ci["mean"], ci["n"], ci["prompts"]) == (pytest.approx(4.2), 5, 3)
    assert ci["ci95"] == pytest.approx(1.96 * 3.7776 ** 0.5)
    # Equal images per prompt: the standard error of the prompt means (2, 2, 7: sd 5 / sqrt(3), SE 5 / 3), wider
    # than treating the 6 images as independent.
    ci = evaluate.mean_ci([1.0, 3.0, 2.0, 2.0, 6.0, 8.0], groups=[0, 0, 1, 1, 2, 2])
    assert ci["ci95"] == pytest.approx(1.96 * 5 / 3)
    assert ci["ci95"] > evaluate.mean_ci([1.0, 3.0, 2.0, 2.0, 6.0, 8.0])["ci95"]
    assert math.isnan(evaluate.mean_ci([0.5, 0.7], groups=[3, 3])["ci95"])  # one prompt: no interval
    rows = [{"correct": c} for c in (True, False, True, True, True)]
    items = [{"tag": t} for t in ("a", "a", "b", "b", "b")]
    scores = evaluate.geneval_summary(rows, items)
    # overall is the mean of the task accuracies (0.5 and 1.0), not of the images (0.8).
    assert scores == {"a": 0.5, "b": 1.0, "overall": 0.75}


def test_diversity_is_mean_pairwise_distance_per_prompt():
    d = 4
    rows = [{"features": [0.0] * d}, {"features": [1.0] * d},                        # prompt 0: distance 1
            {"features": [0.5] * d}, {"features": [0.5] * d}, {"features": [0.5] * d}]  # prompt 1: 0
    items = [{"index": 0}, {"index": 0}, {"index": 1}, {"index": 1}, {"index": 1}]
    assert evaluate.diversity(rows, items) == pytest.approx(0.5)
    images = torch.rand(3, 3, 32, 32)
    f = evaluate.pixel_features(images)
    assert f.shape == (3, 192) and torch.allclose(f[0], torch.nn.functional.avg_pool2d(images[:1], 4).flatten())


def test_repeat_prompts_gives_every_task_its_minimum():
    prompts = [{"prompt": "p0", "tag": "a"}, {"prompt": "p1", "tag": "b"}, {"prompt": "p2", "tag": "b"}]
    items = evaluate.repeat_prompts(prompts, 2, min_per_task=6)
    per_task = {t: sum(it["tag"] == t for it in items) for t in "ab"}
    assert per_task == {"a": 6, "b": 6}
    assert [(it["index"], it["sample"]) for it in items if it["index"] == 1] == [(1, k) for k in range(3)]


def test_prompt_sets(tmp_path):
    held = evaluate.load_prompts("heldout", data.WorldConfig())
    assert held == data.heldout_prompts(data.WorldConfig())
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    assert [p["prompt"] for p in evaluate.load_prompts(str(tmp_path / "p.txt"), None)] == ["a cat", "a dog"]
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="expected prompts"):
        evaluate.load_prompts(str(tmp_path / "bad.jsonl"), None)
    with pytest.raises(FileNotFoundError):
        evaluate.load_prompts(str(tmp_path / "missing.txt"), None)
    with pytest.raises(ValueError, match="built-in world"):
        evaluate.load_prompts("heldout", None)
    (tmp_path / "bad.tsv").write_text("Text\tCategory\na cat\tAnimals\n")
    with pytest.raises(ValueError, match="no 'Prompt' column"):
        evaluate.load_prompts(str(tmp_path / "bad.tsv"), None)
    (tmp_path / "notag.jsonl").write_text('{"prompt": "a cat", "include": [{"class": "cat", "count": 1}]}\n')
    with pytest.raises(ValueError, match="needs a 'tag'"):
        evaluate.load_prompts(str(tmp_path / "notag.jsonl"), None)
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog"\n')
    with pytest.raises(ValueError, match="broken.jsonl:2: not a JSON line"):
        evaluate.load_prompts(str(tmp_path / "broken.jsonl"), None)
    bom = "\ufeff"  # a byte-order mark (Excel, Notepad) before the first column's name or the first prompt
    (tmp_path / "bom.tsv").write_text(bom + "Prompt\tCategory\na cat\tAnimals\n", encoding="utf-8")
    (tmp_path / "bom.txt").write_text(bom + "a cat\n", encoding="utf-8")
    (tmp_path / "bom.jsonl").write_text(bom + '{"prompt": "a cat"}\n', encoding="utf-8")
    for name in ("bom.tsv", "bom.txt", "bom.jsonl"):
        assert [p["prompt"] for p in evaluate.load_prompts(str(tmp_path / name), None)] == ["a cat"], name


def test_min_per_task_applies_to_the_builtin_heldout_prompts_only(tmp_path):
    world = data.WorldConfig()
    held = data.heldout_prompts(world)
    assert evaluate.evaluation_items("heldout", world, 1, 16) == evaluate.repeat_prompts(held, 1, 16)
    assert len(evaluate.repeat_prompts(held, 1, 16)) > len(held)  # the rule does something here
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in held))
    assert evaluate.evaluation_items(str(tmp_path / "p.jsonl"), None, 1, 16) == evaluate.repeat_prompts(held, 1)


def test_json_outputs_are_strict_and_atomic(tmp_path):
    path = tmp_path / "x.json"
    evaluate.write_json(path, {"ci95": float("nan"), "curve": [1.5, float("inf")], "n": (1, 2)})

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")
    assert json.loads(path.read_text(), parse_constant=no_constants) == {"ci95": None, "curve": [1.5, None],
                                                                         "n": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary file left behind


GOOD_ROW = {"prompt": "a photo of a circle", "tag": "single_object", "include": [{"class": "circle", "count": 1}]}
RELATIONS = "relation one of left of, right of, above, below"


@pytest.mark.parametrize("row, message", [
    ({"tag": "counting", "include": [{"class": "circle"}]}, "include[0] needs a 'count' integer >= 1, not None"),
    ({"tag": "counting", "include": [{"class": "circle", "count": 0}]},
     "include[0] needs a 'count' integer >= 1, not 0"),
    ({"tag": "counting", "include": [{"class": "circle", "count": "2"}]},
     "include[0] needs a 'count' integer >= 1, not '2'"),
    ({"tag": "counting", "include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle"}]},
     "exclude[0] needs a 'count' integer >= 1, not None"),
    ({"tag": "single_object", "include": [{"count": 1}]}, "include[0] needs a 'class' string"),
    ({"tag": "single_object", "include": []}, "'include' must be a list of clauses, not []"),
    ({"tag": "shapes", "include": [{"class": "circle", "count": 1}]},
     "GenEval metadata needs a 'tag' (its task: single_object, two_object, counting, colors, position, color_attr) "
     "with every 'include', not 'shapes'"),
    ({"tag": "position", "include": [{"class": "circle", "count": 1},
                                     {"class": "square", "count": 1, "position": ["left of"]}]},
     f"include[1]: 'position' must be [relation, index of an earlier include], {RELATIONS}; not ['left of']"),
    ({"tag": "position", "include": [{"class": "circle", "count": 1},
                                     {"class": "square", "count": 1, "position": ["left of", 1]}]},
     f"include[1]: 'position' must be [relation, index of an earlier include], {RELATIONS}; not ['left of', 1]"),
    ({"tag": "position", "include": [{"class": "circle", "count": 1},
                                     {"class": "square", "count": 1, "position": ["next to", 0]}]},
     f"include[1]: 'position' must be [relation, index of an earlier include], {RELATIONS}; not ['next to', 0]"),
])
def test_malformed_geneval_metadata_is_named_by_file_and_line(tmp_path, row, message):
    path = tmp_path / "meta.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\n\n" + json.dumps({"prompt": "p", **row}) + "\n")
    with pytest.raises(ValueError) as error:
        evaluate.load_prompts(str(path), None)
    assert str(error.value) == f"{path}:3: {message}"  # the blank line counts


def test_malformed_geneval_metadata_is_a_one_line_cli_error(tiny_runs, tmp_path, capsys):
    path = tmp_path / "meta.jsonl"
    path.write_text(json.dumps({**GOOD_ROW, "include": [{"class": "circle"}]}) + "\n")
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["geneval", "--ckpt", str(tiny_runs / "miro"), "--prompts", str(path), "--steps", "1",
                       "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].endswith(f"error: {path}:1: include[0] needs a 'count' integer >= 1, not None")


def test_a_prompt_file_mixing_geneval_metadata_and_plain_prompts_is_refused(tiny_runs, tmp_path, capsys):
    """Judges runs the detector on a batch only if every item in it has metadata, so a mixed file's GenEval score
    would depend on --batch-size: refused, whatever the batching."""
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(GOOD_ROW) + "\n" + json.dumps({"prompt": "a photo of a red circle"}) + "\n")
    errors = []
    for batch_size in ("1", "64"):
        out = tmp_path / batch_size
        with pytest.raises(SystemExit) as exit_:
            evaluate.main(["tradeoff", "--ckpt", str(tiny_runs / "miro"), "--reward", "cfg", "--values", "1",
                           "--prompts", str(mixed), "--n-per-prompt", "1", "--steps", "1", "--batch-size", batch_size,
                           "--out", str(out)])
        assert exit_.value.code == 2 and not (out / "tradeoff.json").exists()
        errors.append(capsys.readouterr().err.splitlines()[-1].partition("error: ")[2])
    assert errors == [f"{mixed}: 1 of 2 prompts carry GenEval metadata ('include'); a prompt file must be all "
                      f"GenEval metadata or all plain prompts"] * 2


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/benchmarks not present")
def test_real_benchmark_prompt_files():
    geneval = evaluate.load_prompts(str(SHARED / "geneval" / "evaluation_metadata.jsonl"), None)
    assert len(geneval) == 553
    counts = {t: sum(p["tag"] == t for p in geneval) for t in data.TASKS}
    assert counts == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                      "color_attr": 100}
    parti = evaluate.load_prompts(str(SHARED / "parti" / "PartiPrompts.tsv"), None)
    assert len(parti) == 1632 and all(p["prompt"] for p in parti)


def run_eval(*args, nproc=1):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, str(ROOT / "evaluate.py"), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT)


def test_geneval_never_deletes_what_it_did_not_write(tiny_runs, tmp_path):
    """geneval replaces OUT/geneval (an earlier run's images), but not a folder holding anything else: notes, or
    the very prompt file it reads."""
    folder = tmp_path / "geneval"
    (folder / "00000" / "samples").mkdir(parents=True)
    (folder / "00000" / "samples" / "0000.png").write_bytes(b"png")
    (folder / "00000" / "samples" / "0001.png.123.tmp").write_bytes(b"tmp")
    (folder / "00000" / "metadata.jsonl").write_text("{}\n")
    assert evaluate.not_written_by_geneval(folder) == []
    prompts = folder / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a photo of a red circle", "tag": "single_object",
                                   "include": [{"class": "circle", "count": 1}]}) + "\n")
    (folder / "00000" / "NOTES.md").write_text("mine")
    assert evaluate.not_written_by_geneval(folder) == [str(folder / "00000" / "NOTES.md"), str(prompts)]
    result = run_eval("geneval", "--ckpt", str(tiny_runs / "miro"), "--prompts", str(prompts), "--steps", "1",
                      "--out", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"holds files that evaluate.py geneval did not write ({folder / '00000' / 'NOTES.md'})" in result.stderr
    assert prompts.exists() and (folder / "00000" / "samples" / "0000.png").read_bytes() == b"png"


def test_geneval_layout_and_sharding_match_one_process(tiny_runs, tmp_path):
    common = ["geneval", "--ckpt", str(tiny_runs / "miro"), "--n-per-prompt", "1", "--min-per-task", "2",
              "--steps", "3"]
    for run in ("one", "two"):  # an earlier, larger run's images: cleared, or GenEval's evaluator would score them
        for stale in ("99999/samples/0000.png", "00000/samples/0042.png"):
            (tmp_path / run / "geneval" / stale).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / run / "geneval" / stale).write_bytes(b"stale")
    one = run_eval(*common, "--out", str(tmp_path / "one"))
    two = run_eval(*common, "--out", str(tmp_path / "two"), nproc=2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads((tmp_path / "one" / "geneval.json").read_text())
    b = json.loads((tmp_path / "two" / "geneval.json").read_text())
    assert a["geneval"] == b["geneval"] and set(a["geneval"]) == {*data.TASKS, "overall"}
    world = data.WorldConfig(**torch.load(tiny_runs / "miro" / "ckpt.pt", weights_only=True)["world"])
    prompts = data.heldout_prompts(world)
    folders = sorted((tmp_path / "one" / "geneval").iterdir())
    assert [f.name for f in folders] == [f"{i:05d}" for i in range(len(prompts))]
    assert [f.name for f in sorted((tmp_path / "two" / "geneval").iterdir())] == [f.name for f in folders]
    for i, folder in enumerate(folders):
        meta = json.loads((folder / "metadata.jsonl").read_text())
        assert meta == prompts[i]
        pngs = sorted(p.name for p in (folder / "samples").iterdir())
        assert pngs == [f"{k:04d}.png" for k in range(len(pngs))] and len(pngs) >= 1
        for png in pngs:  # the same image whichever rank drew it
            assert (folder / "samples" / png).read_bytes() == \
                   (tmp_path / "two" / "geneval" / folder.name / "samples" / png).read_bytes()
    assert a["images"] == sum(len(list((f / "samples").iterdir())) for f in folders)
    # the numbers are those of the images as written: the PNGs, judged again, give geneval.json's numbers
    pngs = [(json.loads((f / "metadata.jsonl").read_text()), png) for f in folders
            for png in sorted((f / "samples").iterdir())]
    images = torch.stack([torch.from_numpy(np.array(Image.open(png))).permute(2, 0, 1) for _, png in pngs]) / 255
    rows = [{"correct": rewards.geneval_correct(meta, found)} for (meta, _), found in
            zip(pngs, rewards.detect_shapes(images))]
    assert evaluate.geneval_summary(rows, [meta for meta, _ in pngs]) == a["geneval"]


def test_convergence_evaluations_two_at_a_time_match_one_at_a_time(tiny_runs, tmp_path):
    """evaluate_all in threads gives the numbers of one evaluation at a time (each image has its own noise seed),
    opens the kept checkpoint for an intermediate step and run/ckpt.pt for the last, and skips cached keys."""
    jobs = [("miro", 4, None), ("miro", 8, None), ("miro", 8, "sharpness=0.5"), ("baseline", 8, None)]
    caches = {}
    for n in (1, 2):
        _, args = evaluate.parse_args(["convergence", "--jobs", str(n), "--batch-size", "256", "--condition",
                                       "contrast"])  # judges: the built-in rewards
        args.rank, args.steps, args.n_per_prompt, args.min_per_task = 0, 2, 2, 0  # 2 per prompt: diversity
        cache, path = {}, tmp_path / f"evals{n}.json"
        evaluate.evaluate_all(jobs, cache, path, args, tiny_runs, total=8)
        assert json.loads(path.read_text()) == cache
        caches[n] = cache
    assert set(caches[1]) == {"miro/4", "miro/8", "miro/8/sharpness=0.5", "baseline/8"}
    for key, metrics in caches[1].items():
        assert metrics == pytest.approx(caches[2][key], abs=1e-6), key
    assert caches[1]["miro/4"] != caches[1]["miro/8"]  # different checkpoints, different images
    assert caches[1]["miro/8/sharpness=0.5"] != caches[1]["miro/8"]
    before = dict(caches[2])
    evaluate.evaluate_all(jobs, caches[2], tmp_path / "evals2.json", args, tmp_path / "no-runs-here", total=8)
    assert caches[2] == before  # every key cached: no checkpoint is opened


@pytest.fixture
def lively_miro(tiny_runs, tmp_path):
    """The tiny MIRO run with a random EMA output layer, so that its images depend on the reward targets (as
    tests/test_sample.py's lively_run)."""
    ckpt = torch.load(tiny_runs / "miro" / "ckpt.pt", weights_only=True)
    w = ckpt["ema"]["final_layer.linear.weight"]
    ckpt["ema"]["final_layer.linear.weight"] = 0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    (tmp_path / "lively").mkdir()
    torch.save(ckpt, tmp_path / "lively" / "ckpt.pt")
    return tmp_path / "lively"


def test_tradeoff_sweeps_one_reward_target(lively_miro, tmp_path):
    """--reward contrast sweeps contrast's positive target, the others at 1: each point is the evaluation at that
    target (the rewards subcommand at --rewards contrast=v on the same images gives the same numbers), the target
    matters, and every metric is reported and plotted."""
    ckpt, few = str(lively_miro), ["--n-per-prompt", "1", "--min-per-task", "1", "--steps", "2"]
    res = run_eval("tradeoff", "--ckpt", ckpt, "--reward", "contrast", "--values", "0,1", *few, "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    sweep = json.loads((tmp_path / "tradeoff.json").read_text())["sweep"]
    assert set(sweep) == {"0.0", "1.0"} and {"alignment", "contrast", "geneval", "diversity"} <= set(sweep["0.0"])
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
    assert sweep["0.0"]["contrast"] != sweep["1.0"]["contrast"]  # same noise: equal images give equal numbers
    for v in ("0.0", "1.0"):  # the ends differ by > 1e-5 relative (contrast, sharpness): far above float noise
        out = tmp_path / f"contrast={v}"
        res = run_eval("rewards", "--ckpt", ckpt, "--rewards", f"contrast={v}", *few, "--out", str(out))
        assert res.returncode == 0, res.stderr[-2000:]
        at_v = {name: m["mean"] for name, m in json.loads((out / "rewards.json").read_text())["rewards"].items()}
        assert {name: sweep[v][name] for name in at_v} == pytest.approx(at_v, rel=1e-9, abs=0), v


def test_rewards_write_their_numbers(tiny_runs, tmp_path):
    ckpt = str(tiny_runs / "miro")
    res = run_eval("rewards", "--ckpt", ckpt, "--n-per-prompt", "1", "--min-per-task", "1", "--steps", "2",
                   "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads((tmp_path / "rewards.json").read_text())["rewards"]
    assert set(out) == {"alignment", "sharpness", "cleanliness", "contrast"}
    assert all(0 <= v["mean"] <= 1 and v["ci95"] >= 0 and v["n"] == v["prompts"] == 29 for v in out.values())
    assert "geneval" not in json.loads((tmp_path / "rewards.json").read_text())  # judged without a detector
    (tmp_path / "one.txt").write_text("a red circle\n")  # one image: no interval, and still strict JSON (null)
    res = run_eval("rewards", "--ckpt", ckpt, "--prompts", str(tmp_path / "one.txt"), "--n-per-prompt", "1",
                   "--steps", "2", "--judge-rewards", "contrast", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    text = (tmp_path / "rewards.json").read_text()
    assert "NaN" not in text and json.loads(text)["rewards"]["contrast"]["ci95"] is None


def test_tradeoff_sweeps_the_guidance_weight_of_any_checkpoint(tiny_runs, tmp_path):
    """--reward cfg sweeps w, the baseline's too: each point is the evaluation at that weight (the rewards
    subcommand at --cfg w on the same images, --min-per-task applied alike, gives the same numbers), and the
    weight matters."""
    ckpt, few = str(tiny_runs / "baseline"), ["--n-per-prompt", "1", "--steps", "2", "--min-per-task", "6"]
    res = run_eval("tradeoff", "--ckpt", ckpt, "--reward", "cfg", "--values", "0,3", *few, "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    tradeoff = json.loads((tmp_path / "tradeoff.json").read_text())
    sweep = tradeoff["sweep"]
    assert sweep["0.0"]["contrast"] != sweep["3.0"]["contrast"]
    res = run_eval("rewards", "--ckpt", ckpt, "--cfg", "3", *few, "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    rewards = json.loads((tmp_path / "rewards.json").read_text())
    world = data.WorldConfig(**torch.load(tiny_runs / "baseline" / "ckpt.pt", weights_only=True)["world"])
    held = data.heldout_prompts(world)
    assert rewards["images"] == tradeoff["images"] == len(evaluate.repeat_prompts(held, 1, 6)) > len(held)
    at_3 = rewards["rewards"]
    assert {name: sweep["3.0"][name] for name in at_3} == pytest.approx({n: v["mean"] for n, v in at_3.items()})
    res = run_eval("tradeoff", "--ckpt", ckpt, "--reward", "cfg", "--values", "1,-1", *few, "--out", str(tmp_path))
    assert res.returncode == 2 and "guidance weights must be >= 0" in res.stderr and "Traceback" not in res.stderr


def test_neg_prompt_reaches_the_negative_branch(tiny_runs, tmp_path):
    """--neg-prompt '' is the baseline's default negative (same numbers) and changes MIRO's (its default is the
    prompt itself)."""
    few = ["--n-per-prompt", "1", "--steps", "2", "--min-per-task", "0", "--judge-rewards", "contrast"]
    rewards = {}
    for run in ("baseline", "miro"):
        for neg in (None, ""):
            out = tmp_path / f"{run}{neg is None}"
            res = run_eval("rewards", "--ckpt", str(tiny_runs / run), *few, "--out", str(out),
                           *([] if neg is None else ["--neg-prompt", neg]))
            assert res.returncode == 0, res.stderr[-2000:]
            rewards[run, neg] = json.loads((out / "rewards.json").read_text())["rewards"]["contrast"]["mean"]
    assert rewards["baseline", None] == rewards["baseline", ""]
    assert rewards["miro", None] != rewards["miro", ""]


def test_outputs_record_the_settings_behind_their_numbers(tiny_runs, tmp_path):
    (tmp_path / "p.txt").write_text("a photo of a red circle\n")
    evaluate.main(["rewards", "--ckpt", str(tiny_runs / "miro"), "--prompts", str(tmp_path / "p.txt"), "--steps", "2",
                   "--n-per-prompt", "1", "--rewards", "sharpness=0.5", "--neg-prompt", "", "--judge-rewards",
                   "contrast", "--out", str(tmp_path)])
    settings = json.loads((tmp_path / "rewards.json").read_text())["settings"]
    given = {"rewards": "sharpness=0.5", "steps": 2, "n_per_prompt": 1, "neg_prompt": "", "judge_rewards": "contrast",
             "prompts": str(tmp_path / "p.txt"), "seed": 0, "detector": "shapes", "out": str(tmp_path)}
    assert {k: settings[k] for k in given} == given
    # no --cfg: the weight sampled with is the checkpoint's, recorded as such
    assert settings["cfg"] == torch.load(tiny_runs / "miro" / "ckpt.pt", weights_only=True)["sampling"]["cfg"]
    assert not {"command", "rank", "reward_option"} & set(settings)


def test_precision_reaches_the_generator(tiny_runs, tmp_path, monkeypatch):
    """--precision bf16 samples under bf16 autocast (the default on CUDA), recorded with the numbers."""
    seen = []
    monkeypatch.setattr(evaluate, "generate", (lambda f: lambda *a, **k: seen.append(k["bf16"]) or f(*a, **k))(
        evaluate.generate))
    means = {}
    for precision in ([], ["--precision", "bf16"]):
        out = tmp_path / (precision[-1] if precision else "default")
        evaluate.main(["rewards", "--ckpt", str(tiny_runs / "miro"), "--steps", "2", "--n-per-prompt", "1",
                       "--min-per-task", "0", "--judge-rewards", "contrast", "--out", str(out), *precision])
        result = json.loads((out / "rewards.json").read_text())
        means[out.name] = result["rewards"]["contrast"]["mean"]
        assert result["settings"]["precision"] == (precision[-1] if precision else None)
    assert seen and seen == [False] * (len(seen) // 2) + [True] * (len(seen) // 2)  # CPU default: fp32
    assert abs(means["bf16"] - means["default"]) < 0.05


def test_every_image_of_an_evaluation_has_its_own_noise_seed(tiny_runs):
    """Images of one prompt differ (diversity > 0), and image i is generated from seed * SEED_STRIDE + i whatever
    batch it falls in."""
    from sample import as_saved, generate, open_checkpoint
    _, ckpt, model, tok, _ = open_checkpoint(tiny_runs / "miro")
    items = evaluate.repeat_prompts([{"prompt": "a photo of a red circle"}, {"prompt": "a photo of two squares"}], 2)
    R, cfg = len(model.cfg.reward_names), ckpt["sampling"]["cfg"]
    pos, neg = torch.ones(1, R), torch.zeros(1, R)
    rows = evaluate.sample_and_judge(model, tok, items, pos, neg, cfg, evaluate.Judges({}), steps=2, seed=1,
                                     batch_size=3)
    f = torch.tensor([r["features"] for r in rows])
    assert (torch.cdist(f, f) + torch.eye(4)).min() > 1e-3 and evaluate.diversity(rows, items) > 1e-3
    last = generate(model, tok, [items[3]["prompt"]], pos, neg, cfg=cfg, steps=2, seeds=[evaluate.SEED_STRIDE + 3])
    torch.testing.assert_close(evaluate.pixel_features((as_saved(last) + 1) / 2)[0], f[3])  # judged as saved


class ReadsRewardAndCaption(torch.nn.Module):
    """A velocity model that uses reward 0 and the caption (a number), ignores reward 1, x and t: its prediction is
    exact for images made as below, so shuffling what it uses must raise the loss and nothing else may."""

    def forward(self, x, t, text, text_mask=None, rewards=None):
        return (rewards[:, 0] + text[:, 0]).view(-1, 1, 1, 1).expand_as(x)


def test_condition_usage_is_the_loss_rise_of_each_shuffled_input():
    g = torch.Generator().manual_seed(0)
    n = 64
    values = torch.rand(n, 2, generator=g)
    numbers = torch.rand(n, generator=g)
    images = -(values[:, 0] + numbers).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()  # target = noise - x0

    def encode(captions):
        return torch.tensor([[float(c)] for c in captions]), torch.ones(len(captions), 1, dtype=torch.bool)

    captions = [f"{v:.8f}" for v in numbers.tolist()]
    usage = evaluate.condition_usage(ReadsRewardAndCaption(), encode, images, captions, values, ["used", "unused"],
                                     batch_size=24)
    assert usage["loss"] == pytest.approx(1, abs=0.1)  # the noise's variance: the prediction is exact but for it
    assert usage["increase"]["unused"] == 0
    assert usage["increase"]["used"] > 0.1 and usage["increase"]["caption"] > 0.1
    same_caption = evaluate.condition_usage(ReadsRewardAndCaption(), encode, images, ["0.5"] * n, values,
                                            ["used", "unused"])
    assert same_caption["increase"]["caption"] == 0  # shuffling identical captions changes nothing


def test_usage_on_trained_runs(tiny_runs, tmp_path):
    """On all 48 training samples, the reported loss is condition_usage's on those images, captions and the
    checkpoint's binned annotation scores: the model was fed the right images, captions and rewards."""
    import rewards
    from sample import open_checkpoint
    data_dir = tiny_runs.parent / "data"
    samples = data.ImageTextSamples(data_dir)
    annotations = rewards.load_annotations(data_dir / "annotations.jsonl")
    images = samples.images_01(list(range(len(samples)))) * 2 - 1
    for run, inputs in (("miro", {"alignment", "sharpness", "cleanliness", "contrast", "caption"}),
                        ("baseline", {"caption"})):
        res = run_eval("usage", "--ckpt", str(tiny_runs / run), "--samples", "48", "--out", str(tmp_path / run))
        assert res.returncode == 0, res.stderr[-2000:]
        out = json.loads((tmp_path / run / "usage.json").read_text())
        assert set(out["increase"]) == inputs and out["samples"] == len(samples) == 48
        assert out["data_dir"] == str(data_dir)
        assert all(math.isfinite(v) for v in out["increase"].values())
        _, ckpt, model, tok, _ = open_checkpoint(tiny_runs / run)
        names = list(model.cfg.reward_names)
        scores = data.sample_scores(annotations, samples.keys, names)  # as train.py reads them
        values = rewards.RewardBins.from_dict(ckpt["bins"]).values(scores) if names else torch.zeros(48, 0)
        expected = evaluate.condition_usage(model, tok, images, samples.captions, values, names,
                                            ckpt["train"]["time_sampling"])
        assert out["loss"] == pytest.approx(expected["loss"], rel=1e-6) and out["loss"] > 0
    res = run_eval("usage", "--ckpt", str(tiny_runs / "miro"), "--data-dir", str(tmp_path / "nowhere"),
                   "--out", str(tmp_path))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"No such file or directory: '{tmp_path / 'nowhere' / 'samples.jsonl'}'\n" in res.stderr  # whole quote


@pytest.mark.parametrize("args, message", [
    (["geneval", "--ckpt", "/nonexistent/run"], "no checkpoint at /nonexistent/run"),
    (["rewards", "--reward-option", "aesthetic-head=x"], "expected NAME.KEY=VALUE"),
    (["geneval", "--steps", "0"], "--steps must be > 0"),
    (["geneval", "--cfg", "-1"], "--cfg must be >= 0"),
    (["geneval", "--cfg", "nan"], "--cfg must be >= 0 and finite"),
    (["rewards", "--min-per-task", "-5"], "--min-per-task must be >= 0"),
    (["diversity", "--n-per-prompt", "1"], "diversity compares a prompt's samples, so it needs at least 2"),
    (["convergence", "--condition", "contrast,bogus"], r"--condition: unknown reward\(s\) bogus; known rewards"),
    (["usage", "--samples", "0"], "--samples must be > 0"),
    (["convergence", "--condition", "sharpness", "--tuned-target", "contrast=0.6"],
     "--tuned-target: unknown reward 'contrast'; --condition supports: sharpness"),
    (["convergence", "--rewards", "contrast=0.5"], "unrecognized arguments: --rewards"),  # it would be overwritten
    (["convergence", "--judge-rewards", "contrast"], "unrecognized arguments: --judge-rewards"),
    (["tts", "--min-per-task", "4"], "unrecognized arguments: --min-per-task"),
    (["tts", "--n-per-prompt", "2"], "unrecognized arguments: --n-per-prompt"),  # it draws --max-n per prompt
    (["geneval", "--seed", "9300000000000"], r"argument --seed: must be in \[0, "),  # seed * 1_000_003 overflowed
])
def test_cli_errors_are_one_line(args, message):
    res = run_eval(*args)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    import re
    assert re.search(message, res.stderr), res.stderr


def test_convergence_refuses_repeated_seeds_past_the_largest_seed(capsys):
    with pytest.raises(SystemExit) as e:  # the repeats train with --seed + 1, ..., which train.py would refuse
        evaluate.parse_args(["convergence", "--seed", str(data.MAX_SEED), "--repeat-seeds", "1"])
    assert e.value.code == 2 and f"--seed + --repeat-seeds must be <= {data.MAX_SEED}" in capsys.readouterr().err


def test_cli_errors_that_need_a_checkpoint(tiny_runs, tmp_path):
    res = run_eval("tradeoff", "--ckpt", str(tiny_runs / "baseline"), "--reward", "contrast", "--out", str(tmp_path))
    assert res.returncode == 2 and "conditioned on nothing" in res.stderr and "Traceback" not in res.stderr
    res = run_eval("geneval", "--ckpt", str(tiny_runs / "miro"), "--prompts", str(tmp_path / "nope.jsonl"),
                   "--out", str(tmp_path))
    assert res.returncode == 2 and "no such file" in res.stderr
    res = run_eval("tradeoff", "--ckpt", str(tiny_runs / "miro"), "--reward", "contrast", "--values", "0,abc",
                   "--out", str(tmp_path))
    assert res.returncode == 2 and "--values '0,abc': expected comma-separated numbers" in res.stderr
    res = run_eval("tradeoff", "--ckpt", str(tiny_runs / "miro"), "--reward", "cfg", "--values", "0,inf",
                   "--out", str(tmp_path))
    assert res.returncode == 2 and "guidance weights must be >= 0 and finite" in res.stderr
    res = run_eval("rewards", "--ckpt", str(tiny_runs / "baseline"), "--rewards", "alignment=1", "--out", str(tmp_path))
    assert res.returncode == 2 and "was trained without rewards (a baseline)" in res.stderr
    torch.save(torch.zeros(3), tmp_path / "t.pt")  # was an IndexError deep in model_from_checkpoint
    res = run_eval("geneval", "--ckpt", str(tmp_path / "t.pt"), "--out", str(tmp_path))
    assert res.returncode == 2 and "t.pt: not a MIRO checkpoint (it holds a Tensor)" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_geneval_rerun_that_dies_leaves_no_stale_numbers(tiny_runs, tmp_path, monkeypatch, capsys):
    """The rerun clears the earlier run's images and its geneval.json together: a run killed in between must not
    leave the old numbers beside the new, partial images."""
    few = ["geneval", "--ckpt", str(tiny_runs / "miro"), "--n-per-prompt", "1", "--min-per-task", "1", "--steps", "1",
           "--out", str(tmp_path)]
    evaluate.main(few)
    assert (tmp_path / "geneval.json").exists() and any((tmp_path / "geneval").iterdir())

    def killed(*args, **kwargs):
        raise RuntimeError("killed")
    monkeypatch.setattr(evaluate.Context, "run", killed)
    with pytest.raises(SystemExit):
        evaluate.main(few)
    assert not (tmp_path / "geneval.json").exists() and not (tmp_path / "geneval").exists()


def test_tts_best_of_n_curves_for_miro_and_the_baseline(tiny_runs, tmp_path):
    """tts: each prompt's max-n candidates once, then for N = 1, 2, 4 the best of the first N by --select-by: its
    mean can only grow with N; both models get a curve under their own label (a baseline alone is not 'MIRO')."""
    (tmp_path / "p.txt").write_text("a photo of a red circle\na photo of two blue squares\na photo of a triangle\n")
    few = ["--prompts", str(tmp_path / "p.txt"), "--max-n", "4", "--steps", "2", "--select-by", "contrast",
           "--judge-rewards", "contrast,sharpness"]
    res = run_eval("tts", "--ckpt", str(tiny_runs / "miro"), "--baseline", str(tiny_runs / "baseline"), *few,
                   "--out", str(tmp_path / "both"))
    assert res.returncode == 0, res.stderr[-2000:]
    curves = json.loads((tmp_path / "both" / "tts.json").read_text())["curves"]
    assert set(curves) == {"MIRO", "baseline"} and all(set(c) == {"1", "2", "4"} for c in curves.values())
    for curve in curves.values():
        chosen = [curve[n]["contrast"] for n in ("1", "2", "4")]
        assert chosen == sorted(chosen) and chosen[0] < chosen[-1]  # 3 prompts x 4 noise draws: some gain
    assert (tmp_path / "both" / "tts.png").stat().st_size > 0
    res = run_eval("tts", "--ckpt", str(tiny_runs / "baseline"), *few, "--out", str(tmp_path / "alone"))
    assert res.returncode == 0, res.stderr[-2000:]
    alone = json.loads((tmp_path / "alone" / "tts.json").read_text())["curves"]
    assert list(alone) == ["baseline"] and alone["baseline"] == curves["baseline"]  # the same seeds and images
    both = json.loads((tmp_path / "both" / "tts.json").read_text())
    baseline_cfg = torch.load(tiny_runs / "baseline" / "ckpt.pt", weights_only=True)["sampling"]["cfg"]
    assert both["settings"]["select_by"] == "contrast" and both["baseline_run"]["cfg"] == baseline_cfg


def test_tts_reports_every_candidate_drawn(tiny_runs, tmp_path):
    """--max-n 3 draws 3 candidates per prompt: N = 3 is reported too, not only the powers of two below it."""
    (tmp_path / "p.txt").write_text("a photo of a red circle\n")
    evaluate.main(["tts", "--ckpt", str(tiny_runs / "miro"), "--prompts", str(tmp_path / "p.txt"), "--max-n", "3",
                   "--steps", "1", "--select-by", "contrast", "--judge-rewards", "contrast", "--out", str(tmp_path)])
    curve = json.loads((tmp_path / "tts.json").read_text())["curves"]["MIRO"]
    assert list(curve) == ["1", "2", "3"] and curve["3"]["contrast"] >= curve["2"]["contrast"]


def test_convergence_end_to_end_with_tiny_runs(tmp_path, monkeypatch, capsys):
    """evaluate.py convergence on tiny runs: the schedule of kept checkpoints, the curves, speedups and Table-1 rows
    it reports, and a rerun that retrains and re-evaluates nothing. (train.py runs in-process on the tiny preset in
    place of the cpu-preset subprocesses; data preparation is the default world's and is tested elsewhere.)"""
    import train
    from conftest import tiny_train_args
    trained, contexts, commons = [], [], []

    def tiny_train_runs(runs, common, out, jobs):
        commons.append(common)
        for name, flags in runs.items():
            if not (out / name / "done").exists():
                trained.append(name)
                train.main(tiny_train_args(out, "--name", name, "--keep-every", "0", *flags))
                (out / name / "done").touch()

    class CountingContext(evaluate.Context):
        def __init__(self, args, ckpt):
            contexts.append(Path(ckpt).relative_to(out))
            super().__init__(args, ckpt)

    monkeypatch.setattr(evaluate, "prepare_convergence_data", lambda condition, judges: {})
    monkeypatch.setattr(evaluate, "train_runs", tiny_train_runs)
    monkeypatch.setattr(evaluate, "Context", CountingContext)
    out = tmp_path / "convergence"
    argv = ["convergence", "--out", str(out), "--train-steps", "8", "--eval-every", "4", "--condition",
            "alignment,sharpness", "--batch-size", "256", "--tuned-target", "sharpness=0.625", "--repeat-seeds", "1"]
    evaluate.main(argv)
    result = json.loads((out / "convergence.json").read_text())

    ablations = ["only_alignment", "only_sharpness", "without_alignment", "without_sharpness"]
    assert trained == ["baseline", "miro", *ablations, "baseline_seed1", "miro_seed1"]
    curve_runs = ["baseline", "miro", "baseline_seed1", "miro_seed1"]
    for run in curve_runs:  # only the curves (the repeated seeds' too) keep intermediate checkpoints
        assert (out / run / "ckpt_0000004.pt").is_file()
    assert not any((out / run / "ckpt_0000004.pt").exists() for run in ablations)
    assert result["steps"] == [4, 8] and result["preset"]["steps"] == 8
    flags = dict(zip(commons[0][::2], commons[0][1::2]))  # every run shares the preset's recipe
    full = evaluate.CONVERGENCE_PRESETS["full"]
    assert (flags["--steps"], flags["--batch-size"], flags["--lr"]) == ("8", str(full["batch_size"]), str(full["lr"]))
    curves, table = result["curves"], result["table"]
    assert table["baseline"] == curves["baseline"][-1] and table["MIRO"] == curves["miro"][-1]
    assert result["settings"]["tuned_target"] == "sharpness=0.625"
    assert set(table) == {"baseline", "MIRO", "MIRO, target sharpness=0.625", *ablations}
    assert table["MIRO, target sharpness=0.625"]["sharpness"] != table["MIRO"]["sharpness"]  # the target took effect
    for metric, value in result["speedup"].items():
        base, miro = [c[metric] for c in curves["baseline"]], [c[metric] for c in curves["miro"]]
        assert value == evaluate.speedup([4, 8], base, miro)
        assert result["matched_speedup"][metric] == evaluate.speedup([4, 8], base, miro, matched=True)
    assert "diversity" not in result["speedup"] and {"geneval", "alignment", "sharpness"} <= set(result["speedup"])
    assert (out / "convergence.png").stat().st_size > 0
    assert (out / "table.md").read_text().count("\n") == len(table) + 2
    kept = [Path(run, name) for run in curve_runs for name in ("ckpt_0000004.pt", "ckpt.pt")]
    final = [Path(run, "ckpt.pt") for run in ablations]
    # the seed spread: seed 0 is the curves' final point, seed 1 the repeated pair (trained with its own seed)
    seeds = result["seeds"]
    assert seeds["baseline"]["0"] == table["baseline"] and seeds["MIRO"]["0"] == table["MIRO"]
    assert set(seeds["baseline"]) == set(seeds["MIRO"]) == {"0", "1"}
    assert seeds["MIRO"]["1"] != seeds["MIRO"]["0"]
    assert json.loads((out / "miro_seed1" / "config.json").read_text())["args"]["seed"] == 1
    assert result["seed_speedups"]["0"] == result["speedup"]
    for metric, value in result["seed_speedups"]["1"].items():
        base, miro = [c[metric] for c in curves["baseline_seed1"]], [c[metric] for c in curves["miro_seed1"]]
        assert value == evaluate.speedup([4, 8], base, miro)
    assert curves["miro_seed1"][-1] == seeds["MIRO"]["1"]
    for metric, value in result["mean_speedups"].items():  # the speed-up of the curves averaged over the seeds
        base, miro = ([(a[metric] + b[metric]) / 2 for a, b in zip(curves[run], curves[f"{run}_seed1"])]
                      for run in ("baseline", "miro"))
        assert value == evaluate.speedup([4, 8], base, miro)
        assert result["mean_matched_speedups"][metric] == evaluate.speedup([4, 8], base, miro, matched=True)
    assert set(result["mean_speedups"]) == set(result["speedup"])
    assert result["seed_matched_speedups"]["0"] == result["matched_speedup"]
    spread = (out / "seeds.md").read_text().splitlines()
    assert len(spread) == 17 and spread[4].startswith("| MIRO >= baseline |") and spread[5] == spread[11] == ""
    assert spread[6].startswith("| speed-up |") and [r[:10] for r in spread[8:10]] == ["| seed 0 |", "| seed 1 |"]
    assert spread[10].startswith("| mean curve of 2 seeds |") and spread[12].startswith("| matched speed-up |")
    assert spread[16].startswith("| mean curve of 2 seeds |")
    # curves (the repeated seeds' too), tuned row, ablations; evaluated two at a time, so in no fixed order
    assert sorted(contexts) == sorted([*kept, Path("miro", "ckpt.pt"), *final])
    n_evaluations = len(contexts)

    trained.clear()
    evaluate.main(argv)  # resumed: every run is done and every evaluation cached
    assert trained == [] and len(contexts) == n_evaluations
    assert json.loads((out / "convergence.json").read_text())["table"] == table

    # Other settings in the same --out would reuse runs and evaluations made with the old ones: refused up front.
    for changed, what in ((["--seed", "7"], "baseline, miro, "), (["--condition", "sharpness,contrast"], "miro, "),
                          (["--cfg", "1.5"], "the evaluation"), (["--train-steps", "12"], "baseline, ")):
        with pytest.raises(SystemExit) as exit_:
            evaluate.main([*argv, *changed])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "made with other settings (" + what in err and "another --out" in err
        assert trained == [] and len(contexts) == n_evaluations
    legacy = tmp_path / "legacy"  # runs from before settings.json: nothing says how they were made
    (legacy / "miro").mkdir(parents=True)
    with pytest.raises(SystemExit):
        evaluate.main([*argv, "--out", str(legacy)])
    assert "no settings.json" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["convergence", "usage"])
def test_convergence_and_usage_refuse_torchrun(command, tmp_path, monkeypatch, capsys):
    """Neither shards: under torchrun every rank would run the whole command (convergence: build the world, train
    and write into the same folder). Refused before joining the process group."""
    monkeypatch.setenv("WORLD_SIZE", "2")

    def joined(device, timeout=None):
        raise AssertionError("joined the process group")
    monkeypatch.setattr(evaluate.data, "init_distributed", joined)
    with pytest.raises(SystemExit) as exit_:
        evaluate.main([command, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"error: {command} runs as one process, not under torchrun" in err
    assert ("in parallel with --jobs" in err) == (command == "convergence")
    assert not (tmp_path / "out").exists()


def test_convergence_settings_accept_new_runs_and_refuse_changed_ones(tmp_path):
    evaluation = {"seed": 0, "judges": ["alignment"]}
    evaluate.check_convergence_settings(tmp_path, {"miro": ["--seed", "0"]}, evaluation)
    evaluate.check_convergence_settings(tmp_path, {"miro": ["--seed", "0"], "miro_seed1": ["--seed", "1"]},
                                        evaluation)  # another seed: a new run, the old one reused
    evaluate.check_convergence_settings(tmp_path, {"miro_seed1": ["--seed", "1"]}, evaluation)
    recorded = json.loads((tmp_path / "settings.json").read_text())
    assert recorded == {"runs": {"miro": ["--seed", "0"], "miro_seed1": ["--seed", "1"]}, "evaluation": evaluation}
    with pytest.raises(ValueError, match=r"other settings \(miro\)"):
        evaluate.check_convergence_settings(tmp_path, {"miro": ["--seed", "2"]}, evaluation)
    with pytest.raises(ValueError, match=r"other settings \(the evaluation\)"):
        evaluate.check_convergence_settings(tmp_path, {"miro": ["--seed", "0"]}, {**evaluation, "seed": 1})
    assert json.loads((tmp_path / "settings.json").read_text()) == recorded  # a refusal records nothing
