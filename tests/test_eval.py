"""Tests of eval.py and bench.py: the metrics and baselines on hand-computed fixtures and by their properties, each
protocol (recon, tracks, libero) and the command line on the session's micro checkpoints, the FLOP counter from
shapes and the speed benchmark's rows.

Fixtures are written in pixels and converted to unit coordinates with the inverse of each metric's own scaling (PCK:
(u + 1) / 2 (res - 1); the MSE family: (u + 1) / 2 res), so a wrong scaling changes the numbers. No fixture distance
lies on a PCK threshold."""
import json

import pytest
import torch

import bench
import eval as evaluation
import vae
from eval import (diversity, direction_cosine, endpoint_error, main, nearest_neighbour_baseline, pck, static_baseline,
                  straight_to_poke_baseline, to_window, trajectory_mse)


def units(pixels, size):
    """The inverse of a metric's scaling: u = 2 p / size - 1 (PCK: size = res - 1; MSE family: size = res)."""
    return 2 * torch.as_tensor(pixels, dtype=torch.float64) / size - 1


# ---------------------------------------------------------------------------------------------------- PCK

def pck_fixture():
    """N = 2 tracks, T = 2 frames at 256 px; the prediction is off by 0.5 (x), 3 (y), 5 (3-4-5) and 20 (x) px."""
    gt_px = torch.tensor([[[100.0, 50.0], [110.0, 60.0]], [[30.0, 200.0], [40.0, 220.0]]])
    offset = torch.tensor([[[0.5, 0.0], [0.0, 3.0]], [[3.0, 4.0], [20.0, 0.0]]])
    return units(gt_px + offset, 255), units(gt_px, 255)


