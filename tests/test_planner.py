"""Tests of planner.py: the flow-matching formulas (loss, training time, Euler sampler, poke guidance), the conditioning
promises (pokes as a padded set, text, classifier-free guidance, LIBERO's views, task, timestep and start-frame
dropout), the training conditions and losses keyed by sample index, the EMA, the latent normalisation, building and
loading a planner for its own VAE only, the presets, and main() runs."""
import dataclasses
import math
import os
import re

import pytest
import torch
from torch.testing import assert_close

import planner
import vae
from conftest import micro_planner_config, micro_vae_config, moved_off_zero, save_model
from planner import EMA, MotionPlanner, PlannerConfig, euler_sample, flow_matching_loss, load_planner, training_conditions
from trainer import SampleRandom


def differs(a, b, by=1e-3):
    return (a - b).abs().max().item() > by


@pytest.fixture(scope="module")
def micro_planner():
    torch.manual_seed(0)
    return moved_off_zero(MotionPlanner(micro_planner_config(), pretrained=False)).eval()


@pytest.fixture(scope="module")
def micro_vae():
    torch.manual_seed(1)
    model = moved_off_zero(vae.TrackVAE(micro_vae_config(), pretrained=False), scale=0.15).eval()   # (z matters)
    model.fingerprint = vae.fingerprint(model)
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
        assert_close(euler_sample(lambda x, t: (x - x0) / t.view(-1, 1, 1), noise, steps), x0, atol=1e-12, rtol=0)


def test_euler_sampler_converges_to_an_analytic_ode_solution_at_first_order():
    # dx/dt = x has x(0) = x(1) / e. Going from t = 1 to 0 in n steps gives x(1) (1 - 1/n)^n.
    x1 = torch.randn(4, 3, dtype=torch.float64)
    errors = []
    for steps in (10, 100, 1000):
        out = euler_sample(lambda x, t: x, x1, steps)
        assert_close(out, x1 * (1 - 1 / steps) ** steps, rtol=1e-12, atol=0)
        errors.append((out - x1 / math.e).abs().max().item())
    assert errors[2] < 2e-3 * x1.abs().max().item()
    assert 8 < errors[0] / errors[1] < 12 and 8 < errors[1] / errors[2] < 12   # first order: error ~ 1 / steps


def test_training_time_is_logit_normal_unshifted_and_shifted_towards_the_noise():
    # shift 1 is sigmoid(randn) exactly (the same draws); shift s maps the median 1/2 to s / (s + 1) and, being
    # monotone, P(t > 0.9) to P(n > logit(u)) of the standard normal n, u = the time that s maps to 0.9.
    index = list(range(10000))
    base = torch.sigmoid(SampleRandom(index, 3).randn())
    assert_close(planner.training_time(SampleRandom(index, 3), 1.0), base, rtol=0, atol=0)
    for s in (2.0, 4.0):
        t = planner.training_time(SampleRandom(index, 3), s)
        assert_close(t, s * base / (1 + (s - 1) * base))
        assert 0 < t.min() and t.max() < 1
        assert abs(t.median().item() - s / (s + 1)) < 0.01
        u = 0.9 / (s - (s - 1) * 0.9)
        expected = 0.5 * math.erfc(math.log(u / (1 - u)) / math.sqrt(2))
        assert abs((t > 0.9).float().mean().item() - expected) < 0.01
    assert (base > 0.9).float().mean() < 0.02   # the paper's times rarely reach the first of 10 Euler steps


def test_the_guide_hook_rewrites_the_euler_step_without_changing_it():
    # x_next = (1 - t_next) x0_hat + t_next eps_hat is the Euler step, so an identity guide changes nothing; the last
    # step has t_next = 0, so the sample is the guide's last output.
    noise = torch.randn(2, 6, 3, dtype=torch.float64)

    def field(x, t):
        return torch.sin(x) * t.view(-1, 1, 1) + x
    for steps in (1, 4, 10):
        assert_close(euler_sample(field, noise, steps, guide=lambda x0: x0), euler_sample(field, noise, steps),
                     atol=1e-12, rtol=0)
        target = torch.full_like(noise, 0.25)
        assert_close(euler_sample(field, noise, steps, guide=lambda x0: target), target, atol=1e-12, rtol=0)


