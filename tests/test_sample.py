"""Tests of sample.py: poke parsing and validation, coordinates on a non-square image, the colours, dense = point-wise
decoding, and the files a run writes (with micro checkpoints made here, in seconds)."""
import dataclasses
import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import sample
import vae
from data import make_synthetic_clip, save_clip, time_colors, unit_to_pixels
from planner import MotionPlanner


def micro_vae_config(**overrides):
    from test_vae import micro_config
    return micro_config(**{"n_enc": 4, "n_dec": 4, "synth_tracks": 64, **overrides})


def micro_planner_config(**overrides):
    from test_planner import micro_config
    return micro_config(**overrides)


def save_micro(path, kind, model, cfg):
    vae.save_checkpoint(str(path), {"kind": kind, "model": model.state_dict(), "config": dataclasses.asdict(cfg)})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Micro VAE and planner checkpoints (random weights moved off their zero initialisations), a planner of
    another latent grid, a non-square clip and a non-square image."""
    root = tmp_path_factory.mktemp("sample")
    torch.manual_seed(0)
    vcfg = micro_vae_config()
    save_micro(root / "vae.pt", "vae", vae.TrackVAE(vcfg, pretrained=False), vcfg)
    pcfg = micro_planner_config()
    planner = MotionPlanner(pcfg, pretrained=False)
    for p in planner.parameters():
        p.data += 0.05 * torch.randn_like(p)
    save_micro(root / "planner.pt", "planner", planner, pcfg)
    other = micro_planner_config(grid_size=2)
    save_micro(root / "planner_other.pt", "planner", MotionPlanner(other, pretrained=False), other)
    clip = make_synthetic_clip(3, T=8, H=48, W=72, n_tracks=64)
    save_clip(root / "clip.npz", clip["video"], clip["tracks"], clip["visibility"], clip["text"])
    iio.imwrite(root / "wide.png", np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    (root / "broken.png").write_bytes(b"not an image")
    return root


def run(files, out, *flags):
    return sample.main([f"--vae={files / 'vae.pt'}", f"--planner={files / 'planner.pt'}", f"--out={out}",
                        "--k=2", "--steps=2", "--display=40", *flags])


# ---------------------------------------------------------------------------------------------------- inputs

def test_poke_parsing():
    assert sample.parse_poke("10,20,30,40") == [10, 20, 30, 40, 1.0]           # t defaults to the last frame
    assert sample.parse_poke(" 1.5, 2,3e1,4,0.25") == [1.5, 2, 30, 4, 0.25]
    for bad in ("10,20,30", "1,2,3,4,0.5,6", "a,b,c,d", "10;20;30;40", "", "1,2,nan,4", "1,2,3,inf"):
        with pytest.raises(ValueError, match="--poke"):
            sample.parse_poke(bad)
    for t in ("1.5", "-0.1"):
        with pytest.raises(ValueError, match=r"t = .* outside \[0, 1\]"):
            sample.parse_poke(f"1,2,3,4,{t}")


def test_pixel_unit_round_trip_and_inside_check_on_a_non_square_image():
    W, H = 200, 100
    pokes = np.array([[0, 0, 199, 99, 1.0], [199, 0, 0, 99, 0.5], [99.5, 49.5, 10, 20, 0.0]], np.float32)
    unit = sample.pokes_to_unit(pokes, W, H)
    assert np.allclose(unit[0], [-1, -1, 1, 1, 1]) and np.allclose(unit[1], [1, -1, -1, 1, 0.5])  # x over the width
    assert np.allclose(unit[2, :2], 0) and unit[2, 4] == 0
    assert np.allclose(unit_to_pixels(unit[:, :4].reshape(-1, 2), W, H).reshape(-1, 4), pokes[:, :4], atol=1e-4)
    sample.check_inside(pokes[:, :2], W, H, "p")
    for point in ([150, 100], [200, 50], [-0.5, 10]):   # (150, 100): inside if x and y were swapped
        with pytest.raises(ValueError, match="outside the 200x100 image"):
            sample.check_inside([point], W, H, "p")
    grid = sample.grid_points(2, W, H)                  # cell centres, row by row
    assert np.allclose(grid, [[49.75, 24.75], [149.25, 24.75], [49.75, 74.25], [149.25, 74.25]])


# ---------------------------------------------------------------------------------------------------- pictures

def test_colour_ramp_and_displacement_wheel():
    assert time_colors(4).tolist() == [[0, 0, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0]]
    # a track drawn by draw_sample starts blue and ends red, over the faded frame
    frame = np.zeros((20, 40, 3), np.uint8)
    track = np.stack([np.linspace(5, 35, 16), np.full(16, 10.0)], -1)[None]
    out = sample.draw_sample(frame, track, np.zeros((0, 5)))
    start, end = out[10, 5].astype(int), out[10, 35].astype(int)
    assert start[2] > 200 and start[0] < 60 and end[0] > 200 and end[2] < 60, (start, end)
    assert (out[0, 0] == 89).all()                      # the frame is faded towards white, not drawn on
    wheel = sample.displacement_colors(np.array([[0, 0], [10, 0], [-10, 0], [5, 0], [0, 40]]), scale=10)
    assert wheel[0].tolist() == [255, 255, 255]         # no motion: white
    assert wheel[1].tolist() == [255, 0, 0]             # right: red, full length
    assert wheel[2].tolist() == [0, 255, 255]           # left: cyan
    assert wheel[3].tolist() == [255, 128, 128]         # half the scale: half saturated
    assert wheel[4][2] < wheel[4][0] and wheel[4][1] > 200  # down (y grows): yellow-green, clipped at the scale


# ---------------------------------------------------------------------------------------------------- decoding

def test_dense_decoding_equals_point_wise_decoding(files):
    model = vae.load_vae(str(files / "vae.pt"))
    for p in model.parameters():
        p.data += 0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(1))
    image = torch.randn(3, 28, 28)
    z = torch.randn(2, model.n_latents, model.cfg.latent_channels)
    field = sample.decode_dense_field(model, z, image, 5, chunk=7)           # chunks that split rows
    points = sample.decode_tracks(model, z, image, sample.dense_query(5).reshape(-1, 2))
    assert field.shape == (2, 5, 5, 8, 2)
    assert torch.allclose(field.reshape(2, 25, 8, 2), points, atol=1e-5)
    assert not torch.allclose(field[0], field[1], atol=1e-3)                 # each sample its own latents
    query = sample.dense_query(5)
    assert query[0, -1].tolist() == [1, -1] and query[-1, 0].tolist() == [-1, 1]  # [row y, column x] = (x, y)


def test_sample_latents_takes_numpy_float64_pokes_as_float32(files):
    """A library caller's numpy pokes (float64) give the latents of the same pokes in float32, guidance on."""
    model, planner = vae.load_vae(str(files / "vae.pt")), sample.load_planner(str(files / "planner.pt"))
    image = torch.randn(3, planner.cfg.image_size, planner.cfg.image_size)
    pokes = np.array([[0.1, -0.2, 0.4, 0.3, 1.0]])
    z = [sample.sample_latents(planner, image, p, k=2, steps=2, vae=model, poke_guidance=0.5)
         for p in (pokes, torch.tensor(pokes, dtype=torch.float32))]
    assert z[0].dtype == torch.float32 and torch.equal(z[0], z[1])


