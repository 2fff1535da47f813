"""Tests of eval.py: the metrics and baselines (hand-computed fixtures, then properties), the FLOP counter and
the speed benchmark, and each protocol on tiny checkpoints trained here.

Fixtures are written in pixels and converted to unit coordinates with the inverse of each metric's own
scaling, so a wrong scaling (res instead of res - 1, or the reverse) or swapped x/y changes the numbers.
No fixture distance lies exactly on a PCK threshold.
"""

import ast
import json
import os

import pytest
import torch
import torch.nn.functional as F

from eval import (attention_flops, count_flops, direction_cosine, diversity, endpoint_error, linear_extrapolation,
                  main, measure, nearest_neighbour_baseline, pck, static_baseline, straight_to_poke_baseline,
                  subsample_time, to_window, trajectory_mse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def units(pixels, size):
    """Inverse of eval.to_pixels: u = 2 * p / size - 1 (PCK: size = res - 1; MSE family: size = res)."""
    return 2 * torch.as_tensor(pixels, dtype=torch.float64) / size - 1


# ---------------------------------------------------------------------------------------------------------
# PCK

def pck_fixture():
    """N = 2 tracks, T = 2 frames at 256x256; distances 0.5 (x only), 3 (y only), 5 (3-4-5), 20 (x only)."""
    gt_px = torch.tensor([[[100.0, 50.0], [110.0, 60.0]],
                          [[30.0, 200.0], [40.0, 220.0]]])                 # [N=2, T=2, 2]
    offset = torch.tensor([[[0.5, 0.0], [0.0, 3.0]],
                           [[3.0, 4.0], [20.0, 0.0]]])
    return units(gt_px + offset, 255), units(gt_px, 255)


def test_pck_hand_computed():
    pred, gt = pck_fixture()
    out = pck(pred, gt)
    # within 1: {0.5}; within 2: {0.5}; within 4: {0.5, 3}; within 8 and 16: {0.5, 3, 5}
    expected = {"delta_1": 25.0, "delta_2": 25.0, "delta_4": 50.0, "delta_8": 75.0, "delta_16": 75.0}
    for key, value in expected.items():
        assert out[key] == pytest.approx(value)
    assert out["delta_avg"] == pytest.approx(50.0)
    assert set(out) == set(expected) | {"delta_avg"}
    assert all(isinstance(v, float) for v in out.values())


def test_pck_mask_selects_point_frames():
    pred, gt = pck_fixture()
    mask = torch.tensor([[True, True], [True, False]])     # drop the point-frame that is 20 px off
    out = pck(pred, gt, mask=mask)
    assert out["delta_1"] == pytest.approx(100 / 3)
    assert out["delta_4"] == pytest.approx(200 / 3)
    assert out["delta_8"] == pytest.approx(100.0)
    assert out["delta_avg"] == pytest.approx((100 / 3 + 100 / 3 + 200 / 3 + 100 + 100) / 5)
    with pytest.raises(ValueError):
        pck(pred, gt, mask=torch.zeros(2, 2, dtype=torch.bool))


def test_pck_scales_by_res_minus_one():
    # 0.998 px at (res - 1) / 2 per unit; the same unit offset is 0.998 * 256 / 255 = 1.0019 px at res / 2
    gt = torch.zeros(1, 1, 2, dtype=torch.float64)
    pred = gt + torch.tensor([2 * 0.998 / 255, 0.0], dtype=torch.float64)
    assert pck(pred, gt, thresholds=(1,))["delta_1"] == 100.0
    # at res = 128 the same unit offset is 0.998 * 127 / 255 = 0.497 px: below 0.5
    assert pck(pred, gt, res=128, thresholds=(0.5,)) == {"delta_avg": 100.0, "delta_0.5": 100.0}


def test_pck_perfect_is_100_and_far_is_0():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(3, 5, 7, 2, generator=g) * 2 - 1          # [B, N, T, 2]
    perfect = pck(gt.clone(), gt)
    assert all(v == 100.0 for v in perfect.values())
    far = pck(gt + 0.5, gt)                                   # 0.5 unit = 90 px diagonal at 256
    assert all(v == 0.0 for v in far.values())


def test_pck_rejects_transposed_tracks():
    gt = torch.zeros(4, 6, 2)                                 # [N, T, 2]
    with pytest.raises(ValueError):
        pck(gt.transpose(0, 1), gt)                           # [T, N, 2]
    with pytest.raises(RuntimeError):
        pck(gt, gt, mask=torch.ones(6, 4, dtype=torch.bool))  # mask [T, N]


# ---------------------------------------------------------------------------------------------------------
# Trajectory MSE

def mse_fixture():
    """K = 2 samples of N = 2 tracks, T = 2 frames at 128: sample 0 is off by (2, 0) px, sample 1 by (-1, 3) px."""
    gt_px = torch.tensor([[[10.0, 20.0], [12.0, 25.0]],
                          [[90.0, 64.0], [80.0, 70.0]]])
    offsets = torch.tensor([[2.0, 0.0], [-1.0, 3.0]])[:, None, None, :]    # [K, 1, 1, 2]
    return units(gt_px + offsets, 128), units(gt_px, 128)


def test_trajectory_mse_hand_computed():
    pred, gt = mse_fixture()
    out = trajectory_mse(pred, gt)
    # mse_0 = (2^2 + 0^2) / 2 = 2; mse_1 = (1 + 9) / 2 = 5; mean offset (0.5, 1.5): (0.25 + 2.25) / 2 = 1.25
    assert out == pytest.approx({"min": 2.0, "mean": 3.5, "single": 2.0, "meanT": 1.25})
    swapped = trajectory_mse(pred.flip(0), gt)              # single is sample 0, whichever it is
    assert swapped == pytest.approx({"min": 2.0, "mean": 3.5, "single": 5.0, "meanT": 1.25})


def test_trajectory_mse_single_sample():
    pred, gt = mse_fixture()
    assert trajectory_mse(gt[None].clone(), gt) == {"min": 0.0, "mean": 0.0, "single": 0.0, "meanT": 0.0}
    out = trajectory_mse(pred[1:], gt)                      # K = 1: all four are the same number
    assert out == pytest.approx({"min": 5.0, "mean": 5.0, "single": 5.0, "meanT": 5.0})


@pytest.mark.parametrize("d", [0.5, 1.0, 3.0, 7.0])
def test_trajectory_mse_constant_offset_is_half_d_squared(d):
    g = torch.Generator().manual_seed(1)
    gt_px = torch.rand(5, 6, 2, generator=g, dtype=torch.float64) * 100
    for axis in (0, 1):
        shift = torch.zeros(2, dtype=torch.float64)
        shift[axis] = d
        out = trajectory_mse(units(gt_px + shift, 128)[None], units(gt_px, 128))
        assert out["min"] == pytest.approx(d * d / 2)


def test_trajectory_mse_properties_and_batch_average():
    g = torch.Generator().manual_seed(2)
    gt = torch.rand(3, 4, 16, 2, generator=g) * 2 - 1                   # [B, N, T, 2]
    pred = gt[:, None] + 0.1 * torch.randn(3, 8, 4, 16, 2, generator=g)  # [B, K, N, T, 2]
    out = trajectory_mse(pred, gt)
    assert out["min"] <= out["mean"] and out["min"] <= out["single"]
    assert out["meanT"] < out["mean"]                                    # Jensen; strict for distinct samples
    per_clip = [trajectory_mse(pred[b], gt[b]) for b in range(3)]
    for key in out:
        assert out[key] == pytest.approx(sum(c[key] for c in per_clip) / 3)
    with pytest.raises(ValueError):
        trajectory_mse(pred[0, 0], gt[0])                                 # the K axis is required


# ---------------------------------------------------------------------------------------------------------
# EPE and diversity

def test_endpoint_error_hand_computed():
    gt_px = torch.full((3, 3, 2), 60.0)                                  # N = 3, T = 3
    offset = torch.zeros(2, 3, 3, 2)                                     # [K, N, T, 2]
    offset[:, :, :2] = 50.0                                              # earlier frames must not count
    offset[0, 0, -1] = torch.tensor([3.0, 4.0])                          # 5
    offset[1, 0, -1] = torch.tensor([0.0, 1.0])                          # 1
    offset[0, 1, -1] = torch.tensor([6.0, 8.0])                          # 10
    offset[:, 2, -1] = torch.tensor([0.0, 100.0])                        # 100, track 2 is not poked
    pred, gt = units(gt_px + offset, 128), units(gt_px, 128)
    assert endpoint_error(pred, gt, n_poked=2) == pytest.approx((5 + 1 + 10 + 0) / 4)
    assert endpoint_error(pred, gt) == pytest.approx((5 + 1 + 10 + 0 + 100 + 100) / 6)
    assert endpoint_error(gt[None].clone(), gt, n_poked=1) == 0.0
    with pytest.raises(ValueError):
        endpoint_error(pred, gt, n_poked=0)


def test_diversity_hand_computed():
    samples_px = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])[:, None, None, :]   # [K=3, N=1, T=1, 2]
    pred = units(samples_px, 128)
    assert diversity(pred) == pytest.approx((5 + 10 + 5) / 3)
    assert diversity(pred[:1]) == 0.0                                    # K = 1
    assert diversity(pred[:1].expand(4, 1, 1, 2)) == 0.0                 # identical samples
    batched = torch.stack([pred, pred[[0, 0, 1]]])                       # second clip: pairs 0, 5, 5
    assert diversity(batched) == pytest.approx((20 / 3 + 10 / 3) / 2)