def test_pck_hand_computed_and_masked():
    pred, gt = pck_fixture()
    out = pck(pred, gt)
    # within 1 and 2 px: {0.5}; within 4: {0.5, 3}; within 8 and 16: {0.5, 3, 5}
    assert out == pytest.approx({"delta_avg": 50.0, "delta_1": 25.0, "delta_2": 25.0, "delta_4": 50.0, "delta_8": 75.0,
                                 "delta_16": 75.0})
    assert all(type(v) is float for v in out.values())
    masked = pck(pred, gt, mask=torch.tensor([[True, True], [True, False]]))   # without the 20 px point-frame
    assert masked == pytest.approx({"delta_avg": (100 / 3 * 2 + 200 / 3 + 200) / 5, "delta_1": 100 / 3,
                                    "delta_2": 100 / 3, "delta_4": 200 / 3, "delta_8": 100.0, "delta_16": 100.0})
    with pytest.raises(AssertionError, match="selects no point-frame"):
        pck(pred, gt, mask=torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(AssertionError):
        pck(pred.transpose(0, 1)[:, :1], gt)                   # shapes that do not match


def test_pck_scales_by_res_minus_one():
    # 0.998 px at (res - 1) / 2 per unit; the same offset would be 1.0019 px at res / 2
    gt = torch.zeros(1, 1, 2, dtype=torch.float64)
    pred = gt + torch.tensor([2 * 0.998 / 255, 0.0], dtype=torch.float64)
    assert pck(pred, gt, thresholds=(1,))["delta_1"] == 100.0
    # at res = 128 the same offset is 0.998 * 127 / 255 = 0.497 px
    assert pck(pred, gt, res=128, thresholds=(0.5,)) == {"delta_avg": 100.0, "delta_0.5": 100.0}
    assert pck(pred, gt, res=128, thresholds=(0.49,))["delta_0.49"] == 0.0


# ---------------------------------------------------------------------------------------------------- MSE family

def mse_fixture():
    """K = 2 samples of N = 2 tracks, T = 2 frames at 128 px: sample 0 off by (2, 0) px, sample 1 by (-1, 3) px."""
    gt_px = torch.tensor([[[10.0, 20.0], [12.0, 25.0]], [[90.0, 64.0], [80.0, 70.0]]])
    offsets = torch.tensor([[2.0, 0.0], [-1.0, 3.0]])[:, None, None, :]
    return units(gt_px + offsets, 128), units(gt_px, 128)


def test_trajectory_mse_hand_computed():
    pred, gt = mse_fixture()
    # mse_0 = (4 + 0) / 2 = 2; mse_1 = (1 + 9) / 2 = 5; the mean trajectory is off by (0.5, 1.5): (0.25 + 2.25) / 2
    assert trajectory_mse(pred, gt) == pytest.approx({"min": 2.0, "mean": 3.5, "single": 2.0, "meanT": 1.25})
    assert trajectory_mse(pred.flip(0), gt) == pytest.approx({"min": 2.0, "mean": 3.5, "single": 5.0, "meanT": 1.25})
    assert trajectory_mse(pred[1:], gt) == pytest.approx({"min": 5.0, "mean": 5.0, "single": 5.0, "meanT": 5.0})
    # a constant offset d along one axis: MSE d^2 / 2 (the mean over both coordinates)
    shift = units(torch.tensor([0.0, 3.0]), 128) + 1
    assert trajectory_mse((gt + shift)[None], gt)["min"] == pytest.approx(4.5)
    with pytest.raises(AssertionError):
        trajectory_mse(pred[0], gt)                            # the K axis is required


def test_trajectory_mse_properties_and_clip_average():
    g = torch.Generator().manual_seed(2)
    gt = torch.rand(3, 4, 16, 2, generator=g) * 2 - 1
    pred = gt[:, None] + 0.1 * torch.randn(3, 8, 4, 16, 2, generator=g)
    out = trajectory_mse(pred, gt)
    assert out["min"] <= out["mean"] and out["min"] <= out["single"]
    assert out["meanT"] < out["mean"]                          # Jensen; strict for distinct samples
    per_clip = [trajectory_mse(pred[b], gt[b]) for b in range(3)]
    assert out == pytest.approx({k: sum(c[k] for c in per_clip) / 3 for k in out})


def test_endpoint_error_and_diversity_hand_computed():
    gt_px = torch.full((3, 3, 2), 60.0)                        # N = 3, T = 3
    offset = torch.zeros(2, 3, 3, 2)                           # [K, N, T, 2]
    offset[:, :, :2] = 50.0                                    # earlier frames do not count
    offset[0, 0, -1], offset[1, 0, -1], offset[0, 1, -1] = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0]), \
        torch.tensor([6.0, 8.0])
    offset[:, 2, -1] = torch.tensor([0.0, 100.0])              # track 2 is not poked
    pred, gt = units(gt_px + offset, 128), units(gt_px, 128)
    assert endpoint_error(pred, gt, n_poked=2) == pytest.approx((5 + 1 + 10 + 0) / 4)
    assert endpoint_error(pred, gt) == pytest.approx((5 + 1 + 10 + 0 + 100 + 100) / 6)
    with pytest.raises(AssertionError):
        endpoint_error(pred, gt, n_poked=0)
    samples = units(torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])[:, None, None, :], 128)   # K = 3, N = T = 1
    assert diversity(samples) == pytest.approx((5 + 10 + 5) / 3)
    assert diversity(samples[:1]) == 0.0 and diversity(samples[:1].expand(4, 1, 1, 2)) == 0.0
    assert diversity(torch.stack([samples, samples[[0, 0, 1]]])) == pytest.approx((20 / 3 + 10 / 3) / 2)


def test_direction_cosine_hand_computed():
    # only the first and last frames count, and the mean over the tracks
    gt = torch.zeros(2, 2, 3, 2, dtype=torch.float64)
    gt[0, :, -1] = torch.tensor([[0.2, 0.0], [0.4, 0.0]])      # clip 0 moves right
    gt[1, :, -1] = torch.tensor([[0.0, 0.1], [0.0, 0.1]])      # clip 1 moves down
    gt[:, :, 1] = 5.0
    opposite, turned = gt.clone(), gt.clone()
    opposite[..., -1, :] *= -1
    turned[0, :, -1] = torch.tensor([[0.0, 0.3], [0.0, 0.3]])  # 90 degrees: 0
    turned[1, :, -1] = torch.tensor([[0.1, 0.1], [0.1, 0.1]])  # 45 degrees
    assert direction_cosine(3 * gt, gt) == pytest.approx(1.0)
    assert direction_cosine(opposite, gt) == pytest.approx(-1.0)
    assert direction_cosine(turned, gt) == pytest.approx(2 ** -0.5 / 2)


# ---------------------------------------------------------------------------------------------------- baselines

