"""Tests for data.py: the clip format, synthetic motion, drawing, track selection, readers and batches."""
import io
import os
import tarfile
import warnings

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import data

T, N, H, W = 12, 7, 20, 36  # T != N and H != W everywhere, so swapped axes cannot pass


def bilinear(image, x, y):
    """Colour of image [H, W, 3] at float pixels (x, y) [M], bilinear (written here, independent of data.py)."""
    h, w = image.shape[:2]
    x0 = np.clip(np.floor(x).astype(int), 0, w - 2)
    y0 = np.clip(np.floor(y).astype(int), 0, h - 2)
    fx, fy, im = (x - x0)[:, None], (y - y0)[:, None], image.astype(float)
    return (im[y0, x0] * (1 - fx) * (1 - fy) + im[y0, x0 + 1] * fx * (1 - fy)
            + im[y0 + 1, x0] * (1 - fx) * fy + im[y0 + 1, x0 + 1] * fx * fy)


def id_clip(t=T, n=N, h=H, w=W):
    """Arrays whose values say where they came from: track i sits at x = 2 + 3 i, frame t at y = 1 + t / 2."""
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    tracks = np.zeros((t, n, 2), np.float32)
    tracks[..., 0] = 2 + 3 * np.arange(n)[None]
    tracks[..., 1] = 1 + 0.5 * np.arange(t)[:, None]
    return video, tracks, np.ones((t, n), bool)


# ---------------------------------------------------------------------------- clip format

def test_pixels_unit_convention_on_non_square_frames():
    xy = np.array([[0, 0], [100, 50], [50, 25]], np.float32)
    unit = data.pixels_to_unit(xy, width=101, height=51)
    np.testing.assert_allclose(unit, [[-1, -1], [1, 1], [0, 0]], atol=1e-6)
    assert unit.dtype == np.float32
    np.testing.assert_allclose(data.unit_to_pixels(unit, 101, 51), xy, atol=1e-4)
    as_torch = data.pixels_to_unit(torch.tensor([[100.0, 0.0]]), 101, 51)
    assert isinstance(as_torch, torch.Tensor) and as_torch.tolist() == [[1.0, -1.0]]


def test_save_load_round_trip(tmp_path):
    video, tracks, vis = id_clip()
    vis[3, 2] = False
    actions = np.arange(T * 4, dtype=np.float32).reshape(T, 4)
    data.save_clip(tmp_path / "a.npz", video, tracks, vis, text="the red square moves up", actions=actions)
    data.save_clip(tmp_path / "b.npz", video, tracks, vis)
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "b.npz"]  # no temporary files left behind
    a, b = data.load_clip(tmp_path / "a.npz"), data.load_clip(tmp_path / "b.npz")
    for clip in (a, b):
        np.testing.assert_array_equal(clip["video"], video)
        np.testing.assert_array_equal(clip["tracks"], tracks)
        np.testing.assert_array_equal(clip["visibility"], vis)
        assert clip["tracks"].dtype == np.float32 and clip["visibility"].dtype == np.bool_
    assert a["text"] == "the red square moves up" and isinstance(a["text"], str)
    np.testing.assert_array_equal(a["actions"], actions)
    assert b["text"] is None and b["actions"] is None


def test_clip_written_independently_by_numpy(tmp_path):
    video, tracks, vis = id_clip()
    np.savez(tmp_path / "clip.npz", video=video, tracks=tracks.astype(np.float64), visibility=vis)
    clip = data.load_clip(tmp_path / "clip.npz")
    assert clip["tracks"].shape == (T, N, 2) and clip["video"].shape == (T, H, W, 3)
    unit = data.pixels_to_unit(clip["tracks"], W, H)
    x_expected = np.broadcast_to(2 * (2 + 3 * np.arange(N)) / (W - 1) - 1, (T, N))
    y_expected = np.broadcast_to(2 * (1 + 0.5 * np.arange(T))[:, None] / (H - 1) - 1, (T, N))
    np.testing.assert_allclose(unit[..., 0], x_expected, atol=1e-6)
    np.testing.assert_allclose(unit[..., 1], y_expected, atol=1e-6)

    ds = data.TrackDataset(str(tmp_path), split="train", n_frames=8, n_enc=3, n_dec=2, image_size=16)
    item = ds[5]
    px = data.unit_to_pixels(item["tracks"].numpy(), W, H)  # [n, t, 2]: tracks first
    ids = (px[:, 0, 0] - 2) / 3
    np.testing.assert_allclose(ids, np.round(ids), atol=1e-4)
    assert len(set(np.round(ids).astype(int))) == 5  # five distinct tracks: encoder and held-out disjoint
    np.testing.assert_allclose(px[..., 0], px[:, :1, 0].repeat(8, 1), atol=1e-4)  # x is the track's identity
    start = (px[0, 0, 1] - 1) / 0.5
    assert start == round(start) and 0 <= start <= T - 8
    np.testing.assert_allclose(px[..., 1], (1 + 0.5 * (start + np.arange(8)))[None].repeat(5, 0), atol=1e-4)
    assert item["size"].tolist() == [H, W]


