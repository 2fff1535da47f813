"""Sampling: K plausible motions of a start frame from pokes or words, drawn; dense motion (supplement Sec. C).

    python sample.py                                     # tiny checkpoints, a synthetic clip -> out/tiny/samples/
    python sample.py --image photo.jpg --poke 120,200,180,150 --poke 300,220,300,260,0.5 --k 4
    python sample.py --image photo.jpg --text "the red circle moves to the left" --grid 12
    python sample.py --from-tracks clip.npz --n-pokes 8  # densification (Fig. L): tracks -> pokes -> every pixel
    python sample.py --clip clip.npz --poke 40,60,90,60 --dense   # also the dense field of every sample

Pokes and query points are in pixels of the input image, (x, y) with x to the right and y down. A poke
x0,y0,x1,y1[,t] asks the point at (x0, y0) of the start frame to be at (x1, y1) at time t in [0, 1] over the
model's frames (0 = the start frame, 1 = the last, the default). Inside the models everything is in unit
coordinates: data.pixels_to_unit with the input's own width and height. A non-square image is squashed to the
model's square input (data.prepare_image); unit coordinates are relative to the frame, so nothing moves.

Poked samples are drawn with poke guidance by default (--poke-guidance 0.5, planner.PokeGuide): our addition, not
the paper's. Each sampling step's plan is corrected so that the VAE decodes the poked points onto their goals; the
tiny CPU models alone leave them tens of pixels away. --poke-guidance 0 is the paper's sampler.

Without --poke, --text or --from-tracks, a start frame that comes from a clip (the synthetic default, --clip) is
poked with --n-pokes of its own tracks, moving ones first (as the evaluation pokes), and an image alone gets
unconditional samples. --from-tracks takes a random choice of the clip's tracks instead (a tracker's points,
static ones included) and reports how far the clip's other tracks are from where the samples put them.

Outputs in --out (README, "Sampling"): samples.npz, samples.png, samples.gif; with --dense, dense.png and dense.npz.
Frames, image size and latent shapes come from the checkpoints' configs (tiny: 16 frames at 112 px; paper: 64 at 224).
"""
import argparse
import json
import math
import os
import time
import warnings

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F

from data import (draw_tracks, load_clip, make_synthetic_clip, pixels_to_unit, prepare_image, write_atomically,
                  sample_pokes, select_eval_tracks, time_colors, unit_to_pixels, write_video)
from eval import autocast, load_stage, peak_memory, pick_device, reset_peak_memory
from planner import PokeGuide, check_planner_matches_vae, load_planner
from vae import grid_centres, load_vae

TINY_VAE, TINY_PLANNER = "out/tiny/vae/ckpt.pt", "out/tiny/planner/ckpt.pt"


# ----------------------------------------------------------------------------------------------------
# Inputs: pokes, query points, start frames, checkpoints


def parse_numbers(text, flag, counts, form):
    """'a,b,c' -> finite floats, as many as one of counts; else a ValueError naming the flag and the string."""
    try:
        values = [float(part) for part in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) not in counts or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{flag} {text!r}: expected {form}")
    return values


def parse_poke(text):
    """'x0,y0,x1,y1[,t]' in pixels -> [x0, y0, x1, y1, t]; t in [0, 1], default 1 (the last frame)."""
    values = parse_numbers(text, "--poke", (4, 5), "x0,y0,x1,y1 or x0,y0,x1,y1,t (pixels; t in [0, 1])")
    if len(values) == 4:
        values.append(1.0)
    if not 0 <= values[4] <= 1:
        raise ValueError(f"--poke {text!r}: t = {values[4]:g} is outside [0, 1] (0 = the start frame, 1 = the last)")
    return values


