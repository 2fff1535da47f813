"""Tests of policy.py: the head reads only the planner's latents, chunk shapes, temporal averaging, the shuffled
control, a training run through vae.train, the dry-run parameter counts."""
import dataclasses
import math
import os
import re

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

import policy
import vae
from policy import ActionChunker, Policy, PolicyConfig, PolicyHead, PlannedWindows


def micro_config(**overrides):
    base = dict(PolicyConfig(**policy.PRESETS["tiny"]).__dict__, latent_tokens=2 * 4, latent_channels=3, dim=32,
                layers=2, head_dim=16, action_chunk=4, num_workers=0, device="cpu")
    base.update(overrides)
    return PolicyConfig(**base)


def micro_head(**overrides):
    torch.manual_seed(0)
    head = PolicyHead(micro_config(**overrides)).eval()
    for p in head.parameters():  # move the zero-initialised output layer off zero
        p.data += 0.05 * torch.randn_like(p)
    return head


class FixedPlanner(torch.nn.Module):
    """A stand-in LIBERO planner: records what it is given and returns the latents it holds."""

    def __init__(self, z, image_size=16):
        super().__init__()
        self.register_buffer("z", z)
        self.cfg = dataclasses.make_dataclass("Cfg", [("image_size", int), ("latent_channels", int)])(image_size,
                                                                                                    z.shape[-1])
        self.n_views, self.n_latents = 2, z.shape[1] // 2
        self.seen = []

    def sample(self, image, task_emb=None, timestep=None, steps=10, generator=None, noise=None):
        self.seen.append(dict(image=image, task_emb=task_emb, timestep=timestep, steps=steps))
        return self.z.expand(len(image), -1, -1)


def frames(seed, B=None):
    shape = (2, 20, 24, 3) if B is None else (B, 2, 20, 24, 3)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------- the head

def test_the_head_sees_only_the_latents():
    head = micro_head()
    z = torch.randn(1, 8, 3)
    planner = FixedPlanner(z)
    pol = Policy(head, planner, steps=10)
    a1 = pol.chunk(frames(0), torch.zeros(5), 3)
    a2 = pol.chunk(frames(1), torch.ones(5), 40)                 # other frames, task and timestep ...
    assert not torch.equal(planner.seen[0]["image"], planner.seen[1]["image"])   # (they did reach the planner)
    assert planner.seen[0]["steps"] == 10 and planner.seen[1]["timestep"].tolist() == [40]
    assert torch.equal(a1, a2)                                    # ... the same latents: the same actions
    planner.z = z + 0.5 * torch.randn_like(z)                     # other latents: other actions
    assert not torch.allclose(pol.chunk(frames(0), torch.zeros(5), 3), a1, atol=1e-4)
    # the head's only input is the latents, and every latent token can move every action
    grad = torch.autograd.functional.jacobian(lambda x: head(x).sum(), z)
    assert (grad.abs().sum(-1) > 0).all()