def _bad_case(path, case):
    video, tracks, vis = id_clip()
    fields = dict(video=video, tracks=tracks, visibility=vis)
    if case == "missing visibility":
        del fields["visibility"]
    elif case == "float video":
        fields["video"] = video.astype(np.float32)
    elif case == "rank-2 tracks":
        fields["tracks"] = tracks[..., 0]
    elif case == "tracks as [N, T, 2]":
        fields["tracks"] = tracks.transpose(1, 0, 2)
    elif case == "visibility N mismatch":
        fields["visibility"] = np.ones((T, N + 1), bool)
    elif case == "uint8 visibility":
        fields["visibility"] = vis.astype(np.uint8)
    elif case in ("NaN tracks", "inf tracks"):
        tracks[4, 1, 0] = np.nan if case == "NaN tracks" else np.inf
    elif case == "empty clip":
        fields.update(video=video[:0], tracks=tracks[:0], visibility=vis[:0])
    elif case == "no tracks":
        fields.update(tracks=tracks[:, :0], visibility=vis[:, :0])
    elif case == "actions T mismatch":
        fields["actions"] = np.zeros((T + 1, 3), np.float32)
    elif case == "numeric text":
        fields["text"] = np.array(3)
    elif case == "object video":
        fields["video"] = np.array([None, 1], dtype=object)
    if case == "not an npz":
        path.write_text("hello, I am not a clip")
    elif case == "a single npy":
        with open(path, "wb") as f:
            np.save(f, tracks)
    elif case == "a PNG":
        iio.imwrite(path, np.zeros((8, 8, 3), np.uint8), extension=".png")
    else:
        with open(path, "wb") as f:
            np.savez(f, **fields)


BAD = {"missing visibility": "'visibility'", "float video": "'video'", "rank-2 tracks": "'tracks'",
       "tracks as [N, T, 2]": "'tracks'", "visibility N mismatch": "'visibility'", "uint8 visibility": "'visibility'",
       "NaN tracks": "'tracks'", "inf tracks": "'tracks'", "empty clip": "'video'", "no tracks": "'tracks'",
       "actions T mismatch": "'actions'", "numeric text": "'text'", "object video": "'video'",
       "not an npz": "not a .npz clip", "a single npy": "not a .npz clip", "a PNG": "PNG')"}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_clip_raises_value_error_naming_file_and_field(tmp_path, case):
    path = tmp_path / "bad.npz"
    _bad_case(path, case)
    with pytest.raises(ValueError) as info:
        data.load_clip(path)
    assert str(path) in str(info.value) and BAD[case] in str(info.value)


def test_save_clip_refuses_bad_input_and_writes_nothing(tmp_path):
    video, tracks, vis = id_clip()
    with pytest.raises(ValueError, match="'tracks'"):
        data.save_clip(tmp_path / "x.npz", video, tracks.transpose(1, 0, 2), vis)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- synthetic motion