def test_static_and_nearest_neighbour_baselines():
    start = torch.tensor([[0.1, -0.7], [0.4, 0.2], [-0.9, 0.0]])
    out = static_baseline(start, 5)
    assert out.shape == (3, 5, 2) and torch.equal(out, start[:, None].expand(3, 5, 2))
    enc = torch.zeros(2, 3, 2, dtype=torch.float64)            # N_e = 2, T = 3
    enc[0] = torch.tensor([[0.5, -0.5], [0.6, -0.5], [0.7, -0.5]], dtype=torch.float64)   # moves +x
    enc[1] = torch.tensor([[-0.5, 0.5], [-0.5, 0.25], [-0.5, 0.0]], dtype=torch.float64)  # moves -y
    query = torch.tensor([[0.375, -0.375], [-0.25, 0.25]], dtype=torch.float64)
    expected = torch.tensor([[[0.375, -0.375], [0.475, -0.375], [0.575, -0.375]],
                             [[-0.25, 0.25], [-0.25, 0.0], [-0.25, -0.25]]], dtype=torch.float64)
    torch.testing.assert_close(nearest_neighbour_baseline(enc, query), expected, rtol=0, atol=1e-12)
    # an exact tie goes to the lowest index
    tie = torch.zeros(2, 2, 2)
    tie[0, 1, 0], tie[1, :, 0], tie[1, 1, 1] = 0.25, 0.5, 0.5
    tie[0, :, 0] -= 0.5
    assert torch.equal(nearest_neighbour_baseline(tie, torch.zeros(1, 2))[0, 1], torch.tensor([0.25, 0.0]))
    assert torch.equal(nearest_neighbour_baseline(tie.flip(0), torch.zeros(1, 2))[0, 1], torch.tensor([0.0, 0.5]))


def test_nearest_neighbour_is_exact_on_a_rigid_translation():
    g = torch.Generator().manual_seed(3)
    displacement = torch.randn(2, 1, 9, 2, generator=g, dtype=torch.float64) * 0.1
    displacement[..., 0, :] = 0
    enc = torch.rand(2, 6, 1, 2, generator=g, dtype=torch.float64) + displacement
    query = torch.rand(2, 11, 2, generator=g, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(nearest_neighbour_baseline(enc, query), query[:, :, None] + displacement, rtol=0,
                               atol=1e-12)


def test_straight_to_poke_hand_computed():
    start = torch.tensor([[0.0, 0.0], [0.3, 0.3], [-0.5, 0.5]])
    out = straight_to_poke_baseline(start, torch.tensor([[0.0, 0.0, 0.4, -0.8, 0.5]]), torch.tensor([0]), T=5)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.0], [0.2, -0.4], [0.4, -0.8], [0.4, -0.8], [0.4, -0.8]]))
    assert torch.equal(out[1:], static_baseline(start[1:], 5))
    # t = 0.4: the goal frame is round(1.6) = 2, not floor; t = 0: at the goal from frame 0
    later = straight_to_poke_baseline(start, torch.tensor([[0.3, 0.3, 1.0, 0.3, 0.4]]), torch.tensor([1]), T=5)
    torch.testing.assert_close(later[1, 1], torch.tensor([0.65, 0.3]))
    now = straight_to_poke_baseline(start, torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]), torch.tensor([0]), T=5)
    assert torch.equal(now[0], torch.ones(5, 2))
    with pytest.raises(AssertionError, match="poked twice"):
        straight_to_poke_baseline(start, torch.zeros(2, 5), torch.tensor([1, 1]), T=5)


def test_straight_to_poke_endpoints_equal_the_pokes():
    g = torch.Generator().manual_seed(4)
    B, N, P, T = 3, 10, 4, 64
    start = torch.rand(B, N, 2, generator=g) * 2 - 1
    index = torch.stack([torch.randperm(N, generator=g)[:P] for _ in range(B)])
    goal, t = torch.rand(B, P, 2, generator=g) * 2 - 1, torch.rand(B, P, 1, generator=g)
    pokes = torch.cat([start.gather(1, index[..., None].expand(B, P, 2)), goal, t], -1)
    out = straight_to_poke_baseline(start, pokes, index, T)
    for b in range(B):
        for p in range(P):
            f = int(round(float(t[b, p, 0]) * (T - 1)))
            assert torch.equal(out[b, index[b, p], f:], goal[b, p].expand(T - f, 2))
            assert f == 0 or torch.equal(out[b, index[b, p], 0], start[b, index[b, p]])
        unpoked = [n for n in range(N) if n not in index[b].tolist()]
        assert torch.equal(out[b, unpoked], static_baseline(start[b, unpoked], T))


