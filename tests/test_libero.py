"""Tests for the LIBERO part of data.py: ATM's HDF5 layout and the flip, the offline robot task, the 16 <-> 64
frame time scale (Sec. A), LiberoDataset and make_track_dataset."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import zlib  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import eval as evaluation  # noqa: E402

T, N, H, W = 6, 5, 20, 24  # T != N and H != W, so swapped axes cannot pass
XS = np.array([0, 5, 10, 15, W - 1])  # track i sits at x = XS[i]; the first and last are on the frame's edges


def upright_demo():
    """Upright arrays: track i at (XS[i], 3 + 2 t), and one bright pixel under every track."""
    tracks = np.zeros((T, N, 2), np.float32)
    tracks[..., 0] = XS[None]
    tracks[..., 1] = 3 + 2 * np.arange(T)[:, None]
    video = np.zeros((T, H, W, 3), np.uint8)
    for t in range(T):
        video[t, tracks[t, :, 1].astype(int), tracks[t, :, 0].astype(int)] = 255
    return video, tracks


def write_atm(path, upside_down=None, drop=(), replace=None, emb=("task_emb_bert", 768), text=None):
    """A demo in ATM's layout written with h5py alone (not with data.save_libero_demo). upside_down: store the
    frames and the tracks flipped and set the attribute; None: upright and no attribute, as ATM's files."""
    video, tracks = upright_demo()
    if upside_down:
        video, tracks[..., 1] = video[:, ::-1], H - 1 - tracks[..., 1]
    fields = {"actions": np.arange(T * 7, dtype=np.float64).reshape(T, 7), emb[0]: np.ones(emb[1], np.float32)}
    for view in data.LIBERO_VIEWS:
        fields[f"{view}/video"] = video.transpose(0, 3, 1, 2)[None]
        fields[f"{view}/tracks"] = (tracks / np.array([W, H], np.float32))[None]  # ATM: pixel / size
        fields[f"{view}/vis"] = np.ones((1, T, N), bool)
    fields.update(replace or {})
    with h5py.File(path, "w") as f:
        root = f.create_group("root")
        if upside_down is not None:
            root.attrs["upside_down"] = upside_down
        if text is not None:
            root.attrs["text"] = text
        for key, value in fields.items():
            if key not in drop:
                root.create_dataset(key, data=value)
    return path


def fake_embed(text):
    """A cheap deterministic stand-in for MiniLM: a unit 384-vector seeded by the text."""
    e = np.random.default_rng(zlib.crc32(text.encode())).normal(size=384)
    return (e / np.linalg.norm(e)).astype(np.float32)


@pytest.fixture(scope="module")
def robot_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("robot")
    paths = data.write_robot_demos(out, 4, seed=0, n_points=48, embed_fn=fake_embed)
    assert [os.path.basename(p) for p in paths] == [f"demo_{i:04d}.hdf5" for i in range(4)]
    return out


def is_metal(pixels):
    """The gripper's light palm and wrist: bright and grey (the table is brown, the blocks saturated)."""
    p = pixels.astype(int)
    return (p.min(-1) > 140) & (p.max(-1) - p.min(-1) < 30)


# ---------------------------------------------------------------------------- reading ATM's layout

