"""The paper's metrics, baselines and protocols (Sec. A), one place each; training's validation reuses them. Inputs are
unit (x, y) tracks [..., N, T, 2], K samples [..., K, N, T, 2]; PCK at 256 px, MSE / EPE at 128 px (README).

    python3 eval.py recon                                     # AE / MAE reconstruction PCK (Tables G, H)
    python3 eval.py tracks --pokes 1,4,16,dense --steps 1,10  # Min/Mean/Single/MeanT MSE, EPE, K = 8 (Sec. A; Fig. K)
    python3 eval.py libero --planner out/tiny/planner-libero/ckpt.pt   # Table E on held-out LIBERO windows
    python3 eval.py speed --preset tiny                       # the speed benchmark: bench.py, its flags"""
import argparse, itertools, json, os, sys, warnings

import numpy as np
import torch
from tqdm import tqdm

from data import (SPLITS, check_output, find_clips, is_static, load_ref, make_synthetic_clip, pixels_to_unit,
                  prepare_image, sample_pokes, select_eval_tracks, track_picture, write_atomically)
from libero import VIEWS, LiberoDataset, resample_time
from planner import PokeGuide, load_pair
from trainer import autocast, set_threads
from vae import load_vae

def to_pixels(u, size):
    return (u.double() + 1) / 2 * size

def pck(pred, gt, res=256, thresholds=(1, 2, 4, 8, 16), mask=None):
    """PCK (Tables G, H): pred, gt [..., N, T, 2] -> {delta_thr: % of mask's point-frames within thr px, delta_avg}."""
    assert pred.shape == gt.shape and gt.shape[-1] == 2, f"pred {list(pred.shape)} and gt {list(gt.shape)}"
    dist = (to_pixels(pred, res - 1) - to_pixels(gt, res - 1)).norm(dim=-1)
    mask = torch.ones_like(dist, dtype=torch.bool) if mask is None else mask.to(dist.device).bool().expand_as(dist)
    assert mask.any(), "pck: the mask selects no point-frame"
    out = {f"delta_{thr:g}": float(((dist <= thr) & mask).sum() / mask.sum() * 100) for thr in thresholds}
    return {"delta_avg": sum(out.values()) / len(out), **out}

def trajectory_mse(pred, gt, res=128):
    """Min / Mean / Single (k = 0) / MeanT (mean path) MSE (WHN, Table E): pred [..., K, N, T, 2], gt [..., N, T, 2]."""
    assert pred.dim() == gt.dim() + 1 and pred.shape[-3:] == gt.shape[-3:], f"pred {list(pred.shape)} gt {gt.shape}"
    p, g = to_pixels(pred, res), to_pixels(gt, res)
    mse_k = ((p - g.unsqueeze(-4)) ** 2).mean(dim=(-3, -2, -1))
    return dict(min=float(mse_k.min(-1).values.mean()), mean=float(mse_k.mean()), single=float(mse_k[..., 0].mean()),
                meanT=float(((p.mean(-4) - g) ** 2).mean(dim=(-3, -2, -1)).mean()))

def endpoint_error(pred, gt, n_poked=None, res=128):
    """EPE: mean over (clips, k, n < n_poked) of |p_pred[k, n, T-1] - p_gt[n, T-1]| (the poked tracks come first)."""
    n = gt.shape[-3] if n_poked is None else n_poked
    assert 1 <= n <= gt.shape[-3] and pred.dim() == gt.dim() + 1, f"endpoint_error: n_poked {n_poked}"
    end_pred, end_gt = to_pixels(pred[..., :n, -1, :], res), to_pixels(gt[..., :n, -1, :], res).unsqueeze(-3)
    return float((end_pred - end_gt).norm(dim=-1).mean())

def diversity(pred, res=128):
    """The mean over (clips, pairs k < l, n, t) of |p[k, n, t] - p[l, n, t]|; 0 for K = 1. pred [..., K, N, T, 2]."""
    K, p = pred.shape[-4], to_pixels(pred, res)
    first, second = torch.triu_indices(K, K, offset=1)
    return float((p[..., first, :, :, :] - p[..., second, :, :, :]).norm(dim=-1).mean()) if K > 1 else 0.0