def test_to_window_subsamples_keeping_the_first_and_last_frames():
    pred = torch.randn(2, 3, 5, 64, 2)
    out = to_window(pred, 16)
    assert out.shape == (2, 3, 5, 16, 2)
    assert torch.equal(out[..., 0, :], pred[..., 0, :]) and torch.equal(out[..., -1, :], pred[..., -1, :])
    torch.testing.assert_close(out[..., 5, :], pred[..., 21, :])   # 5 * 63 / 15 = 21 exactly
    assert to_window(pred, 64) is pred


# ---------------------------------------------------------------------------------------------------- protocols

def test_recon_scores_on_a_rigid_translation(micro_checkpoints):
    """8 tracks translating together: nearest neighbour is exact, static scores from the per-frame distances."""
    model = vae.load_vae(micro_checkpoints[0])
    n_enc, T = model.cfg.n_enc, model.cfg.n_frames
    shift_px = torch.tensor([0.0, 0.5, 1.5, 3.0, 6.0, 10.0, 14.0, 20.0])[:T]        # along x, at 256 px
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(2):
        start = torch.rand(n_enc + model.cfg.n_dec, 1, 2, generator=g) * 1.6 - 0.8
        tracks = start + torch.stack([2 * shift_px / 255, torch.zeros(T)], -1)
        visible = torch.ones(len(tracks), T, dtype=torch.bool)
        visible[n_enc:, 5:] = False                                                  # held-out tracks hidden late
        items.append(dict(image=torch.randn(3, model.cfg.image_size, model.cfg.image_size, generator=g),
                          tracks=tracks.float(), visible=visible))
    scores, pred = evaluation.recon_scores(model, items, batch=1)
    assert pred.shape == (2, n_enc + model.cfg.n_dec, T, 2)
    assert scores["nearest_neighbour"]["MAE"]["delta_1"] == 100.0 == scores["nearest_neighbour"]["MAE"]["delta_avg"]
    # per point, the static distances are 0, 0.5, 1.5, 3, 6, 10, 14, 20 px
    static = {"delta_1": 25.0, "delta_2": 37.5, "delta_4": 50.0, "delta_8": 62.5, "delta_16": 87.5}
    assert scores["static"]["AE"] == scores["static"]["MAE"] == pytest.approx(dict(static, delta_avg=52.5))
    assert set(scores["VAE"]) == {"AE", "MAE"} and all(0 <= v <= 100 for v in scores["VAE"]["MAE"].values())
    # visible only: the held-out tracks count frames 0-4 (0 .. 6 px), the encoded ones all frames
    visible = evaluation.recon_scores(model, items, visible_only=True)[0]
    assert visible["static"]["AE"] == scores["static"]["AE"]
    assert visible["static"]["MAE"] == pytest.approx({"delta_avg": 76.0, "delta_1": 40.0, "delta_2": 60.0,
                                                      "delta_4": 80.0, "delta_8": 100.0, "delta_16": 100.0})


def test_recon_command_json_seed_and_clip_folders(micro_checkpoints, tmp_path):
    from data import make_synthetic_clip, save_clip
    vae_ckpt = micro_checkpoints[0]
    args = ["recon", "--vae", vae_ckpt, "--clips", "2", "--batch", "1", "--device", "cpu"]
    out = main(args + ["--json", str(tmp_path / "recon.json")])
    assert json.loads((tmp_path / "recon.json").read_text()) == out
    assert (out["command"], out["clips"], out["frames"]) == ("recon", 2, 8)
    assert set(out["pck"]) == {"VAE", "static", "nearest_neighbour"}
    assert set(out["pck"]["VAE"]["AE"]) == {"delta_avg", "delta_1", "delta_2", "delta_4", "delta_8", "delta_16"}
    assert main(args)["pck"] == out["pck"]                                  # seeded clips and tracks
    assert main(args + ["--seed", "1"])["pck"]["static"] != out["pck"]["static"]
    # a folder of clips: the one shorter than the model's window is skipped with a warning
    folder = tmp_path / "clips"
    for i, frames in enumerate((8, 5)):
        clip = make_synthetic_clip(100 + i, frames, 48, 64, 64)
        save_clip(str(folder / f"{i}.npz"), clip["video"], clip["tracks"], clip["visibility"], clip["text"])
    with pytest.warns(UserWarning, match="5 frames"):
        assert main(["recon", "--vae", vae_ckpt, "--data", str(folder), "--clips", "4"])["clips"] == 1


