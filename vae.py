"""Stage 1: the track VAE (supplement Sec. B, Table F).

64 frames of point tracks + the start frame's DINOv2 tokens -> a 16x16 grid of 16-channel latents. The
decoder is queried at any start point (x, y) and returns that point's trajectory, so dense motion is
"query every pixel". This file also holds the building blocks (RMSNorm, SwiGLU, axial RoPE, attention,
the transformer layer, Fourier point embeddings) and the training helpers that planner.py and policy.py
import.

    python vae.py                                   # tiny preset, synthetic data -> out/tiny/vae/ckpt.pt
    python vae.py --preset paper --dry-run          # build the Table F model, print the parameter split
    torchrun --nproc_per_node=2 vae.py --micro_batch=8   # global batch 16 = 8 per process x 2
    python vae.py --resume=true                     # continue from out_dir/ckpt.pt

Conventions (DESIGN.md): coordinates (x, y) in [-1, 1]; tracks [B, N, T, 2]; RoPE positions (t, y, x).
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VAEConfig:
    preset: str = "tiny"
    # data (data.py)
    data: str = "synthetic"            # "synthetic", a folder of .npz clips, or .tar shards
    n_frames: int = 64
    n_enc: int = 40                    # tracks the encoder sees (release: 40) ...
    n_dec: int = 40                    # ... plus held-out tracks only the decoder reconstructs ("MAE")
    synth_tracks: int = 1024           # tracker points per synthetic clip
    # image encoder: DINOv2 ViT-B/14 with registers (hub name or local path), "random" (built from the fields below),
    # or "conv" (ConvStandIn: a small CNN, the tiny robot path's stand-in; image_dim wide, image_patch's grid)
    image_encoder: str = "facebook/dinov2-with-registers-base"
    image_size: int = 224
    image_dim: int = 768
    image_layers: int = 12
    image_heads: int = 12
    image_patch: int = 14
    image_registers: int = 4
    image_pos_size: int = 518          # DINOv2's position-embedding grid (interpolated to image_size)
    freeze_image_encoder: bool = True  # Table F: frozen at first ...
    unfreeze_image_encoder_at: int = -1  # ... unlocked at this step (-1 = never)
    # model (Table F)
    dim: int = 768
    enc_layers: int = 12
    dec_layers: int = 12
    head_dim: int = 64
    ffn_mult: int = 3
    latent_channels: int = 16
    grid_size: int = 16
    temporal_slots: int = 1            # Sec. D: 1 = one grid for all 64 frames (64x compression)
    latent_layout: str = "grid"        # Fig. J: "grid" (grid RoPE positions) or "sequence" (no positions)
    position_content: bool = True      # track tokens and decoder queries also carry Fourier(t, y0, x0) as
                                       # content. The release gives them RoPE alone (False): then a token's time
                                       # is only in attention weights, which a short run does not learn to use
    encode_offsets: bool = False       # track tokens also embed the displacement from the start point (x - x0, y - y0),
                                       # the motion itself, which the release leaves to the layers to work out
    predict_offsets: bool = False      # Sec. B: absolute coordinates were best at scale; offsets from the start
                                       # point start at the static baseline, which a short CPU run needs
    fourier_bands: int = 32
    rope_max_freq_space: float = 40 * math.pi  # resolves about one pixel on [-1, 1] (DESIGN.md "Conventions")
    rope_max_freq_time: float = 10 * math.pi
    # loss (Table F, Table H)
    kl_weight: float = 1e-7
    recon_loss: str = "l1"             # Sec. B: L1 was best at scale; "l2" / "huber" were the alternatives
    track_dropout: float = 0.0         # Table H: drop tracks at random (from encoder and loss)
    mask_occluded: bool = False        # Table H: train on visible points only
    # optimisation (Table F)
    max_steps: int = 800_000
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    warmup_steps: int = 300
    decay_frac: float = 0.1            # WSD: linear decay to zero over this last fraction of steps
    batch_start: int = 64              # global batch ramp 64 -> 256 (Table F)
    batch_end: int = 256
    batch_ramp_steps: int = 100_000
    micro_batch: int = 16              # per process; accumulation = global batch / (micro_batch * world size)
    grad_clip: float = 1.0
    # run
    seed: int = 0
    out_dir: str = "out/paper/vae"
    resume: bool = False
    log_every: int = 50
    val_every: int = 5000
    val_clips: int = 32
    ckpt_every: int = 5000
    num_workers: int = 4
    device: str = "auto"
    compile: bool = False
    dry_run: bool = False


PRESETS = {
    "paper": {},
    # Small enough to learn on 2 CPU cores in minutes: 16 frames (the same motion, sampled coarser), an 8x8
    # grid, a 2-layer random DINOv2 at 112 px (8x8 patches) trained with the rest, narrow layers.
    "tiny": dict(
        n_frames=16, synth_tracks=256, image_encoder="random", image_size=112,
        image_dim=64, image_layers=2, image_heads=2, image_pos_size=112, freeze_image_encoder=False,
        dim=64, enc_layers=2, dec_layers=2, head_dim=32, latent_channels=8, grid_size=8, fourier_bands=16,
        n_enc=24, n_dec=24, predict_offsets=True, encode_offsets=True,
        max_steps=450, lr=2e-3, warmup_steps=100, decay_frac=0.2, batch_start=16, batch_end=16,
        batch_ramp_steps=1, micro_batch=16, log_every=25, val_every=150, val_clips=16, ckpt_every=150,
        num_workers=1, out_dir="out/tiny/vae"),
}
# The tiny VAE trained on the robot task's tracks (python data.py robot --out data/robot --n 640), for the tiny
# LIBERO planner and policy: the paper's one open-domain VAE has seen robot motion, the 450-step tiny VAE has
# only seen shapes on pans. 2000 steps, 25 min on 2 cores (planner.py, "Which VAE").
PRESETS["tiny_robot"] = dict(PRESETS["tiny"], data="data/robot", max_steps=2000, val_every=500, ckpt_every=250,
                             log_every=100, out_dir="out/tiny/vae-robot")


# ----------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """x / rms(x) * weight; with cond_dim, the scale is modulated by a conditioning vector (adaptive RMSNorm:
    weight * (1 + Linear(cond)), the linear zero-initialised so training starts from plain RMSNorm)."""

    def __init__(self, dim, cond_dim=None, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.cond = None
        if cond_dim:
            self.cond = nn.Linear(cond_dim, dim)
            nn.init.zeros_(self.cond.weight)
            nn.init.zeros_(self.cond.bias)

    def forward(self, x, cond=None):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype) * self.weight
        if self.cond is not None:
            x = x * (1 + self.cond(cond).unsqueeze(1))
        return x


class SwiGLU(nn.Module):
    """W3 (silu(W1 x) * W2 x), hidden width ffn_mult * dim (expansion 3, Table F): 9 dim^2 parameters."""

    def __init__(self, dim, ffn_mult=3):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * ffn_mult * dim, bias=False)
        self.w3 = nn.Linear(ffn_mult * dim, dim, bias=False)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class RoPE(nn.Module):
    """Axial rotary embedding for real-valued positions with 1, 2 or 3 axes, e.g. (t, y, x).

    The head_dim/2 rotation pairs are split over the axes; each axis gets frequencies spaced geometrically
    from 1 to max_freq (rad per unit), so max_freq = 40 pi resolves about one pixel on [-1, 1] at 256 px.
    forward(pos [..., S, n_axes]) -> (cos, sin), each [..., S, head_dim], for apply_rope (rotate-half).
    """

    def __init__(self, head_dim, max_freqs):
        super().__init__()
        n_pairs, n_axes = head_dim // 2, len(max_freqs)
        sizes = [n_pairs // n_axes + (a < n_pairs % n_axes) for a in range(n_axes)]
        freqs = [torch.exp(torch.linspace(0, math.log(m), s)) for m, s in zip(max_freqs, sizes)]
        self.register_buffer("freq", torch.cat(freqs), persistent=False)
        self.register_buffer("axis", torch.tensor([a for a, s in enumerate(sizes) for _ in range(s)]),
                             persistent=False)

    def forward(self, pos):
        angle = pos[..., self.axis].float() * self.freq
        angle = torch.cat([angle, angle], dim=-1)
        return angle.cos(), angle.sin()


def apply_rope(x, rope):
    """x [B, heads, S, head_dim] rotated by (cos, sin) [B, S, head_dim]: x cos + rotate_half(x) sin."""
    if rope is None:
        return x
    cos, sin = (r.unsqueeze(-3).to(x.dtype) for r in rope)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def fold_rope(rope, batch):
    """Reshape (cos, sin) [B*Q, S, d] -> [B, Q*S, d] to match tokens folded the same way."""
    return None if rope is None else tuple(r.reshape(batch, -1, r.shape[-1]) for r in rope)


class Attention(nn.Module):
    """Multi-head attention through F.scaled_dot_product_attention. Self-attention when ctx is None;
    queries and keys each rotated by their own RoPE positions. extra_kv = (k, v) already split into heads
    and rotated, placed before the keys (the decoder's queries attend to the latents plus their own frames)."""

    def __init__(self, dim, head_dim, kv_dim=None):
        super().__init__()
        self.heads = dim // head_dim
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def split_heads(self, x):
        return x.view(*x.shape[:2], self.heads, -1).transpose(1, 2)

    def keys_values(self, ctx, ctx_rope):
        k, v = self.kv(ctx).chunk(2, dim=-1)
        return apply_rope(self.split_heads(k), ctx_rope), self.split_heads(v)

    def forward(self, x, rope, ctx=None, ctx_rope=None, mask=None, extra_kv=None):
        if ctx is None:
            ctx, ctx_rope = x, rope
        q = apply_rope(self.split_heads(self.q(x)), rope)
        k, v = self.keys_values(ctx, ctx_rope)
        if extra_kv is not None:
            k, v = torch.cat([extra_kv[0], k], dim=2), torch.cat([extra_kv[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    """One transformer layer (Sec. B): pre-norm self-attention, cross-attention to context tokens (the
    image, or the planner's conditions), SwiGLU; each with a residual. cond_dim makes the norms adaptive."""

    def __init__(self, dim, head_dim, ctx_dim, ffn_mult=3, cond_dim=None):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (RMSNorm(dim, cond_dim) for _ in range(3))
        self.self_attn = Attention(dim, head_dim)
        self.cross_attn = Attention(dim, head_dim, kv_dim=ctx_dim)
        self.ffn = SwiGLU(dim, ffn_mult)

    def forward(self, x, rope, ctx, ctx_rope, cond=None, mask=None, ctx_mask=None, extra_kv=None):
        x = x + self.self_attn(self.norm1(x, cond), rope, mask=mask, extra_kv=extra_kv)
        # Context tokens are shared by everything in a batch element: tokens that were split into extra batch
        # rows (the decoder's per-point rows) are folded back so no context is copied.
        b = ctx.shape[0]
        h = self.norm2(x, cond).reshape(b, -1, x.shape[-1])
        x = x + self.cross_attn(h, fold_rope(rope, b), ctx, ctx_rope, mask=ctx_mask).reshape(x.shape)
        return x + self.ffn(self.norm3(x, cond))


class PointEmbed(nn.Module):
    """Fourier features of coordinates in [-1, 1] (sin, cos at geometric frequencies 1..max_freq), a linear
    layer to dim, then n_blocks residual SwiGLU blocks (Sec. B: "Fourier embedded and processed with an MLP")."""

    def __init__(self, in_dims, dim, n_bands=32, max_freq=40 * math.pi, n_blocks=2):
        super().__init__()
        self.register_buffer("freq", torch.exp(torch.linspace(0, math.log(max_freq), n_bands)), persistent=False)
        self.proj = nn.Linear(2 * in_dims * n_bands, dim)
        self.blocks = nn.ModuleList(nn.Sequential(RMSNorm(dim), SwiGLU(dim)) for _ in range(n_blocks))

    def forward(self, coords):
        angle = (coords.unsqueeze(-1).float() * self.freq).flatten(-2)
        x = self.proj(torch.cat([angle.sin(), angle.cos()], dim=-1).to(coords.dtype))
        for block in self.blocks:
            x = x + block(x)
        return x


def grid_centres(n_rows, n_cols, device=None):
    """Unit (y, x) coordinates of the centres of an n_rows x n_cols grid over [-1, 1]^2 -> [n_rows*n_cols, 2]."""
    y = (torch.arange(n_rows, device=device) + 0.5) / n_rows * 2 - 1
    x = (torch.arange(n_cols, device=device) + 0.5) / n_cols * 2 - 1
    return torch.stack(torch.meshgrid(y, x, indexing="ij"), dim=-1).reshape(-1, 2)


def frame_times(T, device=None):
    """Frame times in [-1, 1] (first frame -1, last +1): the t axis of the RoPE positions."""
    return torch.linspace(-1, 1, T, device=device) if T > 1 else torch.zeros(1, device=device)


# ----------------------------------------------------------------------------------------------------
# Image encoder: DINOv2 ViT-B/14 with registers (transformers)


class ConvStandIn(nn.Module):
    """image_encoder="conv": a stand-in for DINOv2 where no pretrained one exists and a random ViT/14 sees too
    little (the tiny robot path, README "LIBERO": a head on a locked random ViT/14's tokens of this task's frames
    predicts the actions 1.7-2.3x better than their mean, one on this CNN's, trained with it, 4.9x). Four 3x3
    convolutions over RGB and two (y, x) coordinate channels (so a token knows where in the frame it looks),
    strides 2, 2, 2, 1, average-pooled to DINOv2's patch grid: [B, 3, S, S] -> [B, (S / patch)^2, image_dim]. Being
    no pretrained network, it must be trained before it is locked (policy.py --preset perception_tiny)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, strides = (5, 32, 64, 64, cfg.image_dim), (2, 2, 2, 1)
        layers = []
        for c_in, c_out, stride in zip(widths, widths[1:], strides):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GELU()]
        self.convs = nn.Sequential(*layers[:-1])  # (no activation after the last)
        self.side = cfg.image_size // cfg.image_patch
        yx = torch.linspace(-1, 1, cfg.image_size)
        self.register_buffer("coords", torch.stack(torch.meshgrid(yx, yx, indexing="ij"))[None], persistent=False)

    def forward(self, image):
        x = self.convs(torch.cat([image, self.coords.expand(image.shape[0], -1, -1, -1).to(image.dtype)], dim=1))
        return F.adaptive_avg_pool2d(x, self.side).flatten(2).transpose(1, 2)


class ImageEncoder(nn.Module):
    """Start frame [B, 3, S, S] (ImageNet-normalised) -> patch tokens [B, (S/14)^2, image_dim] and their RoPE
    positions (t = -1, patch y, patch x). The CLS and register tokens are dropped."""

    def __init__(self, cfg: VAEConfig, pretrained=True):
        super().__init__()
        from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
        side = cfg.image_size // cfg.image_patch
        pos = torch.cat([torch.full((side * side, 1), -1.0), grid_centres(side, side)], dim=1)
        self.register_buffer("pos", pos, persistent=False)
        if cfg.image_encoder == "conv":
            self.net, self.n_skip = ConvStandIn(cfg), None
            return
        if cfg.image_encoder != "random" and pretrained:
            self.net = Dinov2WithRegistersModel.from_pretrained(cfg.image_encoder)
            got = (self.net.config.hidden_size, self.net.config.patch_size, self.net.config.num_register_tokens)
            want = (cfg.image_dim, cfg.image_patch, cfg.image_registers)
            if got != want:
                raise ValueError(f"image_encoder {cfg.image_encoder}: (hidden, patch, registers) = {got}, config "
                                 f"expects {want}")
        else:
            # The default Dinov2WithRegistersConfig() is not ViT-B/14: every field is set explicitly.
            self.net = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
                hidden_size=cfg.image_dim, num_hidden_layers=cfg.image_layers, num_attention_heads=cfg.image_heads,
                mlp_ratio=4, patch_size=cfg.image_patch, image_size=cfg.image_pos_size,
                num_register_tokens=cfg.image_registers, layerscale_value=1.0, layer_norm_eps=1e-6))
        self.net.embeddings.mask_token = None  # only for masked-image pre-training; unused, and DDP wants none
        self.n_skip = 1 + cfg.image_registers

    def forward(self, image):
        if self.n_skip is None:  # the CNN stand-in
            return self.net(image)
        return self.net(pixel_values=image).last_hidden_state[:, self.n_skip:]


# ----------------------------------------------------------------------------------------------------
# The track VAE


class TrackVAE(nn.Module):
    def __init__(self, cfg: VAEConfig, pretrained=True):
        super().__init__()
        self.cfg = cfg
        d, C = cfg.dim, cfg.latent_channels
        self.image_encoder = ImageEncoder(cfg, pretrained)
        self.rope = RoPE(cfg.head_dim, (cfg.rope_max_freq_time, cfg.rope_max_freq_space, cfg.rope_max_freq_space))
        # encoder: track tokens + latent queries (+1 register) in one sequence
        self.point_embed = PointEmbed(4 if cfg.encode_offsets else 2, d, cfg.fourier_bands, cfg.rope_max_freq_space,
                                      n_blocks=2)
        self.track_pos_embed = PointEmbed(3, d, cfg.fourier_bands, cfg.rope_max_freq_space, n_blocks=0) \
            if cfg.position_content else None
        self.latent_queries = nn.Parameter(torch.randn(self.n_latents, d) * 0.02)
        self.register = nn.Parameter(torch.randn(1, d) * 0.02)
        self.encoder = nn.ModuleList(Block(d, cfg.head_dim, cfg.image_dim, cfg.ffn_mult) for _ in range(cfg.enc_layers))
        self.enc_norm = RMSNorm(d)
        self.to_moments = nn.Linear(d, 2 * C)
        # decoder: latents projected up; one query per (point, frame): a shared embedding + its start point
        self.latent_proj = nn.Linear(C, d)
        self.query_token = nn.Parameter(torch.randn(d) * 0.02)
        self.query_embed = PointEmbed(3, d, cfg.fourier_bands, cfg.rope_max_freq_space, n_blocks=0) \
            if cfg.position_content else None
        self.decoder = nn.ModuleList(Block(d, cfg.head_dim, cfg.image_dim, cfg.ffn_mult) for _ in range(cfg.dec_layers))
        self.dec_norm = RMSNorm(d)
        self.to_xy = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 2))
        self.register_buffer("latent_pos", self._latent_positions(), persistent=False)

    @property
    def n_latents(self):
        return self.cfg.temporal_slots * self.cfg.grid_size ** 2

    def _latent_positions(self):
        """(t, y, x) of each latent token: slot times and grid-cell centres (Sec. D, Fig. J)."""
        cfg = self.cfg
        if cfg.latent_layout == "sequence":
            return torch.zeros(self.n_latents, 3)
        slot_t = (torch.arange(cfg.temporal_slots) + 0.5) / cfg.temporal_slots * 2 - 1
        cells = grid_centres(cfg.grid_size, cfg.grid_size)
        return torch.cat([slot_t.repeat_interleave(len(cells))[:, None], cells.repeat(cfg.temporal_slots, 1)], 1)

    def track_positions(self, start_xy, T):
        """RoPE positions (t, y0, x0) of per-(point, frame) tokens: start_xy [B, N, 2] -> [B, N, T, 3]."""
        t = frame_times(T, start_xy.device).view(1, 1, T, 1).expand(*start_xy.shape[:2], T, 1)
        yx = start_xy.flip(-1).unsqueeze(2).expand(-1, -1, T, -1)
        return torch.cat([t, yx], dim=-1)

    def image_tokens(self, image):
        expected = (3, self.cfg.image_size, self.cfg.image_size)
        if image.dim() != 4 or tuple(image.shape[1:]) != expected:
            raise ValueError(f"image: expected [B, {', '.join(map(str, expected))}], got {list(image.shape)}")
        return self.image_encoder(image)

    def encode(self, image, tracks, token_mask=None, image_tokens=None):
        """image [B, 3, S, S], tracks [B, N, T, 2] (unit x, y) -> (mean, logvar), each [B, n_latents, C].
        token_mask [B, N, T] (True = use this point-frame) drops tracks or occluded points (Table H)."""
        if tracks.dim() != 4 or tracks.shape[-1] != 2:
            raise ValueError(f"tracks: expected [B, N, T, 2], got {list(tracks.shape)}")
        B, N, T, _ = tracks.shape
        ctx = self.image_tokens(image) if image_tokens is None else image_tokens
        ctx_rope = self.rope(self.image_encoder.pos)
        pos = self.track_positions(tracks[:, :, 0], T).reshape(B, N * T, 3)
        coords = torch.cat([tracks, tracks - tracks[:, :, :1]], dim=-1) if self.cfg.encode_offsets else tracks
        tokens = self.point_embed(coords).reshape(B, N * T, -1)
        if self.track_pos_embed is not None:
            tokens = tokens + self.track_pos_embed(pos)
        lead = torch.cat([self.latent_queries, self.register]).expand(B, -1, -1)
        lead_pos = torch.cat([self.latent_pos, self.latent_pos.new_zeros(1, 3)]).expand(B, -1, -1)
        x = torch.cat([lead, tokens], dim=1)
        rope = self.rope(torch.cat([lead_pos, pos], dim=1))
        mask = None
        if token_mask is not None:
            keep = torch.cat([token_mask.new_ones(B, lead.shape[1]), token_mask.reshape(B, N * T)], dim=1)
            mask = keep[:, None, None, :]
        for block in self.encoder:
            x = block(x, rope, ctx, ctx_rope, mask=mask)
        mean, logvar = self.to_moments(self.enc_norm(x[:, :self.n_latents])).chunk(2, dim=-1)
        return mean, logvar.clamp(-30, 20)

    def decoder_context(self, z, ctx):
        """Run the latent tokens through the decoder once. They attend only to each other and the image, so
        they never depend on the queries. Returns, per layer, the (k, v) the queries attend to."""
        x = self.latent_proj(z)
        rope = tuple(r.expand(z.shape[0], -1, -1) for r in self.rope(self.latent_pos))
        ctx_rope = self.rope(self.image_encoder.pos)
        kvs = []
        for i, block in enumerate(self.decoder):
            kvs.append(block.self_attn.keys_values(block.norm1(x), rope))
            if i + 1 < len(self.decoder):
                x = block(x, rope, ctx, ctx_rope)
        return kvs

    def decode_queries(self, kvs, ctx, query_xy, T):
        """Each query (point, frame) token attends to the latents and to its own point's T frames only, so a
        point's track does not depend on which other points are decoded with it (dense = point-wise)."""
        B, Q, _ = query_xy.shape
        pos = self.track_positions(query_xy, T).reshape(B * Q, T, 3)
        x = self.query_token.expand(B * Q, T, -1)
        if self.query_embed is not None:
            x = x + self.query_embed(pos)
        rope = self.rope(pos)
        ctx_rope = self.rope(self.image_encoder.pos)
        for block, (k, v) in zip(self.decoder, kvs):
            extra = tuple(a.unsqueeze(1).expand(-1, Q, -1, -1, -1).reshape(B * Q, *a.shape[1:]) for a in (k, v))
            x = block(x, rope, ctx, ctx_rope, extra_kv=extra)
        xy = self.to_xy(self.dec_norm(x)).reshape(B, Q, T, 2)
        return xy + query_xy.unsqueeze(2) if self.cfg.predict_offsets else xy

    def decode(self, z, image, query_xy, T=None, chunk=4096, image_tokens=None):
        """z [B, n_latents, C], image [B, 3, S, S], query_xy [B, Q, 2] (unit x, y) -> tracks [B, Q, T, 2]."""
        T = T or self.cfg.n_frames
        if query_xy.dim() != 3 or query_xy.shape[-1] != 2:
            raise ValueError(f"query_xy: expected [B, Q, 2], got {list(query_xy.shape)}")
        ctx = self.image_tokens(image) if image_tokens is None else image_tokens
        kvs = self.decoder_context(z, ctx)
        return torch.cat([self.decode_queries(kvs, ctx, q, T) for q in query_xy.split(chunk, dim=1)], dim=1)

    @torch.no_grad()
    def decode_dense(self, z, image, height, width, T=None, chunk=2048, progress=False):
        """Query every pixel centre of a height x width frame (Sec. C densification) -> [B, H, W, T, 2] in
        unit coordinates. Memory is bounded by the chunk of points decoded at once."""
        from tqdm import tqdm
        T = T or self.cfg.n_frames
        ys = torch.linspace(-1, 1, height, device=z.device)
        xs = torch.linspace(-1, 1, width, device=z.device)
        query = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(1, -1, 2).expand(z.shape[0], -1, -1)
        ctx = self.image_tokens(image)
        kvs = self.decoder_context(z, ctx)
        parts = [self.decode_queries(kvs, ctx, q, T) for q in tqdm(query.split(chunk, dim=1), disable=not progress,
                                                                    desc="dense decode", leave=False)]
        return torch.cat(parts, dim=1).reshape(z.shape[0], height, width, T, 2)

    def forward(self, image, tracks, visible=None, rng=None):
        """Loss terms (Table F): L1 on unit coordinates over the encoded and held-out tracks + beta * KL.
        tracks [B, N, T, 2]: the first cfg.n_enc are encoded, all N are reconstructed from their start points.
        rng: a SampleRandom for the track dropout and the posterior noise (default: the global RNG)."""
        cfg = self.cfg
        B, N, T, _ = tracks.shape
        rng = SampleRandom.default(rng, B, tracks.device)
        use = torch.ones(B, N, T, dtype=torch.bool, device=tracks.device)
        if cfg.mask_occluded and visible is not None:
            use = use & visible
        if self.training and cfg.track_dropout > 0:
            use = use & (rng.rand(N, 1) >= cfg.track_dropout)
        ctx = self.image_tokens(image)
        n_enc = min(cfg.n_enc, N)
        mean, logvar = self.encode(image, tracks[:, :n_enc], use[:, :n_enc], image_tokens=ctx)
        z = mean + rng.randn(*mean.shape[1:]) * (0.5 * logvar).exp() if self.training else mean
        pred = self.decode(z, image, tracks[:, :, 0], T, image_tokens=ctx)
        losses = {"l1": F.l1_loss, "l2": F.mse_loss, "huber": F.smooth_l1_loss}
        if cfg.recon_loss not in losses:
            raise ValueError(f"recon_loss: expected one of {sorted(losses)}, got {cfg.recon_loss!r}")
        n = use.sum().clamp(min=1)
        recon = (losses[cfg.recon_loss](pred, tracks, reduction="none").mean(-1) * use).sum() / n
        l1 = ((pred - tracks).abs().mean(-1) * use).sum() / n
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum((1, 2)).mean()
        return {"loss": recon + cfg.kl_weight * kl, "l1": l1, "kl": kl, "pred": pred}


def load_vae(path, device="cpu"):
    """Build a TrackVAE from a checkpoint written by this file (weights_only: a checkpoint cannot run code)."""
    ckpt = load_checkpoint(path, kind="vae", device=device)
    cfg = config_from_dict(VAEConfig, ckpt["config"], path)
    model = TrackVAE(cfg, pretrained=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the config stored with them: {str(e)[:300]}") from None
    return model.to(device).eval()


def vae_parameter_groups(model):
    """Parameter counts by part: encoder / decoder / image encoder (DESIGN.md's release counts)."""
    decoder = ("latent_proj", "query_token", "query_embed", "decoder", "dec_norm", "to_xy")
    groups = {"encoder": 0, "decoder": 0, "image encoder": 0}
    for name, p in model.named_parameters():
        part = "image encoder" if name.startswith("image_encoder.") else \
            "decoder" if name.split(".")[0] in decoder else "encoder"
        groups[part] += p.numel()
    return groups


# ----------------------------------------------------------------------------------------------------
# Training helpers shared by every stage: config, distributed setup, schedules, data order, checkpoints


def parse_bool(text):
    if str(text).lower() in ("1", "true", "yes", "on"):
        return True
    if str(text).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_config(cls, presets, argv=None):
    """Config from the command line: --preset NAME picks the defaults, then every dataclass field is a flag
    (--key=value, --key value, and --key-with-dashes); the field's type is checked; unknown flags are an error."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=cls.preset)
    preset = pre.parse_known_args(argv)[0].preset
    if preset not in presets:
        raise SystemExit(f"--preset: unknown preset {preset!r}; choose from {sorted(presets)}")
    defaults = dataclasses.replace(cls(), preset=preset, **presets[preset])
    parser = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(cls):
        value = getattr(defaults, field.name)
        names = sorted({f"--{field.name}", f"--{field.name.replace('_', '-')}"})
        if isinstance(value, bool):
            parser.add_argument(*names, dest=field.name, type=parse_bool, nargs="?", const=True, default=value,
                                metavar="BOOL", help=f"default {value}")
        else:
            parser.add_argument(*names, dest=field.name, type=type(value), default=value, help=f"default {value}")
    return cls(**vars(parser.parse_args(argv)))


def config_from_dict(cls, values, source):
    """Rebuild a config saved in a checkpoint; a key this code does not know means another version or stage."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{source}: config has fields {unknown} that {cls.__name__} does not know")
    return cls(**values)


def setup_distributed(device="auto"):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them run single-process. NCCL on CUDA, gloo on CPU.
    Returns (rank, world, device, owned): owned = this call started the process group (and train() ends it)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    owned = "RANK" in os.environ and not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    return rank, world, torch.device(device), owned


def warmup(step, warmup_steps):
    """Linear warm-up: (step + 1) / warmup_steps of the learning rate, then 1."""
    return min(1.0, (step + 1) / max(1, warmup_steps))


def wsd_tail(step, max_steps, decay_frac):
    """Warmup-stable-decay: 1 (the constant phase) until the last decay_frac of the steps, then linear to 0."""
    decay_start = int(max_steps * (1 - decay_frac))
    return 1.0 if step < decay_start else (max_steps - step) / max(1, max_steps - decay_start)


def lr_at(step, cfg):
    """Table F: linear warm-up, constant, and the WSD decay tail."""
    return cfg.lr * min(warmup(step, cfg.warmup_steps), wsd_tail(step, cfg.max_steps, cfg.decay_frac))


def global_batch_at(step, cfg):
    """Global batch, ramped linearly from batch_start to batch_end over batch_ramp_steps (Table F: 64 -> 256),
    in whole multiples of batch_start so that every value splits evenly over the processes."""
    frac = min(1.0, step / max(1, cfg.batch_ramp_steps))
    return cfg.batch_start * int((cfg.batch_start + frac * (cfg.batch_end - cfg.batch_start)) // cfg.batch_start)


def accumulation_steps(step, cfg, world):
    """Micro-steps per optimiser step: global batch / (micro_batch * world), which must divide evenly, so the
    samples of every step are the same for any number of processes."""
    per_round = cfg.micro_batch * world
    if cfg.batch_start % per_round or cfg.batch_end % cfg.batch_start:
        raise ValueError(f"batch_start={cfg.batch_start} must be a multiple of micro_batch * world size = "
                         f"{cfg.micro_batch} * {world}, and batch_end={cfg.batch_end} a multiple of batch_start")
    return global_batch_at(step, cfg) // per_round


class SampleRandom:
    """Random numbers keyed by (seed, global sample index): sample i of a run draws the same noise, track
    dropout and conditions whichever rank, micro-batch or resumed run it lands in, so DDP on any number of
    processes and a resumed run reproduce the single-process run. rand / randn(*shape) -> [B, *shape]: row b
    comes from sample b's own generator, drawn in call order. train() puts one in every batch as batch["rng"].
    SampleRandom.default(rng, B, device) is rng, or else the same interface over the global torch RNG."""

    def __init__(self, index, seed, device="cpu"):
        if seed < 0 or int(seed) != seed:
            raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
        self.device, self.batch = device, len(index)
        # numpy's PCG64 seeded with the pair (seed, index). (Not torch.Generator: its CPU engine keeps only the low
        # 32 bits of a seed, so seed and index packed into one integer lost the seed and every --seed drew alike.)
        self.generators = [np.random.default_rng((seed, int(i))) for i in index]

    @classmethod
    def default(cls, rng, batch, device):
        if rng is None:
            rng = cls([], 0, device)
            rng.batch, rng.generators = batch, None
        return rng

    def _draw(self, torch_fn, numpy_fn, shape):
        if self.generators is None:
            return torch_fn((self.batch, *shape)).to(self.device)
        return torch.from_numpy(np.stack([numpy_fn(g, shape) for g in self.generators])).to(self.device)

    def rand(self, *shape):
        return self._draw(torch.rand, lambda g, shape: g.random(shape, dtype=np.float32), shape)

    def randn(self, *shape):
        return self._draw(torch.randn, lambda g, shape: g.standard_normal(shape, dtype=np.float32), shape)


class StepSampler(torch.utils.data.Sampler):
    """This rank's micro-batches of global sample indices. Step s reads the next accumulation * micro_batch *
    world indices; micro-step a of rank r takes the slice (a * world + r). The samples of a step are the same
    for any number of processes, and a resumed run continues the same sequence."""

    def __init__(self, cfg, rank, world, start_step, start_sample):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.start_step, self.start_sample = start_step, start_sample

    def __iter__(self):
        sample, micro = self.start_sample, self.cfg.micro_batch
        for step in range(self.start_step, self.cfg.max_steps):
            n_acc = accumulation_steps(step, self.cfg, self.world)
            for a in range(n_acc):
                first = sample + (a * self.world + self.rank) * micro
                yield list(range(first, first + micro))
            sample += n_acc * micro * self.world


def save_checkpoint(path, state):
    """Atomic, keeping the last two: write path.tmp and fsync it; hard-link the current checkpoint to path.prev
    (a copy where links are not supported); rename path.tmp over path; fsync the folder. A process killed at
    any point leaves path (or, before the first save completes, nothing) loadable. state must hold only
    tensors and plain Python values: every loader reads with weights_only=True."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(path):
        if os.path.lexists(path + ".prev.tmp"):  # left by a kill between the link and its rename
            os.remove(path + ".prev.tmp")
        try:
            os.link(path, path + ".prev.tmp")
        except OSError:
            import shutil
            shutil.copyfile(path, path + ".prev.tmp")
        os.replace(path + ".prev.tmp", path + ".prev")
    os.replace(tmp, path)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path, kind, device="cpu"):
    """torch.load(weights_only=True) with a named ValueError for a missing, corrupt or wrong-kind file."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        got = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: expected a {kind!r} checkpoint, got {got!r}")
    return ckpt


def latest_checkpoint(out_dir, kind, device="cpu"):
    """The newest good checkpoint in out_dir: ckpt.pt (always the newer), else ckpt.pt.prev; None if neither
    loads. A half-written ckpt.pt.tmp is never read."""
    for path in (os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "ckpt.pt.prev")):
        try:
            return load_checkpoint(path, kind, device)
        except ValueError as e:
            if os.path.exists(path):
                print(f"warning: skipping {e}")
    return None


class EMA:
    """Exponential moving average of a model's weights (the planner samples with it, DiT-style). The decay
    warms up as min(decay, (1 + k) / (10 + k)) after k updates, so a short run's average is not mostly the
    initial weights. Buffers (e.g. the planner's latent normalisation) are copied, not averaged."""

    def __init__(self, model, decay=0.9999):
        import copy
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval()
        set_trainable(self.model, False)

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self):
        return {"model": self.model.state_dict(), "updates": torch.tensor(self.updates)}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def set_trainable(module, trainable):
    for p in module.parameters():
        p.requires_grad_(trainable)


class Logger:
    """print0 + out_dir/log.txt; lines go through tqdm.write so they do not break the progress bar."""

    def __init__(self, out_dir, enabled):
        self.enabled, self.path = enabled, os.path.join(out_dir, "log.txt")

    def __call__(self, line):
        if self.enabled:
            from tqdm import tqdm
            tqdm.write(line)
            with open(self.path, "a") as f:
                f.write(line + "\n")


def train(cfg, model, dataset, loss_fn, kind, validate=None, ema=None, max_nonfinite=10):
    """The training loop every stage uses (nanoGPT-style). loss_fn(model, batch) -> (loss, {name: tensor});
    batch["rng"] is a SampleRandom keyed by the global sample index: draw every random number from it. validate(
    raw_model, step) -> {name: float} runs on rank 0 with the raw (unwrapped) model. ema: an EMA, updated after
    every optimiser step and saved with the checkpoint (the planner's). A step whose loss or gradient is not
    finite on any rank is skipped on every rank; max_nonfinite such steps in a row stop the run.

    Guarantees (tests/test_train.py): the samples of a step and their random numbers do not depend on the
    number of processes, so 2 processes give the parameters of 1 at the same global batch; a resumed run
    (model, optimiser, EMA, step, sample counter) continues bit-identically on CPU; checkpoints are atomic."""
    from tqdm import tqdm
    rank, world, device, owned = setup_distributed(cfg.device)
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        log = Logger(cfg.out_dir, rank == 0)
        if rank == 0:
            with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(cfg), f, indent=2)
        model.to(device)
        if ema is not None:
            ema.model.to(device)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        step, sample = 0, 0
        ckpt = latest_checkpoint(cfg.out_dir, kind, device) if cfg.resume else None
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            step, sample = ckpt["step"], ckpt["sample"]
            if ema is not None:
                ema.load_state_dict(ckpt["ema"])
            log(f"resumed from {cfg.out_dir} at step {step}")
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

        def wrap():  # (a model without an image encoder, like the policy head, needs no freeze fields)
            image_trainable = True
            if hasattr(model, "image_encoder"):
                image_trainable = not cfg.freeze_image_encoder or 0 <= cfg.unfreeze_image_encoder_at <= step
                set_trainable(model.image_encoder, image_trainable)
            net = torch.compile(model) if cfg.compile else model
            if world > 1:
                net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
            return net, image_trainable
        net, image_trainable = wrap()

        loader = torch.utils.data.DataLoader(dataset, batch_sampler=StepSampler(cfg, rank, world, step, sample),
                                             num_workers=cfg.num_workers, persistent_workers=False)
        batches = iter(loader)
        torch.manual_seed(cfg.seed * 1000 + rank + step)  # (training draws from batch["rng"], not from here)
        if ckpt is not None and rank == 0:
            torch.set_rng_state(ckpt["rng"].cpu())
        bar = tqdm(total=cfg.max_steps, initial=step, disable=rank != 0, desc=kind, dynamic_ncols=True)
        sums, t_log, steps_since, t_start, nonfinite = {}, time.time(), 0, time.time(), []
        while step < cfg.max_steps:
            if not image_trainable and 0 <= cfg.unfreeze_image_encoder_at <= step:
                net, image_trainable = wrap()
                log(f"step {step}: image encoder unfrozen")
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            n_acc = accumulation_steps(step, cfg, world)
            model.train()
            step_sums = {}
            for a in range(n_acc):
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(batches).items()}
                batch["rng"] = SampleRandom(batch["index"].tolist(), cfg.seed, device)
                if world > 1:
                    net.require_backward_grad_sync = a == n_acc - 1
                with autocast:
                    loss, metrics = loss_fn(net, batch)
                (loss / n_acc).backward()
                for k, v in {"loss": loss, **metrics}.items():
                    step_sums[k] = step_sums.get(k, 0.0) + v.detach().float() / n_acc
            # skip together: one rank's NaN must not leave the others stepping alone (or DDP hangs)
            finite = torch.tensor(float(torch.isfinite(step_sums["loss"]) and all(
                torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)), device=device)
            if world > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            gnorm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if finite.item() == 1:
                opt.step()
                if ema is not None:
                    ema.update(model)
                for k, v in {**step_sums, "gnorm": gnorm.detach().float()}.items():
                    sums[k] = sums.get(k, 0.0) + v
                steps_since += 1
                nonfinite = []
            else:
                nonfinite.append(step)
                log(f"warning: step {step}: non-finite loss or gradient on some rank, step skipped on every rank "
                    f"({len(nonfinite)} in a row)")
                if len(nonfinite) >= max_nonfinite:
                    raise RuntimeError(
                        f"{kind}: non-finite loss or gradient at {len(nonfinite)} steps in a row (steps "
                        f"{nonfinite[0]}..{nonfinite[-1]}); stopping at step {step}. The last good checkpoint in "
                        f"{cfg.out_dir} is untouched; lower --lr or check the data, then --resume")
            opt.zero_grad(set_to_none=True)
            sample += n_acc * cfg.micro_batch * world
            step += 1
            bar.update(1)
            if (step % cfg.log_every == 0 or step == cfg.max_steps) and steps_since > 0:
                names = sorted(sums)
                values = torch.stack([torch.as_tensor(sums[k], device=device) for k in names]) / steps_since
                if world > 1:
                    dist.all_reduce(values)
                    values /= world
                ms = (time.time() - t_log) * 1000 / steps_since
                eta = ms * (cfg.max_steps - step) / 60000
                stats = " ".join(f"{k} {v:.4g}" for k, v in zip(names, values.tolist()))
                log(f"step {step}/{cfg.max_steps} {stats} lr {lr_at(step - 1, cfg):.3g} {ms:.0f} ms/step "
                    f"{global_batch_at(step - 1, cfg) * 1000 / ms:.1f} samples/s ETA {eta:.1f} min")
                sums, t_log, steps_since = {}, time.time(), 0
            if validate is not None and (step % cfg.val_every == 0 or step == cfg.max_steps):
                if rank == 0:
                    model.eval()
                    with torch.no_grad(), autocast:
                        results = validate(model, step)
                    log(f"val step {step} ({(time.time() - t_start) / 60:.1f} min): " +
                        " ".join(f"{k} {v:.4g}" for k, v in results.items()))
                if world > 1:
                    dist.barrier()
            if rank == 0 and (step % cfg.ckpt_every == 0 or step == cfg.max_steps):
                save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                    "kind": kind, "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "sample": sample, "config": dataclasses.asdict(cfg), "rng": torch.get_rng_state(),
                    **({"ema": ema.state_dict()} if ema is not None else {})})
        bar.close()
        return model
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# VAE training and validation


