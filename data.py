"""Data (README "Conventions"): clips, synthetic motion with exact tracks, drawing, track selection, tracker output
and the authors' .tar shards, TrackDataset, and the file helpers every stage writes with.

    python3 data.py synth --out data/synth --n 100            # synthetic clips with exact tracks (.npz)
    python3 data.py show data/synth/000000.npz --out clip.gif  # tracks over the video, blue -> red in time
    python3 data.py import --video v.mp4 --tracks t.npy --layout NT2 --order yx --units unit --out clip.npz"""
import argparse, glob, io, os, tarfile, warnings, zipfile

import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])   # DINOv2's input
SPLITS = {"train": 1, "val": 2, "eval": 7}   # seed tags of the synthetic streams (eval.py draws from "eval")

def pixels_to_unit(xy, width, height):
    """(x, y) pixels [..., 2] -> unit coordinates u = 2 p / (size - 1) - 1 over width, height (numpy or torch)."""
    return 2 * xy / _extent(xy, width, height) - 1

def unit_to_pixels(xy, width, height):
    return (xy + 1) * _extent(xy, width, height) / 2

def _extent(xy, width, height):
    if isinstance(xy, torch.Tensor):
        return xy.new_tensor([width - 1.0, height - 1.0])   # xy's dtype and device
    return np.array([width - 1.0, height - 1.0], dtype=xy.dtype if np.asarray(xy).dtype.kind == "f" else None)

# ----------------- Files: outputs are checked first and written atomically; bad input is a ValueError that names it
def cli(main):
    """Run a command's main(): bad input (a file, a flag, a checkpoint) is a ValueError, printed without a traceback."""
    try:
        main()
    except ValueError as e:
        raise SystemExit(f"error: {e}")

def check_output(path, flag, folder=False):
    """A ValueError naming the flag when an output path, or a folder above it, exists as the wrong kind."""
    above = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if (os.path.isfile(path) if folder else os.path.isdir(path)) or not os.path.isdir(above):
        raise ValueError(f"{flag} {path}: something else is in the way (expected {'a folder' if folder else 'a file'})")