# ---------------------------------------------------------------------------------------------------------
# Baselines

def test_direction_cosine_hand_computed():
    # two clips of N = 2 tracks over T = 3 frames; only the first and last frames count, and the mean over tracks
    gt = torch.zeros(2, 2, 3, 2, dtype=torch.float64)
    gt[0, :, -1] = torch.tensor([[0.2, 0.0], [0.4, 0.0]])      # clip 0 moves right (mean (0.3, 0))
    gt[1, :, -1] = torch.tensor([[0.0, 0.1], [0.0, 0.1]])      # clip 1 moves down
    gt[:, :, 1] = 5.0                                           # the middle frame does not count
    same, opposite = gt.clone(), gt.clone()
    opposite[..., -1, :] = -gt[..., -1, :]
    turned = gt.clone()
    turned[0, :, -1] = torch.tensor([[0.0, 0.3], [0.0, 0.3]])  # clip 0 turned 90 degrees: cosine 0
    turned[1, :, -1] = torch.tensor([[0.1, 0.1], [0.1, 0.1]])  # clip 1 at 45 degrees: 1 / sqrt(2)
    assert direction_cosine(same * 3, gt) == pytest.approx(1.0)  # the length does not count
    assert direction_cosine(opposite, gt) == pytest.approx(-1.0)
    assert direction_cosine(turned, gt) == pytest.approx((0 + 2 ** -0.5) / 2)