def direction_cosine(pred, gt):
    """The cosine of d_pred and d_gt, d = mean_n x[n, T-1] - x[n, 0], over clips (1: the same way, 0: unrelated)."""
    d_pred, d_gt = ((x[..., -1, :] - x[..., 0, :]).double().mean(-2) for x in (pred, gt))
    return float(torch.cosine_similarity(d_pred, d_gt, dim=-1).mean())

# ------------------------------------------------------- Baselines (Sec. A: on the same evaluation tracks as the model)
def static_baseline(start_xy, T):
    """No motion: start_xy [..., N, 2] -> [..., N, T, 2]."""
    return start_xy.unsqueeze(-2).expand(*start_xy.shape[:-1], T, 2).clone()

def nearest_neighbour_baseline(enc_tracks, query_xy):
    """Query points [..., Q, 2] copy the motion of the encoded track [..., N_e, T, 2] starting nearest (ties: first)."""
    nearest = ((query_xy.unsqueeze(-2) - enc_tracks[..., 0, :].unsqueeze(-3)) ** 2).sum(-1).argmin(-1)   # [..., Q]
    index = nearest[..., None, None].expand(*nearest.shape, enc_tracks.shape[-2], 2)
    return query_xy.unsqueeze(-2) + (enc_tracks - enc_tracks[..., :1, :]).gather(-3, index)

def straight_to_poke_baseline(start_xy, pokes, poke_index, T):
    """Poked points go straight to their goal at constant speed, then stay; the rest stay still. start_xy [..., N, 2],
    pokes [..., P, 5] (x0, y0, x1, y1, t), poke_index [..., P] (each once); the goal frame f = round(t (T - 1))."""
    assert (poke_index.sort(-1).values.diff(dim=-1) > 0).all(), "straight_to_poke_baseline: a point poked twice"
    frames, goal_frame = torch.arange(T, dtype=pokes.dtype, device=pokes.device), torch.round(pokes[..., 4:5] * (T - 1))
    a = torch.where(frames >= goal_frame, 1.0, frames / goal_frame.clamp(min=1)).unsqueeze(-1)      # [..., P, T, 1]
    moved = (1 - a) * pokes[..., None, 0:2] + a * pokes[..., None, 2:4]
    index = poke_index[..., None, None].expand(*poke_index.shape, T, 2)
    return static_baseline(start_xy, T).to(pokes.dtype).scatter(-3, index, moved)

def to_window(pred, T_window):
    """The model's frames -> the protocol's window (Sec. A: a 64-frame prediction subsampled to 16)."""
    return pred if pred.shape[-2] == T_window else resample_time(pred, T_window)

# -------------- Evaluation clips: any source data.py reads; "synthetic" is a stream no training run or validation draws
def evaluation_items(source, T, count, pick, cfg, seed=0):
    """The first window of T frames of each clip as dict(image, tracks [N, T, 2], visible [N, T], text) -> pick(item,
    index) -> an item or None (the protocol's needs unmet), until count; cfg: the VAE's; bad clips skipped, warned."""
    refs = None if source == "synthetic" else find_clips(os.fspath(source))
    n = 20 * count + 100 if refs is None else len(refs)

    def read(i):   # clip i's item, picked; None (warned) where it has no usable window
        try:
            clip = make_synthetic_clip((seed, i, SPLITS["eval"]), T, 256, 256, cfg.synth_tracks, "first") \
                if refs is None else load_ref(refs[i])
            assert len(clip["tracks"]) >= T, f"{refs[i]}: {len(clip['tracks'])} frames, a window needs {T}"
            (H, W), tracks = clip["video"].shape[1:3], clip["tracks"][:T].transpose(1, 0, 2)
            return pick(dict(image=prepare_image(clip["video"][0], cfg.image_size)[1], text=clip["text"],
                             tracks=torch.from_numpy(pixels_to_unit(tracks, W, H).astype(np.float32)),
                             visible=torch.from_numpy(clip["visibility"][:T].T)), i)
        except (ValueError, AssertionError) as e:
            warnings.warn(f"skipping a clip: {e}")
    usable = (item for item in map(read, range(n)) if item is not None)
    items = list(tqdm(itertools.islice(usable, count), total=count, desc="clips", leave=False))   # (reads until count)
    if not items:
        raise ValueError(f"--data {source}: none of the {n} clips read has a window of {T} frames with the "
                         "tracks the protocol needs (see the warnings above)")
    return items

