"""Stage 3: the policy head for LIBERO action prediction (supplement Sec. A, "LIBERO Action Prediction").

A shallow transformer (the "inverse dynamics module") whose learned action queries cross-attend ONLY to the motion
latents that the frozen LIBERO planner generates (10 Euler steps, its EMA weights), regressing a chunk of future
7-D robot actions with an L2 loss: behaviour cloning, as ATM and Tra-MoE. The head never sees the frames, the task
or the timestep, so whatever it knows about what to do next went through the plan. Blocks and the training loop
come from vae.py, the planner from planner.py.

    python data.py robot --out data/robot --n 640 --seed 0          # synthetic robot demos in ATM's LIBERO layout
    python vae.py --preset tiny_robot                                # the VAE on the robot tracks -> out/tiny/vae-robot/
    python policy.py --preset perception_tiny                        # the tiny planner's image encoder (a CNN)
    python planner.py --preset libero_tiny                           # the LIBERO planner -> out/tiny/planner-libero/
    python policy.py                                                 # tiny head -> out/tiny/policy/ckpt.pt (+ plans.pt)
    python policy.py --shuffle_latents --out_dir out/tiny/policy-shuffled --plans out/tiny/policy/plans.pt
                                                                     # control: other episodes' latents (same plans)
    python policy.py --evaluate --compare out/tiny/policy-shuffled/ckpt.pt    # held-out action MSE + Table E
    python policy.py --preset paper --dry-run                        # parameters: the head, and with its planner
    torchrun --nproc_per_node=2 policy.py --micro_batch=16

Rollouts (frames uint8 [V, H, W, 3], both views upright, in planner.LIBERO_VIEWS order; t the episode step):

    policy = load_policy("out/tiny/policy/ckpt.pt", averaging="exponential")
    policy.reset()
    action = policy.act(frames, task_emb, t)    # [7]: plan, regress a chunk, average the overlapping chunks
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from planner import LIBERO_VIEWS, PRESETS as PLANNER_PRESETS, MotionPlanner, PlannerConfig, load_planner
from vae import (Block, ImageEncoder, RMSNorm, SampleRandom, config_from_dict, load_checkpoint, parse_config,
                 set_trainable, setup_distributed, train)


@dataclass
class PolicyConfig:
    preset: str = "tiny"
    planner: str = "out/paper/planner-libero/ckpt.pt"   # the frozen LIBERO planner (planner.py --preset libero)
    data: str = "data/libero"                            # a folder of LIBERO demos (.hdf5, ATM's layout)
    # the planner's latents (taken from the planner checkpoint): n_views grids of n_latents tokens
    latent_tokens: int = 512
    latent_channels: int = 16
    # the head (Sec. A: "a shallow 6-layer transformer with dimensionality 768")
    dim: int = 768
    layers: int = 6
    head_dim: int = 64
    ffn_mult: int = 3
    action_dim: int = 7                # LIBERO: end-effector delta (6) + gripper (1)
    action_chunk: int = 16             # future actions per plan (ours: the 16-frame window the planner covers)
    plan_steps: int = 10               # Euler steps of the planner for every plan, in training and rollouts (Sec. A)
    perception: bool = False           # train the libero_tiny planner's image encoder instead (Perception)
    vae: str = ""                      # perception: the VAE that planner will plan in (its frames and image size)
    shuffle_latents: bool = False      # the control: each window learns from the latents of another episode's window
    latent_pool: int = 0               # > 0: cycle through this many training windows and cache their plans (a plan's
                                       # noise is keyed by the window, so a cached plan is the same plan); 0: plan
                                       # every sample afresh (the paper's way)
    plans: str = ""                    # with latent_pool: a plan file to start from, e.g. the head's out_dir/plans.pt for
                                       # its shuffled control (the same windows and noise: the same plans); every pooled
                                       # run writes its plans to out_dir/plans.pt
    norm_samples: int = 512            # training windows for the action mean / std (the head outputs standardised)
    # optimisation (not given in the supplement; Table F's optimiser)
    max_steps: int = 100_000
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    warmup_steps: int = 300
    decay_frac: float = 0.1
    batch_start: int = 256
    batch_end: int = 256
    batch_ramp_steps: int = 1
    micro_batch: int = 64
    grad_clip: float = 1.0
    # run
    seed: int = 0
    out_dir: str = "out/paper/policy"
    resume: bool = False
    log_every: int = 50
    val_every: int = 5000
    val_clips: int = 0                 # held-out windows for the action MSE (0: all of them) ...
    eval_stride: int = 4               # ... starting every eval_stride frames of the held-out demos
    ckpt_every: int = 5000
    num_workers: int = 4
    device: str = "auto"
    compile: bool = False
    dry_run: bool = False
    # evaluation (--evaluate): this head, a control head (--compare), the planner's Table E numbers
    evaluate: bool = False
    compare: str = ""
    eval_k: int = 8
    eval_json: str = ""


PRESETS = {
    "paper": {},
    # 2 CPU cores in about 20 minutes: a narrow 2-layer head over the tiny LIBERO planner's 2 x 8x8 latents; 8192
    # training windows planned once (a sixth of a second each) and cycled through (on the 3000-step planner, 4096
    # gave 1.60x instead of 1.69x and overfit by step 4000: README "LIBERO"); every 8th held-out window start.
    "tiny": dict(
        planner="out/tiny/planner-libero/ckpt.pt", data="data/robot", latent_tokens=128, latent_channels=8, dim=128,
        layers=2, head_dim=32, latent_pool=8192, norm_samples=512, max_steps=3000, lr=1e-3, warmup_steps=100,
        decay_frac=0.2, batch_start=32, batch_end=32, micro_batch=32, log_every=100, val_every=3000,
        ckpt_every=500, num_workers=1, eval_stride=8, out_dir="out/tiny/policy", eval_json="out/tiny/eval/policy.json"),
}
# The image encoder of planner.py --preset libero_tiny, before that planner exists (Perception): the conv
# stand-in and a head of the tiny policy's width, trained together on 4096 training windows' frames -> actions;
# 18 min on 2 cores.
PRESETS["perception_tiny"] = dict(PRESETS["tiny"], perception=True, planner="", vae="out/tiny/vae-robot/ckpt.pt",
                                  latent_pool=4096, max_steps=1000, warmup_steps=50, batch_start=64, batch_end=64,
                                  micro_batch=64, val_every=250, ckpt_every=250, out_dir="out/tiny/perception",
                                  eval_json="")


# ----------------------------------------------------------------------------------------------------
# The head


class PolicyHead(nn.Module):
    """Learned action queries through layers of [self-attention among the queries, cross-attention to the latent
    tokens, SwiGLU] (vae.Block), then a linear map to actions. Its only input is the planner's latents
    [B, latent_tokens, C] (both views' grids, view-major); each latent token gets a learned embedding of its slot
    (view and grid cell). Outputs standardised actions; actions() gives them in the data's units."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.latent_in = nn.Linear(cfg.latent_channels, d)
        self.latent_pos = nn.Parameter(torch.randn(cfg.latent_tokens, d) * 0.02)
        self.latent_norm = RMSNorm(d)
        self.queries = nn.Parameter(torch.randn(cfg.action_chunk, d) * 0.02)   # one per future action
        self.blocks = nn.ModuleList(Block(d, cfg.head_dim, d, cfg.ffn_mult) for _ in range(cfg.layers))
        self.out_norm = RMSNorm(d)
        self.action_out = nn.Linear(d, cfg.action_dim)
        nn.init.zeros_(self.action_out.weight)  # start at the mean action
        nn.init.zeros_(self.action_out.bias)
        # the planner's latent normalisation and the training actions' statistics, saved with the weights
        self.register_buffer("latent_shift", torch.zeros(()))
        self.register_buffer("latent_scale", torch.ones(()))
        self.register_buffer("action_mean", torch.zeros(cfg.action_dim))
        self.register_buffer("action_std", torch.ones(cfg.action_dim))

    def forward(self, z):
        """z [B, latent_tokens, C] (the planner's output, un-normalised) -> standardised actions [B, chunk, A]."""
        if z.dim() != 3 or tuple(z.shape[1:]) != (self.cfg.latent_tokens, self.cfg.latent_channels):
            raise ValueError(f"latents: expected [B, {self.cfg.latent_tokens}, {self.cfg.latent_channels}], "
                             f"got {list(z.shape)}")
        ctx = self.latent_norm(self.latent_in((z - self.latent_shift) * self.latent_scale) + self.latent_pos)
        x = self.queries.expand(z.shape[0], -1, -1)
        for block in self.blocks:
            x = block(x, None, ctx, None)   # (no RoPE: the slots are in latent_pos, the queries are learned)
        return self.action_out(self.out_norm(x))

    def actions(self, z):
        return self.forward(z) * self.action_std + self.action_mean


class FramesHead(nn.Module):
    """A control that bounds the chain from above (eval.py robot-ceiling --frames): the same head, reading what
    the planner reads instead of what it plans. Its tokens: the planner's locked image encoder's patch tokens of
    both start frames (frame_features), one for the task embedding and one for the timestep, each through a
    linear map to the head's width. What a head of this size cannot get from the planner's perception, a plan made
    from it cannot carry either."""

    def __init__(self, cfg: PolicyConfig, pc: PlannerConfig):
        super().__init__()
        n_patches = (pc.image_size // pc.image_patch) ** 2
        cfg = dataclasses.replace(cfg, latent_tokens=len(LIBERO_VIEWS) * n_patches + 2, latent_channels=cfg.dim)
        self.image_in = nn.Linear(pc.image_dim, cfg.dim)
        self.task_in = nn.Linear(pc.text_dim, cfg.dim)
        self.step_in = nn.Linear(1, cfg.dim)
        self.max_timestep = pc.max_timestep
        self.head = PolicyHead(cfg)

    def forward(self, features, task_emb, timestep):
        """features [B, V * patches, image_dim], task_emb [B, text_dim], timestep [B] -> standardised actions."""
        step = (timestep.float() / self.max_timestep)[:, None, None]
        return self.head(torch.cat([self.image_in(features), self.task_in(task_emb)[:, None], self.step_in(step)], 1))

    def actions(self, features, task_emb, timestep):
        return self.forward(features, task_emb, timestep) * self.head.action_std + self.head.action_mean


def frame_features(image_encoder, image):
    """An image encoder (the planner's) on both start frames: image [B, V, 3, S, S] -> [B, V * patches, image_dim]."""
    return image_encoder(image.flatten(0, 1)).unflatten(0, image.shape[:2]).flatten(1, 2)


class Perception(nn.Module):
    """policy.py --preset perception_tiny: what DINOv2's pre-training gives the paper's planner, for the tiny robot
    path, which has no pretrained image encoder. The planner's image encoder (vae.ConvStandIn) learns, with a small
    head, to regress the actions that follow a window's start frames (behaviour cloning from the frames, the task
    and the timestep); planner.py --image_init then takes the encoder and keeps it locked, as it keeps DINOv2. The
    head is dropped: the policy still reads only plans. The head is built like the planner: a read-out token and
    both frames' tokens in one sequence (vae.Block), the task and the timestep as cross-attended conditions, so that
    every image token hears which block the task names; the read-out token's state -> the whole chunk. (With
    FramesHead's 16 learned queries and zero-initialised output, the pretraining stayed at the mean action for 400
    steps: README "LIBERO".)"""

    def __init__(self, cfg: PolicyConfig, pc: PlannerConfig):
        super().__init__()
        d, n_tokens = cfg.dim, len(LIBERO_VIEWS) * (pc.image_size // pc.image_patch) ** 2
        self.encoder = ImageEncoder(pc, pretrained=False)   # (not `image_encoder`: train() would lock that one)
        self.image_in = nn.Linear(pc.image_dim, d)
        self.token_pos = nn.Parameter(torch.randn(n_tokens, d) * 0.02)   # view and patch of each image token
        self.task_in = nn.Linear(pc.text_dim, d)
        self.step_in = nn.Linear(1, d)
        self.max_timestep = pc.max_timestep
        self.read_out = nn.Parameter(torch.randn(1, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, cfg.head_dim, d, cfg.ffn_mult) for _ in range(cfg.layers))
        self.out_norm = RMSNorm(d)
        self.chunk_shape = (cfg.action_chunk, cfg.action_dim)
        self.actions_out = nn.Linear(d, cfg.action_chunk * cfg.action_dim)
        self.register_buffer("action_mean", torch.zeros(cfg.action_dim))
        self.register_buffer("action_std", torch.ones(cfg.action_dim))

    def forward(self, image, task_emb, timestep):
        """image [B, V, 3, S, S], task_emb [B, text_dim], timestep [B] -> standardised actions [B, chunk, A]."""
        step = (timestep.float() / self.max_timestep)[:, None, None]
        conditions = torch.cat([self.task_in(task_emb)[:, None], self.step_in(step)], dim=1)
        tokens = self.image_in(frame_features(self.encoder, image)) + self.token_pos
        x = torch.cat([self.read_out.expand(image.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x, None, conditions, None)
        return self.actions_out(self.out_norm(x[:, 0])).unflatten(1, self.chunk_shape)

    def actions(self, image, task_emb, timestep):
        return self.forward(image, task_emb, timestep) * self.action_std + self.action_mean


def perception_planner_config(cfg, text_dim):
    """The planner that Perception's encoder is for: planner.py's libero_tiny preset (image_encoder "conv") on
    the VAE --vae, as planner.py builds it (its frames and image size are the VAE's)."""
    from planner import config_for_vae
    from vae import load_vae
    if not os.path.isfile(cfg.vae):
        raise SystemExit(f"--vae {cfg.vae}: no such checkpoint; train the robot VAE first with: "
                         "python vae.py --preset tiny_robot")
    pc = PlannerConfig(**{**PLANNER_PRESETS["libero_tiny"], "preset": "libero_tiny", "vae": cfg.vae,
                          "text_dim": text_dim})
    return config_for_vae(pc, load_vae(cfg.vae))


# ----------------------------------------------------------------------------------------------------
# Rollouts: plan, regress, average the overlapping chunks


class ActionChunker:
    """Temporal averaging of overlapping action chunks (ACT's "temporal ensembling"). A chunk predicted at step s
    covers steps s .. s + chunk - 1. The action at step t is the weighted mean of every stored chunk's entry for t,
    weight exp(-decay * age) with age = t - s: "uniform" is decay 0, "exponential" with decay > 0 trusts newer
    plans more (decay < 0: older ones, as ACT's m). Chunks [..., chunk, A] (any leading batch dimensions)."""

    def __init__(self, chunk, weighting="exponential", decay=0.1):
        if weighting not in ("uniform", "exponential"):
            raise ValueError(f"weighting: expected 'uniform' or 'exponential', got {weighting!r}")
        self.chunk, self.decay = chunk, 0.0 if weighting == "uniform" else decay
        self.chunks = {}

    def reset(self):
        self.chunks = {}

    def add(self, step, actions):
        if actions.shape[-2] != self.chunk:
            raise ValueError(f"actions: expected [..., {self.chunk}, A], got {list(actions.shape)}")
        self.chunks[step] = actions
        self.chunks = {s: a for s, a in self.chunks.items() if s > step - self.chunk}  # drop chunks that ended

    def action(self, step):
        covering = [(step - s, a[..., step - s, :]) for s, a in self.chunks.items() if 0 <= step - s < self.chunk]
        if not covering:
            raise ValueError(f"no stored chunk covers step {step}")
        weights = [math.exp(-self.decay * age) for age, _ in covering]
        return sum(w * a for w, (_, a) in zip(weights, covering)) / sum(weights)


class Policy:
    """The frozen planner + the head, for rollouts. chunk() plans (plan_steps Euler steps) and regresses a chunk of
    actions; act() returns the action for step t: the newest chunk's first action, or with averaging
    ("uniform" / "exponential") the average of every chunk predicted in this episode that covers t."""

    def __init__(self, head, planner, steps=10, averaging="none", decay=0.1, seed=0):
        self.head, self.planner, self.steps = head.eval(), planner.eval(), steps
        self.chunker = None if averaging == "none" else ActionChunker(head.cfg.action_chunk, averaging, decay)
        self.generator = torch.Generator().manual_seed(seed)

    def reset(self):
        """Call at the start of every episode."""
        if self.chunker is not None:
            self.chunker.reset()

    @torch.no_grad()
    def chunk(self, frames, task_emb, t):
        """frames uint8 [V, H, W, 3] or [B, V, H, W, 3] (upright); task_emb [D] or [B, D]; t int or [B]
        -> actions [B, chunk, A] in the data's units."""
        from data import prepare_image
        frames = torch.as_tensor(frames)
        frames = frames[None] if frames.dim() == 4 else frames
        device = next(self.head.parameters()).device
        size = self.planner.cfg.image_size
        image = torch.stack([torch.stack([prepare_image(f.cpu().numpy(), size)[1] for f in views]) for views in frames])
        task_emb = torch.as_tensor(task_emb, dtype=torch.float32).reshape(len(frames), -1)
        timestep = torch.as_tensor(t).reshape(-1).expand(len(frames))
        z = self.planner.sample(image.to(device), task_emb=task_emb.to(device), timestep=timestep.to(device),
                                steps=self.steps, generator=self.generator)
        return self.head.actions(z)

    def act(self, frames, task_emb, t):
        """The action for episode step t: [A] for one environment's frames [V, H, W, 3], [B, A] for a batch."""
        actions = self.chunk(frames, task_emb, t)
        if self.chunker is None:
            action = actions[:, 0]
        else:
            step = int(torch.as_tensor(t).reshape(-1)[0])  # (a batch of environments steps together)
            self.chunker.add(step, actions)
            action = self.chunker.action(step)
        return action[0] if np.ndim(frames) == 4 else action


def frozen_planner(path, device="cpu"):
    """The planner a head reads from: its EMA weights, frozen; a message naming the commands when missing."""
    if not os.path.isfile(path):
        raise SystemExit(f"--planner {path}: no such checkpoint. Make the data and a LIBERO planner first:\n"
                         "  python data.py robot --out data/robot --n 640 --seed 0\n"
                         "  python vae.py --preset tiny_robot             (the paper's: its general VAE)\n"
                         "  python policy.py --preset perception_tiny     (the tiny path's image encoder)\n"
                         "  python planner.py --preset libero_tiny        (or --preset libero for the paper's)")
    planner = load_planner(path, device)
    if planner.cfg.task != "libero":
        raise SystemExit(f"--planner {path}: a {planner.cfg.task!r} planner; the policy needs a LIBERO planner "
                         "(python planner.py --preset libero_tiny)")
    set_trainable(planner, False)
    return planner


def load_policy(path, device="cpu", averaging="none", decay=0.1, seed=0):
    """A Policy from a head checkpoint written by this file and the planner checkpoint it names."""
    ckpt = load_checkpoint(path, kind="policy", device=device)
    cfg = config_from_dict(PolicyConfig, ckpt["config"], path)
    head = PolicyHead(cfg)
    head.load_state_dict(ckpt["model"])
    return Policy(head.to(device), frozen_planner(cfg.planner, device), cfg.plan_steps, averaging, decay, seed)


# ----------------------------------------------------------------------------------------------------
# Training: windows with the planner inputs of the window whose plan they learn from


def episode_of(item):
    """Which demo a window comes from (data.LiberoDataset's demo number): the control takes plans of other demos."""
    return int(item["demo"])


class PlannedWindows(torch.utils.data.Dataset):
    """Item i: the action chunk of training window w(i), and the planner inputs (both start frames, task embedding,
    timestep) of window p(i), whose plan the head learns from. w(i) = i, or i mod pool with a pool; p = w, or with
    shuffle a window of another episode drawn afresh for every sample i (seeded by i): the control. (A fixed
    pairing would not do: the head could learn which plan stands for which actions.) plan_index = p(i) keys the
    plan's noise and its cache entry."""

    def __init__(self, base, pool=0, shuffle=False, seed=0):
        self.base, self.pool, self.shuffle, self.seed = base, pool, shuffle, seed
        self.items = {}  # with a pool: the pooled windows, read once (per loader worker)

    def __len__(self):
        return self.pool or len(self.base)

    def window(self, w):
        if not self.pool:
            return self.base[w]
        if w not in self.items:
            self.items[w] = self.base[w]
        return self.items[w]

    def __getitem__(self, index):
        w = int(index) % self.pool if self.pool else int(index)
        own = self.window(w)
        p, plan = w, own
        rng = np.random.default_rng((self.seed, int(index), 5))
        while self.shuffle and (p == w or episode_of(plan) == episode_of(own)):
            p = int(rng.integers(self.pool or len(self.base)))
            plan = self.window(p)
        return dict(actions=own["actions"], image=plan["image"], task_emb=plan["task_emb"],
                    timestep=torch.as_tensor(plan["timestep"]), plan_index=p, index=int(index))


def plan(planner, batch, cfg, cache=None, seed_tag=0):
    """The planner's latents for a batch of planner inputs, noise keyed by batch["plan_index"] (cache: a dict of
    plans already made, by plan_index)."""
    keys = [int(i) for i in batch["plan_index"]]
    missing = [b for b, k in enumerate(keys) if cache is None or k not in cache]
    if missing:
        device = batch["image"].device
        planner.to(device)
        noise = SampleRandom([keys[b] for b in missing], cfg.seed + seed_tag, device).randn(
            planner.n_views * planner.n_latents, planner.cfg.latent_channels)
        z = planner.sample(batch["image"][missing], task_emb=batch["task_emb"][missing],
                           timestep=batch["timestep"][missing], steps=cfg.plan_steps, noise=noise).float()
        if cache is None:
            return z
        cache.update({keys[b]: row for b, row in zip(missing, z)})
    return torch.stack([cache[k] for k in keys])


def plan_file_key(planner, cfg):
    """What a pooled plan depends on: the planner's weights, the windows (data, seed, pool) and the sampler's steps."""
    weights = sum(float(p.double().sum()) for p in planner.state_dict().values() if p.is_floating_point())
    return dict(planner_weights=weights, data=os.path.abspath(cfg.data), seed=cfg.seed, latent_pool=cfg.latent_pool,
                plan_steps=cfg.plan_steps)


def load_plans(path, key):
    """{plan_index: latents} from a plan file (save_plans); a ValueError naming the field it was made for otherwise."""
    if not os.path.isfile(path):
        raise ValueError(f"--plans {path}: no such file (a pooled policy run writes out_dir/plans.pt)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        made_for, plans = saved["key"], saved["plans"]
    except Exception as e:
        raise ValueError(f"--plans {path}: not a plan file written by policy.py ({e})") from None
    for field, value in key.items():
        if made_for.get(field) != value:
            raise ValueError(f"--plans {path}: made with {field} = {made_for.get(field)!r}, this run has {value!r}")
    return {int(k): z for k, z in zip(plans["index"], plans["latents"])}


def save_plans(path, cache, key):
    from data import write_atomically
    index = sorted(cache)
    state = dict(key=key, plans=dict(index=torch.tensor(index), latents=torch.stack([cache[k] for k in index]).cpu()))
    write_atomically(path, lambda f: torch.save(state, f))


def make_policy_loss(head, planner, cfg, cache=None):
    """loss_fn for vae.train: plan (frozen planner, no gradient), then the L2 loss on the actions (BC, Sec. A).
    head: the raw model, for its action statistics (net may be its DDP wrapper). cache: with a pool, the dict of
    plans made so far (by plan_index), filled as training meets new windows."""
    cache = (cache if cache is not None else {}) if cfg.latent_pool else None

    def policy_loss(net, batch):
        with torch.no_grad():
            z = plan(planner, batch, cfg, cache)
        # the head predicts standardised actions; the L2 loss is on the actions themselves (ATM's BC loss), so a
        # dimension counts by its variance in the data (LIBERO's gripper command more than a small rotation)
        return F.mse_loss(net(z) * head.action_std + head.action_mean, batch["actions"]), {}
    return policy_loss


def measure_action_stats(dataset, n):
    actions = torch.cat([dataset[i]["actions"] for i in range(n)])
    return actions.mean(0), actions.std(0).clamp(min=1e-6)


# ----------------------------------------------------------------------------------------------------
# Evaluation on held-out episodes


def eval_windows(cfg, pc):
    """Held-out windows (the val split: demos that training never sees), one starting every eval_stride frames
    (the val split's windows start every `window` frames; the head needs no tracks), with the inputs of a planner
    of config pc and the actions."""
    import data
    val_set = data.LiberoDataset(cfg.data, "val", n_frames=pc.n_frames, window=cfg.eval_stride, n_tracks=1,
                                 image_size=pc.image_size, action_chunk=cfg.action_chunk, seed=cfg.seed)
    items = [val_set[i] for i in range(min(cfg.val_clips or len(val_set), len(val_set)))]
    return dict(image=torch.stack([it["image"] for it in items]),
                task_emb=torch.stack([it["task_emb"] for it in items]),
                timestep=torch.stack([it["timestep"] for it in items]),
                actions=torch.stack([it["actions"] for it in items]), plan_index=[it["index"] for it in items])


@torch.no_grad()
def action_mse(heads, planner, windows, cfg, batch_size=32):
    """Action MSE in the data's units (mean over the chunk and the 7 dimensions) of each head on the held-out
    windows, all from the same plans (noise keyed by the window), beside predicting the mean training action."""
    device = next(planner.parameters()).device
    zs = []
    for first in range(0, len(windows["actions"]), batch_size):
        part = {k: v[first:first + batch_size] for k, v in windows.items()}
        part = {k: v.to(device) if torch.is_tensor(v) else v for k, v in part.items()}
        zs.append(plan(planner, part, cfg, seed_tag=1))
    z = torch.cat(zs)
    mean = next(iter(heads.values())).action_mean
    predictions = {name: head.eval().to(device).actions(z) for name, head in heads.items()}
    return score_actions(predictions, mean, windows["actions"].to(device))


def score_actions(predictions, mean, actions):
    """{name: predicted actions [N, chunk, A]} and the mean training action [A] -> each one's MSE against actions
    [N, chunk, A] in the data's units: overall, dims 0-1 and the gripper, beside the mean action's (mean_action)."""
    predictions = dict(predictions, mean_action=mean.expand_as(actions))
    out = {}
    for name, pred in predictions.items():
        error = (pred - actions).pow(2).mean((0, 1))                   # per action dimension
        out[name] = error.mean().item()
        out[f"{name}_move"] = error[:2].mean().item()                  # dims 0-1: the end effector's x, y motion
        out[f"{name}_gripper"] = error[-1].item()                      # dim 6: the gripper command
    return out


def load_head(path, device="cpu"):
    ckpt = load_checkpoint(path, kind="policy", device=device)
    head = PolicyHead(config_from_dict(PolicyConfig, ckpt["config"], path))
    head.load_state_dict(ckpt["model"])
    return head.to(device).eval()


def evaluate(cfg, planner):
    """--evaluate: the trained head (out_dir/ckpt.pt) and --compare heads on held-out episodes, then the
    planner's Min-MSE under the LIBERO protocol (Table E: 16-frame windows, 32 non-static tracks, 128 px)."""
    from planner import libero_datasets, validate_libero
    from vae import load_vae
    heads = {"policy": load_head(os.path.join(cfg.out_dir, "ckpt.pt"))}
    for path in filter(None, cfg.compare.split(",")):  # named by their folder, e.g. policy-shuffled
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        heads[name if name not in heads else path] = load_head(path)
    windows = eval_windows(cfg, planner.cfg)
    results = action_mse(heads, planner, windows, cfg)
    print(f"action MSE on {len(windows['actions'])} held-out windows ({cfg.action_chunk} actions x {cfg.action_dim} "
          f"dims, data units):")
    for name in [*heads, "mean_action"]:
        print(f"  {name:>16}: {results[name]:.5f} ({results['mean_action'] / results[name]:.2f}x better than the mean "
              f"action); dims 0-1 {results[name + '_move']:.5f}, gripper {results[name + '_gripper']:.5f}")
    vae = load_vae(planner.cfg.vae)
    pcfg = dataclasses.replace(planner.cfg, data=cfg.data)
    _, batch = libero_datasets(pcfg, vae)
    table = validate_libero(planner, vae, batch, k=cfg.eval_k, steps=cfg.plan_steps, seed=cfg.seed)
    print(f"planner, LIBERO protocol ({len(batch['gt'])} windows of {pcfg.window} frames, {pcfg.eval_tracks} "
          f"non-static tracks per view, K = {cfg.eval_k}, Min-MSE at 128 px):")
    for view in LIBERO_VIEWS:
        print(f"  {view:>12}: planner {table[f'{view}_min']:.2f}, frames dropped {table[f'{view}_no_frame']:.2f}, "
              f"static {table[f'{view}_static']:.2f}, VAE floor {table[f'{view}_floor']:.2f}; one plan's direction "
              f"cosine {table[f'{view}_direction']:.3f} (the VAE's reconstruction {table[f'{view}_floor_direction']:.3f})")
    out = dict(actions=results, action_windows=len(windows["actions"]), planner_libero=table,
               planner_windows=len(batch["gt"]), k=cfg.eval_k, planner=cfg.planner, policy=cfg.out_dir,
               compare=cfg.compare)
    if cfg.eval_json:
        os.makedirs(os.path.dirname(cfg.eval_json) or ".", exist_ok=True)
        with open(cfg.eval_json, "w") as f:
            json.dump(out, f, indent=2)
    return out


def dry_run(cfg):
    """Parameter counts of the head alone and with the planner it reads from (the checkpoint's config if it
    exists, else planner.py's LIBERO preset of the same scale), built on the meta device: nothing allocated."""
    if os.path.isfile(cfg.planner):
        pcfg = config_from_dict(PlannerConfig, load_checkpoint(cfg.planner, kind="planner")["config"], cfg.planner)
        source = cfg.planner
    else:
        preset = "libero" if cfg.preset == "paper" else "libero_tiny"
        pcfg = dataclasses.replace(PlannerConfig(), preset=preset, **PLANNER_PRESETS[preset])
        source = f"planner.py --preset {preset} ({cfg.planner} does not exist)"
    with torch.device("meta"):
        image_encoder = "conv" if pcfg.image_encoder == "conv" else "random"   # (nothing to download for a count)
        planner = MotionPlanner(dataclasses.replace(pcfg, image_encoder=image_encoder), pretrained=False)
        cfg = dataclasses.replace(cfg, latent_tokens=planner.n_views * planner.n_latents,
                                  latent_channels=pcfg.latent_channels)
        head = PolicyHead(cfg)
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    n_head = sum(p.numel() for p in head.parameters())
    n_planner = sum(p.numel() for p in planner.parameters())
    print(f"total parameters: {n_head} (the policy head: {cfg.layers} layers of width {cfg.dim})")
    print(f"total parameters: {n_head + n_planner} (head + planner: {source}, {n_planner / 1e6:.2f}M)")


def train_perception(cfg):
    """--perception (--preset perception_tiny): Perception on pooled training windows, the L2 loss on the actions
    (as the policy's); validation: its action MSE on the held-out windows against the mean action's."""
    pc = perception_planner_config(cfg, 0)
    base = training_windows(cfg, pc)
    pc = dataclasses.replace(pc, text_dim=int(base[0]["task_emb"].shape[-1]))   # (MiniLM 384, BERT 768)
    model = Perception(cfg, pc)
    mean, std = measure_action_stats(base, cfg.norm_samples)
    model.action_mean.copy_(mean)
    model.action_std.copy_(std)
    windows = eval_windows(cfg, pc)

    def perception_loss(net, batch):  # (net: model or its DDP wrapper; the L2 loss in the data's units)
        pred = net(batch["image"], batch["task_emb"], batch["timestep"]) * model.action_std + model.action_mean
        return F.mse_loss(pred, batch["actions"]), {}

    @torch.no_grad()
    def validate(raw_model, step):
        device = next(raw_model.parameters()).device
        pred = torch.cat([raw_model.eval().actions(*(windows[k][i:i + 64].to(device)
                                                     for k in ("image", "task_emb", "timestep")))
                          for i in range(0, len(windows["actions"]), 64)])
        out = score_actions({"perception": pred}, raw_model.action_mean, windows["actions"].to(device))
        return dict(out, ratio=out["mean_action"] / out["perception"])
    print(f"{cfg.data}: {len(base)} training windows (a pool of {cfg.latent_pool}), "
          f"{len(windows['actions'])} held-out windows; image encoder {pc.image_encoder} at {pc.image_size} px")
    train(cfg, model, PlannedWindows(base, cfg.latent_pool), perception_loss, "perception", validate)


def training_windows(cfg, pc):
    """The training split's windows of --data for a planner of config pc, with a message when --data is missing."""
    import data
    if not os.path.isdir(cfg.data):
        raise SystemExit(f"--data {cfg.data}: no such folder of LIBERO demos; make synthetic ones with: "
                         f"python data.py robot --out {cfg.data} --n 40 --seed 0")
    return data.LiberoDataset(cfg.data, "train", n_frames=pc.n_frames, window=pc.window, n_tracks=1,
                              image_size=pc.image_size, action_chunk=cfg.action_chunk, seed=cfg.seed)


def main(argv=None):
    cfg = parse_config(PolicyConfig, PRESETS, argv)
    torch.manual_seed(cfg.seed)
    if cfg.dry_run:
        return dry_run(cfg)
    if cfg.perception:
        return train_perception(cfg)
    planner = frozen_planner(cfg.planner)
    cfg = dataclasses.replace(cfg, latent_tokens=planner.n_views * planner.n_latents,
                              latent_channels=planner.cfg.latent_channels)
    if cfg.evaluate:
        return evaluate(cfg, planner)
    base = training_windows(cfg, planner.cfg)
    train_set = PlannedWindows(base, cfg.latent_pool, cfg.shuffle_latents, cfg.seed)
    head = PolicyHead(cfg)
    head.latent_shift.copy_(planner.latent_shift)
    head.latent_scale.copy_(planner.latent_scale)
    mean, std = measure_action_stats(base, cfg.norm_samples)
    head.action_mean.copy_(mean)
    head.action_std.copy_(std)
    windows = eval_windows(cfg, planner.cfg)

    def validate(raw_model, step):
        out = action_mse({"policy": raw_model}, planner, windows, cfg)
        return dict(out, ratio=out["mean_action"] / out["policy"])
    cache, key = {}, plan_file_key(planner, cfg)
    if cfg.plans and not cfg.latent_pool:
        raise ValueError(f"--plans {cfg.plans}: plan files hold pooled plans; set --latent_pool (the one they were made "
                         "with), or leave --plans out to plan every sample afresh")
    if cfg.plans:
        cache = load_plans(cfg.plans, key)
        print(f"{cfg.plans}: {len(cache)} plans of the {cfg.latent_pool} pooled windows")
    # the process group is ours, not train()'s, so that it outlives training: under torchrun every rank planned its
    # own share of the pool, and rank 0 writes them all
    rank, world, _, owned = setup_distributed(cfg.device)
    try:
        train(cfg, head, train_set, make_policy_loss(head, planner, cfg, cache), "policy", validate)
        if cfg.latent_pool:
            shares = [cache]
            if world > 1:
                shares = [None] * world
                dist.all_gather_object(shares, {k: z.cpu() for k, z in cache.items()})
            plans = {k: z for share in shares for k, z in share.items()}
            if rank == 0 and plans:
                save_plans(os.path.join(cfg.out_dir, "plans.pt"), plans, key)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
