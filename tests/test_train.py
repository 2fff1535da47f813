"""Tests of trainer.py, the loop every stage trains with: config checks and the command line, the schedules and the
order of the samples, per-sample random numbers, checkpoints (atomic, the last two kept, bad files named), and
train()'s guarantees: exact resume, atomic checkpoints under SIGKILL, 2 processes = 1, the non-finite guard, unusable
data and outputs refused before anything is written; and train_ddp.sh's command lines."""
import dataclasses
import os
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import planner
import policy
import train_worker
import trainer
import vae
from conftest import MICRO_VAE, ROOT, flags, run

WORKER = os.path.join(ROOT, "tests", "train_worker.py")


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
            assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"{path}: {m}")
    else:
        assert a == b, path


def run_state(ckpt):
    """What must match between two runs: weights, optimiser, EMA, step and sample counters."""
    return {k: ckpt[k] for k in ("model", "optimizer", "ema", "step", "sample")}


# ---------------------------------------------------------------------------------------------------- the config

def test_every_preset_passes_its_own_check():
    for cls, presets in ((vae.VAEConfig, vae.PRESETS), (planner.PlannerConfig, planner.PRESETS),
                         (policy.PolicyConfig, policy.PRESETS)):
        for name, values in presets.items():
            assert cls(**values).check() == [], (cls.__name__, name)


def test_parse_config_presets_types_and_spellings():
    cfg = trainer.parse_config(vae.VAEConfig, vae.PRESETS, ["--preset", "tiny", "--max_steps=7", "--dry-run",
                                                            "--lr", "0.5", "--resume=no", "--seed=0", "--warmup_steps=0",
                                                            "--unfreeze_image_encoder_at=-1"])
    assert (cfg.max_steps, cfg.dry_run, cfg.lr, cfg.resume, cfg.seed, cfg.warmup_steps) == (7, True, 0.5, False, 0, 0)
    assert cfg.dim == vae.PRESETS["tiny"]["dim"] and cfg.preset == "tiny"
    assert trainer.parse_config(vae.VAEConfig, vae.PRESETS, ["--preset=paper"]).dim == 768
    assert trainer.parse_config(vae.VAEConfig, vae.PRESETS, ["--resume"]).resume is True     # a bare flag is true
    with pytest.raises(SystemExit, match="--preset: unknown preset 'huge'"):
        trainer.parse_config(vae.VAEConfig, vae.PRESETS, ["--preset=huge"])


@pytest.mark.parametrize("cls, presets, argv, flag", [
    (vae.VAEConfig, vae.PRESETS, ["--dim=0"], "--dim 0"),
    (vae.VAEConfig, vae.PRESETS, ["--micro_batch=0"], "--micro_batch 0"),
    (vae.VAEConfig, vae.PRESETS, ["--batch_start=-4"], "--batch_start -4"),
    (vae.VAEConfig, vae.PRESETS, ["--lr=-0.001"], "--lr -0.001"),
    (vae.VAEConfig, vae.PRESETS, ["--lr=nan"], "--lr nan"),
    (vae.VAEConfig, vae.PRESETS, ["--kl_weight=inf"], "--kl_weight inf"),
    (vae.VAEConfig, vae.PRESETS, ["--image_size=30", "--image_pos_size=30"], "--image_size 30"),   # patch 14
    (vae.VAEConfig, vae.PRESETS, ["--dim=48"], "--dim 48"),                                        # head_dim 32
    (vae.VAEConfig, vae.PRESETS, ["--image_heads=3"], "--image_dim 64"),
    (vae.VAEConfig, vae.PRESETS, ["--recon_loss=l3"], "--recon_loss l3"),
    (vae.VAEConfig, vae.PRESETS, ["--device=gpu"], "--device gpu"),
    (vae.VAEConfig, vae.PRESETS, ["--device=cuda:x"], "--device cuda:x"),
    (vae.VAEConfig, vae.PRESETS, ["--resume=maybe"], "--resume"),
    (vae.VAEConfig, vae.PRESETS, ["--max_steps=seven"], "--max_steps"),
    (vae.VAEConfig, vae.PRESETS, ["--no_such_flag=1"], "--no_such_flag"),
    (planner.PlannerConfig, planner.PRESETS, ["--task=robot"], "--task robot"),
    (planner.PlannerConfig, planner.PRESETS, ["--cond=image"], "--cond image"),
    (planner.PlannerConfig, planner.PRESETS, ["--max_pokes=0"], "--max_pokes 0"),
])
def test_values_that_cannot_work_are_a_usage_error_naming_the_flag(cls, presets, argv, flag, capsys):
    with pytest.raises(SystemExit) as stop:
        trainer.parse_config(cls, presets, argv)
    assert stop.value.code == 2
    assert flag in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- schedules

