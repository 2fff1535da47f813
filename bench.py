"""The speed benchmark (the paper's efficiency claim; Sec. C; Fig. K) of every operation of both stages, random weights:
median time, samples/s, frames/s, peak memory, FLOPs from shapes (2 in out per linear row, 4 L S d per attention; a
training step 3x what trains + 1x the frozen parts), FLOP/s and MFU against a plain matmul timed in the same run.

    python3 bench.py --preset tiny                # or --preset paper --device cuda: Table F sizes"""
import argparse, contextlib, json, resource, statistics, sys, time

import torch

from data import check_output, write_atomically
from eval import table
from planner import PRESETS as PLANNER_PRESETS, VAE_FIELDS, MotionPlanner, PlannerConfig, make_loss
from trainer import SampleRandom, autocast, set_threads, setup_distributed
from vae import PRESETS as VAE_PRESETS, Attention, TrackVAE, VAEConfig

def count_flops(models, fn):
    """Run fn() once: its forward FLOPs in the modules of `models`, from shapes, as [trainable, frozen] modules'."""
    counts, linear = [0, 0], (torch.nn.Linear, torch.nn.Conv2d)
    def hook(module, args, kwargs, out):
        if isinstance(module, linear):        # weight[0].numel(): MACs per output
            flops = 2 * out.numel() * module.weight[0].numel()
        elif isinstance(module, Attention):   # x [B, L, d] attends to ctx [B, S, .] (+ extra keys)
            x, ctx, extra = args[0], kwargs.get("ctx", args[2] if len(args) > 2 else None), kwargs.get("extra_kv")
            keys = (x if ctx is None else ctx).shape[1] + (0 if extra is None else extra[0].shape[2])
            flops = 4 * x.shape[0] * x.shape[1] * keys * module.out.out_features
        else:                                 # DINOv2's self-attention (transformers): hidden states [B, L, d]
            B, L, d = (args[0] if args else kwargs["hidden_states"]).shape
            flops = 4 * B * L * L * d
        weight = next(module.parameters(), None)
        counts[int(weight is None or not weight.requires_grad)] += flops
    with contextlib.ExitStack() as hooks:   # removed on the way out, whatever fn() does
        for m in (m for model in models for m in model.modules()):
            if isinstance(m, linear) or type(m).__name__.endswith("Attention"):
                hooks.enter_context(m.register_forward_hook(hook, with_kwargs=True))
        fn()
    return counts

