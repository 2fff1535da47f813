"""Tests of policy.py: the head reads only the planner's latents, chunk shapes and units, the temporal averaging of
Policy.act by hand, the shuffled control's windows, plans keyed and cached, a training run that learns from the plan
and not from shuffled plans, the dry-run counts, and main on the session's robot-demo chain (train, evaluate, roll out,
refuse another planner)."""
import dataclasses
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch

import libero
import policy
from conftest import MICRO_POLICY, flags, micro_planner_config, micro_policy_config, moved_off_zero, save_model
from policy import PlannedWindows, Policy, PolicyHead


class FixedPlanner(torch.nn.Module):
    """A stand-in LIBERO planner: records what it is given, returns the latents it holds."""

    def __init__(self, z, image_size=16):
        super().__init__()
        self.register_buffer("z", z)
        self.cfg = dataclasses.make_dataclass("Cfg", ["image_size", "latent_channels", "grid_size"])(
            image_size, z.shape[-1], math.isqrt(z.shape[1] // 2))
        self.n_views, self.n_latents, self.seen = 2, z.shape[1] // 2, []

    def sample(self, image, task_emb=None, timestep=None, steps=10, generator=None, noise=None):
        self.seen.append(dict(image=image, task_emb=task_emb, timestep=timestep, steps=steps, n=len(image)))
        return self.z.expand(len(image), -1, -1)


class EmbeddingPlanner(FixedPlanner):
    """Latents that carry the task embedding, plus the plan's noise: what a working planner gives."""

    def __init__(self, tokens=8, channels=5):
        super().__init__(torch.zeros(1, tokens, channels))
        self.fingerprint, self.latent_shift, self.latent_scale = "stand-in", torch.tensor(0.0), torch.tensor(1.0)
        self.unused = torch.nn.Parameter(torch.zeros(1))   # (a device to read, as a real planner's weights give)

    def sample(self, image, task_emb=None, timestep=None, steps=10, generator=None, noise=None):
        self.seen.append(dict(n=len(image), noise=noise))
        return task_emb[:, None, :noise.shape[-1]] + 0.1 * noise


class ChunkHead(torch.nn.Module):
    """A stand-in head whose action chunk is the latents themselves ([B, chunk, A])."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def actions(self, z, proprio=None):
        return z


class FakeWindows(torch.utils.data.Dataset):
    """LiberoDataset-like windows of 6 episodes (demo = i mod 6); the actions are a fixed function of the task."""

    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.n, self.tasks, self.mix = n, torch.randn(6, 5, generator=g), torch.randn(5, 7, generator=g)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        e = i % 6
        return dict(image=torch.zeros(2, 3, 16, 16), task_emb=self.tasks[e], timestep=torch.tensor(i // 6),
                    actions=(self.tasks[e] @ self.mix).expand(4, 7).clone(), proprio=torch.zeros(0), demo=e, index=i)


def frames(seed, B=None):
    shape = (2, 20, 24, 3) if B is None else (B, 2, 20, 24, 3)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def micro_head(**overrides):
    torch.manual_seed(0)
    cfg = micro_policy_config(latent_tokens=8, latent_channels=3, grid_size=2, **overrides)   # 2 views of 2 x 2
    return moved_off_zero(PolicyHead(cfg)).eval()


# ---------------------------------------------------------------------------------------------------- the head

def test_the_head_sees_only_the_latents():
    head, z = micro_head(), torch.randn(1, 8, 3)
    planner = FixedPlanner(z)
    pol = Policy(head, planner, steps=7)
    a1 = pol.chunk(frames(0), torch.zeros(5), 3)
    a2 = pol.chunk(frames(1), torch.ones(5), 40)                   # other frames, task and timestep ...
    assert not torch.equal(planner.seen[0]["image"], planner.seen[1]["image"])   # (they reached the planner)
    assert planner.seen[0]["image"].shape == (1, 2, 3, 16, 16) and planner.seen[0]["steps"] == 7
    assert planner.seen[1]["timestep"].tolist() == [40] and planner.seen[1]["task_emb"].tolist() == [[1.0] * 5]
    assert torch.equal(a1, a2)                                     # ... the same latents: the same actions
    planner.z = z + 0.5 * torch.randn_like(z)
    assert not torch.allclose(pol.chunk(frames(0), torch.zeros(5), 3), a1, atol=1e-4)
    grad = torch.autograd.functional.jacobian(lambda x: head(x).sum(), z)
    assert (grad.abs().sum(-1) > 0).all()                          # every latent token moves the actions


def test_the_release_head_reads_the_robot_state_as_one_more_token_at_the_origin():
    head = micro_head(proprio_dim=9)
    z, proprio = torch.randn(2, 8, 3), torch.randn(2, 9)
    out = head(z, proprio)
    assert out.shape == (2, 4, 7) and not torch.allclose(head(z, proprio + 1), out, atol=1e-4)
    with pytest.raises(AssertionError, match="proprio"):
        head(z)
    seen = {}
    head.blocks[0].cross_attn.register_forward_hook(lambda m, args, o: seen.update(ctx=args[2], pos=args[3]))
    head(z, proprio)
    assert seen["ctx"].shape == (2, 9, 32) and torch.equal(seen["pos"][:, -1], torch.zeros(2, 2))   # 8 latents + state
    torch.testing.assert_close(seen["pos"][0, :4], vae_grid(2))                   # each view's latents at their cells
    torch.testing.assert_close(seen["ctx"][:, -1], head.proprio_in(proprio) + head.modality_embed[5])


def vae_grid(n):
    from vae import grid_centres
    return grid_centres(n, n)


def test_action_chunk_shapes_and_units():
    head = micro_head()
    head.action_mean.copy_(torch.arange(7.0))
    head.action_std.fill_(2.0)
    z = torch.randn(5, 8, 3)
    assert head(z).shape == (5, 4, 7)
    torch.testing.assert_close(head.actions(z), head(z) * 2 + torch.arange(7.0))
    with pytest.raises(AssertionError, match="latents"):
        head(torch.randn(5, 9, 3))
    pol = Policy(head, FixedPlanner(z[:1]))
    assert pol.chunk(frames(0, B=3), torch.zeros(3, 5), torch.tensor([0, 1, 2])).shape == (3, 4, 7)
    assert pol.act(frames(0, B=3), torch.zeros(3, 5), 1).shape == (3, 7)             # three environments at once
    torch.testing.assert_close(pol.act(frames(0), torch.zeros(5), 2), head.actions(z[:1])[0, 0])   # one: [7]


def test_act_averages_overlapping_chunks_by_hand():
    # chunks of 3 one-dimensional actions predicted at steps 0, 1, 2, 3: a, b = 10 a, c = 100 a, then a again
    a = torch.tensor([[[1.0], [2.0], [3.0]]])
    chunks = [a, 10 * a, 100 * a, a]

    def actions(averaging, **kwargs):
        planner = FixedPlanner(a)
        pol, out = Policy(ChunkHead(), planner, averaging=averaging, **kwargs), []
        for step, chunk in enumerate(chunks):
            planner.z = chunk
            out.append(pol.act(frames(step), torch.zeros(5), step).item())
        pol.reset()                                                 # a new episode forgets the old chunks
        planner.z = 1000 * a
        return out + [pol.act(frames(0), torch.zeros(5), 4).item()]
    assert actions("none") == [1, 10, 100, 1, 1000]                 # the newest chunk's first action
    # uniform: the mean of every chunk covering the step (at step 3 the chunk of step 0 has ended)
    assert actions("uniform") == pytest.approx([1, (2 + 10) / 2, (3 + 20 + 100) / 3, (30 + 200 + 1) / 3, 1000])
    # exponential, decay ln 2: weights 1, 1/2, 1/4 for chunks 0, 1, 2 steps old
    assert actions("exponential", decay=math.log(2)) == pytest.approx(
        [1, (10 + 2 / 2) / 1.5, (100 + 20 / 2 + 3 / 4) / 1.75, (1 + 200 / 2 + 30 / 4) / 1.75, 1000])
    with pytest.raises(ValueError, match="averaging"):
        Policy(ChunkHead(), FixedPlanner(a), averaging="mean")


# ---------------------------------------------------------------------------------------------------- plans

def test_shuffled_windows_take_plans_from_other_episodes():
    base = FakeWindows()
    own, shuffled = PlannedWindows(base, pool=24), PlannedWindows(base, pool=24, shuffle=True)
    assert len(own) == 24 and len(PlannedWindows(base)) == 64
    for i in (0, 5, 30):
        item, other = own[i], shuffled[i]
        assert item["plan_index"] == i % 24 and item["index"] == other["index"] == i
        assert torch.equal(item["task_emb"], base[i % 24]["task_emb"])
        assert torch.equal(other["actions"], item["actions"])                     # its own actions ...
        assert base[other["plan_index"]]["demo"] != base[i % 24]["demo"]          # ... another episode's plan
        assert torch.equal(other["task_emb"], base[other["plan_index"]]["task_emb"])
        assert shuffled[i]["plan_index"] == other["plan_index"]                   # keyed by the sample
    # drawn afresh for every sample of a window (a fixed pairing could be learnt)
    assert len({shuffled[24 * k]["plan_index"] for k in range(8)}) > 2


def test_plans_are_keyed_by_plan_index_and_cached():
    planner, cfg, base = EmbeddingPlanner(), micro_policy_config(), FakeWindows()
    collate = torch.utils.data.default_collate
    batch = collate([PlannedWindows(base, pool=24)[i] for i in (0, 1, 2)])
    again = collate([PlannedWindows(base, pool=24)[i] for i in (26, 1)])        # windows 2 and 1
    cache = {}
    z = policy.plan(planner, batch, cfg, cache)
    assert z.shape == (3, 8, 5) and [s["n"] for s in planner.seen] == [3]
    torch.testing.assert_close(policy.plan(planner, again, cfg), z[[2, 1]])       # the same window, the same plan
    assert torch.equal(policy.plan(planner, again, cfg, cache), z[[2, 1]]) and len(planner.seen) == 2   # cached
    assert not torch.allclose(policy.plan(planner, again, cfg, tag=1), z[[2, 1]])  # held-out windows' own noise
    assert not torch.allclose(policy.plan(planner, again, dataclasses.replace(cfg, seed=1)), z[[2, 1]])


def test_training_learns_from_the_plan_and_not_from_shuffled_plans(tmp_path, monkeypatch):
    """policy.main's loss and loop on stand-in windows whose actions follow the task the plan carries."""
    base = FakeWindows()
    var = torch.stack([base[i]["actions"] for i in range(48)]).var(0).mean().item()   # the mean action's MSE

    def train(shuffle):
        planner, out = EmbeddingPlanner(), tmp_path / ("shuffled" if shuffle else "policy")
        monkeypatch.setattr(policy, "libero_planner", lambda path, device="cpu": planner)
        monkeypatch.setattr(policy, "windows", lambda cfg, pc, split: FakeWindows(64 if split == "train" else 24))
        policy.main(flags(MICRO_POLICY, planner="stand-in", data="stand-in", out_dir=out, latent_pool=48,
                          shuffle_latents=shuffle, norm_samples=48, max_steps=60, lr=3e-3, warmup_steps=5,
                          batch_start=16, batch_end=16, micro_batch=16, log_every=20, ckpt_every=60, val_clips=24))
        log = (out / "log.txt").read_text()
        losses = [float(v) for v in re.findall(r"step \d+/60 .*?loss ([0-9.e-]+)", log)]
        ratio = float(re.search(r"val step 60 .* ratio ([0-9.e+-]+)", log).group(1))
        return losses, ratio, planner, out
    losses, ratio, planner, out = train(False)
    assert losses[0] > 0.1 * var and losses[-1] < 0.01 * var, (losses, var)
    assert ratio > 10                                       # held-out windows: far better than the mean action
    assert sum(s["n"] for s in planner.seen[:-1]) == 48 and planner.seen[-1]["n"] == 24   # each window planned once
    head = policy.load_policy(str(out / "ckpt.pt"), planner=planner).head
    assert isinstance(head, PolicyHead) and head.action_std.ne(1).any()   # the action statistics travel with it
    shuffled, shuffled_ratio, _, _ = train(True)
    assert shuffled[-1] > 0.5 * var and shuffled_ratio < 2, (shuffled, shuffled_ratio)


# ---------------------------------------------------------------------------------------------------- commands

def test_paper_dry_run_prints_the_head_and_the_head_with_its_planner(capsys):
    policy.main(["--preset", "paper", "--dry-run", "--planner", "missing.pt"])
    assert re.findall(r"^total parameters: (\d+)", capsys.readouterr().out, flags=re.M) == ["60815760", "629624664"]


def test_a_missing_or_open_planner_is_named(tmp_path):
    commands = r"python3 libero.py robot .* && python3 vae.py --preset tiny_robot && python3 planner.py --preset " \
        "libero_tiny"
    with pytest.raises(ValueError, match=rf"none.pt: no such checkpoint; make it with: {commands}"):
        policy.main([f"--planner={tmp_path / 'none.pt'}"])
    open_planner = save_model(tmp_path / "open.pt", "planner", policy.MotionPlanner(micro_planner_config(),
                                                                                    pretrained=False))
    with pytest.raises(ValueError, match="an open-domain planner; the policy reads a LIBERO one"):
        policy.main([f"--planner={open_planner}"])


def test_main_trains_evaluates_and_rolls_out_on_robot_demos(libero_chain, tmp_path):
    ckpt = torch.load(libero_chain["policy"], weights_only=True)
    planner = policy.libero_planner(libero_chain["planner"])
    assert ckpt["kind"] == "policy" and ckpt["step"] == 3
    cfg = ckpt["config"]
    assert (cfg["latent_tokens"], cfg["latent_channels"]) == (2 * 16, 4)            # both views' 4x4x4 grids
    assert cfg["planner_fingerprint"] == planner.fingerprint
    assert set(ckpt["model"]) == set(PolicyHead(micro_policy_config(latent_tokens=32)).state_dict())   # the head alone
    assert cfg["proprio_dim"] == 0 and cfg["grid_size"] == 4           # (the robot task has no robot state)
    assert re.search(r"val step 3 .*policy \S+ mean_action \S+ ratio", (libero_chain["root"] / "policy" / "log.txt")
                     .read_text())
    # --evaluate: the head and a compared copy of it (named by its folder) on the same plans, then Table E
    os.makedirs(tmp_path / "copy")
    shutil.copy(libero_chain["policy"], tmp_path / "copy" / "ckpt.pt")
    result = policy.main(flags(MICRO_POLICY, data=libero_chain["data"], planner=libero_chain["planner"],
                               out_dir=os.path.dirname(libero_chain["policy"]), evaluate=True, eval_k=2,
                               compare=tmp_path / "copy" / "ckpt.pt", eval_json=tmp_path / "e.json"))
    assert json.loads((tmp_path / "e.json").read_text()) == result
    actions = result["actions"]
    assert actions["copy"] == actions["policy"] and math.isfinite(actions["policy"])
    assert actions["mean_action"] > 0 and actions["windows"] >= 1
    assert {"agentview_min", "eye_in_hand_min", "agentview_static", "windows"} <= set(result["planner_libero"])
    # a rollout step from a demo's own upright frames
    pol = policy.load_policy(libero_chain["policy"], averaging="exponential")
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in pol.head.state_dict().items())
    demo = libero.load_demo(libero.find_demos(libero_chain["data"])[0], frames=[0])
    first = np.stack([demo["views"][v]["video"][0] for v in libero.VIEWS])
    action = pol.act(first, demo["task_emb"], 0)
    assert action.shape == (7,) and torch.isfinite(action).all()
    # a head whose checkpoint names another planner than the one found at its path is refused
    tampered = dict(ckpt, config=dict(cfg, planner_fingerprint="0" * 16))
    torch.save(tampered, tmp_path / "tampered.pt")
    with pytest.raises(ValueError, match=r"not the planner .*fingerprint .*0000000000000000"):
        policy.load_policy(str(tmp_path / "tampered.pt"))