# -------------------------------------------------------------------- recon: the VAE's reconstruction PCK (Tables G, H)
@torch.no_grad()
def recon_scores(vae, items, visible_only=False, batch=8):
    """items' tracks [n_enc + n_dec, T, 2] -> ({VAE | static | nearest_neighbour: {AE | MAE: pck}}, the VAE's)."""
    device, n_enc = next(vae.parameters()).device, vae.cfg.n_enc
    gt, visible, images = (torch.stack([it[k] for it in items]) for k in ("tracks", "visible", "image"))
    pred = torch.cat([vae.decode(vae.encode(image, tracks[:, :n_enc])[0], image, tracks[:, :, 0]).float().cpu()
                      for image, tracks in zip(images.to(device).split(batch), gt.to(device).split(batch))])
    parts, static = dict(AE=slice(0, n_enc), MAE=slice(n_enc, None)), static_baseline(gt[:, :, 0], gt.shape[2])
    score = lambda x, s: pck(x, gt[:, s], mask=visible[:, s] if visible_only else None)   # noqa: E731
    scores = {m: {p: score(x[:, s], s) for p, s in parts.items()} for m, x in (("VAE", pred), ("static", static))}
    nearest = nearest_neighbour_baseline(gt[:, :n_enc], gt[:, n_enc:, 0])
    return dict(scores, nearest_neighbour={"MAE": score(nearest, parts["MAE"])}), pred

def vae_scores(model, items, out_png=None):
    """The VAE's validation: recon's PCK (Tables G, H) and its baselines; a picture of truth | reconstruction."""
    scores, pred = recon_scores(model, items)
    if out_png:
        track_picture(out_png, [it["frame"] for it in items[:4]], [[it["tracks"] for it in items[:4]], pred[:4]])
    return dict(AE=scores["VAE"]["AE"]["delta_avg"], MAE=scores["VAE"]["MAE"]["delta_avg"],
                NN_MAE=scores["nearest_neighbour"]["MAE"]["delta_avg"], static_MAE=scores["static"]["MAE"]["delta_avg"])

def cmd_recon(args):
    vae = load_vae(args.vae, args.device)
    n = vae.cfg.n_enc + vae.cfg.n_dec

    def pick(it, index):   # n tracks visible in the window's first frame (Sec. A)
        chosen = np.random.default_rng((args.seed, index)).permutation(np.flatnonzero(it["visible"][:, 0].numpy()))[:n]
        return None if len(chosen) < n else dict(it, tracks=it["tracks"][chosen], visible=it["visible"][chosen])
    items = evaluation_items(args.data, vae.cfg.n_frames, args.clips, pick, vae.cfg, args.seed)
    scores = recon_scores(vae, items, args.visible_only, args.batch)[0]
    print(f"recon: {args.vae} on {len(items)} windows of {vae.cfg.n_frames} frames from {args.data}; PCK at 256 px, "
          f"{vae.cfg.n_enc} encoded (AE) and {vae.cfg.n_dec} held-out (MAE) tracks")
    print(table(["method", "tracks", *scores["VAE"]["AE"]], [[m, p, *r.values()] for m, parts in scores.items()
                                                             for p, r in parts.items()]))
    return dict(command="recon", vae=args.vae, data=args.data, clips=len(items), frames=vae.cfg.n_frames, pck=scores)