def test_poke_guide_brings_poked_points_to_goals_the_vae_can_reach(micro_planner, micro_vae):
    # Goals made by decoding other latents are reachable; the planner alone (random here) misses them, the guide
    # must find them, with each poke at its own goal frame. The guide's error is the formula's.
    C, T = micro_vae.cfg.latent_channels, micro_vae.cfg.n_frames
    torch.manual_seed(1)
    image = torch.randn(2, 3, 28, 28)
    starts = torch.tensor([[-0.5, -0.2], [0.4, 0.5], [0.1, -0.7]]).expand(2, -1, -1)
    t = torch.tensor([1.0, 0.5, 0.25]).expand(2, -1)
    frames = (t[0] * (T - 1)).round().long()
    with torch.no_grad():
        goals = micro_vae.decode(2 * torch.randn(2, 16, C), image, starts)[:, torch.arange(3), frames]
    pokes = torch.cat([starts, goals, t[..., None]], dim=-1)
    check = planner.PokeGuide(micro_planner, micro_vae, image, pokes)
    errors = {}
    for strength in (0, 0.5):
        guide = planner.PokeGuide(micro_planner, micro_vae, image, pokes, strength=strength) if strength else None
        z = micro_planner.sample(image, pokes=pokes, steps=4, generator=torch.Generator().manual_seed(0), guide=guide)
        with torch.no_grad():
            errors[strength] = check.poke_error(micro_planner.normalise(z))
            ends = micro_vae.decode(z, image, starts)[:, torch.arange(3), frames]
        assert_close(errors[strength], (ends - goals).pow(2).sum(-1).sum(-1), rtol=1e-4, atol=1e-7)
    assert (errors[0] > 1e-3).all() and (errors[0.5] < 0.05 * errors[0]).all()
    # a padded poke slot counts for nothing
    extra = pokes[:, :1].clone()
    extra[..., :4] += 0.3
    padded = planner.PokeGuide(micro_planner, micro_vae, image, torch.cat([pokes, extra], 1),
                               torch.arange(4).expand(2, 4) < 3)
    x0 = torch.randn(2, 16, C)
    assert_close(padded.poke_error(x0), check.poke_error(x0))


def test_flow_matching_loss_matches_its_formula():
    x0 = torch.tensor([[[1.0, -2.0]], [[0.5, 0.0]]])
    noise = torch.tensor([[[0.0, 1.0]], [[-1.0, 3.0]]])
    t = torch.tensor([0.25, 0.5])
    seen = {}

    def velocity(x, tt):
        seen["x"], seen["t"] = x, tt
        return 2 * x
    loss = flow_matching_loss(velocity, x0, noise, t)
    x_t = torch.tensor([[[0.75, -1.25]], [[-0.25, 1.5]]])   # (1 - t) x0 + t noise, by hand
    assert_close(seen["x"], x_t) and torch.equal(seen["t"], t)
    assert_close(loss, ((2 * x_t - (noise - x0)) ** 2).mean())   # the target is v = noise - x0
    assert loss.item() == pytest.approx((6.25 + 30.25 + 1.0 + 0.0) / 4)


# ---------------------------------------------------------------------------------------------------- conditioning

def test_pokes_are_a_set_and_padded_slots_change_nothing(micro_planner):
    g = torch.Generator().manual_seed(1)
    image, x, t = torch.randn(2, 3, 28, 28, generator=g), torch.randn(2, 16, 4, generator=g), torch.rand(2, generator=g)
    pokes = random_pokes(2, 3, g)
    padded = torch.cat([pokes, random_pokes(2, 5, g)], dim=1)
    v = micro_planner(x, t, image, pokes)
    assert_close(micro_planner(x, t, image, padded, (torch.arange(8) < 3).expand(2, 8)), v, atol=1e-5, rtol=0)
    # their order does not matter, while their content does
    assert_close(micro_planner(x, t, image, pokes.flip(1)), v, atol=1e-5, rtol=0)
    assert differs(micro_planner(x, t, image, pokes[:, :2]), v)
    # a sample whose slots are all padding gets the null condition
    none = torch.zeros(2, 8, dtype=torch.bool)
    assert_close(micro_planner(x, t, image, padded, none), micro_planner(x, t, image), atol=1e-5, rtol=0)