def test_track_items_pick_moving_tracks_first():
    T = 6
    moving = torch.linspace(0, 0.3, T)[:, None] * torch.tensor([1.0, 0.0])
    tracks = torch.stack([torch.full((T, 2), 0.5), torch.tensor([-0.5, 0.1]) + moving,
                          torch.tensor([0.2, -0.4]) - moving])          # track 0 stands still
    item = dict(image=torch.zeros(3, 4, 4), tracks=tracks, visible=torch.ones(3, T, dtype=torch.bool), text="t")
    two = evaluation.track_items([item], n_tracks=2)
    assert len(two) == 1 and two[0]["text"] == "t"
    assert sorted(two[0]["gt"][:, -1, 0].tolist()) == pytest.approx([-0.2, -0.1])   # the two moving tracks
    assert evaluation.track_items([item], n_tracks=3) == []              # a static one among 3: left out
    three = evaluation.track_items([item], n_tracks=3, moving=False)[0]["gt"]
    assert torch.equal(three[-1], tracks[0])                             # ... or kept, last


def test_planner_scores_on_linear_motion(micro_checkpoints):
    """Tracks moving at constant speed: the straight line to the poke is exact when every track is poked."""
    from planner import load_planner
    model = vae.load_vae(micro_checkpoints[0])
    planner = load_planner(micro_checkpoints[1])
    g = torch.Generator().manual_seed(1)
    items = []
    for _ in range(2):
        start, velocity = torch.rand(16, 1, 2, generator=g) - 0.5, torch.rand(16, 1, 2, generator=g) * 0.4 + 0.1
        tracks = start + velocity * torch.linspace(0, 1, model.cfg.n_frames)[:, None]
        items.append(dict(image=torch.randn(3, 28, 28, generator=g), tracks=tracks,
                          visible=torch.ones(16, model.cfg.n_frames, dtype=torch.bool), text="it moves"))
    items = evaluation.track_items(items, 16)
    gt = torch.stack([it["gt"] for it in items])
    out = evaluation.planner_scores(planner, model, items, k=2, steps=1)
    assert set(out) == {"null", "p1", "p4", "p16", "text", "EPE_p1", "EPE_p4", "EPE_p16", "straight_p1", "straight_p4",
                        "straight_p16", "static"}
    assert out["static"] == pytest.approx(trajectory_mse(static_baseline(gt[:, :, 0], gt.shape[2])[:, None], gt)["min"])
    assert out["straight_p16"] == pytest.approx(0, abs=1e-6) and out["straight_p1"] < out["static"]
    assert all(out[f"EPE_p{n}"] > 0 for n in (1, 4, 16))
    planner.text_proj = None   # a planner without text: no text row, each poke row under its own name
    no_text = evaluation.planner_scores(planner, model, items, k=2, steps=1)
    assert set(no_text) == set(out) - {"text"} and no_text["p16"] == out["p16"]


