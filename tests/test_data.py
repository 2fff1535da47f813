"""Tests for data.py: unit coordinates, output checks and atomic writes, the clip format, synthetic motion with exact
tracks, drawing, track selection, tracker output and the authors' .tar shards, TrackDataset and the command line."""
import io
import os
import sys
import tarfile
import warnings

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import data
from conftest import run

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


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# ---------------------------------------------------------------------------- unit coordinates

def test_pixels_unit_convention_on_non_square_frames():
    xy = np.array([[0, 0], [100, 50], [50, 25]], np.float32)
    unit = data.pixels_to_unit(xy, width=101, height=51)
    np.testing.assert_allclose(unit, [[-1, -1], [1, 1], [0, 0]], atol=1e-6)
    assert unit.dtype == np.float32
    np.testing.assert_allclose(data.unit_to_pixels(unit, 101, 51), xy, atol=1e-4)
    as_torch = data.pixels_to_unit(torch.tensor([[100.0, 0.0]], dtype=torch.float64), 101, 51)
    assert isinstance(as_torch, torch.Tensor) and as_torch.dtype == torch.float64
    torch.testing.assert_close(as_torch, torch.tensor([[1.0, -1.0]], dtype=torch.float64))
    back = data.unit_to_pixels(torch.tensor([[0.5, -0.5]]), 101, 51)
    torch.testing.assert_close(back, torch.tensor([[75.0, 12.5]]))


# ---------------------------------------------------------------------------- output paths and atomic writes

def test_check_output_names_the_flag_when_the_wrong_kind_is_in_the_way(tmp_path):
    a_file, a_folder = tmp_path / "clip.npz", tmp_path / "clips"
    a_file.write_bytes(b"x")
    a_folder.mkdir()
    with pytest.raises(ValueError, match="--out .*clip.npz.*a folder"):
        data.check_output(str(a_file), "--out", folder=True)
    with pytest.raises(ValueError, match="--save .*clips.*a file"):
        data.check_output(str(a_folder), "--save")
    with pytest.raises(ValueError, match="--out"):  # a file where a folder above the output has to go
        data.check_output(str(a_file / "deeper" / "x.npz"), "--out")
    # the right kind, or nothing yet (however deep), is fine
    data.check_output(str(a_file), "--out")
    data.check_output(str(a_folder), "--out", folder=True)
    data.check_output(str(tmp_path / "new" / "deeper" / "x.npz"), "--out")
    assert sorted(os.listdir(tmp_path)) == ["clip.npz", "clips"]  # checking creates nothing


def test_write_atomically_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "sub" / "f.bin")
    data.write_atomically(path, lambda f: f.write(b"first"))
    assert open(path, "rb").read() == b"first"

    def broken(f):
        f.write(b"half")
        raise KeyboardInterrupt  # a kill in the middle, not only an exception

    with pytest.raises(KeyboardInterrupt):
        data.write_atomically(path, broken)
    assert open(path, "rb").read() == b"first" and os.listdir(tmp_path / "sub") == ["f.bin"]