def test_schedules_at_chosen_steps():
    cfg = vae.VAEConfig(lr=1e-3, warmup_steps=10, max_steps=100, decay_frac=0.2, batch_start=64, batch_end=256,
                        batch_ramp_steps=100, micro_batch=16)
    # warm-up (step + 1) / warmup_steps, constant, then linear to 0 over the last 20 steps
    assert [trainer.lr_at(s, cfg) for s in (0, 9, 50, 79, 80, 90, 99)] == pytest.approx(
        [1e-4, 1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 5e-5])
    assert trainer.lr_at(99, dataclasses.replace(cfg, decay_frac=0.0)) == pytest.approx(1e-3)   # no tail
    # the global batch ramps in whole multiples of batch_start
    assert [trainer.global_batch_at(s, cfg) for s in (0, 25, 50, 75, 99, 100, 10 ** 6)] == \
        [64, 64, 128, 192, 192, 256, 256]
    assert [trainer.accumulation_steps(s, cfg, world=2) for s in (0, 50, 100)] == [2, 4, 8]
    with pytest.raises(ValueError, match="micro_batch"):
        trainer.accumulation_steps(0, dataclasses.replace(cfg, micro_batch=48), world=1)
    with pytest.raises(ValueError, match="batch_end"):
        trainer.accumulation_steps(0, dataclasses.replace(cfg, batch_end=100), world=1)


def test_step_batches_give_each_step_the_same_samples_on_any_number_of_processes():
    cfg = vae.VAEConfig(max_steps=3, batch_start=8, batch_end=16, batch_ramp_steps=2, micro_batch=2)   # 8, 8, 16

    def per_step(world, step=0, sample=0):
        shards = [trainer.step_batches(cfg, r, world, step, sample) for r in range(world)]
        steps = []
        for s in range(step, 3):
            n_acc = trainer.accumulation_steps(s, cfg, world)
            batches = [next(it) for it in shards for _ in range(n_acc)]
            seen = [i for b in batches for i in b]
            assert len(seen) == len(set(seen))                        # the shards are disjoint
            steps.append(sorted(seen))
        assert all(next(it, None) is None for it in shards)           # and end with the run
        return steps

    expected = [list(range(8)), list(range(8, 16)), list(range(16, 32))]
    assert per_step(1) == per_step(2) == per_step(4) == expected
    assert per_step(2, step=1, sample=8) == expected[1:]               # a resumed run continues where it stopped


def test_sample_random_is_keyed_by_seed_and_index_alone():
    a = trainer.SampleRandom([3, 7], seed=1)
    first, second = a.randn(4), a.rand(2, 3)
    assert first.shape == (2, 4) and second.shape == (2, 2, 3) and first.dtype == second.dtype == torch.float32
    # the same (seed, index) draws the same numbers in any batch and order of samples ...
    b = trainer.SampleRandom([7, 3, 9], seed=1)
    assert_close(b.randn(4)[[1, 0]], first, rtol=0, atol=0)
    assert_close(b.rand(2, 3)[[1, 0]], second, rtol=0, atol=0)
    # ... numpy's PCG64 seeded by the pair, row by row ...
    assert_close(first[1], torch.from_numpy(np.random.default_rng((1, 7)).standard_normal(4, dtype=np.float32)))
    # ... another seed or index draws others (seeds that agree in their low 32 bits too)
    for seed in (0, 2, 2 ** 32 + 1):
        assert not torch.equal(trainer.SampleRandom([3, 7], seed=seed).randn(4), first), seed
    assert not torch.equal(trainer.SampleRandom([4, 8], seed=1).randn(4), first)
    assert 0 <= second.min() and second.max() < 1


# ---------------------------------------------------------------------------------------------------- checkpoints

