"""Reliability: DDP equals one process, crash-and-resume equals an uninterrupted run, NaN policy, bad input.

Every run here is the shared tiny run of conftest (preset tiny, 48 samples, 8 steps of global batch 8), so the
reference is `tiny_runs/miro`, trained once in-process. Multi-process runs go through torchrun (gloo, CPU) with this
file as the launched script: run as a script it installs the fault injections named by RELIABILITY_* environment
variables and then calls train.main on its arguments:
    RELIABILITY_WATCH=DIR     on ranks > 0, any write, rename, removal or mkdir under DIR raises (audit hook)
    RELIABILITY_NAN="R:S,..." rank R's loss is NaN in step S (1-based, counted from the process start)
    RELIABILITY_TORN_SAVE=K   the K-th torch.save writes half its bytes, then the process SIGKILLs itself
The 8-rank run is marked `slow` (CI runs it too; `-m "not slow"` skips it locally).
"""
import gc
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # also when torchrun runs this file as a script

import sample  # noqa: E402
import train  # noqa: E402
from conftest import tiny_train_args  # noqa: E402
from model import load_checkpoint  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# Helpers

def assert_same_weights(a, b, atol=0.0):
    """Model and EMA weights of two checkpoints equal (exactly, or within atol)."""
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name, value in a[key].items():
            if atol:
                torch.testing.assert_close(value, b[key][name], atol=atol, rtol=0, msg=f"{key}.{name}")
            else:
                assert torch.equal(value, b[key][name]), f"{key}.{name} differs"


def launch(nproc, argv, env=None, timeout=240):
    """torchrun (standalone, gloo) of this file as the training script; returns the CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def cli_error(main, argv, capsys):
    """Run a script's main(argv) that must fail with argparse's error: returns the one error line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and ": error: " in err[-1] and "Traceback" not in "\n".join(err)
    return err[-1]


def data_dir(tiny_runs):
    return tiny_runs.parent / "data"


def resume_args(tiny_runs, runs, run_dir):
    return tiny_train_args(runs, "--data-dir", str(data_dir(tiny_runs)), "--resume", str(run_dir))


# ----------------------------------------------------------------------------------------------------------------
# Distributed correctness: the result does not depend on ranks, accumulation or resume.