def check_inside(points, width, height, what):
    """points [M, 2] (x, y) pixels must lie in the image: 0 <= x <= width - 1, 0 <= y <= height - 1."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    outside = ~((points >= 0) & (points <= [width - 1, height - 1])).all(-1)
    if outside.any():
        x, y = points[np.argmax(outside)]
        raise ValueError(f"{what}: ({x:g}, {y:g}) is outside the {width}x{height} image (x in [0, {width - 1}], "
                         f"y in [0, {height - 1}])")


def pokes_to_unit(pokes_px, width, height):
    """Pixel pokes [P, 5] (x0, y0, x1, y1, t) -> unit coordinates, t unchanged (data.pixels_to_unit)."""
    pokes_px = np.asarray(pokes_px, dtype=np.float32).reshape(-1, 5)
    xy = pixels_to_unit(pokes_px[:, :4].reshape(-1, 2, 2), width, height).reshape(-1, 4)
    return np.concatenate([xy, pokes_px[:, 4:]], axis=1).astype(np.float32)


def grid_points(n, width, height):
    """The centres of an n x n grid of cells over the image, (x, y) pixels [n*n, 2], row by row."""
    return unit_to_pixels(grid_centres(n, n).flip(-1).numpy(), width, height).astype(np.float32)


def read_image(path):
    """An image file -> uint8 [H, W, 3] (grey and 16-bit are converted, alpha dropped, an animation's first frame)."""
    try:
        with warnings.catch_warnings():  # (imageio tries deprecated plugins on a file it cannot place)
            warnings.simplefilter("ignore", DeprecationWarning)
            image = np.asarray(iio.imread(path))
    except Exception as e:  # imageio raises many kinds of errors for files it cannot decode
        raise ValueError(f"--image {path}: cannot be read as an image ({type(e).__name__}: {str(e)[:200]})") from None
    if image.ndim == 4:
        image = image[0]
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 2:
        raise ValueError(f"--image {path}: decodes to {image.dtype} {list(image.shape)}, expected an RGB, RGBA or "
                         "grey picture of at least 2x2 pixels")
    return np.ascontiguousarray(np.repeat(image, 3, -1) if image.shape[-1] == 1 else image[..., :3])


def load_start(args, n_frames, synth_tracks):
    """The start frame uint8 [H, W, 3], the clip it comes from (or None) and a name for it."""
    given = [flag for flag, value in (("--image", args.image), ("--clip", args.clip),
                                      ("--from-tracks", args.from_tracks)) if value]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)}: give one start frame (--image, --clip or --from-tracks)")
    if args.image:
        return read_image(args.image), None, args.image
    if args.clip or args.from_tracks:
        path = args.clip or args.from_tracks
        clip = load_clip(path)
        return clip["video"][0], clip, path
    clip = make_synthetic_clip(args.scene, n_frames, 256, 256, synth_tracks, render="first")
    return clip["video"][0], clip, f"synthetic scene {args.scene} ({clip['text']})"


def pokes_from_clip(clip, n, n_frames, seed=0, moving_first=True):
    """Sec. C / Fig. L: a clip's tracks become pokes. The model covers the clip's first n_frames frames; a track
    visible in the start frame and at the goal frame (the window's last), and inside the frame there, becomes
    (start, position at the goal frame, t). moving_first: moving tracks first (data.select_eval_tracks, as the
    evaluation pokes), else a random choice (a tracker's points: spread over the scene, static ones included).
    Returns pixel pokes [P, 5], the goal frame and the indices of the unused such tracks (held out)."""
    tracks, visible = clip["tracks"], clip["visibility"]
    goal = min(len(tracks), n_frames) - 1
    H, W = clip["video"].shape[1:3]
    window = tracks[:goal + 1].transpose(1, 0, 2)                                     # [N, T, 2] pixels
    inside = ((window[:, -1] >= 0) & (window[:, -1] <= [W - 1, H - 1])).all(-1)
    usable = np.flatnonzero(visible[0] & visible[goal] & inside)
    if len(usable) == 0:
        raise ValueError(f"the clip has no track visible in its first frame and at frame {goal} (inside the frame)")
    order = usable[select_eval_tracks(pixels_to_unit(window[usable], W, H), n=len(usable), seed=seed)
                   if moving_first else np.random.default_rng(seed).permutation(len(usable))]
    pokes, _ = sample_pokes(window[order], min(n, len(order)), end_t=1.0)
    pokes[:, 4] = goal / max(n_frames - 1, 1)                                          # t over the model's frames
    return pokes, goal, order[len(pokes):]