def write_atomically(path, write, keep_previous=False):
    """write(f) to path.tmp, fsync, rename over path: never half a file; keep_previous: the old one -> path.prev."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(path + ".tmp", "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.remove(path + ".tmp")
        raise
    if keep_previous and os.path.exists(path):
        if os.path.lexists(path + ".prev.tmp"):   # left by a kill between the link and its rename
            os.remove(path + ".prev.tmp")
        os.link(path, path + ".prev.tmp")
        os.replace(path + ".prev.tmp", path + ".prev")
    os.replace(path + ".tmp", path)

def expect(name, field, ok, expected, array):
    if not ok:
        raise ValueError(f"{name}: field '{field}' is {array.dtype} {list(array.shape)}, expected {expected}")

# --------- Clips: the format (one .npz, validated on every load and save), tracker output, the authors' .tar shards
def validate_clip(clip, name="clip"):
    """A clip: video uint8 [T, H, W, 3], tracks float [T, N, 2] (x, y) pixels, visibility bool [T, N], optionally text
    (a string) and actions float [T, A] -> it normalised (float32, str), or a ValueError naming the file and field."""
    missing = [k for k in ("video", "tracks", "visibility") if clip.get(k) is None]
    if missing:
        raise ValueError(f"{name}: missing field '{missing[0]}' (a clip needs video, tracks and visibility)")
    video, tracks, vis = (np.asarray(clip[k]) for k in ("video", "tracks", "visibility"))
    expect(name, "video", video.dtype == np.uint8 and video.ndim == 4 and video.shape[-1] == 3 and min(video.shape) > 0,
           "uint8 [T, H, W, 3], not empty", video)
    expect(name, "tracks", tracks.dtype.kind == "f" and tracks.ndim == 3 and len(tracks) == len(video) and
           tracks.shape[1] > 0 and tracks.shape[2] == 2, f"float [T, N > 0, 2], T = {len(video)} as 'video'", tracks)
    expect(name, "tracks", np.isfinite(tracks).all(), "finite pixel coordinates (no NaN or inf)", tracks)
    expect(name, "visibility", vis.dtype == np.bool_ and vis.shape == tracks.shape[:2],
           f"bool [T, N] = {list(tracks.shape[:2])} like 'tracks'", vis)
    actions, text = (None if clip.get(k) is None else np.asarray(clip[k]) for k in ("actions", "text"))
    expect(name, "actions", actions is None or actions.dtype.kind == "f" and actions.ndim == 2
           and len(actions) == len(video), f"float [T, A], T = {len(video)}", actions)
    expect(name, "text", text is None or text.dtype.kind == "U" and text.ndim == 0, "a string", text)
    return dict(video=video, tracks=tracks.astype(np.float32, copy=False), visibility=vis,
                text=None if text is None else str(text),
                actions=None if actions is None else actions.astype(np.float32))

def load_npy(src, name, field):
    try:
        return np.load(io.BytesIO(src) if isinstance(src, bytes) else src, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{name}: field '{field}' is not a readable .npy ({e})") from None

def save_clip(path, video, tracks, visibility, text=None, actions=None, compress=False):
    """Validate and write one clip .npz atomically (text as a 0-d unicode array: it loads without pickle)."""
    clip = validate_clip(dict(video=video, tracks=tracks, visibility=visibility, text=text, actions=actions), str(path))
    arrays = {k: np.array(v) if k == "text" else v for k, v in clip.items() if v is not None}
    write_atomically(str(path), lambda f: (np.savez_compressed if compress else np.savez)(f, **arrays))

def load_clip(path):
    """A clip .npz -> dict(video, tracks, visibility, text, actions), validated; a ValueError naming the file if bad."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic[:2] != b"PK":   # an .npz is a zip archive; an image, a .npy or a text file is not a clip
            raise ValueError(f"not a .npz clip (a zip of named arrays, as data.save_clip writes; it starts {magic!r})")
        with zipfile.ZipFile(path) as npz:   # np.load's .npz, read member by member to name a bad field
            fields = {n[:-4]: load_npy(npz.read(n), path, n[:-4]) for n in npz.namelist() if n.endswith(".npy")}
        return validate_clip(fields, str(path))
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(e if str(e).startswith(str(path)) else f"{path}: {e}") from None

def read_video(src, name=None, extension=None):
    """A video (a path, or bytes with extension=".mp4") -> uint8 [T, H, W, 3]."""
    try:
        video = np.asarray(iio.imread(src, extension=extension))
    except Exception as e:   # imageio raises many kinds of errors for a file it cannot decode
        raise ValueError(f"{name or src}: field 'video' cannot be decoded ({e})") from None
    video = np.repeat(video[..., None], 3, -1) if video.ndim == 3 else video   # gray -> RGB; RGBA loses its alpha
    expect(name or src, "video", video.ndim == 4 and video.shape[-1] in (3, 4) and video.dtype == np.uint8,
           "uint8 [T, H, W, 3]", video)
    return video[..., :3]

def import_clip(video, tracks, visibility=None, layout="TN2", order="xy", units="pixels", text=None, name="import"):
    """Tracker output -> a validated clip. layout TN2 = [T, N, 2] or NT2 = [N, T, 2] (visibility follows); order xy
    or yx; units pixels or unit ([-1, 1]). Without visibility a point is visible while inside the frame."""
    tracks = np.asarray(tracks)
    expect(name, "tracks", tracks.dtype.kind in "iuf" and tracks.ndim == 3 and tracks.shape[-1] == 2,
           "numbers [T, N, 2] or [N, T, 2]", tracks)
    if layout == "NT2":
        tracks, visibility = tracks.transpose(1, 0, 2), None if visibility is None else np.asarray(visibility).T
    tracks = np.ascontiguousarray(tracks[..., ::-1] if order == "yx" else tracks, np.float32)
    H, W = np.asarray(video).shape[1:3]
    tracks = unit_to_pixels(tracks, W, H) if units == "unit" else tracks
    vis = ((tracks >= 0) & (tracks <= [W - 1, H - 1])).all(-1) if visibility is None else np.asarray(visibility)
    vis = vis if vis.dtype == np.bool_ else vis > 0.5   # trackers write float or 0/1
    return validate_clip(dict(video=video, tracks=tracks, visibility=vis, text=text), name)

