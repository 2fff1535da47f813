"""What every stage trains with (Table F): the shared config fields and their command line, distributed setup,
schedules, per-sample random numbers, atomic checkpoints (the last two kept) and train(), whose guarantees
tests/test_train.py checks: 2 processes = 1, bit-identical resume (CPU), a non-finite step skipped on every rank."""
import argparse, dataclasses, json, math, os, re, sys, time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data import check_output, write_atomically

@dataclasses.dataclass
class TrainConfig:
    """The run and optimiser fields of every stage; the defaults are the VAE's (Table F)."""
    preset: str = "paper"
    data: str = "synthetic"            # synthetic, a folder of .npz clips, .tar shards, or LIBERO .hdf5 demos
    max_steps: int = 800_000
    lr: float = 1e-4                   # Table F: AdamW, betas (0.9, 0.95), 300 warm-up steps, constant, WSD tail
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    warmup_steps: int = 300
    decay_frac: float = 0.1            # WSD: linear decay to zero over this last fraction of the steps
    batch_start: int = 64              # global batch ramp (Table F: 64 -> 256)
    batch_end: int = 256
    batch_ramp_steps: int = 100_000
    micro_batch: int = 16              # per process; accumulation = global batch / (micro_batch x processes)
    grad_clip: float = 1.0
    seed: int = 0
    out_dir: str = "out/paper/vae"
    resume: bool = False
    log_every: int = 50
    val_every: int = 5000
    val_clips: int = 32
    ckpt_every: int = 5000
    num_workers: int = 4               # data workers per process, at most the cores it has less one (set_threads)
    threads: int = 0                   # intra-op threads per process (0: set_threads' rule)
    device: str = "auto"               # auto, cpu, cuda, cuda:N
    compile: bool = False
    dry_run: bool = False

    ZERO_OK = ("seed", "warmup_steps", "num_workers", "threads", "n_dec", "latent_pool", "val_clips", "text_layers",
               "image_registers", "proprio_dim", "synth_pool")
    ANY_SIGN = ("unfreeze_image_encoder_at", "image_t")   # may be negative (-1: never unfreeze; LIBERO image time)

    def check(self):   # values that cannot work, as '--flag value: expected ...' lines (parse_config reports them)
        out = [] if re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) else [
            f"--device {self.device}: expected auto, cpu, cuda or cuda:N"]
        for name, v in dataclasses.asdict(self).items():
            least = 0 if name in self.ZERO_OK or type(v) is float else 1
            if type(v) in (int, float) and not (abs(v) < math.inf and (least <= v or name in self.ANY_SIGN)):
                out.append(f"--{name} {v}: expected a finite value >= {least}")
        return out

def divides(cfg, part, whole):   # a check() line when field `part` does not divide field `whole`
    a, b = getattr(cfg, part), getattr(cfg, whole)
    return [] if a > 0 and b % a == 0 else [f"--{whole} {b}: expected a multiple of --{part} {a}"]

def one_of(cfg, field, choices):   # a check() line when the field's value is none of the choices
    return [] if (v := getattr(cfg, field)) in choices else [f"--{field} {v}: expected one of {', '.join(choices)}"]

def parse_bool(text):
    if str(text).lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    return str(text).lower() in ("1", "true", "yes", "on")

