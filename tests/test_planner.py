"""Tests of planner.py: the flow-matching formulas, the conditioning promises, the EMA, the checkpoint, a run."""
import dataclasses
import math

import pytest
import torch

import planner
import vae
from vae import SampleRandom
from planner import (PRESETS, MotionPlanner, PlannerConfig, euler_sample, flow_matching_loss, load_planner,
                     training_conditions)


def micro_config(**overrides):
    """A planner small enough for a unit test: 4x4 latents of 4 channels, 28 px random DINOv2, 2 layers."""
    base = dict(PRESETS["tiny"], n_frames=8, latent_channels=4, grid_size=4, image_size=28, image_pos_size=28,
                image_dim=32, image_layers=1, image_heads=2, dim=32, layers=2, head_dim=16, time_dim=16, cond_dim=32,
                fourier_bands=8, max_pokes=4, num_workers=0)
    base.update(overrides)
    return PlannerConfig(**base)


@pytest.fixture
def micro_planner():
    torch.manual_seed(0)
    model = MotionPlanner(micro_config(), pretrained=False).eval()
    for p in model.parameters():  # leave the zero-initialised output layer and adaptive norms: move off zero
        p.data += 0.05 * torch.randn_like(p)
    return model


def random_pokes(B, P, generator=None):
    xy = torch.rand(B, P, 4, generator=generator) * 1.8 - 0.9
    return torch.cat([xy, torch.rand(B, P, 1, generator=generator)], dim=-1)


# ---------------------------------------------------------------------------------------------------- flow matching

def test_euler_sampler_is_exact_on_the_straight_path_of_a_rectified_flow():
    # The conditional field of one data point x0: x_t = (1 - t) x0 + t n has v = n - x0 = (x - x0) / t. Its paths
    # are straight lines, so Euler integration from t = 1 lands on x0 exactly for any number of steps.
    x0, noise = torch.randn(3, 5, 2, dtype=torch.float64), torch.randn(3, 5, 2, dtype=torch.float64)
    for steps in (1, 3, 10):
        out = euler_sample(lambda x, t: (x - x0) / t.view(-1, 1, 1), noise, steps)
        assert torch.allclose(out, x0, atol=1e-12)


def test_euler_sampler_converges_to_an_analytic_ode_solution_at_first_order():
    # dx/dt = x has x(0) = x(1) / e. Going from t = 1 to 0 in n steps gives x(1) (1 - 1/n)^n.
    x1 = torch.randn(4, 3, dtype=torch.float64)
    errors = []
    for steps in (10, 100, 1000):
        out = euler_sample(lambda x, t: x, x1, steps)
        assert torch.allclose(out, x1 * (1 - 1 / steps) ** steps, rtol=1e-12)
        errors.append((out - x1 / math.e).abs().max().item())
    assert errors[2] < 2e-3 * x1.abs().max().item()
    assert 8 < errors[0] / errors[1] < 12 and 8 < errors[1] / errors[2] < 12  # first order: error ~ 1 / steps


def test_flow_matching_loss_matches_its_formula():
    x0 = torch.tensor([[[1.0, -2.0]], [[0.5, 0.0]]])
    noise = torch.tensor([[[0.0, 1.0]], [[-1.0, 3.0]]])
    t = torch.tensor([0.25, 0.5])
    seen = {}

    def velocity(x, tt):
        seen["x"] = x
        return 2 * x
    loss = flow_matching_loss(velocity, x0, noise, t)
    x_t = torch.tensor([[[0.75, -1.25]], [[-0.25, 1.5]]])  # (1 - t) x0 + t noise, by hand
    assert torch.allclose(seen["x"], x_t)
    target = noise - x0                                      # [[-1, 3]], [[-1.5, 3]]
    expected = ((2 * x_t - target) ** 2).mean()
    assert torch.isclose(loss, expected)
    assert abs(loss.item() - (6.25 + 30.25 + 1.0 + 0.0) / 4) < 1e-6


# ---------------------------------------------------------------------------------------------------- conditioning