@pytest.mark.parametrize("stored", ["upside_down", "upright"])
def test_load_libero_demo_flips_frames_and_tracks_together(tmp_path, stored):
    path = write_atm(tmp_path / "demo_0.hdf5", upside_down=True if stored == "upside_down" else None)
    demo = data.load_libero_demo(path)
    video, tracks = upright_demo()
    assert demo["actions"].dtype == np.float32 and demo["actions"].shape == (T, 7)
    assert demo["task_emb_key"] == "task_emb_bert" and demo["task_emb"].shape == (768,)
    for view in data.LIBERO_VIEWS:
        got = demo["views"][view]
        assert got["video"].shape == (T, H, W, 3) and got["video"].dtype == np.uint8
        assert got["tracks"].shape == (T, N, 2) and got["tracks"].dtype == np.float32
        assert got["visibility"].shape == (T, N) and got["visibility"].dtype == np.bool_
        np.testing.assert_array_equal(got["video"], video)  # upright whichever way the file stored it
        np.testing.assert_allclose(got["tracks"], tracks, atol=1e-4)
        x, y = np.rint(got["tracks"]).astype(int).transpose(2, 0, 1)
        assert (got["video"][np.arange(T)[:, None], y, x] == 255).all()  # the bright pixel stays under its track
    # [0, 1] -> pixels -> unit coordinates: the first and last track sit on the left and right edges
    unit = data.pixels_to_unit(demo["views"]["agentview"]["tracks"], W, H)
    np.testing.assert_allclose(unit[:, [0, -1], 0], np.tile([-1.0, 1.0], (T, 1)), atol=1e-5)
    np.testing.assert_allclose(unit[:, 0, 1], 2 * (3 + 2 * np.arange(T)) / (H - 1) - 1, atol=1e-5)


def test_forced_flip_turns_frames_and_tracks_together(tmp_path):
    demo = data.load_libero_demo(write_atm(tmp_path / "a.hdf5"), views=("agentview",), flip=True, frames=[4, 1])
    video, tracks = upright_demo()
    got = demo["views"]["agentview"]
    assert list(demo["views"]) == ["agentview"]
    np.testing.assert_array_equal(got["video"], video[[4, 1], ::-1])  # only the frames asked for, in that order
    np.testing.assert_allclose(got["tracks"][..., 1], H - 1 - tracks[..., 1], atol=1e-4)


def test_text_and_embedding_key(tmp_path):
    folder = tmp_path / "KITCHEN_SCENE3_turn_on_the_stove_demo"
    folder.mkdir()
    demo = data.load_libero_demo(write_atm(folder / "demo_0.hdf5", emb=("task_emb_minilm", 384)))
    assert demo["text"] == "turn on the stove" and demo["task_emb"].shape == (384,)
    assert data.libero_task_text("pick_up_the_black_bowl_demo") == "pick up the black bowl"
    assert data.libero_task_text("LIVING_ROOM_SCENE2_put_the_soup_in_the_basket_demo") == "put the soup in the basket"
    assert data.load_libero_demo(write_atm(tmp_path / "b.hdf5", text="open the drawer"))["text"] == "open the drawer"
    assert data.load_libero_demo(write_atm(tmp_path / "c.hdf5"))["text"] == ""


@pytest.mark.parametrize("case, field", [
    (dict(drop=("actions",)), "root/actions"),
    (dict(replace={"actions": np.zeros((T + 1, 7))}), "root/agentview/video"),  # lengths disagree
    (dict(replace={"actions": np.zeros((T, 6))}), "root/actions"),
    (dict(replace={"agentview/video": np.zeros((T, 3, H, W), np.uint8)}), "root/agentview/video"),
    (dict(replace={"eye_in_hand/tracks": np.full((1, T, N, 2), np.nan, np.float32)}), "root/eye_in_hand/tracks"),
    (dict(replace={"agentview/tracks": np.zeros((1, N, T, 2), np.float32)}), "root/agentview/tracks"),
    (dict(replace={"agentview/vis": np.ones((1, T, N + 1), bool)}), "root/agentview/vis"),
    (dict(drop=("eye_in_hand/vis",)), "root/eye_in_hand/vis"),
    (dict(drop=("task_emb_bert",)), "task_emb"),
])
def test_bad_demos_name_file_and_field(tmp_path, case, field):
    path = write_atm(tmp_path / "bad.hdf5", **case)
    with pytest.raises(ValueError, match=field) as error:
        data.load_libero_demo(path)
    assert str(path) in str(error.value)


