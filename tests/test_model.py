"""model.py: shapes, adaLN-Zero initialisation, gradient flow, reward tokens, masks, tokenizer, presets."""
import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model as M
from model import MIRO, WordTokenizer, count_parameters, get_config

WORDS = "a photo of red blue green circle square triangle two three and left right".split()


def make_model(seed=0, nonzero=False, **overrides):
    """A tiny model built under a forked RNG (no global state touched); `nonzero` fills the zero-initialised
    tensors (adaLN modulation, cross-attention and final output layers) so every path carries signal."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MIRO(get_config("tiny", **overrides))
        if nonzero:
            with torch.no_grad():
                for p in model.parameters():
                    if not p.any():
                        p.normal_(0.0, 0.2)
    return model


def make_inputs(cfg, B=3, seed=0, features=False, num_rewards=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.rand(B, generator=g)
    L = cfg.max_text_len
    lengths = torch.tensor([L, 3, 0][:B] + [2] * max(0, B - 3))  # full, partial and empty captions
    mask = torch.arange(L)[None] < lengths[:, None]
    if features:
        text = torch.randn(B, L, cfg.text_dim, generator=g)
    else:
        text = torch.randint(2, cfg.vocab_size, (B, L), generator=g).masked_fill(~mask, 0)
    R = len(cfg.reward_names) if num_rewards is None else num_rewards
    rewards = torch.rand(B, R, generator=g)
    return x, t, text, mask, rewards


# ----------------------------------------------------------------------------- shapes

def test_embedder_shapes():
    B, D = 3, 32
    g = torch.Generator().manual_seed(0)
    assert M.TimestepEmbedder(D)(torch.rand(B, generator=g)).shape == (B, D)
    assert M.PatchEmbed(16, 4, 3, D)(torch.randn(B, 3, 16, 16, generator=g)).shape == (B, 16, D)
    assert M.RewardEmbedder(16, D)(torch.rand(B, generator=g)).shape == (B, D)
    assert M.TextEmbedder(20, 12, 8, D)(torch.randint(0, 20, (B, 5), generator=g)).shape == (B, 5, D)
    assert M.TextEmbedder(0, 12, 8, D)(torch.randn(B, 5, 12, generator=g)).shape == (B, 5, D)
    x, ctx = torch.randn(B, 7, D, generator=g), torch.randn(B, 4, D, generator=g)
    assert M.Attention(D, 2, qk_norm=True)(x).shape == (B, 7, D)
    assert M.Attention(D, 2)(x, ctx, torch.ones(B, 4, dtype=torch.bool)).shape == (B, 7, D)
    assert M.MLP(D, swiglu=True)(x).shape == M.MLP(D)(x).shape == (B, 7, D)


@pytest.mark.parametrize("variant", ["miro_ids", "miro_features", "baseline_ids", "baseline_features", "plain"])
def test_model_output_shapes(variant):
    overrides = {
        "miro_ids": {}, "miro_features": dict(vocab_size=0), "baseline_ids": dict(reward_names=()),
        "baseline_features": dict(vocab_size=0, reward_names=()),
        "plain": dict(swiglu=False, rmsnorm=False, qk_norm=False),  # GELU / LayerNorm / no QK-norm path
    }[variant]
    model = make_model(nonzero=True, **overrides)
    cfg = model.cfg
    x, t, text, mask, rewards = make_inputs(cfg, features=variant.endswith("features"))
    cond, cond_mask = model.encode_condition(text, mask, rewards)
    M_ = cfg.num_registers + len(cfg.reward_names) + cfg.max_text_len
    assert cond.shape == (3, M_, cfg.width) and cond_mask.shape == (3, M_) and cond_mask.dtype == torch.bool
    v = model(x, t, text, mask, rewards)
    assert v.shape == x.shape and torch.isfinite(v).all()  # includes the empty caption (row 2)
    torch.testing.assert_close(v, model.denoise(x, t, cond, cond_mask))
    if not cfg.reward_names:  # the baseline also accepts rewards=None
        torch.testing.assert_close(model(x, t, text, mask, None), v)


def test_reward_argument_errors():
    miro, base = make_model(), make_model(reward_names=())
    x, t, text, mask, rewards = make_inputs(miro.cfg)
    with pytest.raises(ValueError, match="needs rewards"):
        miro(x, t, text, mask, None)
    with pytest.raises(ValueError, match="shape"):
        miro(x, t, text, mask, rewards[:, :1])
    with pytest.raises(ValueError, match="shape"):
        base(x, t, text, mask, rewards)
    with pytest.raises(ValueError, match="float text features"):
        make_model(vocab_size=0)(x, t, text, mask, rewards)


def test_input_shape_errors():
    """Bad shapes are a one-line ValueError at the entry point, not a traceback from deep inside."""
    model = make_model()
    cfg = model.cfg
    x, t, text, mask, rewards = make_inputs(cfg)
    B, L = text.shape
    bad = {  # name -> (forward arguments, message)
        "scalar t": ((x, t[0], text, mask, rewards), r"t must be a tensor of shape \(3,\)"),
        "float t": ((x, 0.5, text, mask, rewards), r"t must be .* got float"),
        "image side": ((torch.randn(B, cfg.in_channels, 2 * cfg.image_size, 2 * cfg.image_size), t, text, mask,
                        rewards), r"x must have shape \(B, 3, 16, 16\)"),
        "channels": ((x[:, :1], t, text, mask, rewards), r"x must have shape"),
        "ids too long": ((x, t, torch.ones(B, cfg.max_text_len + 1, dtype=torch.long), None, rewards),
                         rf"text ids must have shape \(B, L <= {cfg.max_text_len}\)"),
        "feature width": ((x, t, torch.randn(B, L, cfg.text_dim + 1), mask, rewards), r"text features must have"),
        "text rank": ((x, t, text[0], None, rewards), r"text must be ids \(B, L\)"),
        "mask length": ((x, t, text, mask[:, :3], rewards), rf"text_mask must have shape \({B}, {L}\)"),
        "float drop": ((x, t, text, mask, rewards, torch.zeros_like(rewards)), r"drop_rewards must be bool"),
        "drop shape": ((x, t, text, mask, rewards, torch.zeros(B, dtype=torch.bool)), r"drop_rewards must be"),
    }
    for name, (args, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            model(*args)
    cond, cond_mask = model.encode_condition(text, mask, rewards)
    with pytest.raises(ValueError, match="from encode_condition"):
        model.denoise(x, t, cond[:2], cond_mask[:2])  # a condition of another batch
    assert model(x, t, text[:, :3], mask[:, :3], rewards).shape == x.shape  # shorter text is fine


# ----------------------------------------------------------------------------- embedders and blocks against references

def test_timestep_embedder_features_are_dit_sinusoids_of_1000_t():
    """The MLP input is [cos(1000 t f_k), sin(1000 t f_k)] with f_k = 10000^(-k / half), as DiT's."""
    emb, seen = M.TimestepEmbedder(8, freq_dim=16), []
    emb.mlp.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    t = torch.tensor([0.0, 0.0123, 0.5, 1.0])
    emb(t)
    k = torch.arange(8, dtype=torch.float64)
    args = 1000 * t.double()[:, None] * 10000 ** (-k / 8)
    torch.testing.assert_close(seen[0].double(), torch.cat([args.cos(), args.sin()], 1), rtol=0, atol=1e-4)