def test_write_atomically_keep_previous(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    data.write_atomically(path, lambda f: f.write(b"one"), keep_previous=True)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # nothing to keep yet
    with open(path + ".prev.tmp", "wb") as f:  # left over by a kill between the link and the rename
        f.write(b"stale")
    data.write_atomically(path, lambda f: f.write(b"two"), keep_previous=True)
    data.write_atomically(path, lambda f: f.write(b"three"), keep_previous=True)
    assert open(path, "rb").read() == b"three" and open(path + ".prev", "rb").read() == b"two"
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt.pt.prev"]


# ---------------------------------------------------------------------------- the clip format

def test_save_load_round_trip(tmp_path):
    video, tracks, vis = id_clip()
    vis[3, 2] = False
    actions = np.arange(T * 4, dtype=np.float32).reshape(T, 4)
    data.save_clip(tmp_path / "a.npz", video, tracks, vis, text="the red square moves up", actions=actions)
    data.save_clip(tmp_path / "b.npz", video, tracks.astype(np.float64), vis, compress=True)
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
    with np.load(tmp_path / "a.npz", allow_pickle=False) as npz:  # the text loads without pickle
        assert str(npz["text"]) == "the red square moves up"


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
    assert "size" not in item
    px = data.unit_to_pixels(item["tracks"].numpy(), W, H)  # [n, t, 2]: tracks first
    ids = (px[:, 0, 0] - 2) / 3
    np.testing.assert_allclose(ids, np.round(ids), atol=1e-4)
    assert len(set(np.round(ids).astype(int))) == 5  # five distinct tracks: encoder and held-out disjoint
    np.testing.assert_allclose(px[..., 0], px[:, :1, 0].repeat(8, 1), atol=1e-4)  # x is the track's identity
    start = (px[0, 0, 1] - 1) / 0.5
    assert abs(start - round(start)) < 1e-3 and 0 <= round(start) <= T - 8
    np.testing.assert_allclose(px[..., 1], (1 + 0.5 * (round(start) + np.arange(8)))[None].repeat(5, 0), atol=1e-4)


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
       "not an npz": "not a .npz clip", "a single npy": "not a .npz clip", "a PNG": "PNG'"}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_clip_raises_value_error_naming_file_and_field(tmp_path, case):
    path = tmp_path / "bad.npz"
    _bad_case(path, case)
    with pytest.raises(ValueError) as info:
        data.load_clip(path)
    assert str(path) in str(info.value) and BAD[case] in str(info.value)


@pytest.mark.parametrize("field, change", [
    ("tracks", lambda c: c.update(tracks=c["tracks"].transpose(1, 0, 2))),
    ("tracks", lambda c: c["tracks"].__setitem__((2, 3, 1), np.nan)),
    ("visibility", lambda c: c.update(visibility=c["visibility"].astype(np.float32))),
    ("actions", lambda c: c.update(actions=np.zeros((T - 1, 2), np.float32))),
])
def test_save_clip_refuses_bad_input_and_writes_nothing(tmp_path, field, change):
    video, tracks, vis = id_clip()
    clip = dict(video=video, tracks=tracks, visibility=vis)
    change(clip)
    with pytest.raises(ValueError, match=f"x.npz: field '{field}'"):
        data.save_clip(tmp_path / "x.npz", **clip)
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
    tuple_seed = data.make_synthetic_clip((3, 1), T=10, H=40, W=72, n_tracks=50)
    assert not np.array_equal(tuple_seed["tracks"], a["tracks"])


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


def test_random_scene_fields():
    scene = data.random_scene(5, T=9, H=40, W=72)
    assert scene["pan"].shape == (9, 2) and scene["background"].dtype == np.uint8
    assert scene["background"].shape[0] == scene["background"].shape[1] >= 72
    assert 1 <= len(scene["shapes"]) <= 6
    for shape in scene["shapes"]:
        assert shape["kind"] in data.SHAPES and shape["color"] in data.COLORS
        assert shape["center"].shape == (9, 2) and shape["angle"].shape == (9,) and shape["scale"].shape == (9,)
    np.testing.assert_array_equal(data.random_scene(5, T=9, H=40, W=72)["background"], scene["background"])


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
    still = _hand_scene(T_, 64, 96, [("ring", "pink", 6.0, np.tile([30.0, 30.0], (T_, 1)))])
    assert data.describe_motion(still, 64, 96) == "nothing moves much"
    still["shapes"][0]["angle"] = np.linspace(0, 1, T_)
    assert data.describe_motion(still, 64, 96) == "the pink ring turns in place"
    # image y points down: a negative dy is up
    assert [data.direction_words(*d) for d in [(1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1)]] \
        == list(data.DIRECTIONS)
    assert data.direction_words(0, 5) == "down" and data.direction_words(-3, 0) == "to the left"