def test_unreadable_files_raise_value_error(tmp_path):
    junk = tmp_path / "junk.hdf5"
    junk.write_bytes(b"not an hdf5 file" * 100)
    with pytest.raises(ValueError, match="not a readable HDF5"):
        data.load_libero_demo(junk)
    cut = write_atm(tmp_path / "cut.hdf5")
    cut.write_bytes(cut.read_bytes()[:3000])  # a truncated copy
    with pytest.raises(ValueError, match="cut.hdf5"):
        data.load_libero_demo(cut)
    with h5py.File(tmp_path / "empty.hdf5", "w"):
        pass
    with pytest.raises(ValueError, match="'root'"):
        data.load_libero_demo(tmp_path / "empty.hdf5")


# ---------------------------------------------------------------------------- the robot task

def test_robot_demo_layout(robot_dir):
    with h5py.File(robot_dir / "demo_0000.hdf5", "r") as f:
        root = f["root"]
        T_ = root["actions"].shape[0]
        assert 64 <= T_ <= 96 and root["actions"].shape == (T_, 7) and root["actions"].dtype == np.float32
        assert root["task_emb_minilm"].shape == (384,)
        assert root.attrs["upside_down"] and root.attrs["text"].split()[0] in ("push", "carry")
        for view in data.LIBERO_VIEWS:
            assert root[f"{view}/video"].shape == (1, T_, 3, 128, 128) and root[f"{view}/video"].dtype == np.uint8
            assert root[f"{view}/tracks"].shape == (1, T_, 48, 2) and root[f"{view}/vis"].shape == (1, T_, 48)
            assert root[f"{view}/parts"].shape == (48,)
            tracks, vis = root[f"{view}/tracks"][0], root[f"{view}/vis"][0]
            assert tracks[vis].min() >= 0 and tracks[vis].max() <= 1  # visible points: [0, 1] like ATM
        eye_vis = root["eye_in_hand/vis"][0]
        assert not eye_vis.all() and eye_vis.any(1).all()  # points leave the wrist camera's window
    texts = {data.load_libero_demo(p, views=())["text"] for p in data.find_libero_demos(robot_dir)}
    assert len(texts) > 1


def test_robot_actions_drive_the_gripper(robot_dir):
    palms = 0
    for path in data.find_libero_demos(robot_dir):
        demo = data.load_libero_demo(path)
        actions = demo["actions"]
        assert set(np.unique(actions[:, 6])) == {-1.0, 1.0}  # the gripper opens and closes within the episode
        assert actions[:, :2].std(0).max() > 0.1 and np.abs(actions[:, 2:6]).max() < 0.15
        with h5py.File(path, "r") as f:
            parts = {view: f[f"root/{view}/parts"][()] for view in data.LIBERO_VIEWS}
        # agent view (upright, y down): a point on the palm moves by ROBOT_SPEED * action; in the wrist camera it
        # stays put while the table moves the other way, ROBOT_ZOOM times larger
        step = data.ROBOT_SPEED * actions[:-1, None, :2]
        palm = demo["views"]["agentview"]["tracks"][:, parts["agentview"] == 3]
        palms += palm.shape[1] > 0  # (48 random points can miss the small palm of one demo)
        np.testing.assert_allclose(np.diff(palm, axis=0), np.broadcast_to(step, palm[1:].shape), atol=2e-3)
        eye = demo["views"]["eye_in_hand"]["tracks"]
        held = eye[:, parts["eye_in_hand"] == 3]
        np.testing.assert_allclose(held, np.broadcast_to(held[:1], held.shape), atol=2e-3)
        table = eye[:, parts["eye_in_hand"] == 0]
        np.testing.assert_allclose(np.diff(table, axis=0), -data.ROBOT_ZOOM * np.broadcast_to(step, table[1:].shape),
                                   atol=5e-3)
    assert palms >= 2


def test_robot_gripper_command_shows_in_the_motion():
    # as on a real arm the motion shows the command: +1 exactly while the fingers close on the block or the block
    # rides with the gripper (pushed or carried), -1 while the open gripper approaches, backs off or hovers
    for i in range(6):
        ep = data.robot_episode(np.random.default_rng((3, i)))
        closing = np.diff(ep["open"]) < 0
        riding = np.linalg.norm(np.diff(ep["blocks"][:, 0], axis=0), axis=-1) > 0
        np.testing.assert_array_equal(ep["actions"][:-1, 6] > 0, closing | riding)
        assert closing.sum() == 4 and riding.any() and ep["actions"][0, 6] == -1 and ep["actions"][-1, 6] == -1