def test_latest_checkpoint_keeps_two_and_falls_back_to_the_previous_one(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    for step in (2, 4):
        trainer.save_checkpoint(path, {"kind": "vae", "step": step, "model": {}, "config": {}})
    assert trainer.latest_checkpoint(str(tmp_path), "vae")["step"] == 4
    os.link(path, path + ".prev.tmp")   # as a kill between the link and its rename leaves it
    trainer.save_checkpoint(path, {"kind": "vae", "step": 6, "model": {}, "config": {}})
    assert [load(tmp_path / f)["step"] for f in ("ckpt.pt", "ckpt.pt.prev")] == [6, 4]
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt.pt.prev"]
    (tmp_path / "ckpt.pt").write_bytes(b"\x00" * 100)
    assert trainer.latest_checkpoint(str(tmp_path), "vae")["step"] == 4
    assert trainer.latest_checkpoint(str(tmp_path), "planner") is None   # another stage's checkpoints do not count
    assert trainer.latest_checkpoint(str(tmp_path / "nothing"), "vae") is None


# ---------------------------------------------------------------------------------------------------- train(): bad input

def test_an_out_dir_that_is_a_file_is_refused_before_anything_is_written(tmp_path):
    target = tmp_path / "out"
    target.write_text("keep me")
    with pytest.raises(ValueError, match="--out_dir .*something else is in the way"):
        vae.main(flags(MICRO_VAE, out_dir=target))
    assert target.read_text() == "keep me" and os.listdir(tmp_path) == ["out"]


def test_a_batch_that_does_not_split_into_micro_batches_is_refused_before_anything_is_written(tmp_path, capsys):
    """A usage error at parse time or a ValueError from train(), either way before out_dir is made."""
    out = tmp_path / "run"
    try:
        vae.main(flags(MICRO_VAE, batch_start=4, batch_end=4, micro_batch=3, out_dir=out))
    except SystemExit as stop:
        assert stop.code == 2 and "--micro_batch" in capsys.readouterr().err
    except ValueError as e:
        assert "--micro_batch" in str(e)
    else:
        pytest.fail("a global batch of 4 in micro-batches of 3 was accepted")
    assert not out.exists(), os.listdir(out)


@pytest.mark.filterwarnings("ignore:skipping")
@pytest.mark.parametrize("content", ["empty", "corrupt"])
def test_unusable_data_stops_the_run_before_anything_is_written(tmp_path, content):
    data = tmp_path / "clips"
    data.mkdir()
    if content == "corrupt":
        (data / "clip.npz").write_bytes(b"PK\x03\x04 not really a zip")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=str(data)):
        vae.main(flags(MICRO_VAE, data=data, out_dir=out))
    assert not out.exists()


def test_a_dataset_that_fails_is_named_by_its_data_flag(tmp_path):
    """train() itself reads a sample before it writes (whatever the stage built its dataset from)."""
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, index):
            raise ValueError("no usable clip")
    cfg, model, _ = train_worker.vae_run(str(tmp_path / "run"), data="/somewhere/clips")
    with pytest.raises(ValueError, match="--data /somewhere/clips: no usable clip"):
        trainer.train(cfg, model, Broken(), vae.vae_loss, "vae")
    assert not (tmp_path / "run").exists()


def test_a_frozen_module_trains_from_its_unfreeze_step(tmp_path):
    cfg, model, data = train_worker.vae_run(str(tmp_path), max_steps=2, track_dropout=0.0, ckpt_every=1)
    start = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    trainer.train(cfg, model, data, vae.vae_loss, "vae", freeze=(model.image_encoder, 1))
    after_first = load(tmp_path / "ckpt.pt.prev")["model"]
    assert all(torch.equal(after_first[f"image_encoder.{k}"], v) for k, v in start.items())   # step 0: frozen
    assert any(not torch.equal(p, start[k]) for k, p in model.image_encoder.state_dict().items())   # step 1: trains
    assert "step 1: the image encoder is unfrozen" in (tmp_path / "log.txt").read_text()


def test_weight_decay_shrinks_the_matrices_alone(tmp_path):
    """With no gradient, one AdamW step only decays: every matrix (a Linear's weight) by 1 - lr wd, while embeddings,
    norm scales, attention temperatures and RoPE tables keep their values."""
    cfg, model, data = train_worker.vae_run(str(tmp_path), max_steps=1, warmup_steps=1, weight_decay=0.5)
    start = {k: v.clone() for k, v in model.named_parameters()}
    trainer.train(cfg, model, data, lambda net, batch: (0 * vae.vae_loss(net, batch)[0], {}), "vae")
    matrices = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, p in model.named_parameters():
        decayed = name.rpartition(".")[0] in matrices and name.endswith(".weight")
        assert_close(p.detach(), start[name] * (1 - trainer.lr_at(0, cfg) * cfg.weight_decay if decayed else 1), msg=name)
    assert any("rope" in n for n in start) and any(n.endswith("scale") for n in start)


# ---------------------------------------------------------------------------------------------------- exact resume