# ----------------------------------------------- tracks: trajectories from pokes or text (Sec. A; Fig. K's steps sweep)
def track_items(items, n_tracks=40, seed=0, moving=True):
    """Sec. A's n_tracks evaluation tracks (data.select_eval_tracks) of each item -> dict(image, gt [n, T, 2], text).
    moving: items with fewer moving tracks are left out (else all keep as many as the poorest has)."""
    picked = [(it, select_eval_tracks(it["tracks"].numpy(), it["visible"].numpy(), n_tracks, seed + i))
              for i, it in enumerate(items)]
    if moving:
        picked = [(it, c) for it, c in picked if len(c) == n_tracks and not is_static(it["tracks"][c].numpy()).any()]
    n = min([len(c) for _, c in picked], default=0)
    return [dict(image=it["image"], gt=it["tracks"][c[:n]], text=it.get("text") or "") for it, c in picked]

@torch.no_grad()
def track_rows(planner, vae, items, settings, k=8, steps=(10,), guidance=1.0, poke_guidance=0.0, text=False, seed=0,
               batch=4):
    """Rows of Min/Mean/Single/MeanT MSE, EPE, unpoked Min-MSE, diversity of K samples per item, per steps and pokes n
    in settings (the first n tracks to their last frame), the same noise; beside static, straight-to-poke, VAE floor."""
    device, gt = next(planner.parameters()).device, torch.stack([it["gt"] for it in items])
    T, rows, parts = gt.shape[2], [], [slice(i, i + batch) for i in range(0, len(items), batch)]
    rep = lambda x: x.repeat_interleave(k, 0).to(device)   # noqa: E731  (item b's K samples are rows b K .. b K + K-1)
    images, floor = [torch.stack([it["image"] for it in items[part]]).to(device) for part in parts], []
    enc = resample_time(gt[:, :vae.cfg.n_enc], vae.cfg.n_frames)
    with autocast(device):   # the DINOv2 tokens once, for the encoder and every decode
        tokens = [vae.image_tokens(image) for image in images]
        for part, image, tok in zip(parts, images, tokens):
            z = vae.encode(image, enc[part].to(device), image_tokens=tok)[0]
            floor.append(to_window(vae.decode(z, image, gt[part, :, 0].to(device), image_tokens=tok).float().cpu(), T))

    def row(method, n, pred, n_steps=None):    # pred [clips, K, N, T, 2]
        return dict(method=method, steps=n_steps, pokes=n, **trajectory_mse(pred, gt),
                    epe=endpoint_error(pred, gt, n) if n else None, diversity=diversity(pred),
                    min_unpoked=trajectory_mse(pred[..., n:, :, :], gt[:, n:])["min"] if n < gt.shape[1] else None)
    pokes = {n: torch.stack([sample_pokes(g, n) for g in gt]) for n in settings}
    for n in settings:
        rows.append(row("static", n, static_baseline(gt[:, :, 0], T)[:, None]))
        if n:
            straight = straight_to_poke_baseline(gt[:, :, 0], pokes[n], torch.arange(n).expand(len(gt), n), T)
            rows.append(row("straight_to_poke", n, straight[:, None]))
        rows.append(row("vae_floor", n, torch.cat(floor)[:, None]))
    for n_steps, n in itertools.product(steps, settings):
        preds = []
        for b, (part, image, tok) in enumerate(zip(parts, images, tokens)):
            image, tok, poke = rep(image), rep(tok), rep(pokes[n][part]) if n else None
            with autocast(device):
                guide = PokeGuide(planner, vae, image, poke, strength=poke_guidance,
                                  image_tokens=tok) if poke_guidance and n else None
                z = planner.sample(image, pokes=poke, steps=n_steps, cfg=guidance,
                                   text=[it["text"] for it in items[part] for _ in range(k)] if text else None,
                                   generator=torch.Generator().manual_seed(seed * 1_000_003 + b), guide=guide)
                pred = vae.decode(z, image, rep(gt[part, :, 0]), image_tokens=tok).float().cpu()
            preds.append(to_window(pred, T).reshape(-1, k, *gt.shape[1:]))
        rows.append(row("planner", n, torch.cat(preds), n_steps))
    return rows

