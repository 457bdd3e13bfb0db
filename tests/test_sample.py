"""The sampler: guidance formula, Euler integration on an analytic flow, reward targets."""
import pytest
import torch

from sample import cfg_combine, euler_sample, parse_reward_targets


def test_guidance_formula_by_hand():
    v_pos = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    v_neg = torch.tensor([[0.0, 1.0, 0.5, -1.0]])
    # (1 + w) v_pos - w v_neg with w = 2, written out for every channel.
    expected = torch.tensor([[3.0, -8.0, 0.5, 11.0]])
    assert torch.equal(cfg_combine(v_pos, v_neg, 2.0), expected)
    assert torch.equal(cfg_combine(v_pos, v_neg, 0.0), v_pos)  # w = 0 is no guidance
    assert torch.equal(cfg_combine(v_pos, v_pos, 7.0), v_pos)  # equal branches: guidance is a no-op


def gaussian_velocity(mu, sigma):
    """Exact v(x, t) = E[eps - x0 | x_t = x] for x0 ~ N(mu, sigma^2), x_t = (1 - t) x0 + t eps.

    (x_t, eps - x0) are jointly Gaussian: E[v] = -mu, Cov(x_t, v) = t - (1 - t) sigma^2,
    Var(x_t) = (1 - t)^2 sigma^2 + t^2, so v = -mu + Cov / Var * (x - (1 - t) mu).
    """
    def velocity(x, t):
        t = t.view(-1, *([1] * (x.dim() - 1)))
        a = 1 - t
        return -mu + (t - a * sigma**2) / (a**2 * sigma**2 + t**2) * (x - a * mu)
    return velocity


def test_euler_reproduces_gaussian_target():
    mu, sigma = torch.tensor([1.5, -0.5]), torch.tensor([0.3, 2.0])
    noise = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = euler_sample(gaussian_velocity(mu.double(), sigma.double()), noise, steps=200)
    assert torch.allclose(x0.mean(0), mu.double(), atol=0.02)
    assert torch.allclose(x0.std(0), sigma.double(), rtol=0.02)


def test_euler_direction_and_step_count():
    calls = []

    def velocity(x, t):
        calls.append(t[0].item())
        return torch.ones_like(x)

    x = euler_sample(velocity, torch.zeros(3, 1), steps=4)
    assert calls == [1.0, 0.75, 0.5, 0.25]  # from noise (t = 1) towards data
    assert torch.allclose(x, -torch.ones(3, 1))  # dx/dt = 1 integrated from t = 1 to 0


def test_reward_targets():
    names = ["alignment", "sharpness", "contrast"]
    assert parse_reward_targets("", names, 1.0).tolist() == [1.0, 1.0, 1.0]
    assert parse_reward_targets("sharpness=0.25", names, 1.0).tolist() == [1.0, 0.25, 1.0]
    assert parse_reward_targets("alignment=0, contrast=1", names, 0.0).tolist() == [0.0, 0.0, 1.0]
    for spec, message in [("beauty=1", "unknown reward 'beauty'"), ("alignment=1.5", r"outside \[0, 1\]"),
                          ("alignment", "name=value"), ("alignment=high", "not a number"),
                          ("alignment=1,alignment=0", "two targets")]:
        with pytest.raises(ValueError, match=message):
            parse_reward_targets(spec, names, 1.0)
    with pytest.raises(ValueError, match="without rewards"):
        parse_reward_targets("alignment=1", [], 1.0)


# ----------------------------------------------------------------------------------------------------------------
# With a real (tiny) checkpoint.

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import sample  # noqa: E402
from model import load_checkpoint, model_from_checkpoint  # noqa: E402
from rewards import load_reward  # noqa: E402
from sample import best_of_n, generate, to_uint8  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_sample(*flags):
    return subprocess.run([sys.executable, "sample.py", *flags], cwd=ROOT, capture_output=True, text=True)