def test_static_baseline():
    start = torch.tensor([[0.1, -0.7], [0.4, 0.2], [-0.9, 0.0]])        # [N=3, 2]
    out = static_baseline(start, 5)
    assert out.shape == (3, 5, 2)
    assert torch.equal(out[:, 3], start) and torch.equal(out[:, :, 0], start[:, :1].expand(3, 5))
    batched = static_baseline(start.expand(2, 3, 2), 4)
    assert batched.shape == (2, 3, 4, 2) and torch.equal(batched[1, :, -1], start)


def test_nearest_neighbour_hand_computed():
    enc = torch.zeros(2, 3, 2, dtype=torch.float64)                       # N_e = 2, T = 3
    enc[0, :, 0] = 0.5                                                    # starts at (0.5, -0.5), moves +x
    enc[0, :, 1] = -0.5
    enc[0, :, 0] += torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64)
    enc[1, :, 0] = -0.5                                                   # starts at (-0.5, 0.5), moves -y
    enc[1, :, 1] = 0.5 - torch.tensor([0.0, 0.25, 0.5], dtype=torch.float64)
    query = torch.tensor([[0.375, -0.375], [-0.25, 0.25]], dtype=torch.float64)
    out = nearest_neighbour_baseline(enc, query)
    expected = torch.tensor([[[0.375, -0.375], [0.475, -0.375], [0.575, -0.375]],
                             [[-0.25, 0.25], [-0.25, 0.0], [-0.25, -0.25]]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_nearest_neighbour_exact_tie_takes_lowest_index():
    enc = torch.zeros(2, 2, 2)
    enc[0, :, 0] = torch.tensor([-0.5, -0.25])                            # starts at (-0.5, 0), moves +0.25 x
    enc[1, :, 0] = 0.5
    enc[1, 1, 1] = 0.5                                                    # starts at (0.5, 0), moves +0.5 y
    query = torch.zeros(1, 2)                                             # equidistant from both
    assert torch.equal(nearest_neighbour_baseline(enc, query)[0, 1], torch.tensor([0.25, 0.0]))
    assert torch.equal(nearest_neighbour_baseline(enc.flip(0), query)[0, 1], torch.tensor([0.0, 0.5]))


def test_nearest_neighbour_exact_on_rigid_translation():
    g = torch.Generator().manual_seed(3)
    T = 9
    displacement = torch.randn(2, 1, T, 2, generator=g, dtype=torch.float64) * 0.1
    displacement[..., 0, :] = 0
    enc = torch.rand(2, 6, 1, 2, generator=g, dtype=torch.float64) + displacement   # [B, N_e, T, 2]
    query = torch.rand(2, 11, 2, generator=g, dtype=torch.float64) * 2 - 1          # [B, Q, 2]
    out = nearest_neighbour_baseline(enc, query)
    assert out.shape == (2, 11, T, 2)
    torch.testing.assert_close(out, query[:, :, None] + displacement, rtol=0, atol=1e-12)


def test_straight_to_poke_hand_computed():
    start = torch.tensor([[0.0, 0.0], [0.3, 0.3], [-0.5, 0.5]])
    pokes = torch.tensor([[0.0, 0.0, 0.4, -0.8, 0.5]])                    # goal frame round(0.5 * 4) = 2
    out = straight_to_poke_baseline(start, pokes, torch.tensor([0]), T=5)
    expected = torch.tensor([[0.0, 0.0], [0.2, -0.4], [0.4, -0.8], [0.4, -0.8], [0.4, -0.8]])
    torch.testing.assert_close(out[0], expected)
    assert torch.equal(out[1:], static_baseline(start[1:], 5))             # unpoked points stay still
    # goal time 0.4 -> frame round(1.6) = 2 (not floor); goal time 0 -> at the goal from frame 0
    later = straight_to_poke_baseline(start, torch.tensor([[0.3, 0.3, 1.0, 0.3, 0.4]]), torch.tensor([1]), T=5)
    torch.testing.assert_close(later[1, 1], torch.tensor([0.65, 0.3]))
    assert torch.equal(later[1, 2:], torch.tensor([[1.0, 0.3]]).expand(3, 2))
    now = straight_to_poke_baseline(start, torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]), torch.tensor([0]), T=5)
    assert torch.equal(now[0], torch.ones(5, 2))
    none = straight_to_poke_baseline(start, torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), T=5)
    assert torch.equal(none, static_baseline(start, 5))                    # no pokes: nothing moves


