"""Sampling (supplement Sec. C): K motions of a start frame from pokes or words, drawn; dense motion. A poke
x0,y0,x1,y1[,t] in input pixels asks (x0, y0) to be at (x1, y1) at time t in [0, 1] (default 1, the last frame).

    python3 sample.py                                   # tiny checkpoints, a synthetic clip poked with 2 of its tracks
    python3 sample.py --image photo.jpg --poke 120,200,180,150 --text "the red circle moves to the left" --dense
    python3 sample.py --from-tracks clip.npz --n-pokes 8  # densification (Fig. L): tracks -> pokes -> every pixel"""
import argparse, json, math, os, time, warnings

import imageio.v3 as iio
import numpy as np
import torch

from bench import peak_mb
from data import (check_output, cli, draw_tracks, load_clip, make_synthetic_clip, pixels_to_unit, prepare_image,
                  resize, sample_pokes, save_image, select_eval_tracks, time_colors, unit_to_pixels, write_atomically,
                  write_video)
from planner import PokeGuide, load_pair
from trainer import autocast, set_threads, setup_distributed
from vae import grid_centres

def parse_numbers(text, flag, counts, form):
    """'a,b,c' -> finite floats, as many as one of counts; else a ValueError naming the flag."""
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) not in counts or not all(map(math.isfinite, values)):
        raise ValueError(f"{flag} {text!r}: expected {form}")
    return values

def parse_poke(text):
    """'x0,y0,x1,y1[,t]' pixels -> [x0, y0, x1, y1, t], t in [0, 1] (default 1, the last frame)."""
    values = parse_numbers(text, "--poke", (4, 5), "x0,y0,x1,y1 or x0,y0,x1,y1,t (pixels; t in [0, 1])") + [1.0]
    if not 0 <= values[4] <= 1:
        raise ValueError(f"--poke {text!r}: t = {values[4]:g} is outside [0, 1] (0 = the start frame, 1 = the last)")
    return values[:5]

def check_inside(points, width, height, what):   # (x, y) pixels [M, 2] within 0..width-1, 0..height-1
    points = np.asarray(points, np.float64).reshape(-1, 2)
    outside = ~((points >= 0) & (points <= [width - 1, height - 1])).all(-1)
    if outside.any():
        x, y = points[np.argmax(outside)]
        raise ValueError(f"{what}: ({x:g}, {y:g}) is outside the {width}x{height} image (x in [0, {width - 1}], "
                         f"y in [0, {height - 1}])")

def pokes_to_unit(pokes_px, width, height):   # [P, 5] (x0, y0, x1, y1 pixels, t) -> unit coordinates, t as it is
    return np.hstack([pixels_to_unit(pokes_px[:, :4].reshape(-1, 2), width, height).reshape(-1, 4), pokes_px[:, 4:]])

def grid_points(n, width, height):   # the centres of an n x n grid of cells, (x, y) pixels [n * n, 2], row by row
    return unit_to_pixels(grid_centres(n, n).flip(-1).numpy(), width, height).astype(np.float32)