@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference: 4 steps of the micro VAE straight through, with an EMA (checkpoints at steps 2 and 4)."""
    out = str(tmp_path_factory.mktemp("straight"))
    train_worker.train_vae(out)
    return load(os.path.join(out, "ckpt.pt"))


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_bit_identically(tmp_path, straight):
    """2 steps, the process stops (an exception at step 2's first batch), resume, 2 more steps = 4 steps straight:
    weights, AdamW moments, EMA, counters, through the warm-up, the batch ramp and the WSD tail."""
    def stop_at_step_2(net, batch):
        if batch["index"][0] >= 8:   # global batches 4, 4 -> step 2 starts at sample 8
            raise Interrupted
        return vae.vae_loss(net, batch)

    with pytest.raises(Interrupted):
        train_worker.train_vae(str(tmp_path), stop_at_step_2)
    assert load(tmp_path / "ckpt.pt")["step"] == 2
    train_worker.train_vae(str(tmp_path), resume=True)
    assert_same_state(run_state(load(tmp_path / "ckpt.pt")), run_state(straight))
    assert straight["ema"]["updates"].item() == 4 and straight["sample"] == 4 + 4 + 8 + 8
    assert "resumed from" in (tmp_path / "log.txt").read_text()


@pytest.mark.parametrize("point", ["write", "rename"])
def test_sigkill_while_checkpointing_leaves_a_loadable_checkpoint_and_resume_finishes_the_run(tmp_path, straight, point):
    """The run in a subprocess at this process's thread count (the same reductions), SIGKILLed at that point."""
    child = run(sys.executable, WORKER, f"kill-{point}", str(tmp_path),
                env={"WORKER_THREADS": str(torch.get_num_threads())})
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert "ckpt.pt.tmp" in os.listdir(tmp_path)         # the step-4 checkpoint never made it into place
    assert trainer.latest_checkpoint(str(tmp_path), "vae")["step"] == 2
    if point == "write":
        with pytest.raises(ValueError, match="not a readable checkpoint"):
            trainer.load_checkpoint(str(tmp_path / "ckpt.pt.tmp"), "vae")
    train_worker.train_vae(str(tmp_path), resume=True)
    assert_same_state(run_state(load(tmp_path / "ckpt.pt")), run_state(straight))
    assert load(tmp_path / "ckpt.pt.prev")["step"] == 2   # the last two are kept
    assert "ckpt.pt.tmp" not in os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------------- train_ddp.sh

def train_ddp(*args, path=None, **env):
    """bash train_ddp.sh ARGS with DRY_RUN=1, none of the caller's SLURM or launcher settings: (result, + lines)."""
    names = ("PRESET", "DATA", "OUT", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHON")
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in names}
    if path:
        base["PATH"] = f"{path}{os.pathsep}{base['PATH']}"
    env = dict(base, DRY_RUN="1", PYTHON=sys.executable, **env)   # the python with torch, as .venv/bin/python is
    result = subprocess.run(["bash", "train_ddp.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    return result, [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


def test_train_ddp_sh_parses():
    assert run("bash", "-n", "train_ddp.sh").returncode == 0


def test_train_ddp_sh_dry_run_under_a_four_node_slurm_allocation(tmp_path):
    """srun bash train_ddp.sh vae on 4 nodes x 8 GPUs: each node's line is what torchrun expects there; the master
    is the allocation's first host, as scontrol expands the node list."""
    (tmp_path / "scontrol").write_text('#!/bin/sh\n[ "$*" = "show hostnames gpu-[07-09,12]" ] || exit 1\n'
                                       'printf "gpu-07\\ngpu-08\\ngpu-09\\ngpu-12\\n"\n')
    (tmp_path / "scontrol").chmod(0o755)
    slurm = dict(PRESET="paper", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-[07-09,12]", SLURM_NNODES="4",
                 SLURM_NTASKS="4", SLURM_GPUS_ON_NODE="8")
    for node in range(4):
        result, lines = train_ddp("vae", "--lr=2e-4", path=tmp_path, SLURM_NODEID=str(node), **slurm)
        assert result.returncode == 0, result.stderr
        assert len(lines) == 1
        args = lines[0]
        assert args[1:3] == ["-m", "torch.distributed.run"]
        assert args[3:] == ["--nnodes=4", f"--node_rank={node}", "--master_addr=gpu-07", "--master_port=29500",
                            "--nproc_per_node=8", "vae.py", "--preset=paper", "--out_dir=out/paper/vae", "--lr=2e-4"]
    result, _ = train_ddp("vae", path=tmp_path, **dict(slurm, SLURM_NODEID="0", SLURM_NTASKS="32"))
    assert result.returncode == 1 and "--ntasks-per-node=1" in result.stderr   # one task per node, not per GPU


def test_set_threads_shares_the_cores_among_processes_and_keeps_one_per_data_worker(monkeypatch):
    previous = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(trainer, "CORES", 2)
    try:
        assert trainer.set_threads(0, 1) == (1, 1) == (torch.get_num_threads(), 1)   # python3 vae.py on 2 cores
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert trainer.set_threads(0, 1) == (1, 0)            # train_ddp.sh: one process per core, data inline
        monkeypatch.setattr(trainer, "CORES", 16)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        assert trainer.set_threads(0, 4) == (12, 4) and trainer.set_threads(0, 0) == (16, 0)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert trainer.set_threads(0, 4) == (3, 4) and trainer.set_threads(5, 0) == (5, 0) == (torch.get_num_threads(), 0)
    finally:
        torch.set_num_threads(previous)


def cores():   # what train_ddp.sh starts on a node without GPUs: one process per physical core (torch's default threads)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                          capture_output=True, text=True).stdout.strip()


def test_train_ddp_sh_stages_on_one_node():
    result, lines = train_ddp("planner", DATA="/data/clips")
    assert result.returncode == 0, result.stderr
    assert lines[0][3:] == ["--standalone", f"--nproc_per_node={cores()}", "planner.py", "--preset=tiny",
                            "--out_dir=out/tiny/planner", "--vae=out/tiny/vae/ckpt.pt", "--data=/data/clips"]
    # tiny LIBERO: the robot VAE, the planner in it; the paper preset plans LIBERO in its one general VAE
    assert train_ddp("vae-robot")[1][0][5:] == ["vae.py", "--preset=tiny_robot", "--out_dir=out/tiny/vae-robot"]
    assert train_ddp("planner-libero")[1][0][5:] == ["planner.py", "--preset=libero_tiny",
                                                     "--out_dir=out/tiny/planner-libero",
                                                     "--vae=out/tiny/vae-robot/ckpt.pt"]
    assert train_ddp("planner-libero", PRESET="paper")[1][0][5:] == [
        "planner.py", "--preset=libero", "--out_dir=out/paper/planner-libero", "--vae=out/paper/vae/ckpt.pt"]
    assert train_ddp("policy")[1][0][5:] == ["policy.py", "--preset=tiny", "--out_dir=out/tiny/policy",
                                             "--planner=out/tiny/planner-libero/ckpt.pt"]
    refused, _ = train_ddp("vae-robot", PRESET="paper")
    assert refused.returncode == 2 and "general VAE" in refused.stderr
    unknown, _ = train_ddp("perception")
    assert unknown.returncode == 2 and "unknown stage 'perception'" in unknown.stderr


def test_train_ddp_sh_without_a_stage_prints_the_pipeline():
    import sample
    result, lines = train_ddp()
    assert result.returncode == 0, result.stderr
    models = ["--vae", "out/tiny/vae/ckpt.pt", "--planner", "out/tiny/planner/ckpt.pt"]
    expected = [
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cores()}", "vae.py", "--preset=tiny",
         "--out_dir=out/tiny/vae", "--resume=true"],
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cores()}", "planner.py", "--preset=tiny",
         "--out_dir=out/tiny/planner", "--vae=out/tiny/vae/ckpt.pt", "--resume=true"],
        ["sample.py", *models, "--out", "out/tiny/samples"],
        ["sample.py", *models, "--out", "out/tiny/samples/text", "--text", "the red square moves to the right"],
        ["eval.py", "recon", "--vae", "out/tiny/vae/ckpt.pt", "--json", "out/tiny/eval/recon.json"],
        ["eval.py", "tracks", *models, "--pokes", "0,1,4,16", "--json", "out/tiny/eval/tracks.json"],
        ["eval.py", "tracks", *models, "--pokes", "0", "--text", "--json", "out/tiny/eval/tracks_text.json"]]
    assert [line[1:] for line in lines] == expected
    assert "pipeline done" in result.stdout
    for line in lines[2:4]:   # the flags the pipeline gives sample.py are its flags
        args = sample.build_parser().parse_args(line[2:])
        assert (args.vae, args.planner) == ("out/tiny/vae/ckpt.pt", "out/tiny/planner/ckpt.pt")
    # the stages' flags are their configs' fields
    for line, (cls, presets) in zip(lines[:2], ((vae.VAEConfig, vae.PRESETS), (planner.PlannerConfig, planner.PRESETS))):
        cfg = trainer.parse_config(cls, presets, line[6:])
        assert cfg.resume and cfg.preset == "tiny" and cfg.out_dir == line[7].split("=", 1)[1]


