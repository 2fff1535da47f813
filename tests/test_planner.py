"""Tests of planner.py: the flow-matching formulas, the conditioning promises, the EMA, the checkpoint, a run."""
import dataclasses
import math
import os

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


def test_training_time_is_the_paper_logit_normal_unshifted_and_moves_its_median_when_shifted():
    # shift 1 is sigmoid(randn) exactly (the same draws); shift s maps the median 1/2 to s / (s + 1) and, being
    # monotone, the quantile P(t > 0.9) to P(n > logit(0.9 / (s - (s - 1) 0.9))) of the standard normal n.
    index = list(range(20000))
    base = torch.sigmoid(SampleRandom(index, 3).randn())
    assert torch.equal(planner.training_time(SampleRandom(index, 3), 1.0), base)
    for s in (2.0, 4.0):
        t = planner.training_time(SampleRandom(index, 3), s)
        assert 0 < t.min() and t.max() < 1
        assert abs(t.median().item() - s / (s + 1)) < 0.01
        u = 0.9 / (s - (s - 1) * 0.9)                           # the u that shift s maps to t = 0.9
        expected = 0.5 * math.erfc(math.log(u / (1 - u)) / math.sqrt(2))
        assert abs((t > 0.9).float().mean().item() - expected) < 0.01
    assert (base > 0.9).float().mean() < 0.02                    # the paper's: 1.4% of the draws in the first step


def test_the_guide_hook_rewrites_the_euler_step_without_changing_it():
    # x_next = (1 - t_next) x0_hat + t_next eps_hat is the Euler step, so an identity guide changes nothing; the last
    # step has t_next = 0, so the sample is the guide's last output.
    noise = torch.randn(2, 6, 3, dtype=torch.float64)
    field = lambda x, t: torch.sin(x) * t.view(-1, 1, 1) + x
    for steps in (1, 4, 10):
        assert torch.allclose(euler_sample(field, noise, steps, guide=lambda x0: x0), euler_sample(field, noise, steps),
                              atol=1e-12)
        target = torch.full_like(noise, 0.25)
        assert torch.allclose(euler_sample(field, noise, steps, guide=lambda x0: target), target, atol=1e-12)


def test_poke_guide_brings_poked_points_to_goals_the_vae_can_reach(micro_planner):
    # Goals made by decoding other latents are reachable; the planner alone (random here) misses them, the guide
    # must find them, with each poke at its own goal frame. The guide's error is the formula's.
    from test_vae import micro_config as micro_vae_config
    torch.manual_seed(1)
    track_vae = vae.TrackVAE(micro_vae_config(), pretrained=False).eval()
    C, T = track_vae.cfg.latent_channels, track_vae.cfg.n_frames
    image = torch.randn(2, 3, 28, 28)
    starts = torch.tensor([[-0.5, -0.2], [0.4, 0.5], [0.1, -0.7]]).expand(2, -1, -1)
    t = torch.tensor([1.0, 0.5, 0.25]).expand(2, -1)
    with torch.no_grad():
        reachable = track_vae.decode(2 * torch.randn(2, 16, C), image, starts)
    goals = reachable[:, torch.arange(3), (t[0] * (T - 1)).round().long()]
    pokes = torch.cat([starts, goals, t[..., None]], dim=-1)
    check = planner.PokeGuide(micro_planner, track_vae, image, pokes)
    errors = {}
    for strength in (0, 0.5):
        guide = planner.PokeGuide(micro_planner, track_vae, image, pokes, strength=strength) if strength else None
        z = micro_planner.sample(image, pokes=pokes, steps=4, generator=torch.Generator().manual_seed(0), guide=guide)
        with torch.no_grad():
            errors[strength] = check.poke_error(micro_planner.normalise(z))
            ends = track_vae.decode(z, image, starts)[:, torch.arange(3), (t[0] * (T - 1)).round().long()]
        assert torch.allclose(errors[strength], (ends - goals).pow(2).sum(-1).sum(-1), rtol=1e-4)
    assert (errors[0] > 1e-3).all() and (errors[0.5] < 0.05 * errors[0]).all()


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


# ---------------------------------------------------------------------------------------------------- LIBERO (Sec. A)

