"""MIRO generator: a DiT conditioned on a text + reward token sequence (read top to bottom).

Conventions (written once, used everywhere):
- t in [0, 1] with t = 0 data and t = 1 noise; `denoise` predicts the flow velocity v = eps - x0.
- Reward values live in [0, 1] (bin k of B maps to k / (B - 1)); one token per reward, order = cfg.reward_names.
- Masks are bool with True = a real token (a key that may be attended to).
- The condition sequence is [registers, reward tokens, text tokens], so M = num_registers + R + L.

Layout: text tokenizer -> embedders (timestep, patch, reward, text) -> norms/attention/MLP -> condition
transformer -> DiT block -> final layer -> MIRO -> config and presets -> checkpoints -> frozen text encoders
(FLAN-T5, CLIP), the SDXL VAE and their on-disk caches. `python model.py` prints the parameter count of each preset;
`python model.py export` writes a run's weights as one .safetensors file to share.
"""
import argparse
import dataclasses
import hashlib
import inspect
import itertools
import json
import math
import os
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

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

    def unknown(self, texts):
        """The words of `texts` outside the vocabulary (each read as <unk>), sorted."""
        return sorted({w for text in texts for w in self.split(text) if w not in self.index})

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
        args = 1000 * t.float()[:, None] * freqs[None]  # (B, half); float32, as t * 1000 needs the precision
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, freq_dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))  # (B, D); the MLP's dtype, so bf16 weights run too


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
        return self.mlp(feats.to(self.mlp[0].weight.dtype)) + self.identity  # (B, D); MLP's dtype (bf16 weights)


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
    """RMSNorm over the last dimension with a learned gain, computed in float32 (float64 stays float64)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dt = torch.promote_types(x.dtype, torch.float32)  # half types upcast; float64 kept (gradcheck)
        return F.rms_norm(x.to(dt), x.shape[-1:], self.weight.to(dt), self.eps).to(x.dtype)


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
            h = kernels.swiglu(h)  # silu(a) * b, [a | b] = h; one fused kernel on CUDA
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
        R, cfg = len(self.reward_embedders), self.cfg
        if text.dim() != (3 if text.is_floating_point() else 2):
            raise ValueError(f"text must be ids (B, L) or float features (B, L, {cfg.text_dim}), got "
                             f"{text.dtype} {tuple(text.shape)}")
        B, L = text.shape[:2]
        if text.is_floating_point() and text.shape[2] != cfg.text_dim:
            raise ValueError(f"text features must have shape (B, L, {cfg.text_dim}), got {tuple(text.shape)}")
        if not text.is_floating_point() and L > cfg.max_text_len:  # the learned positions stop there
            raise ValueError(f"text ids must have shape (B, L <= {cfg.max_text_len}), got {tuple(text.shape)}")
        if text_mask is not None and text_mask.shape != (B, L):
            raise ValueError(f"text_mask must have shape ({B}, {L}) like the text, got {tuple(text_mask.shape)}")
        if drop_rewards is not None and (drop_rewards.shape != (B, R) or drop_rewards.dtype != torch.bool):
            raise ValueError(f"drop_rewards must be bool ({B}, {R}), got {drop_rewards.dtype} "
                             f"{tuple(drop_rewards.shape)}")
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
        C, S = self.cfg.in_channels, self.cfg.image_size
        if x.dim() != 4 or x.shape[1:] != (C, S, S):
            raise ValueError(f"x must have shape (B, {C}, {S}, {S}), got {tuple(x.shape)}")
        B = x.shape[0]
        if getattr(t, "shape", None) != (B,):  # also catches a Python float or a 0-d tensor
            got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"t must be a tensor of shape ({B},), one time per image, got {got}")
        if cond.shape[0] != B or cond_mask.shape != cond.shape[:2]:
            raise ValueError(f"cond and cond_mask must be ({B}, M, D) and ({B}, M) from encode_condition, got "
                             f"{tuple(cond.shape)} and {tuple(cond_mask.shape)}")
        h = self.x_embedder(x)  # (B, N, D)
        c = self.t_embedder(t)  # (B, D)
        for block in self.blocks:
            h = block(h, c, cond, cond_mask)
        h = self.final_layer(h, c)  # (B, N, p*p*C)
        return self.unpatchify(h)  # (B, C, H, W)

    def forward(self, x, t, text, text_mask=None, rewards=None, drop_rewards=None):
        cond, cond_mask = self.encode_condition(text, text_mask, rewards, drop_rewards)
        return self.denoise(x, t, cond, cond_mask)

    def flops_per_image(self, text_len=None):
        """Forward FLOPs for one image: every matrix multiply (linear layers, the patch projection, attention's
        QK^T and AV) at 2 FLOPs per multiply-add, over a condition of M = registers + rewards + text_len tokens
        (default max_text_len, the padded condition; train.py trims frozen-encoder batches to their longest caption);
        norms, softmax and elementwise ops are not counted. A training step is ~3x this, and MFU = 3 *
        flops_per_image * images/s / peak FLOP/s."""
        cfg = self.cfg
        L = cfg.max_text_len if text_len is None else text_len
        N, M = (cfg.image_size // cfg.patch_size) ** 2, cfg.num_registers + len(cfg.reward_names) + L

        def linears(module, tokens):  # multiply-adds of every nn.Linear in `module`, applied to `tokens` tokens
            return tokens * sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))

        def attention(queries, keys):  # QK^T and AV
            return 2 * queries * keys * cfg.width

        macs = linears(self.text_embedder, L) + linears(self.reward_embedders, 1)
        macs += linears(self.t_embedder, 1) + N * self.x_embedder.proj.weight.numel()
        for block in self.cond_blocks:
            macs += linears(block, M) + attention(M, M)
        for block in self.blocks:
            macs += linears(block.adaLN_modulation, 1) + linears(block.attn, N) + attention(N, N)
            macs += linears(block.cross_attn.q, N) + linears(block.cross_attn.kv, M) + linears(block.cross_attn.proj, N)
            macs += attention(N, M) + linears(block.mlp, N)
        macs += linears(self.final_layer.adaLN_modulation, 1) + linears(self.final_layer.linear, N)
        return 2 * macs


def uses_bf16(precision, device):
    """Whether the generator runs under bfloat16 autocast, for --precision bf16|fp32 or None (the default: bf16 on
    CUDA, whose tensor cores it is made for, fp32 elsewhere). Weights, optimizer and the sampler's integration stay
    float32 either way; training, sampling and evaluation share the rule."""
    return (precision or ("bf16" if torch.device(device).type == "cuda" else "fp32")) == "bf16"


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
    """Token width D of the generator and of the condition sequence (a multiple of 4)."""
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
        if self.width % 4:  # the 2D sin-cos position embedding uses width / 4 channels per (axis, sin or cos)
            raise ValueError(f"width {self.width} is not divisible by 4")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")


PAPER_REWARDS = ("clip", "aesthetic", "imagereward", "pickscore", "hpsv2", "vqascore", "sciscore")  # rewards.py names

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
    """torch.save to `path`.tmp, fsync, then os.replace: a crash (even a power cut) at any moment leaves the old
    checkpoint or the new one at `path`, never a torn file (a stale .tmp is simply overwritten next time)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, miro=True):
    """A checkpoint dict with every tensor on the CPU; weights_only, so loading never runs pickled code (a
    .safetensors file: an export of model.py export, with its one weight set and no training state).
    Raises FileNotFoundError for a missing file and ValueError for an unreadable one; with miro=True (False: any
    weights file) also for anything but a dict with a "config" dict, e.g. a bare tensor."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if miro and _is_safetensors(path):  # whatever its name
        return _load_exported(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torn or foreign files raise several exception types, some multi-line: report one line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        why = next((line.split(" Please use")[0] for line in lines if line.startswith("WeightsUnpickler error")),
                   lines[0])  # names what the file holds beyond tensors
        raise ValueError(f"cannot read checkpoint {path} (truncated, or not a torch checkpoint): {why}") from e
    if miro and not (isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict)):
        what = "a dict without a config dict" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise ValueError(f"{path}: not a MIRO checkpoint (it holds {what})")
    return ckpt


# Exported weights (`python model.py export`): one .safetensors file to share a trained model, opened without
# unpickling anything. The tensors are one weight set, the EMA (default) or the raw weights, stored as "ema." or
# "model." + parameter name, the parameters optionally in bfloat16 / float16 to halve the file (read back as float32;
# the buffers, fixed Fourier frequencies and positions that the model computes with in float32, stay float32). The
# header's metadata holds, as JSON strings, every other entry that sampling and evaluation read; load_checkpoint
# returns the same dict as from a ckpt.pt, less the training state, so sample.py and evaluate.py take either file.
EXPORT_FORMAT = "miro-weights-v1"
EXPORT_ENTRIES = ("config", "tokenizer", "bins", "sampling", "world", "train", "frozen", "step")


def export_weights(ckpt, path, weights="ema", dtype=torch.float32):
    """Write checkpoint dict `ckpt`'s `weights` ("ema" or "model") to `path` (.safetensors) atomically."""
    from safetensors.torch import save

    from data import _atomic_write
    if weights not in ("ema", "model") or weights not in ckpt:
        raise ValueError(f"the checkpoint holds no {weights!r} weights")
    with torch.device("meta"):
        buffers = {name for name, _ in MIRO(ModelConfig(**ckpt["config"])).named_buffers()}
    tensors = {f"{weights}.{name}": (t.to(dtype) if t.is_floating_point() and name not in buffers else t).contiguous()
               for name, t in ckpt[weights].items()}
    metadata = {"format": EXPORT_FORMAT, "dtype": str(dtype).removeprefix("torch."),
                **{key: json.dumps(ckpt[key]) for key in EXPORT_ENTRIES if key in ckpt}}
    _atomic_write(Path(path), lambda f: f.write(save(tensors, metadata)))