def test_one_poke_is_placed_by_its_start_point_because_the_null_token_is_attended_beside_it():
    # were the one poke the only key a cell may attend to, the softmax would give it weight 1 at every cell: its RoPE
    # position (the start point) could not reach the output, only its content (the goal, without --poke_offsets)
    torch.manual_seed(0)
    model = moved_off_zero(MotionPlanner(micro_planner_config(cond="pokes", poke_offsets=False), pretrained=False)).eval()
    g = torch.Generator().manual_seed(1)
    image, x, t = torch.randn(2, 3, 28, 28, generator=g), torch.randn(2, 16, 4, generator=g), torch.rand(2, generator=g)
    poke = random_pokes(2, 1, g)
    elsewhere = torch.cat([-poke[..., :2], poke[..., 2:]], -1)   # another start point, the same goal and time
    assert differs(model(x, t, image, elsewhere), model(x, t, image, poke))
    assert model.conditions(image, poke)["ctx_mask"][:, 0, 0, 0].all()   # the null slot, valid beside the poke


def test_without_a_null_token_pokes_fill_a_fixed_number_of_zero_slots_as_the_release():
    torch.manual_seed(0)
    model = moved_off_zero(MotionPlanner(micro_planner_config(cond="pokes", null_token=False), pretrained=False)).eval()
    assert model.null_token is None and model.text_proj is None                    # the release's open planner
    g = torch.Generator().manual_seed(1)
    image, x, t, pokes = torch.randn(2, 3, 28, 28, generator=g), torch.randn(2, 16, 4, generator=g), torch.rand(2), \
        random_pokes(2, 3, g)
    cond = model.conditions(image, pokes)
    assert cond["ctx"].shape[1] == 4 and cond["ctx_mask"] is None                   # 4 slots, none masked
    assert torch.equal(cond["ctx"][:, 3], torch.zeros(2, 32)) and torch.equal(cond["ctx_pos"][:, 3], torch.zeros(2, 3))
    assert_close(cond["ctx_pos"][:, :3], torch.cat([torch.zeros(2, 3, 1), pokes[..., [1, 0]]], -1))   # (0, y0, x0)
    v = model.velocity(x, t, cond)
    padded = torch.cat([pokes, random_pokes(2, 1, g)], dim=1)     # an absent poke is the zero slot, whatever it held
    assert_close(model(x, t, image, padded, (torch.arange(4) < 3).expand(2, 4)), v, atol=1e-5, rtol=0)
    # the zero slots are attended to (logit 0): three pokes in four slots are not three in three
    assert differs(model.velocity(x, t, dict(cond, ctx=cond["ctx"][:, :3], ctx_pos=cond["ctx_pos"][:, :3])), v, 1e-5)
    with pytest.raises(AssertionError, match="5 pokes, 4 slots"):
        model.conditions(image, random_pokes(2, 5))
    with pytest.raises(SystemExit):   # text rows without a task need the null token
        planner.parse_config(PlannerConfig, planner.PRESETS, ["--preset=paper", "--cond=both"])


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
        assert_close(out, reference(scale), atol=1e-5, rtol=0, msg=f"cfg {scale}")
    assert differs(reference(3.0), reference(1.0))
    given = micro_planner.sample(image, pokes, steps=4, noise=noise)
    assert_close(given, micro_planner.denormalise(euler_sample(lambda x, t: micro_planner.velocity(x, t, cond),
                                                               noise, 4)), rtol=0, atol=0)


def test_text_changes_the_velocity_and_no_text_is_the_null_condition(micro_planner):
    x, t, image = torch.randn(2, 16, 4), torch.rand(2), torch.randn(2, 3, 28, 28)
    v_null = micro_planner(x, t, image)
    v_text = micro_planner(x, t, image, text=["the red circle moves left", "the camera pans"])
    assert differs(v_text, v_null)
    v_mixed = micro_planner(x, t, image, text=["the red circle moves left", None])
    assert_close(v_mixed[0], v_text[0], atol=1e-5, rtol=0)
    assert_close(v_mixed[1], v_null[1], atol=1e-5, rtol=0)
    assert_close(micro_planner(x, t, image, text=[None, ""]), v_null, atol=1e-5, rtol=0)


