"""Stage 1: the track VAE (supplement Sec. B, Table F): 64 frames of point tracks + the start frame's DINOv2 tokens ->
a 16x16 grid of 16-channel latents; the decoder, queried at any start point, gives its path. Also the blocks.

    python3 vae.py                                   # tiny preset, synthetic clips -> out/tiny/vae/ckpt.pt
    python3 vae.py --preset paper --dry-run          # the Table F model: parameter split and total
    torchrun --nproc_per_node=2 vae.py --micro_batch=8"""
import dataclasses, hashlib, json, math, os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import cli
from trainer import SampleRandom, TrainConfig, config_from_dict, divides, one_of, load_checkpoint, parse_config, train

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
    position_content: bool = True      # ours: tokens also carry Fourier(t, y0, x0) as content (release: RoPE alone)
    encode_offsets: bool = False       # ours: track tokens also embed the displacement (x - x0, y - y0)
    predict_offsets: bool = False      # ours: predict offsets from the start point (Sec. B: absolute is best at scale)
    fourier_bands: int = 32
    rope_max_freq_space: float = 40 * math.pi  # resolves about one pixel on [-1, 1] (README "Conventions")
    rope_max_freq_time: float = 10 * math.pi
    kl_weight: float = 1e-7            # Table F
    recon_loss: str = "l1"             # Sec. B: L1 (best), l2, huber
    track_dropout: float = 0.0         # Table H: drop tracks at random (from encoder and loss)
    mask_occluded: bool = False        # Table H: train on visible points only

    def check(self):
        return super().check() + divides(self, "head_dim", "dim") + one_of(self, "recon_loss", list(LOSSES)) + one_of(
            self, "latent_layout", ("grid", "sequence"))

LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss, "huber": F.smooth_l1_loss}
PRESETS = {
    "paper": {},
    # CPU-scale (ours): 16 frames (the same motion, coarser), an 8x8 grid, a random 2-layer DINOv2 at 112 px, narrow
    "tiny": dict(
        n_frames=16, synth_tracks=256, image_encoder="random", image_size=112, image_dim=64, image_layers=2,
        image_heads=2, image_pos_size=112, freeze_image_encoder=False, dim=64, enc_layers=2, dec_layers=2,
        head_dim=32, latent_channels=8, grid_size=8, fourier_bands=16, n_enc=24, n_dec=24, predict_offsets=True,
        encode_offsets=True, max_steps=450, lr=2e-3, warmup_steps=100, decay_frac=0.2, batch_start=16,
        batch_end=16, batch_ramp_steps=1, micro_batch=16, log_every=25, val_every=150, val_clips=16,
        ckpt_every=150, num_workers=1, out_dir="out/tiny/vae"),
}
# CPU-scale (ours): the tiny VAE on the robot demos' tracks, for the tiny LIBERO planner (at scale: the one VAE)
PRESETS["tiny_robot"] = dict(PRESETS["tiny"], data="data/robot", max_steps=2000, val_every=500, ckpt_every=250,
                             log_every=100, out_dir="out/tiny/vae-robot")

# ------------------------------------------------------------------------------------------------------ Building blocks
def zero_init(linear):   # an output layer that starts at zero (DiT)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear

