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

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from model import load_checkpoint, model_from_checkpoint  # noqa: E402
from sample import best_of_n, generate  # noqa: E402

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


def test_best_of_n_keeps_the_highest_reward():
    candidates = torch.linspace(-1, 1, 6).view(2, 3, 1, 1, 1).expand(2, 3, 3, 2, 2)

    def brightness(images, captions):
        return images.mean(dim=(1, 2, 3))

    best, scores = best_of_n(candidates, ["a", "b"], brightness)
    assert torch.equal(best, candidates[:, 2]) and torch.allclose(scores, (candidates[:, 2, 0, 0, 0] + 1) / 2)


def test_cli_writes_grid_and_single_images(tiny_runs, tmp_path):
    out = tmp_path / "grid.png"
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "0007.png").write_bytes(b"")  # an earlier, larger call's: removed, not mixed in
    result = run_sample("--ckpt", str(tiny_runs / "miro"), "--prompt", "a photo of two red circles", "--n", "2",
                        "--steps", "3", "--rewards", "alignment=1", "--best-of", "2", "--select-by", "alignment",
                        "--out", str(out))
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
    ("missing", [], "no checkpoint at"),
])
def test_cli_errors_are_one_line(tiny_runs, tmp_path, run, flags, message):
    result = run_sample("--ckpt", str(tiny_runs / run), "--prompt", "a photo of a circle", "--steps", "2",
                        "--out", str(tmp_path / "x.png"), *flags)
    assert result.returncode == 2, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]  # argparse: the usage, then one error line
    assert last_line.startswith("sample.py: error: ") and message in last_line, result.stderr
    assert "Traceback" not in result.stderr
