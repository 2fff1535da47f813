"""Our stages on the authors' released layout (release.py) against the release's own outputs, to 1e-5.

tests/release_small.safetensors was made once, outside this project, by running the release's code (CompVis/
long-term-motion, commit d0f8b4b) in fp32 on CPU at small sizes: head dim 16, a 1-layer DINOv2 of width 16 at 56 px
(4x4 patches, as many as the 4x4 latent grid, as at paper size), 8 frames; its VAE, sparse planner (4 poke slots),
TraMoE LIBERO planner and ATM policy head, every weight drawn at random (their zero-initialised output layers too).
It holds their state dicts in their key layout under vae., planner_sparse., planner_libero_tramoe. and policy_head_atm.
(a planner without its vae.*, the head without its track_predictor.*: re-added here as in their files), and under io.
their inputs and outputs: encode / decode, a velocity with 3 pokes in 4 slots and without pokes, a 3-step sample
from fixed noise, a LIBERO velocity with and without the task, the head's actions."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import release
import vae

FIXTURE = load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "release_small.safetensors"))
IMAGE = dict(image_size=56, image_dim=16, image_layers=1, image_heads=2, image_pos_size=518)
VAE = dict(IMAGE, dim=32, enc_layers=2, dec_layers=1, head_dim=16, latent_channels=8, grid_size=4, n_frames=8)
PLANNER = dict(IMAGE, dim=32, layers=2, head_dim=16, time_dim=16, cond_dim=16, latent_channels=8, grid_size=4,
               n_frames=8, max_pokes=4, text_dim=16, text_layers=1)
TOL = dict(atol=1e-5, rtol=1e-5)   # float32: the two implementations add in different orders, per thread count


def part(prefix):
    return {k[len(prefix):]: v for k, v in FIXTURE.items() if k.startswith(prefix)}


def io(name):
    return part(f"io.{name}.")


def their_file(name, under=""):
    """A file as they release it: the model's own keys, its VAE (and the head's planner) under their prefixes."""
    state = {under + k: v for k, v in part(name + ".").items()}
    if name == "policy_head_atm":
        return {**state, **their_file("planner_libero_tramoe", "track_predictor.")}
    return state if name == "vae" else {**state, **{under + "vae." + k: v for k, v in part("vae.").items()}}


def image(x):   # their input, channel-last in [-1, 1] -> ours, ImageNet-normalised channels-first
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (((x + 1) / 2 - mean) / std).movedim(-1, -3)


@torch.no_grad()
def test_the_vae_encodes_and_decodes_as_the_release(tmp_path):
    path = str(tmp_path / "zipmo_vae.safetensors")
    save_file(their_file("vae"), path)
    model, d = release.load_vae(path, **VAE), io("vae")   # (a file on disk, as a user passes it)
    assert model.cfg.decoder_attention == "joint" and not model.cfg.position_content
    mean, logvar = model.encode(image(d["start_frame"]), d["tracks_yx"].flip(-1))    # their points are (y, x)
    assert_close(mean, d["enc_mean"], **TOL)
    assert_close(logvar, d["enc_logvar"], **TOL)
    decoded = model.decode(d["enc_mean"], image(d["start_frame"]), d["query_pos"].flip(-1))   # 6 queries, jointly
    assert_close(decoded, d["dec_tracks_yx"].flip(-1), **TOL)


@torch.no_grad()
def test_the_sparse_planner_computes_the_release_velocity_null_and_sample():
    model, d = release.load_planner("planner_sparse", state=their_file("planner_sparse"), vae_overrides=VAE,
                                    **PLANNER), io("planner_sparse")
    frame, pokes = image(io("vae")["start_frame"]), d["track_conds"][..., [1, 0, 3, 2, 4]]   # (y0, x0, y1, x1, t)
    assert model.null_token is None and model.text_proj is None and model.cfg.max_pokes == 4
    assert model.latent_shift.item() == pytest.approx(-0.175) and model.latent_scale.item() == pytest.approx(
        (0.5 / 11.6) ** 0.5)
    assert_close(model.velocity(d["x"], d["t"], model.conditions(frame, pokes)), d["velocity"], **TOL)
    absent = torch.zeros(2, 3, dtype=torch.bool)                     # their unconditional rows: all slots zero
    assert_close(model.velocity(d["x"], d["t"], model.conditions(frame, pokes, absent)), d["velocity_uncond"], **TOL)
    z = model.sample(frame, pokes, steps=3, noise=d["z"])           # Euler from t = 1, their cfg 1
    assert_close(model.normalise(z), d["sample_latents_normalised"], atol=1e-4, rtol=0)   # 3 steps: rounding adds up
    # the planner names the VAE in its own file, and that VAE is the one it pairs with
    assert model.cfg.vae == "planner_sparse"
    assert model.cfg.vae_fingerprint == release.load_vae("x", state=their_file("planner_sparse"), **VAE).fingerprint


@torch.no_grad()
def test_the_libero_planner_reads_task_and_step_as_the_release_and_its_mask_token_is_the_null():
    model, d = release.load_planner("planner_libero_tramoe", state=their_file("planner_libero_tramoe"),
                                    vae_overrides=VAE, **PLANNER), io("planner_libero_tramoe")
    assert model.cfg.task == "libero" and model.cfg.timestep_scale == 1.0 and model.poke_embed is None
    kw = dict(task_emb=d["txt_emb"], timestep=d["start_t"])         # their raw step count
    frames = image(d["start_frame_views"])
    assert_close(model.velocity(d["x"], d["t"], model.conditions(frames, **kw)), d["velocity"], **TOL)
    dropped = model.conditions(frames, task_mask=torch.zeros(2, dtype=torch.bool), **kw)
    assert_close(model.velocity(d["x"], d["t"], dropped), d["velocity_uncond"], **TOL)


@torch.no_grad()
def test_the_policy_head_regresses_the_release_actions():
    state, d = their_file("policy_head_atm"), io("policy_head_atm")
    planner = release.load_planner("head", state=state, vae_overrides=VAE, **PLANNER)
    head = release.load_head("head", state=state, planner=planner, dim=32, layers=1, head_dim=16)
    assert head.cfg.proprio_dim == 9 and head.cfg.planner_fingerprint == planner.fingerprint
    actions = head.actions(planner.denormalise(d["latents_normalised"]), d["proprio"])   # it reads normalised latents
    assert_close(actions, d["actions"], **TOL)


def test_bad_release_sources_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="release:zipmo_vae: cannot fetch zipmo_vae.safetensors .*CompVis/ZipMo.*local"):
        release.read("release:zipmo_vae")
    with pytest.raises(ValueError, match="release:zipmo_big: unknown release file; expected release: and one of "):
        vae.load_vae("release:zipmo_big")
    with pytest.raises(ValueError, match="missing.safetensors: no such file"):
        vae.load_vae(str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="junk.safetensors: not a readable .safetensors file"):
        vae.load_vae(str(tmp_path / "junk.safetensors"))
    with pytest.raises(ValueError, match="holds no release VAE"):
        release.load_vae("head.safetensors", state=part("policy_head_atm."))
    with pytest.raises(ValueError, match="small.safetensors: not the release's VAE at these sizes"):
        release.load_vae("small.safetensors", state=their_file("vae"), **dict(VAE, dim=48))