def peak_mb(device):
    """CUDA: the peak allocated since the row began; CPU: the process's peak resident set so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)

def timed(fn, device, budget_s):
    """The median time of fn() over repeats filling budget_s (at least one); the caller warms up."""
    times = []
    while not times or sum(times) < budget_s and len(times) < 50:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize() if device.type == "cuda" else None
        times.append(time.perf_counter() - start)
    return statistics.median(times)

def benchmark(preset, device, batch=1, budget=2.0, steps=10, max_row_s=60.0, matmul_size=None, rows=None):
    """The rows of both stages (dicts: ms, samples/s, frames/s, point-frames/s, peak MB, GFLOP, MFU), the reference."""
    if preset not in VAE_PRESETS or preset not in PLANNER_PRESETS:
        raise ValueError(f"--preset {preset}: expected one of tiny, paper")
    vcfg = VAEConfig(**{**VAE_PRESETS[preset], "image_encoder": "random"})
    pcfg = PlannerConfig(**{**PLANNER_PRESETS[preset], "image_encoder": "random",
                            **{f: getattr(vcfg, f) for f in VAE_FIELDS}})
    n = matmul_size or (8192 if device.type == "cuda" else 2048)   # the MFU's reference: one plain square matmul
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    a @ a
    reference = 2 * n ** 3 / timed(lambda: a @ a, device, 1.0)
    del a
    B, T, n_points, g = batch, vcfg.n_frames, vcfg.n_enc + vcfg.n_dec, torch.Generator().manual_seed(0)
    image = torch.randn(B, 3, vcfg.image_size, vcfg.image_size, generator=g).to(device)
    tracks = (torch.rand(B, n_points, T, 2, generator=g) * 2 - 1).to(device)
    vae = TrackVAE(vcfg, pretrained=False).to(device).eval()
    planner = MotionPlanner(pcfg, pretrained=False).to(device).eval()
    z = torch.randn(B, vae.n_latents, vcfg.latent_channels, generator=g).to(device)
    pokes = torch.rand(B, pcfg.max_pokes, 5, generator=g).to(device) * 2 - 1
    pokes[..., 4] = pokes[..., 4].abs()
    out = {}
    def record(key, name, s, flops, frames, points, peak, note=""):   # -> out[key], the row's numbers per second
        out[key] = dict(key=key, name=name, ms=1000 * s, samples_per_s=B / s, frames_per_s=B * frames / s or None,
                        point_frames_per_s=B * frames * points / s or None, peak_mb=peak, gflop=flops / 1e9,
                        flops_per_s=flops / s, mfu=flops / s / reference, note=note)
    def row(key, name, fn, models, frames=0, points=0, train=False, scale=1.0, fixed=None, note=""):
        """train: fn -> models[0]'s loss, timed as an AdamW step; scale: fn did 1 / scale of the work beyond fixed()."""
        if rows and key not in rows:
            return
        if train:   # one step of its trainable weights, with trainer.train's optimiser
            models[0].train().image_encoder.requires_grad_(not models[0].cfg.freeze_image_encoder)
            opt, loss = torch.optim.AdamW([p for p in models[0].parameters() if p.requires_grad], lr=1e-5,
                                          fused=device.type in ("cpu", "cuda")), fn
            def fn():
                loss().backward()
                opt.step(), opt.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
        with autocast(device), torch.set_grad_enabled(train):
            trainable, frozen = count_flops(models, fn)
            flops, s = (3 if train else 1) * trainable + frozen, timed(fn, device, budget)
            if scale != 1:
                flops_0, s_0 = sum(count_flops(models, fixed)), timed(fixed, device, budget)
                flops, s = flops_0 + (flops - flops_0) * scale, s_0 + max(s - s_0, 0.0) * scale   # (noise: never < 0)
        record(key, name, s, flops, frames, points, peak_mb(device), note)
        print(f"  {name}: {1000 * s:.1f} ms {note}", file=sys.stderr)
    row("encode", f"VAE encode ({vcfg.n_enc} tracks x {T} frames)", lambda: vae.encode(image, tracks[:, :vcfg.n_enc]),
        [vae], T, vcfg.n_enc)
    row("decode", f"VAE decode ({n_points} points)", lambda: vae.decode(z, image, tracks[:, :, 0]), [vae], T, n_points)
    for side in (64, 224):   # Sec. C: every pixel; a row too slow for this device is timed on fewer points and scaled
        n = side * side
        q = n if "decode" not in out else max(64, min(n, int(max_row_s / (out["decode"]["ms"] / 1000 / n_points))))
        query = (torch.rand(B, q, 2, generator=g) * 2 - 1).to(device)
        row(f"dense{side}", f"VAE decode_dense {side}x{side} ({n} points)",
            lambda: vae.decode(z, image, query, chunk=2048), [vae], T, n, scale=n / q,
            fixed=lambda: vae.decoder_context(z, vae.image_tokens(image)),
            note="" if q == n else f"(timed on {q} points, scaled to {n})")
    row("train_vae", f"VAE training step (batch {B}, {vcfg.n_enc} + {vcfg.n_dec} tracks)",
        lambda: vae(image, tracks, rng=SampleRandom(range(B), device=device))["loss"], [vae], T, n_points, True)
    vae.eval().requires_grad_(False)
    cond, t = planner.conditions(image, pokes), torch.full((B,), 0.5, device=device)
    x = torch.randn(B, planner.n_latents, pcfg.latent_channels, generator=g).to(device)
    row("velocity", f"planner velocity (1 network evaluation, {pcfg.max_pokes} pokes)",
        lambda: planner.velocity(x, t, cond), [planner])
    row("sample", f"planner sample ({steps} steps, latents of {T} frames)",
        lambda: planner.sample(image, pokes, steps=steps, generator=torch.Generator()), [planner], T)
    loss = make_loss(planner, vae, pcfg)
    batch = dict(image=image, tracks=tracks, text=[""] * B, rng=SampleRandom(range(B), device=device))
    row("train_planner", f"planner training step (batch {B}, with the frozen VAE encode)",
        lambda: loss(planner, batch)[0], [planner, vae], T, train=True)
    if "sample" in out and "decode" in out:   # the paper's timesteps per second: a sample decoded at the clip's points
        a, b = out["sample"], out["decode"]
        record("generate", f"generate = sample + decode {n_points} points (sum of rows)", (a["ms"] + b["ms"]) / 1000,
               (a["gflop"] + b["gflop"]) * 1e9, T, n_points, max(a["peak_mb"], b["peak_mb"]))
    return list(out.values()), reference

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="tiny or paper: vae.py's and planner.py's sizes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--batch", type=int, default=1, help="samples per call")
    p.add_argument("--threads", type=int, help="CPU threads (default: trainer.set_threads' rule)")
    p.add_argument("--steps", type=int, default=10, help="Euler steps of the full sample (Fig. K: 10)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed repeats per row")
    p.add_argument("--max_row_s", type=float, default=60.0, help="dense rows longer than this: timed on fewer points")
    p.add_argument("--matmul_size", type=int, help="side of the reference matmul (2048 on CPU, 8192 on CUDA)")
    p.add_argument("--rows", help="only these: encode,decode,dense64,dense224,train_vae,velocity,sample,train_planner")
    p.add_argument("--json", help="write the numbers to this file")
    args = p.parse_args(argv)
    try:
        if min(args.batch, args.steps, args.threads or 1) < 1 or args.budget < 0:
            raise ValueError("--batch, --steps and --threads: expected positive integers, --budget >= 0")
        check_output(args.json, "--json") if args.json else None
        device = setup_distributed(args.device)[2]
        set_threads(args.threads)
        rows, reference = benchmark(args.preset, device, args.batch, args.budget, args.steps, args.max_row_s,
                                    args.matmul_size, args.rows and args.rows.split(","))
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"bench: preset {args.preset}, {device} ({torch.get_num_threads()} threads), batch {args.batch}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; reference matmul {reference / 1e9:.1f} GFLOP/s")
    units = dict(ms=1, samples_per_s=1, frames_per_s=1, point_frames_per_s=1, peak_mb=1, gflop=1, flops_per_s=1e9,
                 mfu=0.01)
    print(table(["operation", "ms", "samples/s", "frames/s", "point-frames/s", "peak MB", "GFLOP", "GFLOP/s", "MFU %"],
                [[r["name"] + " *" * bool(r["note"])] + [r[k] / unit if r[k] else None for k, unit in units.items()]
                 for r in rows]))
    notes = [f"{r['name']}: {r['note']}" for r in rows if r["note"]]
    print("* " + "; ".join(notes) if notes else "")
    if args.json:
        saved = dict(preset=args.preset, device=str(device), reference=reference, rows=rows)
        write_atomically(args.json, lambda f: f.write(json.dumps(saved, indent=2).encode()))
    return rows

if __name__ == "__main__":
    main()
