"""Stage 1: the track VAE (supplement Sec. B, Table F): 64 frames of point tracks + the start frame's DINOv2 tokens ->
a 16x16 grid of 16-channel latents; the decoder, queried at any start point, gives its path. Also the blocks.

    python3 vae.py                                   # tiny preset, synthetic clips -> out/tiny/vae/ckpt.pt
    python3 vae.py --preset paper --dry-run          # the Table F model: parameter split and total
    torchrun --nproc_per_node=2 vae.py --micro_batch=2"""
import collections, dataclasses, hashlib, json, math, os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import cli, make_track_dataset   # (synthetic, .npz clips, .tar shards, or LIBERO .hdf5 demos)
from trainer import SampleRandom, TrainConfig, divides, one_of, load_checkpoint, parse_config, train

@dataclass
class ImageConfig:
    """A stage's image encoder: DINOv2 ViT-B/14 with registers (hub name or local path), or "random" (these fields)."""
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

    def check(self):
        return super().check() + divides(self, "image_patch", "image_size") + divides(self, "image_heads", "image_dim")

@dataclass
class VAEConfig(ImageConfig, TrainConfig):
    n_frames: int = 64
    n_enc: int = 40                    # tracks the encoder sees (the release: 40) ...
    n_dec: int = 40                    # ... plus held-out tracks only the decoder reconstructs ("MAE")
    synth_tracks: int = 1024           # tracker points per synthetic clip
    synth_pool: int = 0                # ours (tiny): training windows drawn from this many synthetic clips, made once
    dim: int = 768                     # the model (Table F)
    enc_layers: int = 12
    dec_layers: int = 12
    head_dim: int = 64
    ffn_mult: int = 3
    latent_channels: int = 16
    grid_size: int = 16
    temporal_slots: int = 1            # Sec. D: 1 = one grid for all 64 frames (64x compression)
    latent_layout: str = "grid"        # Fig. J: "grid" (grid RoPE positions) or "sequence" (no positions)
    decoder_attention: str = "joint"   # the release: latents and all queries in one sequence; ours: "independent"
    position_content: bool = False     # ours: tokens also carry Fourier(t, y0, x0) as content (the release: RoPE alone)
    encode_offsets: bool = False       # ours: track tokens also embed the displacement (x - x0, y - y0)
    predict_offsets: bool = False      # ours: predict offsets from the start point (Sec. B: absolute is best at scale)
    rope_max_freq_space: float = 40 * math.pi  # RoPE frequencies resolve a pixel on [-1, 1] (the release)
    rope_max_freq_time: float = 10 * math.pi
    fourier_max_freq: float = 40 * math.pi     # the point embedding's random frequencies: 95% below this (the release)
    kl_weight: float = 1e-7            # Table F
    recon_loss: str = "l1"             # Sec. B: L1 (best), l2, huber
    track_dropout: float = 0.0         # Table H: drop tracks at random (from encoder and loss)
    mask_occluded: bool = False        # Table H: train on visible points only

    def check(self):
        return super().check() + divides(self, "head_dim", "dim") + one_of(self, "recon_loss", list(LOSSES)) + one_of(
            self, "latent_layout", ("grid", "sequence")) + one_of(self, "decoder_attention", ("joint", "independent"))

LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss, "huber": F.smooth_l1_loss}
PRESETS = {
    "paper": {},
    # CPU-scale (ours): 16 frames (the same motion, coarser), an 8x8 grid, a random 2-layer DINOv2 at 112 px, narrow;
    # its few random Fourier frequencies kept low, 1024 synthetic clips made once; batch 4: more updates, same samples
    "tiny": dict(
        n_frames=16, synth_tracks=256, synth_pool=1024, fourier_max_freq=10.0, image_encoder="random", image_size=112,
        image_dim=64, image_layers=2, image_heads=2, image_pos_size=112, freeze_image_encoder=False, dim=64, enc_layers=2,
        dec_layers=2, head_dim=32, latent_channels=8, grid_size=8, n_enc=24, n_dec=24, decoder_attention="independent",
        position_content=True, predict_offsets=True, encode_offsets=True, max_steps=2600, lr=2e-3, warmup_steps=1200,
        decay_frac=0.2, batch_start=4, batch_end=4, batch_ramp_steps=1, micro_batch=4, log_every=100, val_every=1300,
        val_clips=16, ckpt_every=1300, num_workers=1, out_dir="out/tiny/vae"),
}
# CPU-scale (ours): the tiny VAE on the robot demos' tracks, for the tiny LIBERO planner (at scale: the one VAE)
PRESETS["tiny_robot"] = dict(PRESETS["tiny"], data="data/robot", max_steps=2000, warmup_steps=200, batch_start=16,
                             batch_end=16, micro_batch=16, val_every=500, ckpt_every=250, out_dir="out/tiny/vae-robot")

# ------------------------------------------------------------------------------------------------------ Building blocks
def zero_init(linear):   # an output layer that starts at zero (the release's out_proj / down_proj)
    for p in linear.parameters():
        nn.init.zeros_(p)
    return linear

class RMSNorm(nn.Module):
    """x / rms(x) * weight; with cond_dim adaptive (the planner's flow time, the release's AdaRMSNorm): x / rms(x) *
    (1 + Linear(cond)), the linear bias-free and zero-initialised, no separate weight."""
    def __init__(self, dim, cond_dim=None, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, None if cond_dim else nn.Parameter(torch.ones(dim))
        self.cond = zero_init(nn.Linear(cond_dim, dim, bias=False)) if cond_dim else None

    def forward(self, x, cond=None):
        scale = self.weight if self.cond is None else 1 + self.cond(cond).unsqueeze(1)
        return x * (torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps) * scale).to(x.dtype)

class SwiGLU(nn.Module):
    """W3 (a * silu(gate)) with [a | gate] = W12 x (the gate the second half, as the release), hidden ffn_mult * dim
    (expansion 3, Table F): 9 dim^2 parameters; W3 starts at zero."""
    def __init__(self, dim, ffn_mult=3):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * ffn_mult * dim, bias=False)
        self.w3 = zero_init(nn.Linear(ffn_mult * dim, dim, bias=False))

    def forward(self, x):
        a, gate = self.w12(x).chunk(2, dim=-1)
        return self.w3(a * F.silu(gate))

class RoPE(nn.Module):
    """Axial RoPE of real positions, e.g. (t, y, x), a learned table per attention module (the release): per axis and head
    head_dim / 8 frequencies (1 axis: / 4), geometric in [lo, hi), head h taking every heads-th: pos [B, S, axes] ->
    angles [B, S, heads, axes * k], axis by axis."""
    def __init__(self, head_dim, heads, ranges, learn=True):
        super().__init__()
        k = head_dim // (4 if len(ranges) == 1 else 8)
        freqs = [torch.linspace(math.log(lo), math.log(hi), heads * k + 1)[:-1].exp().view(k, heads).T for lo, hi in ranges]
        self.freqs = nn.Parameter(torch.stack(freqs), requires_grad=learn)   # [axes, heads, k]

    def forward(self, pos):
        return (pos.float()[:, :, None, :, None] * self.freqs.float().transpose(0, 1)).flatten(-2)

def apply_rope(x, angle):
    """x [..., head_dim] rotated by angles [..., n]: the pairs (i, i + n) of its first 2n dims turn (rotate-half)."""
    n, (cos, sin) = angle.shape[-1], (angle.cos(), angle.sin())
    a, b, rest = x[..., :n].float(), x[..., n:2 * n].float(), x[..., 2 * n:]
    return torch.cat([(a * cos - b * sin).to(x.dtype), (b * cos + a * sin).to(x.dtype), rest], dim=-1)