def test_tracks_command_rows_baselines_steps_and_poke_guidance(micro_checkpoints, tmp_path):
    vae_ckpt, planner_ckpt = micro_checkpoints
    common = ["tracks", "--vae", vae_ckpt, "--planner", planner_ckpt, "--clips", "2", "--k", "2", "--tracks", "8",
              "--device", "cpu"]
    out = main(common + ["--pokes", "0,1,dense", "--steps", "1,2", "--json", str(tmp_path / "tracks.json")])
    assert json.loads((tmp_path / "tracks.json").read_text()) == json.loads(json.dumps(out))
    assert (out["clips"], out["k"], out["window"], out["model_frames"], out["n_tracks"]) == (2, 2, 8, 8, 8)
    rows = {(r["method"], r["steps"], r["pokes"]): r for r in out["rows"]}
    assert len(rows) == len(out["rows"]) == 3 + 2 + 3 + 3 * 2       # static, straight, VAE floor, planner x Fig. K steps
    assert {s for m, s, _ in rows if m == "planner"} == {1, 2} and {p for _, _, p in rows} == {0, 1, 8}
    keys = {"method", "steps", "pokes", "min", "mean", "single", "meanT", "epe", "min_unpoked", "diversity"}
    for (method, _, pokes), r in rows.items():
        assert set(r) == keys
        assert r["min"] <= r["single"] + 1e-9 and r["min"] <= r["mean"] + 1e-9 and r["meanT"] <= r["mean"] + 1e-9
        assert (r["epe"] is None) == (pokes == 0) and (r["min_unpoked"] is None) == (pokes == 8)
        if method == "planner":
            assert r["diversity"] > 0
        else:
            assert r["min"] == r["mean"] == r["single"] == r["meanT"] and r["diversity"] == 0
    for pokes in (1, 8):   # the straight line ends on the poke, where the poked track is at the last frame
        assert rows[("straight_to_poke", None, pokes)]["epe"] == 0 < rows[("static", None, pokes)]["epe"]
        assert rows[("straight_to_poke", None, pokes)]["min"] < rows[("static", None, pokes)]["min"]
    assert rows[("static", None, 0)]["min"] == rows[("static", None, 8)]["min"]   # all tracks, whatever the pokes
    assert rows[("straight_to_poke", None, 1)]["min_unpoked"] == rows[("static", None, 1)]["min_unpoked"]
    # the VAE floor: its reconstruction from the first n_enc evaluation tracks (poked ones first), decoded at all of them;
    # random weights everywhere (a 2-step VAE's zero-initialised outputs barely read the latents)
    from planner import load_planner
    model, generator = vae.load_vae(vae_ckpt), torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.data += torch.randn(p.shape, generator=generator) * 0.1
    items = [it[0] for it in evaluation.evaluation_items("synthetic", 8, 2, lambda it, i: evaluation.track_items(
        [it], 8, i) or None, model.cfg)]
    gt, image = torch.stack([it["gt"] for it in items]), torch.stack([it["image"] for it in items])
    with torch.no_grad():
        rec = model.decode(model.encode(image, gt[:, :model.cfg.n_enc])[0], image, gt[:, :, 0])[:, None]
    floor = evaluation.track_rows(load_planner(planner_ckpt), model, items, [8], k=1)[2]
    assert floor["method"] == "vae_floor" and rec.std() > 0.1
    torch.testing.assert_close(torch.tensor([floor["epe"], floor["min"]]),
                               torch.tensor([endpoint_error(rec, gt), trajectory_mse(rec, gt)["min"]]))
    # planner.PokeGuide on the same clips, pokes and noise: the one-step sample lands nearer the pokes
    guided = main(common + ["--pokes", "1", "--steps", "1", "--poke-guidance", "1"])
    assert guided["poke_guidance"] == 1 and guided["rows"][0] == rows[("static", None, 1)]
    assert guided["rows"][-1]["epe"] < rows[("planner", 1, 1)]["epe"]
    # text, and a window of 4 frames from the model's 8
    no_vae = [a for a in common if a not in ("--vae", vae_ckpt)]   # the VAE from the planner's checkpoint
    text = main(no_vae + ["--clips", "1", "--pokes", "0", "--steps", "1", "--text", "--window", "4"])
    assert (text["window"], text["model_frames"], text["text"]) == (4, 8, True)
    assert text["vae"] is not None and text["vae"] == load_planner(planner_ckpt).cfg.vae   # no --vae: the planner's
    assert [(r["method"], r["pokes"]) for r in text["rows"]] == [("static", 0), ("vae_floor", 0), ("planner", 0)]
    assert text["rows"][-1]["min"] > 0


def test_libero_protocol_on_robot_demos(libero_chain, tmp_path):
    from planner import load_planner
    out = main(["libero", "--planner", libero_chain["planner"], "--data", libero_chain["data"], "--clips", "2", "--k",
                "2", "--steps", "1", "--tracks", "4", "--device", "cpu", "--json", str(tmp_path / "libero.json")])
    assert json.loads((tmp_path / "libero.json").read_text()) == out
    assert out["vae"] == libero_chain["vae"]                                # the planner's own VAE by default
    scores = out["scores"]
    model = vae.load_vae(libero_chain["vae"])
    batch = evaluation.libero_batch(libero_chain["data"], load_planner(libero_chain["planner"]).cfg.window, 4,
                                    model.cfg.image_size, 2)
    assert scores["windows"] == len(batch["tracks"]) >= 1 and batch["tracks"].shape[1:3] == (2, 4)
    for v, view in enumerate(("agentview", "eye_in_hand")):
        gt = batch["tracks"][:, v].double()
        static = ((gt - gt[:, :, :1]) * 64).pow(2).mean().item()            # (u + 1) / 2 128 px per unit
        assert scores[f"{view}_static"] == pytest.approx(static)
        assert min(scores[f"{view}_{c}"] for c in ("min", "no_frame", "floor")) > 0
        assert all(-1 <= scores[f"{view}_{c}"] <= 1 for c in ("direction", "floor_direction"))


