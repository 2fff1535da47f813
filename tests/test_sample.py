"""Tests of sample.py: poke parsing and checks, pixel coordinates of a non-square image, the colours, dense = point-wise
decoding, the latents of numpy pokes, and the files a run writes (the session's micro checkpoints); bad requests and
files are named ValueErrors that write nothing."""
import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import planner
import sample
import vae
from conftest import micro_vae_config, moved_off_zero, save_model
from data import load_clip, make_synthetic_clip, pixels_to_unit, prepare_image, save_clip, time_colors, unit_to_pixels


@pytest.fixture(scope="module")
def files(tmp_path_factory, micro_checkpoints):
    """The micro checkpoints; a random VAE (moved off zero: its latents move its tracks, unlike the 2-step one's) and a
    planner built for it; a 72x48 clip of the VAE's 8 frames, a 50x30 image and a broken one."""
    import planner
    from conftest import micro_planner_config
    root = tmp_path_factory.mktemp("sample")
    torch.manual_seed(0)
    model = moved_off_zero(vae.TrackVAE(micro_vae_config(), pretrained=False).eval(), scale=0.1)
    model.fingerprint = vae.fingerprint(model)
    guide_vae = save_model(root / "guide_vae.pt", "vae", model)
    guide_planner = save_model(root / "guide_planner.pt", "planner",
                               moved_off_zero(planner.build_planner(micro_planner_config(), model)))
    clip = make_synthetic_clip(3, T=8, H=48, W=72, n_tracks=64)
    save_clip(root / "clip.npz", clip["video"], clip["tracks"], clip["visibility"], clip["text"])
    iio.imwrite(root / "wide.png", np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    (root / "broken.png").write_bytes(b"not an image")
    torch.manual_seed(1)
    other = save_model(root / "other_vae.pt", "vae", vae.TrackVAE(micro_vae_config(), pretrained=False))
    return dict(vae=micro_checkpoints[0], planner=micro_checkpoints[1], other_vae=other, guide_vae=guide_vae,
                guide_planner=guide_planner, clip=str(root / "clip.npz"),
                wide=str(root / "wide.png"), broken=str(root / "broken.png"))


def run(files, out, *flags):
    return sample.main([f"--vae={files['vae']}", f"--planner={files['planner']}", f"--out={out}", "--k=2", "--steps=2",
                        "--display=40", "--device=cpu", *flags])


# ---------------------------------------------------------------------------------------------------- inputs

def test_poke_and_number_parsing():
    assert sample.parse_poke("10,20,30,40") == [10, 20, 30, 40, 1.0]          # t defaults to the last frame
    assert sample.parse_poke(" 1.5, 2,3e1,4,0.25") == [1.5, 2, 30, 4, 0.25]
    for bad in ("10,20,30", "1,2,3,4,0.5,6", "a,b,c,d", "10;20;30;40", "", "1,2,nan,4", "1,2,3,inf"):
        with pytest.raises(ValueError, match="--poke"):
            sample.parse_poke(bad)
    for t in ("1.5", "-0.1"):
        with pytest.raises(ValueError, match=r"t = .* is outside \[0, 1\]"):
            sample.parse_poke(f"1,2,3,4,{t}")
    assert sample.parse_numbers("3,4", "--query", (2,), "x,y") == [3, 4]
    with pytest.raises(ValueError, match="--query '3': expected x,y"):
        sample.parse_numbers("3", "--query", (2,), "x,y")


def test_pixels_and_units_on_a_non_square_image():
    W, H = 200, 100
    pokes = np.array([[0, 0, 199, 99, 1.0], [199, 0, 0, 99, 0.5], [99.5, 49.5, 10, 20, 0.0]], np.float32)
    unit = sample.pokes_to_unit(pokes, W, H)
    np.testing.assert_allclose(unit[:2], [[-1, -1, 1, 1, 1], [1, -1, -1, 1, 0.5]])   # x over the width, y the height
    np.testing.assert_allclose(unit[2, [0, 1, 4]], [0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(unit_to_pixels(unit[:, :4].reshape(-1, 2), W, H).reshape(-1, 4), pokes[:, :4], atol=1e-4)
    sample.check_inside(pokes[:, :2], W, H, "p")
    for point in ([150, 100], [200, 50], [-0.5, 10]):   # (150, 100) would be inside with x and y swapped
        with pytest.raises(ValueError, match=r"p: \(.*\) is outside the 200x100 image"):
            sample.check_inside([point], W, H, "p")
    # cell centres of a 2 x 2 grid, row by row: x at (0.5, 1.5) * 199 / 2, y at (0.5, 1.5) * 99 / 2
    np.testing.assert_allclose(sample.grid_points(2, W, H), [[49.75, 24.75], [149.25, 24.75], [49.75, 74.25],
                                                             [149.25, 74.25]])


# ---------------------------------------------------------------------------------------------------- pictures

def test_time_colours_tracks_and_the_displacement_wheel():
    assert time_colors(4).tolist() == [[0, 0, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0]]
    track = np.stack([np.linspace(5, 35, 16), np.full(16, 10.0)], -1)[None]
    out = sample.draw_sample(np.zeros((20, 40, 3), np.uint8), track, np.zeros((0, 5)))
    start, end = out[10, 5].astype(int), out[10, 35].astype(int)
    assert start[2] > 200 and start[0] < 60 and end[0] > 200 and end[2] < 60, (start, end)   # blue -> red
    assert (out[0, 0] == 89).all()                      # the frame faded towards white, not drawn on
    wheel = sample.displacement_colors(np.array([[0, 0], [10, 0], [-10, 0], [5, 0], [0, 40]]), scale=10)
    assert wheel[:4].tolist() == [[255, 255, 255], [255, 0, 0], [0, 255, 255], [255, 128, 128]]   # still, right,
    assert wheel[4][2] < wheel[4][0] and wheel[4][1] > 200   # left, half the scale; down (y grows): yellow-green


# ---------------------------------------------------------------------------------------------------- decoding

def test_dense_field_equals_point_wise_decoding():
    model = moved_off_zero(vae.TrackVAE(micro_vae_config(), pretrained=False).eval())
    g = torch.Generator().manual_seed(2)
    image = torch.randn(3, 28, 28, generator=g)
    z = torch.randn(2, model.n_latents, model.cfg.latent_channels, generator=g)
    field = sample.decode_dense_field(model, z, image, 5, chunk=7)          # chunks that split rows
    points = sample.decode_tracks(model, z, image, sample.dense_query(5).reshape(-1, 2))
    assert field.shape == (2, 5, 5, model.cfg.n_frames, 2)
    torch.testing.assert_close(field.reshape(points.shape), points, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(field[0], field[1], atol=1e-3)                 # each sample its own latents
    query = sample.dense_query(5)
    assert query[0, -1].tolist() == [1, -1] and query[-1, 0].tolist() == [-1, 1]   # [row y, column x] = (x, y)


def test_sample_latents_takes_numpy_float64_pokes(files):
    model, the_planner = vae.load_vae(files["vae"]), planner.load_planner(files["planner"])
    image = torch.randn(3, the_planner.cfg.image_size, the_planner.cfg.image_size)
    pokes = np.array([[0.1, -0.2, 0.4, 0.3, 1.0]])
    z = [sample.sample_latents(the_planner, image, p, k=2, steps=2, vae=model, poke_guidance=0.5)
         for p in (pokes, torch.tensor(pokes, dtype=torch.float32))]
    assert z[0].dtype == torch.float32 and z[0].shape == (2, 16, 4) and torch.equal(z[0], z[1])
    assert not torch.equal(z[0], sample.sample_latents(the_planner, image, pokes, k=2, steps=2, vae=model))   # guided


# ---------------------------------------------------------------------------------------------------- runs

def test_poke_run_writes_the_documented_files(files, tmp_path):
    out = tmp_path / "out"
    result = run(files, out, f"--clip={files['clip']}", "--poke=10,20,60,30", "--poke=70,40,5,5,0.5", "--query=1,2",
                 "--grid=3", "--dense", "--dense-size=6")
    K, P, N, T = 2, 2, 2 + 1 + 9, 8
    with np.load(out / "samples.npz") as npz:
        assert set(npz.files) == {"tracks", "pokes", "query", "image", "settings"}
        assert npz["tracks"].shape == (K, N, T, 2) and npz["tracks"].dtype == np.float32
        assert npz["pokes"].tolist() == [[10, 20, 60, 30, 1], [70, 40, 5, 5, 0.5]]
        assert npz["query"].shape == (N, 2) and npz["query"][:P + 1].tolist() == [[10, 20], [70, 40], [1, 2]]
        np.testing.assert_allclose(npz["query"][P + 1:], sample.grid_points(3, 72, 48))
        assert np.array_equal(npz["image"], load_clip(files["clip"])["video"][0])
        settings, tracks = json.loads(str(npz["settings"])), npz["tracks"]
    assert settings == result and (settings["k"], settings["steps"], settings["n_pokes"], settings["dense"]) == \
        (K, 2, P, True) and (settings["width"], settings["height"]) == (72, 48)
    # the error reported is the poked tracks' distance from their goals at the goal frames
    goals, frames = np.array([[60, 30], [5, 5]]), [T - 1, round(0.5 * (T - 1))]
    epe = np.mean([np.hypot(*(tracks[k, p, frames[p]] - goals[p])) for k in range(K) for p in range(P)])
    assert settings["poke_epe_px"] == pytest.approx(epe, abs=1e-3)
    picture = iio.imread(out / "samples.png")
    assert picture.shape == (40, 3 * 60 + 2 * 4, 3)     # the prompt + K panels at the input's 3:2, 40 px high
    movie = iio.imread(out / "samples.gif")
    # T frames, then the last one held (a GIF writer may merge identical frames)
    assert T <= movie.shape[0] <= T + 2 and movie.shape[1:3] == picture.shape[:2]
    assert not np.array_equal(movie[0], movie[T - 1])
    with np.load(out / "dense.npz") as npz:
        assert npz["tracks"].shape == (K, 6, 6, T, 2) and npz["query"].shape == (6, 6, 2)
        np.testing.assert_allclose(npz["query"][[0, -1], [-1, 0]], [[71, 0], [0, 47]])   # (x, y) pixels
        np.testing.assert_allclose(npz["end_displacement"], npz["tracks"][:, :, :, -1] - npz["query"], atol=1e-4)
    assert iio.imread(out / "dense.png").shape == (K * 40 + (K - 1) * 4, 3 * 60 + 2 * 4, 3)


def test_poke_guidance_is_on_by_default_and_zero_is_the_papers_sampler(files, tmp_path):
    # --poke-guidance 0 writes the paper's sampler's tracks; the default (planner.PokeGuide, ours; its effect on the
    # poked points is tested in test_planner.py) moves them
    frame = load_clip(files["clip"])["video"][0]
    pokes = ["--poke=25,20,30,22", "--poke=50,30,45,35,0.5"]
    common = [f"--vae={files['guide_vae']}", f"--planner={files['guide_planner']}", "--k=2", "--steps=5", "--seed=3",
              "--display=40", "--device=cpu", f"--clip={files['clip']}", "--grid=2", *pokes]
    plain = sample.main(common + [f"--out={tmp_path / 'plain'}", "--poke-guidance=0"])
    guided = sample.main(common + [f"--out={tmp_path / 'guided'}"])
    assert guided["poke_guidance"] == sample.build_parser().get_default("poke_guidance") > 0 == plain["poke_guidance"]
    model, the_planner = vae.load_vae(files["guide_vae"]), planner.load_planner(files["guide_planner"])
    image, (H, W) = prepare_image(frame, model.cfg.image_size)[1], frame.shape[:2]
    unit = sample.pokes_to_unit(np.array([[25, 20, 30, 22, 1], [50, 30, 45, 35, 0.5]], np.float32), W, H)
    z = sample.sample_latents(the_planner, image, unit, k=2, steps=5, guidance=2.0, seed=3)   # (its --cfg 2)
    with np.load(tmp_path / "plain" / "samples.npz") as npz, np.load(tmp_path / "guided" / "samples.npz") as guided_npz:
        expect = unit_to_pixels(sample.decode_tracks(model, z, image, pixels_to_unit(npz["query"], W, H)).numpy(), W, H)
        np.testing.assert_allclose(npz["tracks"], expect, atol=1e-3)
        assert np.abs(guided_npz["tracks"] - npz["tracks"]).max() > 1e-3


def test_densification_turns_the_clips_tracks_into_pokes(files, tmp_path):
    out = tmp_path / "out"
    result = run(files, out, f"--from-tracks={files['clip']}", "--n-pokes=3", "--grid=0", "--dense-size=4")
    clip = load_clip(files["clip"])
    with np.load(out / "samples.npz") as npz:
        pokes, tracks = npz["pokes"], npz["tracks"]
    assert pokes.shape == (3, 5) and (pokes[:, 4] == 1).all() and tracks.shape == (2, 3, 8, 2)
    for poke in pokes:   # each poke is one of the clip's tracks: its start and where it is at the last frame
        n = np.flatnonzero((np.abs(clip["tracks"][0] - poke[:2]) < 1e-4).all(-1))
        assert len(n) and np.allclose(clip["tracks"][-1, n[0]], poke[2:4], atol=1e-4)
    assert result["dense"] and result["held_out_epe_px"] > 0 and result["held_out_static_px"] > 0
    with np.load(out / "dense.npz") as npz:                  # --from-tracks implies --dense
        assert npz["tracks"].shape == (2, 4, 4, 8, 2)


def test_text_run_on_a_non_square_image(files, tmp_path):
    out = tmp_path / "out"
    result = run(files, out, f"--image={files['wide']}", "--text=the ball rolls to the left", "--grid=2", "--k=1")
    with np.load(out / "samples.npz") as npz:
        assert npz["tracks"].shape == (1, 4, 8, 2) and npz["pokes"].shape == (0, 5)
        np.testing.assert_allclose(npz["query"], sample.grid_points(2, 50, 30))
        assert npz["image"].shape == (30, 50, 3)
    assert result["text"] == "the ball rolls to the left" and "poke_epe_px" not in result
    assert iio.imread(out / "samples.png").shape == (40, 67 * 2 + 4, 3)   # 50x30 at 40 px high: 67 px wide


@pytest.mark.parametrize("flags, words", [
    (["--clip=CLIP", "--poke=10,20,80,30"], r"--poke goal: \(80, 30\) is outside the 72x48 image"),
    (["--clip=CLIP", "--poke=10,50,20,30"], r"--poke start: \(10, 50\) is outside"),
    (["--clip=CLIP", "--poke=10,20,30"], "--poke '10,20,30': expected x0,y0,x1,y1"),
    (["--clip=CLIP", "--poke=10,20,30,40,2"], r"t = 2 is outside \[0, 1\]"),
    (["--clip=CLIP", "--query=1,2,3"], "--query '1,2,3'"),
    (["--clip=CLIP", "--k=0"], "--k 0: expected at least 1"),
    (["--from-tracks=CLIP", "--poke=1,2,3,4"], "leave out --poke"),
    (["--from-tracks=CLIP", "--image=CLIP"], "give one start frame"),
])
def test_bad_requests_are_named_value_errors_and_write_nothing(files, tmp_path, flags, words):
    with pytest.raises(ValueError, match=words):
        run(files, tmp_path / "out", *[f.replace("CLIP", files["clip"]) for f in flags])
    assert not (tmp_path / "out").exists()


def test_bad_files_are_named_value_errors_and_write_nothing(files, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--image .*broken.png: cannot be read as an image"):
        run(files, out, f"--image={files['broken']}")
    with pytest.raises(ValueError, match=r"expected a 'planner' checkpoint, got 'vae'"):
        sample.main([f"--vae={files['vae']}", f"--planner={files['vae']}", f"--out={out}"])
    # a planner trained on another VAE: refused by the fingerprint its checkpoint recorded
    with pytest.raises(ValueError, match=r"other_vae.pt: not the VAE --planner .* was trained on"):
        sample.main([f"--vae={files['other_vae']}", f"--planner={files['planner']}", f"--out={out}"])
    missing = tmp_path / "runs"
    with pytest.raises(ValueError, match=rf"{missing}/vae/ckpt.pt: no such checkpoint; make it with: python3 vae.py "
                                         rf"--out_dir {missing}/vae$"):
        sample.main([f"--vae={missing}/vae/ckpt.pt", f"--planner={files['planner']}", f"--out={out}"])
    with pytest.raises(ValueError, match=rf"no such checkpoint; make it with: python3 planner.py --out_dir "
                                         rf"{missing}/planner$"):
        sample.main([f"--vae={files['vae']}", f"--planner={missing}/planner/ckpt.pt", f"--out={out}"])
    assert not out.exists()