def test_synthetic_clip_is_deterministic_and_render_first_matches():
    a = data.make_synthetic_clip(3, T=10, H=40, W=72, n_tracks=50)
    b = data.make_synthetic_clip(3, T=10, H=40, W=72, n_tracks=50)
    first = data.make_synthetic_clip(3, T=10, H=40, W=72, n_tracks=50, render="first")
    other = data.make_synthetic_clip(4, T=10, H=40, W=72, n_tracks=50)
    assert a["video"].shape == (10, 40, 72, 3) and a["video"].dtype == np.uint8
    assert a["tracks"].shape == (10, 50, 2) and a["tracks"].dtype == np.float32
    assert a["visibility"].shape == (10, 50) and a["visibility"][0].all()  # queries are visible in frame 0
    assert isinstance(a["text"], str) and a["text"]
    for key in ("video", "tracks", "visibility"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["text"] == b["text"]
    assert first["video"].shape == (1, 40, 72, 3)
    np.testing.assert_array_equal(first["video"][0], a["video"][0])
    np.testing.assert_array_equal(first["tracks"], a["tracks"])
    assert not np.array_equal(a["tracks"], other["tracks"])
    assert a["video"][0].std() > 20  # textured, not flat


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_tracks_are_exact(seed):
    """The colour under a visible moving point stays the colour it had in frame 0 (bilinear, within the
    nearest-texel rendering error); the same test on tracks shifted by 2 px fails clearly."""
    clip = data.make_synthetic_clip(seed, T=12, H=96, W=128, n_tracks=400)
    video, tracks, vis = clip["video"], clip["tracks"], clip["visibility"]
    exact, shifted = [], []
    for t in range(1, 12):
        x, y = tracks[t, :, 0], tracks[t, :, 1]
        moved = np.abs(tracks[t] - tracks[0]).max(1) > 1  # still points would pass trivially
        ok = vis[t] & moved & (x >= 2) & (x <= 125) & (y >= 2) & (y <= 93)
        ref = bilinear(video[0], tracks[0, ok, 0], tracks[0, ok, 1])
        exact.append(np.abs(bilinear(video[t], x[ok], y[ok]) - ref).mean(1))
        shifted.append(np.abs(bilinear(video[t], x[ok] + 2, y[ok]) - ref).mean(1))
    exact, shifted = np.concatenate(exact), np.concatenate(shifted)
    assert len(exact) > 200
    assert np.median(exact) < 8, np.median(exact)  # of 255
    assert np.median(shifted) > max(8, 3 * np.median(exact)), (np.median(shifted), np.median(exact))


def _texture(color, radius, seed):
    n = int(np.ceil(2 * radius)) + 1
    shade = data.smooth_noise(np.random.default_rng(seed), n, n, 1, (8, 3))
    return (np.array(data.COLORS[color]) * (0.4 + 0.6 * shade)).astype(np.uint8)


def _hand_scene(T_, H_, W_, shapes):
    """A scene built by hand: no pan, shapes (kind, color, radius, center [T, 2]) without turning or scaling."""
    scene = data.random_scene(0, T_, H_, W_)
    scene["pan"] = np.zeros((T_, 2))
    scene["shapes"] = [dict(kind=kind, color=color, radius=r, texture=_texture(color, r, i), center=center,
                            angle=np.zeros(T_), scale=np.ones(T_))
                       for i, (kind, color, r, center) in enumerate(shapes)]
    return scene


def test_shape_moving_right_on_non_square_clip():
    T_, H_, W_ = 10, 48, 96
    center = np.stack([30 + 3 * np.arange(T_), np.full(T_, 20)], 1).astype(float)
    scene = _hand_scene(T_, H_, W_, [("square", "red", 9.0, center)])
    clip = data.make_synthetic_clip(0, H=H_, W=W_, n_tracks=200, scene=scene)
    assert clip["text"] == "the red square moves to the right"
    unit = data.pixels_to_unit(clip["tracks"], W_, H_)  # [T, N, 2]
    moving = np.abs(unit[-1, :, 0] - unit[0, :, 0]) > 1e-6
    assert 40 < moving.sum() < 200  # points on the square move, background points do not
    np.testing.assert_allclose(np.diff(unit[:, moving, 0], axis=0), 2 * 3 / (W_ - 1), atol=1e-5)  # over W
    np.testing.assert_allclose(unit[:, :, 1], unit[:1, :, 1].repeat(T_, 0), atol=1e-6)  # y constant
    # an integer shift of the scene shifts the nearest-texel rendering exactly
    px = np.rint(clip["tracks"][:, moving]).astype(int)
    colours = clip["video"][np.arange(T_)[:, None], px[..., 1], px[..., 0]]
    np.testing.assert_array_equal(colours, colours[:1].repeat(T_, 0))


def test_visibility_under_occlusion_and_off_screen():
    T_, H_, W_ = 16, 40, 80
    still = np.tile([25.0, 20.0], (T_, 1))
    passing = np.stack([5 + 6 * np.arange(T_), np.full(T_, 20)], 1).astype(float)  # crosses, then leaves
    scene = _hand_scene(T_, H_, W_, [("square", "blue", 8.0, still), ("circle", "red", 7.0, passing)])
    clip = data.make_synthetic_clip(1, H=H_, W=W_, n_tracks=300, scene=scene)
    tracks, vis, video = clip["tracks"], clip["visibility"], clip["video"]
    on_blue = (np.abs(tracks[0] - [25, 20]).max(1) <= 8) & (np.hypot(*(tracks[0] - [5, 20]).T) > 7.5)
    blue = tracks[:, on_blue]
    np.testing.assert_array_equal(blue, blue[:1].repeat(T_, 0))  # the blue square stays
    px = np.rint(blue).astype(int)
    unchanged = (video[np.arange(T_)[:, None], px[..., 1], px[..., 0]] == video[0, px[0, :, 1], px[0, :, 0]]).all(-1)
    assert (~vis[:, on_blue]).sum() > 20  # the red circle covers some of them
    assert (unchanged == vis[:, on_blue]).mean() > 0.95  # hidden exactly when the pixel shows the circle
    red = np.abs(tracks[-1, :, 0] - tracks[0, :, 0] - 6 * (T_ - 1)) < 1e-3
    assert red.sum() > 20 and vis[:, red][0].all()
    off = tracks[:, red, 0] > W_ - 1
    assert off[-1].all() and not vis[:, red][off].any()  # left the frame: hidden, coordinates kept


def test_camera_pan_moves_background_tracks():
    T_, H_, W_ = 8, 32, 48
    scene = _hand_scene(T_, H_, W_, [])
    scene["pan"] = np.stack([2 * np.arange(T_), -np.arange(T_)], 1).astype(float)
    clip = data.make_synthetic_clip(2, H=H_, W=W_, n_tracks=60, scene=scene)
    assert clip["text"] == "the camera pans and the whole scene moves to the upper right"
    np.testing.assert_allclose(clip["tracks"] - clip["tracks"][:1], scene["pan"][:, None].repeat(60, 1), atol=1e-4)
    px = np.rint(clip["tracks"]).astype(int)
    vis = clip["visibility"]
    colours = clip["video"][np.arange(T_)[:, None], px[..., 1].clip(0, H_ - 1), px[..., 0].clip(0, W_ - 1)]
    assert vis.sum() > 200 and (colours == colours[:1])[vis].all()


def test_captions_name_colour_kind_and_direction():
    T_ = 8
    up_left = np.stack([60 - 4 * np.arange(T_), 40 - 4 * np.arange(T_)], 1).astype(float)
    scene = _hand_scene(T_, 64, 96, [("circle", "green", 6.0, np.tile([20.0, 20.0], (T_, 1))),
                                      ("triangle", "blue", 6.0, up_left)])
    assert data.describe_motion(scene, 64, 96) == "the blue triangle moves to the upper left"
    assert data.direction_words(0, 5) == "down" and data.direction_words(-3, 0) == "to the left"


# ---------------------------------------------------------------------------- drawing

def test_time_colors_ramp():
    np.testing.assert_array_equal(data.time_colors(4), [[0, 0, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0]])
    ramp = data.time_colors(9)
    assert ramp.dtype == np.uint8 and ramp.shape == (9, 3)
    assert (np.diff(ramp[:, 0].astype(int)) >= 0).all() and (np.diff(ramp[:, 2].astype(int)) <= 0).all()


def test_draw_tracks_puts_x_along_width():
    image = np.zeros((20, 40, 3), np.uint8)
    track = np.stack([np.linspace(2, 37, 5), np.full(5, 5.0)], 1)[None]  # [N=1, T=5, 2]: along row 5
    out = data.draw_tracks(image, track, radius=0)
    assert out[5, 2:38].any(-1).all() and not out[:5].any() and not out[6:].any()
    assert out[5, 3, 2] > out[5, 3, 0] and out[5, 36, 0] > out[5, 36, 2]  # blue at the start, red at the end
    hidden = data.draw_tracks(image, track, visible=np.array([[True, True, False, True, True]]), radius=0)
    assert hidden[5, 2:38].any(-1).sum() < out[5, 2:38].any(-1).sum()
    with pytest.raises(ValueError, match="colors"):
        data.draw_tracks(image, np.zeros((3, 5, 2)), colors=np.zeros((3, 3)))


# ---------------------------------------------------------------------------- track selection

def _moving_and_static():
    rng = np.random.default_rng(0)
    tracks = rng.uniform(-0.5, 0.5, (6, 10, 1)) * np.ones((1, 1, 2))
    tracks = tracks[:, :1].repeat(10, 1) + rng.normal(0, 1e-3, (6, 10, 2))  # tracks 0..2 stay put
    tracks[3:, :, 0] += np.linspace(0, 0.5, 10)  # tracks 3..5 move right
    return tracks.astype(np.float32)


def test_static_tracks_and_evaluation_selection():
    tracks = _moving_and_static()
    np.testing.assert_array_equal(data.is_static(tracks), [True, True, True, False, False, False])
    vis = np.ones((6, 10), bool)
    vis[4, 0] = False  # not visible in the first frame: never selected
    index = data.select_eval_tracks(tracks, vis, n=4, seed=1)
    assert sorted(index[:2]) == [3, 5] and set(index[2:]) <= {0, 1, 2} and len(index) == 4
    np.testing.assert_array_equal(index, data.select_eval_tracks(tracks, vis, n=4, seed=1))
    assert len(data.select_eval_tracks(tracks, vis, n=40)) == 5
    with pytest.raises(ValueError, match="visibility"):
        data.select_eval_tracks(tracks, vis.T, n=4)


def test_sample_pokes():
    tracks = _moving_and_static()
    pokes, index = data.sample_pokes(tracks, 2)
    np.testing.assert_array_equal(index, [0, 1])
    np.testing.assert_allclose(pokes, np.concatenate([tracks[:2, 0], tracks[:2, -1], np.ones((2, 1))], 1))
    assert pokes.dtype == np.float32 and pokes.shape == (2, 5)
    half, _ = data.sample_pokes(tracks, 3, end_t=0.5)
    np.testing.assert_allclose(half[:, 2:4], tracks[:3, 4])
    np.testing.assert_allclose(half[:, 4], 4 / 9)
    random, rindex = data.sample_pokes(torch.from_numpy(tracks), 4, rng=np.random.default_rng(0))
    assert isinstance(random, torch.Tensor) and len(set(rindex.tolist())) == 4
    np.testing.assert_allclose(random[:, :2].numpy(), tracks[rindex.numpy(), 0])
    with pytest.raises(ValueError):
        data.sample_pokes(tracks, 7)


# ---------------------------------------------------------------------------- readers

@pytest.fixture(scope="module")
def mp4_bytes():
    rng = np.random.default_rng(0)
    return iio.imwrite("<bytes>", rng.integers(0, 256, (T, 48, 64, 3), dtype=np.uint8), extension=".mp4", fps=10)


def test_tar_reader_flips_yx_to_xy(tmp_path, mp4_bytes):
    h, w = 48, 64
    px = np.zeros((T, N, 2), np.float32)  # wanted (x, y) pixels
    px[..., 0] = 50 - np.arange(N)[None]
    px[..., 1] = 10 + np.arange(T)[:, None]
    yx = data.pixels_to_unit(px, w, h)[..., ::-1]
    vis = np.ones((T, N), bool)
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, payload in [("s1.video.mp4", mp4_bytes), ("s1.tracks_yx.npy", yx), ("s1.visibility.npy", vis),
                              ("s2.video.mp4", mp4_bytes), ("s2.tracks_yx.npy", yx), ("s2.visibility.npy", vis),
                              ("README.txt", b"not a sample")]:
            if isinstance(payload, np.ndarray):
                buffer = io.BytesIO()
                np.save(buffer, payload)
                payload = buffer.getvalue()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    clip = data.load_tar_sample(str(shard), "s1")
    assert clip["video"].shape == (T, h, w, 3)
    np.testing.assert_allclose(clip["tracks"], px, atol=1e-4)
    ds = data.TrackDataset(str(tmp_path / "*.tar"), split="val", n_frames=8, n_enc=3, n_dec=2, image_size=16)
    assert len(ds) == 2
    item = ds[1]
    assert item["tracks"].shape == (5, 8, 2) and item["size"].tolist() == [h, w]
    np.testing.assert_allclose(data.unit_to_pixels(item["tracks"].numpy(), w, h)[..., 1],  # y: the frame
                               np.broadcast_to(10 + np.arange(8.0), (5, 8)), atol=1e-4)


def test_import_command_converts_layout_order_and_units(tmp_path, mp4_bytes):
    video_path = tmp_path / "v.mp4"
    video_path.write_bytes(mp4_bytes)
    px = np.zeros((T, N, 2), np.float32)
    px[..., 0] = 3 + 2 * np.arange(N)[None]
    px[..., 1] = 40 - np.arange(T)[:, None]
    vis = np.random.default_rng(0).random((T, N)) > 0.2
    nt_yx_unit = data.pixels_to_unit(px, 64, 48)[..., ::-1].transpose(1, 0, 2)
    np.save(tmp_path / "tracks.npy", nt_yx_unit)
    np.save(tmp_path / "vis.npy", vis.T.astype(np.float32))
    data.main(["import", "--video", str(video_path), "--tracks", str(tmp_path / "tracks.npy"),
               "--visibility", str(tmp_path / "vis.npy"), "--layout", "NT2", "--order", "yx", "--units", "unit",
               "--out", str(tmp_path / "clip.npz")])
    clip = data.load_clip(tmp_path / "clip.npz")
    np.testing.assert_allclose(clip["tracks"], px, atol=1e-4)
    np.testing.assert_array_equal(clip["visibility"], vis)
    with pytest.raises(ValueError, match="'tracks'"):  # the same file read as [T, N, 2]
        data.import_clip(clip["video"], nt_yx_unit, order="yx", units="unit")
    with pytest.raises(SystemExit, match="tracks"):
        data.main(["import", "--video", str(video_path), "--tracks", str(tmp_path / "tracks.npy"),
                   "--out", str(tmp_path / "wrong.npz")])
    assert not (tmp_path / "wrong.npz").exists()


def test_track_video_with_a_stand_in_tracker():
    video = np.zeros((T, H, W, 3), np.uint8)

    def drift_right(frames, queries):
        tracks = queries[None] + np.stack([np.arange(len(frames)), np.zeros(len(frames))], 1)[:, None]
        return tracks, np.ones(tracks.shape[:2], np.float32)

    clip = data.track_video(video, drift_right, n_points=N + 3, seed=0)
    assert clip["tracks"].shape == (T, N + 3, 2) and clip["visibility"].all()
    assert (clip["tracks"][0, :, 0] <= W - 1).all() and (clip["tracks"][0, :, 1] <= H - 1).all()
    np.testing.assert_allclose(clip["tracks"][-1] - clip["tracks"][0], [[T - 1, 0]] * (N + 3), atol=1e-5)
    np.testing.assert_array_equal(clip["tracks"], data.track_video(video, drift_right, N + 3, seed=0)["tracks"])
    with pytest.warns(UserWarning, match="swapped"):
        data.track_video(video, lambda v, q: drift_right(v, q[:, ::-1]), n_points=N + 3)


def test_cotracker_stops_at_once_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        data.load_cotracker()


# ---------------------------------------------------------------------------- model batches

TINY = dict(n_frames=8, n_enc=6, n_dec=4, image_size=28, synth_size=(40, 56), synth_tracks=64)


def test_synthetic_items_shapes_dtypes_and_determinism():
    ds = data.TrackDataset("synthetic", seed=0, **TINY)
    item = ds[3]
    assert len(ds) == 100_000 and len(data.TrackDataset("synthetic", split="val", **TINY)) == 64
    assert item["image"].shape == (3, 28, 28) and item["image"].dtype == torch.float32
    assert item["frame"].shape == (28, 28, 3) and item["frame"].dtype == torch.uint8
    assert item["tracks"].shape == (10, 8, 2) and item["tracks"].dtype == torch.float32
    assert item["visible"].shape == (10, 8) and item["visible"].dtype == torch.bool
    assert item["size"].tolist() == [40, 56] and item["size"].dtype == torch.int64
    assert isinstance(item["text"], str) and item["text"] and item["index"] == 3
    assert item["visible"][:, 0].all()  # kept tracks are visible in the window's first frame
    assert item["tracks"][:, 0].abs().max() <= 1 + 1e-6
    assert len({tuple(p) for p in item["tracks"][:, 0].tolist()}) == 10  # encoder and held-out tracks differ
    mean, std = torch.tensor(data.IMAGENET_MEAN), torch.tensor(data.IMAGENET_STD)
    expected = (item["frame"].permute(2, 0, 1).float() / 255 - mean[:, None, None]) / std[:, None, None]
    assert (item["image"] - expected).abs().max() < 0.01
    again = data.TrackDataset("synthetic", seed=0, **TINY)[3]
    for key in ("image", "tracks", "visible"):
        assert torch.equal(item[key], again[key])
    assert not torch.equal(item["tracks"], ds[4]["tracks"])
    assert not torch.equal(item["tracks"], data.TrackDataset("synthetic", seed=1, **TINY)[3]["tracks"])
    assert not torch.equal(item["tracks"], data.TrackDataset("synthetic", split="val", **TINY)[3]["tracks"])


def test_dataloader_with_workers_and_distributed_sampler_matches_direct_items():
    ds = data.TrackDataset("synthetic", seed=5, length=16, **TINY)
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2)
    seen = []
    for batch in loader:
        assert batch["tracks"].shape == (4, 10, 8, 2) and len(batch["text"]) == 4
        for row, index in enumerate(batch["index"].tolist()):
            direct = ds[index]
            assert torch.equal(batch["tracks"][row], direct["tracks"])
            assert torch.equal(batch["image"][row], direct["image"])
            seen.append(index)
    assert seen == list(sampler) and len(seen) == 8