TAR_PARTS = ("video.mp4", "tracks_yx.npy", "visibility.npy")

def index_tar(path):
    """An uncompressed shard's complete samples (members '<key>.<part>') -> {key: {part: (offset, size)}}."""
    samples = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                part = os.path.basename(member.name).partition(".")[2]
                if member.isfile() and part in TAR_PARTS:   # the key: the name without '.<part>'
                    samples.setdefault(member.name[:-len(part) - 1], {})[part] = (member.offset_data, member.size)
    except tarfile.TarError as e:
        raise ValueError(f"{path}: not a readable uncompressed .tar shard ({e})") from None
    complete = {key: parts for key, parts in samples.items() if len(parts) == len(TAR_PARTS)}
    if len(complete) < len(samples):
        warnings.warn(f"{path}: skipped {len(samples) - len(complete)} samples without all of {TAR_PARTS}")
    return complete

def load_tar_sample(path, key, parts=None):
    """One sample of the authors' layout -> a clip: tracks_yx.npy holds unit (y, x), made (x, y) pixels here."""
    parts, name = index_tar(path)[key] if parts is None else parts, f"{path}:{key}"
    with open(path, "rb") as f:
        read = {part: (f.seek(offset), f.read(size))[1] for part, (offset, size) in parts.items()}
    video = read_video(read["video.mp4"], name, ".mp4")
    tracks_yx, visibility = (load_npy(read[f"{field}.npy"], name, field) for field in ("tracks_yx", "visibility"))
    return import_clip(video, tracks_yx, visibility, order="yx", units="unit", name=name)

def find_clips(source):
    """A folder of .npz (or .tar) files, one file or a glob -> .npz paths and (shard, key, parts) of .tar samples."""
    paths = sorted(glob.glob(os.path.join(source, "*.npz")) or glob.glob(os.path.join(source, "*.tar"))) \
        if os.path.isdir(source) else sorted(glob.glob(source))
    refs = [r for p in paths for r in ([(p, k, v) for k, v in sorted(index_tar(p).items())] if p.endswith(".tar")
                                       else [p] if p.endswith(".npz") else [])]
    if not refs:
        raise ValueError(f"data source '{source}': no .npz clips or .tar samples (a folder, file, glob or 'synthetic')")
    return refs

def load_ref(ref):
    return load_clip(ref) if isinstance(ref, str) else load_tar_sample(*ref)

# ------------------------- Synthetic motion: textured shapes on a textured background, tracks computed analytically
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 205, 30),
          "purple": (140, 60, 200), "orange": (245, 135, 20), "cyan": (30, 200, 210), "pink": (245, 105, 180)}
SHAPES = {   # point-in-shape tests in local coordinates: every shape fits in [-1, 1]^2 (y points down)
    "square": lambda x, y: np.maximum(abs(x), abs(y)) <= 1, "circle": lambda x, y: x * x + y * y <= 1,
    "ring": lambda x, y: abs(x * x + y * y - 0.65) <= 0.35, "triangle": lambda x, y: (y <= 1) & (2 * abs(x) <= y + 1),
    "diamond": lambda x, y: abs(x) + abs(y) <= 1, "bar": lambda x, y: (abs(x) <= 1) & (abs(y) <= 0.45)}
DIRECTIONS = ("to the right", "to the upper right", "up", "to the upper left", "to the left", "to the lower left",
              "down", "to the lower right")