def _is_safetensors(path):
    """Whether the file starts as safetensors do: an 8-byte header length, then the JSON header's "{"."""
    with open(path, "rb") as f:
        return f.read(9)[8:] == b"{"


def _load_exported(path):
    """The checkpoint dict of an exported .safetensors file (weights in float32)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != EXPORT_FORMAT:  # before reading a foreign file's tensors
                raise ValueError(f"{path}: not a MIRO export (model.py export writes them; this file's metadata "
                                 f"has format {metadata.get('format')!r})")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {path} (truncated, or not safetensors): {e}") from None
    ckpt = {key: json.loads(metadata[key]) for key in EXPORT_ENTRIES if key in metadata}
    for name, t in tensors.items():
        weights, _, param = name.partition(".")
        ckpt.setdefault(weights, {})[param] = t.float() if t.is_floating_point() else t
    return ckpt


def model_from_checkpoint(ckpt, ema=True):
    """(model in eval mode on the CPU, tokenizer) from a checkpoint dict with "config", "tokenizer", "model" and
    "ema" entries; the EMA weights unless ema=False."""
    try:
        cfg = ModelConfig(**ckpt["config"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"checkpoint has no valid model config: {e}") from e
    if ("ema" if ema else "model") not in ckpt and ("model" if ema else "ema") in ckpt:  # an export holds one set
        raise ValueError("this checkpoint holds the raw weights only, not the EMA (sample.py --no-ema samples them)"
                         if ema else "this checkpoint holds the EMA weights only (model.py export --weights model "
                                     "exports the raw ones)")
    missing = [k for k in ("ema" if ema else "model", "tokenizer") if k not in ckpt]
    if missing:
        raise ValueError(f"not a MIRO checkpoint: no {', '.join(missing)}")
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = MIRO(cfg)
    try:
        model.load_state_dict(ckpt["ema" if ema else "model"], assign=True)
    except (RuntimeError, TypeError) as e:  # wrong keys or shapes, or no state dict at all (e.g. None), in one line
        raise ValueError(f"checkpoint weights do not fit its config: {' '.join(str(e).split())[:300]}") from e
    try:
        tokenizer = WordTokenizer.from_state_dict(ckpt["tokenizer"])
    except (KeyError, TypeError, AttributeError) as e:  # an entry missing, not a dict, or words not strings
        raise ValueError(f"checkpoint has no valid tokenizer (needs words and max_len): {e!r}") from e
    return model.eval(), tokenizer


#################################################################################
#             Frozen text encoders, SDXL latents and their caches               #
#################################################################################
# Frozen encoders live outside the generator and hand it float inputs:
# - text: encoder(captions) -> (features float32 (B, L, dim), mask bool (B, L)), L = encoder.max_length, for a MIRO
#   config with vocab_size=0 and text_dim=encoder.dim. Features at padded positions are exactly zero (the model
#   ignores them: the key padding mask), so cached and computed batches agree everywhere.
# - images: SDXLVAE.encode(images in [-1, 1]) -> normalised latents (B, 4, H/8, W/8) for in_channels=4 and
#   image_size=H/8; SDXLVAE.decode inverts it.
# Every encoder is frozen (eval, requires_grad False, run under no_grad), runs in bf16 on CUDA (precision="fp32" to
# turn it off; the CPU always runs fp32), takes a hub id (downloaded by its library) or a local folder in the same
# layout, and loads strictly: a missing, unexpected or mis-shaped key is a one-line ValueError.

def _frozen_dtype(device, precision):
    """The dtype a frozen encoder runs in: bf16 on CUDA unless precision="fp32"; fp32 on the CPU (where bf16 is slow
    and buys nothing)."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be bf16 or fp32, got {precision!r}")
    return torch.bfloat16 if torch.device(device).type == "cuda" and precision == "bf16" else torch.float32


