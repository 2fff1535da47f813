"""Tests of the training loop's guarantees (vae.train, used by every stage): exact resume, DDP equivalence,
atomic checkpoints under SIGKILL, the non-finite-loss guard, the schedules, and train_ddp.sh's command lines."""
import os
import signal
import subprocess
import sys

import pytest
import torch

import train_worker
import vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "train_worker.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1")
SAME_THREADS = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # bit-identical needs the same reductions


def run(*cmd, **kwargs):
    return subprocess.run(list(cmd), cwd=ROOT, env=kwargs.pop("env", ENV), capture_output=True, text=True,
                          timeout=240, **kwargs)


def torchrun(*args):
    return run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args)


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_state(a, b, atol=0.0, path="state"):
    """Nested dicts / lists of tensors and plain values: equal (atol=0: bit for bit)."""
    if isinstance(a, dict):
        assert sorted(a, key=str) == sorted(b, key=str), path
        for k in a:
            assert_same_state(a[k], b[k], atol, f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, atol, f"{path}[{i}]")
    elif torch.is_tensor(a):
        if atol == 0 or not a.is_floating_point():
            assert torch.equal(a, b), path
        else:
            assert (a - b).abs().max().item() <= atol, f"{path}: max difference {(a - b).abs().max().item():.3g}"
    else:
        assert a == b, path


