"""Shared micro configs and fixtures: models small enough to train in a second, robot demos of a few frames."""
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

# Tests never touch the network: every model is built from a config, and hub look-ups fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import planner  # noqa: E402
import policy  # noqa: E402
import trainer  # noqa: E402
import vae  # noqa: E402

# 8 frames, a 4x4 grid of 4 channels, a 28 px random DINOv2 with 2x2 patches, one layer per stack
MICRO_VAE = dict(vae.PRESETS["tiny"], n_frames=8, n_enc=4, n_dec=4, synth_tracks=64, image_size=28, image_pos_size=28,
                 image_dim=32, image_layers=1, image_heads=2, dim=32, enc_layers=1, dec_layers=1, head_dim=16,
                 latent_channels=4, grid_size=4, num_workers=0, device="cpu", max_steps=2,
                 batch_start=4, batch_end=4, micro_batch=4, log_every=1, val_every=1000, val_clips=2, ckpt_every=1000)
MICRO_PLANNER = dict(planner.PRESETS["tiny"], n_frames=8, latent_channels=4, grid_size=4, image_size=28,
                     image_pos_size=28, image_dim=32, image_layers=1, image_heads=2, dim=32, layers=2, head_dim=16,
                     time_dim=16, cond_dim=32, max_pokes=4, norm_samples=8, num_workers=0, device="cpu",
                     max_steps=2, batch_start=4, batch_end=4, micro_batch=4, log_every=1, val_every=1000, val_clips=2,
                     val_k=2, val_steps=1, ckpt_every=1000)
MICRO_POLICY = dict(policy.PRESETS["tiny"], latent_tokens=2 * 16, latent_channels=4, grid_size=4, dim=32, layers=1,
                    head_dim=16, action_chunk=4, latent_pool=8, norm_samples=8, max_steps=3, batch_start=4, batch_end=4,
                    micro_batch=4, num_workers=0, val_every=1000, eval_stride=8, log_every=1, device="cpu", plan_steps=2,
                    eval_json="")


def flags(values, **overrides):
    """A config dict -> --key=value flags for a stage's main()."""
    return [f"--{k}={v}" for k, v in {**values, **overrides}.items() if k != "preset"]


def micro_vae_config(**overrides):
    return vae.VAEConfig(**{**MICRO_VAE, **overrides})


def micro_planner_config(**overrides):
    return planner.PlannerConfig(**{**MICRO_PLANNER, **overrides})


def micro_policy_config(**overrides):
    return policy.PolicyConfig(**{**MICRO_POLICY, **overrides})


def moved_off_zero(model, seed=0, scale=0.05):
    """Random weights moved off their zero initialisations (the output layers, the adaptive norms), so every input
    can change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def save_model(path, kind, model, **extra):
    """A checkpoint as trainer.train writes it (weights and config), for loaders under test."""
    trainer.save_checkpoint(str(path), {"kind": kind, "model": model.state_dict(), "config": dataclasses.asdict(model.cfg),
                                    **extra})
    return str(path)


def run(*cmd, env=None, timeout=240):
    """A subprocess in the project root, one OpenMP thread (the suite shares two cores)."""
    return subprocess.run(list(cmd), cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def torchrun(*args, nproc=2):
    return run(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args)


@pytest.fixture(scope="session")
def micro_checkpoints(tmp_path_factory):
    """A VAE and a planner trained for 2 steps by their own main() on synthetic clips: (vae path, planner path)."""
    root = tmp_path_factory.mktemp("checkpoints")
    vae.main(flags(MICRO_VAE, out_dir=root / "vae"))
    planner.main(flags(MICRO_PLANNER, vae=root / "vae" / "ckpt.pt", out_dir=root / "planner"))
    return str(root / "vae" / "ckpt.pt"), str(root / "planner" / "ckpt.pt")


@pytest.fixture(scope="session")
def robot_demos(tmp_path_factory):
    """4 short demos of libero.py's robot task (96 tracks per view) with a made-up 12-d task embedding."""
    import libero
    folder = tmp_path_factory.mktemp("robot")

    def embed(text):
        return np.random.default_rng(sum(map(ord, text))).standard_normal(12).astype(np.float32)
    libero.write_robot_demos(str(folder), 4, seed=0, n_points=96, frames=(34, 40), embed=embed)
    return folder


@pytest.fixture(scope="session")
def libero_chain(tmp_path_factory, robot_demos):
    """A micro VAE on the robot demos, a LIBERO planner on it (planner.py --preset libero_tiny) and a policy head on its
    plans, each trained for 2-3 steps by its own main(): their paths."""
    root = tmp_path_factory.mktemp("chain")
    vae.main(flags(MICRO_VAE, n_enc=6, n_dec=6, data=robot_demos, out_dir=root / "vae"))
    planner.main(["--preset=libero_tiny"] + flags({k: v for k, v in MICRO_PLANNER.items() if k in (
        "dim", "layers", "head_dim", "time_dim", "cond_dim", "norm_samples", "max_steps", "batch_start",
        "batch_end", "micro_batch", "num_workers", "log_every", "val_clips", "val_k", "val_steps", "device")},
        val_every=2, eval_tracks=4, data=robot_demos, vae=root / "vae" / "ckpt.pt", out_dir=root / "planner"))
    policy.main(flags(MICRO_POLICY, data=robot_demos, planner=root / "planner" / "ckpt.pt", out_dir=root / "policy",
                      val_every=3))
    return dict(data=str(robot_demos), vae=str(root / "vae" / "ckpt.pt"), planner=str(root / "planner" / "ckpt.pt"),
                policy=str(root / "policy" / "ckpt.pt"), root=root)