def micro_libero(**overrides):
    torch.manual_seed(0)
    model = MotionPlanner(micro_config(task="libero", text_dim=12, **overrides), pretrained=False).eval()
    for p in model.parameters():  # move the zero-initialised output layer and adaptive norms off zero
        p.data += 0.05 * torch.randn_like(p)
    return model


def libero_inputs(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(B, 2 * 16, 4, generator=g), t=torch.rand(B, generator=g),
                image=torch.randn(B, 2, 3, 28, 28, generator=g), task_emb=torch.randn(B, 12, generator=g),
                timestep=torch.tensor([5, 120])[:B])


def test_libero_planner_plans_both_views_as_one_sequence_and_reads_task_and_timestep():
    model, a = micro_libero(), libero_inputs()
    assert model.n_views == 2 and model.poke_embed is None and model.token_pos.shape == (2 * 16 + 2 * 4, 2)
    v = model(a["x"], a["t"], a["image"], task_emb=a["task_emb"], timestep=a["timestep"])
    assert v.shape == (2, 32, 4)
    # the task embedding and the timestep token each change the velocity, per sample
    other_task = a["task_emb"].clone()
    other_task[1] += 1.0
    v_task = model(a["x"], a["t"], a["image"], task_emb=other_task, timestep=a["timestep"])
    assert torch.allclose(v_task[0], v[0], atol=1e-6) and not torch.allclose(v_task[1], v[1], atol=1e-3)
    v_step = model(a["x"], a["t"], a["image"], task_emb=a["task_emb"], timestep=torch.tensor([5, 400]))
    assert torch.allclose(v_step[0], v[0], atol=1e-6) and not torch.allclose(v_step[1], v[1], atol=1e-3)
    # the two views are told apart: swapping their frames (and latent grids) is not a relabelling
    swapped = model(a["x"].roll(16, dims=1), a["t"], a["image"].flip(1), task_emb=a["task_emb"], timestep=a["timestep"])
    assert not torch.allclose(swapped.roll(16, dims=1), v, atol=1e-3)
    # sampling gives both grids, view-major; a given noise is the starting point
    noise = torch.randn(2, 32, 4)
    z = model.sample(a["image"], task_emb=a["task_emb"], timestep=a["timestep"], steps=2, noise=noise)
    assert z.shape == (2, 32, 4)
    again = model.sample(a["image"], task_emb=a["task_emb"], timestep=a["timestep"], steps=2, noise=noise)
    assert torch.equal(z, again)
    # the open-domain conditions are refused, and the open planner has none of the LIBERO parameters
    with pytest.raises(ValueError, match="LIBERO"):
        model(a["x"], a["t"], a["image"], text=["pick up the bowl"] * 2)
    with pytest.raises(ValueError, match="image"):
        model(a["x"], a["t"], a["image"][:, 0], task_emb=a["task_emb"], timestep=a["timestep"])
    open_names = set(MotionPlanner(micro_config(), pretrained=False).state_dict())
    assert not any(n.startswith(("view_embed", "timestep_embed")) for n in open_names)


def test_start_frame_dropout_removes_the_image_for_dropped_samples_only():
    model, a = micro_libero(), libero_inputs()
    keep = torch.tensor([True, False])
    other = a["image"] + torch.randn_like(a["image"])
    v = model(a["x"], a["t"], a["image"], task_emb=a["task_emb"], timestep=a["timestep"], image_mask=keep)
    v_other = model(a["x"], a["t"], other, task_emb=a["task_emb"], timestep=a["timestep"], image_mask=keep)
    assert not torch.allclose(v[0], v_other[0], atol=1e-3)     # kept: the frames matter
    assert torch.allclose(v[1], v_other[1], atol=1e-6)         # dropped: no trace of them
    # per view: dropping only the eye-in-hand frame leaves the agent-view frame in charge
    per_view = torch.tensor([[True, False], [True, False]])
    changed = a["image"].clone()
    changed[:, 1] += 1.0
    v1 = model(a["x"], a["t"], a["image"], task_emb=a["task_emb"], timestep=a["timestep"], image_mask=per_view)
    v2 = model(a["x"], a["t"], changed, task_emb=a["task_emb"], timestep=a["timestep"], image_mask=per_view)
    assert torch.allclose(v1, v2, atol=1e-6)