def _check_loading(source, cls, info):
    """ValueError unless from_pretrained(..., output_loading_info=True) used every tensor of `source` exactly."""
    bad = {k: sorted(v)[:3] for k, v in info.items() if k != "error_msgs" and v}
    if bad:
        raise ValueError(f"{source}: weights do not match {cls.__name__}: {bad}")


def _hub_source(source):
    """ValueError for a file given as source=: from_pretrained reads a folder (or hub id), and on a file fails deep
    inside (a KeyError, an UnpicklingError)."""
    if Path(source).is_file():
        raise ValueError(f"source={source}: a folder in the hub layout (or a hub id), not a file")
    return source


class T5TextEncoder:
    """Frozen (FLAN-)T5 encoder: the last hidden states of T5EncoderModel, padded/truncated to max_length tokens,
    EOS included (the paper: 256 in training, 77 at inference; here max_length in both, the same features for every
    prompt of at most 77 tokens since padding is masked, and longer prompts are not cut). The encoder runs only up to
    the batch's longest caption (a real token's state does not depend on masked padding) and the output is
    zero-padded to max_length: web captions are mostly under 40 tokens, so this is several times cheaper than
    running 256. `source` holds a full T5 checkpoint (as on the hub); T5EncoderModel skips the decoder's tensors."""

    def __init__(self, source="google/flan-t5-xl", max_length=256, device="cpu", precision="bf16"):
        from transformers import AutoTokenizer, T5EncoderModel
        if not str(max_length).isdigit() or int(max_length) < 1:  # checked before the (slow) load
            raise ValueError(f"t5: max_length must be a positive integer, got {max_length!r}")
        model, info = T5EncoderModel.from_pretrained(_hub_source(source), output_loading_info=True)
        _check_loading(source, T5EncoderModel, info)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.device, self.max_length = torch.device(device), int(max_length)
        self.model = model.to(self.device, _frozen_dtype(device, precision)).eval().requires_grad_(False)
        self.dim = model.config.d_model
        self.name = f"t5:{source}"

    @torch.no_grad()
    def __call__(self, captions):
        t = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.max_length,
                           return_tensors="pt")
        ids, mask = t["input_ids"].to(self.device), t["attention_mask"].to(self.device).bool()  # (B, l), l <= L
        h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (B, l, dim)
        pad = self.max_length - ids.shape[1]
        return F.pad(h.masked_fill(~mask[..., None], 0.0), (0, 0, 0, pad)), F.pad(mask, (0, pad))  # (B, L, ...)


class CLIPTextEncoder:
    """Frozen CLIP text tower (open_clip; OpenAI ViT-L/14 by default, QuickGELU as trained): the per-token hidden
    states after ln_final (not the pooled, projected vector), over CLIP's 77-token context. The causal attention
    makes a token's state independent of what follows it; the mask marks start-of-text .. end-of-text.
    checkpoint / model_config: local weights and a custom architecture, as `rewards.load_open_clip` takes them."""

    def __init__(self, arch="ViT-L-14", pretrained="openai", checkpoint=None, model_config=None, device="cpu",
                 precision="bf16"):
        import open_clip
        import rewards  # one home for open_clip loading (strict local weights, custom configs, QuickGELU)
        model = rewards.load_open_clip(arch, pretrained, checkpoint, model_config, quick_gelu=True, device="cpu").model
        if not hasattr(model, "token_embedding"):
            raise ValueError(f"{arch}: only open_clip's built-in CLIP text tower is supported, not a custom text model")
        del model.visual  # the image tower is not needed (0.3B parameters for ViT-L/14)
        self.tokenizer = open_clip.get_tokenizer(Path(model_config).stem if model_config else arch)
        self.device = torch.device(device)
        self.model = model.to(self.device, _frozen_dtype(device, precision)).eval().requires_grad_(False)
        self.dim, self.max_length = model.transformer.width, model.context_length
        self.name = f"clip:{Path(model_config).stem if model_config else arch}:{checkpoint or pretrained}"

    @torch.no_grad()
    def __call__(self, captions):
        m = self.model
        tokens = self.tokenizer(list(captions)).to(self.device)  # (B, 77): SOT, words, EOT, zeros (truncated: EOT last)
        eot = (tokens == self.tokenizer.eot_token_id).int().argmax(dim=1)  # first end-of-text
        mask = torch.arange(tokens.shape[1], device=self.device)[None] <= eot[:, None]  # (B, 77)
        x = m.token_embedding(tokens) + m.positional_embedding  # (B, 77, width)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask)).float()  # as CLIP.encode_text, before pooling
        return x.masked_fill(~mask[..., None], 0.0), mask