def planner_scores(planner, vae, items, k=8, steps=10):
    """The open planner's validation: Min-MSE with 0, 1, 4, 16 pokes (and EPE) and text, beside static and straight."""
    rows = track_rows(planner, vae, items, [0, 1, 4, 16], k, [steps])
    text = track_rows(planner, vae, items, [0], k, [steps], text=True) if planner.text_proj is not None else []
    out = {("null" if r["pokes"] == 0 else f"p{r['pokes']}"): r["min"] for r in rows if r["method"] == "planner"}
    out.update({"text": r["min"] for r in text if r["method"] == "planner"})
    out.update({f"EPE_p{r['pokes']}": r["epe"] for r in rows if r["method"] == "planner" and r["pokes"]})
    out.update({f"straight_p{r['pokes']}": r["min"] for r in rows if r["method"] == "straight_to_poke"})
    return dict(out, static=rows[0]["min"])

def cmd_tracks(args):
    vae, planner = load_pair(args.planner, args.vae, args.device)
    T, settings = args.window or vae.cfg.n_frames, [args.tracks if p == "dense" else p for p in args.pokes]
    if max(settings) > args.tracks:
        raise ValueError(f"--pokes {max(settings)}: more pokes than the --tracks {args.tracks} evaluation tracks")
    if planner.cfg.task != "open" or max(settings) > planner.cfg.max_pokes and not planner.cfg.null_token:
        raise ValueError(f"--planner {args.planner}: " + ("a LIBERO planner (eval.py libero)" if planner.cfg.task !=
                         "open" else f"{planner.cfg.max_pokes} poke slots, --pokes asks for {max(settings)}"))
    if args.text and planner.text_proj is None:
        raise ValueError(f"--text: --planner {args.planner} takes no text (pokes only)")
    if args.poke_guidance < 0:
        raise ValueError(f"--poke-guidance {args.poke_guidance}: expected a strength >= 0 (0 = the paper's sampler)")
    items = [it[0] for it in evaluation_items(args.data, T, args.clips, lambda it, i: track_items(
        [it], args.tracks, args.seed + i) or None, vae.cfg, args.seed)]
    if args.text and not any(it["text"] for it in items):
        raise ValueError(f"--text: the clips of {args.data} carry no text")
    rows = track_rows(planner, vae, items, settings, args.k, args.steps, args.guidance, args.poke_guidance, args.text,
                      args.seed, args.batch)
    print(f"tracks: {len(items)} windows of {T} frames from {args.data}, {args.tracks} non-static tracks each, K = "
          f"{args.k}, MSE and EPE at 128 px" + ("; text-conditioned" if args.text else "")
          + (f"; poke guidance {args.poke_guidance:g} (ours, not the paper's sampler)" if args.poke_guidance else ""))
    keys = ["min", "mean", "single", "meanT", "epe", "min_unpoked", "diversity"]
    print(table(["method", "steps", "pokes", "Min-MSE", "Mean-MSE", "Single-MSE", "MeanT-MSE", "EPE", "unpoked Min-MSE",
                 "diversity"], [[r["method"], r["steps"], r["pokes"]] + [r[k] for k in keys] for r in rows]))
    return dict(command="tracks", vae=args.vae or planner.cfg.vae, planner=args.planner, data=args.data,
                clips=len(items), k=args.k, window=T, model_frames=vae.cfg.n_frames, n_tracks=args.tracks, text=args.text,
                poke_guidance=args.poke_guidance, rows=rows)