def test_robot_motion_follows_from_what_a_frame_shows():
    # one gripper speed in every episode, whatever its length, and the block ends on the goal drawn on the table:
    # what follows a frame is a function of that frame (and the instruction), as a policy reading frames needs
    lengths, speeds = [], []
    for i in range(8):
        ep = data.robot_episode(np.random.default_rng((5, i)))
        step = np.linalg.norm(np.diff(ep["gripper"], axis=0), axis=-1)
        moving = step > 0.5 * data.ROBOT_STEP  # (the last step onto an aim can be shorter)
        speeds.append(np.median(step[moving]))
        lengths.append(len(step) + 1)
        assert np.linalg.norm(ep["blocks"][-1, 0] - ep["goal"]) < 0.75
        assert np.mean(np.abs(step[moving] - data.ROBOT_STEP) < 0.3) > 0.85  # the actions' small noise
        frame = data.render_robot(ep, "agentview")[0]
        ring = np.rint(ep["goal"] + [[data.BLOCK + 2, 0], [-data.BLOCK - 2, 0], [0, data.BLOCK + 2]]).astype(int)
        drawn = [(frame[y, x] == (40, 35, 30)).all() for x, y in ring if 0 <= x < 128 and 0 <= y < 128]
        assert np.mean(drawn) >= 0.5
    assert max(lengths) - min(lengths) >= 8
    np.testing.assert_allclose(speeds, data.ROBOT_STEP, atol=0.05)