def test_same_seed_same_images_and_one_forward_per_step(tiny_runs):
    model, tokenizer = model_from_checkpoint(load_checkpoint(tiny_runs / "miro" / "ckpt.pt"))
    with torch.no_grad():  # make the zero-initialised output layer non-trivial so images depend on everything
        model.final_layer.linear.weight.normal_(0, 0.1)
    calls = []
    model.denoise = (lambda f: lambda x, *a: calls.append(x.shape[0]) or f(x, *a))(model.denoise)
    prompts = ["a photo of a red circle", "a photo of two blue squares"]
    R = len(model.cfg.reward_names)
    pos, neg = torch.ones(2, R), torch.zeros(2, R)
    a = generate(model, tokenizer, prompts, pos, neg, cfg=2.0, steps=5, seed=3)
    assert calls == [4] * 5  # both branches of both prompts in one batched forward per Euler step
    b = generate(model, tokenizer, prompts, pos, neg, cfg=2.0, steps=5, seed=3)
    c = generate(model, tokenizer, prompts, pos, neg, cfg=2.0, steps=5, seed=4)
    d = generate(model, tokenizer, prompts, pos, pos, cfg=2.0, steps=5, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, d)  # the negative reward targets change the guided images


def test_bf16_runs_the_network_under_autocast_and_integrates_in_float32(tiny_runs):
    """sample.py, evaluate.py and train.py's previews share model.uses_bf16: bf16 autocast by default on CUDA only."""
    from model import uses_bf16
    assert uses_bf16(None, "cuda:1") and not uses_bf16(None, "cpu") and not uses_bf16("fp32", "cuda")
    assert uses_bf16("bf16", torch.device("cpu"))
    model, tokenizer = model_from_checkpoint(load_checkpoint(tiny_runs / "miro" / "ckpt.pt"))
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(0, 0.1)
    dtypes = []
    model.denoise = (lambda f: lambda *a: (lambda v: dtypes.append(v.dtype) or v)(f(*a)))(model.denoise)
    prompts, R = ["a photo of a red circle", "a photo of two blue squares"], len(model.cfg.reward_names)
    pos, neg = torch.ones(2, R), torch.zeros(2, R)
    fp32 = generate(model, tokenizer, prompts, pos, neg, cfg=2.0, steps=5, seed=3)
    assert set(dtypes) == {torch.float32}
    dtypes.clear()
    bf16 = generate(model, tokenizer, prompts, pos, neg, cfg=2.0, steps=5, seed=3, bf16=True)
    assert set(dtypes) == {torch.bfloat16} and bf16.dtype == torch.float32
    assert 0 < (bf16 - fp32).abs().max() < 0.1


def test_best_of_n_keeps_the_highest_reward():
    candidates = torch.linspace(-1, 1, 6).view(2, 3, 1, 1, 1).expand(2, 3, 3, 2, 2)

    def brightness(images, captions):
        return images.mean(dim=(1, 2, 3))

    best, scores = best_of_n(candidates, ["a", "b"], brightness)
    assert torch.equal(best, candidates[:, 2]) and torch.allclose(scores, (candidates[:, 2, 0, 0, 0] + 1) / 2)

    def caption_dependent(images, captions):  # "a" asks for bright, "b" for dark: each candidate needs its prompt
        return images.mean(dim=(1, 2, 3)) * torch.tensor([1.0 if c == "a" else -1.0 for c in captions])

    best, _ = best_of_n(candidates, ["a", "b"], caption_dependent)
    assert torch.equal(best[0], candidates[0, 2]) and torch.equal(best[1], candidates[1, 0])