# ---------------------------------------------------- libero: Table E, trajectory prediction on held-out LIBERO windows
def libero_batch(source, window=16, n_tracks=32, image_size=224, count=16, seed=0):
    """Held-out windows (the val split's demos) whose every view has n_tracks non-static tracks (Table E), stacked."""
    dataset = LiberoDataset(source, "val", n_frames=window, window=window, n_tracks=n_tracks, image_size=image_size,
                            seed=seed)
    usable = (it for it in map(dataset.__getitem__, range(len(dataset)))
              if not any(is_static(t.numpy()).any() for t in it["tracks"]))
    items = list(itertools.islice(usable, count))   # (stops reading at count)
    if not items:
        raise ValueError(f"--data {source}: no held-out window with {n_tracks} non-static tracks in every view")
    return {k: torch.stack([it[k] for it in items]) for k in ("image", "tracks", "task_emb", "timestep")}

@torch.no_grad()
def libero_scores(planner, vae, batch, k=8, steps=10, seed=0):
    """Table E per view: Min-MSE of K plans (from task, timestep and start frames; in the window, Sec. A) beside static,
    the VAE's floor and the planner without start frames; the direction cosine of one plan and of the floor."""
    device = next(planner.parameters()).device
    image, gt = batch["image"].to(device), batch["tracks"].to(device)
    W, T, n, gen = len(gt), gt.shape[3], planner.n_latents, torch.Generator().manual_seed(seed)
    conditions = {key: batch[key].repeat_interleave(k, 0).to(device) for key in ("image", "task_emb", "timestep")}
    blind = torch.zeros(W * k, dtype=torch.bool, device=device)   # the start frames dropped
    z, z_blind = (planner.sample(steps=steps, generator=gen, image_mask=m, **conditions) for m in (None, blind))
    out = {}
    for v, name in enumerate(VIEWS):
        def decode(grid):   # [W * s, n, C] -> [W, s, N, T, 2]
            s = len(grid) // W
            pred = vae.decode(grid, image[:, v].repeat_interleave(s, 0), gt[:, v, :, 0].repeat_interleave(s, 0))
            return to_window(pred.float(), T).reshape(W, s, *gt.shape[2:])
        rec = decode(vae.encode(image[:, v], resample_time(gt[:, v], vae.cfg.n_frames)[:, :vae.cfg.n_enc])[0])
        preds = dict(min=decode(z[:, v * n:(v + 1) * n]), no_frame=decode(z_blind[:, v * n:(v + 1) * n]),
                     static=static_baseline(gt[:, v, :, 0], T)[:, None], floor=rec)
        out.update({f"{name}_{c}": trajectory_mse(x, gt[:, v])["min"] for c, x in preds.items()})
        out.update({f"{name}_direction": direction_cosine(preds["min"][:, 0], gt[:, v]),
                    f"{name}_floor_direction": direction_cosine(rec[:, 0], gt[:, v])})
    return out

def libero_report(planner, vae, data, n_tracks=32, count=16, k=8, steps=10, seed=0):
    """Table E printed and returned: libero_scores on count held-out windows of data."""
    batch = libero_batch(data, planner.cfg.window, n_tracks, vae.cfg.image_size, count, seed)
    scores, windows = libero_scores(planner, vae, batch, k, steps, seed), len(batch["tracks"])
    print(f"libero (Table E): {windows} held-out windows of {planner.cfg.window} frames from {data}, {n_tracks} "
          f"non-static tracks per view, K = {k}, Min-MSE at 128 px; direction: one plan's cosine with the truth")
    cols = ["min", "no_frame", "static", "floor", "direction", "floor_direction"]
    print(table(["view", "planner", "frames dropped", "static", "VAE floor", "direction", "VAE direction"],
                [[v] + [scores[f"{v}_{c}"] for c in cols] for v in VIEWS]))
    return dict(scores, windows=windows)

def cmd_libero(args):
    vae, planner = load_pair(args.planner, args.vae, args.device)
    if planner.cfg.task != "libero":
        raise ValueError(f"--planner {args.planner}: an open-domain planner; this protocol needs a LIBERO one")
    scores = libero_report(planner, vae, args.data, args.tracks, args.clips, args.k, args.steps[0], args.seed)
    return dict(command="libero", planner=args.planner, vae=args.vae or planner.cfg.vae, data=args.data, k=args.k,
                scores=scores)