def checkpoint_hint(path, stage, vae_path):
    """The command that writes a missing checkpoint."""
    folder = os.path.dirname(path)
    out = "" if folder == f"out/tiny/{stage}" else f" --out_dir={folder}"
    return "python vae.py" + out if stage == "vae" else f"python planner.py --vae {vae_path}{out}"


def load_models(vae_path, planner_path, device="cpu"):
    """load_vae + load_planner, with a ValueError naming both files when they do not belong together."""
    missing = [(flag, path, stage) for flag, path, stage in (("--vae", vae_path, "vae"),
                                                            ("--planner", planner_path, "planner"))
               if not os.path.isfile(path)]
    if missing:
        lines = [f"{flag} {path}: no such checkpoint" for flag, path, _ in missing]
        commands = [checkpoint_hint(path, stage, vae_path) for _, path, stage in missing]
        raise ValueError("; ".join(lines) + ". Train first:\n  " + "\n  ".join(commands))
    vae = load_stage(load_vae, vae_path, "--vae", device)
    planner = load_stage(load_planner, planner_path, "--planner", device)
    check_planner_matches_vae(planner, vae, planner_path, vae_path)
    return vae, planner


# ----------------------------------------------------------------------------------------------------
# Sampling and decoding (unit coordinates throughout)


@torch.no_grad()
def sample_latents(planner, image, pokes=None, text=None, k=4, steps=10, guidance=1.0, seed=0, vae=None,
                   poke_guidance=0.0):
    """K latent grids [K, n_latents, C] for one start frame. image [3, S, S] (data.prepare_image), pokes [P, 5]
    unit coordinates or None, text a string or None. The noise comes from seed alone (same noise, other task).
    poke_guidance > 0 (with the vae and pokes): planner.PokeGuide's strength; 0 = the paper's sampler."""
    device = next(planner.parameters()).device
    images = image[None].to(device).repeat(k, 1, 1, 1)
    if pokes is not None and len(pokes) > 0:
        pokes = torch.as_tensor(pokes, dtype=torch.float32)[None].to(device).repeat(k, 1, 1)   # (numpy float64 too)
    else:
        pokes = None
    guide = None
    if poke_guidance > 0 and pokes is not None:
        tokens = vae.image_tokens(images[:1]).expand(k, -1, -1)   # one image: its tokens once, not K times
        guide = PokeGuide(planner, vae, images, pokes, strength=poke_guidance, image_tokens=tokens)
    with autocast(device):
        z = planner.sample(images, pokes=pokes, text=[text] * k if text else None, steps=steps, cfg=guidance,
                           generator=torch.Generator().manual_seed(seed), guide=guide)
    return z.float()


@torch.no_grad()
def decode_tracks(vae, z, image, query):
    """Latents [K, n_latents, C] -> the trajectories of the query points [N, 2] (unit x, y): [K, N, T, 2]."""
    device = z.device
    k = z.shape[0]
    with autocast(device):
        tokens = vae.image_tokens(image[None].to(device)).expand(k, -1, -1)
        query = torch.as_tensor(query, dtype=torch.float32)[None].to(device).expand(k, -1, -1)
        tracks = vae.decode(z, image[None].to(device).expand(k, -1, -1, -1), query, image_tokens=tokens)
    return tracks.float()


@torch.no_grad()
def decode_dense_field(vae, z, image, size, chunk=2048):
    """Sec. C: query every pixel of a size x size frame -> [K, size, size, T, 2] (unit x, y); one sample at a time
    and chunk points at a time (vae.decode_dense), so memory is bounded by the chunk, not by the field."""
    device = z.device
    with autocast(device):
        return torch.cat([vae.decode_dense(z[i:i + 1], image[None].to(device), size, size, chunk=chunk,
                                           progress=True).float() for i in range(z.shape[0])])


