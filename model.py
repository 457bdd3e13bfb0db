"""MIRO generator: a DiT conditioned on a text + reward token sequence (read top to bottom).

Conventions (written once, used everywhere):
- t in [0, 1] with t = 0 data and t = 1 noise; `denoise` predicts the flow velocity v = eps - x0.
- Reward values live in [0, 1] (bin k of B maps to k / (B - 1)); one token per reward, order = cfg.reward_names.
- Masks are bool with True = a real token (a key that may be attended to).
- The condition sequence is [registers, reward tokens, text tokens], so M = num_registers + R + L.

Layout: text tokenizer -> embedders (timestep, patch, reward, text) -> norms/attention/MLP -> condition
transformer -> DiT block -> final layer -> MIRO -> config and presets. `python model.py` prints the parameter
count of each preset.
"""
import argparse
import dataclasses
import math
import os
import string
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


#################################################################################
#                                 Text tokenizer                                #
#################################################################################

class WordTokenizer:
    """Word-level tokenizer: lower-case, punctuation removed, whitespace split; ids 0=<pad>, 1=<unk>, 2..=words."""

    PAD, UNK = 0, 1
    _strip = str.maketrans({c: " " for c in string.punctuation})

    def __init__(self, words, max_len):
        self.words = list(dict.fromkeys(w for word in words for w in self.split(word)))  # normalised, deduplicated
        self.max_len = max_len
        self.index = {w: i + 2 for i, w in enumerate(self.words)}

    @classmethod
    def split(cls, text):
        return text.lower().translate(cls._strip).split()

    def state_dict(self):
        """JSON-able state saved in checkpoints; `WordTokenizer.from_state_dict` restores the same ids."""
        return {"words": list(self.words), "max_len": self.max_len}

    @classmethod
    def from_state_dict(cls, state):
        return cls(state["words"], state["max_len"])

    def __len__(self):
        """Vocabulary size including <pad> and <unk> (what cfg.vocab_size must be at least)."""
        return len(self.words) + 2

    def __call__(self, captions):
        """captions: list[str] -> (ids Long (B, max_len), mask Bool (B, max_len)); truncates, pads at the end."""
        captions = [captions] if isinstance(captions, str) else captions
        ids = torch.full((len(captions), self.max_len), self.PAD, dtype=torch.long)
        for i, caption in enumerate(captions):
            toks = [self.index.get(w, self.UNK) for w in self.split(caption)][: self.max_len]
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        return ids, ids != self.PAD


#################################################################################
#                                   Embedders                                   #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds t in [0, 1] as sinusoidal features of t * 1000 followed by an MLP (as DiT)."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000 * t.float()[:, None] * freqs[None]  # (B, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # (B, D)