TEXT_ENCODERS = {"t5": T5TextEncoder, "clip": CLIPTextEncoder}


def load_text_encoder(name, device="cpu", **options):
    """A frozen text encoder by name ("t5", "clip") with its constructor's options (source=, max_length=, ...), or
    None for "builtin": the model's own trainable word embedding, fed by a WordTokenizer."""
    if name == "builtin":
        return None
    if name not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; known: builtin, {', '.join(TEXT_ENCODERS)}")
    return _construct(TEXT_ENCODERS[name], f"text encoder {name}", device, options)


def _construct(cls, what, device, options):
    """cls(device=device, **options), where an unknown or missing option is a ValueError naming `what`."""
    try:
        inspect.signature(cls).bind(device=device, **options)
    except TypeError as e:
        raise ValueError(f"{what}: {e}") from e
    return cls(device=device, **options)


def trim_padding(features, mask):
    """Cut a batch to its longest real sequence: the model's output does not change (the padding is masked), the
    condition transformer and the cross-attention get cheaper (FLAN-T5 captions are mostly far below 256 tokens)."""
    length = max(int(mask.sum(dim=1).max()), 1)
    return features[:, :length], mask[:, :length]


# SDXL VAE latents. The one definition of the latent normalisation (the paper's constants, per channel, measured
# on SDXL VAE latents): z_n = (z - LATENT_MEAN) / LATENT_STD * LATENT_SCALE, so every channel has mean 0 and std
# 0.5; z is a SAMPLE of the posterior N(mean, std^2). diffusers' single `scaling_factor` (0.13025) is not used.
LATENT_MEAN = (-0.3480, 0.3754, 0.0419, 2.4331)
LATENT_STD = (7.8518, 5.8465, 6.8716, 5.3140)
LATENT_SCALE = 0.5