# ---------------------------------------------------------------------------------------------------- runs

def test_poke_run_writes_the_documented_files(files, tmp_path):
    out = tmp_path / "out"
    result = run(files, out, f"--clip={files / 'clip.npz'}", "--poke=10,20,60,30", "--poke=70,40,5,5,0.5",
                 "--query=1,2", "--grid=3", "--dense", "--dense-size=6")
    K, P, N, T = 2, 2, 2 + 1 + 9, 8
    with np.load(out / "samples.npz") as npz:
        assert npz["tracks"].shape == (K, N, T, 2) and npz["tracks"].dtype == np.float32
        assert npz["pokes"].tolist() == [[10, 20, 60, 30, 1], [70, 40, 5, 5, 0.5]]
        assert npz["query"].shape == (N, 2) and npz["query"][:P].tolist() == [[10, 20], [70, 40]]
        assert npz["query"][P].tolist() == [1, 2] and npz["image"].shape == (48, 72, 3)
        settings = json.loads(str(npz["settings"]))
        tracks = npz["tracks"]
    assert settings["k"] == K and settings["steps"] == 2 and settings["n_pokes"] == P and settings["dense"]
    # the end-point error reported is the distance of the poked tracks from their goals at the goal frames
    goal_frames = [T - 1, round(0.5 * (T - 1))]
    goals = np.array([[60, 30], [5, 5]])
    epe = np.mean([np.hypot(*(tracks[k, p, goal_frames[p]] - goals[p])) for k in range(K) for p in range(P)])
    assert abs(settings["poke_epe_px"] - epe) < 1e-3 and result["poke_epe_px"] == settings["poke_epe_px"]
    picture = iio.imread(out / "samples.png")
    assert picture.shape == (40, 3 * 60 + 2 * 4, 3)     # prompt + K panels at the input's 3:2 aspect, 40 px high
    movie = iio.imread(out / "samples.gif")
    # T frames, then the last one held (a GIF writer may merge those identical frames into one)
    assert T <= movie.shape[0] <= T + 2 and movie.shape[1:3] == picture.shape[:2]
    assert not np.array_equal(movie[0], movie[T - 1])
    with np.load(out / "dense.npz") as npz:
        assert npz["tracks"].shape == (K, 6, 6, T, 2) and npz["query"].shape == (6, 6, 2)
        assert np.allclose(npz["query"][0, -1], [71, 0]) and np.allclose(npz["query"][-1, 0], [0, 47])
        assert np.allclose(npz["end_displacement"], npz["tracks"][:, :, :, -1] - npz["query"])
    assert iio.imread(out / "dense.png").shape == (K * 40 + (K - 1) * 4, 3 * 60 + 2 * 4, 3)