# --------------------------------------------------------------------------------------------------------- Command line
def table(header, rows):
    """A plain-text table, the first column left-aligned."""
    fmt = lambda v: "-" if v is None else v if isinstance(v, str) else f"{v:,}" if isinstance(v, int) else \
        f"{v:.1f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 or v == 0 else f"{v:.3g}"   # noqa: E731
    cells = [list(map(str, header))] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells[:1] + [["-" * w for w in widths]] + cells[1:])

def counts(text, dense=False):
    """'1,2,4' -> [1, 2, 4] (positive integers; 0 and 'dense' where the flag allows them)."""
    try:
        out = [p if dense and p == "dense" else int(p) for p in text.split(",")]
        assert all(p == "dense" or p >= (0 if dense else 1) for p in out)
        return out
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"expected counts separated by commas{' or dense' * dense}, got {text!r}")

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["speed"]:
        import bench
        return bench.main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    one = lambda text: counts(text)[0]   # noqa: E731
    sub.add_parser("speed", help="the speed benchmark (bench.py): python3 bench.py --help")
    for name in ("recon", "tracks", "libero"):
        p, lib = sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter), name == "libero"
        p.add_argument("--vae", default="out/tiny/vae/ckpt.pt" if name == "recon" else None, help="VAE checkpoint or "
                       "release:NAME" + " (default: the one the planner was trained on)" * (name != "recon"))
        if name != "recon":
            p.add_argument("--planner", default=f"out/tiny/planner{'-libero' * lib}/ckpt.pt")
            p.add_argument("--k", type=one, default=8, help="samples per window (Table E: 8)")
            p.add_argument("--steps", type=counts, default=[10], help="Euler steps, e.g. 1,2,5,10,20,50 (Fig. K)")
            p.add_argument("--tracks", type=one, default=32 if lib else 40, help="evaluation tracks per window")
        p.add_argument("--data", default="data/robot" if lib else "synthetic",
                       help="LIBERO demos (.hdf5)" if lib else "synthetic, a folder of .npz clips, .tar shards")
        p.add_argument("--clips", type=one, default={"recon": 64, "tracks": 32, "libero": 16}[name], help="windows")
        p.add_argument("--seed", type=int, default=0, help="synthetic clips and track choice")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--threads", type=int, default=0, help="CPU threads (0: trainer.set_threads' rule)")
        p.add_argument("--json", help="write the numbers to this file")
    sub.choices["recon"].add_argument("--batch", type=one, default=8, help="windows per forward pass")
    sub.choices["recon"].add_argument("--visible_only", action="store_true", help="PCK over visible point-frames only")
    p = sub.choices["tracks"]
    p.add_argument("--pokes", type=lambda t: counts(t, dense=True), default=[1, 2, 4, 8, 16, "dense"],
                   help="poke counts; dense = every evaluation track, 0 = none")
    p.add_argument("--text", action="store_true", help="condition on each clip's text")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--poke-guidance", type=float, default=0.0, help="planner.PokeGuide strength (ours; 0: the paper's)")
    p.add_argument("--window", type=one, help="frames per window, the model's subsampled to it (default: the model's)")
    p.add_argument("--batch", type=one, default=4, help="windows per sampling batch (x K samples)")
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads {args.threads}: expected 0 (the rule) or more")
    set_threads(args.threads) if args.device == "cpu" else None
    try:
        if args.json:
            check_output(args.json, "--json")
        out = {"recon": cmd_recon, "tracks": cmd_tracks, "libero": cmd_libero}[args.command](args)
        if args.json:
            write_atomically(args.json, lambda f: f.write(json.dumps(out, indent=2).encode()))
            print(f"wrote {args.json}")
        return out
    except ValueError as e:
        raise SystemExit(f"error: {e}")

if __name__ == "__main__":
    main()