def test_bad_inputs_are_named(micro_checkpoints, tmp_path, capsys):
    vae_ckpt, planner_ckpt = micro_checkpoints
    with pytest.raises(SystemExit, match="missing.pt: no such checkpoint; make it with: python3 vae.py"):
        main(["recon", "--vae", str(tmp_path / "missing.pt")])
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="corrupt.pt: not a readable checkpoint"):
        main(["recon", "--vae", str(tmp_path / "corrupt.pt")])
    with pytest.raises(SystemExit, match="expected a 'planner' checkpoint, got 'vae'"):
        main(["tracks", "--vae", vae_ckpt, "--planner", vae_ckpt])
    with pytest.raises(SystemExit, match="an open-domain planner; this protocol needs a LIBERO one"):
        main(["libero", "--planner", planner_ckpt, "--vae", vae_ckpt])
    for flag, words in ((["--pokes", "9"], r"--pokes 9: more pokes than the --tracks 8"),
                        (["--poke-guidance", "-1"], r"--poke-guidance -1.0: expected a strength >= 0")):
        with pytest.raises(SystemExit, match=words):
            main(["tracks", "--vae", vae_ckpt, "--planner", planner_ckpt, "--tracks", "8", "--pokes", "1", *flag])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .npz clips"):
        main(["recon", "--vae", vae_ckpt, "--data", str(tmp_path / "empty")])
    from data import make_synthetic_clip, save_clip
    clip = make_synthetic_clip(0, 4, 32, 32, 32)
    save_clip(str(tmp_path / "short" / "0.npz"), clip["video"], clip["tracks"], clip["visibility"])
    with pytest.warns(UserWarning), pytest.raises(SystemExit, match="--data .*short: none of the 1 clips"):
        main(["recon", "--vae", vae_ckpt, "--data", str(tmp_path / "short")])
    with pytest.raises(SystemExit, match="--json .*something else is in the way"):
        main(["recon", "--vae", vae_ckpt, "--json", str(tmp_path)])
    for argv in (["tracks", "--pokes", "1,two"], ["tracks", "--steps", "0"], ["recon", "--clips", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and f"argument {argv[1]}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- bench.py

def test_count_flops_of_linear_layers_splits_trainable_and_frozen():
    net = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(32, 16))
    x = torch.randn(8, 5, 64)                                  # 40 rows
    assert bench.count_flops([net], lambda: net(x)) == [2 * 40 * 64 * 32 + 2 * 40 * 32 * 16, 0]
    net[0].requires_grad_(False)
    assert bench.count_flops([net], lambda: net(x)) == [2 * 40 * 32 * 16, 2 * 40 * 64 * 32]
    assert bench.count_flops([net[1]], lambda: net(x)) == [2 * 40 * 32 * 16, 0]   # only the modules given


def test_count_flops_of_attention_from_its_shapes():
    attn, cross = vae.Attention(32, 16), vae.Attention(32, 16, kv_dim=24)   # 2 heads of 16
    x, ctx = torch.randn(2, 7, 32), torch.randn(2, 5, 24)
    extra = (torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16))
    q_out = 2 * 14 * 32 * 32 * 2                               # q and out: 14 rows of 32 -> 32
    assert bench.count_flops([attn], lambda: attn(x, None)) == [q_out + 2 * 14 * 32 * 64 + 4 * 2 * 7 * 7 * 32, 0]
    # cross-attention to 5 context tokens and 3 extra keys: 4 B L S d with S = 8
    assert bench.count_flops([cross], lambda: cross(x, None, ctx, None, extra_kv=extra)) == [
        q_out + 2 * 10 * 24 * 64 + 4 * 2 * 7 * 8 * 32, 0]
    # DINOv2 (transformers): patch convolution, 4 + 2 linear layers and one attention over 1 + 4 + 4 tokens
    from conftest import micro_vae_config
    encoder = vae.ImageEncoder(micro_vae_config(), pretrained=False)
    B, L, d = 3, 9, 32
    expected = 2 * (B * d * 4) * 3 * 14 * 14 + 4 * 2 * B * L * d * d + 2 * 2 * B * L * d * 4 * d + 4 * B * L * L * d
    assert bench.count_flops([encoder], lambda: encoder(torch.randn(B, 3, 28, 28))) == [expected, 0]