def test_two_ranks_equal_one_process_and_only_rank0_writes(tiny_runs, tmp_path):
    runs = tmp_path / "runs"
    result = launch(2, tiny_train_args(runs, "--data-dir", str(data_dir(tiny_runs)), "--sample-every", "4"),
                    env={"RELIABILITY_WATCH": str(runs)})
    assert result.returncode == 0, result.stderr[-3000:]
    run = runs / "miro"
    assert_same_weights(load_checkpoint(tiny_runs / "miro" / "ckpt.pt"), load_checkpoint(run / "ckpt.pt"),
                        atol=1e-5)
    assert sorted(p.name for p in run.iterdir()) == [".train.lock", "ckpt.pt", "ckpt_0000004.pt", "ckpt_0000008.pt",
                                                     "config.json", "log.txt", "samples"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000004.png", "step_0000008.png"]
    log = (run / "log.txt").read_text().splitlines()
    assert sum(line.startswith("step ") for line in log) == 2  # steps 5 and 8, once each: one writer
    assert any("global batch 8 = 2 ranks x 1 accum x 4" in line for line in log)


def test_two_ranks_resume_a_one_process_checkpoint_at_the_same_step(tiny_runs, tmp_path):
    """Both ranks load the single-process step-4 checkpoint, agree on the step and end where it ends."""
    run = tmp_path / "runs" / "miro"
    run.mkdir(parents=True)
    shutil.copy(tiny_runs / "miro" / "ckpt_0000004.pt", run / "ckpt.pt")
    result = launch(2, resume_args(tiny_runs, tmp_path / "runs", run), env={"RELIABILITY_WATCH": str(run)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed {run} at step 4 on all 2 rank(s)" in (run / "log.txt").read_text()
    final = load_checkpoint(run / "ckpt.pt")
    assert final["step"] == 8
    assert_same_weights(load_checkpoint(tiny_runs / "miro" / "ckpt.pt"), final, atol=1e-5)


@pytest.mark.slow
def test_eight_ranks_run_and_equal_one_process(tiny_runs, tmp_path):
    """torchrun --nproc_per_node=8 on a CPU: one sample per rank per step, same result as one process."""
    result = launch(8, tiny_train_args(tmp_path / "runs", "--data-dir", str(data_dir(tiny_runs))))
    assert result.returncode == 0, result.stderr[-3000:]
    final = load_checkpoint(tmp_path / "runs" / "miro" / "ckpt.pt")
    assert final["step"] == 8
    assert_same_weights(load_checkpoint(tiny_runs / "miro" / "ckpt.pt"), final, atol=1e-5)


def test_gradient_accumulation_equals_the_larger_batch(tiny_runs, tmp_path):
    train.main(tiny_train_args(tmp_path / "runs", "--data-dir", str(data_dir(tiny_runs)), "--grad-accum", "2"))
    assert_same_weights(load_checkpoint(tiny_runs / "miro" / "ckpt.pt"),
                        load_checkpoint(tmp_path / "runs" / "miro" / "ckpt.pt"), atol=1e-5)


def test_step_draws_depend_on_seed_and_step_only():
    tc = train.TrainConfig(text_dropout=0.5, reward_dropout=0.5)
    a = train.step_draws(0, 3, 8, (3, 4, 4), 2, tc)
    assert all(torch.equal(x, y) for x, y in zip(a, train.step_draws(0, 3, 8, (3, 4, 4), 2, tc)))
    assert not torch.equal(a[1], train.step_draws(0, 4, 8, (3, 4, 4), 2, tc)[1])  # another step
    assert not torch.equal(a[1], train.step_draws(1, 3, 8, (3, 4, 4), 2, tc)[1])  # another seed
    assert [x.shape for x in a] == [(8,), (8, 3, 4, 4), (8,), (8, 2)]


def test_step_draws_drop_text_and_rewards_at_their_rates():
    """keep_text is True with probability 1 - text_dropout, drop_rewards with probability reward_dropout."""
    tc = train.TrainConfig(text_dropout=0.3, reward_dropout=0.1)
    _, _, keep_text, drop_rewards = train.step_draws(0, 0, 20_000, (1,), 3, tc)
    assert abs(keep_text.float().mean().item() - 0.7) < 0.02
    assert abs(drop_rewards.float().mean().item() - 0.1) < 0.01


# ----------------------------------------------------------------------------------------------------------------
# Crash safety: SIGKILL at random moments and mid-checkpoint, resumed again and again.

def checkpoints_load(run):
    """Every checkpoint file of a run loads and holds a step; returns {name: step}."""
    return {p.name: load_checkpoint(p)["step"] for p in sorted(run.glob("ckpt*.pt"))}


def wait_for_training(proc, log, lines_before, timeout=120):
    """Poll until the process logs its "training ..." line (imports and data loading done) or exits."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and sum(l.startswith("training") for l in log.read_text().splitlines()) > lines_before:
            return True
        time.sleep(0.005)
    return False


def test_sigkill_anywhere_and_resume_equals_uninterrupted_run(tiny_runs, tmp_path):
    """Lives of one run, each ended by SIGKILL: first mid-write of a checkpoint, then after seeded random delays
    into training; every life resumes the last checkpoint. Each checkpoint on disk always loads, and the final
    weights are bit-identical to the uninterrupted reference (deterministic CPU run)."""
    runs, rng = tmp_path / "runs", random.Random(7)
    run = runs / "miro"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = tiny_train_args(runs, "--data-dir", str(data_dir(tiny_runs)), "--ckpt-every", "1", "--keep-every", "3")

    # Life 1: saves ckpt.pt at steps 1 and 2, step 3's kept copy, then is killed in the middle of writing step 3's
    # ckpt.pt: the moment that would lose the kept copy for good if it were written second.
    torn = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, env={**env, "RELIABILITY_TORN_SAVE": "4"},
                          capture_output=True, text=True, timeout=120)
    assert torn.returncode == -signal.SIGKILL, torn.stderr[-2000:]
    assert (run / "ckpt.pt.tmp").stat().st_size > 0  # the torn file is there ...
    assert checkpoints_load(run) == {"ckpt.pt": 2, "ckpt_0000003.pt": 3}  # ... but ckpt.pt is the previous one

    lives, steps_seen, killed_mid_run = 1, [], 0
    while True:
        lives += 1
        before = sum(l.startswith("training") for l in (run / "log.txt").read_text().splitlines())
        proc = subprocess.Popen([sys.executable, "train.py", *args, "--resume", str(run)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if lives <= 4 and wait_for_training(proc, run / "log.txt", before):
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, -signal.SIGKILL), err[-2000:]
        steps_seen.append(checkpoints_load(run)["ckpt.pt"])  # loads after every kill
        killed_mid_run += proc.returncode == -signal.SIGKILL and steps_seen[-1] < 8
        if proc.returncode == 0:
            break
    assert killed_mid_run >= 1  # a kill landed inside training: otherwise this would test an uninterrupted run
    assert steps_seen[-1] == 8 and steps_seen == sorted(steps_seen)
    assert {"ckpt_0000003.pt", "ckpt_0000006.pt"} <= set(checkpoints_load(run))
    assert_same_weights(load_checkpoint(tiny_runs / "miro" / "ckpt.pt"), load_checkpoint(run / "ckpt.pt"))


def test_sigterm_and_ctrl_c_stop_after_the_step_with_a_checkpoint(tiny_runs, tmp_path, monkeypatch):
    """A preemption's SIGTERM, then a Ctrl-C, each arriving mid-step (sent from inside the loss): the step finishes,
    its checkpoint is written (none was due: --ckpt-every 100), the exit code is 128 + the signal; the resumed lives
    end bit-identical to the uninterrupted reference, and the signal handlers are given back."""
    run = tmp_path / "runs" / "miro"
    args = tiny_train_args(tmp_path / "runs", "--data-dir", str(data_dir(tiny_runs)), "--ckpt-every", "100",
                           "--keep-every", "0")
    real, handlers = train.flow_matching_loss, [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    for signum, at_call, step in ((signal.SIGTERM, 3, 3), (signal.SIGINT, 2, 5)):
        calls = []

        def loss(*a, **k):
            calls.append(1)
            if len(calls) == at_call:
                os.kill(os.getpid(), signum)
            return real(*a, **k)
        monkeypatch.setattr(train, "flow_matching_loss", loss)
        with pytest.raises(SystemExit) as stopped:
            train.main(args + (["--resume", str(run)] if step > 3 else []))
        assert stopped.value.code == 128 + signum
        assert load_checkpoint(run / "ckpt.pt")["step"] == step
        name = signal.Signals(signum).name
        assert f"stopped by {name} after step {step}: checkpoint" in (run / "log.txt").read_text()
        assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == handlers
        del stopped  # its traceback holds the stopped run's frame, and so its open run lock
        gc.collect()
    monkeypatch.setattr(train, "flow_matching_loss", real)
    train.main(args + ["--resume", str(run)])
    assert_same_weights(load_checkpoint(tiny_runs / "miro" / "ckpt.pt"), load_checkpoint(run / "ckpt.pt"))


# ----------------------------------------------------------------------------------------------------------------
# Non-finite loss: detected with its step; stop (exit 1, last checkpoint kept) or skip (counted, bounded).

def loss_bad_at(bad_calls, value=float("nan")):
    """train.flow_matching_loss made non-finite at its given (1-based) calls, i.e. steps without accumulation; the
    graph is kept, so the gradients are non-finite too."""
    real, calls = train.flow_matching_loss, []

    def loss(*a, **k):
        calls.append(1)
        out = real(*a, **k)
        return out * value if len(calls) in bad_calls else out
    return loss


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_runs, tmp_path, monkeypatch, value):
    monkeypatch.setattr(train, "flow_matching_loss", loss_bad_at({6}, value))
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_train_args(tmp_path / "runs", "--data-dir", str(data_dir(tiny_runs))))
    assert exit_info.value.code == 1
    run = tmp_path / "runs" / "miro"
    last = (run / "log.txt").read_text().strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss") and "at step 6; stopping (--on-nan stop)" in last
    kept = load_checkpoint(run / "ckpt.pt")
    assert kept["step"] == 4
    assert_same_weights(load_checkpoint(tiny_runs / "miro" / "ckpt_0000004.pt"), kept)


def test_non_finite_step_is_skipped_and_counted(tiny_runs, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "flow_matching_loss", loss_bad_at({3, 5}))
    train.main(tiny_train_args(tmp_path / "runs", "--data-dir", str(data_dir(tiny_runs)), "--on-nan", "skip",
                               "--keep-every", "1"))
    run = tmp_path / "runs" / "miro"
    log = (run / "log.txt").read_text()
    assert "step 3: non-finite loss nan / grad norm nan; skipped (1 in a row, 1 in all)" in log
    assert "step 5: non-finite loss nan / grad norm nan; skipped (1 in a row, 2 in all)" in log
    assert "done: 8 steps (2 skipped as non-finite)" in log
    before, skipped = load_checkpoint(run / "ckpt_0000004.pt"), load_checkpoint(run / "ckpt_0000005.pt")
    assert_same_weights(before, skipped)  # the skipped step left model and EMA alone ...
    assert before["optimizer"]["state"][0]["step"] == skipped["optimizer"]["state"][0]["step"]  # ... and Adam
    final = load_checkpoint(run / "ckpt.pt")
    assert final["nan_skipped"] == 2 and all(torch.isfinite(v).all() for v in final["model"].values())


def test_too_many_non_finite_steps_in_a_row_stop(tiny_runs, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "flow_matching_loss", loss_bad_at({3, 4, 5}))
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_train_args(tmp_path / "runs", "--data-dir", str(data_dir(tiny_runs)), "--on-nan", "skip",
                                   "--max-nan-skips", "2"))
    assert exit_info.value.code == 1
    last = (tmp_path / "runs" / "miro" / "log.txt").read_text().strip().splitlines()[-1]
    assert "at step 5; stopping (3 non-finite steps in a row)" in last


def test_nan_on_one_rank_stops_every_rank(tiny_runs, tmp_path):
    """Rank 1 alone sees a NaN loss: both ranks take the same decision (no hang), rank 0 reports it."""
    result = launch(2, tiny_train_args(tmp_path / "runs", "--data-dir", str(data_dir(tiny_runs))),
                    env={"RELIABILITY_NAN": "1:6"}, timeout=180)
    assert result.returncode != 0
    run = tmp_path / "runs" / "miro"
    assert "at step 6; stopping (--on-nan stop)" in (run / "log.txt").read_text()
    assert load_checkpoint(run / "ckpt.pt")["step"] == 4


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one clear line and exit status 2, nothing written.

@pytest.mark.parametrize("flags, message", [
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr must be > 0"),
    (["--ckpt-every", "0"], "--ckpt-every must be > 0"),
    (["--log-every", "-1"], "--log-every must be > 0"),
    (["--grad-clip", "0"], "--grad-clip must be > 0"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
    (["--text-dropout", "1.5"], "--text-dropout must be in [0, 1)"),
    (["--cfg", "-1"], "--cfg must be >= 0"),
    (["--cfg", "inf"], "--cfg must be >= 0 and finite"),
    (["--rewards", "alignment,alignment"], "--rewards names a reward twice"),
    (["--num-bins", "1"], "--num-bins must be >= 2"),
    (["--on-nan", "ignore"], "--on-nan: stop or skip"),
    (["--max-nan-skips", "-1"], "--max-nan-skips must be >= 0"),
    (["--rewards", "alignment,beauty"], "unknown reward(s) beauty"),
    (["--rewards", ","], "--rewards is empty"),
    (["--no-rewards", "--rewards", "alignment"], "--no-rewards trains the baseline, which takes no --rewards"),
    (["--batch-size", "8", "--grad-accum", "3"], "must be divisible by world size x grad accum = 3"),
    (["--device", "abacus"], "--device: "),
    pytest.param(["--device", "cuda"], "no CUDA GPU is visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")),
    (["--steps", "many"], "invalid int value: 'many'"),
])
def test_train_cli_errors(flags, message, capsys):
    assert message in cli_error(train.main, ["--preset", "tiny", *flags], capsys)


def test_train_unwritable_folders(tiny_runs, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a file where a folder should be: unwritable even for root
    line = cli_error(train.main, tiny_train_args(blocker / "runs", "--data-dir", str(data_dir(tiny_runs))), capsys)
    assert "cannot write the run folder" in line
    line = cli_error(train.main, tiny_train_args(tmp_path / "runs", "--data-dir", str(blocker / "data")), capsys)
    assert "cannot prepare the data" in line


def test_train_registry_reward_without_scores_in_the_built_in_data(tiny_runs, tmp_path, capsys):
    line = cli_error(train.main, tiny_train_args(tmp_path / "runs", "--data-dir", str(data_dir(tiny_runs)),
                                                 "--rewards", "alignment,clip"), capsys)
    assert "no clip scores in" in line and "rewards.py annotate" in line


def test_train_dataset_smaller_than_a_batch(tmp_path, capsys):
    line = cli_error(train.main, tiny_train_args(tmp_path / "runs", "--num-train", "4"), capsys)
    assert "the dataset has 4 samples, fewer than one global batch (8)" in line


@pytest.fixture
def bad_checkpoints(tiny_runs, tmp_path):
    """A truncated checkpoint, an empty one, a foreign torch file and a pickle that weights_only refuses."""
    good = (tiny_runs / "miro" / "ckpt.pt").read_bytes()
    files = {"truncated": good[: len(good) // 2], "empty": b""}
    for name, data in files.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "ckpt.pt").write_bytes(data)
    (tmp_path / "foreign").mkdir()
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign" / "ckpt.pt")
    (tmp_path / "pickle").mkdir()
    torch.save({"config": Path("x")}, tmp_path / "pickle" / "ckpt.pt")  # a class weights_only does not allow
    (tmp_path / "partial").mkdir()  # a MIRO checkpoint's config alone: samplable in principle, not resumable
    torch.save({"config": torch.load(tiny_runs / "miro" / "ckpt.pt", weights_only=True)["config"]},
               tmp_path / "partial" / "ckpt.pt")
    return tmp_path


def test_a_checkpoint_without_training_state_is_not_resumed(tiny_runs, bad_checkpoints, capsys):
    run = bad_checkpoints / "partial"
    line = cli_error(train.main, resume_args(tiny_runs, bad_checkpoints / "runs", run), capsys)
    assert "not a train.py checkpoint (no tokenizer, model, ema, optimizer, scheduler, step, bins, train)" in line
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.pt"]


def test_a_second_ctrl_c_interrupts_at_once():
    """The first signal only asks the loop to stop after its step; a Ctrl-C after it does not wait."""
    for first in (signal.SIGTERM, signal.SIGINT):
        with train.stop_requests() as stop:
            os.kill(os.getpid(), first)
            time.sleep(0.05)  # the handler runs between bytecodes, once the signal is delivered
            assert stop["signal"] == first
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)


@pytest.mark.parametrize("kind, train_message, sample_message", [
    ("truncated", "cannot read checkpoint", "cannot read checkpoint"),
    ("empty", "cannot read checkpoint", "cannot read checkpoint"),
    ("pickle", "cannot read checkpoint", "cannot read checkpoint"),
    ("foreign", "not a MIRO checkpoint (it holds a dict without a config dict)",
     "not a MIRO checkpoint (it holds a dict without a config dict)"),
])
def test_bad_checkpoint_files(tiny_runs, bad_checkpoints, kind, train_message, sample_message, capsys):
    run = bad_checkpoints / kind
    line = cli_error(train.main, resume_args(tiny_runs, bad_checkpoints / "runs", run), capsys)
    assert train_message in line and str(run) in line
    line = cli_error(sample.main, ["--ckpt", str(run), "--prompt", "a photo of a circle", "--steps", "1"], capsys)
    assert sample_message in line
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.pt"]  # nothing written beside it


@pytest.mark.parametrize("flags, message", [
    (["--preset", "cpu"], "a resumed run keeps its settings, but --preset cpu (the run's: tiny)"),
    (["--rewards", "alignment"], "--rewards alignment (the run's: alignment,sharpness,cleanliness,contrast)"),
    (["--no-rewards"], "--rewards none (the run's: alignment,"),
])
def test_resume_with_another_config(tiny_runs, tmp_path, flags, message, capsys):
    line = cli_error(train.main, [*resume_args(tiny_runs, tmp_path / "runs", tiny_runs / "miro"), *flags], capsys)
    assert message in line


@pytest.mark.parametrize("flags, message", [
    (["--preset", "cpu"], "the checkpoint is another model: image_size 16 (--preset cpu: 32)"),
    (["--preset", "cpu"], "; resume with --preset tiny"),
])
def test_resume_an_older_checkpoint_with_another_config(tiny_runs, tmp_path, flags, message, capsys):
    """A checkpoint without saved run settings (train.py before 2026-12-06): its model config tells the preset."""
    old = load_checkpoint(tiny_runs / "miro" / "ckpt.pt")
    del old["run"]
    (tmp_path / "runs" / "old").mkdir(parents=True)
    torch.save(old, tmp_path / "runs" / "old" / "ckpt.pt")
    line = cli_error(train.main, [*resume_args(tiny_runs, tmp_path / "runs", tmp_path / "runs" / "old"), *flags],
                     capsys)
    assert message in line


def test_resume_keeps_its_bins_when_the_data_folder_has_others(tiny_runs, tmp_path):
    """Documented behaviour: a resumed run keeps the checkpoint's bin edges (reward values keep their meaning) and
    logs a warning when the data folder's bins.json has other edges (here refitted with 16 bins)."""
    data = tmp_path / "data"
    shutil.copytree(data_dir(tiny_runs), data)
    run = tmp_path / "runs" / "miro"
    run.mkdir(parents=True)
    shutil.copy(tiny_runs / "miro" / "ckpt_0000004.pt", run / "ckpt.pt")
    train.main([*tiny_train_args(tmp_path / "runs", "--data-dir", str(data), "--resume", str(run)),
                "--num-bins", "16"])
    log = (run / "log.txt").read_text()
    assert f"warning: {data / 'bins.json'} has other bin edges for ['alignment', 'sharpness'" in log
    final = load_checkpoint(run / "ckpt.pt")
    assert final["bins"] == load_checkpoint(tiny_runs / "miro" / "ckpt.pt")["bins"]
    assert_same_weights(load_checkpoint(tiny_runs / "miro" / "ckpt.pt"), final)  # same values, same training


@pytest.mark.parametrize("flags, message", [
    (["--n", "0"], "--n must be > 0"),
    (["--steps", "-3"], "--steps must be > 0"),
    (["--cfg", "-0.5"], "--cfg must be >= 0"),
    (["--rewards", "alignment=1.5"], "outside [0, 1]"),
    (["--rewards", "alignment=nan"], "outside [0, 1]"),
    (["--rewards", "alignment"], "is not of the form name=value"),
    (["--rewards", "alignment=high"], "is not a number"),
    (["--rewards", "beauty=1"], "unknown reward 'beauty'"),
    (["--prompts-file", "/nonexistent/prompts.txt"], "cannot read --prompts-file"),
])
def test_sample_cli_errors(tiny_runs, tmp_path, flags, message, capsys):
    argv = ["--ckpt", str(tiny_runs / "miro"), "--prompt", "a photo of a circle", "--steps", "1", "--n", "1",
            "--out", str(tmp_path / "x.png"), *flags]
    assert message in cli_error(sample.main, argv, capsys)
    assert not (tmp_path / "x.png").exists()


def test_sample_reward_that_cannot_load_and_words_the_tokenizer_does_not_know(tiny_runs, tmp_path, monkeypatch,
                                                                               capsys):
    import rewards

    def offline(name, **options):
        raise RuntimeError(f"Failed to download weights for {name}\n(no network)")
    monkeypatch.setattr(rewards, "load_reward", offline)
    base = ["--ckpt", str(tiny_runs / "miro"), "--steps", "1", "--n", "1", "--out", str(tmp_path / "x.png")]
    line = cli_error(sample.main, [*base, "--prompt", "a circle", "--best-of", "2", "--select-by", "clip"], capsys)
    assert "--select-by clip: Failed to download weights for clip (no network)" in line
    monkeypatch.undo()
    sample.main([*base, "--prompt", "a zebra riding a circle"])
    assert "read as <unk>: riding, zebra" in capsys.readouterr().out


def test_sample_unreadable_inputs_and_unwritable_output(tiny_runs, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a photo of a \xff\xfe circle\n")  # not UTF-8
    base = ["--ckpt", str(tiny_runs / "miro"), "--steps", "1", "--n", "1"]
    assert "cannot read --prompts-file" in cli_error(sample.main, [*base, "--prompts-file", str(prompts)], capsys)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = cli_error(sample.main, [*base, "--prompt", "a photo of a circle", "--out", str(blocker / "x.png")],
                     capsys)
    assert "cannot write" in line


# ----------------------------------------------------------------------------------------------------------------
# Run as a script (by torchrun or subprocess above): install the RELIABILITY_* faults, then train.

def _install_faults():
    rank = int(os.environ.get("RANK", "0"))
    watch = os.environ.get("RELIABILITY_WATCH")
    if watch and rank > 0:
        watched = os.path.realpath(watch)

        def audit(event, args):
            writes = {"os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.truncate"}
            opening = event == "open" and (any(c in str(args[1]) for c in "wax+") or (args[2] or 0) & 3)
            if event in writes or opening:
                path = os.path.realpath(os.fsdecode(args[0])) if isinstance(args[0], (str, bytes, os.PathLike)) else ""
                if path.startswith(watched):
                    raise PermissionError(f"rank {rank} wrote to {path} ({event})")
        sys.addaudithook(audit)

    bad = {int(s) for r, s in (item.split(":") for item in os.environ.get("RELIABILITY_NAN", "").split(",") if item)
           if int(r) == rank}
    if bad:
        train.flow_matching_loss = loss_bad_at(bad)

    torn_at = int(os.environ.get("RELIABILITY_TORN_SAVE", "0"))
    if torn_at:
        real_save, saves = torch.save, []

        def torn_save(obj, f, *a, **k):
            saves.append(1)
            if len(saves) < torn_at:
                return real_save(obj, f, *a, **k)
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = torn_save


if __name__ == "__main__":
    _install_faults()
    train.main(sys.argv[1:])
