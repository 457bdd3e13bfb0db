"""Training: the flow objective, the schedule, the EMA, and a tiny run that resumes identically."""
import copy
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import data
import rewards
import train
from conftest import tiny_train_args
from model import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_flow_matching_interpolant_and_target():
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    seen = {}

    def model(x_t, t_in, **condition):
        seen["x_t"], seen["t"], seen["condition"] = x_t, t_in, condition
        return torch.zeros_like(x_t)

    loss = train.flow_matching_loss(model, x0, t, noise, text="caption")
    expected_x_t = torch.stack([x0[0], 0.75 * x0[1] + 0.25 * noise[1], 0.5 * (x0[2] + noise[2]), noise[3]])
    assert torch.allclose(seen["x_t"], expected_x_t)  # t = 0 is data, t = 1 is noise
    assert seen["t"] is t and seen["condition"] == {"text": "caption"}
    assert torch.allclose(loss, ((noise - x0) ** 2).mean())  # zero prediction: the loss is |eps - x0|^2
    exact = train.flow_matching_loss(lambda x_t, t_in: noise - x0, x0, t, noise)
    assert exact.item() == 0.0  # predicting v = eps - x0 exactly gives zero loss


def test_timestep_distributions():
    g = torch.Generator().manual_seed(0)
    t = train.sample_timesteps(100_000, "logit_normal", g)
    assert 0 < t.min() and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.01 and abs(t.std().item() - 0.21) < 0.01  # sigmoid(N(0,1))
    u = train.sample_timesteps(100_000, "uniform", g)
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.std().item() - (1 / 12) ** 0.5) < 0.01
    with pytest.raises(ValueError):
        train.sample_timesteps(4, "cosine", g)


def test_lr_schedule():
    assert train.lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert train.lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert train.lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert train.lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert train.lr_factor(100, 10, 100) == pytest.approx(0.0)


def test_ema_update_by_hand():
    model, ema = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0), model.bias.fill_(2.0), ema.weight.fill_(0.0), ema.bias.fill_(0.0)
    train.update_ema(ema, model, decay=0.9)
    assert torch.allclose(ema.weight, torch.full((1, 2), 0.1)) and torch.allclose(ema.bias, torch.tensor([0.2]))


def test_ema_decay_warm_up():
    assert train.ema_decay(0.999, 0) == pytest.approx(0.1)
    assert train.ema_decay(0.999, 90) == pytest.approx(0.91)
    assert train.ema_decay(0.999, 100_000) == 0.999


def test_a_resumed_optimizer_keeps_this_devices_implementation():
    """Fused AdamW on CUDA, the default elsewhere; a checkpoint's state crosses between them (torch alone would
    keep the checkpoint's choice) and continues as the same optimizer would (fused AdamW also runs on a CPU)."""
    assert train.make_optimizer(torch.nn.Linear(2, 2), 1e-3, 0.0, "cpu").param_groups[0]["fused"] in (None, False)

    def trained(optimizer, model, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(5, 4, generator=g)).square().sum().backward()
            optimizer.step()
        return model.weight.detach().clone()

    def pair(fused):
        model = torch.nn.Linear(4, 3)
        torch.nn.init.constant_(model.weight, 0.5)
        return model, torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.99), fused=fused)

    for saved_fused, resumed_fused in [(True, False), (False, True)]:
        model, optimizer = pair(saved_fused)
        trained(optimizer, model, 3, seed=0)
        state, weights = copy.deepcopy(optimizer.state_dict()), copy.deepcopy(model.state_dict())
        reference = trained(optimizer, model, 2, seed=1)
        model, optimizer = pair(resumed_fused)
        model.load_state_dict(weights)
        train.load_optimizer_state(optimizer, state)
        assert state["param_groups"][0]["fused"] == saved_fused  # the checkpoint's dict is left as it was
        assert bool(optimizer.param_groups[0]["fused"]) == resumed_fused
        assert torch.allclose(trained(optimizer, model, 2, seed=1), reference, atol=1e-6)