def vae_loss(net, batch):
    out = net(batch["image"], batch["tracks"], batch["visible"], rng=batch["rng"])
    return out["loss"], {"l1": out["l1"], "kl": out["kl"]}


def validate_vae(model, val_set, step=None, out_png=None, batch_size=8):
    """Held-out clips: AE PCK (encoded tracks) and MAE PCK (held-out tracks) at 256 px (Tables G, H), beside the
    nearest-neighbour and static baselines on the same tracks; a PNG of ground truth vs reconstruction."""
    from eval import nearest_neighbour_baseline, pck, static_baseline
    device = next(model.parameters()).device
    n_enc = model.cfg.n_enc
    preds, gts, items = [], [], [val_set[i] for i in range(len(val_set))]
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        image = torch.stack([it["image"] for it in chunk]).to(device)
        tracks = torch.stack([it["tracks"] for it in chunk]).to(device)
        mean, _ = model.encode(image, tracks[:, :n_enc])
        preds.append(model.decode(mean, image, tracks[:, :, 0], tracks.shape[2]).float().cpu())
        gts.append(tracks.cpu())
    pred, gt = torch.cat(preds), torch.cat(gts)
    nn_pred = torch.stack([nearest_neighbour_baseline(g[:n_enc], g[n_enc:, 0]) for g in gt])
    results = {
        "AE": pck(pred[:, :n_enc], gt[:, :n_enc])["delta_avg"],
        "MAE": pck(pred[:, n_enc:], gt[:, n_enc:])["delta_avg"],
        "NN_MAE": pck(nn_pred, gt[:, n_enc:])["delta_avg"],
        "static_MAE": pck(torch.stack([static_baseline(g[n_enc:, 0], g.shape[1]) for g in gt]), gt[:, n_enc:])["delta_avg"],
        "L1": (pred - gt).abs().mean().item(),
    }
    if out_png:
        write_track_picture(out_png, [it["frame"] for it in items[:4]], [gt[:4], pred[:4]])
    return results