def test_cli_writes_grid_and_single_images(tiny_runs, tmp_path):
    out = tmp_path / "grid.png"
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "0007.png").write_bytes(b"")  # an earlier, larger call's: removed, not mixed in
    result = run_sample("--ckpt", str(tiny_runs / "miro"), "--prompt", "a photo of two red circles", "--n", "2",
                        "--steps", "3", "--rewards", "alignment=1", "--best-of", "2", "--select-by", "alignment",
                        "--precision", "bf16", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.exists() and sorted(p.name for p in (tmp_path / "grid").iterdir()) == ["0000.png", "0001.png"]


@pytest.mark.parametrize("run, flags, message", [
    ("miro", ["--rewards", "beauty=1"], "unknown reward 'beauty'; this checkpoint supports: alignment, sharpness, cleanliness"),
    ("miro", ["--rewards", "alignment=2"], "outside [0, 1]"),
    ("miro", ["--neg-rewards", "sharpness=-0.5"], "outside [0, 1]"),
    ("miro", ["--cfg", "-1"], "--cfg must be >= 0"),
    ("miro", ["--cfg", "nan"], "--cfg must be >= 0 and finite"),
    ("miro", ["--steps", "0"], "--steps must be > 0"),
    ("miro", ["--best-of", "2"], "--best-of needs --select-by"),
    ("miro", ["--best-of", "2", "--select-by", "beauty"], "unknown reward 'beauty'"),
    ("baseline", ["--rewards", "alignment=1"], "trained without rewards"),
    ("miro", ["--select-by", "alignment"], "--select-by picks among --best-of candidates"),
    ("miro", ["--out", "grid.jpg"], "the grid is a PNG, so the name must end in .png"),
    ("missing", [], "no checkpoint at"),
    ("miro", ["--seed", "99999999999999999999"], "argument --seed: must be in [0, "),  # was a torch overflow
    ("miro", ["--seed", "-1"], "argument --seed: must be in [0, "),
])
def test_cli_errors_are_one_line(tiny_runs, tmp_path, run, flags, message):
    result = run_sample("--ckpt", str(tiny_runs / run), "--prompt", "a photo of a circle", "--steps", "2",
                        "--out", str(tmp_path / "x.png"), *flags)
    assert result.returncode == 2, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]  # argparse: the usage, then one error line
    assert last_line.startswith("sample.py: error: ") and message in last_line, result.stderr
    assert "Traceback" not in result.stderr