def test_resume_continues_identically(tiny_runs, tmp_path):
    """8 steps straight == 4 steps, a restart from the step-4 checkpoint, 4 more steps."""
    straight = tiny_runs / "miro"
    final = load_checkpoint(straight / "ckpt.pt")
    assert final["step"] == 8

    resumed = tmp_path / "runs" / "miro"
    resumed.mkdir(parents=True)
    shutil.copy(straight / "ckpt_0000004.pt", resumed / "ckpt.pt")
    train.main(tiny_train_args(tmp_path / "runs", "--data-dir", str(tiny_runs.parent / "data"),
                               "--resume", str(resumed)))
    again = load_checkpoint(resumed / "ckpt.pt")
    assert again["step"] == 8
    for key in ("model", "ema"):
        for name, value in final[key].items():
            assert torch.equal(value, again[key][name]), f"{key}.{name} differs after resume"
    mid = load_checkpoint(straight / "ckpt_0000004.pt")
    assert any(not torch.equal(v, final["model"][k]) for k, v in mid["model"].items())  # training moved them


def test_the_next_step_prepared_in_a_thread_trains_the_same_run(tiny_runs, tmp_path, monkeypatch):
    """On CUDA the loop prepares step k + 1 in a background thread while step k runs; on a CPU in line. Forced onto
    the thread here (and resumed mid-run), the run's weights are those of the run prepared in line."""
    from concurrent.futures import ThreadPoolExecutor
    assert isinstance(train.step_ahead("cuda"), ThreadPoolExecutor)  # on the rank's device (no GPU to start one)
    assert isinstance(train.step_ahead("cpu"), train.InLine)
    assert isinstance(train.step_ahead("cuda", host_only=False), train.InLine)  # a frozen encoder runs
    threads = set()

    class Ahead(ThreadPoolExecutor):
        def submit(self, fn, *args):
            return super().submit(lambda *a: threads.add(threading.get_ident()) or fn(*a), *args)

    monkeypatch.setattr(train, "step_ahead", lambda device, host_only: Ahead(max_workers=1))
    resumed = tmp_path / "runs" / "miro"
    resumed.mkdir(parents=True)
    shutil.copy(tiny_runs / "miro" / "ckpt_0000004.pt", resumed / "ckpt.pt")
    train.main(tiny_train_args(tmp_path / "runs", "--resume", str(resumed)))
    assert threads and threading.get_ident() not in threads
    final, again = load_checkpoint(tiny_runs / "miro" / "ckpt.pt"), load_checkpoint(resumed / "ckpt.pt")
    assert again["step"] == 8
    for key in ("model", "ema"):
        assert all(torch.equal(value, again[key][name]) for name, value in final[key].items()), key