def dense_query(size):
    """The unit (x, y) points decode_dense queries: [size, size, 2], row i, column j = (x_j, y_i)."""
    axis = torch.linspace(-1, 1, size)
    return torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1)


def poke_errors(tracks, pokes, width, height):
    """Distance in pixels between each poked track at its goal frame and its goal: tracks [K, P, T, 2] and
    pokes [P, 5] in unit coordinates -> [K, P]. The goal frame of a poke is round(t (T - 1))."""
    T = tracks.shape[2]
    frame = np.rint(pokes[:, 4] * (T - 1)).astype(int)
    reached = unit_to_pixels(tracks[:, np.arange(len(pokes)), frame], width, height)
    return np.linalg.norm(reached - unit_to_pixels(pokes[:, 2:4], width, height), axis=-1)


# ----------------------------------------------------------------------------------------------------
# Pictures: plain numpy on uint8 arrays (colour = time, blue -> green -> yellow -> red: data.time_colors)

BLACK, WHITE = np.zeros(3, np.uint8), np.full(3, 255, np.uint8)


def resize(frame, height, width):
    """uint8 [H, W, 3] -> [height, width, 3], bilinear with antialiasing."""
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x[0].clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def display_size(height, width, display_height):
    """A readable size with the input's aspect ratio: display_height rows (at least 1 column)."""
    return display_height, max(1, round(width * display_height / height))


def segments(starts, ends):
    """Line segments as 2-frame tracks [M, 2, 2] for data.draw_tracks."""
    return np.stack([starts, ends], axis=1)


def arrow_segments(pokes_px, head=10.0):
    """Poke arrows [P, 5] (display pixels) -> segments [3P, 2, 2]: the shaft, then both strokes of the head."""
    a, b = pokes_px[:, 0:2], pokes_px[:, 2:4]
    length = np.linalg.norm(b - a, axis=-1, keepdims=True)
    back = (a - b) / np.maximum(length, 1e-6) * np.minimum(head, 0.6 * length)  # from the tip towards the start
    c, s = math.cos(math.radians(28)), math.sin(math.radians(28))
    left = np.stack([c * back[:, 0] - s * back[:, 1], s * back[:, 0] + c * back[:, 1]], -1)
    right = np.stack([c * back[:, 0] + s * back[:, 1], -s * back[:, 0] + c * back[:, 1]], -1)
    return np.concatenate([segments(a, b), segments(b + left, b), segments(b + right, b)])


def ring_tracks(centres, radius, n=20):
    """Circles as closed polylines [M, n + 1, 2] around centres [M, 2]."""
    angle = np.linspace(0, 2 * np.pi, n + 1)
    return centres[:, None] + radius * np.stack([np.cos(angle), np.sin(angle)], -1)[None]


def outlined(image, tracks, color, radius=1):
    """Polylines [M, L, 2] in one colour [3] with a black outline one pixel wider."""
    if len(tracks) == 0:
        return image
    image = draw_tracks(image, tracks, colors=np.broadcast_to(BLACK, tracks.shape[:2] + (3,)), radius=radius + 1)
    return draw_tracks(image, tracks, colors=np.broadcast_to(color, tracks.shape[:2] + (3,)), radius=radius)


def draw_prompt(frame, pokes_px):
    """The prompt: the start frame with each poke as an arrow from its start to its goal, coloured by the goal's
    time (the trajectories' colour at that time), with a dot at the start."""
    out = np.array(frame)
    if len(pokes_px) == 0:
        return out
    colors = time_colors(101)[np.rint(pokes_px[:, 4] * 100).astype(int)]               # [P, 3]
    arrows = arrow_segments(pokes_px)
    arrow_colors = np.repeat(np.tile(colors, (3, 1))[:, None], 2, axis=1)               # [3P, 2, 3]
    out = draw_tracks(out, arrows, colors=np.zeros_like(arrow_colors), radius=2)
    out = draw_tracks(out, arrows, colors=arrow_colors, radius=1)
    starts = pokes_px[:, None, 0:2]
    out = draw_tracks(out, starts, colors=np.zeros((len(starts), 1, 3), np.uint8), upto=0, dot=4)
    return draw_tracks(out, starts, colors=colors[:, None], upto=0, dot=3)