def test_robot_frames_show_the_gripper_under_its_tracks(robot_dir):
    path = robot_dir / "demo_0000.hdf5"
    with h5py.File(path, "r") as f:
        parts = {view: f[f"root/{view}/parts"][()] for view in data.LIBERO_VIEWS}
    assert all((parts[view] == 3).sum() >= 3 for view in data.LIBERO_VIEWS)  # palm points in both views

    def metal_under_palm_tracks(demo, view):
        # metal at the nearest pixel or one beside it: the palm is 4 px tall, and rounding a point near its edge
        # can step onto the table between the open fingers
        d = demo["views"][view]
        t, n = np.nonzero(d["visibility"] & (parts[view] == 3))
        x, y = np.rint(d["tracks"][t, n]).astype(int).T
        near = [is_metal(d["video"][t, np.clip(y + dy, 0, 127), np.clip(x + dx, 0, 127)])
                for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        return np.any(near, 0).mean()

    right, wrong = data.load_libero_demo(path), data.load_libero_demo(path, flip=False)
    assert metal_under_palm_tracks(right, "agentview") > 0.8 and metal_under_palm_tracks(right, "eye_in_hand") > 0.8
    # not flipping at all also keeps frames and tracks consistent, but upside down: the palm is under the tracks,
    # and it is no longer above the fingers
    assert metal_under_palm_tracks(wrong, "agentview") > 0.8
    flipped = data.load_libero_demo(path)["views"]["eye_in_hand"]["video"]
    assert is_metal(flipped[:, 35, 63]).all() and not is_metal(wrong["views"]["eye_in_hand"]["video"][:, 35, 63]).any()


def test_minilm_embedding_is_384_and_unit_norm():
    embed = data.minilm_embedder()
    a, b = embed("push the red block left"), embed("carry the blue block up")
    assert a.shape == (384,) and a.dtype == np.float32
    np.testing.assert_allclose([np.linalg.norm(a), np.linalg.norm(b)], 1.0, atol=1e-5)
    np.testing.assert_array_equal(a, embed("push the red block left"))
    assert 0.2 < float(a @ b) < 0.99  # related sentences, not the same one


# ---------------------------------------------------------------------------- the time scale (Sec. A)

def test_resample_16_64_16_round_trip(monkeypatch):
    calls = []
    monkeypatch.setattr(data, "resample_time", lambda tracks, T_out: calls.append(T_out) or tracks)
    evaluation.subsample_time(torch.zeros(3, 64, 2), 16)
    assert calls == [16]  # evaluation's 64 -> 16 is the function training uses for 16 -> 64
    monkeypatch.undo()
    g = torch.Generator().manual_seed(0)
    start, velocity = torch.rand(7, 1, 2, generator=g), torch.randn(7, 1, 2, generator=g)
    linear = start + velocity * torch.arange(16.0)[:, None]  # [N, 16, 2]
    up = data.resample_time(linear, 64)
    assert up.shape == (7, 64, 2)
    torch.testing.assert_close(data.resample_time(up, 16), linear, rtol=0, atol=1e-5)  # exact for linear motion
    tracks = torch.rand(7, 16, 2, generator=g, dtype=torch.float64)
    back = data.resample_time(data.resample_time(tracks, 64), 16)
    assert torch.equal(back[:, [0, -1]], tracks[:, [0, -1]])
    # elsewhere off by at most (15 / 63) / 4 times the second difference (the docstring's bound), but not zero
    bound = (15 / 63) / 4 * (tracks[:, 2:] - 2 * tracks[:, 1:-1] + tracks[:, :-2]).abs()
    error = (back[:, 1:-1] - tracks[:, 1:-1]).abs()
    assert (error <= bound + 1e-12).all() and error.max() > 1e-3


def test_dataset_window_round_trip_64_to_16(robot_dir):
    common = dict(n_tracks=8, image_size=28, seed=3)
    ds16 = data.LiberoDataset(robot_dir, "val", n_frames=16, **common)
    ds64 = data.LiberoDataset(robot_dir, "val", n_frames=64, **common)
    for index in (0, 2):
        a, b = ds16[index], ds64[index]
        assert b["tracks"].shape[-2] == 64 and a["tracks"].shape[-2] == 16
        back = data.resample_time(b["tracks"], 16)
        assert torch.equal(back[..., [0, -1], :], a["tracks"][..., [0, -1], :])
        x = a["tracks"]
        bound = (15 / 63) / 4 * (x[..., 2:, :] - 2 * x[..., 1:-1, :] + x[..., :-2, :]).abs()
        assert ((back[..., 1:-1, :] - a["tracks"][..., 1:-1, :]).abs() <= bound + 1e-5).all()
        nearest = np.rint(np.arange(16) * 63 / 15).astype(int)
        assert torch.equal(b["visible"][..., nearest], a["visible"])


# ---------------------------------------------------------------------------- LiberoDataset

def test_dataset_items_shapes_and_determinism(robot_dir):
    ds = data.LiberoDataset(robot_dir, "train", n_frames=64, n_tracks=8, image_size=28, action_chunk=16)
    item = ds[5]
    assert item["image"].shape == (2, 3, 28, 28) and item["image"].dtype == torch.float32
    assert item["frame"].shape == (2, 28, 28, 3) and item["frame"].dtype == torch.uint8
    assert item["tracks"].shape == (2, 8, 64, 2) and item["tracks"].dtype == torch.float32
    assert item["visible"].shape == (2, 8, 64) and item["visible"][..., 0].all()
    assert item["task_emb"].shape == (384,) and item["actions"].shape == (16, 7)
    assert item["timestep"].dtype == torch.int64 and item["text"] and item["index"] == 5
    assert item["tracks"][..., 0, :].abs().max() <= 1  # visible at the start: inside [-1, 1]
    again, fresh = ds[5], data.LiberoDataset(robot_dir, "train", n_frames=64, n_tracks=8, image_size=28)[5]
    for other in (again, fresh):
        for key, value in item.items():
            assert torch.equal(value, other[key]) if torch.is_tensor(value) else value == other[key]
    assert not torch.equal(ds[6]["tracks"], item["tracks"])
    assert ds[len(ds) + 3]["tracks"].shape == (2, 8, 64, 2)  # an index past one epoch is valid
    # the item matches its demo: actions and first-frame track positions from the window's start
    path = [p for p in ds.paths if data.load_libero_demo(p, views=())["text"] == item["text"]]
    demo = data.load_libero_demo(path[0], frames=[int(item["timestep"])])
    start, T_ = int(item["timestep"]), len(demo["actions"])
    assert int(item["episode_len"]) == T_
    np.testing.assert_array_equal(item["actions"], demo["actions"][np.minimum(np.arange(start, start + 16), T_ - 1)])
    first = data.pixels_to_unit(demo["views"]["agentview"]["tracks"][start], 128, 128)
    assert np.abs(first[:, None] - item["tracks"][0, :, 0].numpy()[None]).sum(-1).min(0).max() < 1e-5
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["tracks"].shape == (2, 2, 8, 64, 2) and len(batch["text"]) == 2


def test_actions_past_the_end_repeat_the_last(robot_dir):
    item = data.LiberoDataset(robot_dir, "train", n_frames=16, n_tracks=4, image_size=14, action_chunk=120)[0]
    left = int(item["episode_len"] - item["timestep"])
    assert left < 120 and (item["actions"][left:] == item["actions"][left - 1]).all()


def test_split_by_demo(robot_dir):
    train = data.LiberoDataset(robot_dir, "train", n_frames=16, n_tracks=8, image_size=14)
    val = data.LiberoDataset(robot_dir, "val", n_frames=16, n_tracks=8, image_size=14)
    assert len(val.paths) == 1 and not set(train.paths) & set(val.paths)
    assert sorted(train.paths + val.paths) == data.find_libero_demos(robot_dir)
    assert data.LiberoDataset(robot_dir, "val", seed=7, n_frames=16).paths == val.paths  # whatever the seed
    assert (val.windows[:, 1] % 16 == 0).all() and len(train) > len(val)
    item = val[0]
    moving = ~data.is_static(item["tracks"][0].numpy())
    assert moving[0] and not (moving[1:] & ~moving[:-1]).any()  # val: the non-static tracks come first


def test_single_view_items_have_the_track_dataset_layout(robot_dir):
    ref = data.TrackDataset("synthetic", n_frames=16, n_enc=3, n_dec=2, image_size=128, synth_size=(32, 32),
                            synth_tracks=64)[0]
    ds = data.LiberoDataset(robot_dir, "train", n_frames=16, n_enc=3, n_dec=2, image_size=128, view="agentview")
    item = ds[0]
    assert item.keys() == ref.keys()
    for key, value in ref.items():
        if torch.is_tensor(value):
            assert item[key].shape == value.shape and item[key].dtype == value.dtype, key
    assert item["size"].tolist() == [128, 128]
    both = data.LiberoDataset(robot_dir, "train", n_frames=16, n_enc=3, n_dec=2, image_size=128, view="both")
    wrist = [bool(is_metal(both[i]["frame"][35, 63].numpy())) for i in range(16)]  # the wrist camera's gripper
    assert any(wrist) and not all(wrist)


def test_make_track_dataset_dispatch(robot_dir, tmp_path):
    kwargs = dict(n_frames=16, n_enc=3, n_dec=2, image_size=28, seed=0, synth_size=(32, 32), synth_tracks=64)
    for source in (robot_dir, os.path.join(robot_dir, "*.hdf5")):
        ds = data.make_track_dataset(source, "train", **kwargs)
        assert isinstance(ds, data.LiberoDataset) and ds.view == "both" and ds.n_tracks == 5
        assert ds[0]["tracks"].shape == (5, 16, 2)
    assert isinstance(data.make_track_dataset("synthetic", "val", **kwargs), data.TrackDataset)
    video, tracks = upright_demo()
    data.save_clip(tmp_path / "clip.npz", video, tracks, np.ones((T, N), bool))
    assert isinstance(data.make_track_dataset(tmp_path, "train", **kwargs), data.TrackDataset)