def test_sincos_pos_embed_matches_a_numpy_reference():
    """Token n = (row i, column j) of the grid: [sin(i w), cos(i w), sin(j w), cos(j w)], w_k = 10000^(-k / (D/4)).
    (MAE/DiT put the column half first: a fixed channel permutation, the same information.)"""
    grid, dim = 3, 8
    w = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
    ref = np.array([np.concatenate([np.sin(i * w), np.cos(i * w), np.sin(j * w), np.cos(j * w)])
                    for i in range(grid) for j in range(grid)])
    out = M.sincos_pos_embed(grid, dim)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-6)
    assert len(set(map(tuple, out.tolist()))) == grid * grid  # every position distinct


@pytest.mark.parametrize("rmsnorm", [True, False])
def test_dit_block_matches_a_hand_written_adaln_zero_block(rmsnorm):
    """Each of the 6 adaLN chunks (shift, scale, gate of the attention, then of the MLP) modulates its own branch."""
    model = make_model(nonzero=True, rmsnorm=rmsnorm)
    block, D = model.blocks[0], model.cfg.width
    with torch.no_grad():
        block.adaLN_modulation[1].weight.normal_(0.0, 0.5)  # chunks clearly different from one another
    x, t, text, mask, rewards = make_inputs(model.cfg)
    cond, cond_mask = model.encode_condition(text, mask, rewards)
    h, c = model.x_embedder(x), model.t_embedder(t)

    def norm(v):
        return F.rms_norm(v, (D,), eps=1e-6) if rmsnorm else F.layer_norm(v, (D,), eps=1e-6)

    shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None] for m in block.adaLN_modulation(c).chunk(6, dim=1))
    ref = h + gate1 * block.attn(norm(h) * (1 + scale1) + shift1)
    ref = ref + block.cross_attn(block.norm_cross(ref), cond, cond_mask)
    ref = ref + gate2 * block.mlp(norm(ref) * (1 + scale2) + shift2)
    torch.testing.assert_close(block(h, c, cond, cond_mask), ref)