def test_libero_loss_draws_dropout_and_noise_from_the_sample_index():
    from test_vae import micro_config as vae_micro_config
    vcfg = vae_micro_config(n_enc=6, n_dec=6, synth_tracks=64)
    torch.manual_seed(0)
    vae_model = vae.TrackVAE(vcfg).eval()
    model = micro_libero()
    cfg = dataclasses.replace(model.cfg, image_dropout=0.5, image_noise=0.3)
    seen = []

    def net(x, t, image, **libero):
        seen.append((image, libero["image_mask"]))
        return model(x, t, image, **libero)
    a = libero_inputs(B=2)
    batch = dict(image=a["image"], tracks=torch.rand(2, 2, 6, 8, 2) * 2 - 1, task_emb=a["task_emb"],
                 timestep=a["timestep"])
    loss_fn = planner.make_libero_loss(model, vae_model, cfg)
    loss_a, _ = loss_fn(net, dict(batch, rng=SampleRandom([10, 11], seed=0)))
    loss_b, _ = loss_fn(net, dict(batch, rng=SampleRandom([10, 11], seed=0)))
    loss_c, _ = loss_fn(net, dict(batch, rng=SampleRandom([12, 13], seed=0)))
    assert torch.equal(loss_a, loss_b) and not torch.equal(loss_a, loss_c)
    assert torch.equal(seen[0][0], seen[1][0]) and not torch.equal(seen[0][0], a["image"])  # noise-augmented
    # over many samples, about image_dropout of them lose their start frames; the rest keep both
    B = 96
    big = dict(image=a["image"][:1].expand(B, -1, -1, -1, -1), tracks=batch["tracks"][:1].expand(B, -1, -1, -1, -1),
               task_emb=a["task_emb"][:1].expand(B, -1), timestep=a["timestep"][:1].expand(B))
    seen.clear()
    loss_fn(lambda x, t, image, **libero: seen.append(libero["image_mask"]) or torch.zeros_like(x),
            dict(big, rng=SampleRandom(range(B), seed=0)))
    assert seen[0].shape == (B,) and 0.3 < (~seen[0]).float().mean() < 0.7


def test_libero_presets_lock_dinov2_and_size_the_text_transformer():
    paper = PlannerConfig(**PRESETS["libero"])
    assert paper.task == "libero" and paper.freeze_image_encoder and paper.text_layers == 6 and paper.text_dim == 768
    with torch.device("meta"):
        model = MotionPlanner(dataclasses.replace(paper, image_encoder="random"), pretrained=False)
    groups = planner.planner_parameter_groups(model)
    assert abs(groups["text"] - 46e6) / 46e6 < 0.05  # DESIGN.md: the LIBERO text transformer, 46M
    # the tiny planner's stand-in for DINOv2 is the CNN that policy.py --preset perception_tiny trains and writes,
    # locked; its flow-matching times are shifted towards the noise (the paper's are not)
    import policy
    tiny = PlannerConfig(**PRESETS["libero_tiny"])
    perception = policy.PolicyConfig(**policy.PRESETS["perception_tiny"])
    assert tiny.task == "libero" and tiny.freeze_image_encoder and tiny.out_dir == "out/tiny/planner-libero"
    assert tiny.image_encoder == "conv" and not tiny.image_from_vae
    assert tiny.image_init == os.path.join(perception.out_dir, "ckpt.pt") and perception.vae == tiny.vae
    assert paper.time_shift == 1.0 and PlannerConfig(**PRESETS["paper"]).time_shift == 1.0 and tiny.time_shift > 1
    vit = PlannerConfig(**PRESETS["libero_tiny_vit"])                     # (the first tiny planner, for the README)
    assert vit.image_from_vae and not vit.image_init and vit.time_shift == 1.0 and vit.vae == tiny.vae


def micro_robot_demos(folder, n=4):
    """n short robot demos (data.py's robot task) with a made-up 12-d task embedding, for main() runs."""
    import numpy as np
    import data
    embed = lambda text: np.random.default_rng(sum(map(ord, text))).standard_normal(12).astype(np.float32)
    data.write_robot_demos(str(folder), n, seed=0, n_points=96, frames=(34, 40), embed_fn=embed)
    return str(folder)