def key_generator(key, seed=0):
    """A CPU torch.Generator seeded from (seed, key): a sample's posterior noise depends on nothing else (not the
    batch, rank or device), so cached and recomputed latents agree."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class SDXLVAE:
    """Frozen SDXL VAE (diffusers AutoencoderKL, stabilityai/sdxl-vae): [-1, 1] images (B, 3, H, W) <-> normalised
    latents (B, 4, H/8, W/8). Runs under bf16 autocast on CUDA (GroupNorm stays fp32; the fp16 overflow of this VAE
    does not occur in bf16), sampling and normalisation in fp32."""

    def __init__(self, source="stabilityai/sdxl-vae", subfolder=None, device="cpu", precision="bf16"):
        from diffusers import AutoencoderKL
        model, info = AutoencoderKL.from_pretrained(_hub_source(source), subfolder=subfolder, output_loading_info=True,
                                                    low_cpu_mem_usage=False)
        _check_loading(source, AutoencoderKL, info)
        if model.config.latent_channels != len(LATENT_MEAN):
            raise ValueError(f"{source}: {model.config.latent_channels} latent channels, the SDXL normalisation has "
                             f"{len(LATENT_MEAN)}")
        self.device = torch.device(device)
        self.bf16 = _frozen_dtype(device, precision) == torch.bfloat16
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.factor = 2 ** (len(model.config.block_out_channels) - 1)  # 8 for SDXL
        self.latent_channels = len(LATENT_MEAN)  # 4, checked against the model's above
        self.name = f"sdxl-vae:{source}" + (f"/{subfolder}" if subfolder else "")

    @staticmethod
    def normalize(z):
        mean, std = (z.new_tensor(v).view(1, -1, 1, 1) for v in (LATENT_MEAN, LATENT_STD))
        return (z - mean) / std * LATENT_SCALE

    @staticmethod
    def denormalize(z_n):
        mean, std = (z_n.new_tensor(v).view(1, -1, 1, 1) for v in (LATENT_MEAN, LATENT_STD))
        return z_n / LATENT_SCALE * std + mean

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16)

    @torch.no_grad()
    def encode(self, images, generator=None):
        """images float (B, 3, H, W) in [-1, 1] -> normalised posterior samples (B, 4, H/8, W/8) float32.
        generator: a CPU torch.Generator, or a list of one per image (see `key_generator`); None = global RNG."""
        with self._autocast():
            posterior = self.model.encode(images.to(self.device)).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()
        if isinstance(generator, (list, tuple)):
            if len(generator) != len(mean):
                raise ValueError(f"{len(generator)} generators for {len(mean)} images")
            eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generator])  # a stream per image
        else:
            eps = torch.randn(mean.shape, generator=generator)  # (B, 4, h, w), drawn on the CPU
        return self.normalize(mean + std * eps.to(self.device))

    @torch.no_grad()
    def decode(self, z_n):
        """Normalised latents (B, 4, h, w) -> images float32 (B, 3, 8h, 8w), nominally in [-1, 1] (not clamped)."""
        with self._autocast():
            return self.model.decode(self.denormalize(z_n.to(self.device).float())).sample.float()


def load_vae(name, device="cpu", **options):
    """The latent space by name: None for "none" (pixel space), an SDXLVAE for "sdxl" (options: source=,
    subfolder=, precision=)."""
    if name == "none":
        return None
    if name != "sdxl":
        raise ValueError(f"unknown VAE {name!r}; known: none, sdxl")
    return _construct(SDXLVAE, "VAE sdxl", device, options)


def load_frozen(spec, device="cpu"):
    """(text encoder or None, VAE or None) from a spec {"text_encoder": {"name": ..., **options}, "vae": {"name": ...,
    **options}} as train.py stores it in checkpoints (absent entries: the built-in text embedding, pixel space)."""
    spec = spec or {}
    text = dict(spec.get("text_encoder") or {"name": "builtin"})
    vae = dict(spec.get("vae") or {"name": "none"})
    try:
        return load_text_encoder(text.pop("name"), device, **text), load_vae(vae.pop("name"), device, **vae)
    except OSError as e:  # the hub libraries' "no such file" is what an offline machine sees
        raise OSError(f"{' '.join(str(e).split())[:300]} (weights come from the Hugging Face hub unless the option "
                      f"source=DIR names a local copy)") from None


def frozen_spec(text_encoder="builtin", text_options=(), vae="none", vae_options=()):
    """The spec `load_frozen` takes, from command-line values: names and "KEY=VALUE" option strings (ValueError for
    a malformed item, or for options given to the built-in text embedding / pixel space)."""
    spec = {}
    for part, name, items, off in (("text_encoder", text_encoder, text_options, "builtin"),
                                   ("vae", vae, vae_options, "none")):
        options = {}
        for item in items:
            key, eq, value = item.partition("=")
            if not (key and eq):
                raise ValueError(f"--{part.replace('_', '-')}-option {item!r} is not of the form KEY=VALUE")
            options[key] = value
        if name == off and options:
            raise ValueError(f"--{part.replace('_', '-')}-option needs --{part.replace('_', '-')} other than {off}")
        if name != off:
            spec[part] = {"name": name, **options}
    return spec


def add_frozen_args(parser):
    """The --text-encoder / --vae flags (and their options) shared by train.py and `model.py precompute`."""
    parser.add_argument("--text-encoder", default="builtin", choices=["builtin", *TEXT_ENCODERS],
                        help="builtin: a trainable word embedding (the built-in data); t5: frozen FLAN-T5 (the paper: "
                             "source=google/flan-t5-xl, the default); clip: the frozen CLIP ViT-L/14 text tower")
    parser.add_argument("--text-encoder-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a constructor option of the frozen text encoder, e.g. source=DIR, max_length=256 "
                             "(repeatable; model.T5TextEncoder / CLIPTextEncoder list them)")
    parser.add_argument("--vae", default="none", choices=["none", "sdxl"],
                        help="none: pixel space; sdxl: the frozen SDXL VAE's latents (the preset's image_size is "
                             "then the latent side; images are 8x larger)")
    parser.add_argument("--vae-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a constructor option of the VAE, e.g. source=DIR, precision=fp32 (repeatable)")


def adapt_config(cfg, text_encoder=None, vae=None):
    """The model config that fits these frozen parts: float text features of the encoder's width and length
    (vocab_size 0), and the VAE's latent channels (image_size stays the latent side), or RGB pixels without a VAE
    (so the paper preset, made for SDXL latents, also runs in pixel space)."""
    if text_encoder is not None:
        cfg = dataclasses.replace(cfg, vocab_size=0, text_dim=text_encoder.dim, max_text_len=text_encoder.max_length)
    return dataclasses.replace(cfg, in_channels=vae.latent_channels if vae is not None else 3)


# Caches of frozen-encoder outputs, one folder each:
#   meta.json        what was encoded and how; a resumed precompute or a reader with other settings is a ValueError
#   chunk-{W}x{r}-{i}.safetensors   written whole (tmp + rename) by rank r of W: "data" = its samples' items
#                    concatenated on dim 0 (fp16 by default), "offsets" (n + 1,) int64, and its keys (JSON metadata)
#   index.npy / index.json   sorted keys -> (chunk, row) over every rank's chunks / the chunk names it covers,
#                    merged by rank 0 once all ranks are done; readers memory-map it (shared by dataloader workers)
# A text item is one caption's real tokens (length, dim): padding is never stored. A latent item is (1, 4, h, w).
# A crash loses at most the chunks being written; a resumed precompute skips every key found in a complete chunk.

EMPTY_CAPTION_KEY = ""  # every text cache also holds the empty caption (text dropout, the baseline's negative prompt)
TEXT_KEYS = "key[@field]#sha1(caption)[:12]"  # how a text cache names its entries (data.text_key)


def _chunk_names(root):
    return sorted(p.name for p in Path(root).glob("chunk-*.safetensors"))


def _chunk_keys(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["keys"])


def cached_keys(root) -> set[str]:
    """Every key stored in the cache folder's chunk files (what a rerun skips)."""
    return {k for name in _chunk_names(root) for k in _chunk_keys(Path(root) / name)}


def merge_cache_index(root):
    """Write index.npy (sorted utf-8 keys, chunk, row) and index.json (the chunk names) over every chunk file. A key
    stored twice (a dataset whose keys are not unique across shards, which data.py asks them to be) keeps its copy
    in the first chunk by name, with a warning; returns the number of such keys."""
    from data import _atomic_write
    root = Path(root)
    chunks = _chunk_names(root)
    keys, chunk_ids, rows = [], [], []
    for c, name in enumerate(chunks):
        names = _chunk_keys(root / name)
        keys += names
        chunk_ids += [c] * len(names)
        rows += range(len(names))
    encoded = np.array([k.encode() for k in keys] or [b""])[: len(keys)]
    index = np.empty(len(keys), dtype=[("key", encoded.dtype), ("chunk", "<i4"), ("row", "<i8")])
    index["key"], index["chunk"], index["row"] = encoded, chunk_ids, rows
    index.sort(order=["key", "chunk"], kind="stable")
    again = np.flatnonzero(index["key"][1:] == index["key"][:-1]) + 1  # a key's later copies
    if len(again):
        print(f"warning: {root}: {len(again)} key(s) stored twice (e.g. {index['key'][again[0]].decode()!r}): the "
              f"dataset's keys are not unique; the first chunk's copy is kept", flush=True)
        index = np.delete(index, again)
    _atomic_write(root / "index.npy", lambda f: np.save(f, index))
    _atomic_write(root / "index.json", lambda f: f.write(json.dumps({"chunks": chunks, "count": len(index)}).encode()))
    return len(again)


