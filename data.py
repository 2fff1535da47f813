"""Data for the track VAE and the motion planner: clip files, synthetic motion with exact tracks, model batches.

Conventions (DESIGN.md, "Conventions"):
  * A clip on disk is one .npz: video uint8 [T, H, W, 3]; tracks float32 [T, N, 2] in pixels, (x, y) order;
    visibility bool [T, N] (True = visible); optional text (a string) and actions float32 [T, A].
  * Unit coordinates: u = 2 p / (size - 1) - 1, x over the width and y over the height, so pixel 0 -> -1
    and pixel size-1 -> +1. Model batches hold tracks as [N, T, 2] (tracks first, then time).

Commands:
  python data.py synth --out data/synth --n 100 --seed 0           # synthetic clips, exact tracks
  python data.py show data/synth/000000.npz --out tracks.gif       # tracks over the video, blue -> red in time
  python data.py import --video v.mp4 --tracks t.npy --layout NT2 --order yx --units unit --out clip.npz
  python data.py track --video v.mp4 --out clip.npz                # CoTracker3 via torch.hub (needs network)

In code:
  from data import TrackDataset
  ds = TrackDataset("synthetic")   # or a folder of .npz clips, a .tar shard, or "shards/*.tar"
  item = ds[0]                     # image [3, 224, 224], tracks [80, 64, 2] (x, y) in [-1, 1], visible, text
"""
import argparse
import glob
import io
import os
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
    _write_atomically(path, lambda f: (np.savez_compressed if compress else np.savez)(f, **arrays))


def _write_atomically(path, write, suffix=".tmp"):
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
    _write_atomically(path, lambda f: f.write(iio.imwrite("<bytes>", np.asarray(frames), extension=ext, **kwargs)),
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
    args = parser.parse_args(argv)
    commands = {"synth": cmd_synth, "show": cmd_show, "import": cmd_import, "track": cmd_track}
    try:
        commands[args.command](args)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