def test_straight_to_poke_endpoints_equal_pokes():
    g = torch.Generator().manual_seed(4)
    B, N, P, T = 3, 10, 4, 64
    start = torch.rand(B, N, 2, generator=g) * 2 - 1
    poke_index = torch.stack([torch.randperm(N, generator=g)[:P] for _ in range(B)])   # [B, P]
    goal = torch.rand(B, P, 2, generator=g) * 2 - 1
    t = torch.rand(B, P, 1, generator=g)
    pokes = torch.cat([start.gather(1, poke_index[..., None].expand(B, P, 2)), goal, t], dim=-1)
    out = straight_to_poke_baseline(start, pokes, poke_index, T)
    assert out.shape == (B, N, T, 2)
    for b in range(B):
        for p in range(P):
            n, f = poke_index[b, p], int(round(float(t[b, p, 0]) * (T - 1)))
            if f > 0:
                assert torch.equal(out[b, n, 0], start[b, n])
            assert torch.equal(out[b, n, f:], goal[b, p].expand(T - f, 2))
        unpoked = [n for n in range(N) if n not in poke_index[b].tolist()]
        assert torch.equal(out[b, unpoked], static_baseline(start[b, unpoked], T))
    with pytest.raises(ValueError):
        straight_to_poke_baseline(start[0], pokes[0, :2], torch.tensor([1, 1]), T)