# ---------------------------------------------------------------------------- drawing

def test_time_colors_ramp():
    np.testing.assert_array_equal(data.time_colors(4), [[0, 0, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0]])
    ramp = data.time_colors(9)
    assert ramp.dtype == np.uint8 and ramp.shape == (9, 3)
    assert (np.diff(ramp[:, 0].astype(int)) >= 0).all() and (np.diff(ramp[:, 2].astype(int)) <= 0).all()


ROW = np.stack([np.linspace(2, 37, 5), np.full(5, 5.0)], 1)[None]  # [N=1, T=5, 2]: x 2 .. 37 along row 5


def test_draw_tracks_puts_x_along_width_coloured_by_time():
    image = np.zeros((20, 40, 3), np.uint8)
    out = data.draw_tracks(image, ROW)
    assert out.shape == image.shape and not image.any()  # drawn on a copy
    drawn = out.any(-1)
    assert drawn[5, 2:38].all() and drawn.sum() == 36  # one pixel wide, along the row
    colors = data.time_colors(5)
    np.testing.assert_array_equal(out[5, 4], colors[1])  # the segment into point t has point t's colour
    np.testing.assert_array_equal(out[5, 36], colors[4])
    own = data.draw_tracks(image, ROW, colors=np.full((1, 5, 3), (10, 20, 30)))  # [N, T, 3]: one colour per track
    assert (own[drawn] == (10, 20, 30)).all() and not own[~drawn].any()


def test_draw_tracks_visibility_upto_and_outline():
    image = np.zeros((20, 40, 3), np.uint8)
    hidden = data.draw_tracks(image, ROW, visible=np.array([[True, True, False, True, True]]))
    columns = np.flatnonzero(hidden.any(-1)[5])  # no segment touches the hidden point (x 10.75 .. 28.25)
    assert columns.min() == 2 and columns.max() == 37 and not hidden[5, 12:28].any()
    assert hidden[5, 2:10].any(-1).all() and hidden[5, 29:38].any(-1).all()
    upto = data.draw_tracks(image, ROW, upto=2, dot=2)
    ys, xs = np.nonzero(upto.any(-1))
    assert xs.min() == 2 and xs.max() <= 22 and ys.min() < 5 < ys.max()  # frames 0..2 and a dot at x = 19.5
    np.testing.assert_array_equal(upto[5, 19], data.time_colors(5)[2])
    white = np.full((20, 40, 3), 255, np.uint8)
    plain, outlined = data.draw_tracks(white, ROW), data.draw_tracks(white, ROW, outline=True)
    assert (plain[4] == 255).all() and (outlined[4, 5:30] == 0).all()  # black under the path
    np.testing.assert_array_equal(outlined[5], plain[5])


def test_resize_save_image_and_video(tmp_path):
    gradient = np.zeros((20, 40, 3), np.uint8)
    gradient[..., 0] = np.arange(40) * 6  # brighter to the right
    small = data.resize(gradient, 10, 30)
    assert small.shape == (10, 30, 3) and small.dtype == np.uint8
    assert (np.diff(small[0, :, 0].astype(int)) >= 0).all() and (small[:, :, 0] == small[:1, :, 0]).all()
    data.save_image(tmp_path / "a.png", gradient)
    np.testing.assert_array_equal(iio.imread(tmp_path / "a.png"), gradient)
    frames = np.zeros((3, 16, 32, 3), np.uint8)
    frames[0, ..., 0], frames[1, ..., 1], frames[2, ..., 2] = 255, 255, 255  # red, green, blue
    data.write_video(tmp_path / "v.gif", frames)
    data.write_video(tmp_path / "v.mp4", frames)
    for name in ("v.gif", "v.mp4"):
        back = np.asarray(iio.imread(tmp_path / name))[..., :3]
        assert back.shape == (3, 16, 32, 3)
        np.testing.assert_array_equal(back.reshape(3, -1, 3).mean(1).argmax(-1), [0, 1, 2])
    assert sorted(os.listdir(tmp_path)) == ["a.png", "v.gif", "v.mp4"]