def sincos_pos_embed(grid, dim):
    """Fixed 2D sine-cosine position embedding (as DiT): (grid * grid, dim), half the channels per axis."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    out = [f(pos.flatten()[:, None] * omega[None]) for pos in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1).float()  # (grid^2, dim)


class PatchEmbed(nn.Module):
    """Splits an image into p x p patches, projects each to a token and adds a fixed 2D sin-cos position embedding."""

    def __init__(self, image_size, patch_size, in_channels, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_pos_embed(image_size // patch_size, dim)[None])  # saved, as DiT

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)  # (B, C, H, W) -> (B, N, D)


class RewardEmbedder(nn.Module):
    """One reward value -> one token: random Fourier features -> MLP, plus a learned identity vector.

    The Fourier frequencies (~ 2 pi N(0, 1)) and phases (~ U(0, 2 pi)) are fixed buffers drawn in
    `MIRO.initialize_weights` and saved with the model, so a checkpoint reproduces the same features.
    """

    def __init__(self, fourier_dim, dim):
        super().__init__()
        self.register_buffer("freqs", torch.empty(fourier_dim))
        self.register_buffer("phases", torch.empty(fourier_dim))
        self.mlp = nn.Sequential(nn.Linear(fourier_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.identity = nn.Parameter(torch.zeros(dim))

    def forward(self, values):
        feats = math.sqrt(2) * torch.cos(values.float()[:, None] * self.freqs + self.phases)  # (B,) -> (B, F)
        return self.mlp(feats) + self.identity  # (B, D)


class TextEmbedder(nn.Module):
    """Text -> tokens of width D: word ids through a trainable embedding (vocab_size > 0) or float features."""

    def __init__(self, vocab_size, text_dim, max_len, dim):
        super().__init__()
        self.vocab_size = vocab_size
        if vocab_size > 0:
            self.words = nn.Embedding(vocab_size, text_dim)
            self.pos = nn.Parameter(torch.zeros(1, max_len, text_dim))
        self.proj = nn.Linear(text_dim, dim)

    def forward(self, text):
        if text.is_floating_point():  # precomputed encoder features (B, L, text_dim), e.g. frozen T5
            return self.proj(text)  # (B, L, D)
        if self.vocab_size == 0:
            raise ValueError("this model takes precomputed float text features (vocab_size=0), got token ids")
        h = self.words(text) + self.pos[:, : text.shape[1]]  # (B, L) -> (B, L, text_dim)
        return self.proj(h)  # (B, L, D)


#################################################################################
#                            Norms, attention, MLP                              #
#################################################################################

class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learned gain, computed in float32."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), x.shape[-1:], self.weight.float(), self.eps).to(x.dtype)


def make_norm(dim, rms):
    """Pre-norm with learned affine: RMSNorm when cfg.rmsnorm else LayerNorm."""
    return RMSNorm(dim) if rms else nn.LayerNorm(dim, eps=1e-6)


class Attention(nn.Module):
    """Multi-head self- or cross-attention (context given) with optional QK RMSNorm and a key padding mask."""

    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = RMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None, mask=None):
        """x (B, N, D), context (B, M, D) (defaults to x), mask (B, M) bool True = attend -> (B, N, D)."""
        context = x if context is None else context
        B, N, D = x.shape
        H = self.num_heads
        q = self.q_norm(self.q(x).view(B, N, H, D // H))  # (B, N, H, Dh); norm before the transpose (contiguous)
        k, v = self.kv(context).view(B, -1, 2, H, D // H).unbind(2)  # 2 x (B, M, H, Dh)
        q, k, v = q.transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)  # (B, H, N or M, Dh)
        mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, M), broadcast over heads and queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, H, N, Dh) -> (B, N, D)


class MLP(nn.Module):
    """Transformer MLP: GELU(tanh) as DiT, or SwiGLU with ~2/3 the hidden width (same parameter count)."""

    def __init__(self, dim, mlp_ratio=4.0, swiglu=False):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.swiglu = swiglu
        if swiglu:
            hidden = 32 * math.ceil(2 * hidden / 3 / 32)  # a multiple of 32 for efficient matmuls
        self.fc1 = nn.Linear(dim, 2 * hidden if swiglu else hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.fc1(x)
        if self.swiglu:
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        else:
            h = F.gelu(h, approximate="tanh")
        return self.fc2(h)


#################################################################################
#                       Condition transformer and DiT blocks                    #
#################################################################################

class CondBlock(nn.Module):
    """Pre-norm transformer block for the condition sequence: masked self-attention then MLP."""

    def __init__(self, dim, num_heads, mlp_ratio, swiglu, rmsnorm, qk_norm):
        super().__init__()
        self.norm1, self.norm2 = make_norm(dim, rmsnorm), make_norm(dim, rmsnorm)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.mlp = MLP(dim, mlp_ratio, swiglu)

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class DiTBlock(nn.Module):
    """DiT block: adaLN-Zero self-attention, pre-norm cross-attention to the condition, adaLN-Zero MLP."""

    def __init__(self, dim, num_heads, mlp_ratio, swiglu, rmsnorm, qk_norm):
        super().__init__()
        self.norm = "rms" if rmsnorm else "layer"  # modulated norms have no affine parameters (as DiT)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm_cross = make_norm(dim, rmsnorm)
        self.cross_attn = Attention(dim, num_heads, qk_norm)
        self.mlp = MLP(dim, mlp_ratio, swiglu)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, cond, cond_mask):
        """x (B, N, D) image tokens, c (B, D) timestep embedding, cond (B, M, D), cond_mask (B, M)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = kernels.norm_modulate(x, shift_msa, scale_msa, norm=self.norm)
        x = kernels.gated_residual(x, gate_msa, self.attn(h))
        x = x + self.cross_attn(self.norm_cross(x), cond, cond_mask)  # zero-init output: identity at init
        h = kernels.norm_modulate(x, shift_mlp, scale_mlp, norm=self.norm)
        return kernels.gated_residual(x, gate_mlp, self.mlp(h))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from each token to its p x p x C patch."""

    def __init__(self, dim, patch_size, out_channels, rmsnorm):
        super().__init__()
        self.norm = "rms" if rmsnorm else "layer"
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(kernels.norm_modulate(x, shift, scale, norm=self.norm))  # (B, N, D) -> (B, N, p*p*C)


#################################################################################
#                                     MIRO                                      #
#################################################################################

class MIRO(nn.Module):
    """Multi-reward conditioned flow-matching DiT; cfg.reward_names == () gives the baseline without reward tokens.

    `drop_rewards` (B, R) bool, True = dropped, replaces that reward's whole token (identity vector included) by
    the null embedding, a zero vector (binomial reward dropout of the authors' code; off in the paper's model).
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        block_args = (D, cfg.num_heads, cfg.mlp_ratio, cfg.swiglu, cfg.rmsnorm, cfg.qk_norm)
        # Condition encoder: text + reward tokens + registers through a small transformer.
        self.text_embedder = TextEmbedder(cfg.vocab_size, cfg.text_dim, cfg.max_text_len, D)
        self.reward_embedders = nn.ModuleList(RewardEmbedder(cfg.fourier_dim, D) for _ in cfg.reward_names)
        self.registers = nn.Parameter(torch.zeros(1, cfg.num_registers, D))
        self.cond_blocks = nn.ModuleList(CondBlock(*block_args) for _ in range(cfg.cond_depth))
        self.cond_norm = make_norm(D, cfg.rmsnorm)
        # Generator: patches -> DiT blocks -> patches.
        self.t_embedder = TimestepEmbedder(D)
        self.x_embedder = PatchEmbed(cfg.image_size, cfg.patch_size, cfg.in_channels, D)
        self.blocks = nn.ModuleList(DiTBlock(*block_args) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.in_channels, cfg.rmsnorm)
        self.initialize_weights()

    def initialize_weights(self):
        """All initialisation: xavier linears, small normals for embeddings, adaLN-Zero, zero output layers."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic_init)
        w = self.x_embedder.proj.weight  # the patch projection is a linear map of the flattened patch
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.registers, std=0.02)
        if self.text_embedder.vocab_size > 0:
            nn.init.normal_(self.text_embedder.words.weight, std=0.02)
            nn.init.normal_(self.text_embedder.pos, std=0.02)
        for emb in self.reward_embedders:
            emb.freqs.normal_(0.0, 2 * math.pi)  # 2 pi N(0, 1)
            emb.phases.uniform_(0.0, 2 * math.pi)
            nn.init.normal_(emb.identity, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: zero modulation (gates = 0) and zero cross-attention output, so each block is the identity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        # Zero output layer: the model predicts v = 0 at init.
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def encode_condition(self, text, text_mask=None, rewards=None, drop_rewards=None):
        """text: ids Long (B, L) or features float (B, L, text_dim); text_mask (B, L) bool (None = all real);
        rewards (B, R) in [0, 1] (None or (B, 0) for the baseline); drop_rewards (B, R) bool or None.
        Returns (cond (B, M, D), cond_mask (B, M) bool), M = num_registers + R + L."""
        R = len(self.reward_embedders)
        B, L = text.shape[:2]
        if rewards is None:
            if R > 0:
                raise ValueError(f"this model needs rewards for {self.cfg.reward_names}")
            rewards = torch.zeros(B, 0, device=text.device)
        if rewards.shape != (B, R):
            raise ValueError(f"rewards must have shape ({B}, {R}) for reward_names {self.cfg.reward_names}, "
                             f"got {tuple(rewards.shape)}")
        if text_mask is None:
            text_mask = torch.ones(B, L, dtype=torch.bool, device=text.device)
        txt = self.text_embedder(text)  # (B, L, D)
        regs = self.registers.expand(B, -1, -1).to(txt.dtype)  # (B, num_registers, D)
        if R > 0:
            tokens = torch.stack([emb(rewards[:, i]) for i, emb in enumerate(self.reward_embedders)], dim=1)
            if drop_rewards is not None:
                tokens = tokens.masked_fill(drop_rewards[:, :, None], 0.0)  # null embedding = zeros
            parts = [regs, tokens.to(txt.dtype), txt]  # (B, R, D) reward tokens between registers and text
        else:
            parts = [regs, txt]
        cond = torch.cat(parts, dim=1)  # (B, M, D)
        always = torch.ones(B, self.cfg.num_registers + R, dtype=torch.bool, device=text.device)
        cond_mask = torch.cat([always, text_mask.bool()], dim=1)  # (B, M); registers keep it never all-False
        for block in self.cond_blocks:
            cond = block(cond, cond_mask)
        return self.cond_norm(cond), cond_mask

    def unpatchify(self, x):
        """(B, N, p*p*C) -> (B, C, H, W)."""
        p, C = self.cfg.patch_size, self.cfg.in_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, h * p, w * p)

    def denoise(self, x, t, cond, cond_mask):
        """x (B, C, H, W) noisy input at time t (B,), condition from `encode_condition` -> v (B, C, H, W)."""
        h = self.x_embedder(x)  # (B, N, D)
        c = self.t_embedder(t)  # (B, D)
        for block in self.blocks:
            h = block(h, c, cond, cond_mask)
        h = self.final_layer(h, c)  # (B, N, p*p*C)
        return self.unpatchify(h)  # (B, C, H, W)

    def forward(self, x, t, text, text_mask=None, rewards=None, drop_rewards=None):
        cond, cond_mask = self.encode_condition(text, text_mask, rewards, drop_rewards)
        return self.denoise(x, t, cond, cond_mask)


def count_parameters(module):
    """Number of parameters (buffers such as the Fourier frequencies excluded)."""
    return sum(p.numel() for p in module.parameters())


#################################################################################
#                               Config and presets                              #
#################################################################################

@dataclass
class ModelConfig:
    """Architecture of a MIRO model (saved with every checkpoint; `ModelConfig(**asdict(cfg))` round-trips)."""

    image_size: int = 32
    """Side of the (square) input: pixels, or latent cells for VAE latents."""
    in_channels: int = 3
    """Channels of the input and of the predicted velocity (3 RGB pixels, 4 SDXL latents)."""
    patch_size: int = 2
    """Side of the square patch that becomes one token; N = (image_size / patch_size)^2 tokens."""
    width: int = 64
    """Token width D of the generator and of the condition sequence."""
    depth: int = 4
    """Number of DiT blocks."""
    num_heads: int = 4
    """Attention heads (width must divide evenly)."""
    mlp_ratio: float = 4.0
    """MLP hidden width / width (SwiGLU uses 2/3 of it, rounded up to a multiple of 32)."""
    swiglu: bool = True
    """SwiGLU MLP instead of GELU (paper tweak)."""
    rmsnorm: bool = False
    """RMSNorm instead of LayerNorm everywhere (paper tweak)."""
    qk_norm: bool = False
    """RMSNorm on queries and keys per head (paper tweak)."""
    cond_depth: int = 2
    """Blocks of the condition transformer over [registers, reward tokens, text tokens]."""
    num_registers: int = 4
    """Learned register tokens in the condition; they keep the key mask non-empty for empty captions."""
    text_dim: int = 128
    """Width of the text features: the word-embedding width, or the frozen encoder's width (2048 FLAN-T5-XL)."""
    vocab_size: int = 64
    """Word vocabulary size (>= len(WordTokenizer)); 0 = text comes as precomputed float features (B, L, text_dim)."""
    max_text_len: int = 16
    """Maximum number of text tokens (tokenizer max_len; the paper pads/truncates T5 features to 256)."""
    reward_names: tuple = ("alignment", "sharpness", "cleanliness", "contrast")
    """One token per reward, in this order (= the R axis of the rewards tensor); () = baseline without rewards."""
    fourier_dim: int = 64
    """Random Fourier features per reward value."""

    def __post_init__(self):
        self.reward_names = tuple(self.reward_names)  # JSON gives back a list
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")