def draw_sample(frame, tracks_px, pokes_px, upto=None):
    """One sample over the (dimmed) start frame: every track coloured by time, the poked ones (the first P)
    thicker, each poke's goal as a white ring. upto: frames 0..upto only, with a dot at the current position."""
    out = (0.35 * 255 + 0.65 * np.asarray(frame, np.float32)).astype(np.uint8)  # faded: the colours stand out
    P = len(pokes_px)
    out = outlined(out, ring_tracks(pokes_px[:, 2:4], 6.0), WHITE)
    out = draw_tracks(out, tracks_px[P:], upto=upto, radius=1, dot=2)
    if P:
        out = draw_tracks(out, tracks_px[:P], colors=np.zeros((P,) + tracks_px.shape[1:2] + (3,), np.uint8),
                          upto=upto, radius=3, dot=4)
        out = draw_tracks(out, tracks_px[:P], upto=upto, radius=2, dot=3)
    return out


def mosaic(panels, cols, gap=4):
    """Panels of one size side by side, cols per row, separated by white gaps (missing panels are white)."""
    h, w = panels[0].shape[:2]
    rows = -(-len(panels) // cols)
    out = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, np.uint8)
    for i, panel in enumerate(panels):
        r, c = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = panel
    return out


def displacement_colors(displacement, scale):
    """Colour wheel of displacements [..., 2] (x, y pixels, y down): hue = direction (right red, down yellow-green,
    left cyan, up violet), saturation = length / scale (clipped at 1); no motion is white. -> uint8 [..., 3]."""
    d = np.asarray(displacement, np.float64)
    hue = (np.arctan2(d[..., 1], d[..., 0]) / (2 * np.pi)) % 1.0
    saturation = np.clip(np.linalg.norm(d, axis=-1) / max(scale, 1e-9), 0, 1)
    rgb = np.clip(np.abs((hue[..., None] * 6 + [0, 4, 2]) % 6 - 3) - 1, 0, 1)             # fully saturated hue
    return np.rint(255 * (1 - saturation[..., None] * (1 - rgb))).astype(np.uint8)


def color_wheel(size):
    """The legend of displacement_colors: displacements up to the scale inside a disc, grey outside."""
    axis = np.linspace(-1, 1, size)
    d = np.stack(np.meshgrid(axis, axis, indexing="xy"), -1)
    wheel = displacement_colors(d, 1.0)
    wheel[np.linalg.norm(d, axis=-1) > 1] = 128
    return wheel