def write_track_picture(path, frames, track_sets, size=256):
    """One row per frame, one column per track set ([n, N, T, 2] unit coordinates, e.g. ground truth and
    prediction), drawn over the frame upscaled to size x size; colour = time. Written atomically."""
    import imageio.v3 as iio
    from data import draw_tracks, unit_to_pixels
    rows = []
    for i, frame in enumerate(frames):
        frame = np.asarray(frame)
        big = frame[np.arange(size) * frame.shape[0] // size][:, np.arange(size) * frame.shape[1] // size]
        rows.append(np.concatenate([draw_tracks(big, unit_to_pixels(np.asarray(t[i], dtype=np.float32), size, size))
                                    for t in track_sets], axis=1))
    tmp = path + ".tmp.png"
    iio.imwrite(tmp, np.concatenate(rows, axis=0))
    os.replace(tmp, path)


def main(argv=None):
    cfg = parse_config(VAEConfig, PRESETS, argv)
    torch.manual_seed(cfg.seed)
    model = TrackVAE(cfg, pretrained=not cfg.dry_run)
    if cfg.dry_run:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        for part, n in vae_parameter_groups(model).items():
            print(f"{part:>14}: {n / 1e6:8.2f}M")
        print(f"total parameters: {sum(p.numel() for p in model.parameters())}")
        return
    from data import make_track_dataset  # synthetic, .npz clips, .tar shards, or LIBERO .hdf5 demos
    common = dict(n_frames=cfg.n_frames, n_enc=cfg.n_enc, n_dec=cfg.n_dec, image_size=cfg.image_size,
                  seed=cfg.seed, synth_tracks=cfg.synth_tracks)
    train_set = make_track_dataset(cfg.data, "train", **common)
    val_set = make_track_dataset(cfg.data, "val", length=cfg.val_clips, **common)

    def validate(raw_model, step):
        return validate_vae(raw_model, val_set, step, os.path.join(cfg.out_dir, "val.png"))
    train(cfg, model, train_set, vae_loss, "vae", validate)


if __name__ == "__main__":
    main()