# ---------------------------------------------------------------------------------------------------- distributed

@pytest.fixture(scope="module", autouse=True)
def torchrun_in_background(request, tmp_path_factory):
    """The one torchrun of this module (2 processes: vae.py's main, a planner run, the NaN run), started with the
    module's first test so that it runs beside the in-process tests (one busy process on a 2-core machine); only
    when a test that reads it is selected."""
    if not any(item.module is request.module and "distributed" in item.fixturenames for item in request.session.items):
        yield None
        return
    root = tmp_path_factory.mktemp("distributed")
    with open(root / "stdout.txt", "w") as out, open(root / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 WORKER, "ddp,nonfinite", str(root / "two")], cwd=ROOT, stdout=out, stderr=err,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    yield root, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def distributed(torchrun_in_background):
    """The torchrun's outputs beside the same runs in 1 process (this one): (root, torchrun's stdout)."""
    root, proc = torchrun_in_background
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the workers' thread count (OMP_NUM_THREADS=1): the same reductions inside each op
    try:
        train_worker.main("ddp", str(root / "one"))
    finally:
        torch.set_num_threads(threads)
    assert proc.wait(timeout=300) == 0, (root / "stderr.txt").read_text()[-3000:]
    return root, (root / "stdout.txt").read_text()


def test_two_processes_train_like_one_at_the_same_global_batch(distributed):
    """Every stochastic part on (track sampling and dropout, posterior noise; planner conditions, flow noise and
    time), randomness keyed by sample index: 2 processes = 1 process, to 1e-5, the planner's EMA included."""
    root, _ = distributed
    for stage in ("vae", "planner"):
        one, two = (load(root / d / stage / "ckpt.pt") for d in ("one", "two"))
        assert one["step"] == two["step"] > 2 and one["sample"] == two["sample"]
        keys = ("model", "ema") if stage == "planner" else ("model",)
        assert_same_state({k: one[k] for k in keys}, {k: two[k] for k in keys}, atol=1e-5)
    ckpt = load(root / "one" / "planner" / "ckpt.pt")
    assert ckpt["ema"]["updates"].item() == ckpt["step"]                     # every step was taken
    trained = load(root / "one" / "vae" / "ckpt.pt")["model"]
    fresh = train_worker.vae_run("unused")[1].state_dict()
    assert max((fresh[k] - v).abs().max().item() for k, v in trained.items()) > 1e-3   # not untrained weights