def test_training_conditions_cover_every_poke_count_and_read_the_tracks():
    cfg = micro_planner_config(max_pokes=16, cond="both")
    tracks = torch.rand(3000, 20, 8, 2) * 2 - 1
    pokes, mask, text = training_conditions(tracks, ["a caption"] * 3000, cfg, SampleRandom(range(3000), seed=0))
    assert pokes.shape == (3000, 16, 5) and mask.shape == (3000, 16)
    counts = mask.sum(1)
    assert set(counts.tolist()) == set(range(17))                    # 0 (text only / null) and every count 1..16
    # mostly many: 17 - count = floor(y), y log-uniform in [1, 17): P(16) = log 2 / log 17, P(<= 4) = 1 - log 13 / log 17
    poked = counts[counts > 0].float()
    for share, expected in (((poked == 16).float().mean(), math.log(2) / math.log(17)),
                            ((poked <= 4).float().mean(), 1 - math.log(13) / math.log(17))):
        assert_close(share, torch.tensor(expected), atol=0.03, rtol=0)
    with_text = torch.tensor([t is not None for t in text])
    assert 0.5 < with_text.float().mean() < 0.7                      # text only 0.3 + both 0.3
    assert 0.05 < ((counts == 0) & ~with_text).float().mean() < 0.15   # the null condition, 0.1
    # each poke is (a track's start, the same track at the goal frame, the goal time)
    for b in range(5):
        for p in range(16):
            frame = round(pokes[b, p, 4].item() * 7)
            assert 1 <= frame <= 7
            assert any(torch.equal(tracks[b, n, 0], pokes[b, p, :2]) and torch.equal(tracks[b, n, frame], pokes[b, p, 2:4])
                       for n in range(20)), (b, p)
    # keyed by sample index: samples 3 and 4 drawn in a batch of their own get the same conditions
    pokes_34, mask_34, text_34 = training_conditions(tracks[3:5], ["a caption"] * 2, cfg, SampleRandom([3, 4], seed=0))
    assert torch.equal(pokes_34, pokes[3:5]) and torch.equal(mask_34, mask[3:5]) and text_34 == text[3:5]
    # --cond pokes gives no text, --cond text no pokes; a sample without a caption gets none
    rng = SampleRandom(range(200), seed=0)
    _, only_mask, only_text = training_conditions(tracks[:200], ["x"] * 200, dataclasses.replace(cfg, cond="pokes"), rng)
    assert all(t is None for t in only_text) and only_mask.any(1).float().mean() > 0.8
    _, text_mask, text_only = training_conditions(tracks[:200], ["x"] * 200, dataclasses.replace(cfg, cond="text"),
                                                  SampleRandom(range(200), seed=0))
    assert not text_mask.any() and sum(t == "x" for t in text_only) > 160
    assert all(t is None for t in training_conditions(tracks[:50], [""] * 50, cfg, SampleRandom(range(50)))[2])


def test_the_open_loss_draws_conditions_noise_and_time_from_the_sample_index(micro_planner, micro_vae):
    loss_fn = planner.make_loss(micro_planner, micro_vae, micro_planner.cfg)
    image, tracks = torch.randn(2, 3, 28, 28), torch.rand(2, 8, 8, 2) * 2 - 1
    batch = dict(image=image, tracks=tracks, text=["the square moves up", "a circle"])
    losses = [loss_fn(micro_planner, dict(batch, rng=SampleRandom(i, seed=0)))[0] for i in ([4, 5], [4, 5], [6, 7])]
    assert torch.equal(losses[0], losses[1]) and differs(losses[0], losses[2], 1e-6)


# ---------------------------------------------------------------------------------------------------- LIBERO (Sec. A)

@pytest.fixture(scope="module")
def micro_libero():
    torch.manual_seed(0)
    cfg = micro_planner_config(**planner.LIBERO, text_dim=12, timestep_scale=1 / 600)
    return moved_off_zero(MotionPlanner(cfg, pretrained=False)).eval()


def libero_inputs(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(B, 2 * 16, 4, generator=g), t=torch.rand(B, generator=g),
                image=torch.randn(B, 2, 3, 28, 28, generator=g), task_emb=torch.randn(B, 12, generator=g),
                timestep=torch.tensor([5, 120])[:B])


