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
                          ("alignment", "name=value"), ("alignment=high", "not a number")]:
        with pytest.raises(ValueError, match=message):
            parse_reward_targets(spec, names, 1.0)
    with pytest.raises(ValueError, match="without rewards"):
        parse_reward_targets("alignment=1", [], 1.0)