def draw_dense(frame, prompt, field_px, query_px, display_hw, scale, n_lines=16):
    """Per sample (rows): the prompt, the colour wheel of the end-frame displacement at every queried pixel (the
    legend in the corner, its rim = scale pixels) and every few pixels' trajectory over the start frame."""
    H, W = display_hw
    size = field_px.shape[1]
    step = max(1, size // n_lines)
    pick = slice(step // 2, None, step)
    wheel = color_wheel(max(16, H // 5))
    panels = []
    for field in field_px:
        colors = displacement_colors(field[:, :, -1] - query_px, scale)
        colors = colors[np.arange(H) * size // H][:, np.arange(W) * size // W]  # nearest: one cell per queried point
        colors[:len(wheel), :len(wheel)] = wheel
        lines = field[pick, pick].reshape(-1, *field.shape[2:])
        panels += [prompt, colors, draw_sample(frame, lines, np.zeros((0, 5)))]
    return mosaic(panels, cols=3)


# ----------------------------------------------------------------------------------------------------
# The command


def run(args):
    """Everything is read, checked, sampled and drawn before the first file is written."""
    limits = dict(k=(args.k, 1), steps=(args.steps, 1), display=(args.display, 16), dense_size=(args.dense_size, 2),
                  chunk=(args.chunk, 1), grid=(0 if args.grid is None else args.grid, 0),
                  n_pokes=(1 if args.n_pokes is None else args.n_pokes, 1), poke_guidance=(args.poke_guidance, 0))
    for name, (value, least) in limits.items():
        if value < least:
            raise ValueError(f"--{name.replace('_', '-')} {value}: expected at least {least}")
    if args.from_tracks and args.poke:
        raise ValueError("--from-tracks makes the pokes from the clip's tracks: leave out --poke")
    pokes_px = np.array([parse_poke(p) for p in args.poke], np.float32).reshape(-1, 5)
    query_px = np.array([parse_numbers(q, "--query", (2,), "x,y (pixels)") for q in args.query], np.float32)
    device = pick_device(args.device)
    vae, planner = load_models(args.vae, args.planner, device)
    T, S = vae.cfg.n_frames, vae.cfg.image_size
    frame, clip, source = load_start(args, T, vae.cfg.synth_tracks)
    H, W = frame.shape[:2]
    check_inside(pokes_px[:, :2], W, H, "--poke start")
    check_inside(pokes_px[:, 2:4], W, H, "--poke goal")
    check_inside(query_px, W, H, "--query")
    held_out = None
    if args.from_tracks or (clip is not None and not args.poke and not args.text):
        n = args.n_pokes if args.n_pokes is not None else (planner.cfg.max_pokes if args.from_tracks else 2)
        pokes_px, goal, held_out = pokes_from_clip(clip, n, T, args.seed, moving_first=not args.from_tracks)
        print(f"pokes from the tracks of {source} (frame 0 -> frame {goal}):\n  " +
              " ".join(f"--poke {','.join(f'{v:.4g}' for v in p)}" for p in pokes_px))
    dense = args.dense or bool(args.from_tracks)
    grid = args.grid if args.grid is not None else (0 if len(query_px) else 10)
    query_px = np.concatenate([pokes_px[:, :2], query_px.reshape(-1, 2), grid_points(grid, W, H)]).astype(np.float32)
    if len(query_px) == 0:
        raise ValueError("no points to decode: give --poke, --query or --grid N (N > 0)")
    P = len(pokes_px)
    if P > planner.cfg.max_pokes:
        print(f"note: {P} pokes, the planner was trained with up to {planner.cfg.max_pokes}")
    task = [f"{P} pokes"] * bool(P) + [f"text {args.text!r}"] * bool(args.text) or ["no condition"]
    print(f"{source}: {W}x{H}; {' + '.join(task)}; K = {args.k} samples of {T} frames, {args.steps} steps, "
          f"guidance {args.guidance}, poke guidance {args.poke_guidance if P else 'off (no pokes)'}, {len(query_px)} "
          f"points, device {device}")

    # ---- sample, decode
    pokes = pokes_to_unit(pokes_px, W, H)
    query = pixels_to_unit(query_px, W, H)
    image = prepare_image(frame, S)[1]
    start = time.perf_counter()
    z = sample_latents(planner, image, pokes, args.text, args.k, args.steps, args.guidance, args.seed, vae,
                       args.poke_guidance)
    t_sample = time.perf_counter() - start
    start = time.perf_counter()
    tracks = decode_tracks(vae, z, image, query).cpu().numpy()
    t_decode = time.perf_counter() - start
    print(f"planner: {args.k} x {args.steps}-step samples in {t_sample:.2f} s ({t_sample / args.k:.3f} s each); "
          f"decoding {len(query)} points x {T} frames x {args.k}: {t_decode:.2f} s")
    results = dict(sample_s=t_sample, decode_s=t_decode)
    if P:
        errors = poke_errors(tracks[:, :P], pokes, W, H)
        results["poke_epe_px"] = float(errors.mean())
        results["poke_epe_px_per_poke"] = [round(float(e), 2) for e in errors.mean(0)]
        print(f"poked points end {errors.mean():.2f} px from their goals (mean over {P} pokes x {args.k} samples, "
              f"pixels of the {W}x{H} input; per poke: {' '.join(f'{e:.1f}' for e in errors.mean(0))})")
    if held_out is not None and len(held_out):
        # the clip's other tracks: how well the samples fill in motion nobody poked (Fig. L), vs standing still
        held_out = held_out[:256]
        truth = clip["tracks"][goal, held_out]
        ends = unit_to_pixels(decode_tracks(vae, z, image, pixels_to_unit(clip["tracks"][0, held_out], W, H))
                              [:, :, goal].cpu().numpy(), W, H)
        results["held_out_epe_px"] = float(np.linalg.norm(ends - truth, axis=-1).mean())
        results["held_out_static_px"] = float(np.linalg.norm(clip["tracks"][0, held_out] - truth, axis=-1).mean())
        print(f"{len(held_out)} held-out tracks of the clip end {results['held_out_epe_px']:.2f} px from their "
              f"true end (standing still: {results['held_out_static_px']:.2f} px)")
    field_px = None
    if dense:
        before = reset_peak_memory(device)
        start = time.perf_counter()
        field = decode_dense_field(vae, z, image, args.dense_size, args.chunk)
        results["dense_s"], results["dense_peak_mb"] = time.perf_counter() - start, peak_memory(device)
        results["dense_extra_mb"] = max(0.0, results["dense_peak_mb"] - before)
        field_px = unit_to_pixels(field.cpu().numpy(), W, H).astype(np.float32)
        print(f"dense: {args.dense_size}x{args.dense_size} = {args.dense_size ** 2} points x {T} frames x "
              f"{args.k} samples in {results['dense_s']:.2f} s, peak memory {results['dense_peak_mb']:.0f} MB "
              f"({'resident set' if device.type == 'cpu' else 'allocated'}; {results['dense_extra_mb']:.0f} MB more "
              "than before decoding)")

    # ---- pictures (in memory first)
    tracks_px = unit_to_pixels(tracks, W, H).astype(np.float32)
    Hd, Wd = display_size(H, W, args.display)
    to_display = np.array([(Wd - 1) / max(W - 1, 1), (Hd - 1) / max(H - 1, 1)], np.float32)
    shown = resize(frame, Hd, Wd)
    pokes_d = np.concatenate([pokes_px[:, :4] * np.tile(to_display, 2), pokes_px[:, 4:]], 1)
    prompt = draw_prompt(shown, pokes_d)
    tracks_d = tracks_px * to_display
    cols = min(args.k + 1, 5)
    picture = mosaic([prompt] + [draw_sample(shown, t, pokes_d) for t in tracks_d], cols)
    hold = max(2, T // 4)  # the last frame stays a moment before the loop restarts
    movie = [mosaic([prompt] + [draw_sample(shown, t, pokes_d, upto=min(f, T - 1)) for t in tracks_d], cols)
             for f in range(T + hold)]
    settings = dict(source=source, width=W, height=H, vae=args.vae, planner=args.planner, k=args.k, steps=args.steps,
                    guidance=args.guidance, poke_guidance=args.poke_guidance, seed=args.seed, text=args.text or "", n_frames=T, n_pokes=P,
                    device=str(device), dense=dense, **results)
    files = {"samples.npz": dict(tracks=tracks_px, pokes=pokes_px, query=query_px, image=frame,
                                 settings=np.array(json.dumps(settings)))}
    if dense:
        dense_query_px = unit_to_pixels(dense_query(args.dense_size).numpy(), W, H).astype(np.float32)
        scale = max(1.0, float(np.percentile(np.linalg.norm(field_px[:, :, :, -1] - dense_query_px, axis=-1), 99)))
        settings["dense_scale_px"] = scale
        files["dense.npz"] = dict(tracks=field_px, query=dense_query_px,
                                  end_displacement=field_px[:, :, :, -1] - dense_query_px)
        dense_picture = draw_dense(shown, prompt, field_px * to_display, dense_query_px * to_display, (Hd, Wd),
                                   scale * to_display.mean())
        print(f"dense picture: colour wheel rim = {scale:.1f} px of end-frame displacement")

    # ---- write (each file atomically)
    os.makedirs(args.out, exist_ok=True)
    for name, arrays in files.items():
        write_atomically(os.path.join(args.out, name), lambda f, a=arrays: np.savez(f, **a), suffix=".npz")
    pictures = {"samples.png": picture, **({"dense.png": dense_picture} if dense else {})}
    for name, image_array in pictures.items():
        write_atomically(os.path.join(args.out, name),
                          lambda f, a=image_array: f.write(iio.imwrite("<bytes>", a, extension=".png")), suffix=".png")
    write_video(os.path.join(args.out, "samples.gif"), movie, fps=max(6, T // 4))
    written = list(files) + list(pictures) + ["samples.gif"]
    print(f"wrote {', '.join(os.path.join(args.out, n) for n in written)}")
    return dict(settings, files=[os.path.join(args.out, n) for n in written])


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default=TINY_VAE, help="VAE checkpoint (vae.py)")
    p.add_argument("--planner", default=TINY_PLANNER, help="planner checkpoint (planner.py), trained on that VAE")
    src = p.add_argument_group("start frame (default: a synthetic clip)")
    src.add_argument("--image", help="PNG/JPG start frame (any size; non-square is fine)")
    src.add_argument("--clip", help="a clip .npz (data.py format): its first frame")
    src.add_argument("--scene", type=int, default=0, help="seed of the synthetic scene when no start frame is given")
    task = p.add_argument_group("task")
    task.add_argument("--poke", action="append", default=[], metavar="x0,y0,x1,y1[,t]",
                      help="move the point (x0, y0) to (x1, y1) at time t in [0, 1] (default 1 = the last frame); "
                           "pixels of the input image; repeatable")
    task.add_argument("--text", help="a sentence describing the motion")
    task.add_argument("--from-tracks", metavar="CLIP.npz",
                      help="densification (Sec. C, Fig. L): the clip's first frame; its tracks become pokes; "
                           "implies --dense")
    task.add_argument("--n-pokes", type=int, help="pokes taken from a clip's tracks (default: the planner's poke "
                                                  "slots with --from-tracks, else 2)")
    gen = p.add_argument_group("sampling")
    gen.add_argument("--k", type=int, default=4, help="number of samples")
    gen.add_argument("--steps", type=int, default=10, help="Euler steps (NFE); 10 is enough per Fig. K")
    gen.add_argument("--cfg", dest="guidance", type=float, default=2.0,
                     help="classifier-free guidance (1 = off; 2 brings the tiny planner's poked points closest to their "
                          "goals: EPE 18-20 px against 25 px at 1, README)")
    gen.add_argument("--poke-guidance", type=float, default=0.5,
                     help="strength of the sampling-time poke guidance (planner.PokeGuide; our addition, not the "
                          "paper's): each step's plan is corrected so the decoded poked points reach their goals, "
                          "0.5 = half the remaining error per correction, 0 = the paper's sampler (README, Sampling)")
    gen.add_argument("--seed", type=int, default=0, help="noise seed (and the choice of pokes from a clip)")
    pts = p.add_argument_group("points to decode (the poked points always come first)")
    pts.add_argument("--query", action="append", default=[], metavar="x,y", help="a start point in pixels; repeatable")
    pts.add_argument("--grid", type=int, help="an N x N grid of points (default 10 without --query)")
    pts.add_argument("--dense", action="store_true", help="also decode every pixel of a --dense-size square frame")
    pts.add_argument("--dense-size", type=int, default=224, help="side of the dense field (224 = the paper's frame)")
    pts.add_argument("--chunk", type=int, default=2048, help="points decoded at once in dense mode (bounds memory)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="out/tiny/samples", help="output folder")
    out.add_argument("--display", type=int, default=320, help="height of each picture panel in pixels")
    out.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    return p


def main(argv=None):
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        raise SystemExit(f"error: {e}")