def test_the_libero_planner_plans_both_views_as_one_sequence_and_reads_task_and_timestep(micro_libero):
    model, a = micro_libero, libero_inputs()
    assert model.n_views == 2 and model.poke_embed is None and model.token_pos.shape == (2 * 16 + 2 * 4, 3)
    assert torch.equal(model.token_pos[32:, 0], torch.full((8,), -1.0)) and not model.token_pos[:32, 0].any()
    v = model(a["x"], a["t"], a["image"], task_emb=a["task_emb"], timestep=a["timestep"])
    assert v.shape == (2, 32, 4)
    # the task embedding and the timestep each change the velocity, per sample
    other_task = a["task_emb"].clone()
    other_task[1] += 1.0
    v_task = model(a["x"], a["t"], a["image"], task_emb=other_task, timestep=a["timestep"])
    assert_close(v_task[0], v[0], atol=1e-6, rtol=0) and differs(v_task[1], v[1])
    v_step = model(a["x"], a["t"], a["image"], task_emb=a["task_emb"], timestep=torch.tensor([5, 400]))
    assert_close(v_step[0], v[0], atol=1e-6, rtol=0) and differs(v_step[1], v[1])
    # the two views are told apart: swapping their frames (and latent grids) is not a relabelling
    swapped = model(a["x"].roll(16, dims=1), a["t"], a["image"].flip(1), task_emb=a["task_emb"], timestep=a["timestep"])
    assert differs(swapped.roll(16, dims=1), v)
    # sampling gives both grids, view-major, from the given noise
    noise = torch.randn(2, 32, 4)
    z = model.sample(a["image"], task_emb=a["task_emb"], timestep=a["timestep"], steps=2, noise=noise)
    assert z.shape == (2, 32, 4)
    assert torch.equal(z, model.sample(a["image"], task_emb=a["task_emb"], timestep=a["timestep"], steps=2, noise=noise))
    open_names = set(MotionPlanner(micro_planner_config(), pretrained=False).state_dict())
    assert not any(n.startswith(("view_embed", "timestep_embed")) for n in open_names)


def test_a_dropped_task_is_the_null_token_and_libero_guidance_follows_the_cfg_formula(micro_libero):
    model, a = micro_libero, libero_inputs()
    kept = dict(task_emb=a["task_emb"], timestep=a["timestep"])
    cond = model.conditions(a["image"], **kept)
    dropped = model.conditions(a["image"], task_mask=torch.tensor([True, False]), **kept)
    assert_close(dropped["ctx"], cond["ctx"]) and cond["ctx_mask"][:, 0, 0].tolist() == [[False, True, True]] * 2
    assert dropped["ctx_mask"][1, 0, 0].tolist() == [True, False, True]   # [null | task | step]: the null stands in
    v, v_dropped = (model.velocity(a["x"], a["t"], c) for c in (cond, dropped))
    assert_close(v_dropped[0], v[0], atol=1e-6, rtol=0) and differs(v_dropped[1], v[1])
    other = model.conditions(a["image"], task_mask=torch.tensor([False, False]), task_emb=a["task_emb"] + 1,
                             timestep=a["timestep"])   # no trace of a dropped task
    assert_close(model.velocity(a["x"], a["t"], other)[1], v_dropped[1], atol=1e-6, rtol=0)
    noise, null = torch.randn(2, 32, 4), model.conditions(a["image"], task_mask=torch.zeros(2, dtype=torch.bool), **kept)
    guided = model.sample(a["image"], steps=2, cfg=3.0, noise=noise, **kept)
    def reference(x, t):
        v_c, v_n = model.velocity(x, t, cond), model.velocity(x, t, null)
        return v_n + 3.0 * (v_c - v_n)
    assert_close(guided, model.denormalise(euler_sample(reference, noise, 2)), atol=1e-5, rtol=0)


def test_start_frame_dropout_removes_the_image_for_dropped_samples_only(micro_libero):
    model, a = micro_libero, libero_inputs()
    keep = torch.tensor([True, False])
    other = a["image"] + torch.randn_like(a["image"])
    v = model(a["x"], a["t"], a["image"], task_emb=a["task_emb"], timestep=a["timestep"], image_mask=keep)
    v_other = model(a["x"], a["t"], other, task_emb=a["task_emb"], timestep=a["timestep"], image_mask=keep)
    assert differs(v[0], v_other[0])                          # kept: the frames matter
    assert_close(v[1], v_other[1], atol=1e-6, rtol=0)         # dropped: no trace of them
    # per view: dropping only the eye-in-hand frame leaves the agent-view frame in charge
    per_view = torch.tensor([[True, False], [True, False]])
    changed = a["image"].clone()
    changed[:, 1] += 1.0
    v1 = model(a["x"], a["t"], a["image"], task_emb=a["task_emb"], timestep=a["timestep"], image_mask=per_view)
    v2 = model(a["x"], a["t"], changed, task_emb=a["task_emb"], timestep=a["timestep"], image_mask=per_view)
    assert_close(v1, v2, atol=1e-6, rtol=0)