class RMSNorm(nn.Module):
    """x / rms(x) * weight; with cond_dim adaptive, * (1 + Linear(cond)) zero-initialised (starts as RMSNorm)."""
    def __init__(self, dim, cond_dim=None, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))
        self.cond = zero_init(nn.Linear(cond_dim, dim)) if cond_dim else None

    def forward(self, x, cond=None):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype) * self.weight
        return x if self.cond is None else x * (1 + self.cond(cond).unsqueeze(1))

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
    """Axial RoPE for real positions with 1-3 axes, e.g. (t, y, x): the head_dim / 2 pairs split over the axes, each with
    frequencies geometric from 1 to max_freq rad per unit. pos [..., S, n_axes] -> (cos, sin) [..., S, head_dim]."""
    def __init__(self, head_dim, max_freqs):
        super().__init__()
        n_pairs, n_axes = head_dim // 2, len(max_freqs)
        sizes = [n_pairs // n_axes + (a < n_pairs % n_axes) for a in range(n_axes)]
        freqs = [torch.exp(torch.linspace(0, math.log(m), s)) for m, s in zip(max_freqs, sizes)]
        self.register_buffer("freq", torch.cat(freqs), persistent=False)
        self.register_buffer("axis", torch.tensor([a for a, s in enumerate(sizes) for _ in range(s)]), persistent=False)

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

class Attention(nn.Module):
    """Multi-head attention (F.scaled_dot_product_attention), self-attention when ctx is None, queries and keys rotated
    by their own RoPE positions; extra_kv = (k, v) in heads, rotated, goes before the keys (the decoder's latents)."""
    def __init__(self, dim, head_dim, kv_dim=None):
        super().__init__()
        self.heads = dim // head_dim
        self.q, self.out = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim, bias=False)

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
    """One layer (Sec. B): pre-norm self-attention, cross-attention to context tokens (the image, or the planner's
    conditions), SwiGLU, each with a residual; cond_dim makes the norms adaptive (the planner's flow time)."""
    def __init__(self, dim, head_dim, ctx_dim, ffn_mult=3, cond_dim=None):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (RMSNorm(dim, cond_dim) for _ in range(3))
        self.self_attn, self.cross_attn = Attention(dim, head_dim), Attention(dim, head_dim, kv_dim=ctx_dim)
        self.ffn = SwiGLU(dim, ffn_mult)

    def forward(self, x, rope, ctx, ctx_rope, cond=None, mask=None, ctx_mask=None, extra_kv=None):
        x = x + self.self_attn(self.norm1(x, cond), rope, mask=mask, extra_kv=extra_kv)
        # rows split off a batch element (the decoder's one row per point) are folded back: the context is shared
        b = ctx.shape[0]
        h = self.norm2(x, cond).reshape(b, -1, x.shape[-1])
        folded = None if rope is None else tuple(r.reshape(b, -1, r.shape[-1]) for r in rope)
        x = x + self.cross_attn(h, folded, ctx, ctx_rope, mask=ctx_mask).reshape(x.shape)
        return x + self.ffn(self.norm3(x, cond))

class PointEmbed(nn.Module):
    """Fourier features of coordinates in [-1, 1] (sin, cos at geometric frequencies 1..max_freq), a linear layer to
    dim, then n_blocks residual SwiGLU blocks (Sec. B: "Fourier embedded and processed with an MLP")."""
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
    """Unit (y, x) of the centres of an n_rows x n_cols grid over [-1, 1]^2 -> [n_rows * n_cols, 2], row by row."""
    y = (torch.arange(n_rows, device=device) + 0.5) / n_rows * 2 - 1
    x = (torch.arange(n_cols, device=device) + 0.5) / n_cols * 2 - 1
    return torch.stack(torch.meshgrid(y, x, indexing="ij"), dim=-1).reshape(-1, 2)

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
        self.net.embeddings.mask_token = None  # only for masked-image pre-training; DDP wants no unused parameter
        self.n_skip, self.size = 1 + cfg.image_registers, cfg.image_size

    def forward(self, image):
        assert image.dim() == 4 and image.shape[1:] == (3, self.size, self.size), f"image {list(image.shape)}"
        return self.net(pixel_values=image).last_hidden_state[:, self.n_skip:]