def test_cli_refuses_a_file_that_is_not_a_miro_checkpoint(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "t.pt")  # was an IndexError deep in model_from_checkpoint
    result = run_sample("--ckpt", str(tmp_path / "t.pt"), "--prompt", "a photo of a circle", "--steps", "2",
                        "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{tmp_path / 't.pt'}: not a MIRO checkpoint (it holds a Tensor)" in result.stderr.splitlines()[-1]


def test_an_exported_run_samples_as_its_checkpoint(tiny_runs, tmp_path, capsys):
    """model.py export: one .safetensors file (no pickle, no optimizer state) that load_checkpoint reads back as the
    run's checkpoint: the same images in float32, close in bfloat16, and every entry sampling and evaluation read."""
    import model as M
    import train
    run = tiny_runs / "miro"
    M.main(["export", "--ckpt", str(run)])
    exported = run / "miro_step0000008.safetensors"
    assert f"{exported}: the ema weights of {run / 'ckpt.pt'} at step 8 in float32" in capsys.readouterr().out
    M.main(["export", "--ckpt", str(run), "--out", str(tmp_path / "bf16" / "m.safetensors"), "--dtype", "bfloat16"])
    M.main(["export", "--ckpt", str(run), "--out", str(tmp_path / "raw.safetensors"), "--weights", "model"])
    assert not list(run.glob("*.tmp"))
    assert (tmp_path / "bf16" / "m.safetensors").stat().st_size < 0.6 * exported.stat().st_size
    ckpt = load_checkpoint(run / "ckpt.pt")
    export = load_checkpoint(exported)
    assert set(export) == {"config", "tokenizer", "bins", "sampling", "world", "train", "frozen", "step", "ema"}
    for key in M.EXPORT_ENTRIES:  # JSON round trip (tuples come back as lists)
        assert export[key] == json.loads(json.dumps(ckpt[key])), key
    assert export["ema"].keys() == ckpt["ema"].keys()
    assert all(torch.equal(export["ema"][k], v) for k, v in ckpt["ema"].items())
    assert load_checkpoint(tmp_path / "raw.safetensors").keys() - export.keys() == {"model"}
    half = load_checkpoint(tmp_path / "bf16" / "m.safetensors")["ema"]
    buffers = {name for name, _ in model_from_checkpoint(ckpt)[0].named_buffers()}  # Fourier frequencies, positions
    assert buffers and all(torch.equal(half[k], ckpt["ema"][k]) for k in buffers)  # kept in float32
    assert not torch.equal(half["final_layer.linear.weight"], ckpt["ema"]["final_layer.linear.weight"])  # rounded
    renamed = tmp_path / "shared.bin"  # recognised by its content, not its name
    renamed.write_bytes(exported.read_bytes())
    assert torch.equal(load_checkpoint(renamed)["ema"]["final_layer.linear.weight"],
                       ckpt["ema"]["final_layer.linear.weight"])

    prompts = ["a photo of two red circles", "a photo of a green square"]
    ones = torch.ones(2, len(ckpt["config"]["reward_names"]))

    def images(path, ema=True):
        _, _, model, tokenizer, _ = sample.open_checkpoint(path, ema=ema)
        return generate(model, tokenizer, prompts, ones, 0 * ones, cfg=2.0, steps=3, seed=0)

    reference = images(run)
    assert torch.equal(images(exported), reference)
    assert (images(tmp_path / "bf16" / "m.safetensors") - reference).abs().max() < 0.02
    assert torch.equal(images(tmp_path / "raw.safetensors", ema=False), images(run, ema=False))
    with pytest.raises(ValueError, match="holds the raw weights only, not the EMA"):
        sample.open_checkpoint(tmp_path / "raw.safetensors")
    with pytest.raises(ValueError, match="holds the EMA weights only"):
        sample.open_checkpoint(exported, ema=False)
    with pytest.raises(SystemExit):  # an export holds no training state to resume
        train.main(["--resume", str(exported)])
    assert "not a train.py checkpoint" in capsys.readouterr().err

    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    (tmp_path / "torn.safetensors").write_bytes(exported.read_bytes()[:100])
    for name, message in [("foreign", "not a MIRO export"), ("torn", "cannot read")]:
        with pytest.raises(ValueError, match=message):
            load_checkpoint(tmp_path / f"{name}.safetensors")
    for flags, message in [(["--out", "x.pt"], "the export is a .safetensors file"),
                           (["--ckpt", str(exported), "--weights", "model"], "holds the EMA weights only")]:
        with pytest.raises(SystemExit):
            M.main(["export", "--ckpt", str(run), *flags])
        assert message in capsys.readouterr().err.splitlines()[-1]


def test_prompts_file_drops_a_byte_order_mark(tmp_path):
    (tmp_path / "prompts.txt").write_bytes("\ufeffa photo of a circle\n\nsecond prompt\n".encode())  # Notepad's
    _, args = sample.parse_args(["--prompts-file", str(tmp_path / "prompts.txt")])
    assert args.prompt == ["a photo of a circle", "second prompt"]  # the first word was "\ufeffa", an <unk>


class ConstantVelocityModel:
    """generate's model interface, stubbed: each row's velocity is its first reward target, whatever x and t."""
    cfg = SimpleNamespace(reward_names=("a", "b"), in_channels=1, image_size=2)

    def encode_condition(self, text, mask, rewards):
        return rewards, mask

    def denoise(self, x, t, cond, cond_mask):
        return cond[:, :1, None, None].expand_as(x)


def test_generate_guides_towards_the_positive_targets():
    """generate = Euler on (1 + w) v(s_pos) - w v(s_neg): the positive half of the batched forward is v_pos."""
    pos, neg = torch.tensor([[0.2, 1.0], [0.6, 1.0]]), torch.tensor([[0.1, 0.0], [0.0, 0.0]])
    encoder = lambda captions: (torch.zeros(len(captions), 1, 1), torch.ones(len(captions), 1))  # noqa: E731
    images = generate(ConstantVelocityModel(), encoder, ["x", "y"], pos, neg, cfg=2.0, steps=4, seed=5)
    v = 3 * pos[:, 0] - 2 * neg[:, 0]  # (1 + w) v_pos - w v_neg with w = 2: 0.4 and 1.8
    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(images, (noise - v.view(2, 1, 1, 1)).clamp(-1, 1), atol=1e-6)  # x0 = x1 - v


@pytest.fixture
def lively_run(tiny_runs, tmp_path):
    """The tiny MIRO run with a random EMA output layer, so that images depend clearly on the reward targets."""
    ckpt = load_checkpoint(tiny_runs / "miro" / "ckpt.pt")
    w = ckpt["ema"]["final_layer.linear.weight"]
    ckpt["ema"]["final_layer.linear.weight"] = 0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    (tmp_path / "run").mkdir()
    torch.save(ckpt, tmp_path / "run" / "ckpt.pt")
    model, tokenizer = model_from_checkpoint(ckpt)
    return tmp_path / "run", model, tokenizer


def saved_images(out):
    """The single images sample.py wrote beside the grid `out`, (N, H, W, 3) uint8."""
    return np.stack([np.array(Image.open(p)) for p in sorted(out.with_suffix("").glob("*.png"))])


PROMPT = "a photo of two red circles"


def test_cli_no_ema_samples_the_raw_weights(lively_run, tmp_path):
    """--no-ema: generate's images from the checkpoint's raw weights, not from its EMA (which differs here)."""
    run, ema_model, tokenizer = lively_run
    flags = ["--ckpt", str(run), "--prompt", PROMPT, "--n", "2", "--steps", "3", "--seed", "1", "--cfg", "2",
             "--device", "cpu"]
    sample.main([*flags, "--no-ema", "--out", str(tmp_path / "raw.png")])
    raw_model, _ = model_from_checkpoint(load_checkpoint(run / "ckpt.pt"), ema=False)
    R = len(raw_model.cfg.reward_names)
    raw, ema = (to_uint8(generate(m, tokenizer, [PROMPT] * 2, torch.ones(2, R), torch.zeros(2, R), cfg=2.0, steps=3,
                                  seed=1)) for m in (raw_model, ema_model))
    saved = saved_images(tmp_path / "raw.png")
    assert np.array_equal(saved, raw) and not np.array_equal(saved, ema)


def test_cli_samples_with_the_given_reward_targets(lively_run, tmp_path):
    """--rewards sharpness=0: the saved images are generate's with that positive target (not the default ones)."""
    run, model, tokenizer = lively_run
    sample.main(["--ckpt", str(run), "--prompt", PROMPT, "--n", "2", "--steps", "3", "--seed", "1", "--cfg", "2",
                 "--rewards", "sharpness=0", "--device", "cpu", "--out", str(tmp_path / "grid.png")])
    R = len(model.cfg.reward_names)
    pos = torch.ones(2, R)
    pos[:, model.cfg.reward_names.index("sharpness")] = 0
    wanted, default = (to_uint8(generate(model, tokenizer, [PROMPT] * 2, p, torch.zeros(2, R), cfg=2.0, steps=3,
                                         seed=1)) for p in (pos, torch.ones(2, R)))
    saved = saved_images(tmp_path / "grid.png")
    assert np.array_equal(saved, wanted) and not np.array_equal(saved, default)


def test_cli_best_of_keeps_the_candidate_the_reward_prefers(lively_run, tmp_path):
    """--best-of 3 --select-by sharpness saves, per image, the sharpest of its 3 candidates (not simply the first)."""
    run, model, tokenizer = lively_run
    sample.main(["--ckpt", str(run), "--prompt", PROMPT, "--n", "2", "--steps", "3", "--seed", "0", "--cfg", "2",
                 "--best-of", "3", "--select-by", "sharpness", "--device", "cpu", "--out", str(tmp_path / "grid.png")])
    R = len(model.cfg.reward_names)
    candidates = generate(model, tokenizer, [PROMPT] * 6, torch.ones(6, R), torch.zeros(6, R), cfg=2.0, steps=3,
                          seed=0)
    best, _ = best_of_n(candidates.view(2, 3, *candidates.shape[1:]), [PROMPT] * 2, load_reward("sharpness"))
    saved = saved_images(tmp_path / "grid.png")
    assert np.array_equal(saved, to_uint8(best))
    assert not np.array_equal(saved, to_uint8(candidates[::3]))  # the first candidate is not always the best here