def test_poke_guidance_is_on_by_default_and_zero_is_the_papers_sampler(files, tmp_path):
    # Goals the micro VAE can reach (decoded from other latents, in pixels of the clip): the default run
    # (planner.PokeGuide, our addition) must land on them, --poke-guidance 0 (the paper's sampler) does not.
    from data import load_clip, pixels_to_unit, prepare_image
    model = vae.load_vae(str(files / "vae.pt"))
    frame = load_clip(str(files / "clip.npz"))["video"][0]
    H, W = frame.shape[:2]
    starts = np.array([[10.0, 20.0], [60.0, 40.0]], np.float32)
    torch.manual_seed(3)
    with torch.no_grad():
        image = prepare_image(frame, model.cfg.image_size)[1][None]
        unit = torch.as_tensor(pixels_to_unit(starts, W, H))[None]
        ends = model.decode(6 * torch.randn(1, 16, model.cfg.latent_channels), image, unit)[0, :, -1]
    goals = unit_to_pixels(ends.numpy(), W, H)
    pokes = [f"--poke={x0},{y0},{x1:.3f},{y1:.3f}" for (x0, y0), (x1, y1) in zip(starts, goals)]
    plain = run(files, tmp_path / "plain", f"--clip={files / 'clip.npz'}", "--grid=2", "--poke-guidance=0", *pokes)
    guided = run(files, tmp_path / "guided", f"--clip={files / 'clip.npz'}", "--grid=2", *pokes)
    assert plain["poke_epe_px"] > 0.5 and guided["poke_epe_px"] < 0.2 * plain["poke_epe_px"]
    assert guided["poke_guidance"] == sample.build_parser().get_default("poke_guidance") > 0