# -------------------------------------------------------------------------------------------------------- The track VAE
class TrackVAE(nn.Module):
    """Sec. B. encode(image [B, 3, S, S], tracks [B, N, T, 2] unit (x, y)) -> (mean, logvar) [B, n_latents, C]:
    one token per (track, frame), Fourier + MLP of its (x, y), RoPE at (t, y0, x0), beside the latent grid queries
    (+1 register); each layer self-attends, cross-attends to the DINOv2 tokens, SwiGLU. decode(z, image,
    query_xy [B, Q, 2]) -> [B, Q, T, 2]: one query per (point, frame) attends to the latents and to its own point's
    frames only, so a point's path does not depend on which others are decoded (decode_dense = point-wise).
    forward(image, tracks) -> the loss (Table F): L1 over encoded and held-out tracks + beta KL."""
    def __init__(self, cfg: VAEConfig, pretrained=True):
        super().__init__()
        self.cfg = cfg
        d, C, bands, top = cfg.dim, cfg.latent_channels, cfg.fourier_bands, cfg.rope_max_freq_space
        self.image_encoder = ImageEncoder(cfg, pretrained)
        self.rope = RoPE(cfg.head_dim, (cfg.rope_max_freq_time, top, top))
        self.point_embed = PointEmbed(4 if cfg.encode_offsets else 2, d, bands, top, n_blocks=2)
        self.track_pos_embed = PointEmbed(3, d, bands, top, n_blocks=0) if cfg.position_content else None
        self.latent_queries = nn.Parameter(torch.randn(self.n_latents, d) * 0.02)
        self.register = nn.Parameter(torch.randn(1, d) * 0.02)
        self.encoder = nn.ModuleList(Block(d, cfg.head_dim, cfg.image_dim, cfg.ffn_mult) for _ in range(cfg.enc_layers))
        self.enc_norm, self.to_moments, self.latent_proj = RMSNorm(d), nn.Linear(d, 2 * C), nn.Linear(C, d)
        self.query_token = nn.Parameter(torch.randn(d) * 0.02)
        self.query_embed = PointEmbed(3, d, bands, top, n_blocks=0) if cfg.position_content else None
        self.decoder = nn.ModuleList(Block(d, cfg.head_dim, cfg.image_dim, cfg.ffn_mult) for _ in range(cfg.dec_layers))
        self.dec_norm, self.to_xy = RMSNorm(d), nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 2))
        # (t, y, x) of each latent token: slot times and grid-cell centres (Sec. D), or all zero (Fig. J)
        slot_t = (torch.arange(cfg.temporal_slots) + 0.5) / cfg.temporal_slots * 2 - 1
        cells = grid_centres(cfg.grid_size, cfg.grid_size)
        pos = torch.cat([slot_t.repeat_interleave(len(cells))[:, None], cells.repeat(cfg.temporal_slots, 1)], 1)
        self.register_buffer("latent_pos", pos * (cfg.latent_layout == "grid"), persistent=False)

    @property
    def n_latents(self):
        return self.cfg.temporal_slots * self.cfg.grid_size ** 2

    def track_positions(self, start_xy, T):
        """RoPE positions (t, y0, x0) of per-(point, frame) tokens, t in [-1, 1]: [B, N, 2] -> [B, N, T, 3]."""
        t = torch.linspace(-1, 1, T, device=start_xy.device) if T > 1 else start_xy.new_zeros(1)
        t = t.view(1, 1, T, 1).expand(*start_xy.shape[:2], T, 1)
        return torch.cat([t, start_xy.flip(-1).unsqueeze(2).expand(-1, -1, T, -1)], dim=-1)

    def image_tokens(self, image):   # the start frame's DINOv2 tokens, the context of encoder and decoder
        return self.image_encoder(image)

    def encode(self, image, tracks, token_mask=None, image_tokens=None):
        """-> (mean, logvar). token_mask [B, N, T] (True = use this point-frame): Table H's dropout / occlusion."""
        assert tracks.dim() == 4 and tracks.shape[-1] == 2, f"tracks: expected [B, N, T, 2], got {list(tracks.shape)}"
        B, N, T, _ = tracks.shape
        ctx = self.image_tokens(image) if image_tokens is None else image_tokens
        pos = self.track_positions(tracks[:, :, 0], T).reshape(B, N * T, 3)
        coords = torch.cat([tracks, tracks - tracks[:, :, :1]], dim=-1) if self.cfg.encode_offsets else tracks
        tokens = self.point_embed(coords).reshape(B, N * T, -1)
        if self.track_pos_embed is not None:
            tokens = tokens + self.track_pos_embed(pos)
        lead = torch.cat([self.latent_queries, self.register]).expand(B, -1, -1)
        lead_pos = F.pad(self.latent_pos, (0, 0, 0, 1)).expand(B, -1, -1)
        x, rope = torch.cat([lead, tokens], dim=1), self.rope(torch.cat([lead_pos, pos], dim=1))
        mask = None if token_mask is None else torch.cat(
            [token_mask.new_ones(B, lead.shape[1]), token_mask.reshape(B, N * T)], 1)[:, None, None]
        ctx_rope = self.rope(self.image_encoder.pos)
        for block in self.encoder:
            x = block(x, rope, ctx, ctx_rope, mask=mask)
        mean, logvar = self.to_moments(self.enc_norm(x[:, :self.n_latents])).chunk(2, dim=-1)
        return mean, logvar.clamp(-30, 20)

    def decoder_context(self, z, ctx):
        """The latent tokens through the decoder once (they attend to each other and the image, never to the
        queries): per layer, the (k, v) the queries attend to."""
        x = self.latent_proj(z)
        rope = tuple(r.expand(z.shape[0], -1, -1) for r in self.rope(self.latent_pos))
        ctx_rope, kvs = self.rope(self.image_encoder.pos), []
        for i, block in enumerate(self.decoder):
            kvs.append(block.self_attn.keys_values(block.norm1(x), rope))
            if i + 1 < len(self.decoder):
                x = block(x, rope, ctx, ctx_rope)
        return kvs

    def decode_queries(self, kvs, ctx, query_xy, T):
        B, Q, _ = query_xy.shape
        pos = self.track_positions(query_xy, T).reshape(B * Q, T, 3)
        x = self.query_token.expand(B * Q, T, -1)
        if self.query_embed is not None:
            x = x + self.query_embed(pos)
        rope, ctx_rope = self.rope(pos), self.rope(self.image_encoder.pos)
        for block, (k, v) in zip(self.decoder, kvs):
            extra = tuple(a.unsqueeze(1).expand(-1, Q, -1, -1, -1).reshape(B * Q, *a.shape[1:]) for a in (k, v))
            x = block(x, rope, ctx, ctx_rope, extra_kv=extra)
        xy = self.to_xy(self.dec_norm(x)).reshape(B, Q, T, 2)
        return xy + query_xy.unsqueeze(2) if self.cfg.predict_offsets else xy

    def decode(self, z, image, query_xy, T=None, chunk=4096, image_tokens=None, progress=False):
        """z [B, n_latents, C], query_xy [B, Q, 2] unit (x, y) -> tracks [B, Q, T, 2], chunk points at a time."""
        from tqdm import tqdm
        assert query_xy.dim() == 3 and query_xy.shape[-1] == 2, f"query_xy [B, Q, 2], not {list(query_xy.shape)}"
        ctx = self.image_tokens(image) if image_tokens is None else image_tokens
        kvs, chunks = self.decoder_context(z, ctx), query_xy.split(chunk, dim=1)
        return torch.cat([self.decode_queries(kvs, ctx, q, T or self.cfg.n_frames)
                          for q in tqdm(chunks, disable=not progress, desc="decode", leave=False)], dim=1)

    @torch.no_grad()
    def decode_dense(self, z, image, height, width, chunk=2048, progress=False):
        """Sec. C densification: every pixel centre of a height x width frame -> [B, H, W, T, 2] unit (x, y);
        memory is bounded by the chunk of points decoded at once."""
        xs, ys = torch.linspace(-1, 1, width, device=z.device), torch.linspace(-1, 1, height, device=z.device)
        query = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(1, -1, 2).expand(len(z), -1, -1)
        tracks = self.decode(z, image, query, chunk=chunk, progress=progress)
        return tracks.reshape(len(z), height, width, self.cfg.n_frames, 2)

    def forward(self, image, tracks, visible=None, rng=None):
        """tracks [B, N, T, 2]: the first n_enc are encoded, all N reconstructed from their start points. rng: a
        SampleRandom for the track dropout and the posterior noise (default: the global RNG)."""
        cfg, (B, N, T, _) = self.cfg, tracks.shape
        rng = rng or SampleRandom(torch.randint(2 ** 31, (B,)).tolist(), device=tracks.device)   # (fresh noise)
        use = torch.ones(B, N, T, dtype=torch.bool, device=tracks.device)
        if cfg.mask_occluded and visible is not None:
            use = use & visible
        if self.training and cfg.track_dropout > 0:
            use = use & (rng.rand(N, 1) >= cfg.track_dropout)
        ctx, n_enc = self.image_tokens(image), min(cfg.n_enc, N)
        mean, logvar = self.encode(image, tracks[:, :n_enc], use[:, :n_enc], image_tokens=ctx)
        z = mean + rng.randn(*mean.shape[1:]) * (0.5 * logvar).exp() if self.training else mean  # reparameterised
        pred = self.decode(z, image, tracks[:, :, 0], T, image_tokens=ctx)
        n = use.sum().clamp(min=1)
        recon = (LOSSES[cfg.recon_loss](pred, tracks, reduction="none").mean(-1) * use).sum() / n
        l1 = ((pred - tracks).abs().mean(-1) * use).sum() / n
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum((1, 2)).mean()   # KL(q(z|x) || N(0, 1))
        return {"loss": recon + cfg.kl_weight * kl, "l1": l1, "kl": kl, "pred": pred}