class CacheMiss(KeyError):
    """A key that a cache folder does not hold: the cache was made for other data."""

    def __str__(self):  # the message itself, not KeyError's repr of it
        return str(self.args[0])


class ArrayCache:
    """Reads a cache folder: .meta, len(), items(keys) -> list of float32 tensors (len_i, ...). At most
    MAX_OPEN chunk files are held open (memory-mapped) per process, the least recently used closed first: a 16M-image
    cache has thousands of chunks, more than the kernel's map count allows."""
    MAX_OPEN = 256

    def __init__(self, root):
        self.root = Path(root)
        if not (self.root / "meta.json").is_file():
            raise FileNotFoundError(f"no cache at {self.root} (meta.json missing)")
        self.meta = json.loads((self.root / "meta.json").read_text())
        index_json = self.root / "index.json"
        self.chunks = _chunk_names(self.root)
        if not index_json.is_file() or json.loads(index_json.read_text())["chunks"] != self.chunks:
            raise ValueError(f"{self.root}: the index is missing or does not cover the chunk files; finish the "
                             f"precompute (rank 0 merges the index at the end) or call merge_cache_index")
        self.index = np.load(self.root / "index.npy", mmap_mode="r")
        self._open = {}  # chunk id -> (safetensors handle, offsets), opened lazily in each process, in use order

    def __getstate__(self):  # dataloader workers open their own handles
        return {**self.__dict__, "_open": {}}

    def __len__(self):
        return len(self.index)

    def _find(self, key):
        k = key.encode()
        i = int(np.searchsorted(self.index["key"], k))
        if i == len(self.index) or self.index["key"][i] != k:
            return None
        return int(self.index["chunk"][i]), int(self.index["row"][i])

    def items(self, keys):
        from safetensors import safe_open
        out = []
        for key in keys:
            found = self._find(key)
            if found is None:
                raise CacheMiss(f"key {key!r} is not in the cache {self.root}: it was made for other data (another "
                                f"dataset or --min-image-size?); run model.py precompute on this --data again")
            c, row = found
            if c not in self._open:
                if len(self._open) >= self.MAX_OPEN:
                    del self._open[next(iter(self._open))]  # the least recently used
                f = safe_open(self.root / self.chunks[c], "pt")
                self._open[c] = (f, f.get_tensor("offsets").tolist())
            self._open[c] = self._open.pop(c)  # most recently used last
            f, offsets = self._open[c]
            out.append(f.get_slice("data")[offsets[row]: offsets[row + 1]].float())
        return out


class TextEmbeddingCache:
    """Cached text features: cache(keys) -> (features float32 (B, max_length, dim), mask (B, max_length)), the batch
    the encoder that filled it (.name, .dim, .max_length) returns for those captions, within fp16 rounding;
    cache(keys, trim=True) is the same cut to the batch's longest caption (trim_padding's result, without building
    the full width: 268 MB for 128 FLAN-T5-XL captions of 256 tokens, each training step)."""

    def __init__(self, root):
        self.cache = ArrayCache(root)
        meta = self.cache.meta
        if meta.get("kind") != "text":
            raise ValueError(f"{root} is not a text-embedding cache (kind {meta.get('kind')!r})")
        if meta.get("keys") != TEXT_KEYS:
            raise ValueError(f"{root} is a text cache of an older model.py (its keys lack their caption's hash): "
                             f"run model.py precompute again into a new --out")
        self.name, self.dim, self.max_length = meta["encoder"], meta["dim"], meta["max_length"]

    def __call__(self, keys, trim=False):
        items = self.cache.items(keys)
        length = max([1, *map(len, items)]) if trim else self.max_length
        features = torch.zeros(len(items), length, self.dim)
        mask = torch.zeros(len(items), length, dtype=torch.bool)
        for i, x in enumerate(items):  # the real tokens come first (right padding)
            features[i, : len(x)], mask[i, : len(x)] = x, True
        return features, mask


class LatentCache:
    """Cached normalised SDXL latents: cache(keys) -> (B, 4, h, w) float32, equal to SDXLVAE.encode(images,
    [key_generator(key, .seed) for key in keys]) within fp16 rounding."""

    def __init__(self, root):
        self.cache = ArrayCache(root)
        meta = self.cache.meta
        if meta.get("kind") != "latent":
            raise ValueError(f"{root} is not a latent cache (kind {meta.get('kind')!r})")
        self.name, self.image_size, self.seed = meta["vae"], meta["image_size"], meta["seed"]
        self.min_image_size = meta.get("min_image_size", 0)  # images smaller than this were not encoded
        self.data = meta.get("data")  # data.dataset_identity of the images (None: not recorded)
        normalised = [meta.get("mean"), meta.get("std"), meta.get("scale")]
        if normalised != [list(LATENT_MEAN), list(LATENT_STD), LATENT_SCALE]:
            raise ValueError(f"{root} holds latents normalised with mean, std, scale {normalised}, not this "
                             f"model.py's {[list(LATENT_MEAN), list(LATENT_STD), LATENT_SCALE]}: precompute again")

    def __call__(self, keys):
        return torch.cat(self.cache.items(keys))