def run_state(ckpt):
    """What must match between two runs: weights, optimiser, EMA, step and sample counters."""
    return {k: ckpt[k] for k in ("model", "optimizer", "ema", "step", "sample")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference: 4 steps of the micro VAE straight through, with an EMA (checkpoints at steps 2 and 4)."""
    out = str(tmp_path_factory.mktemp("straight"))
    train_worker.train_vae(out)
    return load(os.path.join(out, "ckpt.pt"))


# ---------------------------------------------------------------------------------------------------- exact resume

class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_bit_identically(tmp_path, straight):
    """2 steps, the process stops (here: an exception at step 2's first batch), --resume, 2 more steps = 4 steps
    straight: weights, AdamW moments, EMA, counters, through the warm-up, the batch ramp and the WSD tail."""
    def stop_at_step_2(net, batch):
        if batch["index"][0] >= 8:  # global batches 4, 4 -> step 2 starts at sample 8
            raise Interrupted
        return vae.vae_loss(net, batch)

    with pytest.raises(Interrupted):
        train_worker.train_vae(str(tmp_path), stop_at_step_2)
    assert load(tmp_path / "ckpt.pt")["step"] == 2
    train_worker.train_vae(str(tmp_path), resume=True)
    resumed = load(tmp_path / "ckpt.pt")
    assert_same_state(run_state(resumed), run_state(straight))
    assert straight["ema"]["updates"].item() == 4 and straight["sample"] == 4 + 4 + 8 + 8
    assert "resumed from" in (tmp_path / "log.txt").read_text()


@pytest.mark.parametrize("point", ["write", "rename"])
def test_sigkill_while_checkpointing_leaves_a_loadable_checkpoint_and_resume_finishes_the_run(tmp_path, straight, point):
    result = run(sys.executable, WORKER, f"kill-{point}", str(tmp_path), env=SAME_THREADS)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    left = sorted(os.listdir(tmp_path))
    assert "ckpt.pt.tmp" in left                        # the step-4 checkpoint never made it into place
    assert vae.latest_checkpoint(str(tmp_path), "vae")["step"] == 2
    if point == "write":
        with pytest.raises(ValueError, match="not a readable checkpoint"):
            vae.load_checkpoint(str(tmp_path / "ckpt.pt.tmp"), "vae")
    train_worker.train_vae(str(tmp_path), resume=True)
    assert_same_state(run_state(load(tmp_path / "ckpt.pt")), run_state(straight))
    assert load(tmp_path / "ckpt.pt.prev")["step"] == 2   # the last two are kept
    assert "ckpt.pt.tmp" not in os.listdir(tmp_path)


def test_resume_falls_back_to_the_previous_checkpoint_when_the_latest_is_corrupt(tmp_path, straight):
    vae.save_checkpoint(str(tmp_path / "ckpt.pt"), {"kind": "vae", "step": 2})
    vae.save_checkpoint(str(tmp_path / "ckpt.pt"), {"kind": "vae", "step": 4})
    assert vae.latest_checkpoint(str(tmp_path), "vae")["step"] == 4
    os.link(tmp_path / "ckpt.pt", tmp_path / "ckpt.pt.prev.tmp")   # as a kill between the link and its rename leaves it
    vae.save_checkpoint(str(tmp_path / "ckpt.pt"), {"kind": "vae", "step": 6})
    assert [load(tmp_path / f)["step"] for f in ("ckpt.pt", "ckpt.pt.prev")] == [6, 4]
    (tmp_path / "ckpt.pt").write_bytes(b"\x00" * 100)
    assert vae.latest_checkpoint(str(tmp_path), "vae")["step"] == 4
    assert vae.latest_checkpoint(str(tmp_path), "planner") is None   # another stage's checkpoints do not count
    assert all(torch.is_tensor(v) or isinstance(v, (int, float, str, bool, list, dict, type(None)))
               for v in straight.values())


# ---------------------------------------------------------------------------------------------------- distributed

def test_two_processes_train_like_one_at_the_same_global_batch(tmp_path):
    """Every stochastic part on (track sampling, track dropout, posterior noise; planner conditions, condition
    dropout, flow noise and time), randomness keyed by sample index: 2 processes = 1 process, to 1e-5."""
    result = torchrun(WORKER, "ddp", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    result = run(sys.executable, WORKER, "ddp", str(tmp_path / "one"))
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("vae", "planner"):
        one, two = (load(tmp_path / d / stage / "ckpt.pt") for d in ("one", "two"))
        assert one["step"] == two["step"] > 2 and one["sample"] == two["sample"]
        assert one["ema"]["updates"].item() == one["step"]                  # every step was taken
        assert_same_state({k: one[k] for k in ("model", "ema")}, {k: two[k] for k in ("model", "ema")}, atol=1e-5)
    trained = load(tmp_path / "one" / "vae" / "ckpt.pt")["model"]
    fresh = train_worker.vae_run("unused")[1].state_dict()
    assert max((fresh[k] - v).abs().max().item() for k, v in trained.items()) > 1e-3  # not untrained weights


def test_step_sampler_shards_are_disjoint_and_cover_each_step():
    cfg = train_worker.vae_run("unused")[0]
    for world in (1, 2, 4):
        if cfg.batch_start % (cfg.micro_batch * world):
            continue
        shards = [list(vae.StepSampler(cfg, r, world, 0, 0)) for r in range(world)]
        seen = [i for shard in shards for batch in shard for i in batch]
        assert len(seen) == len(set(seen))                              # disjoint
        total = sum(vae.global_batch_at(s, cfg) for s in range(cfg.max_steps))
        assert sorted(seen) == list(range(total))                        # nothing skipped
    resumed = list(vae.StepSampler(cfg, 0, 1, 2, 8))                      # from step 2, sample 8
    assert resumed == list(vae.StepSampler(cfg, 0, 1, 0, 0))[4:]


def test_nonfinite_loss_on_one_rank_skips_the_step_everywhere_and_stops_after_three_in_a_row(tmp_path):
    result = torchrun(WORKER, "nonfinite", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [(tmp_path / f"error{r}.txt").read_text() for r in (0, 1)]
    assert errors[0] == errors[1] and "3 steps in a row (steps 4..6); stopping at step 6" in errors[0]
    log = (tmp_path / "log.txt").read_text()
    assert "step 2: non-finite" in log and "step 3: non-finite" not in log
    ckpt = load(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 6                  # saved after step 5 (4 and 5 skipped); step 6 stopped before saving
    assert_same_state(ckpt["model"], load(tmp_path / "ckpt.pt.prev")["model"])   # = the weights of step 4
    assert ckpt["ema"]["updates"].item() == 3                            # steps 0, 1, 3 stepped; 2 was skipped
    assert all(s["step"].item() == 3 for s in ckpt["optimizer"]["state"].values())
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert "ckpt.pt.tmp" not in os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------------- schedules

def test_sample_random_is_keyed_by_seed_and_index_alone():
    a = vae.SampleRandom([3, 7], seed=1)
    first, second = a.randn(4), a.rand(2)
    # the same (seed, index) draws the same numbers in any batch and order of samples ...
    b = vae.SampleRandom([7, 3, 9], seed=1)
    assert torch.equal(b.randn(4)[[1, 0]], first) and torch.equal(b.rand(2)[[1, 0]], second)
    # ... another seed or another index draws others (torch's CPU generator keeps only a seed's low 32 bits: seed and
    # index packed into one integer gave every seed the same numbers)
    for seed in (0, 2, 2 ** 32 + 1):
        assert not torch.equal(vae.SampleRandom([3, 7], seed=seed).randn(4), first), seed
    assert not torch.equal(vae.SampleRandom([4, 8], seed=1).randn(4), first)
    assert 0 <= second.min() and second.max() < 1 and first.dtype == second.dtype == torch.float32
    with pytest.raises(ValueError, match="seed: expected an integer >= 0"):
        vae.SampleRandom([0], seed=-1)


def test_schedule_pieces_at_chosen_steps():
    assert [vae.warmup(s, 4) for s in (0, 1, 3, 4, 100)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert [vae.wsd_tail(s, 100, 0.2) for s in (0, 79, 80, 90, 99)] == [1.0, 1.0, 1.0, 0.5, 0.05]
    assert vae.wsd_tail(99, 100, 0.0) == 1.0                            # no tail: constant to the end
    cfg = vae.VAEConfig(lr=1e-3, warmup_steps=10, max_steps=100, decay_frac=0.2, batch_start=64, batch_end=256,
                        batch_ramp_steps=100)
    assert [round(vae.lr_at(s, cfg), 9) for s in (0, 9, 50, 80, 90, 99)] == [1e-4, 1e-3, 1e-3, 1e-3, 5e-4, 5e-5]
    assert [vae.global_batch_at(s, cfg) for s in (0, 25, 50, 99, 100, 10**6)] == [64, 64, 128, 192, 256, 256]


# ---------------------------------------------------------------------------------------------------- train_ddp.sh

def test_train_ddp_sh_parses():
    assert run("bash", "-n", "train_ddp.sh").returncode == 0


def test_train_ddp_sh_dry_run_under_a_four_node_slurm_allocation():
    """srun bash train_ddp.sh vae on 4 nodes x 8 GPUs: each node's line is what torchrun expects there."""
    lines = []
    for node in range(4):
        env = dict(ENV, DRY_RUN="1", PRESET="paper", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-[07-09,12]",
                   SLURM_NNODES="4", SLURM_NODEID=str(node), SLURM_NTASKS="4", SLURM_GPUS_ON_NODE="8")
        result = run("bash", "train_ddp.sh", "vae", "--lr=2e-4", env=env)
        assert result.returncode == 0, result.stderr
        lines.append([line for line in result.stdout.splitlines() if "torch.distributed.run" in line])
    for node, node_lines in enumerate(lines):
        assert len(node_lines) == 1
        args = node_lines[0].split()
        assert args[args.index("-m") + 1] == "torch.distributed.run"
        for flag in ("--nnodes=4", f"--node_rank={node}", "--nproc_per_node=8", "--master_addr=gpu-07",
                     "--master_port=29500", "vae.py", "--preset=paper", "--out_dir=out/paper/vae", "--lr=2e-4"):
            assert flag in args, (flag, args)
        assert args.index("vae.py") < args.index("--lr=2e-4")
    env = dict(ENV, DRY_RUN="1")
    single = run("bash", "train_ddp.sh", "planner", env=env)
    assert single.returncode == 0 and "--standalone" in single.stdout and "--nproc_per_node=1" in single.stdout
    assert "--vae=out/tiny/vae/ckpt.pt" in single.stdout


def test_train_ddp_sh_tiny_libero_stages_plan_in_the_robot_vae():
    """Tiny: vae-robot trains vae.py --preset tiny_robot, perception the CNN image encoder, and planner-libero reads
    both checkpoints; the paper preset has neither (its LIBERO planner plans in the one general VAE and sees
    through the pretrained DINOv2)."""
    env = dict(ENV, DRY_RUN="1")
    robot = run("bash", "train_ddp.sh", "vae-robot", env=env)
    assert robot.returncode == 0, robot.stderr
    assert "vae.py --preset=tiny_robot --out_dir=out/tiny/vae-robot" in robot.stdout
    perception = run("bash", "train_ddp.sh", "perception", env=env)   # the tiny planner's image encoder
    assert "policy.py --preset=perception_tiny --out_dir=out/tiny/perception --vae=out/tiny/vae-robot/ckpt.pt" \
        in perception.stdout
    libero = run("bash", "train_ddp.sh", "planner-libero", env=env)
    assert "planner.py --preset=libero_tiny --out_dir=out/tiny/planner-libero --vae=out/tiny/vae-robot/ckpt.pt " \
        "--image_init=out/tiny/perception/ckpt.pt" in libero.stdout
    paper = run("bash", "train_ddp.sh", "planner-libero", env=dict(env, PRESET="paper"))
    assert "--vae=out/paper/vae/ckpt.pt" in paper.stdout
    assert "--image_init" not in paper.stdout                             # (DINOv2, pretrained)
    refused = run("bash", "train_ddp.sh", "vae-robot", env=dict(env, PRESET="paper"))
    assert refused.returncode == 2 and "general VAE" in refused.stderr
    refused = run("bash", "train_ddp.sh", "perception", env=dict(env, PRESET="paper"))
    assert refused.returncode == 2 and "pretrained DINOv2" in refused.stderr