def test_file_source_epochs_windows_and_bad_clips(tmp_path):
    video, tracks, vis = id_clip()
    for i in range(3):
        data.save_clip(tmp_path / f"c{i}.npz", video, tracks + 100 * i, vis, text=f"clip {i}")
    ds = data.TrackDataset(str(tmp_path), split="train", seed=0, n_frames=8, n_enc=2, n_dec=2, image_size=16)
    assert len(ds) == 3
    epoch0 = sorted(ds[i]["text"] for i in range(3))
    assert epoch0 == ["clip 0", "clip 1", "clip 2"]  # each clip once per epoch
    assert sorted(ds[i]["text"] for i in range(3, 6)) == epoch0  # indices beyond len() are the next epoch
    assert torch.equal(ds[4]["tracks"], ds[4]["tracks"])
    val = data.TrackDataset(str(tmp_path), split="val", n_frames=8, n_enc=2, n_dec=2, image_size=16)
    assert [val[i]["text"] for i in range(3)] == ["clip 0", "clip 1", "clip 2"]
    y = data.unit_to_pixels(val[0]["tracks"].numpy(), W, H)[0, :, 1]
    np.testing.assert_allclose(y, 1 + 0.5 * np.arange(8), atol=1e-4)  # the first window

    few = tmp_path / "few"  # too few tracks, a clip too short and a broken file: handled, never a crash
    data.save_clip(few / "a_short.npz", video[:4], tracks[:4], vis[:4])
    (few / "b_broken.npz").write_text("broken")
    data.save_clip(few / "c_few.npz", video, tracks, vis)
    ds = data.TrackDataset(str(few), split="val", n_frames=8, n_enc=6, n_dec=4, image_size=16)
    with pytest.warns(UserWarning) as record:
        item = ds[0]
    messages = " ".join(str(w.message) for w in record)
    assert "a_short.npz" in messages and "b_broken.npz" in messages and "repeating" in messages
    assert item["tracks"].shape == (10, 8, 2)
    with pytest.raises(ValueError, match="no usable clip"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data.TrackDataset(str(few / "a_short.npz"), n_frames=8, n_enc=2, n_dec=2, image_size=16)[0]
    with pytest.raises(ValueError, match="no .npz clips"):
        data.TrackDataset(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------- command line

def test_synth_and_show_commands(tmp_path):
    out = tmp_path / "synth"
    data.main(["synth", "--out", str(out), "--n", "2", "--seed", "7", "--frames", "6", "--height", "40",
               "--width", "56", "--tracks", "32"])
    assert sorted(os.listdir(out)) == ["000000.npz", "000001.npz"]
    clip = data.load_clip(out / "000001.npz")
    np.testing.assert_array_equal(clip["tracks"], data.make_synthetic_clip(8, 6, 40, 56, 32)["tracks"])
    data.main(["show", str(out / "000000.npz"), "--out", str(tmp_path / "tracks.gif"), "--n-tracks", "8"])
    frames = iio.imread(tmp_path / "tracks.gif")
    assert frames.shape[:3] == (6, 40, 56)