def test_track_picture_rows_are_frames_columns_are_track_sets(tmp_path):
    frames = np.zeros((2, 20, 36, 3), np.uint8)
    across = np.stack([np.linspace(-1, 1, 5), np.zeros(5)], 1)[None, None].repeat(2, 0)  # [2, 1, 5, 2]: along x
    down = across[..., ::-1].copy()  # along y
    data.track_picture(tmp_path / "p.png", frames, [across, down], size=32)
    picture = iio.imread(tmp_path / "p.png")
    assert picture.shape == (64, 64, 3)
    for row in range(2):
        left, right = (picture[32 * row:32 * (row + 1), 32 * c:32 * (c + 1)].any(-1) for c in (0, 1))
        assert left.any(0).sum() >= 30 and left.any(1).sum() <= 3  # a horizontal path
        assert right.any(1).sum() >= 30 and right.any(0).sum() <= 3  # a vertical one


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
    jump = tracks.copy()
    jump[0, 9] += 1.0  # one frame of ten away from the start: 90 % < 95 %
    assert not data.is_static(jump)[0] and data.is_static(jump, frac=0.9)[0]
    vis = np.ones((6, 10), bool)
    vis[4, 0] = False  # not visible in the first frame: never selected
    index = data.select_eval_tracks(tracks, vis, n=4, seed=1)
    assert sorted(index[:2]) == [3, 5] and set(index[2:]) <= {0, 1, 2} and len(index) == 4
    np.testing.assert_array_equal(index, data.select_eval_tracks(tracks, vis, n=4, seed=1))
    assert sorted(data.select_eval_tracks(tracks, vis, n=40)) == [0, 1, 2, 3, 5]
    unseen = data.select_eval_tracks(tracks, n=2)  # no visibility: every track usable
    assert len(unseen) == 2 and set(unseen) <= {3, 4, 5}


def test_sample_pokes():
    tracks = _moving_and_static()
    pokes = data.sample_pokes(tracks, 2)
    np.testing.assert_allclose(pokes, np.concatenate([tracks[:2, 0], tracks[:2, -1], np.ones((2, 1))], 1))
    assert pokes.dtype == np.float32 and pokes.shape == (2, 5)
    late = data.sample_pokes(tracks, 3, end_t=0.75)  # time 0.75 of 10 frames: frame 6.75 rounds to 7
    np.testing.assert_allclose(late[:, :2], tracks[:3, 0])
    np.testing.assert_allclose(late[:, 2:4], tracks[:3, 7])
    np.testing.assert_allclose(late[:, 4], 7 / 9)
    as_torch = data.sample_pokes(torch.from_numpy(tracks), 4, end_t=0.0)
    assert isinstance(as_torch, torch.Tensor) and as_torch.dtype == torch.float32
    torch.testing.assert_close(as_torch, torch.from_numpy(np.concatenate([tracks[:4, 0], tracks[:4, 0],
                                                                          np.zeros((4, 1), np.float32)], 1)))
    with pytest.raises(ValueError):  # more pokes than tracks
        data.sample_pokes(tracks, 7)


# ---------------------------------------------------------------------------- tracker output and .tar shards

@pytest.fixture(scope="module")
def mp4_bytes():
    rng = np.random.default_rng(0)
    return iio.imwrite("<bytes>", rng.integers(0, 256, (T, 48, 64, 3), dtype=np.uint8), extension=".mp4", fps=10)