PAPER_REWARDS = ("clip_score", "aesthetic_score", "image_reward_score", "pick_a_score_score", "hpsv2_score",
                 "vqa_score", "sciscore_score")

PRESETS = {
    # Unit tests: milliseconds per forward.
    "tiny": ModelConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, cond_depth=1,
                        num_registers=2, text_dim=16, vocab_size=32, max_text_len=8, fourier_dim=16,
                        reward_names=("alignment", "sharpness"), swiglu=True, rmsnorm=True, qk_norm=True),
    # Default for the built-in 32x32 RGB shapes world on a 2-core CPU (pixel space, patch 2 = 256 tokens): 0.57M
    # parameters, ~0.24 s per fp32 training step at batch 32. Patch 2 rather than a wider patch-4 model: at equal
    # CPU time, 4x4 patches gave blocky samples whose patches did not agree on one object. RMSNorm and QK-norm are
    # off because their unfused eager ops cost ~25% of the step on CPU; at this size training is stable without.
    "cpu": ModelConfig(),  # the ModelConfig defaults
    # Paper scale: 4x32x32 SDXL latents, frozen FLAN-T5-XL features, ~0.36B parameters.
    "paper": ModelConfig(image_size=32, in_channels=4, patch_size=2, width=1024, depth=14, num_heads=16,
                         text_dim=2048, vocab_size=0, max_text_len=256, fourier_dim=256, num_registers=4,
                         reward_names=PAPER_REWARDS, swiglu=True, rmsnorm=True, qk_norm=True),
}


