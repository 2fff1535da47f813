"""Stage 3 (supplement Sec. A): a shallow policy head whose action queries cross-attend ONLY to the latents the frozen
LIBERO planner generates (10 Euler steps), regressing 7-D action chunks by L2 (behaviour cloning, as ATM).

    python3 policy.py                    # tiny head on out/tiny/planner-libero's plans -> out/tiny/policy (--dry-run)
    python3 policy.py --shuffle_latents --out_dir out/tiny/policy-shuffled   # the control: other episodes' plans
    python3 policy.py --evaluate --compare out/tiny/policy-shuffled/ckpt.pt  # held-out action MSE + Table E"""
import dataclasses, json, math, os

import numpy as np
import torch
import torch.nn as nn

from data import cli, prepare_image, write_atomically
from planner import PRESETS as PLANNER_PRESETS, MotionPlanner, PlannerConfig, load_planner
from trainer import SampleRandom, TrainConfig, divides, parse_config, train
from vae import Block, check_pair, dry_run, grid_centres, load_model, load_vae

@dataclasses.dataclass
class PolicyConfig(TrainConfig):
    planner: str = "out/paper/planner-libero/ckpt.pt"   # the frozen LIBERO planner (planner.py --preset libero)
    planner_fingerprint: str = ""      # set at training: the planner's fingerprint (vae.fingerprint)
    data: str = "data/libero"          # LIBERO demos (.hdf5, ATM's layout)
    latent_tokens: int = 512           # the planner's latents (from its checkpoint): both views' grids
    latent_channels: int = 16
    grid_size: int = 16                # the planner's grid (its cells are the latents' 2-D RoPE positions)
    proprio_dim: int = 9               # the release: joint (7) + gripper (2) state token; 0: none (Sec. A; ours, tiny)
    dim: int = 768                     # Sec. A: "a shallow 6-layer transformer with dimensionality 768"
    layers: int = 6
    head_dim: int = 64
    ffn_mult: int = 3
    action_dim: int = 7                # LIBERO: end-effector delta (6) + gripper (1)
    action_chunk: int = 16             # ours: the future actions of one plan (the 16-frame window it covers)
    plan_steps: int = 10               # Sec. A: Euler steps of every plan, in training and rollouts
    action_discount: float = 0.99      # the release: the squared error of the action t steps ahead weighs this^t
    shuffle_latents: bool = False      # the control: each window learns from another episode's plan
    latent_pool: int = 0               # ours (tiny): > 0 cycles through this many training windows, their plans cached
    norm_samples: int = 512            # windows for the action mean / std (the head outputs standardised actions)
    batch_start: int = 256             # (not in the supplement; Table F's optimiser)
    batch_end: int = 256
    batch_ramp_steps: int = 1
    micro_batch: int = 64
    max_steps: int = 100_000
    out_dir: str = "out/paper/policy"
    val_clips: int = 0                 # held-out windows for the action MSE (0: all), one starting ...
    eval_stride: int = 4               # ... every eval_stride frames of the held-out demos
    evaluate: bool = False             # --evaluate: this head and --compare heads, then the planner's Table E
    compare: str = ""
    eval_k: int = 8
    eval_json: str = ""

    def check(self):
        return super().check() + divides(self, "head_dim", "dim")

PRESETS = {
    "paper": {},
    # CPU-scale (ours): a 2-layer head over the tiny LIBERO planner's 2 x 8x8 latents, 8192 windows' plans cached
    "tiny": dict(planner="out/tiny/planner-libero/ckpt.pt", data="data/robot", latent_tokens=128, latent_channels=8,
                 grid_size=8, proprio_dim=0, dim=128, layers=2, head_dim=32, latent_pool=8192, max_steps=3000, lr=1e-3,
                 warmup_steps=100, decay_frac=0.2, batch_start=32, batch_end=32, micro_batch=32, log_every=100,
                 val_every=3000, ckpt_every=500, num_workers=1, eval_stride=8, out_dir="out/tiny/policy",
                 eval_json="out/tiny/eval/policy.json"),
}