def test_resume_alone_continues_the_run_as_trained(tiny_runs, tmp_path, capsys):
    """A run with non-default seed, rewards and schedule, resumed with --resume alone, ends where the uninterrupted
    run ends; a flag that contradicts the run is a one-line error; --steps may lengthen it."""
    flags = tiny_train_args(tmp_path / "runs", "--data-dir", str(tiny_runs.parent / "data"), "--seed", "3",
                            "--lr", "5e-4", "--rewards", "alignment,contrast", "--text-dropout", "0.2")
    train.main(flags)
    straight = load_checkpoint(tmp_path / "runs" / "miro" / "ckpt.pt")
    resumed = tmp_path / "again"
    resumed.mkdir()
    shutil.copy(tmp_path / "runs" / "miro" / "ckpt_0000004.pt", resumed / "ckpt.pt")
    train.main(["--resume", str(resumed)])
    again = load_checkpoint(resumed / "ckpt.pt")
    assert again["step"] == 8 and again["train"] == straight["train"] and again["run"] == straight["run"]
    for name, value in straight["model"].items():
        assert torch.equal(value, again["model"][name]), f"{name} differs after resume"
    for bad, message in [(["--seed", "0"], "--seed 0 (the run's: 3)"), (["--lr", "1e-3"], "--lr 0.001 (the run's: "),
                         (["--num-train", "96"], "--num-train 96 (the run's: 48)"),
                         (["--no-rewards"], "--rewards none (the run's: alignment,contrast)"),
                         (["--steps", "6"], "the run is at step 8, past --steps 6"),
                         (["--name", "other"], f"continues in its own folder {resumed}, not in {tmp_path / 'other'}"),
                         (["--runs-dir", str(tmp_path / "elsewhere")], "continues in its own folder")]:
        with pytest.raises(SystemExit):
            train.main(["--resume", str(resumed), *bad])
        assert message in capsys.readouterr().err
    kept = tmp_path / "runs" / "miro" / "ckpt_0000004.pt"  # a kept copy, in the folder of the finished run
    with pytest.raises(SystemExit):
        train.main(["--resume", str(kept)])
    assert "holds the run at step 8, which this resume from step 4 would overwrite" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "runs" / "miro" / "ckpt.pt")["step"] == 8
    train.main(["--resume", str(resumed), "--steps", "8", "--runs-dir", str(tmp_path), "--name", "again"])
    assert "already at --steps: nothing to train" in capsys.readouterr().out  # its own folder, named: fine
    train.main(["--resume", str(resumed), "--steps", "10", "--log-every", "1"])
    assert load_checkpoint(resumed / "ckpt.pt")["step"] == 10
    # The longer cosine holds from the first resumed step on (the optimizer had the old schedule's final lr, 0).
    log, tc = (resumed / "log.txt").read_text(), straight["train"]
    assert "--steps 8 -> 10: the cosine schedule now spans 10 steps" in log
    first_lr = float(re.search(r"step +9/10 .* lr (\S+)", log).group(1))
    assert first_lr == pytest.approx(tc["lr"] * train.lr_factor(8, tc["warmup"], 10), rel=1e-2) and first_lr > 0


def test_baseline_has_no_reward_tokens(tiny_runs):
    ckpt = load_checkpoint(tiny_runs / "baseline" / "ckpt.pt")
    assert tuple(ckpt["config"]["reward_names"]) == () and ckpt["bins"] is None
    assert ckpt["train"]["text_dropout"] > 0  # the baseline needs empty captions for text CFG


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be > 0"),
    (["--rewards", "alignment,beauty"], "unknown reward(s) beauty"),
    (["--batch-size", "7", "--grad-accum", "2"], "must be divisible"),
    (["--time-sampling", "cosine"], "logit_normal or uniform"),
    (["--lr", "inf"], "--lr must be > 0 and finite"),
    (["--lr", "nan"], "--lr must be > 0 and finite"),
    (["--weight-decay", "inf"], "--weight-decay must be >= 0 and finite"),
    (["--seed", "99999999999999999999"], "argument --seed: must be in [0, "),  # was an overflow after the data setup
    (["--data-seed", "-1"], "argument --data-seed: must be in [0, "),
])
def test_cli_errors_are_one_line(flags, message):
    result = subprocess.run([sys.executable, "train.py", *flags], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_each_rank_gets_its_own_gpu_and_the_backend_of_its_device():
    assert data.rank_device("cuda", 3, 4) == ("cuda:3", "nccl")
    assert data.rank_device("cpu", 3, 4) == ("cpu", "gloo")  # gloo on CPU even where CUDA exists
    assert data.rank_device("cuda:1", 0, 1) == ("cuda:1", "nccl")
    with pytest.raises(ValueError, match="all 2 ranks on one GPU"):
        data.rank_device("cuda:1", 0, 2)
    with pytest.raises(ValueError, match="not a torch device"):
        data.rank_device("gpu", 0, 1)


def test_ranks_join_with_a_timeout_longer_than_rank_0s_setup(tmp_path, monkeypatch):
    """Rank 0 alone builds and annotates the built-in world while the others wait at a barrier: the process group
    must outlast that (NCCL's default is 10 min)."""
    from datetime import timedelta
    asked = {}

    def joined(device, timeout=None):
        asked["timeout"] = timeout
        raise SystemExit(0)
    monkeypatch.setattr(train.data, "init_distributed", joined)
    with pytest.raises(SystemExit):
        train.main(tiny_train_args(tmp_path / "runs"))
    assert asked["timeout"] is not None and asked["timeout"] >= timedelta(minutes=30)


def test_logged_mfu_counts_the_text_tokens_each_batch_ran(tmp_path, monkeypatch):
    """MFU (logged where the GPU's peak is known, here faked) = 3 x the forward FLOPs at the batches' own text
    length x images/s / peak: frozen-encoder batches are trimmed to their longest caption (here: 3 tokens). A fake
    clock (0.01 s per reading) makes the logged rate exact: 2 steps of 8 images per log, 1600 img/s."""
    import itertools
    import re
    import types
    from model import MIRO, ModelConfig
    monkeypatch.setattr(train, "peak_flops", lambda device: 1e9)
    clock = itertools.count(0.0, 0.01)
    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: next(clock)))
    text = train.ModelInputs.text
    monkeypatch.setattr(train.ModelInputs, "text", lambda self, *a: tuple(x[:, :3] for x in text(self, *a)))
    train.main(tiny_train_args(tmp_path / "runs", "--steps", "4", "--log-every", "2", "--keep-every", "0"))
    config = load_checkpoint(tmp_path / "runs" / "miro" / "ckpt.pt")["config"]
    model = MIRO(ModelConfig(**{**config, "reward_names": tuple(config["reward_names"])}))
    logged = re.findall(r"(\d+) img/s  MFU ([\d.]+)%", (tmp_path / "runs" / "miro" / "log.txt").read_text())
    assert [int(images_per_s) for images_per_s, _ in logged] == [1600, 1600]
    for _, mfu in logged:
        assert float(mfu) == pytest.approx(100 * 3 * model.flops_per_image(3) * 1600 / 1e9, abs=0.051)
        assert model.flops_per_image(3) < 0.9 * model.flops_per_image()  # so the padded count would show