def load_model(path, kind, config_cls, build, device="cpu", make=None):
    """build(config) from a checkpoint, then its weights (the EMA's where there are), eval mode, with .fingerprint."""
    ckpt = load_checkpoint(path, kind, device, make)
    model = build(config_from_dict(config_cls, ckpt["config"], path))
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
        raise ValueError(f"{path}: not the {what} (fingerprint {model.fingerprint}; the checkpoint was made with "
                         f"{expected})")

def load_vae(path, device="cpu", make=None):
    """A TrackVAE from a checkpoint of this file (weights_only), with .fingerprint."""
    return load_model(path, "vae", VAEConfig, lambda cfg: TrackVAE(cfg, pretrained=False), device, make)[0]

def dry_run(cfg, model, groups, default):
    """--dry-run: the config, the parameters by part (groups = {module name: part}), the total."""
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    counts = {}
    for name, p in model.named_parameters():
        part = groups.get(name.split(".")[0], default)
        counts[part] = counts.get(part, 0) + p.numel()
    print("\n".join(f"{part:>15}: {n / 1e6:8.2f}M" for part, n in counts.items()))
    print(f"total parameters: {sum(counts.values())}")
    return counts

# ---------------------------------------------------------------------------------------------- Training and validation
def vae_loss(net, batch):
    out = net(batch["image"], batch["tracks"], batch["visible"], rng=batch["rng"])
    return out["loss"], {"l1": out["l1"], "kl": out["kl"]}