class Attention(nn.Module):
    """Cosine-similarity multi-head attention (the release): queries and keys unit-normalised per head, scaled by the
    square root of a learned per-head temperature (init 10), then RoPE at their positions (rope: (lo, hi) per axis).
    Self-attention projects q | k | v at once; cross-attention (kv_dim) RMS-normalises its context, projects q and k | v.
    extra_kv: (k, v) [B, heads, S', head_dim], normalised and rotated, put before the keys (the independent decoder)."""
    def __init__(self, dim, head_dim, kv_dim=None, rope=None, learn_rope=True):
        super().__init__()
        self.heads, self.head_dim, self.out = dim // head_dim, head_dim, zero_init(nn.Linear(dim, dim, bias=False))
        if kv_dim:
            self.q, self.kv, self.ctx_norm = nn.Linear(dim, dim, bias=False), nn.Linear(kv_dim, 2 * dim, bias=False), \
                RMSNorm(kv_dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.scale = nn.Parameter(torch.full((self.heads,), 10.0))
        self.rope = RoPE(head_dim, self.heads, rope, learn_rope) if rope else None

    def normed(self, x, pos):
        """x [B, S, (parts,) heads, head_dim] -> cosine-normalised, sqrt(temperature)-scaled and rotated (token-major)."""
        x = x * (torch.rsqrt(x.float().pow(2).sum(-1, keepdim=True) + 1e-6) * self.scale.float()[:, None].sqrt()
                 ).to(x.dtype)
        if self.rope is None:
            return x
        angle = self.rope(pos)
        return apply_rope(x, angle if x.dim() == 4 else angle.unsqueeze(2))   # (q | k stacked: 5-D)

    def split(self, x, parts):   # [B, S, parts * dim] -> [B, S, parts, heads, head_dim]
        return x.view(*x.shape[:2], parts, self.heads, self.head_dim)

    def keys_values(self, ctx, pos):
        """The (k, v) [B, heads, S, head_dim] of context tokens (of x itself in a self-attention)."""
        kv = self.kv(self.ctx_norm(ctx)) if hasattr(self, "kv") else F.linear(ctx, self.qkv.weight[len(self.scale) *
                                                                                                   self.head_dim:])
        k, v = self.split(kv, 2).unbind(2)
        return self.normed(k, pos).transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, pos, ctx=None, ctx_pos=None, mask=None, extra_kv=None):
        if ctx is None:   # q and k at the same positions: normalised and rotated together
            qkv = self.split(self.qkv(x), 3)
            qk, v = self.normed(qkv[:, :, :2], pos), qkv[:, :, 2].transpose(1, 2)
            q, k = (t.transpose(1, 2) for t in qk.unbind(2))
        else:
            q = self.normed(self.split(self.q(x), 1)[:, :, 0], pos).transpose(1, 2)
            k, v = self.keys_values(ctx, ctx_pos)
        if extra_kv is not None:
            k, v = torch.cat([extra_kv[0], k], dim=2), torch.cat([extra_kv[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.out(out.transpose(1, 2).flatten(2))

class Block(nn.Module):
    """One layer (Sec. B; the release's TransformerLayer): pre-norm self-attention, cross-attention to context tokens
    (the image, or the planner's conditions), SwiGLU, each residual; cond_dim makes the norms adaptive (flow time).
    rope: the (lo, hi) frequency range per position axis; cross_rope=False: no RoPE in the cross-attention."""
    def __init__(self, dim, head_dim, ctx_dim, ffn_mult=3, cond_dim=None, rope=None, cross_rope=True):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (RMSNorm(dim, cond_dim) for _ in range(3))
        self.self_attn = Attention(dim, head_dim, rope=rope)
        self.cross_attn = Attention(dim, head_dim, kv_dim=ctx_dim, rope=rope if cross_rope else None)
        self.ffn = SwiGLU(dim, ffn_mult)

    def forward(self, x, pos, ctx, ctx_pos, cond=None, mask=None, ctx_mask=None, extra_kv=None):
        x = x + self.self_attn(self.norm1(x, cond), pos, mask=mask, extra_kv=extra_kv)
        # rows split off a batch element (the decoder's one row per point) are folded back: the context is shared
        h, folded = self.norm2(x, cond).reshape(len(ctx), -1, x.shape[-1]), pos.reshape(len(ctx), -1, pos.shape[-1])
        x = x + self.cross_attn(h, folded, ctx, ctx_pos, mask=ctx_mask).reshape(x.shape)
        return x + self.ffn(self.norm3(x, cond))

class PointEmbed(nn.Module):
    """Random Fourier features (the release): sin, cos of each coordinate times dim // (2 in_dims) random frequencies
    ~ N(0, (max_freq / 1.96)^2) (95% below max_freq), zero-padded to dim, then n_blocks residual SwiGLU (Sec. B)."""
    def __init__(self, in_dims, dim, max_freq=40 * math.pi, n_blocks=2, ffn_mult=3):
        super().__init__()
        self.register_buffer("coeffs", torch.randn(dim // (2 * in_dims)) * max_freq / 1.96)
        self.dim, self.blocks = dim, nn.ModuleList(nn.Sequential(RMSNorm(dim), SwiGLU(dim, ffn_mult))
                                                   for _ in range(n_blocks))

    def forward(self, coords):
        angle = coords.float()[..., None] * self.coeffs                     # [..., in_dims, n]
        x = torch.stack([angle.sin(), angle.cos()], dim=-2).flatten(-3)    # per input: sin(n), cos(n)
        x = F.pad(x, (0, self.dim - x.shape[-1])).to(coords.dtype)
        for block in self.blocks:
            x = x + block(x)
        return x

def grid_centres(n_rows, n_cols):
    """Unit (y, x) of the centres of an n_rows x n_cols grid over [-1, 1]^2 -> [n_rows * n_cols, 2], row by row."""
    y, x = ((torch.arange(n) + 0.5) / n * 2 - 1 for n in (n_rows, n_cols))
    return torch.stack(torch.meshgrid(y, x, indexing="ij"), dim=-1).reshape(-1, 2)

def latent_positions(slots, side):   # (t, y, x) of a latent grid's tokens (Sec. D): t at slot centres, slot by slot
    return torch.cat([grid_centres(slots, side * side)[:, :1], grid_centres(side, side).repeat(slots, 1)], 1)

class ImageEncoder(nn.Module):
    """DINOv2 ViT-B/14 with registers (transformers): the start frame [B, 3, S, S], ImageNet-normalised -> patch
    tokens [B, (S/14)^2, image_dim] (CLS and registers dropped); .pos = their RoPE positions (t = -1, y, x)."""
    def __init__(self, cfg, pretrained=True):
        super().__init__()
        from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
        side = cfg.image_size // cfg.image_patch
        self.register_buffer("pos", F.pad(grid_centres(side, side), (1, 0), value=-1.0), persistent=False)
        if cfg.image_encoder != "random" and pretrained:
            self.net = Dinov2WithRegistersModel.from_pretrained(cfg.image_encoder)
            got = (self.net.config.hidden_size, self.net.config.patch_size, self.net.config.num_register_tokens)
            if got != (cfg.image_dim, cfg.image_patch, cfg.image_registers):
                raise ValueError(f"--image_encoder {cfg.image_encoder}: (hidden, patch, registers) = {got}, the "
                                 f"config expects {(cfg.image_dim, cfg.image_patch, cfg.image_registers)}")
        else:  # the default Dinov2WithRegistersConfig() is not ViT-B/14: every field is set
            self.net = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
                hidden_size=cfg.image_dim, num_hidden_layers=cfg.image_layers, num_attention_heads=cfg.image_heads,
                mlp_ratio=4, patch_size=cfg.image_patch, image_size=cfg.image_pos_size,
                num_register_tokens=cfg.image_registers, layerscale_value=1.0, layer_norm_eps=1e-6))
        self.n_skip, self.size = 1 + cfg.image_registers, cfg.image_size
        self.requires_grad_(True)

    def requires_grad_(self, on=True):   # DINOv2's mask token (masked-image pre-training) never trains: DDP wants no
        super().requires_grad_(on)       # unused trainable parameter
        self.net.embeddings.mask_token.requires_grad_(False)
        return self

    def forward(self, image):
        assert image.dim() == 4 and image.shape[1:] == (3, self.size, self.size), f"image {list(image.shape)}"
        return self.net(pixel_values=image).last_hidden_state[:, self.n_skip:]

# -------------------------------------------------------------------------------------------------------- The track VAE
class TrackVAE(nn.Module):
    """Sec. B. encode(image [B, 3, S, S], tracks [B, N, T, 2] unit (x, y)) -> (mean, logvar) [B, n_latents, C]: a token
    per (track, frame) (Fourier features + MLP of its (y, x), RoPE at (t, y0, x0)) beside the latent queries (a learned
    token per grid cell) and a register; each layer self-attends, cross-attends to the DINOv2 tokens, SwiGLU.
    decode(z, image, query_xy [B, Q, 2]) -> [B, Q, T, 2], a query token per (point, frame) at (t, y0, x0): "joint" (the
    release) in one sequence with the latents; "independent" (ours) with the latents and its own point's frames only.
    forward(image, tracks) -> the loss (Table F): L1 over encoded and held-out tracks + beta KL."""
    def __init__(self, cfg: VAEConfig, pretrained=True):
        super().__init__()
        self.cfg, d, C, self.n_latents = cfg, cfg.dim, cfg.latent_channels, cfg.temporal_slots * cfg.grid_size ** 2
        rope = ((1, cfg.rope_max_freq_time), (1, cfg.rope_max_freq_space), (1, cfg.rope_max_freq_space))
        self.image_encoder = ImageEncoder(cfg, pretrained)
        self.point_embed = PointEmbed(4 if cfg.encode_offsets else 2, d, cfg.fourier_max_freq, 2, cfg.ffn_mult)
        self.position_embed = PointEmbed(3, d, cfg.fourier_max_freq, 0) if cfg.position_content else None
        self.latent_queries = nn.Parameter(torch.randn(1 if cfg.latent_layout == "grid" else self.n_latents, d))
        self.register = nn.Parameter(torch.randn(1, d))
        self.encoder = nn.ModuleList(Block(d, cfg.head_dim, cfg.image_dim, cfg.ffn_mult, rope=rope)
                                     for _ in range(cfg.enc_layers))
        self.to_moments, self.latent_proj = nn.Linear(d, 2 * C), nn.Linear(C, d)
        self.query_token = nn.Parameter(torch.randn(d))
        self.decoder = nn.ModuleList(Block(d, cfg.head_dim, cfg.image_dim, cfg.ffn_mult, rope=rope)
                                     for _ in range(cfg.dec_layers))
        self.to_xy = nn.Sequential(RMSNorm(d), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 2))
        # (t, y, x) of each latent token: slot times and grid-cell centres (Sec. D), or all zero (Fig. J)
        pos = latent_positions(cfg.temporal_slots, cfg.grid_size)
        self.register_buffer("latent_pos", pos * (cfg.latent_layout == "grid"), persistent=False)

    def track_positions(self, start_xy, T):
        """RoPE positions (t, y0, x0) of per-(point, frame) tokens, t at frame centres: [B, N, 2] -> [B, N, T, 3]."""
        t = ((torch.arange(T, device=start_xy.device) + 0.5) / T * 2 - 1).view(1, 1, T, 1)
        return torch.cat([t.expand(*start_xy.shape[:2], T, 1), start_xy.flip(-1).unsqueeze(2).expand(-1, -1, T, -1)], -1)

    def tokens_at(self, x, pos):   # ours (position_content): tokens also carry Fourier features of their position
        return x if self.position_embed is None else x + self.position_embed(pos)

    def image_tokens(self, image):   # the start frame's DINOv2 tokens, the context of encoder and decoder
        return self.image_encoder(image)

    def encode(self, image, tracks, token_mask=None, image_tokens=None):
        """-> (mean, logvar). token_mask [B, N, T] (True = use this point-frame): Table H's dropout / occlusion."""
        assert tracks.dim() == 4 and tracks.shape[-1] == 2, f"tracks: expected [B, N, T, 2], got {list(tracks.shape)}"
        B, N, T, _ = tracks.shape
        ctx = self.image_tokens(image) if image_tokens is None else image_tokens
        pos = self.track_positions(tracks[:, :, 0], T).reshape(B, N * T, 3)
        yx = tracks.flip(-1)   # embedded as (y, x), the order of the RoPE positions
        coords = torch.cat([yx, yx - yx[:, :, :1]], dim=-1) if self.cfg.encode_offsets else yx
        tokens = self.tokens_at(self.point_embed(coords).reshape(B, N * T, -1), pos)
        lead = torch.cat([self.latent_queries.expand(self.n_latents, -1), self.register]).expand(B, -1, -1)
        x, pos = torch.cat([lead, tokens], 1), torch.cat([F.pad(self.latent_pos, (0, 0, 0, 1)).expand(B, -1, -1), pos], 1)
        mask = None if token_mask is None else torch.cat(
            [token_mask.new_ones(B, lead.shape[1]), token_mask.reshape(B, N * T)], 1)[:, None, None]
        ctx_pos = self.image_encoder.pos.expand(B, -1, -1)
        for block in self.encoder:
            x = block(x, pos, ctx, ctx_pos, mask=mask)
        return self.to_moments(x[:, :self.n_latents]).chunk(2, dim=-1)

    def decode_joint(self, z, ctx, query_xy, T):
        """The release's decoder: [latents | one query per (point, frame)] in one sequence through every layer."""
        B, Q, _ = query_xy.shape
        qpos = self.track_positions(query_xy, T).reshape(B, Q * T, 3)
        x = torch.cat([self.latent_proj(z), self.tokens_at(self.query_token.expand(B, Q * T, -1), qpos)], dim=1)
        pos, ctx_pos = torch.cat([self.latent_pos.expand(B, -1, -1), qpos], 1), self.image_encoder.pos.expand(B, -1, -1)
        for block in self.decoder:
            x = block(x, pos, ctx, ctx_pos)
        return x[:, z.shape[1]:]

    def decoder_context(self, z, ctx):
        """Independent decoding: the latent tokens through the decoder once (they attend to each other and the image,
        never to the queries): per layer, the (k, v) the queries attend to."""
        x, pos = self.latent_proj(z), self.latent_pos.expand(z.shape[0], -1, -1)
        ctx_pos, kvs = self.image_encoder.pos.expand(z.shape[0], -1, -1), []
        for i, block in enumerate(self.decoder):
            kvs.append(block.self_attn.keys_values(block.norm1(x), pos))
            if i + 1 < len(self.decoder):
                x = block(x, pos, ctx, ctx_pos)
        return kvs

    def decode_queries(self, kvs, ctx, query_xy, T):
        B, Q, _ = query_xy.shape
        pos = self.track_positions(query_xy, T).reshape(B * Q, T, 3)
        x, ctx_pos = self.tokens_at(self.query_token.expand(B * Q, T, -1), pos), self.image_encoder.pos.expand(B, -1, -1)
        for block, (k, v) in zip(self.decoder, kvs):
            extra = tuple(a.unsqueeze(1).expand(-1, Q, -1, -1, -1).reshape(B * Q, *a.shape[1:]) for a in (k, v))
            x = block(x, pos, ctx, ctx_pos, extra_kv=extra)
        return x.reshape(B, Q * T, -1)

    def decode(self, z, image, query_xy, T=None, chunk=None, image_tokens=None, progress=False):
        """z [B, n_latents, C], query_xy [B, Q, 2] unit (x, y) -> tracks [B, Q, T, 2], chunk points at a time: any chunks
        if independent (default 4096); joint, chunk j of n sees points j, j + n, ... at once (default n_enc + n_dec)."""
        from tqdm import tqdm
        assert query_xy.dim() == 3 and query_xy.shape[-1] == 2, f"query_xy [B, Q, 2], not {list(query_xy.shape)}"
        (B, Q, _), T, joint = query_xy.shape, T or self.cfg.n_frames, self.cfg.decoder_attention == "joint"
        ctx = self.image_tokens(image) if image_tokens is None else image_tokens
        chunk = chunk or (self.cfg.n_enc + self.cfg.n_dec if joint else 4096)
        n = -(-Q // chunk)
        parts = [torch.arange(j, Q, n, device=z.device) for j in range(n)] if joint else \
            torch.arange(Q, device=z.device).split(chunk)
        kvs, out = None if joint else self.decoder_context(z, ctx), query_xy.new_empty(B, Q, T, 2)
        for idx in tqdm(parts, disable=not progress, desc="decode", leave=False):
            x = self.decode_joint(z, ctx, query_xy[:, idx], T) if joint else \
                self.decode_queries(kvs, ctx, query_xy[:, idx], T)
            out[:, idx] = self.to_xy(x).reshape(B, len(idx), T, 2).to(out.dtype)
        return out + query_xy.unsqueeze(2) if self.cfg.predict_offsets else out

    @torch.no_grad()
    def decode_dense(self, z, image, height, width, chunk=None, progress=False):
        """Sec. C: every pixel centre of a height x width frame -> [B, H, W, T, 2] unit (x, y), chunk points at a time."""
        xs, ys = torch.linspace(-1, 1, width, device=z.device), torch.linspace(-1, 1, height, device=z.device)
        query = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(1, -1, 2).expand(len(z), -1, -1)
        tracks = self.decode(z, image, query, chunk=chunk, progress=progress)
        return tracks.reshape(len(z), height, width, self.cfg.n_frames, 2)

    def forward(self, image, tracks, visible=None, rng=None):
        """tracks [B, N, T, 2]: the first n_enc are encoded, all N reconstructed from their start points (a joint
        decoder: all N at once, as trained). rng: a SampleRandom for the track dropout and the posterior noise."""
        cfg, (B, N, T, _) = self.cfg, tracks.shape
        rng = rng or SampleRandom(torch.randint(2 ** 31, (B,)).tolist(), device=tracks.device)   # (fresh noise)
        use = visible.bool() if cfg.mask_occluded and visible is not None else tracks.new_ones(B, N, T, dtype=torch.bool)
        if self.training and cfg.track_dropout > 0:
            use = use & (rng.rand(N, 1) >= cfg.track_dropout)
        ctx, n_enc = self.image_tokens(image), min(cfg.n_enc, N)
        mean, logvar = self.encode(image, tracks[:, :n_enc], use[:, :n_enc], image_tokens=ctx)
        z = mean + rng.randn(*mean.shape[1:]) * (0.5 * logvar).exp() if self.training else mean  # reparameterised
        pred = self.decode(z, image, tracks[:, :, 0], T, chunk=N, image_tokens=ctx)
        n = use.sum().clamp(min=1)
        recon = (LOSSES[cfg.recon_loss](pred, tracks, reduction="none").mean(-1) * use).sum() / n
        l1 = ((pred - tracks).abs().mean(-1) * use).sum() / n
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum((1, 2)).mean()   # KL(q(z|x) || N(0, 1))
        return {"loss": recon + cfg.kl_weight * kl, "l1": l1, "kl": kl, "pred": pred}

def load_model(path, kind, config_cls, build, device="cpu", make=None):
    """build(config) from a checkpoint, then its weights (the EMA's where there are), eval mode, with .fingerprint."""
    ckpt = load_checkpoint(path, kind, device, make)
    unknown = sorted(set(ckpt["config"]) - {f.name for f in dataclasses.fields(config_cls)})   # another stage or version
    if unknown:
        raise ValueError(f"{path}: config has fields {unknown} that {config_cls.__name__} does not know")
    model = build(config_cls(**ckpt["config"]))
    try:
        model.load_state_dict(ckpt["ema"]["model"] if "ema" in ckpt else ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the config stored with them: {str(e)[:300]}") from None
    model.fingerprint = fingerprint(model)
    return model.to(device).eval(), ckpt

def fingerprint(model):
    """A hash of config and weights: the planner's config records its VAE's, the policy head's its planner's."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.cfg), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode() + tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]

def check_pair(model, expected, what, path):
    """A ValueError when the model loaded from path is not the `what` whose fingerprint a checkpoint recorded."""
    if model.fingerprint != expected:
        raise ValueError(f"{path}: not the {what} (fingerprint {model.fingerprint}; the checkpoint's: {expected})")

def load_vae(path, device="cpu", make=None):
    """A TrackVAE from a checkpoint of this file (weights_only) or a release file (release.py), with .fingerprint."""
    import release
    return release.load_vae(path, device) if release.is_release(path) else load_model(
        path, "vae", VAEConfig, lambda cfg: TrackVAE(cfg, pretrained=False), device, make)[0]

def dry_run(cfg, model, groups, default):
    """--dry-run: the config, the parameters by part (groups = {module name: part}), the total."""
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    counts = collections.Counter()
    for name, p in model.named_parameters():
        counts[groups.get(name.split(".")[0], default)] += p.numel()
    print("\n".join(f"{part:>15}: {n / 1e6:8.2f}M" for part, n in counts.items()))
    print(f"total parameters: {sum(counts.values())}")
    return counts

# ---------------------------------------------------------------------------------------------- Training and validation
def vae_loss(net, batch):
    out = net(batch["image"], batch["tracks"], batch["visible"], rng=batch["rng"])
    return out["loss"], {"l1": out["l1"], "kl": out["kl"]}

def main(argv=None):
    cfg = parse_config(VAEConfig, PRESETS, argv)
    torch.manual_seed(cfg.seed)
    model = TrackVAE(cfg, pretrained=not cfg.dry_run)
    if cfg.dry_run:
        return dry_run(cfg, model, dict(image_encoder="image encoder", **dict.fromkeys(
            ("latent_proj", "query_token", "decoder", "to_xy"), "decoder")), "encoder")
    from eval import vae_scores
    common = dict(n_frames=cfg.n_frames, n_enc=cfg.n_enc, n_dec=cfg.n_dec, image_size=cfg.image_size, seed=cfg.seed,
                  synth_tracks=cfg.synth_tracks, synth_pool=cfg.synth_pool)
    train_set = make_track_dataset(cfg.data, "train", **common)
    val_set = make_track_dataset(cfg.data, "val", length=cfg.val_clips, **common)
    val_items = [val_set[i] for i in range(min(cfg.val_clips, len(val_set)))]
    freeze = (model.image_encoder, cfg.unfreeze_image_encoder_at) if cfg.freeze_image_encoder else None
    validate = (lambda raw, step: vae_scores(raw, val_items, os.path.join(cfg.out_dir, "val.png"))) if val_items else None
    train(cfg, model, train_set, vae_loss, "vae", validate, freeze=freeze)

if __name__ == "__main__":
    cli(main)