def parse_config(cls, presets, argv=None):
    """--preset NAME picks the defaults, then every field is a type-checked flag (--key=value, --key value)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="tiny")
    preset = pre.parse_known_args(argv)[0].preset
    if preset not in presets:
        raise SystemExit(f"--preset: unknown preset {preset!r}; choose from {sorted(presets)}")
    defaults = dataclasses.replace(cls(), preset=preset, **presets[preset])
    parser = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in dataclasses.asdict(defaults).items():
        kind = dict(type=parse_bool, nargs="?", const=True, metavar="BOOL") if isinstance(value, bool) else \
            dict(type=type(value))
        parser.add_argument(*sorted({f"--{name}", f"--{name.replace('_', '-')}"}), dest=name, default=value,
                            help=f"default {value}", **kind)
    cfg = cls(**vars(parser.parse_args(argv)))
    if errors := cfg.check():
        parser.error("; ".join(errors))
    return cfg

def setup_distributed(device="auto"):   # -> rank, world, device, owned (this call started the process group)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    rank, local, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    owned = "RANK" in os.environ and not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    return rank, world, torch.device(device), owned

CORES = torch.get_num_threads()   # PyTorch's default: the physical cores (or OMP_NUM_THREADS)
def set_threads(threads=0, workers=0):
    """-> (threads, workers), set: --threads, else OMP_NUM_THREADS, else this process's cores less one per worker."""
    cores = CORES // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    workers = max(0, min(workers, cores - 1))
    threads = threads or int(os.environ.get("OMP_NUM_THREADS") or max(1, cores - workers))
    torch.set_num_threads(threads)
    return threads, workers

def autocast(device):   # bf16 on CUDA, fp32 on CPU (where bf16 matmul is slow)
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")

# --------------------------------------------------------------------- Schedules (Table F) and the order of the samples
def lr_at(step, cfg):
    """Table F: linear warm-up, constant, then the warmup-stable-decay tail, linear to 0 over the last decay_frac."""
    decay_start = int(cfg.max_steps * (1 - cfg.decay_frac))
    tail = 1.0 if step < decay_start else (cfg.max_steps - step) / max(1, cfg.max_steps - decay_start)
    return cfg.lr * min((step + 1) / max(1, cfg.warmup_steps), 1.0, tail)