def test_benchmark_rows_of_the_tiny_preset(tmp_path, capsys, monkeypatch):
    counted, count_flops = [], bench.count_flops

    def spy(models, fn):   # what each row counted: (trainable, frozen)
        counted.append(count_flops(models, fn))
        return counted[-1]
    monkeypatch.setattr(bench, "count_flops", spy)
    keys = ["encode", "decode", "dense64", "velocity", "sample", "train_planner"]
    rows = bench.main(["--preset", "tiny", "--device", "cpu", "--budget", "0", "--matmul_size", "256", "--steps", "2",
                       "--max_row_s", "1e-6", "--rows", ",".join(keys), "--json", str(tmp_path / "bench.json")])
    printed = capsys.readouterr().out
    assert "MFU %" in printed and "* VAE decode_dense 64x64 (4096 points): (timed on 64 points" in printed
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and (saved["preset"], saved["device"]) == ("tiny", "cpu")
    by_key = {r["key"]: r for r in rows}
    assert list(by_key) == keys + ["generate"]
    for r in rows:
        s = r["ms"] / 1000
        assert r["ms"] > 0 and r["gflop"] > 0 and r["peak_mb"] > 0
        assert r["flops_per_s"] == pytest.approx(r["gflop"] * 1e9 / s)
        assert r["mfu"] == pytest.approx(r["flops_per_s"] / saved["reference"])
        assert r["samples_per_s"] == pytest.approx(1 / s)
    # the tiny sizes: 16 frames, 24 encoded tracks, 48 decoded points
    assert by_key["encode"]["point_frames_per_s"] == pytest.approx(by_key["encode"]["samples_per_s"] * 24 * 16)
    assert by_key["decode"]["point_frames_per_s"] == pytest.approx(by_key["decode"]["samples_per_s"] * 48 * 16)
    assert by_key["dense64"]["point_frames_per_s"] == pytest.approx(by_key["dense64"]["samples_per_s"] * 4096 * 16)
    assert by_key["sample"]["frames_per_s"] == pytest.approx(by_key["sample"]["samples_per_s"] * 16)
    assert by_key["velocity"]["frames_per_s"] is None
    assert [r["key"] for r in rows if r["note"]] == ["dense64"]
    assert by_key["dense64"]["note"] == "(timed on 64 points, scaled to 4096)"
    # FLOPs: forward rows count every module once, a training step 3x what trains + 1x the frozen VAE encode
    # (dense64 counts twice: its 64 points, then the work that does not grow with the points, counted once)
    calls = dict(zip(["encode", "decode", "dense64", "dense64_fixed", "velocity", "sample", "train_planner"], counted))
    trainable, frozen = calls["train_planner"]
    assert by_key["train_planner"]["gflop"] * 1e9 == pytest.approx(3 * trainable + frozen)
    assert frozen == sum(calls["encode"]) and calls["encode"][1] == 0           # the same encode, now frozen
    for key in ("encode", "decode", "velocity", "sample"):
        assert by_key[key]["gflop"] * 1e9 == pytest.approx(sum(calls[key]))
    fixed, part = sum(calls["dense64_fixed"]), sum(calls["dense64"])
    assert 0 < fixed < part and by_key["dense64"]["gflop"] * 1e9 == pytest.approx(fixed + (part - fixed) * 4096 / 64)
    assert 2 < by_key["sample"]["gflop"] / by_key["velocity"]["gflop"] < 3   # 2 network evaluations + conditions
    generate = by_key["generate"]
    assert generate["ms"] == pytest.approx(by_key["sample"]["ms"] + by_key["decode"]["ms"])
    assert generate["gflop"] == pytest.approx(by_key["sample"]["gflop"] + by_key["decode"]["gflop"])


def test_bench_bad_flags_are_named(tmp_path):
    for run in (bench.main, lambda argv: main(["speed"] + argv)):   # eval.py speed: the same benchmark, flags
        with pytest.raises(SystemExit, match="--budget >= 0"):
            run(["--budget", "-1"])
    with pytest.raises(SystemExit, match="--json .*something else is in the way"):
        bench.main(["--json", str(tmp_path)])
    with pytest.raises(SystemExit, match="--preset tiny_robot: expected one of tiny, paper"):
        bench.main(["--preset", "tiny_robot", "--device", "cpu"])