def test_a_preset_made_for_latents_trains_on_pixels_without_a_vae(tmp_path, monkeypatch):
    """The paper preset expects 4-channel SDXL latents; without --vae it trains on the RGB pixels (here the tiny
    preset with the paper's 4 input channels stands in for it: a 364M-parameter run does not fit a test)."""
    import dataclasses
    latent_tiny = train.get_config("tiny", in_channels=4)
    monkeypatch.setattr(train, "get_config", lambda name, **kw: dataclasses.replace(latent_tiny, **kw))
    train.main(tiny_train_args(tmp_path / "runs", "--steps", "2", "--keep-every", "0"))
    assert load_checkpoint(tmp_path / "runs" / "miro" / "ckpt.pt")["config"]["in_channels"] == 3


def test_a_run_folder_has_one_writer(tiny_runs, tmp_path, capsys):
    """A new run never overwrites a run folder that holds a checkpoint, and a second process cannot train in a
    folder whose lock another one holds (the lock dies with its process: nothing to clean up after a kill)."""
    import fcntl
    runs = tmp_path / "runs"
    shutil.copytree(tiny_runs / "miro", runs / "miro")
    with pytest.raises(SystemExit):
        train.main(tiny_train_args(runs, "--data-dir", str(tiny_runs.parent / "data")))
    assert f"{runs / 'miro'} already holds a run: continue it with --resume" in capsys.readouterr().err
    assert load_checkpoint(runs / "miro" / "ckpt.pt")["step"] == 8  # untouched
    with open(runs / "miro" / ".train.lock", "a") as other:  # another process training that run
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit):
            train.main(tiny_train_args(runs, "--data-dir", str(tiny_runs.parent / "data"), "--resume",
                                       str(runs / "miro"), "--steps", "9"))
        assert "another process is training" in capsys.readouterr().err
    train.main(tiny_train_args(runs, "--data-dir", str(tiny_runs.parent / "data"), "--resume", str(runs / "miro"),
                               "--steps", "9"))  # once it has stopped
    assert load_checkpoint(runs / "miro" / "ckpt.pt")["step"] == 9