# ---------------------------------------------------------------------------------------------------------
# Time resampling

def test_subsample_time_hand_computed():
    tracks = torch.tensor([[[0.0, 1.0], [10.0, 2.0], [40.0, 3.0]]])        # [N=1, T=3, 2]
    out = subsample_time(tracks, 5)                                         # source times 0, 0.5, 1, 1.5, 2
    expected = torch.tensor([[[0.0, 1.0], [5.0, 1.5], [10.0, 2.0], [25.0, 2.5], [40.0, 3.0]]])
    torch.testing.assert_close(out, expected)
    assert subsample_time(torch.zeros(7, 3, 2), 5).shape == (7, 5, 2)       # time is dim -2, not the N axis


@pytest.mark.parametrize("T_in, T_out", [(64, 16), (16, 64), (13, 13)])
def test_subsample_time_keeps_endpoints_and_linear_motion(T_in, T_out):
    g = torch.Generator().manual_seed(5)
    tracks = torch.rand(2, 5, T_in, 2, generator=g)
    out = subsample_time(tracks, T_out)
    assert out.shape == (2, 5, T_out, 2)
    assert torch.equal(out[..., 0, :], tracks[..., 0, :]) and torch.equal(out[..., -1, :], tracks[..., -1, :])
    if T_in == T_out:
        assert torch.equal(out, tracks)
    start, velocity = torch.rand(5, 1, 2, generator=g), torch.randn(5, 1, 2, generator=g)
    linear = lambda T: start + velocity * torch.linspace(0, 1, T)[:, None]   # noqa: E731
    torch.testing.assert_close(subsample_time(linear(T_in), T_out), linear(T_out), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# FLOP counting and the speed benchmark's instruments

def test_flop_count_of_a_matmul_only_module():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(32, 16, bias=False))
    x = torch.randn(8, 5, 64)                                  # 40 rows
    out, flops, added = count_flops(lambda: net(x))
    assert out.shape == (8, 5, 16)
    assert flops == 2 * 40 * 64 * 32 + 2 * 40 * 32 * 16 and added == 0
    # forward + backward: the backward of each linear is two matmuls of the same size (input grad, weight grad)
    _, flops_fb, _ = count_flops(lambda: net(x.requires_grad_()).sum().backward())
    assert flops_fb == 3 * flops


def test_flop_count_includes_attention_from_its_shapes():
    q, k, v = torch.randn(2, 3, 16, 8), torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 4)
    forward = 2 * (2 * 3) * 16 * 12 * 8 + 2 * (2 * 3) * 16 * 12 * 4   # q k^T + weights @ v
    assert attention_flops(q.shape, k.shape, v.shape) == forward
    for value in (v, torch.randn(2, 3, 12, 8)):     # (with equal head sizes the CPU's fused kernel runs)
        size = attention_flops(q.shape, k.shape, value.shape)
        _, flops, added = count_flops(lambda: F.scaled_dot_product_attention(q, k, value))
        assert flops == size and added in (0, size)     # counted by FlopCounterMode or, where it missed, from shapes
    # with a backward pass (gradients for q, k and v: four matmuls), twice the forward, whoever counted it
    for value in (v, torch.randn(2, 3, 12, 8)):
        size = attention_flops(q.shape, k.shape, value.shape)
        qkv = [x.clone().requires_grad_() for x in (q, k, value)]
        _, flops, _ = count_flops(lambda: F.scaled_dot_product_attention(*qkv).sum().backward())
        assert flops == 3 * size


def test_measure_and_linear_extrapolation():
    a = torch.randn(64, 64)
    m = measure(lambda: a @ a, torch.device("cpu"), budget_s=0.01)
    assert m["flops"] == 2 * 64 ** 3 and m["runs"] >= 1 and m["s"] > 0 and m["peak_mb"] > 0
    m1 = dict(s=1.0, flops=10, attention_flops_added=0, peak_mb=100.0, extra_mb=5.0)
    m2 = dict(s=1.5, flops=16, attention_flops_added=2, peak_mb=110.0, extra_mb=6.0)
    est = linear_extrapolation(m1, 1, m2, 2, 12)
    assert est == pytest.approx(dict(s=6.5, flops=76, attention_flops_added=22, peak_mb=210.0, extra_mb=16.0))