def global_batch_at(step, cfg):
    """batch_start -> batch_end linearly over batch_ramp_steps, in whole multiples of batch_start."""
    frac = min(1.0, step / max(1, cfg.batch_ramp_steps))
    return cfg.batch_start * int((cfg.batch_start + frac * (cfg.batch_end - cfg.batch_start)) // cfg.batch_start)

def micro_batch(cfg, world):   # --micro_batch, at most a share of the first global batch
    return min(cfg.micro_batch, max(1, cfg.batch_start // world))

def accumulation_steps(step, cfg, world):
    """Micro-steps per optimiser step: global batch / (micro_batch x world), which must divide evenly."""
    micro = micro_batch(cfg, world)
    if cfg.batch_start % (micro * world) or cfg.batch_end % cfg.batch_start:
        raise ValueError(f"--batch_start {cfg.batch_start} must be a multiple of --micro_batch x processes = "
                         f"{micro} x {world}, and --batch_end {cfg.batch_end} a multiple of batch_start")
    return global_batch_at(step, cfg) // (micro * world)

class SampleRandom:
    """Random numbers keyed by (seed, global sample index), the same on any rank, micro-batch or resumed run:
    rand / randn(*shape) -> [B, *shape], row b from sample b's own generator (numpy's PCG64 seeded by the pair)."""
    def __init__(self, index, seed=0, device="cpu"):
        self.device, self.rngs = device, [np.random.default_rng((seed, int(i))) for i in index]

    def rand(self, *shape):
        return torch.from_numpy(np.stack([g.random(shape, np.float32) for g in self.rngs])).to(self.device)

    def randn(self, *shape):
        return torch.from_numpy(np.stack([g.standard_normal(shape, np.float32) for g in self.rngs])).to(self.device)

def step_batches(cfg, rank, world, step=0, sample=0):
    """This rank's micro-batches of global sample indices: micro-step a of rank r takes slice a * world + r."""
    for step in range(step, cfg.max_steps):
        n_acc, micro = accumulation_steps(step, cfg, world), micro_batch(cfg, world)
        for a in range(n_acc):
            first = sample + (a * world + rank) * micro
            yield list(range(first, first + micro))
        sample += n_acc * micro * world

# ------------------------------------------------------------------------------- Checkpoints: atomic, the last two kept
def save_checkpoint(path, state):   # tensors and plain values only: every loader reads with weights_only=True
    write_atomically(path, lambda f: torch.save(state, f), keep_previous=True)

def load_checkpoint(path, kind, device="cpu", make=None):
    """torch.load(weights_only=True); a ValueError if missing (naming `make`), corrupt, or another stage's."""
    if not os.path.isfile(path):
        make = make or f"python3 {kind}.py --out_dir {os.path.dirname(path) or '.'}"
        raise ValueError(f"{path}: no such checkpoint; make it with: {make}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    got = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
    if got != kind:
        raise ValueError(f"{path}: expected a {kind!r} checkpoint, got {got!r}")
    if not all(isinstance(ckpt.get(key), dict) for key in ("model", "config")):
        raise ValueError(f"{path}: a {kind!r} checkpoint without its weights or config")
    return ckpt

def latest_checkpoint(out_dir, kind, device="cpu"):   # the newest good one, ckpt.pt else ckpt.pt.prev; None if neither
    for path in filter(os.path.exists, (os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "ckpt.pt.prev"))):
        try:
            return load_checkpoint(path, kind, device)
        except ValueError as e:
            print(f"warning: skipping {e}")

# ------------------------------------------------------------------------------------ The training loop (nanoGPT-style)
def train(cfg, model, dataset, loss_fn, kind, validate=None, ema=None, freeze=None, max_nonfinite=10):
    """loss_fn(net, batch) -> (loss, {name: tensor}), every random number drawn from batch["rng"] (a SampleRandom).
    validate(raw_model, step) -> {name: float} on rank 0; ema: updated every step and saved; freeze: (module, step),
    frozen until that step (-1: always; Table F's image encoder)."""
    try:
        dataset[0]     # unusable data stops the run here, before anything is written
    except ValueError as e:
        raise ValueError(f"--data {cfg.data}: {e}") from None
    check_output(cfg.out_dir, "--out_dir", folder=True)
    rank, world, device, owned = setup_distributed(cfg.device)
    previous = torch.get_num_threads()   # (restored at the end: a caller's thread count is its own)
    threads, workers = set_threads(cfg.threads, cfg.num_workers) if device.type == "cpu" else (0, cfg.num_workers)
    def log(line):   # stdout and out_dir/log.txt, rank 0 only
        if rank == 0:
            tqdm.write(line)
            with open(os.path.join(cfg.out_dir, "log.txt"), "a") as f:
                print(line, file=f)
    try:
        accumulation_steps(0, cfg, world)   # a batch that does not split into micro-batches: refused before writing
        os.makedirs(cfg.out_dir, exist_ok=True)
        if rank == 0:
            json.dump(dataclasses.asdict(cfg), open(os.path.join(cfg.out_dir, "config.json"), "w"), indent=2)
        log(f"{kind}: {world} process(es) on {device}, {threads or 'all'} thread(s), {workers} data worker(s) each")
        params = list(model.to(device).parameters())   # decay: the matrices alone (no embeddings, RoPE)
        decay = {id(p) for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() == 2}
        opt = torch.optim.AdamW([{"params": [p for p in params if id(p) in decay], "weight_decay": cfg.weight_decay},
                                 {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}],
                                lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type in ("cpu", "cuda"))
        ckpt = latest_checkpoint(cfg.out_dir, kind, device) if cfg.resume else None
        step, sample = (ckpt["step"], ckpt["sample"]) if ckpt else (0, 0)
        ema.model.to(device) if ema else None
        if ckpt:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            log(f"resumed from {cfg.out_dir} at step {step}")
            ema.load_state_dict(ckpt["ema"]) if ema else None
        def wrap():    # (DDP fixes which parameters train when it is built: rebuilt when the freeze ends)
            frozen = freeze is not None and not 0 <= freeze[1] <= step
            freeze[0].requires_grad_(not frozen) if freeze else None
            net = torch.compile(model) if cfg.compile else model
            ids = [device.index] if device.type == "cuda" else None
            return (torch.nn.parallel.DistributedDataParallel(net, device_ids=ids) if world > 1 else net), frozen
        net, frozen = wrap()
        batches = iter(torch.utils.data.DataLoader(dataset, batch_sampler=step_batches(cfg, rank, world, step, sample),
                                                   num_workers=workers))
        torch.manual_seed(cfg.seed * 1000 + rank + step)   # (training draws from batch["rng"], not from here)
        bar = tqdm(total=cfg.max_steps, initial=step, disable=rank != 0, desc=kind, dynamic_ncols=True)
        sums, since, nonfinite, t_log, t_start = {}, 0, [], time.time(), time.time()
        while step < cfg.max_steps:
            if frozen and 0 <= freeze[1] <= step:
                net, frozen = wrap()
                log(f"step {step}: the image encoder is unfrozen")
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            n_acc, step_sums = accumulation_steps(step, cfg, world), {}
            model.train()
            for a in range(n_acc):
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(batches).items()}
                batch["rng"] = SampleRandom(batch["index"].tolist(), cfg.seed, device)
                if world > 1:
                    net.require_backward_grad_sync = a == n_acc - 1
                with autocast(device):
                    loss, metrics = loss_fn(net, batch)
                (loss / n_acc).backward()
                for k, v in {"loss": loss, **metrics}.items():
                    step_sums[k] = step_sums.get(k, 0.0) + v.detach().float() / n_acc
            # skip on every rank together (or DDP hangs); a non-finite gradient makes the norm non-finite
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            finite = (torch.isfinite(step_sums["loss"]) & torch.isfinite(gnorm)).float()
            dist.all_reduce(finite, op=dist.ReduceOp.MIN) if world > 1 else None
            nonfinite = [] if finite.item() == 1 else nonfinite + [step]
            if nonfinite:
                log(f"warning: step {step}: non-finite loss or gradient on some rank, skipped on all ({len(nonfinite)})")
                if len(nonfinite) >= max_nonfinite:
                    raise RuntimeError(f"{kind}: non-finite at {len(nonfinite)} steps in a row (steps {nonfinite[0]}.."
                                       f"{nonfinite[-1]}); stopping at step {step}; lower --lr or check the data")
            else:
                opt.step()
                ema.update(model) if ema else None
                sums = {k: sums.get(k, 0.0) + v for k, v in dict(step_sums, gnorm=gnorm.detach().float()).items()}
                since += 1
            opt.zero_grad(set_to_none=True)
            sample, step = sample + n_acc * micro_batch(cfg, world) * world, step + 1
            bar.update(1)
            if (step % cfg.log_every == 0 or step == cfg.max_steps) and since:
                values = torch.stack([sums[k] for k in sorted(sums)]).to(device) / (since * world)
                dist.all_reduce(values) if world > 1 else None
                ms = (time.time() - t_log) * 1000 / since
                stats = " ".join(f"{k} {v:.4g}" for k, v in zip(sorted(sums), values.tolist()))
                log(f"step {step}/{cfg.max_steps} {stats} lr {lr_at(step - 1, cfg):.3g} {ms:.0f} ms/step "
                    f"{global_batch_at(step - 1, cfg) * 1000 / ms:.1f} samples/s "
                    f"ETA {ms * (cfg.max_steps - step) / 6e4:.1f} min")
                sums, since, t_log = {}, 0, time.time()
            if validate and (step % cfg.val_every == 0 or step == cfg.max_steps):
                if rank == 0:
                    with torch.no_grad(), autocast(device):
                        results = validate(model.eval(), step)
                    log(f"val step {step} ({(time.time() - t_start) / 60:.1f} min): "
                        + " ".join(f"{k} {v:.4g}" for k, v in results.items()))
                dist.barrier() if world > 1 else None
            if rank == 0 and (step % cfg.ckpt_every == 0 or step == cfg.max_steps):
                save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), dict(
                    kind=kind, model=model.state_dict(), optimizer=opt.state_dict(), step=step, sample=sample,
                    config=dataclasses.asdict(cfg), **({"ema": ema.state_dict()} if ema else {})))
        bar.close()
    finally:
        torch.set_num_threads(previous)
        if owned and dist.is_initialized():
            dist.destroy_process_group()