def test_the_model_is_fed_each_samples_binned_rewards(tiny_runs, tmp_path, monkeypatch):
    """Training conditions each sample on its own reward bin values (the checkpoint's bins of its annotations)."""
    seen_keys, seen_rewards = [], []
    collate, loss = data.collate, train.flow_matching_loss
    monkeypatch.setattr(data, "collate", lambda batch: seen_keys.append([s[3][0] for s in batch]) or collate(batch))
    monkeypatch.setattr(train, "flow_matching_loss",
                        lambda *a, **condition: seen_rewards.append(condition["rewards"]) or loss(*a, **condition))
    data_dir = tiny_runs.parent / "data"
    train.main(tiny_train_args(tmp_path / "runs", "--data-dir", str(data_dir), "--steps", "2"))
    ckpt = load_checkpoint(tmp_path / "runs" / "miro" / "ckpt.pt")
    names, bins = ckpt["config"]["reward_names"], rewards.RewardBins.from_dict(ckpt["bins"])
    annotations = rewards.load_annotations(data_dir / rewards.ANNOTATIONS)
    assert len(seen_keys) == len(seen_rewards) == 2
    for keys, fed in zip(seen_keys, seen_rewards):
        expected = torch.from_numpy(bins.values(data.sample_scores(annotations, keys, names)))
        assert torch.equal(fed, expected)
        assert len(fed.unique(dim=0)) > 1  # the values differ between samples


def test_training_lowers_the_flow_matching_loss(tiny_runs, tmp_path):
    """40 steps take the tiny model's loss on a fixed batch of training samples (fixed t and noise) well below that
    of its initialisation (whose zero output layer predicts v = 0): the optimizer descends the objective."""
    from model import MIRO, ModelConfig, model_from_checkpoint
    data_dir = tiny_runs.parent / "data"
    train.main(tiny_train_args(tmp_path / "runs", "--data-dir", str(data_dir), "--steps", "40", "--keep-every", "0"))
    ckpt = load_checkpoint(tmp_path / "runs" / "miro" / "ckpt.pt")
    trained, tokenizer = model_from_checkpoint(ckpt, ema=False)
    torch.manual_seed(0)
    initial = MIRO(ModelConfig(**ckpt["config"])).eval()
    samples = data.ImageTextSamples(data_dir)
    names = ckpt["config"]["reward_names"]
    scores = data.sample_scores(rewards.load_annotations(data_dir / rewards.ANNOTATIONS), samples.keys, names)
    values = rewards.RewardBins.from_dict(ckpt["bins"]).values(scores)
    images, captions, rewards_fed, _ = data.collate([data.MiroDataset(samples, values)[i] for i in range(16)])
    g = torch.Generator().manual_seed(1)
    t, noise = torch.rand(16, generator=g), torch.randn(images.shape, generator=g)
    text, mask = tokenizer(captions)
    with torch.no_grad():
        before, after = (train.flow_matching_loss(m, images, t, noise, text=text, text_mask=mask, rewards=rewards_fed)
                         for m in (initial, trained))
    assert after < 0.8 * before, (before.item(), after.item())


def test_text_and_reward_dropout_reach_the_model(tiny_runs, tmp_path, monkeypatch):
    """The step's coins (train.step_draws) are applied: a caption that loses its coin reaches the model as the
    empty caption (no text token), and a dropped reward as drop_rewards."""
    fed = []
    loss = train.flow_matching_loss
    monkeypatch.setattr(train, "flow_matching_loss",
                        lambda *a, **condition: fed.append(condition) or loss(*a, **condition))
    train.main(tiny_train_args(tmp_path / "runs", "--data-dir", str(tiny_runs.parent / "data"), "--steps", "2",
                               "--text-dropout", "0.5", "--reward-dropout", "0.5", "--keep-every", "0"))
    tc = train.TrainConfig(**load_checkpoint(tmp_path / "runs" / "miro" / "ckpt.pt")["train"])
    assert len(fed) == 2
    for step, condition in enumerate(fed):
        _, _, keep_text, drop_rewards = train.step_draws(0, step, 8, (3, 16, 16), 4, tc)
        assert 0 < keep_text.sum() < 8 and drop_rewards.any() and not drop_rewards.all()  # both kinds of coin
        assert torch.equal(condition["text_mask"].any(1), keep_text)  # kept captions have words, dropped none
        assert torch.equal(condition["drop_rewards"], drop_rewards)