def test_speed_tiny_preset_rows(tmp_path, capsys):
    out = main(["speed", "--preset", "tiny", "--device", "cpu", "--budget", "0", "--matmul_size", "256",
                "--rows", "encode,decode,velocity,sample", "--json", str(tmp_path / "speed.json")])
    printed = capsys.readouterr().out
    assert "VAE encode" in printed and "MFU %" in printed and "generate = sample + decode" in printed
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved == json.loads(json.dumps(out))
    assert saved["frames"] == 16 and saved["n_points"] == 48 and saved["device"] == "cpu"   # the tiny sizes
    rows = {r["key"]: r for r in saved["rows"]}
    assert set(rows) == {"encode", "decode", "velocity", "sample", "generate"}
    for r in rows.values():
        assert r["ms"] > 0 and r["flops"] > 0 and r["mfu"] > 0 and r["peak_mb"] > 0
        assert r["flops_per_s"] == pytest.approx(r["flops"] / (r["ms"] / 1000))
        assert r["mfu"] == pytest.approx(r["flops_per_s"] / saved["matmul_flops_per_s"])
    assert rows["decode"]["point_frames_per_s"] == pytest.approx(rows["decode"]["samples_per_s"] * 48 * 16)
    assert rows["encode"]["point_frames_per_s"] == pytest.approx(rows["encode"]["samples_per_s"] * 24 * 16)
    assert rows["sample"]["frames_per_s"] == pytest.approx(rows["sample"]["samples_per_s"] * 16)
    assert rows["decode"]["attention_flops_added"] > 0          # CPU: attention counted from the shapes
    # ten network evaluations and the conditions: more than ten velocity evaluations' FLOPs, less than eleven
    assert 10 < rows["sample"]["flops"] / rows["velocity"]["flops"] < 11
    assert rows["generate"]["ms"] == pytest.approx(rows["sample"]["ms"] + rows["decode"]["ms"])


def test_speed_extrapolations_are_exact_in_flops():
    # Dense decoding is affine in the number of points (plus a per-chunk term), a training step affine in the
    # number of (identical) layers: the extrapolated FLOPs equal the full measurement's.
    from vae import PRESETS, VAEConfig
    from eval import SpeedBench, vae_speed_rows
    cfg = VAEConfig(**dict(PRESETS["tiny"], n_frames=4, n_enc=4, n_dec=4, image_size=28, image_pos_size=28,
                           image_dim=32, image_layers=1, image_heads=2, dim=32, enc_layers=3, dec_layers=3,
                           head_dim=16, latent_channels=4, grid_size=4, fourier_bands=8))
    rows = {}
    for mode in ("never", "always"):
        bench = SpeedBench(torch.device("cpu"), budget_s=0, extrapolate=mode, only={"dense64", "train_vae"},
                           matmul_size=128)
        vae_speed_rows(bench, cfg, B=2, T=4, dense_sizes=((64, 64),))
        rows[mode] = {r["key"]: r for r in bench.rows}
        assert set(rows[mode]) == {"dense64", "train_vae"}
        assert all(("extrapolated" in r["note"]) == (mode == "always") for r in bench.rows)
    for key in ("dense64", "train_vae"):
        assert rows["always"][key]["flops"] == pytest.approx(rows["never"][key]["flops"], rel=1e-9)
        assert rows["always"][key]["attention_flops_added"] == pytest.approx(
            rows["never"][key]["attention_flops_added"], rel=1e-9)


# ---------------------------------------------------------------------------------------------------------
# The protocols on tiny checkpoints trained here

MICRO_VAE = ["--n_frames=16", "--n_enc=6", "--n_dec=6", "--synth_tracks=256", "--image_size=28",
             "--image_pos_size=28", "--image_dim=32", "--image_layers=1", "--image_heads=2", "--dim=32",
             "--enc_layers=1", "--dec_layers=1", "--head_dim=16", "--latent_channels=4", "--grid_size=4",
             "--fourier_bands=8", "--max_steps=2", "--batch_start=4", "--batch_end=4", "--micro_batch=4",
             "--num_workers=0", "--val_every=1000", "--val_clips=2", "--log_every=1", "--device=cpu"]