def read_image(path):
    """An image file -> uint8 [H, W, 3] (grey, 16-bit, alpha and animations converted)."""
    try:
        with warnings.catch_warnings(action="ignore"):
            image = np.asarray(iio.imread(path))
    except Exception as e:   # imageio raises many kinds of errors for a file it cannot decode
        raise ValueError(f"--image {path}: cannot be read as an image ({type(e).__name__}: {str(e)[:200]})") from None
    image = image[0] if image.ndim == 4 else image[..., None] if image.ndim == 2 else image
    image = (image // 257).astype(np.uint8) if image.dtype == np.uint16 else image
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 2:
        raise ValueError(f"--image {path}: decodes to {image.dtype} {image.shape}, expected an RGB or grey picture")
    return np.ascontiguousarray(np.repeat(image, 3, -1) if image.shape[-1] == 1 else image[..., :3])

def pokes_from_clip(clip, n, n_frames, seed=0, moving_first=True):
    """Fig. L: tracks seen at frames 0 and goal -> pixel pokes [P, 5] (moving ones first or random), goal, the rest."""
    tracks, visible, (H, W) = clip["tracks"], clip["visibility"], clip["video"].shape[1:3]
    goal = min(len(tracks), n_frames) - 1
    window, end = tracks[:goal + 1].transpose(1, 0, 2), tracks[goal]
    usable = np.flatnonzero(visible[0] & visible[goal] & ((end >= 0) & (end <= [W - 1, H - 1])).all(-1))
    if len(usable) == 0:
        raise ValueError(f"the clip has no track visible in its first frame and at frame {goal}")
    order = usable[select_eval_tracks(pixels_to_unit(window[usable], W, H), n=len(usable), seed=seed) if moving_first
                   else np.random.default_rng(seed).permutation(len(usable))]
    pokes = sample_pokes(window[order], min(n, len(order)))
    pokes[:, 4] = goal / max(n_frames - 1, 1)   # t over the model's frames
    return pokes, goal, order[len(pokes):]

# ------------------------ sampling and decoding (unit coordinates)
@torch.no_grad()
def sample_latents(planner, image, pokes=(), text=None, k=4, steps=10, guidance=1.0, seed=0, vae=None,
                   poke_guidance=0.0):
    """K latent grids for one start frame [3, S, S], pokes [P, 5] unit, a text or None; the noise from seed alone."""
    device = next(planner.parameters()).device
    images = image[None].to(device).repeat(k, 1, 1, 1)
    pokes = torch.as_tensor(pokes, dtype=torch.float32, device=device)[None].repeat(k, 1, 1) if len(pokes) else None
    guide = PokeGuide(planner, vae, images, pokes, strength=poke_guidance, image_tokens=vae.image_tokens(
        images[:1]).expand(k, -1, -1)) if poke_guidance > 0 and pokes is not None else None
    with autocast(device):
        return planner.sample(images, pokes=pokes, text=[text] * k if text else None, steps=steps, cfg=guidance,
                              generator=torch.Generator().manual_seed(seed), guide=guide).float()

@torch.no_grad()
def decode_tracks(vae, z, image, query):
    """Latents [K, n_latents, C], query points [N, 2] (unit) -> their paths [K, N, T, 2]."""
    k, image, query = len(z), image[None].to(z.device), torch.as_tensor(query, dtype=torch.float32, device=z.device)
    with autocast(z.device):
        tokens = vae.image_tokens(image).expand(k, -1, -1)
        return vae.decode(z, image.expand(k, -1, -1, -1), query.expand(k, -1, -1), image_tokens=tokens).float()

def decode_dense_field(vae, z, image, size, chunk=None):
    """Sec. C: every pixel of a size x size frame -> [K, size, size, T, 2] (unit), a sample, chunk points at a time."""
    with autocast(z.device):
        return torch.cat([vae.decode_dense(zi, image[None].to(z.device), size, size, chunk, True) for zi in z.split(1)])

def dense_query(size):   # the unit (x, y) points decode_dense queries: [size, size, 2], row i, column j = (x_j, y_i)
    return torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, size)] * 2, indexing="xy"), dim=-1)

# ------------------------ pictures (data.draw_tracks; colour = time, blue -> green -> yellow -> red)
def draw_prompt(frame, pokes_px):
    """The start frame with each poke as an arrow from its start to its goal, coloured by the goal's time."""
    a, b = pokes_px[:, 0:2], pokes_px[:, 2:4]
    back = (a - b) / np.maximum(np.linalg.norm(b - a, axis=-1, keepdims=True), 1e-6) * 10   # 10 px back along the shaft
    heads = [b + back @ np.array([[np.cos(r), np.sin(r)], [-np.sin(r), np.cos(r)]]) for r in np.radians([28, -28])]
    segments = np.concatenate([np.stack([tail, b], 1) for tail in [a] + heads])   # the shaft, the head's two strokes
    colors = np.tile(time_colors(101)[np.rint(pokes_px[:, 4] * 100).astype(int)], (3, 1))[:, None]
    return draw_tracks(frame, segments, colors=colors, width=2, outline=True)

def draw_sample(frame, tracks_px, pokes_px, upto=None):
    """One sample over the faded frame: the poked tracks (the first P) thick, their goals white rings; upto: 0..upto."""
    out = (0.35 * 255 + 0.65 * np.asarray(frame, np.float32)).astype(np.uint8)
    P, angle = len(pokes_px), np.linspace(0, 2 * np.pi, 21)
    rings = pokes_px[:, None, 2:4] + 6 * np.stack([np.cos(angle), np.sin(angle)], -1)[None]
    out = draw_tracks(out, rings, colors=np.full(rings.shape[:2] + (3,), 255, np.uint8), outline=True)
    out = draw_tracks(out, tracks_px[P:], upto=upto)
    return draw_tracks(out, tracks_px[:P], upto=upto, width=3, dot=3, outline=True) if P else out