def validate_vae(model, items, out_png=None):
    """Held-out clips: eval.py recon's AE PCK (encoded tracks) and MAE PCK (held-out ones) at 256 px (Tables G, H),
    beside the nearest-neighbour and static baselines; a picture of truth (left) and reconstruction (right)."""
    from data import track_picture
    from eval import recon_scores
    scores, pred = recon_scores(model, items)
    if out_png:
        track_picture(out_png, [it["frame"] for it in items[:4]], [[it["tracks"] for it in items[:4]], pred[:4]])
    return dict(AE=scores["VAE"]["AE"]["delta_avg"], MAE=scores["VAE"]["MAE"]["delta_avg"],
                NN_MAE=scores["nearest_neighbour"]["MAE"]["delta_avg"], static_MAE=scores["static"]["MAE"]["delta_avg"])

def main(argv=None):
    cfg = parse_config(VAEConfig, PRESETS, argv)
    torch.manual_seed(cfg.seed)
    model = TrackVAE(cfg, pretrained=not cfg.dry_run)
    if cfg.dry_run:
        return dry_run(cfg, model, dict(image_encoder="image encoder", **dict.fromkeys(
            ("latent_proj", "query_token", "query_embed", "decoder", "dec_norm", "to_xy"), "decoder")), "encoder")
    from data import make_track_dataset   # synthetic, .npz clips, .tar shards, or LIBERO .hdf5 demos
    common = dict(n_frames=cfg.n_frames, n_enc=cfg.n_enc, n_dec=cfg.n_dec, image_size=cfg.image_size, seed=cfg.seed,
                  synth_tracks=cfg.synth_tracks)
    train_set = make_track_dataset(cfg.data, "train", **common)
    val_set = make_track_dataset(cfg.data, "val", length=cfg.val_clips, **common)
    val_items = [val_set[i] for i in range(min(cfg.val_clips, len(val_set)))]
    freeze = (model.image_encoder, cfg.unfreeze_image_encoder_at) if cfg.freeze_image_encoder else None
    validate = (lambda raw, step: validate_vae(raw, val_items, os.path.join(cfg.out_dir, "val.png"))) \
        if val_items else None
    train(cfg, model, train_set, vae_loss, "vae", validate, freeze=freeze)

if __name__ == "__main__":
    cli(main)