def test_the_libero_loss_draws_dropout_and_noise_from_the_sample_index(micro_libero):
    torch.manual_seed(0)
    vae_model = vae.TrackVAE(micro_vae_config(n_enc=6, n_dec=6), pretrained=False).eval()
    cfg = dataclasses.replace(micro_libero.cfg, image_dropout=0.5, image_noise=0.3)
    seen = []

    def net(x, t, image, **libero):
        seen.append((image, libero["image_mask"]))
        return micro_libero(x, t, image, **libero)
    a = libero_inputs()
    batch = dict(image=a["image"], tracks=torch.rand(2, 2, 6, 8, 2) * 2 - 1, task_emb=a["task_emb"],
                 timestep=a["timestep"])
    loss_fn = planner.make_loss(micro_libero, vae_model, cfg)
    losses = [loss_fn(net, dict(batch, rng=SampleRandom(i, seed=0)))[0] for i in ([10, 11], [10, 11], [12, 13])]
    assert torch.equal(losses[0], losses[1]) and differs(losses[0], losses[2], 1e-6)
    assert torch.equal(seen[0][0], seen[1][0]) and differs(seen[0][0], a["image"])   # noise-augmented, keyed
    # over many samples, about image_dropout of them lose their start frames; each sample's noise std is in
    # [0, image_noise], one std for both of its views
    B = 64
    big = {k: v[:1].expand(B, *v.shape[1:]) for k, v in batch.items()}
    seen.clear()
    loss_fn(lambda x, t, image, **libero: seen.append((image, libero["image_mask"])) or torch.zeros_like(x),
            dict(big, rng=SampleRandom(range(B), seed=0)))
    noisy, mask = seen[0]
    assert mask.shape == (B,) and 0.3 < (~mask).float().mean() < 0.7
    std = (noisy - big["image"]).flatten(2).std(-1)             # [B, views]
    assert_close(std[:, 0], std[:, 1], rtol=0.1, atol=1e-3)
    assert std.max() < 0.3 * 1.05 and std.min() < 0.05 and std.max() > 0.2


# ---------------------------------------------------------------------------------------------------- helpers

def test_the_ema_warms_up_its_decay_and_copies_buffers():
    model = torch.nn.BatchNorm1d(1)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.running_mean.fill_(5.0)
    ema.update(model)                  # decay min(0.99, 2/11): the average moves most of the way at once
    assert ema.model.weight.item() == pytest.approx(9 / 11) and ema.model.running_mean.item() == 5.0
    assert not any(p.requires_grad for p in ema.model.parameters()) and model.weight.requires_grad
    for _ in range(2000):
        ema.update(model)
    assert ema.updates == 2001 and ema.model.weight.item() == pytest.approx(1.0, abs=1e-6)
    restored = EMA(model, decay=0.99)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 2001 and torch.equal(restored.model.weight, ema.model.weight)


def test_the_latent_normalisation_gives_mean_0_and_variance_one_half(micro_vae):
    g = torch.Generator().manual_seed(0)
    items = [dict(image=torch.randn(3, 28, 28, generator=g), tracks=torch.rand(8, 8, 2, generator=g) * 2 - 1)
             for _ in range(6)]
    shift, scale = planner.measure_latent_stats(micro_vae, items, 6, batch_size=4)
    model = MotionPlanner(micro_planner_config(), pretrained=False)
    model.latent_shift.fill_(shift), model.latent_scale.fill_(scale)
    with torch.no_grad():
        z = micro_vae.encode(torch.stack([it["image"] for it in items]),
                             torch.stack([it["tracks"] for it in items])[:, :micro_vae.cfg.n_enc])[0]
    x = model.normalise(z)
    assert abs(x.mean().item()) < 1e-5 and x.var().item() == pytest.approx(0.5, rel=1e-4)
    assert_close(model.denormalise(x), z, atol=1e-5, rtol=0)