# ----------------------------------------------------------------------------- initialisation and gradients

def test_adaln_zero_init_gives_zero_output_and_identity_blocks():
    model = make_model()
    x, t, text, mask, rewards = make_inputs(model.cfg)
    assert torch.equal(model(x, t, text, mask, rewards), torch.zeros_like(x))
    cond, cond_mask = model.encode_condition(text, mask, rewards)
    h, c = model.x_embedder(x), model.t_embedder(t)
    for block in model.blocks:
        assert torch.equal(block(h, c, cond, cond_mask), h)


def test_gradients_reach_every_parameter():
    model = make_model(nonzero=True)
    x, t, text, mask, rewards = make_inputs(model.cfg)
    model(x, t, text, mask, rewards).pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_state_dict_round_trip_restores_fourier_buffers():
    a, b = make_model(seed=0, nonzero=True), make_model(seed=1)
    assert not torch.equal(a.reward_embedders[0].freqs, b.reward_embedders[0].freqs)
    b.load_state_dict(a.state_dict())
    inputs = make_inputs(a.cfg)
    assert torch.equal(a(*inputs), b(*inputs))


# ----------------------------------------------------------------------------- reward tokens

def test_reward_tokens_differ_by_value_and_by_reward():
    model = make_model()
    e0, e1 = model.reward_embedders
    v = torch.tensor([0.0, 1 / 63, 0.5, 1.0])
    tok0, tok1 = e0(v), e1(v)
    assert (tok0[1:] - tok0[:-1]).norm(dim=-1).min() > 1e-4  # adjacent bins give different tokens
    assert (tok0 - tok1).norm(dim=-1).min() > 1e-4  # same value, different reward
    with torch.no_grad():  # same features and MLP: the tokens then differ exactly by the identity vectors
        e1.load_state_dict({**e0.state_dict(), "identity": e1.identity + 1.0})
    torch.testing.assert_close(e1(v) - e0(v), (e1.identity - e0.identity).expand(4, -1))


def test_dropped_rewards_give_the_null_token():
    model = make_model(cond_depth=0)  # no condition transformer: cond = norm(tokens), and norm(0) = 0
    x, t, text, mask, rewards = make_inputs(model.cfg)
    drop = torch.tensor([[True, False], [False, True], [True, True]])
    cond, _ = model.encode_condition(text, mask, rewards, drop)
    reward_tokens = cond[:, model.cfg.num_registers: model.cfg.num_registers + 2]
    assert torch.equal(reward_tokens[drop], torch.zeros_like(reward_tokens[drop]))
    assert (reward_tokens[~drop].abs().sum(-1) > 0).all()
    # With the full model, a dropped reward's value has no influence on the output.
    full = make_model(nonzero=True)
    v = full(x, t, text, mask, rewards, drop)
    torch.testing.assert_close(full(x, t, text, mask, torch.rand_like(rewards).where(drop, rewards), drop), v)
    assert not torch.allclose(full(x, t, text, mask, 1 - rewards, drop), v)  # kept values do matter


# ----------------------------------------------------------------------------- text and masks