def test_torchrun_of_vae_main_writes_only_on_rank_0(distributed):
    root, stdout = distributed
    out = root / "two" / "vae"
    assert sorted(os.listdir(out)) == ["ckpt.pt", "ckpt.pt.prev", "config.json", "log.txt", "val.png"]
    log = (out / "log.txt").read_text().splitlines()
    assert [line.split()[1] for line in log if line.startswith("step ")] == ["1/4", "2/4", "3/4", "4/4"]   # once each
    assert sum(line.startswith("val step 4") for line in log) == 1
    assert stdout.count("step 4/4 ") == 1
    assert load(out / "ckpt.pt")["sample"] == 4 + 4 + 8 + 8


def test_nonfinite_loss_on_one_rank_skips_the_step_everywhere_and_stops_after_three_in_a_row(distributed):
    out = distributed[0] / "two" / "nonfinite"
    errors = [(out / f"error{r}.txt").read_text() for r in (0, 1)]
    assert errors[0] == errors[1] and "non-finite at 3 steps in a row (steps 4..6); stopping at step 6" in errors[0]
    log = (out / "log.txt").read_text()
    assert "step 2: non-finite" in log and "step 3: non-finite" not in log
    ckpt = load(out / "ckpt.pt")
    assert ckpt["step"] == 6                 # saved after step 5 (4 and 5 skipped); step 6 stopped before saving
    assert_same_state(ckpt["model"], load(out / "ckpt.pt.prev")["model"])   # = the weights of step 4
    assert ckpt["ema"]["updates"].item() == 3                               # steps 0, 1, 3 stepped; 2 was skipped
    assert all(s["step"].item() == 3 for s in ckpt["optimizer"]["state"].values())
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert "ckpt.pt.tmp" not in os.listdir(out)