def test_the_frames_control_reads_the_planners_inputs():
    """policy.FramesHead (eval.py robot-ceiling --frames): the planner's encoder tokens of both frames, the task
    and the timestep, one token each for the last two; every one of them moves the actions."""
    from test_planner import micro_config as planner_config
    from planner import MotionPlanner
    torch.manual_seed(0)
    planner = MotionPlanner(planner_config(task="libero", text_dim=12), pretrained=False).eval()
    net = policy.FramesHead(micro_config(), planner.cfg)
    for p in net.parameters():  # move the zero-initialised output layer off zero
        p.data += 0.05 * torch.randn_like(p)
    image, task, step = torch.randn(3, 2, 3, 28, 28), torch.randn(3, 12), torch.tensor([0, 40, 90])
    features = policy.frame_features(planner.image_encoder, image)
    assert features.shape == (3, 2 * (28 // 14) ** 2, 32)
    assert torch.equal(features[:, :4], planner.image_encoder(image[:, 0]))       # view-major, as the planner's
    assert net.head.cfg.latent_tokens == 2 * 4 + 2
    out = net.actions(features, task, step)
    assert out.shape == (3, 4, 7)
    for changed in (net.actions(features + 1, task, step), net.actions(features, -task, step),
                    net.actions(features, task, step + 50)):
        assert not torch.allclose(changed, out, atol=1e-4)


def test_perception_pretraining_reads_frames_task_and_timestep():
    """policy.Perception (--preset perception_tiny): the conv stand-in's tokens of both frames in one sequence with
    a read-out token; the chunk in the data's units; each of frames, task and timestep moves the actions, and only
    the encoder is what the planner takes (its keys under `encoder.`)."""
    from test_planner import micro_config as planner_config
    torch.manual_seed(0)
    pc = planner_config(task="libero", text_dim=12, image_encoder="conv")
    net = policy.Perception(micro_config(), pc).eval()
    net.action_mean.copy_(torch.arange(7.0))
    net.action_std.fill_(2.0)
    image, task, step = torch.randn(3, 2, 3, 28, 28), torch.randn(3, 12), torch.tensor([0, 40, 90])
    out = net(image, task, step)
    assert out.shape == (3, 4, 7) and torch.allclose(net.actions(image, task, step), out * 2 + torch.arange(7.0))
    for changed in (net(image.flip(-1), task, step), net(image, -task, step), net(image, task, step + 50)):
        assert not torch.allclose(changed, out, atol=1e-4)
    encoder_keys = {k for k in net.state_dict() if k.startswith("encoder.")}
    assert encoder_keys == {f"encoder.{k}" for k in vae.ImageEncoder(pc).state_dict()}


def test_action_chunk_shapes_and_units():
    head = micro_head()
    head.action_mean.copy_(torch.arange(7.0))
    head.action_std.fill_(2.0)
    z = torch.randn(5, 8, 3)
    assert head(z).shape == (5, 4, 7)
    assert torch.allclose(head.actions(z), head(z) * 2 + torch.arange(7.0))
    with pytest.raises(ValueError, match="latents"):
        head(torch.randn(5, 9, 3))
    pol = Policy(head, FixedPlanner(z[:1]))
    assert pol.chunk(frames(0, B=3), torch.zeros(3, 5), torch.tensor([0, 1, 2])).shape == (3, 4, 7)
    assert pol.act(frames(0), torch.zeros(5), 0).shape == (7,)                           # one environment
    assert pol.act(frames(0, B=3), torch.zeros(3, 5), 1).shape == (3, 7)                 # three at once
    # without averaging, act is the first action of the newest chunk
    assert torch.equal(pol.act(frames(0), torch.zeros(5), 2), head.actions(z[:1])[0, 0])


def test_temporal_averaging_of_overlapping_chunks_by_hand():
    # chunks of 3 predicted at steps 0, 1, 2: a = [1, 2, 3], b = [10, 20, 30], c = [100, 200, 300] (1-D actions)
    a, b, c = (torch.tensor([[1.0], [2.0], [3.0]]) * s for s in (1, 10, 100))
    uniform = ActionChunker(3, "uniform")
    uniform.add(0, a)
    assert uniform.action(0).item() == 1.0
    uniform.add(1, b)
    assert uniform.action(1).item() == (2 + 10) / 2
    uniform.add(2, c)
    assert uniform.action(2).item() == pytest.approx((3 + 20 + 100) / 3)      # a[2], b[1], c[0]
    uniform.add(3, a)                                                       # a's chunk (step 0) has ended
    assert uniform.action(3).item() == pytest.approx((30 + 200 + 1) / 3)
    # exponential: weight exp(-decay * age), newer chunks count more
    expo = ActionChunker(3, "exponential", decay=math.log(2))               # weights 1, 1/2, 1/4 for ages 0, 1, 2
    for step, chunk in enumerate((a, b, c)):
        expo.add(step, chunk)
    assert expo.action(2).item() == pytest.approx((100 * 1 + 20 * 0.5 + 3 * 0.25) / 1.75)
    with pytest.raises(ValueError, match="covers"):
        expo.action(9)
    # a policy with averaging feeds every chunk it predicts through the chunker
    head = micro_head()
    planner = FixedPlanner(torch.randn(1, 8, 3))
    pol = Policy(head, planner, averaging="uniform")
    first = pol.act(frames(0), torch.zeros(5), 0)
    planner.z = torch.randn(1, 8, 3)
    second = pol.act(frames(0), torch.zeros(5), 1)
    newest = head.actions(planner.z)[0]                                     # the chunk predicted at step 1
    assert torch.allclose(second, (pol.chunker.chunks[0][0, 1] + newest[0]) / 2)
    pol.reset()
    assert pol.chunker.chunks == {} and first.shape == (7,)


# ---------------------------------------------------------------------------------------------------- training

class FakeWindows(torch.utils.data.Dataset):
    """LiberoDataset-like items: 6 episodes of 2 tasks; the actions are a fixed function of the task embedding."""

    def __init__(self, n=64):
        self.n = n
        g = torch.Generator().manual_seed(0)
        self.tasks = torch.randn(6, 5, generator=g)
        self.mix = torch.randn(5, 7, generator=g)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        e = i % 6
        emb = self.tasks[e]
        return dict(image=torch.zeros(2, 3, 16, 16), task_emb=emb, timestep=torch.tensor(i // 6),
                    actions=(emb @ self.mix).expand(4, 7).clone(), demo=e, text=f"task {e}", episode_len=torch.tensor(50 + e),
                    index=i)


class EmbeddingPlanner(FixedPlanner):
    """Latents that carry the task embedding (plus the plan's noise): what a working planner would give."""

    def sample(self, image, task_emb=None, timestep=None, steps=10, generator=None, noise=None):
        self.seen.append(len(image))
        return task_emb[:, None, :noise.shape[-1]] + 0.1 * noise


def test_shuffled_windows_take_their_plans_from_other_episodes():
    base = FakeWindows()
    own = PlannedWindows(base, pool=24)
    shuffled = PlannedWindows(base, pool=24, shuffle=True)
    for i in (0, 5, 30):
        item, other = own[i], shuffled[i]
        assert item["plan_index"] == i % 24 and torch.equal(item["task_emb"], base[i % 24]["task_emb"])
        assert torch.equal(other["actions"], item["actions"])                   # its own actions ...
        assert policy.episode_of(base[other["plan_index"]]) != policy.episode_of(base[i % 24])  # ... others' plan
        assert other["index"] == i and shuffled[i]["plan_index"] == other["plan_index"]       # keyed by i
    # a window's partner is drawn afresh for every sample (a fixed pairing could be learnt)
    assert len({shuffled[w + 24 * k]["plan_index"] for w in (0,) for k in range(8)}) > 2


def test_plans_are_keyed_by_window_and_cached():
    planner = EmbeddingPlanner(torch.zeros(1, 8, 3))
    cfg = micro_config()
    base = FakeWindows()
    batch = torch.utils.data.default_collate([PlannedWindows(base, pool=24)[i] for i in (0, 1, 2)])
    again = torch.utils.data.default_collate([PlannedWindows(base, pool=24)[i] for i in (26, 1)])  # windows 2, 1
    cache = {}
    z = policy.plan(planner, batch, cfg, cache)
    assert planner.seen == [3] and torch.equal(policy.plan(planner, again, cfg), z[[2, 1]])  # same window, same plan
    assert torch.equal(policy.plan(planner, again, cfg, cache), z[[2, 1]]) and planner.seen == [3, 2]  # from the cache


def run_training(tmp_path, shuffle):
    cfg = micro_config(out_dir=str(tmp_path / ("shuffled" if shuffle else "policy")), latent_tokens=8,
                       latent_channels=5, shuffle_latents=shuffle, latent_pool=48, max_steps=60, lr=3e-3,
                       warmup_steps=5, batch_start=16, batch_end=16, micro_batch=16, log_every=20, val_every=1000,
                       ckpt_every=60)
    torch.manual_seed(0)
    head = PolicyHead(cfg)
    base = FakeWindows()
    mean, std = policy.measure_action_stats(base, 48)
    head.action_mean.copy_(mean)
    head.action_std.copy_(std)
    planner = EmbeddingPlanner(torch.zeros(1, 8, 5))
    windows = PlannedWindows(base, cfg.latent_pool, shuffle)
    vae.train(cfg, head, windows, policy.make_policy_loss(head, planner, cfg), "policy")
    losses = [float(m) for m in re.findall(r"loss ([0-9.e-]+)", (tmp_path / cfg.out_dir / "log.txt").read_text())]
    return losses, planner, cfg


def test_tiny_policy_training_learns_from_the_plan_and_not_from_shuffled_plans(tmp_path):
    base = FakeWindows()
    var = torch.stack([base[i]["actions"] for i in range(48)]).var(0).mean().item()  # the MSE of the mean action
    losses, planner, cfg = run_training(tmp_path, shuffle=False)
    assert losses[0] > 0.1 * var and losses[-1] < 0.01 * var, (losses, var)
    assert sum(planner.seen) == 48                             # each pooled window planned once
    head = policy.load_head(os.path.join(cfg.out_dir, "ckpt.pt"))
    assert head.action_std.ne(1).any()                         # the action statistics travel with the weights
    shuffled, _, _ = run_training(tmp_path, shuffle=True)
    assert shuffled[-1] > 0.5 * var, shuffled                  # other episodes' plans say nothing of these actions


# ---------------------------------------------------------------------------------------------------- commands

def test_paper_dry_run_prints_the_head_and_the_head_with_its_planner(capsys):
    policy.main(["--preset", "paper", "--dry-run", "--planner", "missing.pt"])
    lines = re.findall(r"^total parameters: (\d+)", capsys.readouterr().out, flags=re.M)
    assert len(lines) == 2
    head, total = map(int, lines)
    assert abs(head - 6 * 17 * 768 ** 2) / head < 0.02          # 6 layers x (self 4d^2 + cross 4d^2 + SwiGLU 9d^2)
    assert 500e6 < total - head < 700e6                         # the LIBERO planner of the paper preset


def test_missing_planner_names_the_commands_that_make_it(tmp_path):
    with pytest.raises(SystemExit, match="python planner.py --preset libero_tiny"):
        policy.main([f"--planner={tmp_path / 'none.pt'}"])


def test_policy_main_trains_evaluates_and_rolls_out_on_robot_demos(tmp_path):
    import data
    from test_planner import train_micro_libero_planner
    paths = train_micro_libero_planner(tmp_path)
    out = tmp_path / "head"
    flags = [f"--planner={paths['planner']}", f"--data={paths['data']}", f"--out_dir={out}", "--dim=32", "--layers=1",
             "--head_dim=16", "--action_chunk=4", "--latent_pool=8", "--norm_samples=8", "--max_steps=3",
             "--batch_start=4", "--batch_end=4", "--micro_batch=4", "--num_workers=0", "--val_every=3",
             "--eval_stride=8", "--log_every=1", "--device=cpu", "--plan_steps=2"]
    policy.main(flags)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["kind"] == "policy" and ckpt["step"] == 3
    assert ckpt["config"]["latent_tokens"] == 2 * 16 and ckpt["config"]["latent_channels"] == 4   # from the planner
    assert not any(k.startswith(("planner", "image_encoder")) for k in ckpt["model"])            # the head alone
    assert " mean_action " in (out / "log.txt").read_text()
    result = policy.main(flags + ["--evaluate", f"--compare={out / 'ckpt.pt'}", f"--eval_json={tmp_path / 'e.json'}",
                                  "--eval_k=2"])
    actions = result["actions"]
    assert math.isfinite(actions["policy"]) and actions["mean_action"] > 0 and (tmp_path / "e.json").exists()
    assert actions["head"] == actions["policy"]   # the compared head (here: itself, by its folder name), same plans
    assert set(result["planner_libero"]) >= {"agentview_min", "eye_in_hand_min", "agentview_static"}
    # the pooled plans are written to out_dir/plans.pt and a control run starts from them: a plan marked in the
    # file comes back in the control's own file, so it was read, not made again; another sampler is refused
    plans = torch.load(out / "plans.pt", weights_only=True)
    assert plans["plans"]["index"].tolist() == list(range(8)) and plans["key"]["plan_steps"] == 2
    marked = {**plans, "plans": {**plans["plans"], "latents": plans["plans"]["latents"].clone()}}
    marked["plans"]["latents"][3] = 7.0
    torch.save(marked, tmp_path / "marked.pt")
    control = tmp_path / "control"
    policy.main([f if not f.startswith("--out_dir") else f"--out_dir={control}" for f in flags]
                + ["--shuffle_latents", f"--plans={tmp_path / 'marked.pt'}"])
    assert torch.equal(torch.load(control / "plans.pt", weights_only=True)["plans"]["latents"][3], torch.full((32, 4), 7.0))
    # torchrun: each rank plans its share of the pool and rank 0 writes every plan, the same as one process's
    from test_train import torchrun
    ddp = tmp_path / "ddp"
    result = torchrun("policy.py", *[f if not f.startswith("--out_dir") else f"--out_dir={ddp}" for f in flags],
                      "--micro_batch=2")
    assert result.returncode == 0, result.stderr[:3000]
    ddp_plans = torch.load(ddp / "plans.pt", weights_only=True)["plans"]
    assert ddp_plans["index"].tolist() == list(range(8))
    torch.testing.assert_close(ddp_plans["latents"], plans["plans"]["latents"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="plan_steps = 2, this run has 3"):
        policy.main(flags + ["--plan_steps=3", f"--plans={out / 'plans.pt'}"])
    with pytest.raises(ValueError, match="set --latent_pool"):
        policy.main(flags + ["--latent_pool=0", f"--plans={out / 'plans.pt'}"])
    # a rollout step from a demo's own frames
    demo = data.load_libero_demo(sorted((tmp_path / "robot").glob("*.hdf5"))[0], frames=[0])
    frames0 = np.stack([demo["views"][v]["video"][0] for v in data.LIBERO_VIEWS])
    pol = policy.load_policy(str(out / "ckpt.pt"), averaging="exponential")
    assert pol.act(frames0, demo["task_emb"], 0).shape == (7,)