def precompute_cache(root, records, encode, meta, rank=0, world_size=1, batch_size=64, chunk_size=1024,
                     dtype=torch.float16, split=True):
    """Encode (key, item) records into the cache folder `root`, alone or as one rank of a torchrun job; returns how
    many samples this rank encoded. Every rank iterates the same records and takes every world_size-th one from
    the rank-th (split=False: `records` is already this rank's share), skipping keys already cached (resume,
    under any world size). encode(keys, items) -> one tensor
    (len_i, ...) per item. When all ranks are done (a barrier if torch.distributed is initialised: give the
    process group a timeout longer than the slowest rank's work), rank 0 merges the index."""
    from safetensors.torch import save
    from data import _atomic_write
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    meta = json.loads(json.dumps({**meta, "dtype": str(dtype).removeprefix("torch.")}))  # as read back from JSON
    if (root / "meta.json").is_file():
        old = json.loads((root / "meta.json").read_text())
        if old != meta:
            diff = {k: (old.get(k), meta.get(k)) for k in sorted(set(old) | set(meta)) if old.get(k) != meta.get(k)}
            raise ValueError(f"{root} holds another cache (cached, wanted): {diff}")
    elif rank == 0:
        _atomic_write(root / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        torch.distributed.barrier()  # every rank reads what is done before any rank writes a new chunk
    done = cached_keys(root)
    prefix = f"chunk-{world_size}x{rank:04d}-"
    n_chunks = 1 + max((int(name[len(prefix):].split(".")[0]) for name in _chunk_names(root)
                        if name.startswith(prefix)), default=-1)  # after the last, even if one was deleted
    mine = (r for i, r in enumerate(records) if (not split or i % world_size == rank) and r[0] not in done)
    keys, items, written = [], [], 0
    while True:
        batch = list(itertools.islice(mine, batch_size))
        if batch:
            batch_keys, batch_items = map(list, zip(*batch))
            keys += batch_keys
            items += [x.to("cpu", dtype) for x in encode(batch_keys, batch_items)]
        while len(keys) >= chunk_size or (keys and not batch):  # full chunks, then the remainder at the end
            data = torch.cat(items[:chunk_size])
            if not torch.isfinite(data).all():
                raise ValueError(f"non-finite values after casting to {dtype} (overflow?); try dtype=bfloat16")
            offsets = torch.tensor([0] + [len(x) for x in items[:chunk_size]]).cumsum(0)
            blob = save({"data": data, "offsets": offsets}, metadata={"keys": json.dumps(keys[:chunk_size])})
            _atomic_write(root / f"{prefix}{n_chunks:06d}.safetensors", lambda f: f.write(blob))
            n_chunks, written = n_chunks + 1, written + len(keys[:chunk_size])
            del keys[:chunk_size], items[:chunk_size]
        if not batch:
            break
    if distributed:
        torch.distributed.barrier()
    if rank == 0:
        merge_cache_index(root)
    return written


def precompute_text_embeddings(root, records, encoder, rank=0, world_size=1, batch_size=64, chunk_size=1024,
                               dtype=torch.float16, split=True):
    """Cache encoder(captions) for (key, caption) records (plus the empty caption under EMPTY_CAPTION_KEY): only each
    caption's real tokens are stored; TextEmbeddingCache pads them back to encoder.max_length."""
    def encode(keys, captions):
        features, mask = encoder(captions)
        features, lengths = features.cpu(), mask.sum(dim=1).tolist()  # one copy and one sync per batch, not per caption
        return [f[:n] for f, n in zip(features, lengths)]
    meta = {"kind": "text", "encoder": encoder.name, "dim": encoder.dim, "max_length": encoder.max_length,
            "keys": TEXT_KEYS}
    records = itertools.chain([(EMPTY_CAPTION_KEY, "")] if rank == 0 or split else [], records)
    return precompute_cache(root, records, encode, meta, rank, world_size, batch_size, chunk_size, dtype, split)


def precompute_latents(root, records, vae, image_size, seed=0, rank=0, world_size=1, batch_size=64,
                       chunk_size=4096, dtype=torch.float16, split=True, min_image_size=0, data=None):
    """Cache normalised SDXL latents for (key, image float (3, image_size, image_size) in [-1, 1]) records, each
    sampled from its posterior with key_generator(key, seed) (so the same on any rank, batch or rerun).
    min_image_size: the records' own filter (data.open_dataset's min_size), recorded so that a training run that
    keeps smaller images is refused at its start rather than at the first image the cache lacks. data: where the
    images come from (data.dataset_identity), recorded so that a run on other data is refused: keys alone do not
    tell two datasets apart (img2dataset's are positions; the built-in world's do not say its size)."""
    def encode(keys, images):
        x = torch.stack(images)
        if x.shape[-2:] != (image_size, image_size):
            raise ValueError(f"images must be {image_size}x{image_size}, got {tuple(x.shape[-2:])}")
        return list(vae.encode(x, [key_generator(k, seed) for k in keys])[:, None])  # (1, 4, h, w) each
    meta = {"kind": "latent", "vae": vae.name, "image_size": image_size, "seed": seed,
            "mean": LATENT_MEAN, "std": LATENT_STD, "scale": LATENT_SCALE, "min_image_size": min_image_size,
            "data": data}
    return precompute_cache(root, records, encode, meta, rank, world_size, batch_size, chunk_size, dtype, split)



#################################################################################
#                                 Command line                                  #
#################################################################################

def precompute(args):
    """Fill the text-embedding and/or latent cache of a dataset, alone or under torchrun (each rank encodes its
    share of the records; rank 0 merges the index). Resumable: a rerun skips every key already cached. The text
    pass reads captions only (no image is decoded, so it also caches the captions of samples whose images training
    skips: unused entries); the latent pass decodes only the images it still has to encode."""
    import data
    from datetime import timedelta
    # under torchrun: a long timeout, since ranks finish their shares at different times
    rank, world_size, device = data.init_distributed(args.device, timeout=timedelta(hours=12))
    sources = {"text": data.open_dataset(args.data, decode=False),  # captions only: no image is decoded
               "latents": data.open_dataset(args.data, min_size=args.min_image_size)}
    Path(args.out).mkdir(parents=True, exist_ok=True)  # the data and the output first: loading encoders is slow
    text_encoder, vae = load_frozen(frozen_spec(args.text_encoder, args.text_encoder_option, args.vae,
                                                args.vae_option), device)

    def records(what, skip=()):  # this rank's usable records, with a progress bar on rank 0
        for record in tqdm(sources[what].iter_records(rank, world_size, skip=skip), desc=f"{what} (rank 0's share)",
                           disable=rank > 0, unit="img"):
            if record.error:
                continue
            if what == "text":
                yield from ((data.text_key(record.key, f, record.captions[f]), record.captions[f])
                            for f in ("caption", data.SYNTHETIC) if record.captions.get(f))
            else:
                yield record.key, data.center_crop_resize(record.image, args.image_size).float() / 127.5 - 1

    out = Path(args.out)
    options = dict(rank=rank, world_size=world_size, batch_size=args.batch_size, split=False)
    if text_encoder is not None:
        n = precompute_text_embeddings(out / "text", records("text"), text_encoder, **options)
        print(f"rank {rank}: {n} captions encoded into {out / 'text'}", flush=True)
    if vae is not None:
        done = cached_keys(out / "latents")  # a rerun decodes only the images it still encodes
        n = precompute_latents(out / "latents", records("latents", done), vae, args.image_size, seed=args.seed,
                               min_image_size=getattr(sources["latents"], "min_size", 0),
                               data=data.dataset_identity(args.data), **options)
        print(f"rank {rank}: {n} images encoded into {out / 'latents'}", flush=True)
    if world_size > 1:
        torch.distributed.destroy_process_group()


def export(args):
    """Write a run's weights as one .safetensors file to share: no optimizer state, no pickle; sample.py --ckpt and
    evaluate.py --ckpt take it like the run's ckpt.pt."""
    path = Path(args.ckpt)
    path = path / "ckpt.pt" if path.is_dir() else path
    ckpt = load_checkpoint(path)
    name = f"{path.resolve().parent.name}_step{ckpt.get('step', 0):07d}.safetensors"  # e.g. miro_step0001400
    out = Path(args.out) if args.out else path.parent / name
    model_from_checkpoint(ckpt, ema=args.weights == "ema")  # refuse what would not load back
    out.parent.mkdir(parents=True, exist_ok=True)
    export_weights(ckpt, out, args.weights, getattr(torch, args.dtype))
    print(f"{out}: the {args.weights} weights of {path} at step {ckpt.get('step')} in {args.dtype} "
          f"({out.stat().st_size / 1e6:.1f} MB)")


def print_parameters(args):
    for name in [args.preset] if args.preset else PRESETS:
        cfg = get_config(name)
        with torch.device("meta"):  # counts parameters without allocating them
            model = MIRO(cfg)
        tokens = (cfg.image_size // cfg.patch_size) ** 2
        print(f"{name:>6}: {count_parameters(model) / 1e6:8.2f}M parameters  (width {cfg.width}, depth "
              f"{cfg.depth}, heads {cfg.num_heads}, {tokens} image tokens, {len(cfg.reward_names)} rewards)")


def main(argv=None):
    import data  # its seed_arg, shared by every script's --seed
    parser = argparse.ArgumentParser(description="Model presets, frozen-encoder caches and weight export. With no "
                                                 "command: the parameter count of every preset.")
    parser.add_argument("--preset", choices=list(PRESETS), help="one preset (default: all)")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("precompute", help="encode a dataset's captions / images into caches train.py reads",
                       description=precompute.__doc__)
    p.add_argument("--data", required=True, help="a dataset in any format data.py reads (as train.py --data)")
    p.add_argument("--out", required=True,
                   help="cache folder: OUT/text and OUT/latents (train.py --text-cache OUT/text --latent-cache "
                        "OUT/latents)")
    add_frozen_args(p)
    p.add_argument("--image-size", type=int, default=256, help="pixel side the images are cropped to (the paper: 256)")
    p.add_argument("--seed", type=data.seed_arg, default=0,
                   help="seed of each image's posterior sample (with its key)")
    p.add_argument("--min-image-size", type=int, default=0, help="skip images whose shorter side is below this")
    p.add_argument("--batch-size", type=int, default=64, help="samples per encoder call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device type")
    p = sub.add_parser("export", help="write a run's weights as one .safetensors file to share",
                       description=export.__doc__)
    p.add_argument("--ckpt", required=True, help="a run folder or checkpoint file")
    p.add_argument("--out", default=None, help="output file (default: RUN/NAME_stepSTEP.safetensors)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="the EMA weights (what sample.py uses) or the raw ones")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="storage type of the weights (read back as float32; bfloat16 halves the file)")
    args = parser.parse_args(argv)
    if args.command == "export":
        if args.out and Path(args.out).suffix != ".safetensors":
            parser.error(f"--out {args.out}: the export is a .safetensors file")
        try:
            return export(args)
        except (OSError, ValueError) as e:
            parser.error(" ".join(str(e).split())[:400])
    if args.command != "precompute":
        return print_parameters(args)
    if args.text_encoder == "builtin" and args.vae == "none":
        parser.error("nothing to precompute: give --text-encoder t5|clip and/or --vae sdxl")
    if args.image_size <= 0 or args.batch_size <= 0:
        parser.error("--image-size and --batch-size must be > 0")
    try:
        precompute(args)
    except (OSError, ValueError, RuntimeError) as e:
        parser.error(" ".join(str(e).split())[:400])


if __name__ == "__main__":
    main()