def test_readers_name_the_field_of_a_bad_input(tmp_path, mp4_bytes):
    video = data.read_video(mp4_bytes, "clip", ".mp4")
    assert video.shape == (T, 48, 64, 3) and video.dtype == np.uint8
    (tmp_path / "junk.mp4").write_bytes(b"no video here" * 50)
    with pytest.raises(ValueError, match="junk.mp4: field 'video' cannot be decoded"):
        data.read_video(str(tmp_path / "junk.mp4"))
    with pytest.raises(ValueError, match="shard:k: field 'tracks_yx' is not a readable .npy"):
        data.load_npy(b"not an array", "shard:k", "tracks_yx")
    np.testing.assert_array_equal(data.load_npy(npy_bytes(np.arange(6)), "x", "tracks"), np.arange(6))


def test_import_clip_layouts_and_default_visibility():
    video = np.zeros((T, H, W, 3), np.uint8)
    _, px, _ = id_clip()
    px[5, 2] = (-1.0, 4.0)  # off the left edge
    px[6, 3] = (W - 1, H - 1)  # exactly on the last pixel: inside
    clip = data.import_clip(video, px.transpose(1, 0, 2)[..., ::-1].copy(), layout="NT2", order="yx")
    np.testing.assert_array_equal(clip["tracks"], px)
    expected = np.ones((T, N), bool)
    expected[5, 2] = False
    np.testing.assert_array_equal(clip["visibility"], expected)  # without visibility: inside the frame
    unit = data.import_clip(video, data.pixels_to_unit(px, W, H), np.full((T, N), 0.7), units="unit")
    np.testing.assert_allclose(unit["tracks"], px, atol=1e-4)
    assert unit["visibility"].all()  # a tracker's float visibility, thresholded at 0.5
    with pytest.raises(ValueError, match="import: field 'tracks'"):
        data.import_clip(video, px[..., 0])


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, payload in samples:
            payload = npy_bytes(payload) if isinstance(payload, np.ndarray) else payload
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_tar_shard_round_trip_in_the_authors_layout(tmp_path, mp4_bytes):
    h, w = 48, 64
    px = np.zeros((T, N, 2), np.float32)  # wanted (x, y) pixels
    px[..., 0] = 50 - np.arange(N)[None]
    px[..., 1] = 10 + np.arange(T)[:, None]
    yx = data.pixels_to_unit(px, w, h)[..., ::-1]  # the shard: unit (y, x)
    vis = np.ones((T, N), bool)
    vis[3, 1] = False
    shard = tmp_path / "shard-000.tar"
    _write_shard(shard, [("s1.video.mp4", mp4_bytes), ("s1.tracks_yx.npy", yx), ("s1.visibility.npy", vis),
                         ("s2.video.mp4", mp4_bytes), ("s2.tracks_yx.npy", yx + 0.0), ("s2.visibility.npy", vis),
                         ("s3.video.mp4", mp4_bytes), ("README.txt", b"not a sample")])
    with pytest.warns(UserWarning, match="skipped 1 samples"):  # s3 has no tracks
        index = data.index_tar(str(shard))
    assert sorted(index) == ["s1", "s2"] and set(index["s1"]) == set(data.TAR_PARTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = data.load_tar_sample(str(shard), "s1")
        refs = data.find_clips(str(tmp_path))
        assert data.find_clips(str(tmp_path / "*.tar")) == refs
        ds = data.TrackDataset(str(tmp_path / "*.tar"), split="val", n_frames=8, n_enc=3, n_dec=2, image_size=16)
        item = ds[1]
    assert clip["video"].shape == (T, h, w, 3)
    np.testing.assert_allclose(clip["tracks"], px, atol=1e-4)
    np.testing.assert_array_equal(clip["visibility"], vis)
    np.testing.assert_array_equal(clip["video"], data.read_video(mp4_bytes, "s1", ".mp4"))
    assert [(r[0], r[1]) for r in refs] == [(str(shard), "s1"), (str(shard), "s2")]
    assert len(ds) == 2 and item["tracks"].shape == (5, 8, 2)
    np.testing.assert_allclose(data.unit_to_pixels(item["tracks"].numpy(), w, h)[..., 1],  # y: the frame
                               np.broadcast_to(10 + np.arange(8.0), (5, 8)), atol=1e-4)
    (tmp_path / "broken.tar").write_bytes(b"\x00\x01 not a tar" * 100)
    with pytest.raises(ValueError, match="broken.tar: not a readable"):
        data.index_tar(str(tmp_path / "broken.tar"))


def test_find_clips_sources(tmp_path):
    video, tracks, vis = id_clip()
    for name in ("b.npz", "a.npz"):
        data.save_clip(tmp_path / name, video, tracks, vis)
    (tmp_path / "notes.txt").write_text("x")
    assert data.find_clips(str(tmp_path)) == [str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]
    assert data.find_clips(str(tmp_path / "b.npz")) == [str(tmp_path / "b.npz")]
    with pytest.raises(ValueError, match="no .npz clips"):
        data.find_clips(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no .npz clips"):
        data.find_clips(str(tmp_path / "notes.txt"))


# ---------------------------------------------------------------------------- model items

def test_prepare_image_squashes_and_normalises():
    frame = np.zeros((20, 40, 3), np.uint8)
    frame[..., 0] = np.arange(40) * 6  # brighter to the right
    frame[..., 2] = 90
    small, image = data.prepare_image(frame, 16)
    assert small.shape == (16, 16, 3) and small.dtype == torch.uint8
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    mean, std = torch.tensor(data.IMAGENET_MEAN), torch.tensor(data.IMAGENET_STD)
    expected = (small.permute(2, 0, 1).double() / 255 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(image, expected.float())
    np.testing.assert_array_equal(small.numpy(), data.resize(frame, 16, 16))
    assert (small[:, :, 2] == 90).all() and (small[:, 1:, 0] >= small[:, :-1, 0]).all()  # x stays x


TINY = dict(n_frames=8, n_enc=6, n_dec=4, image_size=28, synth_size=(40, 56), synth_tracks=64)


def test_synthetic_items_shapes_dtypes_and_determinism():
    ds = data.TrackDataset("synthetic", seed=0, **TINY)
    item = ds[3]
    assert len(ds) == 100_000 and len(data.TrackDataset("synthetic", split="val", **TINY)) == 64
    assert set(item) == {"image", "frame", "tracks", "visible", "text", "index"}
    assert item["image"].shape == (3, 28, 28) and item["image"].dtype == torch.float32
    assert item["frame"].shape == (28, 28, 3) and item["frame"].dtype == torch.uint8
    assert item["tracks"].shape == (10, 8, 2) and item["tracks"].dtype == torch.float32
    assert item["visible"].shape == (10, 8) and item["visible"].dtype == torch.bool
    assert isinstance(item["text"], str) and item["text"] and item["index"] == 3
    assert item["visible"][:, 0].all()  # kept tracks are visible in the window's first frame
    assert item["tracks"][:, 0].abs().max() <= 1 + 1e-6
    assert len({tuple(p) for p in item["tracks"][:, 0].tolist()}) == 10  # encoder and held-out tracks differ
    mean, std = torch.tensor(data.IMAGENET_MEAN), torch.tensor(data.IMAGENET_STD)
    expected = (item["frame"].permute(2, 0, 1).double() / 255 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(item["image"], expected.float())
    again = data.TrackDataset("synthetic", seed=0, **TINY)[3]
    for key in ("image", "tracks", "visible"):
        assert torch.equal(item[key], again[key])
    assert not torch.equal(item["tracks"], ds[4]["tracks"])
    assert not torch.equal(item["tracks"], data.TrackDataset("synthetic", seed=1, **TINY)[3]["tracks"])
    val, held = (data.TrackDataset("synthetic", split=split, **TINY) for split in ("val", "eval"))
    assert len(held) == 64 and len(set(data.SPLITS.values())) == len(data.SPLITS)  # separate streams
    assert not torch.equal(item["tracks"], val[3]["tracks"]) and not torch.equal(val[3]["tracks"], held[3]["tracks"])


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


def test_make_track_dataset_dispatch(robot_demos, tmp_path):
    import libero
    kwargs = dict(n_frames=16, n_enc=3, n_dec=2, image_size=28, seed=0, synth_size=(32, 32), synth_tracks=64)
    for source in (robot_demos, os.path.join(robot_demos, "*.hdf5")):
        ds = data.make_track_dataset(source, "train", **kwargs)
        assert isinstance(ds, libero.LiberoDataset) and ds.view == "both"
        assert ds[0]["tracks"].shape == (5, 16, 2)
    assert isinstance(data.make_track_dataset("synthetic", "val", **kwargs), data.TrackDataset)
    video, tracks, vis = id_clip()
    data.save_clip(tmp_path / "clip.npz", video, tracks, vis)
    clips = data.make_track_dataset(str(tmp_path), "train", **dict(kwargs, n_frames=8))
    assert isinstance(clips, data.TrackDataset) and clips[0]["tracks"].shape == (5, 8, 2)


# ---------------------------------------------------------------------------- command line

def test_synth_and_show_commands(tmp_path):
    out = tmp_path / "synth"
    data.main(["synth", "--out", str(out), "--n", "2", "--seed", "7", "--frames", "6", "--height", "40",
               "--width", "56", "--tracks", "32"])
    assert sorted(os.listdir(out)) == ["000000.npz", "000001.npz"]
    clip = data.load_clip(out / "000001.npz")
    reference = data.make_synthetic_clip(8, 6, 40, 56, 32)
    for key in ("video", "tracks", "visibility"):
        np.testing.assert_array_equal(clip[key], reference[key])
    assert clip["text"] == reference["text"]
    data.main(["show", str(out / "000000.npz"), "--out", str(tmp_path / "tracks.gif"), "--n-tracks", "8"])
    frames = iio.imread(tmp_path / "tracks.gif")
    assert frames.shape[:3] == (6, 40, 56)
    with pytest.raises(ValueError, match="--out"):  # a folder where the picture goes
        data.main(["show", str(out / "000000.npz"), "--out", str(out)])
    (out / "000001.npz").write_text("broken")
    with pytest.raises(ValueError, match="000001.npz: not a .npz clip"):
        data.main(["show", str(out / "000001.npz"), "--out", str(tmp_path / "b.gif")])
    assert not (tmp_path / "b.gif").exists()


def test_synth_command_onto_a_file_is_an_error_not_a_traceback(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    result = run(sys.executable, "data.py", "synth", "--out", str(taken), "--n", "1")
    assert result.returncode != 0
    assert f"error: --out {taken}" in result.stderr and "Traceback" not in result.stderr
    assert taken.read_text() == "keep me"


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
               "--text", "a test clip", "--out", str(tmp_path / "clip.npz")])
    clip = data.load_clip(tmp_path / "clip.npz")
    np.testing.assert_allclose(clip["tracks"], px, atol=1e-4)
    np.testing.assert_array_equal(clip["visibility"], vis)
    assert clip["text"] == "a test clip" and clip["video"].shape == (T, 48, 64, 3)
    with pytest.raises(ValueError, match="'tracks'"):  # the same file read as [T, N, 2]
        data.import_clip(clip["video"], nt_yx_unit, order="yx", units="unit")
    with pytest.raises(SystemExit, match="error: .*tracks.npy: field 'tracks'"):
        data.cli(lambda: data.main(["import", "--video", str(video_path), "--tracks", str(tmp_path / "tracks.npy"),
                                    "--out", str(tmp_path / "wrong.npz")]))
    assert not (tmp_path / "wrong.npz").exists()
    with pytest.raises(ValueError, match="--out"):  # a folder where the clip goes
        data.main(["import", "--video", str(video_path), "--tracks", str(tmp_path / "tracks.npy"), "--out",
                   str(tmp_path)])


