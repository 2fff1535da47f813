"""Evaluation: the metrics, baselines and protocols of the paper (DESIGN.md, "Evaluation protocols"), and a
speed benchmark.

This file holds two kinds of code:
  1. metric functions and baselines, pure torch, importable anywhere (tests, training logs, notebooks);
  2. commands (each imports the stage it needs inside itself: importing eval.py never builds a model):
     python eval.py recon --vae out/tiny/vae/ckpt.pt                # AE / MAE reconstruction PCK (Tables G, H)
     python eval.py tracks --vae V --planner P --pokes 1,4,dense    # MSE / EPE from pokes or text (Table E)
     python eval.py tracks ... --steps 1,2,5,10,20,50               # quality against sampling steps (Fig. K)
     python eval.py tracks ... --protocol libero --text             # 16-frame windows, 32 tracks (Table E)
     python eval.py speed --preset paper --device cpu               # time, FLOPs, memory, MFU of every operation
     python eval.py robot-ceiling --n 640                           # what the start frame decides on the robot task
     python eval.py robot-ceiling --frames P                        # ... and what a head reading planner P's inputs gets
     Each takes --data (synthetic, a folder of .npz clips, .tar shards) and --json FILE for the numbers.

Conventions. Every input is in unit coordinates: (x, y) in [-1, 1] over the frame, x first. Track
tensors are [..., N, T, 2] (tracks first, then time); K samples of them are [..., K, N, T, 2]. A leading
"..." is any number of batch dimensions (clips); the metrics average over them. Each metric maps units to
pixels with the scaling its published protocol fixes, which is not the same for all of them:
  PCK (TAP-Vid style, 256x256):          p = (u + 1) / 2 * (res - 1)
  MSE, EPE, diversity (ATM / WHN, 128):  p = (u + 1) / 2 * res
The metrics compute in float64 and return python floats.
"""

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def to_pixels(u, size):
    """p = (u + 1) / 2 * size, in float64. PCK passes size = res - 1, the MSE family size = res."""
    return (u.double() + 1) / 2 * size


def _check_tracks(pred, gt):
    if pred.shape != gt.shape or pred.shape[-1] != 2:
        raise ValueError(f"pred and gt must both be [..., N, T, 2]; got {tuple(pred.shape)} and {tuple(gt.shape)}")


def _check_samples(pred, gt):
    """pred [..., K, N, T, 2] against gt [..., N, T, 2]."""
    if (pred.dim() != gt.dim() + 1 or gt.dim() < 3 or gt.shape[-1] != 2
            or pred.shape[:-4] != gt.shape[:-3] or pred.shape[-3:] != gt.shape[-3:]):
        raise ValueError(f"pred must be [..., K, N, T, 2] and gt [..., N, T, 2]; "
                         f"got {tuple(pred.shape)} and {tuple(gt.shape)}")


# ---------------------------------------------------------------------------------------------------------
# Reconstruction: PCK (Tables G, H; Fig. J)

def pck(pred, gt, res=256, thresholds=(1, 2, 4, 8, 16), mask=None):
    """Percentage of correct keypoints, in percent.

    pred, gt: [..., N, T, 2] in unit coordinates. mask: optional bool [..., N, T] (or broadcastable to it)
    choosing which point-frames count (e.g. visible ones); default all.
        p = (u + 1) / 2 * (res - 1)                      pixels on a res x res frame
        d[n, t] = || p_pred[n, t] - p_gt[n, t] ||_2
        delta_thr = 100 * #{(n, t) in mask : d[n, t] <= thr} / #{(n, t) in mask}
        delta_avg = mean over thresholds of delta_thr
    Returns {"delta_avg": ..., "delta_1": ..., "delta_2": ..., ...} (one key per threshold).
    """
    _check_tracks(pred, gt)
    dist = (to_pixels(pred, res - 1) - to_pixels(gt, res - 1)).norm(dim=-1)   # [..., N, T]
    if mask is None:
        mask = torch.ones_like(dist, dtype=torch.bool)
    mask = mask.to(device=dist.device, dtype=torch.bool).expand_as(dist)
    count = mask.sum()
    if count == 0:
        raise ValueError("pck: the mask selects no point-frame")
    per_threshold = {f"delta_{thr:g}": float(((dist <= thr) & mask).sum() / count * 100) for thr in thresholds}
    return {"delta_avg": sum(per_threshold.values()) / len(per_threshold), **per_threshold}


# ---------------------------------------------------------------------------------------------------------
# Trajectory prediction: MSE, EPE, diversity over K samples (Table E and the open-domain tables)

def trajectory_mse(pred, gt, res=128):
    """Min / Mean / Single / MeanT MSE over K samples (WHN protocol, as in ATM and Table E).

    pred: [..., K, N, T, 2], gt: [..., N, T, 2], unit coordinates.
        p = (u + 1) / 2 * res
        mse_k = mean over (n, t, c) of (p_pred[k, n, t, c] - p_gt[n, t, c])^2        for each sample k
        min = min_k mse_k,   mean = mean_k mse_k,   single = mse_0 (the first sample)
        meanT = mean over (n, t, c) of (mean_k p_pred[k, n, t, c] - p_gt[n, t, c])^2  (MSE of the mean)
    Each is computed per clip, then averaged over the leading batch dims. meanT <= mean by Jensen.
    """
    _check_samples(pred, gt)
    p = to_pixels(pred, res)                      # [..., K, N, T, 2]
    g = to_pixels(gt, res)                        # [..., N, T, 2]
    mse_k = ((p - g.unsqueeze(-4)) ** 2).mean(dim=(-3, -2, -1))        # [..., K]
    mse_of_mean = ((p.mean(dim=-4) - g) ** 2).mean(dim=(-3, -2, -1))   # [...]
    return {
        "min": float(mse_k.min(dim=-1).values.mean()),
        "mean": float(mse_k.mean(dim=-1).mean()),
        "single": float(mse_k[..., 0].mean()),
        "meanT": float(mse_of_mean.mean()),
    }


def endpoint_error(pred, gt, n_poked=None, res=128):
    """End-point error: L2 distance in pixels at the last frame, over the poked tracks.

    pred: [..., K, N, T, 2], gt: [..., N, T, 2], unit coordinates. The pokes are taken from the first
    n_poked tracks (Sec. A), so only those count; None = all N.
        p = (u + 1) / 2 * res
        EPE = mean over (clips, k, n < n_poked) of || p_pred[k, n, T-1] - p_gt[n, T-1] ||_2
    """
    _check_samples(pred, gt)
    n = gt.shape[-3] if n_poked is None else n_poked
    if not 1 <= n <= gt.shape[-3]:
        raise ValueError(f"endpoint_error: n_poked must be in [1, {gt.shape[-3]}], got {n_poked}")
    end_pred = to_pixels(pred[..., :n, -1, :], res)             # [..., K, n, 2]
    end_gt = to_pixels(gt[..., :n, -1, :], res).unsqueeze(-3)   # [..., 1, n, 2]
    return float((end_pred - end_gt).norm(dim=-1).mean())


def diversity(pred, res=128):
    """Mean pairwise distance between the K samples, in pixels; 0 for K = 1.

    pred: [..., K, N, T, 2], unit coordinates.
        p = (u + 1) / 2 * res
        diversity = mean over (clips, pairs k < l, n, t) of || p[k, n, t] - p[l, n, t] ||_2
    """
    if pred.dim() < 4 or pred.shape[-1] != 2:
        raise ValueError(f"diversity: pred must be [..., K, N, T, 2]; got {tuple(pred.shape)}")
    K = pred.shape[-4]
    if K == 1:
        return 0.0
    p = to_pixels(pred, res)
    first, second = torch.triu_indices(K, K, offset=1, device=pred.device)   # every unordered pair k < l once
    return float((p[..., first, :, :, :] - p[..., second, :, :, :]).norm(dim=-1).mean())