@pytest.mark.parametrize("features", [False, True])
def test_padded_text_tokens_do_not_change_the_output(features):
    model = make_model(nonzero=True, **(dict(vocab_size=0) if features else {}))
    x, t, text, mask, rewards = make_inputs(model.cfg, features=features)
    v = model(x, t, text, mask, rewards)
    g = torch.Generator().manual_seed(1)
    if features:
        noise, where = torch.randn(text.shape, generator=g), mask[..., None]  # (B, L, text_dim), (B, L, 1)
    else:
        noise, where = torch.randint(2, model.cfg.vocab_size, text.shape, generator=g), mask
    changed_pad = torch.where(where, text, noise)
    assert not torch.equal(changed_pad, text)
    torch.testing.assert_close(model(x, t, changed_pad, mask, rewards), v, rtol=1e-5, atol=1e-6)
    changed_real = torch.where(where, noise, text)  # sanity: the real tokens do matter
    assert not torch.allclose(model(x, t, changed_real, mask, rewards)[:2], v[:2])


def test_word_tokenizer():
    tok = WordTokenizer(WORDS + ["Red"], max_len=5)  # normalised and deduplicated
    assert tok.words == WORDS and len(tok) == len(WORDS) + 2
    ids, mask = tok(["A photo of a RED circle!", "red, zebra", "", "two"])
    idx = {w: i + 2 for i, w in enumerate(WORDS)}
    assert ids.shape == mask.shape == (4, 5) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids[0].tolist() == [idx["a"], idx["photo"], idx["of"], idx["a"], idx["red"]]  # truncated to max_len
    assert ids[1].tolist() == [idx["red"], WordTokenizer.UNK, 0, 0, 0]  # punctuation stripped, unknown word
    assert ids[2].tolist() == [0] * 5 and not mask[2].any()  # empty caption: all padding
    assert mask.sum(1).tolist() == [5, 2, 0, 1] and torch.equal(mask, ids != WordTokenizer.PAD)
    assert torch.equal(tok("two")[0], ids[3:])  # a single string is a batch of one