def test_densification_turns_the_clips_tracks_into_pokes(files, tmp_path):
    out = tmp_path / "out"
    run(files, out, f"--from-tracks={files / 'clip.npz'}", "--n-pokes=3", "--grid=0", "--dense-size=4")
    clip = np.load(files / "clip.npz")
    with np.load(out / "samples.npz") as npz:
        pokes, tracks = npz["pokes"], npz["tracks"]
    assert pokes.shape == (3, 5) and (pokes[:, 4] == 1).all() and tracks.shape == (2, 3, 8, 2)
    for poke in pokes:  # each poke is one of the clip's tracks: its start and its position at the last frame
        n = np.flatnonzero((np.abs(clip["tracks"][0] - poke[:2]) < 1e-4).all(-1))
        assert len(n) and np.allclose(clip["tracks"][-1, n[0]], poke[2:4], atol=1e-4)
    assert (out / "dense.png").exists() and (out / "dense.npz").exists()  # --from-tracks implies --dense


def test_text_run_on_a_non_square_image(files, tmp_path):
    out = tmp_path / "out"
    result = run(files, out, f"--image={files / 'wide.png'}", "--text=the ball rolls to the left", "--grid=2",
                 "--k=1")
    with np.load(out / "samples.npz") as npz:
        assert npz["tracks"].shape == (1, 4, 8, 2) and npz["pokes"].shape == (0, 5)
        assert np.allclose(npz["query"], sample.grid_points(2, 50, 30))
    assert result["text"] == "the ball rolls to the left" and "poke_epe_px" not in result
    assert iio.imread(out / "samples.png").shape == (40, 67 * 2 + 4, 3)


@pytest.mark.parametrize("flags, words", [
    (["--clip=CLIP", "--poke=10,20,80,30"], r"--poke goal: \(80, 30\) is outside the 72x48 image"),
    (["--clip=CLIP", "--poke=10,50,20,30"], "--poke start"),
    (["--clip=CLIP", "--poke=10,20,30"], "expected x0,y0,x1,y1"),
    (["--clip=CLIP", "--poke=10,20,30,40,2"], r"outside \[0, 1\]"),
    (["--clip=CLIP", "--query=1,2,3"], "--query"),
    (["--clip=CLIP", "--k=0"], "--k 0"),
    (["--from-tracks=CLIP", "--poke=1,2,3,4"], "leave out --poke"),
    (["--from-tracks=CLIP", "--image=CLIP"], "give one start frame"),
])
def test_bad_requests_are_named_value_errors_and_write_nothing(files, tmp_path, flags, words):
    with pytest.raises(ValueError, match=words):
        run(files, tmp_path / "out", *[f.replace("CLIP", str(files / "clip.npz")) for f in flags])
    assert not (tmp_path / "out").exists()


def test_bad_files_are_named_value_errors_and_write_nothing(files, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="broken.png: cannot be read as an image"):
        run(files, out, f"--image={files / 'broken.png'}")
    with pytest.raises(ValueError, match=r"--planner: .*vae.pt: expected a 'planner' checkpoint, got 'vae'"):
        sample.main([f"--vae={files / 'vae.pt'}", f"--planner={files / 'vae.pt'}", f"--out={out}"])
    with pytest.raises(ValueError, match=r"planner_other.pt does not belong to --vae .*vae.pt: grid_size = 2 .* 4"):
        sample.main([f"--vae={files / 'vae.pt'}", f"--planner={files / 'planner_other.pt'}", f"--out={out}"])
    missing = tmp_path / "runs"
    commands = (rf"  python vae.py --out_dir={missing}/vae\n"
                rf"  python planner.py --vae {missing}/vae/ckpt.pt --out_dir={missing}/planner")
    with pytest.raises(ValueError, match=rf"--vae {missing}/vae/ckpt.pt: no such checkpoint; --planner .*\n{commands}"):
        sample.load_models(str(missing / "vae/ckpt.pt"), str(missing / "planner/ckpt.pt"))
    with pytest.raises(ValueError, match=r"--planner .*: no such checkpoint. Train first:\n  python planner.py"):
        sample.load_models(str(files / "vae.pt"), str(missing / "planner/ckpt.pt"))
    # the canonical tiny paths name the plain commands of the README
    assert sample.checkpoint_hint(sample.TINY_VAE, "vae", sample.TINY_VAE) == "python vae.py"
    assert sample.checkpoint_hint(sample.TINY_PLANNER, "planner", sample.TINY_VAE) == \
        "python planner.py --vae out/tiny/vae/ckpt.pt"
    assert not out.exists()