def direction_cosine(pred, gt):
    """Does one sample move the way the truth does? Cosine between the mean displacement of its tracks and the
    truth's, averaged over clips (1: the same direction, 0: unrelated, -1: opposite). Min-MSE over K samples
    rewards samples that spread over the possible directions; a policy head reads one sample.

    pred, gt: [..., N, T, 2], unit coordinates (one sample per clip).
        d = mean over n of (x[n, T-1] - x[n, 0]);   cosine = mean over clips of d_pred . d_gt / (|d_pred| |d_gt|)
    """
    _check_tracks(pred, gt)
    d_pred, d_gt = ((x[..., -1, :] - x[..., 0, :]).double().mean(-2) for x in (pred, gt))
    return float(F.cosine_similarity(d_pred, d_gt, dim=-1).mean())


# ---------------------------------------------------------------------------------------------------------
# Baselines (Sec. A: they use the same evaluation tracks as the model)

def static_baseline(start_xy, T):
    """No motion: every point stays at its start for all T frames.

    start_xy: [..., N, 2] -> [..., N, T, 2] with out[..., n, t] = start_xy[..., n].
    """
    return start_xy.unsqueeze(-2).expand(*start_xy.shape[:-1], T, 2).clone()


def nearest_neighbour_baseline(enc_tracks, query_xy):
    """Each query point copies the motion of the encoded track that starts nearest to it.

    enc_tracks: [..., N_e, T, 2] (tracks whose motion is known, e.g. the ones the VAE encoder saw);
    query_xy: [..., Q, 2] start points with the same leading dims. Returns [..., Q, T, 2]:
        j(q) = argmin_i || enc_tracks[i, 0] - query_xy[q] ||_2        (exact ties: the lowest i)
        out[q, t] = query_xy[q] + (enc_tracks[j(q), t] - enc_tracks[j(q), 0])
    Exact for a rigid translation (all tracks share one displacement).
    """
    T = enc_tracks.shape[-2]
    starts = enc_tracks[..., 0, :]                                                 # [..., N_e, 2]
    dist2 = ((query_xy.unsqueeze(-2) - starts.unsqueeze(-3)) ** 2).sum(dim=-1)    # [..., Q, N_e]
    nearest = dist2.argmin(dim=-1)                 # [..., Q]; torch.argmin returns the first minimum
    displacement = enc_tracks - enc_tracks[..., :1, :]                             # [..., N_e, T, 2]
    index = nearest[..., None, None].expand(*nearest.shape, T, 2)                  # [..., Q, T, 2]
    return query_xy.unsqueeze(-2) + displacement.gather(-3, index)


def straight_to_poke_baseline(start_xy, pokes, poke_index, T):
    """Poked points move in a straight line to their goal at constant speed, then stay; the rest stay still.

    start_xy: [..., N, 2]; pokes: [..., P, 5] = (x0, y0, x1, y1, t) with t in [0, 1] the goal time;
    poke_index: [..., P] long, which of the N points each poke moves (each point poked at most once).
    Returns [..., N, T, 2]. For a poke on point n, with goal frame f = round(t * (T - 1)) (round half to
    even, as torch.round and Python's round):
        a(j) = j / f if j < f else 1                      (f = 0: a = 1 at every frame)
        out[n, j] = (1 - a(j)) * (x0, y0) + a(j) * (x1, y1)
    so out[n, 0] = (x0, y0) for f > 0 and out[n, j] = (x1, y1) exactly for j >= f.
    Unpoked points: out[n, j] = start_xy[n].
    """
    N, P = start_xy.shape[-2], pokes.shape[-2]
    lead = start_xy.shape[:-2]
    B = math.prod(lead)
    start_xy, pokes, poke_index = start_xy.reshape(B, N, 2), pokes.reshape(B, P, 5), poke_index.reshape(B, P)
    if P > 1 and (poke_index.sort(dim=-1).values.diff(dim=-1) == 0).any():
        raise ValueError("straight_to_poke_baseline: a point is poked twice")

    frames = torch.arange(T, dtype=pokes.dtype, device=pokes.device)               # [T]
    goal_frame = torch.round(pokes[..., 4:5] * (T - 1))                            # [B, P, 1]
    a = torch.where(frames >= goal_frame, 1.0, frames / goal_frame.clamp(min=1))   # [B, P, T]
    a = a.unsqueeze(-1)                                                            # [B, P, T, 1]
    moved = (1 - a) * pokes[..., None, 0:2] + a * pokes[..., None, 2:4]            # [B, P, T, 2]

    out = static_baseline(start_xy, T).to(moved.dtype)                             # [B, N, T, 2]
    batch = torch.arange(out.shape[0], device=out.device)[:, None]                 # [B, 1]
    out[batch, poke_index] = moved
    return out.reshape(*lead, N, T, 2)


# ---------------------------------------------------------------------------------------------------------
# Time resampling (Sec. A: LIBERO windows are 16 frames, the model predicts 64)

def subsample_time(tracks, T_out):
    """Tracks [..., T_in, 2] -> [..., T_out, 2], linear in time, first and last frames kept: data.resample_time,
    the one function that also interpolates the 16-frame training windows up to 64 (data.LiberoDataset)."""
    from data import resample_time
    return resample_time(tracks, T_out)


# ---------------------------------------------------------------------------------------------------------
# Evaluation clips: windows of any source data.py reads, with the tracks each protocol uses

EVAL_SEED_TAG = 7   # synthetic evaluation clips: a seed stream that training (tag 1) and validation (tag 2) never draw


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