def test_padded_poke_slots_do_not_change_the_velocity(micro_planner):
    g = torch.Generator().manual_seed(1)
    image, x, t = torch.randn(2, 3, 28, 28, generator=g), torch.randn(2, 16, 4, generator=g), torch.rand(2, generator=g)
    pokes = random_pokes(2, 3, g)
    padded = torch.cat([pokes, random_pokes(2, 5, g)], dim=1)
    mask = torch.arange(8) < 3
    v = micro_planner(x, t, image, pokes)
    v_padded = micro_planner(x, t, image, padded, mask.expand(2, 8))
    assert torch.allclose(v, v_padded, atol=1e-5)
    # and the pokes are a set: their order does not matter, while their content does
    assert torch.allclose(v, micro_planner(x, t, image, pokes.flip(1)), atol=1e-5)
    assert not torch.allclose(v, micro_planner(x, t, image, pokes[:, :2]), atol=1e-3)
    # a sample whose slots are all padding gets the null condition
    none = torch.zeros(2, 8, dtype=torch.bool)
    assert torch.allclose(micro_planner(x, t, image, padded, none), micro_planner(x, t, image), atol=1e-5)


def test_guidance_scale_one_is_the_conditional_model_and_others_follow_the_cfg_formula(micro_planner):
    image, pokes = torch.randn(2, 3, 28, 28), random_pokes(2, 2)
    noise = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cond, null = micro_planner.conditions(image, pokes), micro_planner.conditions(image)

    def reference(scale):
        def v(x, t):
            v_c, v_n = micro_planner.velocity(x, t, cond), micro_planner.velocity(x, t, null)
            return v_n + scale * (v_c - v_n)
        return micro_planner.denormalise(euler_sample(v, noise, 4))
    for scale in (1.0, 3.0):
        out = micro_planner.sample(image, pokes, steps=4, cfg=scale, generator=torch.Generator().manual_seed(5))
        assert torch.allclose(out, reference(scale), atol=1e-5), scale
    plain = micro_planner.sample(image, pokes, steps=4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(plain, micro_planner.denormalise(euler_sample(lambda x, t: micro_planner.velocity(x, t, cond),
                                                                     noise, 4)))


def test_text_condition_changes_the_velocity_and_empty_text_is_null(micro_planner):
    x, t, image = torch.randn(2, 16, 4), torch.rand(2), torch.randn(2, 3, 28, 28)
    v_null = micro_planner(x, t, image)
    v_text = micro_planner(x, t, image, text=["the red circle moves left", "the camera pans"])
    assert not torch.allclose(v_null, v_text, atol=1e-3)
    v_mixed = micro_planner(x, t, image, text=["the red circle moves left", None])
    assert torch.allclose(v_mixed[0], v_text[0], atol=1e-5) and torch.allclose(v_mixed[1], v_null[1], atol=1e-5)


def test_bad_pokes_and_images_are_named_value_errors(micro_planner):
    x, t, image = torch.randn(1, 16, 4), torch.rand(1), torch.randn(1, 3, 28, 28)
    bad = [(random_pokes(1, 2)[:, :, :4], "pokes"), (torch.tensor([[[1.5, 0, 0, 0, 1.0]]]), "start"),
           (torch.tensor([[[0, 0, 0.2, 0.1, 1.5]]]), "t in"), (torch.tensor([[[0, float("nan"), 0, 0, 1.0]]]), "NaN")]
    for pokes, words in bad:
        with pytest.raises(ValueError, match=words):
            micro_planner(x, t, image, pokes)
    with pytest.raises(ValueError, match="image"):
        micro_planner(x, t, torch.randn(1, 3, 32, 32))


def test_training_conditions_cover_every_poke_count_and_read_the_tracks():
    cfg = micro_config(max_pokes=16, cond="both")
    tracks = torch.rand(4000, 20, 8, 2) * 2 - 1
    pokes, mask, text = training_conditions(tracks, ["a caption"] * 4000, cfg, SampleRandom(range(4000), seed=0))
    counts = mask.sum(1)
    assert set(counts.tolist()) == set(range(17))  # 0 (text only / null) and every count 1..16
    with_text = torch.tensor([t is not None for t in text])
    assert 0.5 < with_text.float().mean() < 0.7            # text only 0.3 + both 0.3
    assert 0.05 < ((counts == 0) & ~with_text).float().mean() < 0.15  # the null condition, 0.1
    # each poke is (start, the same track at the goal frame, goal time)
    b, p = 7, 0
    frame = round(pokes[b, p, 4].item() * 7)
    match = [(tracks[b, n, 0] == pokes[b, p, :2]).all() and (tracks[b, n, frame] == pokes[b, p, 2:4]).all()
             for n in range(20)]
    assert any(match)
    only_pokes = training_conditions(tracks[:100], ["x"] * 100, dataclasses.replace(cfg, cond="pokes"))
    assert all(t is None for t in only_pokes[2])
    # keyed by sample index: samples 3 and 4 drawn in a batch of their own get the same conditions
    pokes_34, mask_34, text_34 = training_conditions(tracks[3:5], ["a caption"] * 2, cfg, SampleRandom([3, 4], seed=0))
    assert torch.equal(pokes_34, pokes[3:5]) and torch.equal(mask_34, mask[3:5]) and text_34 == text[3:5]


# ---------------------------------------------------------------------------------------------------- helpers and runs

def test_ema_decay_warms_up():
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(0.0)
    ema = vae.EMA(model, decay=0.99)
    model.weight.data.fill_(1.0)
    ema.update(model)                 # decay min(0.99, 2/11): the average moves most of the way at once
    assert abs(ema.model.weight.item() - 9 / 11) < 1e-6
    for _ in range(2000):
        ema.update(model)
    assert ema.updates == 2001 and abs(ema.model.weight.item() - 1.0) < 1e-6


def test_paper_preset_parameter_count():
    with torch.device("meta"):
        model = MotionPlanner(PlannerConfig(image_encoder="random"), pretrained=False)
    groups = planner.planner_parameter_groups(model)
    assert abs(sum(groups.values()) - 533.4e6) / 533.4e6 < 0.03
    assert abs(groups["backbone"] - 434.1e6) / 434.1e6 < 0.01
    assert abs(groups["poke embedding"] - 10.6e6) / 10.6e6 < 0.03


def test_tiny_planner_overfits_one_batch():
    # Two images, each with its own target latent grid: after training, sampling from noise lands on them.
    torch.manual_seed(0)
    model = MotionPlanner(micro_config(dim=48), pretrained=False)
    image = torch.randn(2, 3, 28, 28)
    x0 = torch.randn(2, 16, 4) * 0.7
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(300):
        noise = torch.randn(8, 16, 4)
        t = torch.sigmoid(torch.randn(8))
        loss = flow_matching_loss(lambda x, tt: model(x, tt, image.repeat(4, 1, 1, 1)), x0.repeat(4, 1, 1), noise, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = model.sample(image.repeat(4, 1, 1, 1), steps=20, generator=torch.Generator().manual_seed(0))
    error = (out - x0.repeat(4, 1, 1)).pow(2).mean().sqrt()
    assert error < 0.25 * x0.std(), error  # vs ~1.4x its std for a sample of the prior


def test_planner_trains_from_a_vae_checkpoint_and_reloads(tmp_path):
    # A micro VAE checkpoint, then the planner's own main(): latent statistics, EMA, validation, checkpoint.
    from test_vae import micro_config as vae_micro_config
    vcfg = vae_micro_config(n_enc=6, n_dec=6, synth_tracks=64)
    vae.save_checkpoint(str(tmp_path / "vae.pt"), {"kind": "vae", "model": vae.TrackVAE(vcfg).state_dict(),
                                                   "config": dataclasses.asdict(vcfg)})
    out = tmp_path / "planner"
    flags = [f"--vae={tmp_path / 'vae.pt'}", f"--out_dir={out}", "--dim=32", "--layers=1", "--head_dim=16",
             "--time_dim=16", "--cond_dim=32", "--fourier_bands=8", "--max_pokes=4", "--norm_samples=8",
             "--max_steps=2", "--batch_start=4", "--batch_end=4", "--micro_batch=4", "--num_workers=0",
             "--val_clips=2", "--val_k=2", "--val_steps=2", "--val_every=2", "--log_every=1", "--device=cpu"]
    planner.main(flags)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["kind"] == "planner" and ckpt["step"] == 2 and ckpt["ema"]["updates"].item() == 2
    assert ckpt["config"]["grid_size"] == 4 and ckpt["config"]["n_frames"] == 8  # taken from the VAE
    shift, scale = ckpt["model"]["latent_shift"], ckpt["model"]["latent_scale"]
    assert scale.item() != 1.0 and torch.equal(ckpt["ema"]["model"]["latent_scale"], scale)
    model = load_planner(str(out / "ckpt.pt"))
    for name, tensor in ckpt["ema"]["model"].items():
        assert torch.equal(model.state_dict()[name], tensor), name
    val = (out / "log.txt").read_text()
    assert all(f" {k} " in val for k in ("VAE_floor", "static", "p1", "straight_p4", "EPE_p4", "text", "null"))
    with pytest.raises(ValueError, match="expected a 'planner' checkpoint"):
        load_planner(str(tmp_path / "vae.pt"))