def test_tokenizer_feeds_the_model():
    """The tokenizer's ids and mask condition the model: one changed word changes that sample's output only, and a
    sample's output does not depend on the other captions of its batch."""
    tok = WordTokenizer(WORDS, max_len=8)
    model = make_model(nonzero=True, vocab_size=len(tok))
    x, t, _, _, rewards = make_inputs(model.cfg, B=2)
    captions = ["a photo of two red circles", "a photo of a square"]
    out = model(x, t, *tok(captions), rewards)
    assert torch.isfinite(out).all()
    changed = model(x, t, *tok(["a photo of two blue circles", captions[1]]), rewards)
    assert not torch.allclose(changed[0], out[0]) and torch.allclose(changed[1], out[1], atol=1e-6)
    alone = model(x[1:], t[1:], *tok(captions[1:]), rewards[1:])
    torch.testing.assert_close(alone[0], out[1], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- config and presets

def test_get_config_and_round_trip():
    cfg = get_config("cpu", width=96, reward_names=["alignment"])
    assert cfg.width == 96 and cfg.reward_names == ("alignment",)
    assert M.PRESETS["cpu"].width != 96  # presets are not mutated
    assert M.ModelConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    with pytest.raises(ValueError, match="known presets: tiny, cpu, paper"):
        get_config("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        get_config("tiny", widht=8)
    with pytest.raises(ValueError, match="divisible"):
        get_config("tiny", num_heads=3)
    with pytest.raises(ValueError, match="width 34 is not divisible by 4"):  # the sin-cos embedding needs 4 | width
        get_config("tiny", width=34)


def test_paper_preset_parameter_count():
    with torch.device("meta"):
        n = count_parameters(MIRO(get_config("paper")))
    assert 0.30e9 <= n <= 0.42e9


def test_adapt_config_fits_the_model_to_its_inputs():
    """Without frozen parts the model reads RGB pixels and word ids (train.py sets vocab_size), whatever the
    preset was made for; a VAE sets the latent channels and a text encoder the feature width and length."""
    from types import SimpleNamespace
    paper = get_config("paper")
    assert paper.in_channels == 4 and M.adapt_config(paper).in_channels == 3
    vae, t5 = SimpleNamespace(latent_channels=16), SimpleNamespace(dim=512, max_length=77)
    cfg = M.adapt_config(get_config("tiny"), t5, vae)
    assert (cfg.in_channels, cfg.vocab_size, cfg.text_dim, cfg.max_text_len) == (16, 0, 512, 77)


def test_cli_prints_parameter_counts(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["model.py", "--preset", "tiny"])
    M.main()
    n = count_parameters(make_model())
    assert f"{n / 1e6:.2f}M parameters" in capsys.readouterr().out


def test_bf16_autocast_forward_matches_fp32():
    model = make_model(nonzero=True)
    inputs = make_inputs(model.cfg)
    ref = model(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*inputs)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 5e-2


def test_bf16_weights_forward_without_autocast():
    """model.to(bfloat16) runs as is: the timestep and reward features are cast to their MLP's dtype."""
    model = make_model(nonzero=True)
    x, t, text, mask, rewards = make_inputs(model.cfg)
    ref = model(x, t, text, mask, rewards)
    out = model.to(torch.bfloat16)(x.bfloat16(), t, text, mask, rewards)  # t and rewards stay float32
    assert out.shape == x.shape and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 5e-2


def test_rmsnorm_keeps_float64_for_gradcheck_and_half_types_in_float32():
    norm = M.RMSNorm(6).double()
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,))  # fails if computed in float32
    xb = torch.randn(2, 6).bfloat16()
    out = M.RMSNorm(6)(xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, torch.nn.functional.rms_norm(xb.float(), (6,), eps=1e-6).bfloat16())


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip(tmp_path):
    tok = WordTokenizer(WORDS, max_len=8)
    model, ema = make_model(seed=0, nonzero=True, vocab_size=len(tok)), make_model(seed=1, vocab_size=len(tok))
    path = tmp_path / "ckpt.pt"
    M.save_checkpoint(path, {"config": dataclasses.asdict(model.cfg), "tokenizer": tok.state_dict(),
                             "model": model.state_dict(), "ema": ema.state_dict(), "step": 3,
                             "rng": [torch.Generator().manual_seed(0).get_state()]})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # the temporary file was renamed
    ckpt = M.load_checkpoint(path)
    assert ckpt["step"] == 3
    for use_ema, ref in ((False, model), (True, ema)):
        loaded, tok2 = M.model_from_checkpoint(ckpt, ema=use_ema)
        assert not loaded.training and loaded.cfg == model.cfg
        ids, mask = tok2(["a photo of two red circles", ""])
        assert torch.equal(ids, tok(["a photo of two red circles", ""])[0])
        x, t, _, _, rewards = make_inputs(model.cfg, B=2)
        assert torch.equal(loaded(x, t, ids, mask, rewards), ref(x, t, ids, mask, rewards))


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        M.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "torn.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        M.load_checkpoint(tmp_path / "torn.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")  # read, but no MIRO checkpoint: was an IndexError later
    with pytest.raises(ValueError, match=r"tensor.pt: not a MIRO checkpoint \(it holds a Tensor\)"):
        M.load_checkpoint(tmp_path / "tensor.pt")
    torch.save({"config": None, "model": {}}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match=r"not a MIRO checkpoint \(it holds a dict without a config dict\)"):
        M.load_checkpoint(tmp_path / "dict.pt")
    assert torch.equal(M.load_checkpoint(tmp_path / "tensor.pt", miro=False), torch.zeros(3))  # any weights file
    with pytest.raises(ValueError, match="model config"):
        M.model_from_checkpoint({"config": {"widht": 3}})
    model = make_model()
    good = {"config": dataclasses.asdict(model.cfg), "tokenizer": WordTokenizer(WORDS, 8).state_dict(),
            "model": model.state_dict(), "ema": model.state_dict()}
    M.model_from_checkpoint(good)
    with pytest.raises(ValueError, match="weights do not fit"):
        M.model_from_checkpoint({**good, "ema": None})  # load_state_dict raises TypeError
    with pytest.raises(ValueError, match="no valid tokenizer.*max_len"):
        M.model_from_checkpoint({**good, "tokenizer": {"words": WORDS}})  # KeyError inside
    with pytest.raises(ValueError, match="no valid tokenizer"):
        M.model_from_checkpoint({**good, "tokenizer": None})