def autocast(device):
    """bf16 autocast on CUDA (as in training), full fp32 on CPU (STYLE.md 5)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def load_stage(loader, path, flag, device):
    """load_vae / load_planner with the command-line flag named in the error."""
    try:
        return loader(path, device=device)
    except ValueError as e:
        hint = f" (train one with: python {flag[2:]}.py)" if not os.path.exists(path) else ""
        raise ValueError(f"{flag}: {e}{hint}") from None


def evaluation_windows(source, T, seed=0, n_windows=1, synth_tracks=1024, synth_size=256):
    """(name, clip, start) for consecutive windows of T frames: the first n_windows of each clip, as a generator.

    source: "synthetic" (an endless stream of clips no training run or validation draws: seed tag 7),
    a folder of .npz clips, a .npz or .tar file, or a glob of them (data.find_clips), in sorted order.
    Unreadable and too short clips are skipped with a warning."""
    import warnings
    from data import find_clips, load_clip, load_tar_sample, make_synthetic_clip
    try:
        refs = None if source == "synthetic" else find_clips(os.fspath(source))
    except ValueError as e:
        raise ValueError(f"--data: {e}") from None

    def clips():
        index = 0
        while refs is None:
            render = "first" if n_windows == 1 else "all"
            yield f"synthetic {seed}:{index}", make_synthetic_clip(
                (seed, index, EVAL_SEED_TAG), T * n_windows, synth_size, synth_size, synth_tracks, render=render)
            index += 1
        for ref in refs:
            name = ref if isinstance(ref, str) else f"{ref[0]}:{ref[1]}"
            try:
                clip = load_clip(ref) if isinstance(ref, str) else load_tar_sample(*ref)
            except ValueError as e:
                warnings.warn(f"skipping a clip: {e}")
                continue
            yield name, clip

    def windows():
        for name, clip in clips():
            length = len(clip["tracks"])
            if length < T:
                warnings.warn(f"skipping {name}: {length} frames, a window needs {T}")
            for w in range(min(n_windows, length // T)):
                yield name, clip, w * T
    return windows()


def window_tracks(clip, start, T):
    """One window of a clip -> unit tracks [N, T, 2] (x, y), float32, and visibility [N, T] (the models' layout)."""
    from data import pixels_to_unit
    H, W = clip["video"].shape[1:3]
    tracks = clip["tracks"][start:start + T].transpose(1, 0, 2)
    return pixels_to_unit(tracks, W, H).astype("float32"), clip["visibility"][start:start + T].T


def collect(windows, make_item, count, need, max_looked=None):
    """Items made from windows until count of them are made (make_item returns None to skip a window that
    lacks what `need` says a window needs)."""
    from tqdm import tqdm
    items, skipped = [], 0
    with tqdm(total=count, desc="clips", unit="clip", leave=False) as bar:
        for looked, (name, clip, start) in enumerate(windows):
            if max_looked is not None and looked >= max_looked:
                break
            item = make_item(name, clip, start, len(items))
            if item is None:
                skipped += 1
                continue
            items.append(item)
            bar.update(1)
            if len(items) == count:
                break
    if not items:
        raise ValueError(f"--data: none of the {skipped} clip windows read has {need} (see any warnings above)")
    return items, skipped


def batches(items, size):
    for first in range(0, len(items), size):
        yield items[first:first + size]


def format_number(v):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return f"{v:,}"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    return f"{v:.2f}" if a >= 1 or a == 0 else f"{v:.3g}"


def format_table(header, rows, left=1):
    """Plain-text table: the first `left` columns left-aligned, the rest right-aligned."""
    cells = [list(header)] + [[format_number(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path, results):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------------
# python eval.py recon: reconstruction PCK of the VAE (Tables G, H)

@torch.no_grad()
def cmd_recon(args):
    """AE PCK (tracks the encoder saw) and MAE PCK (held-out tracks) over held-out clip windows, beside the
    static baseline (both sets) and the nearest-neighbour baseline (held-out tracks, from the encoded ones)."""
    import numpy as np
    from data import prepare_image
    from vae import load_vae
    device = pick_device(args.device)
    vae = load_stage(load_vae, args.vae, "--vae", device)
    cfg = vae.cfg
    T, n_enc, n_dec = cfg.n_frames, cfg.n_enc, cfg.n_dec

    def make_item(name, clip, start, index):
        tracks, visible = window_tracks(clip, start, T)
        usable = np.flatnonzero(visible[:, 0])                  # visible in the window's first frame (Sec. A)
        if len(usable) < n_enc + n_dec:
            return None
        chosen = np.random.default_rng((args.seed, index)).permutation(usable)[:n_enc + n_dec]
        return dict(image=prepare_image(clip["video"][start], cfg.image_size)[1],
                    tracks=torch.from_numpy(tracks[chosen]), visible=torch.from_numpy(visible[chosen]))

    windows = evaluation_windows(args.data, T, args.seed, 1, cfg.synth_tracks)
    items, skipped = collect(windows, make_item, args.clips, f"{n_enc + n_dec} tracks visible in its first frame",
                             max_looked=20 * args.clips + 100)
    preds = []
    from tqdm import tqdm
    for chunk in tqdm(list(batches(items, args.batch)), desc="recon", leave=False):
        image = torch.stack([it["image"] for it in chunk]).to(device)
        tracks = torch.stack([it["tracks"] for it in chunk]).to(device)
        token_mask = torch.stack([it["visible"] for it in chunk]).to(device)[:, :n_enc] if cfg.mask_occluded else None
        with autocast(device):
            mean, _ = vae.encode(image, tracks[:, :n_enc], token_mask)
            preds.append(vae.decode(mean, image, tracks[:, :, 0], T).float().cpu())
    pred = torch.cat(preds)
    gt = torch.stack([it["tracks"] for it in items])
    visible = torch.stack([it["visible"] for it in items])
    mask = visible if args.visible_only else torch.ones_like(visible)
    ae, mae = slice(0, n_enc), slice(n_enc, n_enc + n_dec)
    static = static_baseline(gt[:, :, 0], T)
    nearest = nearest_neighbour_baseline(gt[:, ae], gt[:, mae, 0])

    def score(prediction, part):
        return pck(prediction, gt[:, part], mask=mask[:, part])
    results = {"VAE": {"AE": score(pred[:, ae], ae), "MAE": score(pred[:, mae], mae)},
               "static": {"AE": score(static[:, ae], ae), "MAE": score(static[:, mae], mae)},
               "nearest_neighbour": {"MAE": score(nearest, mae)}}
    out = dict(command="recon", vae=args.vae, data=args.data, clips=len(items), skipped=skipped, seed=args.seed,
               frames=T, n_enc=n_enc, n_dec=n_dec, res=256, visible_only=args.visible_only, pck=results)
    keys = list(results["VAE"]["AE"])
    rows = [[method, f"{part} ({n_enc if part == 'AE' else n_dec})"] + [r[k] for k in keys]
            for method, parts in results.items() for part, r in parts.items()]
    print(f"recon: {args.vae} on {len(items)} windows of {T} frames from {args.data} "
          f"({skipped} skipped); PCK at 256 px{', visible points only' if args.visible_only else ''}")
    print(format_table(["method", "tracks"] + keys, rows, left=2))
    write_json(args.json, out)
    return out


# ---------------------------------------------------------------------------------------------------------
# python eval.py tracks: trajectory prediction from pokes or text (Table E, open-domain tables, Fig. K)

PROTOCOLS = {
    "open": dict(window=None, n_tracks=40),   # window = the model's frames (64 in the paper)
    "libero": dict(window=16, n_tracks=32),   # Table E: 16-frame windows, 32 non-static tracks, 128 px
}


def parse_pokes(text):
    """'1,2,4,dense' -> [1, 2, 4, 'dense']; 0 = no pokes (text only, or the null condition)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if part == "dense" or part.isdigit():
            out.append(part if part == "dense" else int(part))
        else:
            raise argparse.ArgumentTypeError(f"expected poke counts and 'dense' separated by commas, "
                                             f"e.g. 1,2,4,8,16,dense; got {text!r}")
    return out


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_steps(text):
    try:
        out = [int(s) for s in text.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive step counts separated by commas, e.g. 1,2,5,10; "
                                         f"got {text!r}")
    return out


def to_window(pred, T_window):
    """The model's frames -> the protocol's window: a 64-frame prediction is subsampled to 16 by linear
    interpolation for LIBERO (Sec. A); the identity when the counts agree. pred [..., T_model, 2]."""
    return pred if pred.shape[-2] == T_window else subsample_time(pred, T_window)


@torch.no_grad()
def cmd_tracks(args):
    """K samples per clip from the planner, decoded at the start points of the evaluation tracks:
    Min/Mean/Single/MeanT MSE over all of them and EPE over the poked ones, per poke setting and number of
    sampling steps, beside the static and straight-to-the-poke baselines on the same tracks and pokes."""
    from tqdm import tqdm
    from data import is_static, prepare_image, sample_pokes, select_eval_tracks
    from planner import PokeGuide, check_planner_matches_vae, load_planner
    from vae import load_vae
    device = pick_device(args.device)
    vae = load_stage(load_vae, args.vae, "--vae", device)
    planner = load_stage(load_planner, args.planner, "--planner", device)
    check_planner_matches_vae(planner, vae, args.planner, args.vae)
    protocol = PROTOCOLS[args.protocol]
    T_model = vae.cfg.n_frames
    T = args.window or protocol["window"] or T_model
    n_tracks = args.tracks or protocol["n_tracks"]
    if T < 2:
        raise ValueError(f"--window: a window needs at least 2 frames, got {T}")
    if args.poke_guidance < 0:
        raise ValueError(f"--poke-guidance {args.poke_guidance:g}: expected a strength >= 0 (0 = off)")
    settings = args.pokes if args.pokes is not None else ([0] if args.text else parse_pokes("1,2,4,8,16,dense"))
    counts = [n_tracks if s == "dense" else s for s in settings]
    if max(counts) > n_tracks:
        raise ValueError(f"--pokes: {max(counts)} pokes, but there are only {n_tracks} evaluation tracks per clip")
    if max(counts) > planner.cfg.max_pokes:
        print(f"note: the planner was trained with up to {planner.cfg.max_pokes} pokes; settings above that "
              f"are outside its training regime")

    def make_item(name, clip, start, index):
        tracks, visible = window_tracks(clip, start, T)
        chosen = select_eval_tracks(tracks, visible, n_tracks, seed=args.seed + index)
        if len(chosen) < n_tracks or is_static(tracks[chosen]).any():   # Sec. A: n_tracks non-static tracks
            return None
        return dict(image=prepare_image(clip["video"][start], vae.cfg.image_size)[1],
                    gt=torch.from_numpy(tracks[chosen]), text=clip["text"] or "")

    windows = evaluation_windows(args.data, T, args.seed, args.windows, vae.cfg.synth_tracks)
    items, skipped = collect(windows, make_item, args.clips, f"{n_tracks} non-static tracks visible in its first "
                             "frame", max_looked=20 * args.clips + 100)
    if args.text and not any(it["text"] for it in items):
        raise ValueError(f"--text: the clips of {args.data} carry no text")
    gt = torch.stack([it["gt"] for it in items])                                   # [clips, N, T, 2]
    K, rows = args.k, []

    def metrics(pred, n):
        """pred [clips, K, N, T, 2] -> one row's numbers."""
        row = trajectory_mse(pred, gt)
        row["epe"] = endpoint_error(pred, gt, n_poked=n) if n > 0 else None
        # the tracks nobody poked: does poking some points move the rest right? (Min-MSE over tracks n..N-1)
        row["min_unpoked"] = trajectory_mse(pred[..., n:, :, :], gt[:, n:])["min"] if n < gt.shape[1] else None
        row["diversity"] = diversity(pred)
        return row

    # Pokes from the first n evaluation tracks, to where they are at the last frame (Sec. A; a goal may lie
    # outside the frame, where the tracked point went). The baselines get the same pokes.
    poke_sets = {}
    for setting, n in zip(settings, counts):
        poke_sets[setting] = torch.stack([sample_pokes(g, n, end_t=1.0)[0] for g in gt])   # [clips, n, 5]
        baselines = {"static": static_baseline(gt[:, :, 0], T)}
        if n > 0:
            baselines["straight_to_poke"] = straight_to_poke_baseline(gt[:, :, 0], poke_sets[setting],
                                                                      torch.arange(n).expand(len(gt), n), T)
        for method, pred in baselines.items():   # one deterministic sample: K = 1
            rows.append(dict(method=method, steps=None, pokes=str(setting), n_pokes=n, **metrics(pred[:, None], n)))

    def rep(x):   # clip b's K samples are rows b*K .. b*K + K-1
        return x.repeat_interleave(K, 0)

    bar = tqdm(total=len(args.steps) * len(settings) * len(items), desc="tracks", unit="clip", leave=False)
    for steps in args.steps:
        for setting, n in zip(settings, counts):
            preds = []
            for b, chunk in enumerate(batches(list(range(len(items))), args.batch)):
                image = torch.stack([items[i]["image"] for i in chunk]).to(device)
                pokes = rep(poke_sets[setting][chunk].to(device)) if n > 0 else None
                text = [items[i]["text"] for i in chunk for _ in range(K)] if args.text else None
                # the same noise for every setting and step count: differences come from the task alone
                generator = torch.Generator().manual_seed(args.seed * 1_000_003 + b)
                with autocast(device):
                    tokens = rep(vae.image_tokens(image))   # (the K samples of a clip share its image tokens)
                    guide = None
                    if args.poke_guidance > 0 and n > 0:
                        guide = PokeGuide(planner, vae, rep(image), pokes, strength=args.poke_guidance,
                                          image_tokens=tokens)
                    z = planner.sample(rep(image), pokes=pokes, text=text, steps=steps, cfg=args.guidance,
                                       generator=generator, guide=guide)
                    pred = vae.decode(z, rep(image), rep(gt[chunk, :, 0].to(device)), T_model, image_tokens=tokens)
                preds.append(to_window(pred.float().cpu().reshape(len(chunk), K, n_tracks, T_model, 2), T))
                bar.update(len(chunk))
            rows.append(dict(method="planner", steps=steps, pokes=str(setting), n_pokes=n,
                             **metrics(torch.cat(preds), n)))
    bar.close()

    out = dict(command="tracks", vae=args.vae, planner=args.planner, data=args.data, protocol=args.protocol,
               clips=len(items), skipped=skipped, seed=args.seed, k=K, window=T, model_frames=T_model,
               n_tracks=n_tracks, res=128, text=bool(args.text), guidance=args.guidance,
               poke_guidance=args.poke_guidance, rows=rows)
    print(f"tracks ({args.protocol} protocol): {len(items)} windows of {T} frames from {args.data} ({skipped} "
          f"skipped), {n_tracks} non-static tracks each, K = {K}, MSE/EPE at 128 px"
          + (f"; the model's {T_model} frames subsampled to {T}" if T != T_model else "")
          + ("; text-conditioned" if args.text else "")
          + (f"; poke guidance {args.poke_guidance:g} (not the paper's sampler)" if args.poke_guidance > 0 else ""))
    keys = ["min", "mean", "single", "meanT", "epe", "min_unpoked", "diversity"]
    header = ["method", "steps", "pokes", "Min-MSE", "Mean-MSE", "Single-MSE", "MeanT-MSE", "EPE", "unpoked Min-MSE",
              "diversity"]
    print(format_table(header, [[r["method"], r["steps"], r["pokes"]] + [r[k] for k in keys] for r in rows]))
    write_json(args.json, out)
    return out


# ---------------------------------------------------------------------------------------------------------
# FLOPs, time and memory of one call (the speed benchmark's instruments)

def attention_flops(q_shape, k_shape, v_shape):
    """Forward FLOPs of softmax(q k^T / sqrt(E)) v from the shapes q [..., L, E], k [..., S, E], v [..., S, Ev]:
    2 L S E for q k^T plus 2 L S Ev for the weighted sum, per batch and head (softmax not counted, as the
    FLOP counter does). The backward pass costs twice this (four matmuls)."""
    batch = math.prod(q_shape[:-2])
    (L, E), S, Ev = q_shape[-2:], k_shape[-2], v_shape[-1]
    return 2 * batch * L * S * (E + Ev)


class MissedAttentionFlops(TorchFunctionMode):
    """Counts scaled_dot_product_attention calls that a FlopCounterMode left at 0 (its CPU kernels are not in
    the counter's table; the CUDA ones are), from the shapes; the backward pass when it runs."""

    def __init__(self, counter):
        super().__init__()
        self.counter, self.flops = counter, 0

    def _add(self, flops):
        def hook(grad):
            self.flops += flops
        return hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        before = self.counter.get_total_flops()
        out = func(*args, **kwargs)
        if self.counter.get_total_flops() == before:
            q, k, v = (args[i] if i < len(args) else kwargs[name] for i, name in enumerate(("query", "key", "value")))
            forward = attention_flops(q.shape, k.shape, v.shape)
            self.flops += forward
            if out.requires_grad:
                out.register_hook(self._add(2 * forward))
        return out


def count_flops(fn):
    """Run fn() once and count its FLOPs: torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions,
    attention where it knows the kernel) plus the attention FLOPs it missed, from the shapes.
    Returns (fn's result, total FLOPs, the part added for missed attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, MissedAttentionFlops(counter) as missed:
        result = fn()
    return result, counter.get_total_flops() + missed.flops, missed.flops


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def reset_peak_memory(device):
    """Start a new peak-memory window; returns the memory in use now, in MB. CUDA: allocated tensors. CPU: the
    process's resident set (Linux: writing 5 to /proc/self/clear_refs resets its high-water mark)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS") / 1024
    except OSError:
        return peak_memory(device)


def peak_memory(device):
    """The highest memory in use since reset_peak_memory, in MB (without /proc: the process's lifetime peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return _status_kb("VmHWM") / 1024
    except OSError:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def cpu_name():
    """The CPU's model name (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, budget_s=2.0, long_s=3.0, max_runs=50):
    """Time, FLOPs and peak memory of fn(). The first call counts FLOPs and is the warm-up; then fn runs
    again until about budget_s has passed (at least once, at most max_runs times) and the median time is
    kept. A first call of long_s or more is timed as it is (the counter's overhead is small beside it)."""
    gc.collect()
    base = reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    _, flops, missed = count_flops(fn)
    synchronize(device)
    first = time.perf_counter() - start
    peak, times = peak_memory(device), []
    if first < long_s:
        peak = 0.0
        for _ in range(int(min(max_runs, max(1, budget_s // max(first, 1e-9))))):
            base = min(base, reset_peak_memory(device))
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
            peak = max(peak, peak_memory(device))
    seconds = statistics.median(times) if times else first
    return dict(s=seconds, runs=len(times) or 1, flops=flops, attention_flops_added=missed, peak_mb=peak,
                extra_mb=max(0.0, peak - base))


def matmul_flops_per_s(device, n=None, runs=5):
    """FLOP/s of one plain square matmul (fp32 on CPU, bf16 on CUDA): the MFU's reference, measured in the run."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for i in range(runs + 2):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def linear_extrapolation(m1, x1, m2, x2, x):
    """Measurements m1, m2 (dicts from measure) of one operation at sizes x1 < x2 -> its value at size x,
    per field, on the line through the two points: for FLOPs exact when the cost is affine in the size."""
    out = {}
    for key in ("s", "flops", "attention_flops_added", "peak_mb", "extra_mb"):
        slope = (m2[key] - m1[key]) / (x2 - x1)
        out[key] = m2[key] + slope * (x - x2)
    return out


# ---------------------------------------------------------------------------------------------------------
# python eval.py speed: the speed benchmark (efficiency claim; Sec. C dense decoding; Fig. K)

class SpeedBench:
    """Runs and collects the rows of the speed benchmark on one device."""

    def __init__(self, device, budget_s=2.0, long_s=3.0, max_row_s=60.0, extrapolate="auto", only=None,
                 matmul_size=None):
        self.device, self.budget_s, self.long_s = device, budget_s, long_s
        self.max_row_s, self.extrapolate, self.only = max_row_s, extrapolate, only
        self.rows = []
        print("measuring a plain matmul ...", file=sys.stderr)
        self.matmul = matmul_flops_per_s(device, matmul_size)

    def wanted(self, key):
        return self.only is None or key in self.only

    def measure(self, fn):
        return measure(fn, self.device, self.budget_s, self.long_s)

    def too_long(self, estimated_s):
        """Whether a full measurement is replaced by the extrapolation (--extrapolate: always|never|auto)."""
        return self.extrapolate == "always" or (self.extrapolate == "auto" and estimated_s > self.max_row_s)

    def add(self, key, name, m, samples, frames=None, point_frames=None, note=""):
        s = m["s"]
        row = dict(key=key, name=name, ms=1000 * s, runs=m.get("runs"), samples_per_s=samples / s,
                   frames_per_s=frames / s if frames else None,
                   point_frames_per_s=point_frames / s if point_frames else None,
                   peak_mb=m["peak_mb"], extra_mb=m["extra_mb"], flops=m["flops"],
                   attention_flops_added=m["attention_flops_added"], flops_per_s=m["flops"] / s,
                   mfu=m["flops"] / s / self.matmul, note=note)
        self.rows.append(row)
        print(f"  {name}: {1000 * s:.1f} ms{' (' + note + ')' if note else ''}", file=sys.stderr)
        return row


def inference(fn, device):
    """fn as it runs at inference: without gradients, in the device's precision."""
    def run():
        with torch.no_grad(), autocast(device):
            return fn()
    return run


def vae_speed_rows(bench, cfg, B, T, dense_sizes, parts=None):
    """Rows of the track VAE: encode, decode, dense decodes, a training step (cfg: a VAEConfig)."""
    from vae import TrackVAE
    device = bench.device
    n_enc, n_points, S = cfg.n_enc, cfg.n_enc + cfg.n_dec, cfg.image_size
    g = torch.Generator().manual_seed(0)
    image = torch.randn(B, 3, S, S, generator=g).to(device)
    tracks = (torch.rand(B, n_points, T, 2, generator=g) * 2 - 1).to(device)
    vae = TrackVAE(cfg, pretrained=False).to(device).eval()
    z = torch.randn(B, vae.n_latents, cfg.latent_channels, generator=g).to(device)

    if bench.wanted("encode"):
        m = bench.measure(inference(lambda: vae.encode(image, tracks[:, :n_enc]), device))
        bench.add("encode", f"VAE encode ({n_enc} tracks x {T} frames)", m, B, B * T, B * n_enc * T)
    if bench.wanted("decode"):
        m = bench.measure(inference(lambda: vae.decode(z, image, tracks[:, :, 0], T), device))
        bench.add("decode", f"VAE decode ({n_points} points)", m, B, B * T, B * n_points * T)
    dense = [(h, w) for h, w in dense_sizes if bench.wanted(f"dense{h}")]
    if dense:
        # Dense decoding = a fixed part (image tokens, the latents' pass through the decoder) + the query points
        # in chunks: affine in the number of points, with a per-chunk term (the image keys and values).
        import inspect
        chunk = inspect.signature(vae.decode_dense).parameters["chunk"].default
        # the measured parts: a few points on a CPU, where a point costs a lot; whole chunks on a GPU
        parts = parts or ((8, 16) if device.type == "cpu" else (chunk // 2, chunk))
        fixed = bench.measure(inference(lambda: vae.decoder_context(z, vae.image_tokens(image)), device))
        with torch.no_grad(), autocast(device):
            ctx = vae.image_tokens(image)
            kvs = vae.decoder_context(z, ctx)
        part = {}
        for P in parts:
            q = (torch.rand(B, P, 2, generator=g) * 2 - 1).to(device)
            part[P] = bench.measure(inference(lambda: vae.decode_queries(kvs, ctx, q, T), device))
        (P1, m1), (P2, m2) = sorted(part.items())
        per_point = {k: (m2[k] - m1[k]) / (P2 - P1) for k in ("flops", "attention_flops_added")}
        for h, w in dense:
            n = h * w
            est = {k: fixed[k] + math.ceil(n / chunk) * (m1[k] - P1 * per_point[k]) + n * per_point[k]
                   for k in per_point}
            # time at the FLOP rate the measured chunk reached
            est["s"] = fixed["s"] + m2["s"] * (est["flops"] - fixed["flops"]) / m2["flops"]
            name = f"VAE decode_dense {h}x{w} ({n} points)"
            if bench.too_long(est["s"]):
                est.update(runs=None, peak_mb=max(fixed["peak_mb"], m2["peak_mb"]),
                           extra_mb=max(fixed["extra_mb"], m2["extra_mb"]))
                note = (f"extrapolated from the fixed part and chunks of {P1} and {P2} of {n} points; "
                        f"memory of the measured parts")
                bench.add(f"dense{h}", name, est, B, B * T, B * n * T, note)
            else:
                m = bench.measure(inference(lambda: vae.decode_dense(z, image, h, w), device))
                bench.add(f"dense{h}", name, m, B, B * T, B * n * T)
    del vae
    if bench.wanted("train_vae"):
        visible = torch.ones(B, n_points, T, dtype=torch.bool, device=device)

        def step_of(layers):
            if layers is not None:
                cfg_l = dataclasses.replace(cfg, enc_layers=layers, dec_layers=layers)
            model = TrackVAE(cfg if layers is None else cfg_l, pretrained=False).to(device)
            model.train()
            model.image_encoder.requires_grad_(not cfg.freeze_image_encoder)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                    betas=(cfg.beta1, cfg.beta2))

            def step():
                with autocast(device):
                    loss = model(image, tracks, visible)["loss"]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step

        name = f"VAE training step (batch {B}, {n_enc} + {cfg.n_dec} tracks)"
        train_row(bench, "train_vae", name, step_of, cfg.enc_layers if cfg.enc_layers == cfg.dec_layers else None,
                  B, B * T, B * n_points * T)


def train_row(bench, key, name, step_of, layers, samples, frames, point_frames):
    """A training step's row: the full model, or (when that would take too long) the same step with 1 and 2
    layers per stack, taken to the real number of layers. The layers are identical, so FLOPs and memory lie
    on the line through the two (exactly, for FLOPs; with 0 layers parts of the model would get no gradient,
    so the line starts at 1); the time is the FLOPs at the 2-layer step's FLOP rate (a difference of two
    timings is too noisy on a shared machine)."""
    if layers is not None and layers > 2 and bench.extrapolate != "never":
        m1 = bench.measure(step_of(1))
        m2 = bench.measure(step_of(2))
        est = linear_extrapolation(m1, 1, m2, 2, layers)
        est["s"] = m2["s"] * est["flops"] / m2["flops"]
        if bench.too_long(est["s"]):
            est["runs"] = None
            return bench.add(key, name, est, samples, frames, point_frames,
                             f"extrapolated from the same step with 1 and 2 of {layers} layers per stack")
    return bench.add(key, name, bench.measure(step_of(None)), samples, frames, point_frames)


def planner_speed_rows(bench, pcfg, vcfg, B, T, steps):
    """Rows of the motion planner: one velocity evaluation, a full sample, a training step (whose VAE encode of
    the clip, frozen, is part of the step as in training)."""
    from planner import MotionPlanner, make_planner_loss
    from vae import TrackVAE
    device = bench.device
    S, P = pcfg.image_size, pcfg.max_pokes
    g = torch.Generator().manual_seed(1)
    image = torch.randn(B, 3, S, S, generator=g).to(device)
    pokes = (torch.rand(B, P, 5, generator=g) * 2 - 1).to(device)
    pokes[..., 4] = pokes[..., 4].abs()
    planner = MotionPlanner(pcfg, pretrained=False).to(device).eval()
    x = torch.randn(B, planner.n_latents, pcfg.latent_channels, generator=g).to(device)
    t = torch.full((B,), 0.5, device=device)
    rows = {}

    if bench.wanted("velocity"):
        with torch.no_grad(), autocast(device):
            cond = planner.conditions(image, pokes)
        m = bench.measure(inference(lambda: planner.velocity(x, t, cond), device))
        rows["velocity"] = bench.add("velocity", f"planner velocity (1 network evaluation, {P} pokes)", m, B)
    if bench.wanted("sample"):
        m = bench.measure(inference(lambda: planner.sample(image, pokes, steps=steps, generator=torch.Generator()),
                                    device))
        rows["sample"] = bench.add("sample", f"planner sample ({steps} steps, latents of {T} frames)", m, B, B * T)
    del planner
    if bench.wanted("train_planner"):
        vae = TrackVAE(vcfg, pretrained=False).to(device).eval()
        vae.requires_grad_(False)
        batch = dict(image=image, tracks=(torch.rand(B, vcfg.n_enc + vcfg.n_dec, T, 2, generator=g) * 2 - 1).to(device),
                     text=[""] * B)

        def step_of(layers):
            cfg = pcfg if layers is None else dataclasses.replace(pcfg, layers=layers)
            model = MotionPlanner(cfg, pretrained=False).to(device)
            model.train()
            model.image_encoder.requires_grad_(not cfg.freeze_image_encoder)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                    betas=(cfg.beta1, cfg.beta2))
            loss_fn = make_planner_loss(model, vae, cfg)

            def step():
                with autocast(device):
                    loss, _ = loss_fn(model, batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step

        train_row(bench, "train_planner", f"planner training step (batch {B}, incl. the frozen VAE encode)",
                  step_of, pcfg.layers, B, B * T, None)
    return rows


def speed_configs(preset):
    """The VAE and planner configs of a preset, the planner's latent space and frames matched to the VAE's."""
    from planner import PRESETS as PLANNER_PRESETS, VAE_FIELDS, PlannerConfig
    from vae import PRESETS as VAE_PRESETS, VAEConfig
    if preset not in VAE_PRESETS or preset not in PLANNER_PRESETS:
        raise ValueError(f"--preset: unknown preset {preset!r}; choose from {sorted(VAE_PRESETS)}")
    vcfg = dataclasses.replace(VAEConfig(), preset=preset, **VAE_PRESETS[preset])
    pcfg = dataclasses.replace(PlannerConfig(), preset=preset, **PLANNER_PRESETS[preset])
    return vcfg, dataclasses.replace(pcfg, **{f: getattr(vcfg, f) for f in VAE_FIELDS})


SPEED_HEADER = ["operation", "ms", "runs", "samples/s", "frames/s", "point-frames/s", "peak MB", "+MB", "GFLOP",
                "GFLOP/s", "MFU %"]


def cmd_speed(args):
    """Median time, throughput, peak memory, FLOPs, achieved FLOP/s and MFU of every operation of both stages
    at a preset's sizes, with random weights (no checkpoint, no download)."""
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vcfg, pcfg = speed_configs(args.preset)
    T, B = vcfg.n_frames, args.batch
    only = None if args.rows is None else set(args.rows.split(","))
    unknown = (only or set()) - set(SPEED_ROWS)
    if unknown:
        raise ValueError(f"--rows: unknown {sorted(unknown)}; choose from {', '.join(SPEED_ROWS)}")
    long_s = args.long if args.long is not None else (3.0 if device.type == "cpu" else math.inf)
    bench = SpeedBench(device, args.budget, long_s, args.max_row_s, args.extrapolate, only, args.matmul_size)
    start = time.time()
    vae_speed_rows(bench, vcfg, B, T, ((64, 64), (224, 224)))
    planner_rows = planner_speed_rows(bench, pcfg, vcfg, B, T, args.sample_steps)
    decode = next((r for r in bench.rows if r["key"] == "decode"), None)
    if "sample" in planner_rows and decode is not None:
        # the paper's "timesteps per second": a sample decoded at the clip's points, frames predicted per second
        sample, n_points = planner_rows["sample"], vcfg.n_enc + vcfg.n_dec
        s = (sample["ms"] + decode["ms"]) / 1000
        flops = sample["flops"] + decode["flops"]
        bench.rows.append(dict(key="generate", name=f"generate = sample + decode {n_points} points (sum of rows)",
                               ms=1000 * s, runs=None, samples_per_s=B / s, frames_per_s=B * T / s,
                               point_frames_per_s=B * n_points * T / s,
                               peak_mb=max(sample["peak_mb"], decode["peak_mb"]),
                               extra_mb=max(sample["extra_mb"], decode["extra_mb"]), flops=flops,
                               attention_flops_added=sample["attention_flops_added"] + decode["attention_flops_added"],
                               flops_per_s=flops / s, mfu=flops / s / bench.matmul, note="sum of the two rows"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    out = dict(command="speed", preset=args.preset, device=str(device), device_name=name,
               threads=torch.get_num_threads(), torch=torch.__version__, batch=B, frames=T, n_enc=vcfg.n_enc,
               n_points=vcfg.n_enc + vcfg.n_dec, sample_steps=args.sample_steps,
               precision="bf16 autocast" if device.type == "cuda" else "fp32",
               matmul_flops_per_s=bench.matmul, load_average=load, wall_s=time.time() - start, rows=bench.rows)
    print(f"speed: preset {args.preset}, {out['device']} ({out['device_name']}, {out['threads']} threads, "
          f"{out['precision']}), batch {B}, {T} frames, {vcfg.n_enc} tracks encoded, {out['n_points']} points "
          f"decoded; random weights; reference matmul {bench.matmul / 1e9:.1f} GFLOP/s"
          + (f"; load average {load:.1f} at the end" if load is not None else ""))
    print(format_table(SPEED_HEADER, [[r["name"], r["ms"], r["runs"], r["samples_per_s"], r["frames_per_s"],
                                       r["point_frames_per_s"], r["peak_mb"], r["extra_mb"], r["flops"] / 1e9,
                                       r["flops_per_s"] / 1e9, 100 * r["mfu"]] for r in bench.rows]))
    notes = [f"  {r['name']}: {r['note']}" for r in bench.rows if r["note"]]
    if notes:
        print("notes:\n" + "\n".join(notes))
    print(f"frames/s: predicted frames per second (the paper's timesteps per second; encode and training rows: "
          f"frames taken in); point-frames/s: points x frames; peak MB: "
          f"{'max allocated' if device.type == 'cuda' else 'peak resident set of the process'}, +MB: above the "
          f"start of the row; MFU: achieved FLOP/s / the reference matmul's. Wall time {out['wall_s']:.0f} s.")
    write_json(args.json, out)
    return out


SPEED_ROWS = ("encode", "decode", "dense64", "dense224", "train_vae", "velocity", "sample", "train_planner")


# ---------------------------------------------------------------------------------------------------------
# Command line

def robot_state(ep, t):
    """The exact state of frame t of a robot episode (data.robot_episode), as features: where the gripper, both
    blocks and the target's goal are, how open the fingers are, the instruction (verb, direction) and the step."""
    import numpy as np
    import data
    verb, *_, move = ep["text"].split()
    g, blocks = ep["gripper"][t], ep["blocks"][t]
    return np.array([*(g / 64 - 1), *(blocks.reshape(-1) / 64 - 1), *((blocks[0] - g) / 32),
                     *((ep["goal"] - blocks[0]) / 32), ep["open"][t], verb == "push",
                     *[move == m for m in data.ROBOT_MOVES], t / 100], np.float32)


def fit(net, predict, inputs, target, steps, batch_size, lr, desc):
    """The robot-ceiling regressors' training: random batches of (inputs, target), the L2 loss of predict(*inputs),
    AdamW at lr with a cosine decay over steps."""
    from tqdm import tqdm
    opt = torch.optim.AdamW(net.parameters(), lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in tqdm(range(steps), desc=desc, unit="step"):
        batch = torch.randint(len(target), (batch_size,))
        loss = F.mse_loss(predict(*(x[batch] for x in inputs)), target[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()


def cmd_robot_ceiling(args):
    """How much of the actions that follow a window's start frame that frame decides, on the robot task (python
    data.py robot): an MLP given the exact state of the start frame (robot_state: no perception to learn)
    regresses the 16 actions that follow, trained on the training demos, scored on the held-out ones (the demos
    and the split of `python data.py robot --n N --seed S` and LiberoDataset, windows every --stride frames as
    policy.py evaluates them, the last action repeated past the end). A policy head reading plans made from that
    frame can at best approach this ratio. --frames PLANNER adds the bound that the planner's own perception sets
    (frames_ceiling): the same head as the policy's, reading the planner's inputs instead of its plans."""
    import numpy as np
    import data
    from tqdm import tqdm
    torch.manual_seed(args.seed)
    # demo i of `python data.py robot` is seeded (seed, i) (make_robot_demo); the episode is its first draw
    episodes = [data.robot_episode((args.seed, i), (args.min_frames, args.max_frames))
                for i in tqdm(range(args.n), desc="episodes", unit="ep")]
    held_out = data.libero_held_out(args.n)  # LiberoDataset's split of that folder

    def windows(split, stride, window):  # starts as LiberoDataset(split, window=window) has them: T - window + 1
        x, y = [], []
        for i, ep in enumerate(episodes):
            if (i in held_out) == (split == "val"):
                T = len(ep["actions"])
                for t in range(0, T - window + 1, stride):
                    x.append(robot_state(ep, t))
                    y.append(ep["actions"][np.minimum(np.arange(t, t + 16), T - 1)].reshape(-1))
        return torch.from_numpy(np.stack(x)), torch.from_numpy(np.stack(y))
    (x, y), (x_val, y_val) = windows("train", 1, 16), windows("val", args.stride, args.stride)  # as policy.py
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 512), torch.nn.GELU(), torch.nn.Linear(512, 512),
                              torch.nn.GELU(), torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.Linear(512, y.shape[1]))
    fit(net, net, (x,), y, args.steps, 256, 1e-3, "state MLP")
    with torch.no_grad():
        errors = {"state MLP": (net(x_val) - y_val).pow(2).view(-1, 16, 7).mean((0, 1)),
                  "mean action": (y.mean(0) - y_val).pow(2).view(-1, 16, 7).mean((0, 1))}
    if args.frames:
        errors[f"frames ({args.frames})"] = frames_ceiling(args, y_val.view(-1, 16, 7))
    results = {name: dict(mse=e.mean().item(), move=e[:2].mean().item(), gripper=e[6].item())
               for name, e in errors.items()}
    base = results["mean action"]["mse"]
    print(f"{len(x)} training windows, {len(x_val)} held-out windows (every {args.stride} frames):")
    print(format_table(["predictor", "action MSE", "vs the mean action", "dims 0-1", "gripper"],
                       [[name, r["mse"], f"{base / r['mse']:.2f}x", r["move"], r["gripper"]]
                        for name, r in results.items()]))
    write_json(args.json, results)
    return results


def frames_ceiling(args, held_out_actions):
    """robot-ceiling --frames PLANNER: policy.FramesHead, the policy head reading the planner's inputs (its locked
    image encoder's tokens of both start frames, the task embedding, the timestep) instead of its plans, trained
    as the tiny policy head is (its pool of training windows of --data, batch 32, AdamW 1e-3, --frames-steps) and
    scored on the same held-out windows. -> the action MSE per dimension [7]."""
    import data
    import policy
    from tqdm import tqdm
    planner = policy.frozen_planner(args.frames)
    cfg = policy.PolicyConfig(**policy.PRESETS["tiny"])
    cfg = dataclasses.replace(cfg, data=args.data, eval_stride=args.stride, seed=planner.cfg.seed)
    held_out = policy.eval_windows(cfg, planner.cfg)
    if not torch.equal(held_out["actions"], held_out_actions):
        raise ValueError(f"--data {args.data}: its held-out windows are not those of robot_episode with --n {args.n} "
                         f"--seed {args.seed} (was it made by python data.py robot with these?)")
    base = data.LiberoDataset(args.data, "train", n_frames=planner.cfg.n_frames, window=planner.cfg.window,
                              n_tracks=1, image_size=planner.cfg.image_size, action_chunk=16, seed=cfg.seed)
    items = [base[i] for i in tqdm(range(min(cfg.latent_pool, len(base))), desc="training windows", unit="window")]

    def inputs(image, task_emb, timestep):  # the frozen encoder's tokens, in batches
        with torch.no_grad():
            features = torch.cat([policy.frame_features(planner.image_encoder, part) for part in image.split(64)])
        return features, task_emb, timestep
    train_inputs = inputs(*(torch.stack([it[k] for it in items]) for k in ("image", "task_emb", "timestep")))
    actions = torch.stack([it["actions"] for it in items])
    net = policy.FramesHead(cfg, planner.cfg)
    net.head.action_mean.copy_(actions.flatten(0, 1).mean(0))
    net.head.action_std.copy_(actions.flatten(0, 1).std(0).clamp(min=1e-6))
    fit(net, net.actions, train_inputs, actions, args.frames_steps, cfg.micro_batch, cfg.lr, "frames head")
    with torch.no_grad():
        pred = net.actions(*inputs(held_out["image"], held_out["task_emb"], held_out["timestep"]))
    return (pred - held_out_actions).pow(2).mean((0, 1))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate the track VAE and the motion planner: the paper's "
                                     "protocols and a speed benchmark.")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(p, planner):
        p.add_argument("--vae", default="out/tiny/vae/ckpt.pt", help="VAE checkpoint (vae.py)")
        if planner:
            p.add_argument("--planner", default="out/tiny/planner/ckpt.pt", help="planner checkpoint (planner.py)")
        p.add_argument("--data", default="synthetic", help="'synthetic' (clips no training run saw), a folder of "
                       ".npz clips, a .tar shard or a glob of shards")
        p.add_argument("--clips", type=positive_int, default=64, help="clip windows to evaluate")
        p.add_argument("--seed", type=int, default=0, help="synthetic clips and track choice")
        p.add_argument("--device", default="auto", help="cpu, cuda or auto")
        p.add_argument("--json", help="write the numbers to this file")

    formatting = dict(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p = commands.add_parser("recon", help="reconstruction PCK of the VAE on AE and MAE points (Tables G, H)",
                            description=cmd_recon.__doc__, **formatting)
    common(p, planner=False)
    p.add_argument("--batch", type=positive_int, default=8, help="clips per forward pass")
    p.add_argument("--visible_only", action="store_true", help="PCK over visible point-frames only")
    p.set_defaults(run=cmd_recon)

    p = commands.add_parser("tracks", help="trajectory MSE / EPE of the planner and baselines (Table E, Fig. K)",
                            description=cmd_tracks.__doc__, **formatting)
    common(p, planner=True)
    p.add_argument("--k", type=positive_int, default=8, help="samples per clip (Table E: 8)")
    p.add_argument("--pokes", type=parse_pokes, default=None, help="poke counts, 'dense' = all evaluation tracks, "
                   "0 = none (default 1,2,4,8,16,dense; with --text: 0)")
    p.add_argument("--text", action="store_true", help="condition on each clip's text")
    p.add_argument("--steps", type=parse_steps, default=[10], help="sampling steps, e.g. 1,2,5,10,20,50 (Fig. K)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--poke-guidance", type=float, default=0.0,
                   help="strength of planner.PokeGuide, our sampling-time addition (0 = the paper's sampler; "
                   "sample.py uses 0.5)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="open",
                   help="open: the model's frames, 40 tracks; libero: 16-frame windows, 32 tracks (Table E)")
    p.add_argument("--window", type=positive_int, help="frames per evaluation window (overrides the protocol)")
    p.add_argument("--tracks", type=positive_int, help="evaluation tracks per window (overrides the protocol)")
    p.add_argument("--windows", type=positive_int, default=1, help="consecutive windows per clip")
    p.add_argument("--batch", type=positive_int, default=4, help="clips per sampling batch (x K samples)")
    p.set_defaults(clips=32)   # (K samples x every poke setting: 32 clips take a few minutes for the tiny models)
    p.set_defaults(run=cmd_tracks)

    p = commands.add_parser("speed", help="time, FLOPs, memory and MFU of every operation (efficiency claim)",
                            description=cmd_speed.__doc__, **formatting)
    p.add_argument("--preset", default="tiny", help="tiny or paper (the sizes of vae.py's and planner.py's presets)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--batch", type=positive_int, default=1, help="samples per call")
    p.add_argument("--threads", type=positive_int, help="CPU threads (torch.set_num_threads; default: torch's)")
    p.add_argument("--sample_steps", type=positive_int, default=10, help="Euler steps of the full sample (Fig. K: 10)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed repeats per row")
    p.add_argument("--long", type=float, default=None,
                   help="a first call this long (s) is its own timing (default: 3 on CPU; CUDA always re-times)")
    p.add_argument("--max_row_s", type=float, default=60.0, help="extrapolate rows estimated to take longer (s)")
    p.add_argument("--extrapolate", choices=("auto", "always", "never"), default="auto",
                   help="dense decodes and training steps: from a measured part when too long (auto), always, never")
    p.add_argument("--matmul_size", type=positive_int, default=None,
                   help="side of the reference matmul (default 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--rows", default=None, help=f"only these rows, comma-separated: {','.join(SPEED_ROWS)}")
    p.add_argument("--json", help="write the numbers to this file")
    p.set_defaults(run=cmd_speed)

    p = commands.add_parser("robot-ceiling", help="what the start frame decides of the actions (robot task)",
                            description=cmd_robot_ceiling.__doc__, **formatting)
    p.add_argument("--n", type=positive_int, default=640, help="demos (as python data.py robot --n)")
    p.add_argument("--seed", type=int, default=0, help="as python data.py robot --seed")
    p.add_argument("--min-frames", type=positive_int, default=64, help="as python data.py robot")
    p.add_argument("--max-frames", type=positive_int, default=96, help="as python data.py robot")
    p.add_argument("--stride", type=positive_int, default=8, help="a held-out window every this many frames")
    p.add_argument("--steps", type=positive_int, default=3000, help="training steps of the MLP (batch 256)")
    p.add_argument("--frames", help="also train policy.FramesHead on this LIBERO planner's inputs (checkpoint)")
    p.add_argument("--data", default="data/robot", help="with --frames: the demos of python data.py robot")
    p.add_argument("--frames-steps", type=positive_int, default=2000, help="with --frames: training steps (batch 32)")
    p.add_argument("--json", help="write the numbers to this file")
    p.set_defaults(run=cmd_robot_ceiling)

    args = parser.parse_args(argv)
    try:
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_progress_bar()   # (the text encoder's "Loading weights" bar)
    except ImportError:
        pass
    try:
        return args.run(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