def smooth_noise(rng, h, w, channels=1, cells=(12, 4), wrap=False):
    """Value noise in [0, 1] [h, w, channels]: random grids (cells: spacing in px) mixed bilinearly; wrap: periodic."""
    def lerp(grid, n, cell, axis):
        u = np.arange(n) / cell
        i0 = np.floor(u).astype(int)
        f = (u - i0).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(grid.ndim)])
        i1 = (i0 + 1) % grid.shape[axis] if wrap else i0 + 1
        return np.take(grid, i0, axis) * (1 - f) + np.take(grid, i1, axis) * f
    total = np.zeros((h, w, channels), np.float32)
    for weight, cell in zip((0.65, 0.35), cells):
        gh, gw = (h // cell, w // cell) if wrap else ((h - 1) // cell + 2, (w - 1) // cell + 2)
        total += weight * lerp(lerp(rng.random((gh, gw, channels), np.float32), h, cell, 0), w, cell, 1)
    return (total - total.min()) / (np.ptp(total) + 1e-8)

def random_vector(rng, length):
    angle = rng.uniform(0, 2 * np.pi)
    return length * np.array([np.cos(angle), np.sin(angle)])

def random_scene(seed, T=64, H=256, W=256):
    """A random scene dict: background uint8 [P, P, 3] (periodic, P >= H, W), pan [T, 2] (camera offset, px), shapes
    back to front: kind, color, radius (px), texture uint8 [S, S, 3] on local [-1, 1]^2, center [T, 2], angle, scale."""
    rng, size, tau = np.random.default_rng(seed), min(H, W), np.linspace(0, 1, T)[:, None]
    period = -(-max(H, W) // 16) * 16
    gray, tint = (smooth_noise(rng, period, period, c, (cell, 4), wrap=True) for c, cell in ((1, 8), (3, 16)))
    background = (255 * (0.05 + 0.9 * (0.75 * gray + 0.25 * tint))).astype(np.uint8)
    pan = tau * random_vector(rng, rng.uniform(0.05, 0.25) * size) if rng.random() < 0.3 else np.zeros((T, 2))
    n, shapes = int(rng.integers(1, 7)), []
    for kind, color in zip(rng.permutation(list(SHAPES))[:n], rng.permutation(list(COLORS))[:n]):
        radius = rng.uniform(0.05, 0.13) * size
        start = rng.uniform([radius, radius], [W - 1 - radius, H - 1 - radius])
        shift = random_vector(rng, 0.0 if rng.random() < 0.25 else rng.uniform(0.05, 0.7) * size)  # still..fast
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
    """A shape's on-screen centre (x, y), cos, sin and size (pixels per local unit) at the frames, [F, 1, ...]."""
    center = shape["center"][frames] + pan[frames]
    angle, size = shape["angle"][frames], shape["scale"][frames] * shape["radius"]
    return [v.astype(np.float32).reshape((-1,) + (1,) * (ndim - 1))
            for v in (center[:, 0], center[:, 1], np.cos(angle), np.sin(angle), size)]

def to_local(shape, pan, frames, x, y):
    """Screen pixels (x, y) [F, ...] -> the shape's local coordinates at those frames."""
    cx, cy, cos, sin, size = _pose(shape, pan, frames, x.ndim)
    return (cos * (x - cx) + sin * (y - cy)) / size, (cos * (y - cy) - sin * (x - cx)) / size

def to_screen(shape, pan, frames, lx, ly):
    """Local coordinates [F, ...] -> screen pixels: the shape's similarity transform at those frames."""
    cx, cy, cos, sin, size = _pose(shape, pan, frames, lx.ndim)
    return cx + size * (cos * lx - sin * ly), cy + size * (sin * lx + cos * ly)

def render_scene(scene, H, W, frames):
    """frames -> uint8 [F, H, W, 3]: the panned background, then each shape's texture inverse-warped (nearest texel)."""
    frames, pan, tiled = np.asarray(frames), scene["pan"], np.tile(scene["background"], (2, 2, 1))
    offsets = np.rint(-pan[frames]).astype(int) % len(scene["background"])  # screen pixel p shows world point p - pan
    video = np.stack([tiled[oy:oy + H, ox:ox + W] for ox, oy in offsets])
    for shape in scene["shapes"]:
        cx, cy, _, _, size = _pose(shape, pan, frames, 1)
        half = int(np.ceil(size.max() * np.sqrt(2))) + 1  # covers [-1, 1]^2 turned by any angle
        xs, ys = (np.floor(c)[:, None].astype(int) + np.arange(-half, half + 1) for c in (cx, cy))  # [F, B]
        lx, ly = to_local(shape, pan, frames, xs[:, None, :].astype(np.float32), ys[:, :, None].astype(np.float32))
        on = SHAPES[shape["kind"]](lx, ly) & ((xs >= 0) & (xs < W))[:, None, :] & ((ys >= 0) & (ys < H))[:, :, None]
        f, i, j = np.nonzero(on)
        tx, ty = (np.rint((v[on] + 1) * (len(shape["texture"]) - 1) / 2).astype(int) for v in (lx, ly))
        video[f, ys[f, i], xs[f, j]] = shape["texture"][ty, tx]
    return video

def scene_tracks(scene, query, H, W):
    """First-frame points [N, 2] -> exact tracks [T, N, 2] riding the topmost layer under them, visibility [T, N]."""
    pan, shapes = scene["pan"], scene["shapes"]
    tracks, owner = query[None] - pan[:1, None] + pan[:, None], np.full(len(query), -1)   # owner: -1 = background
    for k, shape in enumerate(shapes):   # back to front: a later shape takes the points it covers
        lx, ly = to_local(shape, pan, slice(0, 1), query[None, :, 0], query[None, :, 1])
        mine = SHAPES[shape["kind"]](lx, ly)[0]
        owner[mine] = k
        tracks[:, mine, 0], tracks[:, mine, 1] = to_screen(shape, pan, slice(None), lx[:, mine], ly[:, mine])
    x, y = tracks[..., 0], tracks[..., 1]
    visible = (x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1)   # on screen, and not under a later layer
    for k, shape in enumerate(shapes):
        visible &= ~(SHAPES[shape["kind"]](*to_local(shape, pan, slice(None), x, y)) & (owner < k))
    return tracks, visible

def sample_queries(rng, scene, H, W, n):
    """n first-frame points [n, 2]: half inside the shapes (small shapes would get few), the rest uniform."""
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
    return DIRECTIONS[int(np.round(np.arctan2(-dy, dx) / (np.pi / 4))) % 8]

def describe_motion(scene, H, W):
    """A caption: the shape that travels furthest, else the pan, else a turn."""
    small, pan_move = 0.05 * min(H, W), scene["pan"][-1] - scene["pan"][0]
    moves = [(s["center"][-1] - s["center"][0], s) for s in scene["shapes"]]
    move, shape = max(moves, key=lambda m: np.hypot(*m[0]), default=(np.zeros(2), None))
    if shape is not None and np.hypot(*move) > max(small, np.hypot(*pan_move)):
        return f"the {shape['color']} {shape['kind']} moves {direction_words(*move)}"
    if np.hypot(*pan_move) > small:
        return f"the camera pans and the whole scene moves {direction_words(*pan_move)}"
    shape = next((s for s in scene["shapes"] if abs(s["angle"][-1] - s["angle"][0]) > 0.5), None)
    return "nothing moves much" if shape is None else f"the {shape['color']} {shape['kind']} turns in place"

def make_synthetic_clip(seed, T=64, H=256, W=256, n_tracks=1024, render="all", scene=None):
    """A clip (load_clip's keys), exact tracks, from seed (int or tuple) or a given scene; render="first": frame 0."""
    rng = np.random.default_rng(seed)
    scene = random_scene(rng, T, H, W) if scene is None else scene
    tracks, visibility = scene_tracks(scene, sample_queries(rng, scene, H, W, n_tracks), H, W)
    video = render_scene(scene, H, W, np.arange(len(scene["pan"]) if render == "all" else 1))
    return dict(video=video, tracks=tracks.astype(np.float32), visibility=visibility, text=describe_motion(scene, H, W),
                actions=None)

# --------- Drawing (PIL.ImageDraw): tracks coloured by time, blue -> green -> yellow -> red, as the paper's figures
def time_colors(T):
    """The colour of each time step, uint8 [T, 3]: blue -> green -> yellow -> red."""
    stops = np.array([[0, 0, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0]], dtype=float)
    pos = np.linspace(0, len(stops) - 1, T)
    i = np.minimum(pos.astype(int), len(stops) - 2)
    return np.rint(stops[i] * (1 - (pos - i)[:, None]) + stops[i + 1] * (pos - i)[:, None]).astype(np.uint8)

def draw_tracks(image, tracks_px, colors=None, visible=None, upto=None, width=1, dot=2, outline=False):
    """Paths over a copy of image uint8 [H, W, 3]: tracks_px [N, T, 2] pixels, colors [T, 3] (default time_colors) or
    [N, T, 3]; no segment touches a hidden point (visible [N, T]); upto: frames 0..upto, a dot; outline: black under."""
    extent = np.array(image.shape[1::-1])
    tracks = np.clip(np.asarray(tracks_px, np.float64), -2 * extent, 3 * extent)
    N, T = tracks.shape[:2]
    colors = np.broadcast_to(time_colors(T) if colors is None else np.asarray(colors, np.uint8), (N, T, 3)).tolist()
    ok = np.ones((N, T), bool) if visible is None else np.asarray(visible, bool)
    last = T - 1 if upto is None else int(upto)
    picture = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    draw = ImageDraw.Draw(picture)
    for extra, paint in ((2, [[(0, 0, 0)] * T] * N), (0, colors)) if outline else ((0, colors),):   # outline first
        for n in range(N):
            for t in range(1, last + 1):
                if ok[n, t - 1] and ok[n, t]:
                    draw.line([*tracks[n, t - 1], *tracks[n, t]], width=width + extra, fill=tuple(paint[n][t]))
            if upto is not None and dot and ok[n, last]:
                (x, y), r = tracks[n, last], dot + extra / 2
                draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(paint[n][last]))
    return np.asarray(picture)

def resize(frame, height, width):
    """uint8 [H, W, 3] -> [height, width, 3], bilinear (antialiased when shrinking)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(frame)).resize((width, height), Image.BILINEAR))

def save_image(path, image):
    write_atomically(str(path), lambda f: Image.fromarray(np.asarray(image, np.uint8)).save(f, format="PNG"))

def write_video(path, frames, fps=12):
    """uint8 frames [T, H, W, 3] -> a .gif or .mp4 (by the extension), written atomically."""
    ext = os.path.splitext(str(path))[1].lower()
    kwargs = dict(duration=1000 / fps, loop=0) if ext == ".gif" else dict(fps=fps, macro_block_size=1)   # (no resizing)
    write_atomically(str(path), lambda f: f.write(iio.imwrite("<bytes>", np.asarray(frames), extension=ext, **kwargs)))

def track_picture(path, frames, track_sets, size=256):
    """One row per frame, one column per track set ([n, N, T, 2] unit coordinates, e.g. truth and prediction)."""
    def panel(frame, tracks):
        return draw_tracks(resize(frame, size, size), unit_to_pixels(np.asarray(tracks, np.float32), size, size))
    rows = [np.concatenate([panel(frame, t[i]) for t in track_sets], 1) for i, frame in enumerate(frames)]
    save_image(path, np.concatenate(rows))

# -------- Model items (unit coordinates, tracks [N, T, 2]) and track selection: static, Sec. A's eval tracks, pokes
def prepare_image(frame, image_size):
    """uint8 [H, W, 3] -> (uint8 [S, S, 3], ImageNet-normalised float32 [3, S, S]), squashed (tracks stay aligned)."""
    small = resize(frame, image_size, image_size)
    normalised = ((small / 255 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32).transpose(2, 0, 1)
    return torch.from_numpy(small.copy()), torch.from_numpy(normalised.copy())

class TrackDataset(torch.utils.data.Dataset):
    """Windows of n_frames, n_enc + n_dec tracks visible in their first frame, and that frame, from "synthetic", .npz
    clips or .tar shards; train: a random start, val: the first. An item is a function of (seed, split, index).
    synth_pool > 0: training items draw their tracks from synth_pool synthetic clips, each made once per process."""

    def __init__(self, source="synthetic", split="train", n_frames=64, n_enc=40, n_dec=40, image_size=224,
                 seed=0, length=None, synth_size=(256, 256), synth_tracks=1024, synth_pool=0):
        self.source, self.split, self.n_frames, self.n_enc, self.n_dec = source, split, n_frames, n_enc, n_dec
        self.image_size, self.seed, self.synth_size, self.synth_tracks = image_size, seed, synth_size, synth_tracks
        self.pool, self.made = synth_pool if split == "train" else 0, {}
        self.refs = None if source == "synthetic" else find_clips(os.fspath(source))
        self.length = length or ((100_000 if split == "train" else 64) if self.refs is None else len(self.refs))

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        index, tag = int(index), SPLITS[self.split]
        for attempt in range(8):
            rng = np.random.default_rng((self.seed, index, attempt, tag + 10))
            if self.refs is None:
                key = (self.seed, index % self.pool if self.pool else index, attempt, tag)
                name, clip = "synthetic", self.made.get(key)
                if clip is None:   # (with a pool: made once, its frame prepared once)
                    clip = make_synthetic_clip(key, self.n_frames, *self.synth_size, self.synth_tracks, "first")
                    clip.update(image=prepare_image(clip.pop("video")[0], self.image_size), size=self.synth_size)
                    self.made.update({key: clip} if self.pool else {})
            else:
                epoch, position = divmod(index, len(self.refs))
                order = np.random.default_rng((self.seed, epoch, 3)).permutation(len(self.refs)) \
                    if self.split == "train" else np.arange(len(self.refs))
                ref = self.refs[order[(position + attempt) % len(self.refs)]]
                name = ref if isinstance(ref, str) else f"{ref[0]}:{ref[1]}"
                try:
                    clip = load_ref(ref)
                except ValueError as e:
                    warnings.warn(f"skipping a clip: {e}")
                    continue
            T, (H, W) = len(clip["tracks"]), clip.get("size") or clip["video"].shape[1:3]   # the window, its tracks
            start = int(rng.integers(T - self.n_frames + 1)) if self.split == "train" and T >= self.n_frames else 0
            usable, need = np.flatnonzero(clip["visibility"][start]), self.n_enc + self.n_dec
            if T < self.n_frames or len(usable) == 0:
                warnings.warn(f"skipping {name}: {T} frames of {self.n_frames}, {len(usable)} visible in frame {start}")
                continue
            chosen = rng.permutation(usable)[:need]   # the first n_enc for the encoder, the rest held out
            if len(chosen) < need:
                warnings.warn(f"{name}: {len(usable)} tracks visible in frame {start}, need {need}; repeating some")
                chosen = np.concatenate([chosen, rng.choice(usable, need - len(chosen))])
            span = slice(start, start + self.n_frames)
            frame, image = clip.get("image") or prepare_image(clip["video"][start], self.image_size)
            tracks, visible = (clip[k][span, chosen].swapaxes(0, 1).copy() for k in ("tracks", "visibility"))
            return dict(image=image, frame=frame, tracks=torch.from_numpy(pixels_to_unit(tracks, W, H)),
                        visible=torch.from_numpy(visible), text=clip["text"] or "", index=index)
        raise ValueError(f"{self.source}: no usable clip in 8 tries (it needs {self.n_frames} frames, a visible track)")

def make_track_dataset(source, split="train", **kwargs):
    """The VAE's track windows from any source: TrackDataset, or for .hdf5 demos libero.LiberoDataset(view="both")."""
    import libero
    if source == "synthetic" or not libero.find_demos(source):
        return TrackDataset(source, split, **kwargs)
    return libero.LiberoDataset(source, split, view="both", **{k: v for k, v in kwargs.items() if "synth" not in k})

def is_static(tracks, threshold=0.01, frac=0.95):
    """bool [N]: a track [N, T, 2] is static when it stays within threshold of its start in frac of its frames."""
    tracks = np.asarray(tracks)
    return (np.linalg.norm(tracks - tracks[:, :1], axis=-1) < threshold).mean(1) >= frac

def select_eval_tracks(tracks, visibility=None, n=40, seed=0):
    """Sec. A: indices of n tracks [N, T, 2] visible in frame 0 (visibility [N, T]), random moving ones first."""
    usable = np.ones(len(tracks), bool) if visibility is None else np.asarray(visibility)[:, 0].astype(bool)
    rng, static = np.random.default_rng(seed), is_static(tracks)
    return np.concatenate([rng.permutation(np.flatnonzero(usable & s)) for s in (~static, static)])[:n]

def sample_pokes(tracks, n, end_t=1.0):
    """Pokes [n, 5] (x0, y0, x1, y1, t) of the first n tracks [N, T, 2]: frame 0, the frame nearest end_t (np/torch)."""
    array = tracks.detach().cpu().numpy() if isinstance(tracks, torch.Tensor) else np.asarray(tracks)
    end = int(round(end_t * (array.shape[1] - 1)))
    pokes = np.concatenate([array[:n, 0], array[:n, end], np.full((n, 1), end / max(array.shape[1] - 1, 1))], 1)
    pokes = pokes.astype(np.float32)
    return torch.from_numpy(pokes).to(tracks.device) if isinstance(tracks, torch.Tensor) else pokes

# ----------------------------------------------------------------------------------------------------- Command line
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="write synthetic clips with exact tracks (a folder)")
    show = sub.add_parser("show", help="draw a clip's tracks over its video (.gif, .mp4)")
    imp = sub.add_parser("import", help="a video and a tracker's output (e.g. CoTracker3's: TN2, xy, pixels) -> a clip")
    for p in (synth, show, imp):
        p.add_argument("--out", required=True, help="output folder (synth) or file")
    for flag, default in dict(n=100, seed=0, frames=64, height=256, width=256, tracks=1024).items():
        synth.add_argument(f"--{flag}", type=int, default=default)
    show.add_argument("clip")
    show.add_argument("--n-tracks", type=int, default=64)
    for flag in ("--video", "--tracks", "--visibility", "--text"):
        imp.add_argument(flag, required=flag in ("--video", "--tracks"))
    for flag, choices in [("--layout", ["TN2", "NT2"]), ("--order", ["xy", "yx"]), ("--units", ["pixels", "unit"])]:
        imp.add_argument(flag, choices=choices, default=choices[0])
    args = parser.parse_args(argv)
    check_output(args.out, "--out", folder=args.command == "synth")
    if args.command == "synth":
        for i in tqdm(range(args.n), desc="synthetic clips", unit="clip"):
            clip = make_synthetic_clip(args.seed + i, args.frames, args.height, args.width, args.tracks)
            save_clip(os.path.join(args.out, f"{i:06d}.npz"), **clip)
    elif args.command == "show":
        clip = load_clip(args.clip)
        index = np.sort(np.random.default_rng(0).permutation(np.flatnonzero(clip["visibility"][0]))[:args.n_tracks])
        tracks, visible = clip["tracks"][:, index].transpose(1, 0, 2), clip["visibility"][:, index].T
        write_video(args.out, [draw_tracks(f, tracks, visible=visible, upto=t) for t, f in enumerate(clip["video"])])
    else:
        visibility = args.visibility and load_npy(args.visibility, args.visibility, "visibility")
        save_clip(args.out, **import_clip(read_video(args.video), load_npy(args.tracks, args.tracks, "tracks"),
                                          visibility, args.layout, args.order, args.units, args.text, args.tracks))
    print(f"wrote {args.out}")

if __name__ == "__main__":
    cli(main)