def train_micro_libero_planner(tmp_path, steps=2):
    """A micro VAE checkpoint and robot demos, the planner's image encoder (policy.py --preset perception_tiny),
    then planner.main with --preset libero_tiny: returns their paths."""
    import policy
    from test_vae import micro_config as vae_micro_config
    vcfg = vae_micro_config(n_enc=6, n_dec=6, synth_tracks=64)
    torch.manual_seed(0)
    vae.save_checkpoint(str(tmp_path / "vae.pt"), {"kind": "vae", "model": vae.TrackVAE(vcfg).state_dict(),
                                                   "config": dataclasses.asdict(vcfg)})
    demos = micro_robot_demos(tmp_path / "robot")
    perception = tmp_path / "perception"
    policy.main(["--preset=perception_tiny", f"--vae={tmp_path / 'vae.pt'}", f"--data={demos}",
                 f"--out_dir={perception}", "--dim=32", "--layers=1", "--head_dim=16", "--latent_pool=8",
                 "--norm_samples=8", "--max_steps=2", "--val_every=2", "--batch_start=4", "--batch_end=4",
                 "--micro_batch=4", "--num_workers=0", "--val_clips=4", "--log_every=1", "--device=cpu"])
    out = tmp_path / "planner-libero"
    planner.main(["--preset=libero_tiny", f"--vae={tmp_path / 'vae.pt'}", f"--data={demos}", f"--out_dir={out}",
                  f"--image_init={perception / 'ckpt.pt'}",
                  "--dim=32", "--layers=1", "--head_dim=16", "--time_dim=16", "--cond_dim=32", "--fourier_bands=8",
                  "--norm_samples=8", f"--max_steps={steps}", "--batch_start=4", "--batch_end=4", "--micro_batch=4",
                  "--num_workers=0", "--val_clips=2", "--val_k=2", "--val_steps=2", f"--val_every={steps}",
                  "--eval_tracks=4", "--log_every=1", "--device=cpu"])
    return dict(vae=str(tmp_path / "vae.pt"), data=demos, planner=str(out / "ckpt.pt"), out=out,
                perception=str(perception / "ckpt.pt"))


def test_libero_planner_trains_on_robot_demos_and_reports_the_table_e_protocol(tmp_path):
    paths = train_micro_libero_planner(tmp_path)
    ckpt = torch.load(paths["planner"], weights_only=True)
    assert ckpt["config"]["task"] == "libero" and ckpt["config"]["text_dim"] == 12      # read from the data
    assert ckpt["config"]["freeze_image_encoder"] and ckpt["config"]["n_frames"] == 8   # window 16 -> the VAE's 8
    model = load_planner(paths["planner"])
    assert model.n_views == 2 and "view_embed" in ckpt["ema"]["model"]
    # DINOv2's stand-in locked: the image encoder still holds the perception checkpoint's weights after training
    assert isinstance(model.image_encoder.net, vae.ConvStandIn)
    trained = torch.load(paths["perception"], weights_only=True)["model"]
    for name, tensor in model.image_encoder.state_dict().items():
        assert torch.equal(tensor, trained[f"encoder.{name}"]), name
    assert " ratio " in (tmp_path / "perception" / "log.txt").read_text()   # its held-out action MSE vs the mean's
    # an encoder that does not fit, a missing one, or two to start from: errors that name what to do
    other = MotionPlanner(dataclasses.replace(model.cfg, image_dim=16), pretrained=False)
    with pytest.raises(ValueError, match="--image_init .*image_dim 16"):
        planner.load_image_encoder(other, paths["perception"])
    with pytest.raises(SystemExit, match="python policy.py --preset perception_tiny"):
        planner.load_image_encoder(model, str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="one only"):
        planner.build_planner(dataclasses.replace(model.cfg, image_from_vae=True), None)
    log = (paths["out"] / "log.txt").read_text()
    for key in ("agentview_min", "agentview_static", "agentview_floor", "eye_in_hand_min", "eye_in_hand_no_frame",
                "eye_in_hand_direction", "agentview_floor_direction"):
        assert f" {key} " in log, key