MICRO_PLANNER = ["--dim=32", "--layers=1", "--head_dim=16", "--time_dim=16", "--cond_dim=32", "--fourier_bands=8",
                 "--max_pokes=4", "--norm_samples=8", "--max_steps=2", "--batch_start=4", "--batch_end=4",
                 "--micro_batch=4", "--num_workers=0", "--val_clips=2", "--val_k=2", "--val_steps=1",
                 "--val_every=1000", "--log_every=1", "--device=cpu"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A VAE and a planner trained for 2 steps by their own main() (16 frames, 4x4x4 latents, 28 px)."""
    import planner
    import vae
    root = tmp_path_factory.mktemp("eval_ckpt")
    vae.main(MICRO_VAE + [f"--out_dir={root / 'vae'}"])
    planner.main(MICRO_PLANNER + [f"--vae={root / 'vae' / 'ckpt.pt'}", f"--out_dir={root / 'planner'}"])
    return str(root / "vae" / "ckpt.pt"), str(root / "planner" / "ckpt.pt")


def test_recon_protocol_json_and_determinism(checkpoints, tmp_path, capsys):
    vae_ckpt, _ = checkpoints
    args = ["recon", "--vae", vae_ckpt, "--clips", "3", "--batch", "2"]
    out = main(args + ["--json", str(tmp_path / "recon.json")])
    assert json.loads((tmp_path / "recon.json").read_text()) == out
    assert (out["clips"], out["frames"], out["n_enc"], out["n_dec"], out["res"]) == (3, 16, 6, 6, 256)
    thresholds = {"delta_avg", "delta_1", "delta_2", "delta_4", "delta_8", "delta_16"}
    assert set(out["pck"]) == {"VAE", "static", "nearest_neighbour"}
    assert set(out["pck"]["VAE"]) == {"AE", "MAE"} and set(out["pck"]["nearest_neighbour"]) == {"MAE"}
    for parts in out["pck"].values():
        for numbers in parts.values():
            assert set(numbers) == thresholds and all(0 <= v <= 100 for v in numbers.values())
    assert "nearest_neighbour" in capsys.readouterr().out
    assert main(args)["pck"] == out["pck"]                                  # seeded: the same clips and tracks
    assert main(args + ["--seed", "1"])["pck"]["static"] != out["pck"]["static"]


def test_recon_reads_a_folder_of_clips_and_skips_short_ones(checkpoints, tmp_path):
    from data import make_synthetic_clip, save_clip
    for i, frames in enumerate((16, 20, 9)):                               # the last is shorter than a window
        clip = make_synthetic_clip(100 + i, frames, 64, 80, 128)
        save_clip(str(tmp_path / f"{i}.npz"), clip["video"], clip["tracks"], clip["visibility"], clip["text"])
    with pytest.warns(UserWarning, match="9 frames"):
        out = main(["recon", "--vae", checkpoints[0], "--data", str(tmp_path), "--clips", "10"])
    assert out["clips"] == 2 and out["data"] == str(tmp_path)


def test_tracks_protocol_rows_and_baselines(checkpoints, tmp_path):
    vae_ckpt, planner_ckpt = checkpoints
    out = main(["tracks", "--vae", vae_ckpt, "--planner", planner_ckpt, "--clips", "2", "--k", "3",
                "--pokes", "1,2,dense", "--steps", "1,2", "--json", str(tmp_path / "tracks.json")])
    assert json.loads((tmp_path / "tracks.json").read_text()) == out
    assert (out["clips"], out["k"], out["window"], out["model_frames"], out["n_tracks"]) == (2, 3, 16, 16, 40)
    rows = {(r["method"], r["steps"], r["pokes"]): r for r in out["rows"]}
    assert len(rows) == len(out["rows"]) == 3 * 2 + 2 * 3
    keys = {"method", "steps", "pokes", "n_pokes", "min", "mean", "single", "meanT", "epe", "min_unpoked", "diversity"}
    assert all(set(r) == keys for r in out["rows"])
    assert rows[("planner", 2, "dense")]["n_pokes"] == 40
    for (method, steps, pokes), r in rows.items():
        assert r["min"] <= r["single"] + 1e-9 and r["min"] <= r["mean"] and r["meanT"] <= r["mean"] + 1e-9
        if method == "planner":
            assert r["diversity"] > 0                                      # K = 3 different samples
        else:
            assert r["min"] == r["mean"] == r["single"] == r["meanT"] and r["diversity"] == 0
    # the straight line ends on the poke, which is where the poked track is at the last frame
    for pokes in ("1", "2", "dense"):
        assert rows[("straight_to_poke", None, pokes)]["epe"] == 0 < rows[("static", None, pokes)]["epe"]
    assert rows[("straight_to_poke", None, "dense")]["min"] < rows[("static", None, "dense")]["min"]
    # the static baseline's MSE is over all 40 tracks, whatever the pokes
    assert rows[("static", None, "1")]["min"] == rows[("static", None, "dense")]["min"]
    # unpoked Min-MSE: the straight-to-poke baseline leaves the unpoked tracks standing, as static does; none if
    # every track is poked
    for pokes in ("1", "2"):
        assert rows[("straight_to_poke", None, pokes)]["min_unpoked"] == rows[("static", None, pokes)]["min_unpoked"]
    assert rows[("static", None, "2")]["min_unpoked"] != rows[("static", None, "1")]["min_unpoked"]
    assert rows[("planner", 1, "dense")]["min_unpoked"] is None and out["poke_guidance"] == 0
    with pytest.raises(SystemExit, match="--poke-guidance -1: expected a strength >= 0"):
        main(["tracks", "--vae", vae_ckpt, "--planner", planner_ckpt, "--clips", "1", "--poke-guidance", "-1"])


def test_tracks_libero_protocol_text_and_subsampled_window(checkpoints):
    vae_ckpt, planner_ckpt = checkpoints
    common = ["tracks", "--vae", vae_ckpt, "--planner", planner_ckpt, "--clips", "1", "--k", "2", "--protocol",
              "libero"]
    out = main(common + ["--text"])
    assert (out["window"], out["n_tracks"], out["text"]) == (16, 32, True)
    assert [(r["method"], r["pokes"], r["epe"]) for r in out["rows"]] == [("static", "0", None), ("planner", "0", None)]
    out = main(common + ["--window", "4", "--pokes", "2"])                  # the model's 16 frames -> 4
    assert (out["window"], out["model_frames"]) == (4, 16)
    assert out["rows"][-1]["method"] == "planner" and out["rows"][-1]["min"] > 0


def test_to_window_subsamples_keeping_first_and_last_frames():
    pred = torch.randn(2, 3, 5, 64, 2)
    out = to_window(pred, 16)
    assert out.shape == (2, 3, 5, 16, 2)
    assert torch.equal(out[..., 0, :], pred[..., 0, :]) and torch.equal(out[..., -1, :], pred[..., -1, :])
    torch.testing.assert_close(out[..., 5, :], pred[..., 21, :])           # 5 * 63 / 15 = 21 exactly
    assert to_window(pred, 64) is pred


def test_bad_inputs_are_named(checkpoints, tmp_path, capsys):
    vae_ckpt, planner_ckpt = checkpoints
    with pytest.raises(SystemExit, match="--vae: .*no such checkpoint"):
        main(["recon", "--vae", str(tmp_path / "missing.pt")])
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="--vae: .*not a readable checkpoint"):
        main(["recon", "--vae", str(tmp_path / "corrupt.pt")])
    with pytest.raises(SystemExit, match="--planner: .*expected a 'planner' checkpoint, got 'vae'"):
        main(["tracks", "--vae", vae_ckpt, "--planner", vae_ckpt])
    with pytest.raises(SystemExit, match="--pokes: 41 pokes"):
        main(["tracks", "--vae", vae_ckpt, "--planner", planner_ckpt, "--pokes", "41"])
    with pytest.raises(SystemExit, match="--data: "):
        main(["recon", "--vae", vae_ckpt, "--data", str(tmp_path / "nothing_here")])
    for argv in (["tracks", "--pokes", "1,two"], ["tracks", "--steps", "0"], ["recon", "--clips", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and f"argument {argv[1]}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])


def test_eval_imports_no_stage_at_module_level():
    with open(os.path.join(ROOT, "eval.py")) as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported & {"vae", "planner", "data"} == set()
    assert "torch" in imported