class PolicyHead(nn.Module):
    """Sec. A's inverse dynamics (the release's head): learned action queries [action_chunk, dim] self- and cross-attend
    to the plan's latents [B, N, C] (planner-normalised, a linear map + the view's embedding, 2-D RoPE at their grid
    cell) and the robot state (proprio [B, proprio_dim], a token at (0, 0)) -> standardised actions [B, chunk, 7]."""
    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg, d, g = cfg, cfg.dim, cfg.grid_size
        self.queries = nn.Parameter(torch.randn(cfg.action_chunk, d) * 0.02)
        self.query_proj, self.latent_in = nn.Linear(d, d, bias=False), nn.Linear(cfg.latent_channels, d)
        self.modality_embed = nn.Parameter(torch.randn(6, d) * 0.02)   # the release's: frames, plans 2-3, task, state 5
        self.proprio_in = nn.Linear(cfg.proprio_dim, d) if cfg.proprio_dim else None
        rope = ((1, 40 * math.pi), (1, 40 * math.pi))
        self.blocks = nn.ModuleList(Block(d, cfg.head_dim, d, cfg.ffn_mult, rope=rope) for _ in range(cfg.layers))
        self.action_out = nn.Linear(d, cfg.action_dim, bias=False)
        self.register_buffer("latent_pos", grid_centres(g, g).repeat(cfg.latent_tokens // g ** 2, 1), persistent=False)
        for name, value in (("latent_shift", torch.zeros(())), ("latent_scale", torch.ones(())),   # the planner's and
                            ("action_mean", torch.zeros(cfg.action_dim)), ("action_std", torch.ones(cfg.action_dim))):
            self.register_buffer(name, value)                                                       # the actions'

    def forward(self, z, proprio=None):
        assert z.shape[1:] == (self.cfg.latent_tokens, self.cfg.latent_channels), f"latents {list(z.shape)}"
        B, view_embed = len(z), self.modality_embed[2:4].repeat_interleave(self.cfg.latent_tokens // 2, 0)
        ctx = self.latent_in((z - self.latent_shift) * self.latent_scale) + view_embed
        pos = self.latent_pos.expand(B, -1, -1)
        if self.proprio_in is not None:
            assert proprio is not None and proprio.shape == (B, self.cfg.proprio_dim), "proprio [B, proprio_dim]"
            ctx = torch.cat([ctx, (self.proprio_in(proprio.to(ctx.dtype)) + self.modality_embed[5])[:, None]], 1)
            pos = torch.cat([pos, pos.new_zeros(B, 1, 2)], 1)
        x, qpos = self.query_proj(self.queries).expand(B, -1, -1), pos.new_zeros(B, self.cfg.action_chunk, 2)
        for block in self.blocks:
            x = block(x, qpos, ctx, pos)
        return self.action_out(x)

    def actions(self, z, proprio=None):
        return self.forward(z, proprio) * self.action_std + self.action_mean

class Policy:
    """Planner + head for rollouts: act(frames uint8 [V, H, W, 3] upright, libero.VIEWS order; task_emb [D]; t) -> step
    t's action; averaging "uniform", "exponential" (exp(-decay age)): ACT's temporal ensembling of chunks covering t."""
    def __init__(self, head, planner, steps=10, averaging="none", decay=0.1, seed=0):
        if averaging not in ("none", "uniform", "exponential"):
            raise ValueError(f"averaging: expected none, uniform or exponential, got {averaging!r}")
        self.head, self.planner, self.steps, self.averaging = head.eval(), planner.eval(), steps, averaging
        self.decay, self.chunks = 0.0 if averaging == "uniform" else decay, {}
        self.generator = torch.Generator().manual_seed(seed)

    def reset(self):   # at the start of every episode
        self.chunks = {}

    @torch.no_grad()
    def chunk(self, frames, task_emb, t, proprio=None):
        """frames uint8 [(B,) V, H, W, 3], task_emb [(B,) D], t int or [B], proprio [(B,) 9] -> [B, chunk, 7]."""
        frames = np.asarray(frames).reshape(-1, *np.shape(frames)[-4:])
        device, B, size = next(self.head.parameters()).device, len(frames), self.planner.cfg.image_size
        image = torch.stack([torch.stack([prepare_image(f, size)[1] for f in views]) for views in frames]).to(device)
        emb = torch.as_tensor(task_emb, dtype=torch.float32).reshape(B, -1).to(device)
        z = self.planner.sample(image, task_emb=emb, generator=self.generator, steps=self.steps,
                                timestep=torch.as_tensor(t).reshape(-1).expand(B).to(device))
        state = None if proprio is None else torch.as_tensor(proprio).float().reshape(B, -1).to(device)
        return self.head.actions(z, state)

    def act(self, frames, task_emb, t, proprio=None):
        actions, step = self.chunk(frames, task_emb, t, proprio), int(torch.as_tensor(t).flatten()[0])   # (one step)
        cover = 1 if self.averaging == "none" else actions.shape[1]   # the chunks that count at this step
        self.chunks = {s: a for s, a in {**self.chunks, step: actions}.items() if 0 <= step - s < cover}
        weights = {s: math.exp(-self.decay * (step - s)) for s in self.chunks}
        action = sum(w * self.chunks[s][:, step - s] for s, w in weights.items()) / sum(weights.values())
        return action[0] if np.ndim(frames) == 4 else action

def libero_planner(path, device="cpu"):
    """The LIBERO planner a head reads (its EMA weights), frozen; the commands that make it when it is missing."""
    planner = load_planner(path, device, make="python3 libero.py robot --out data/robot --n 640 && python3 vae.py "
                           "--preset tiny_robot && python3 planner.py --preset libero_tiny")
    if planner.cfg.task != "libero":
        raise ValueError(f"--planner {path}: an open-domain planner; the policy reads a LIBERO one "
                         "(--preset libero_tiny)")
    return planner.requires_grad_(False)

def load_policy(path, device="cpu", averaging="none", decay=0.1, seed=0, planner=None):
    """A Policy from a head checkpoint or release file and the planner it names (a ValueError unless trained on it)."""
    import release
    if release.is_release(path):   # (the file holds the planner too)
        own = release.load_planner(path, device).requires_grad_(False)
        head, planner = release.load_head(path, device, planner=own), planner or own
    else:
        head = load_model(path, "policy", PolicyConfig, PolicyHead, device)[0]
        planner = planner or libero_planner(head.cfg.planner, device)
    check_pair(planner, head.cfg.planner_fingerprint, f"planner the head {path} was trained on", head.cfg.planner)
    return Policy(head, planner, head.cfg.plan_steps, averaging, decay, seed)

# ----------------------------------- Training: windows with the planner inputs of the window whose plan they learn from
class PlannedWindows(torch.utils.data.Dataset):
    """Item i: the actions of training window w(i) (= i, or i mod pool) and the planner inputs of window p(i): p = w, or
    with shuffle another episode's window drawn afresh per i (a fixed pairing could be learnt); plan_index = p."""
    def __init__(self, base, pool=0, shuffle=False, seed=0):
        self.base, self.pool, self.shuffle, self.seed, self.items = base, pool, shuffle, seed, {}

    def __len__(self):
        return self.pool or len(self.base)

    def window(self, w):   # (with a pool, each pooled window is read once per loader worker)
        if self.pool and w not in self.items:
            self.items[w] = self.base[w]
        return self.items[w] if self.pool else self.base[w]

    def __getitem__(self, index):
        w = int(index) % self.pool if self.pool else int(index)
        own = plan = self.window(p := w)
        rng = np.random.default_rng((self.seed, int(index), 5))
        while self.shuffle and (p == w or plan["demo"] == own["demo"]):
            plan = self.window(p := int(rng.integers(len(self))))
        return dict(actions=own["actions"], proprio=own["proprio"], image=plan["image"], task_emb=plan["task_emb"],
                    timestep=plan["timestep"], plan_index=p, index=int(index))

@torch.no_grad()
def plan(planner, batch, cfg, cache=None, tag=0):
    """A batch's plans, their noise keyed by batch["plan_index"] (so cached plans match); tag: another noise stream."""
    keys, cache = [int(i) for i in batch["plan_index"]], {} if cache is None else cache
    missing, device = [b for b, k in enumerate(keys) if k not in cache], batch["image"].device
    if missing:
        noise = SampleRandom([keys[b] for b in missing], cfg.seed + tag, device).randn(
            planner.n_views * planner.n_latents, planner.cfg.latent_channels)
        z = planner.to(device).sample(batch["image"][missing], task_emb=batch["task_emb"][missing],
                                      timestep=batch["timestep"][missing], steps=cfg.plan_steps, noise=noise).float()
        cache.update({keys[b]: row for b, row in zip(missing, z)})
    return torch.stack([cache[k] for k in keys])

def windows(cfg, pc, split):
    """LiberoDataset windows of --data for planner config pc: train, or held out (a start every eval_stride frames)."""
    from libero import LiberoDataset
    return LiberoDataset(cfg.data, split, n_frames=pc.n_frames, n_tracks=1, image_size=pc.image_size, seed=cfg.seed,
                         window=pc.window if split == "train" else cfg.eval_stride, action_chunk=cfg.action_chunk)

@torch.no_grad()
def action_mse(heads, planner, cfg, batch_size=32):
    """Each head's and the mean action's MSE (data units: overall, dims 0-1, gripper) on the same held-out plans."""
    val, device = windows(cfg, planner.cfg, "val"), next(planner.parameters()).device
    items = [val[i] for i in range(min(cfg.val_clips or len(val), len(val)))]
    batches = [torch.utils.data.default_collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    z = torch.cat([plan(planner, {k: b[k].to(device) for k in ("image", "task_emb", "timestep")}
                        | {"plan_index": b["index"]}, cfg, tag=1) for b in batches])
    actions, proprio = (torch.cat([b[k] for b in batches]) for k in ("actions", "proprio"))
    predictions = {name: head.eval().to(device).actions(z, proprio.to(device)).cpu() for name, head in heads.items()}
    predictions["mean_action"] = next(iter(heads.values())).action_mean.cpu().expand_as(actions)
    out = {}
    for name, pred in predictions.items():
        err = (pred - actions).pow(2).mean((0, 1))    # per action dimension
        out.update({name: err.mean().item(), f"{name}_move": err[:2].mean().item(), f"{name}_gripper": err[-1].item()})
    return dict(out, windows=len(items))

def evaluate(cfg, planner):
    """--evaluate: this head and the --compare heads (by folder) on held-out windows, then the planner's Table E."""
    import eval as evaluation
    heads = {"policy": load_policy(os.path.join(cfg.out_dir, "ckpt.pt"), planner=planner).head}
    for path in filter(None, cfg.compare.split(",")):
        heads[os.path.basename(os.path.dirname(os.path.abspath(path)))] = load_policy(path, planner=planner).head
    results = action_mse(heads, planner, cfg)
    print(f"action MSE on {results['windows']} held-out windows ({cfg.action_chunk} actions x 7 dims, data units):")
    for name in [*heads, "mean_action"]:
        print(f"  {name:>16}: {results[name]:.5f} ({results['mean_action'] / results[name]:.2f}x better than the mean "
              f"action); dims 0-1 {results[name + '_move']:.5f}, gripper {results[name + '_gripper']:.5f}")
    table = evaluation.libero_report(planner, load_vae(planner.cfg.vae), cfg.data, planner.cfg.eval_tracks, 16,
                                     cfg.eval_k, cfg.plan_steps, cfg.seed)
    out = dict(actions=results, planner_libero=table, k=cfg.eval_k, planner=cfg.planner, policy=cfg.out_dir)
    if cfg.eval_json:
        write_atomically(cfg.eval_json, lambda f: f.write(json.dumps(out, indent=2).encode()))
    return out

def main(argv=None):
    cfg = parse_config(PolicyConfig, PRESETS, argv)
    torch.manual_seed(cfg.seed)
    if cfg.dry_run:   # the head alone, and with the LIBERO planner of the same scale (built on the meta device)
        name = "libero" if cfg.preset == "paper" else "libero_tiny"
        pc = PlannerConfig(**{**PLANNER_PRESETS[name], "image_encoder": "random"})
        with torch.device("meta"):
            planner = MotionPlanner(pc, pretrained=False)
            head = PolicyHead(dataclasses.replace(cfg, latent_tokens=planner.n_views * planner.n_latents,
                                                  latent_channels=pc.latent_channels, grid_size=pc.grid_size))
        n_head = sum(dry_run(head.cfg, head, {}, "policy head").values())   # (the config, the head's parameters)
        n_plan = sum(p.numel() for p in planner.parameters())
        return print(f"total parameters: {n_head + n_plan} (with planner.py --preset {name}: {n_plan / 1e6:.2f}M)")
    planner = libero_planner(cfg.planner)
    cfg = dataclasses.replace(cfg, latent_tokens=planner.n_views * planner.n_latents, grid_size=planner.cfg.grid_size,
                              latent_channels=planner.cfg.latent_channels, planner_fingerprint=planner.fingerprint)
    if cfg.evaluate:
        return evaluate(cfg, planner)
    base, head = windows(cfg, planner.cfg, "train"), PolicyHead(cfg)
    if len(base[0]["proprio"]) != cfg.proprio_dim:
        raise ValueError(f"--data {cfg.data}: the demos hold a robot state of {len(base[0]['proprio'])} values (root/"
                         f"extra_states/joint_states + gripper_states), --proprio_dim {cfg.proprio_dim} (0: none)")
    actions = torch.cat([base[i]["actions"] for i in range(min(cfg.norm_samples, len(base)))])
    head.load_state_dict(dict(latent_shift=planner.latent_shift, latent_scale=planner.latent_scale,   # (buffers)
                              action_mean=actions.mean(0), action_std=actions.std(0).clamp(min=1e-6)), strict=False)
    cache = {} if cfg.latent_pool else None
    def loss(net, batch):   # the L2 loss on the actions themselves (ATM's BC loss), later ones discounted (the release)
        pred = net(plan(planner, batch, cfg, cache), batch["proprio"])
        weight = cfg.action_discount ** torch.arange(cfg.action_chunk, device=pred.device)[:, None]
        return ((pred * head.action_std + head.action_mean - batch["actions"]).pow(2) * weight).mean(), {}
    def validate(raw, step):
        out = action_mse({"policy": raw}, planner, cfg)
        return dict(policy=out["policy"], mean_action=out["mean_action"], ratio=out["mean_action"] / out["policy"])
    train(cfg, head, PlannedWindows(base, cfg.latent_pool, cfg.shuffle_latents, cfg.seed), loss, "policy", validate)

if __name__ == "__main__":
    cli(main)
