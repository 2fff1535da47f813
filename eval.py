"""Evaluation: the metrics and baselines of the paper's protocols (DESIGN.md, "Evaluation protocols").

This file holds two kinds of code:
  1. metric functions and baselines, pure torch, importable anywhere (tests, training logs, notebooks);
  2. command functions, run from the command line:
         python eval.py recon    # reconstruction PCK of the track VAE, AE and MAE points (Tables G, H)
         python eval.py tracks   # trajectory MSE / EPE / diversity of the planner and baselines (Table E)
         python eval.py speed    # predicted frames per second (the efficiency claim)
     They are not written yet (issue 5). When they are, each imports the stage it needs (vae.py,
     planner.py, data.py) inside itself, so that importing eval.py never builds or loads a model.

Conventions. Every input is in unit coordinates: (x, y) in [-1, 1] over the frame, x first. Track
tensors are [..., N, T, 2] (tracks first, then time); K samples of them are [..., K, N, T, 2]. A leading
"..." is any number of batch dimensions (clips); the metrics average over them. Each metric maps units to
pixels with the scaling its published protocol fixes, which is not the same for all of them:
  PCK (TAP-Vid style, 256x256):          p = (u + 1) / 2 * (res - 1)
  MSE, EPE, diversity (ATM / WHN, 128):  p = (u + 1) / 2 * res
The metrics compute in float64 and return python floats.
"""

import argparse
import sys

import torch


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
    start_xy, pokes, poke_index = start_xy.reshape(-1, N, 2), pokes.reshape(-1, P, 5), poke_index.reshape(-1, P)
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
    """Resample tracks [..., T_in, 2] to [..., T_out, 2] by linear interpolation in time.

    Output frame j sits at source time s_j = j * (T_in - 1) / (T_out - 1), so the first and last frames
    are kept exactly (used for LIBERO 64 -> 16 at evaluation and 16 -> 64 for training). With
    i = min(floor(s_j), T_in - 2) and w = s_j - i:
        out[..., j, :] = (1 - w) * tracks[..., i, :] + w * tracks[..., i + 1, :]
    Exact (up to rounding) for motion linear in time; the identity when T_out = T_in.
    """
    T_in = tracks.shape[-2]
    if T_in < 2 or T_out < 2 or tracks.shape[-1] != 2:
        raise ValueError(f"subsample_time: need tracks [..., T_in >= 2, 2] and T_out >= 2; "
                         f"got {tuple(tracks.shape)} and T_out = {T_out}")
    s = torch.arange(T_out, dtype=torch.float64, device=tracks.device) * (T_in - 1) / (T_out - 1)
    i = s.floor().long().clamp(max=T_in - 2)     # the last frame interpolates (T_in-2, T_in-1) with w = 1
    w = (s - i).to(tracks.dtype).unsqueeze(-1)   # [T_out, 1]
    return (1 - w) * tracks[..., i, :] + w * tracks[..., i + 1, :]


# ---------------------------------------------------------------------------------------------------------
# Commands (issue 5)

def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate the track VAE and the motion planner.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("recon", help="reconstruction PCK of the VAE on AE and MAE points (Tables G, H)")
    commands.add_parser("tracks", help="trajectory MSE, EPE and diversity of the planner and baselines (Table E)")
    commands.add_parser("speed", help="predicted frames per second of sampling (efficiency claim)")
    args = parser.parse_args(argv)
    print(f"eval.py {args.command}: not implemented yet: see issue 5")
    return 2


if __name__ == "__main__":
    sys.exit(main())