def test_build_planner_takes_the_vaes_latent_space_fingerprint_and_image_encoder(micro_vae):
    cfg = micro_planner_config(n_frames=16, grid_size=2, latent_channels=8, image_dim=16, image_heads=1)
    built = planner.build_planner(cfg, micro_vae)
    for field in planner.VAE_FIELDS + ("image_dim", "image_heads", "image_layers", "image_encoder"):
        assert getattr(built.cfg, field) == getattr(micro_vae.cfg, field), field
    assert built.cfg.vae_fingerprint == micro_vae.fingerprint and built.n_latents == micro_vae.n_latents
    for name, tensor in micro_vae.image_encoder.state_dict().items():
        assert torch.equal(built.image_encoder.state_dict()[name], tensor), name
    own = planner.build_planner(dataclasses.replace(cfg, image_from_vae=False), micro_vae)
    assert own.cfg.grid_size == 4 and own.cfg.image_dim == 16   # the latent space only; its own image encoder


def test_the_paper_presets_have_the_release_parameter_counts(capsys):
    with torch.device("meta"):   # the Table F models, built without memory
        counts = planner.main(["--preset=paper", "--dry-run"])
        libero = planner.main(["--preset=libero", "--dry-run"])
        tramoe = planner.main(["--preset=libero", "--timestep_scale=1", "--dry-run"])
    assert "total parameters: 533416192" in capsys.readouterr().out      # the release's sparse planner, to the parameter
    assert counts == {"projections": 819968, "image encoder": 86583552, "time mapping": 1246208,
                      "poke embedding": 10618368, "backbone": 434148096}
    # LIBERO (ATM / TraMoE): the release's files also hold an unused poke embedding (10,618,368) that we do not build
    assert sum(libero.values()) == 579427272 - 10618368 and libero["text"] == 46016712
    assert sum(tramoe.values()) == 590045640 - 10618368 and tramoe["timestep"] == 10618368


def test_the_libero_presets():
    paper, tiny = PlannerConfig(**planner.PRESETS["libero"]), PlannerConfig(**planner.PRESETS["libero_tiny"])
    assert paper.task == "libero" and paper.freeze_image_encoder and paper.text_layers == 6 and paper.text_dim == 768
    assert paper.time_shift == 1.0 == PlannerConfig(**planner.PRESETS["paper"]).time_shift
    # tiny: in the robot VAE, through its image encoder, locked; times shifted towards the noise
    assert tiny.task == "libero" and tiny.image_from_vae and tiny.freeze_image_encoder and tiny.time_shift == 4.0
    assert tiny.vae == vae.PRESETS["tiny_robot"]["out_dir"] + "/ckpt.pt" and tiny.out_dir == "out/tiny/planner-libero"
    for cfg in (paper, tiny):   # the release's LIBERO planner: 3-D RoPE to 40 pi, start frames at t = -1, no cross RoPE
        assert (cfg.rope_max_freq, cfg.image_t, cfg.cross_rope, cfg.null_token) == (40 * math.pi, -1.0, False, True)