def mosaic(panels, cols):   # panels of one size, cols per row, 4 px white gaps
    panels = [np.pad(panel, ((0, 4), (0, 4), (0, 0)), constant_values=255) for panel in panels]
    panels += [np.full_like(panels[0], 255)] * (-len(panels) % cols)
    return np.concatenate([np.concatenate(panels[i:i + cols], 1) for i in range(0, len(panels), cols)])[:-4, :-4]

def displacement_colors(d, scale):
    """Displacements [..., 2] (x, y pixels, y down) -> a colour wheel: hue = direction, saturation = length / scale."""
    d = np.asarray(d, np.float64)
    hue = (np.arctan2(d[..., 1], d[..., 0]) / (2 * np.pi)) % 1.0
    saturation = np.clip(np.linalg.norm(d, axis=-1) / max(scale, 1e-9), 0, 1)
    rgb = np.clip(np.abs((hue[..., None] * 6 + [0, 4, 2]) % 6 - 3) - 1, 0, 1)
    return np.rint(255 * (1 - saturation[..., None] * (1 - rgb))).astype(np.uint8)

def draw_dense(frame, prompt, field_px, query_px, scale, n_lines=16):
    """Per sample: the prompt, each pixel's end displacement on the wheel (legend in the corner, rim = scale), paths."""
    (H, W), size, wheel = frame.shape[:2], field_px.shape[1], dense_query(max(16, len(frame) // 5)).numpy()
    legend = np.where(np.linalg.norm(wheel, axis=-1, keepdims=True) > 1, 128, displacement_colors(wheel, 1.0))
    panels, pick = [], slice(max(1, size // n_lines) // 2, None, max(1, size // n_lines))
    for field, moved in zip(field_px, field_px[:, :, :, -1] - query_px):   # colours: nearest, a cell per queried point
        colors = displacement_colors(moved, scale)[np.arange(H) * size // H][:, np.arange(W) * size // W]
        colors[:len(legend), :len(legend)] = legend
        panels += [prompt, colors, draw_sample(frame, np.concatenate(field[pick, pick]), np.zeros((0, 5)))]
    return mosaic(panels, cols=3)

# ------------------------ the command: everything is read, checked, sampled and drawn before a file is written
def main(argv=None):
    args = build_parser().parse_args(argv)
    for name, low in dict(k=1, steps=1, display=16, dense_size=2, chunk=1, grid=0, n_pokes=1, poke_guidance=0,
                           threads=0).items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected at least {low}")
    if sum(map(bool, (args.image, args.clip, args.from_tracks))) > 1 or (args.from_tracks and args.poke):
        raise ValueError("give one start frame (--image, --clip or --from-tracks); --from-tracks makes the pokes from "
                         "the clip's tracks: leave out --poke")
    check_output(args.out, "--out", folder=True)
    pokes_px = np.array([parse_poke(p) for p in args.poke], np.float32).reshape(-1, 5)
    query_px = np.reshape([parse_numbers(q, "--query", (2,), "x,y (pixels)") for q in args.query], (-1, 2))
    device = setup_distributed(args.device)[2]
    set_threads(args.threads) if device.type == "cpu" else None
    vae, planner = load_pair(args.planner, args.vae, device)
    T, clip_path = vae.cfg.n_frames, args.clip or args.from_tracks
    clip = load_clip(clip_path) if clip_path else None if args.image else \
        make_synthetic_clip(args.scene, T, 256, 256, vae.cfg.synth_tracks, render="first")
    frame = read_image(args.image) if args.image else clip["video"][0]
    source, (H, W) = args.image or clip_path or f"synthetic scene {args.scene}", frame.shape[:2]
    for what, points in (("--poke start", pokes_px[:, :2]), ("--poke goal", pokes_px[:, 2:4]), ("--query", query_px)):
        check_inside(points, W, H, what)
    held_out = ()
    if args.from_tracks or (clip is not None and not args.poke and not args.text):
        n = args.n_pokes or (planner.cfg.max_pokes if args.from_tracks else 2)
        pokes_px, goal, held_out = pokes_from_clip(clip, n, T, args.seed, moving_first=not args.from_tracks)
        print(f"pokes from the tracks of {source} (frame 0 -> {goal}): " +
              " ".join(f"--poke {','.join(f'{v:.4g}' for v in p)}" for p in pokes_px))
    grid = args.grid if args.grid is not None else 0 if len(query_px) else 10
    query_px = np.concatenate([pokes_px[:, :2], query_px, grid_points(grid, W, H)]).astype(np.float32)
    if len(query_px) == 0:
        raise ValueError("no points to decode: give --poke, --query or --grid N (N > 0)")
    P, image, dense = len(pokes_px), prepare_image(frame, vae.cfg.image_size)[1], args.dense or bool(args.from_tracks)
    if planner.cfg.task != "open" or (args.text and planner.text_proj is None) or (
            P > planner.cfg.max_pokes and not planner.cfg.null_token):
        raise ValueError(f"--planner {args.planner}: " + ("a LIBERO planner (eval.py libero, policy.py)" if
                         planner.cfg.task != "open" else "takes no --text (pokes only)" if args.text and
                         planner.text_proj is None else f"{planner.cfg.max_pokes} poke slots, {P} pokes given"))
    print(f"{source}: {W}x{H}; {P} pokes, text {args.text!r}; K = {args.k} samples of {T} frames, {args.steps} steps, "
          f"guidance {args.cfg}, poke guidance {args.poke_guidance if P else 'off'}, {len(query_px)} points, {device}")
    start, pokes = time.perf_counter(), pokes_to_unit(pokes_px, W, H)
    z = sample_latents(planner, image, pokes, args.text, args.k, args.steps, args.cfg, args.seed, vae,
                       args.poke_guidance)
    tracks_px = unit_to_pixels(decode_tracks(vae, z, image, pixels_to_unit(query_px, W, H)).cpu().numpy(), W, H)
    results = dict(sample_and_decode_s=time.perf_counter() - start)
    if P:   # the distance of each poked track at its goal frame, round(t (T - 1)), from its goal
        reached = tracks_px[:, range(P), np.rint(pokes_px[:, 4] * (T - 1)).astype(int)]
        err = np.linalg.norm(reached - unit_to_pixels(pokes[:, 2:4], W, H), axis=-1)
        results.update(poke_epe_px=float(err.mean()), poke_epe_px_per_poke=[round(float(e), 2) for e in err.mean(0)])
        print(f"poked points end {err.mean():.2f} px from their goals in the {W}x{H} input")
    if len(held_out):   # Fig. L: how well the samples fill in the motion nobody poked
        first, truth = clip["tracks"][[0, goal]][:, held_out[:256]]
        ends = unit_to_pixels(decode_tracks(vae, z, image, pixels_to_unit(first, W, H))[:, :, goal].cpu().numpy(), W, H)
        epe, static = (float(np.linalg.norm(x - truth, axis=-1).mean()) for x in (ends, first))
        results.update(held_out_epe_px=epe, held_out_static_px=static)
        print(f"{len(first)} held-out tracks end {epe:.2f} px from their true ends (standing still: {static:.2f} px)")
    Hd, Wd = args.display, max(1, round(W * args.display / H))
    zoom = np.array([(Wd - 1) / max(W - 1, 1), (Hd - 1) / max(H - 1, 1)], np.float32)   # display px per input px
    shown, pokes_d, cols = resize(frame, Hd, Wd), pokes_px * np.r_[zoom, zoom, 1], min(args.k + 1, 5)
    prompt, tracks_d = draw_prompt(shown, pokes_d), tracks_px * zoom
    panels = [mosaic([prompt] + [draw_sample(shown, t, pokes_d, f) for t in tracks_d], cols) for f in [None, *range(T)]]
    movie, pictures = panels[1:] + panels[-1:] * max(2, T // 4), {"samples.png": panels[0]}   # the last frame stays
    files = {"samples.npz": dict(tracks=tracks_px, pokes=pokes_px, query=query_px, image=frame)}
    if dense:
        start, joint = time.perf_counter(), vae.cfg.decoder_attention == "joint"
        chunk = args.chunk or (vae.cfg.n_enc + vae.cfg.n_dec if joint else 2048)
        if joint:
            n = -(-args.dense_size ** 2 // chunk)
            print(f"dense: the joint decoder (the release's) decodes in {n} chunks of <= {chunk} points, chunk j the "
                  f"pixels j, j + {n}, j + {2 * n}, ...: a point's path depends on the others in its chunk")
        field_px = unit_to_pixels(decode_dense_field(vae, z, image, args.dense_size, chunk).cpu().numpy(), W, H)
        dense_px = unit_to_pixels(dense_query(args.dense_size).numpy(), W, H)
        moved = field_px[:, :, :, -1] - dense_px   # each pixel's end-frame displacement
        scale = max(1.0, float(np.percentile(np.linalg.norm(moved, axis=-1), 99)))
        results.update(dense_s=time.perf_counter() - start, dense_peak_mb=peak_mb(device), dense_scale_px=scale)
        print(f"dense: {args.dense_size}^2 points in {results['dense_s']:.1f} s, {chunk} at a time (peak memory "
              f"{results['dense_peak_mb']:.0f} MB); colour wheel rim = {scale:.1f} px")
        files["dense.npz"] = dict(tracks=field_px, query=dense_px, end_displacement=moved)
        pictures["dense.png"] = draw_dense(shown, prompt, field_px * zoom, dense_px * zoom, scale * zoom.mean())
    settings = dict(source=source, width=W, height=H, vae=args.vae, planner=args.planner, k=args.k, steps=args.steps,
                    guidance=args.cfg, poke_guidance=args.poke_guidance, seed=args.seed, text=args.text or "",
                    n_frames=T, n_pokes=P, dense=dense, **results)
    files["samples.npz"]["settings"] = np.array(json.dumps(settings))
    for name, arrays in files.items():
        write_atomically(os.path.join(args.out, name), lambda f, a=arrays: np.savez(f, **a))
    for name, picture in pictures.items():
        save_image(os.path.join(args.out, name), picture)
    write_video(os.path.join(args.out, "samples.gif"), movie, fps=max(6, T // 4))
    print(f"wrote {', '.join(sorted(files) + sorted(pictures))} and samples.gif to {args.out}")
    return settings

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, kind, default, what in (
            ("--planner", str, "out/tiny/planner/ckpt.pt", "planner checkpoint, or release:NAME / a .safetensors"),
            ("--vae", str, None, "the VAE the planner was trained on (default: the one it names; release: its own)"),
            ("--image", str, None, "a start frame (PNG/JPG, any size)"), ("--clip", str, None, "a clip .npz (frame 0)"),
            ("--scene", int, 0, "synthetic scene without a start frame"), ("--text", str, None, "the motion, in words"),
            ("--from-tracks", str, None, "densification (Fig. L): a clip .npz's tracks are the pokes; implies --dense"),
            ("--n-pokes", int, None, "pokes from a clip's tracks (default 2; with --from-tracks the planner's slots)"),
            ("--k", int, 4, "samples"), ("--steps", int, 10, "Euler steps (NFE); 10 is enough per Fig. K"),
            ("--cfg", float, 2.0, "classifier-free guidance (1 = off)"), ("--device", str, "auto", "auto, cpu, cuda:N"),
            ("--threads", int, 0, "CPU threads (0: trainer.set_threads' rule)"),
            ("--poke-guidance", float, 0.5, "planner.PokeGuide's strength (ours; 0 = the paper's sampler)"),
            ("--seed", int, 0, "noise seed (and the choice of pokes from a clip)"),
            ("--grid", int, None, "an N x N grid of points to decode (default 10 without --query)"),
            ("--dense-size", int, 224, "side of the dense field (224: the paper's frame)"),
            ("--chunk", int, None, "points decoded at once in dense mode (default 2048; a joint decoder: as trained)"),
            ("--out", str, "out/tiny/samples", "output folder"), ("--display", int, 320, "picture panel height (px)")):
        p.add_argument(flag, type=kind, default=default, help=what)
    p.add_argument("--poke", action="append", default=[], metavar="x0,y0,x1,y1[,t]", help="pixels; repeatable")
    p.add_argument("--query", action="append", default=[], metavar="x,y", help="a start point to decode; repeatable")
    p.add_argument("--dense", action="store_true", help="also decode every pixel of a --dense-size square frame")
    return p

if __name__ == "__main__":
    cli(main)