def get_config(name, **overrides):
    """A fresh copy of preset `name` with fields replaced by `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; fields: {', '.join(sorted(fields))}")
    return dataclasses.replace(PRESETS[name], **overrides)


#################################################################################
#                                  Checkpoints                                  #
#################################################################################

def save_checkpoint(path, state):
    """torch.save to `path`.tmp then os.replace, so a crash never leaves a torn checkpoint behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """A checkpoint dict with every tensor on the CPU; weights_only, so loading never runs pickled code.
    Raises FileNotFoundError for a missing file and ValueError for an unreadable one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torn or foreign files raise several exception types; report one
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e


def model_from_checkpoint(ckpt, ema=True):
    """(model in eval mode on the CPU, tokenizer) from a checkpoint dict with "config", "tokenizer", "model" and
    "ema" entries; the EMA weights unless ema=False."""
    try:
        cfg = ModelConfig(**ckpt["config"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"checkpoint has no valid model config: {e}") from e
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = MIRO(cfg)
    model.load_state_dict(ckpt["ema" if ema else "model"], assign=True)
    return model.eval(), WordTokenizer.from_state_dict(ckpt["tokenizer"])


def main():
    parser = argparse.ArgumentParser(description="Print the parameter count of the model presets.")
    parser.add_argument("--preset", choices=list(PRESETS), help="one preset (default: all)")
    args = parser.parse_args()
    for name in [args.preset] if args.preset else PRESETS:
        cfg = get_config(name)
        with torch.device("meta"):  # counts parameters without allocating them
            model = MIRO(cfg)
        tokens = (cfg.image_size // cfg.patch_size) ** 2
        print(f"{name:>6}: {count_parameters(model) / 1e6:8.2f}M parameters  (width {cfg.width}, depth "
              f"{cfg.depth}, heads {cfg.num_heads}, {tokens} image tokens, {len(cfg.reward_names)} rewards)")


if __name__ == "__main__":
    main()