def test_the_micro_planner_overfits_one_batch():
    """Two images, each with its own target latent grid: after training, sampling from noise lands on them."""
    torch.manual_seed(0)
    model = MotionPlanner(micro_planner_config(dim=64, layers=1), pretrained=False)
    image = torch.randn(2, 3, 28, 28)
    x0 = torch.randn(2, 16, 4) * 0.7
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for step in range(400):
        noise = torch.randn(8, 16, 4)
        t = torch.sigmoid(torch.randn(8))
        loss = flow_matching_loss(lambda x, tt: model(x, tt, image.repeat(4, 1, 1, 1)), x0.repeat(4, 1, 1), noise, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = model.eval().sample(image.repeat(4, 1, 1, 1), steps=20, generator=torch.Generator().manual_seed(0))
    error = (out - x0.repeat(4, 1, 1)).pow(2).mean().sqrt()
    assert error < 0.25 * x0.std(), error   # a sample of the prior is off by about 1.4 x0.std()


# ---------------------------------------------------------------------------------------------------- main() and loading

def test_the_planner_trains_from_a_vae_checkpoint_and_reloads_its_ema(micro_checkpoints):
    vae_path, planner_path = micro_checkpoints
    ckpt = torch.load(planner_path, weights_only=True)
    assert ckpt["kind"] == "planner" and ckpt["step"] == 2 and ckpt["ema"]["updates"].item() == 2
    the_vae = vae.load_vae(vae_path)
    assert ckpt["config"]["vae_fingerprint"] == the_vae.fingerprint
    scale = ckpt["model"]["latent_scale"]
    assert scale.item() != 1.0 and torch.equal(ckpt["ema"]["model"]["latent_scale"], scale)   # measured, saved
    the_vae, model = planner.load_pair(planner_path)          # the VAE its config names
    assert not model.training and the_vae.fingerprint == model.cfg.vae_fingerprint
    for name, tensor in ckpt["ema"]["model"].items():
        assert torch.equal(model.state_dict()[name], tensor), name
    log = open(os.path.join(os.path.dirname(planner_path), "log.txt")).read()
    for key in ("null", "p1", "p4", "p16", "text", "EPE_p1", "straight_p4", "static"):
        assert f" {key} " in log, key


def test_a_planner_refuses_a_vae_other_than_its_own(micro_checkpoints, tmp_path):
    """Two VAEs with the same latent shapes: only the one the planner was trained on is accepted."""
    vae_path, planner_path = micro_checkpoints
    other = moved_off_zero(vae.load_vae(vae_path), seed=5, scale=1e-3)
    other_path = save_model(tmp_path / "other.pt", "vae", other)
    other = vae.load_vae(other_path)
    with pytest.raises(ValueError, match=re.escape(f"{other_path}: not the VAE --planner {planner_path} was trained on")):
        planner.load_pair(planner_path, other_path)
    assert planner.load_pair(planner_path, vae_path)[1].cfg.vae_fingerprint == vae.load_vae(vae_path).fingerprint
    missing = str(tmp_path / "none" / "ckpt.pt")
    with pytest.raises(ValueError, match=re.escape(f"make it with: python3 planner.py --out_dir {tmp_path / 'none'}")):
        load_planner(missing)
    with pytest.raises(ValueError, match="expected a 'planner' checkpoint, got 'vae'"):
        load_planner(vae_path)


@pytest.mark.parametrize("preset, make", [("tiny", "python3 vae.py --preset tiny"),
                                          ("libero_tiny", "python3 vae.py --preset tiny_robot"),
                                          ("libero", "python3 vae.py --preset paper")])
def test_a_missing_vae_names_the_command_that_makes_it(tmp_path, preset, make):
    with pytest.raises(ValueError, match=re.escape(f"no such checkpoint; make it with: {make}")):
        planner.main([f"--preset={preset}", f"--vae={tmp_path / 'vae.pt'}", f"--out_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_the_libero_planner_trains_in_its_vae_through_the_vaes_locked_image_encoder(libero_chain):
    ckpt = torch.load(libero_chain["planner"], weights_only=True)
    config = ckpt["config"]
    assert config["task"] == "libero" and config["text_dim"] == 12      # read from the data
    assert config["freeze_image_encoder"] and config["image_from_vae"] and config["time_shift"] == 4.0
    the_vae = vae.load_vae(libero_chain["vae"])
    assert config["n_frames"] == the_vae.cfg.n_frames and config["image_dim"] == the_vae.cfg.image_dim
    model = planner.load_pair(libero_chain["planner"], libero_chain["vae"])[1]
    assert model.n_views == 2 and "view_embed" in ckpt["ema"]["model"]
    for name, tensor in the_vae.image_encoder.state_dict().items():   # locked through training
        assert torch.equal(model.image_encoder.state_dict()[name], tensor), name
        assert torch.equal(ckpt["model"][f"image_encoder.{name}"], tensor), name
    assert ckpt["ema"]["model"]["blocks.0.ffn.w3.weight"].abs().max() > 0   # the rest trained (this starts at zero)
    log = open(os.path.join(os.path.dirname(libero_chain["planner"]), "log.txt")).read()
    for key in ("agentview_min", "agentview_static", "agentview_floor", "agentview_no_frame", "eye_in_hand_min",
                "eye_in_hand_direction", "agentview_floor_direction"):
        assert f" {key} " in log, key
