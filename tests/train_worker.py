"""Micro training runs for tests/test_train.py, in-process or as a subprocess (python or torchrun):

  python tests/train_worker.py straight OUT              # 4 steps of the micro VAE (track dropout and noise on)
  python tests/train_worker.py kill-write OUT            # dies (SIGKILL) half-way through writing the step-4 checkpoint
  python tests/train_worker.py kill-rename OUT           # dies after writing it, before renaming it into place
  torchrun --nproc_per_node=2 tests/train_worker.py ddp OUT        # VAE and planner runs, for the 1-process comparison
  torchrun --nproc_per_node=2 tests/train_worker.py nonfinite OUT  # rank 1's loss is NaN at step 2 and from step 4
"""
import io
import os
import signal
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import planner  # noqa: E402
import vae  # noqa: E402
from data import TrackDataset  # noqa: E402

MICRO_VAE = dict(vae.PRESETS["tiny"], n_frames=8, n_enc=4, n_dec=4, synth_tracks=64, image_size=28, image_pos_size=28,
                 image_dim=32, image_layers=1, image_heads=2, dim=32, enc_layers=1, dec_layers=1, head_dim=16,
                 latent_channels=4, grid_size=4, fourier_bands=8, track_dropout=0.2, num_workers=0, device="cpu",
                 max_steps=4, lr=3e-3, warmup_steps=2, decay_frac=0.5, batch_start=4, batch_end=8, batch_ramp_steps=2,
                 micro_batch=2, log_every=1, val_every=1000, ckpt_every=2)
MICRO_PLANNER = dict(planner.PRESETS["tiny"], n_frames=8, latent_channels=4, grid_size=4, image_size=28,
                     image_pos_size=28, image_dim=32, image_layers=1, image_heads=2, dim=32, layers=1, head_dim=16,
                     time_dim=16, cond_dim=32, fourier_bands=8, max_pokes=4, cond="pokes", num_workers=0,
                     device="cpu", max_steps=3, lr=3e-3, warmup_steps=1, batch_start=4, batch_end=4, micro_batch=2,
                     ema_decay=0.9, log_every=1, val_every=1000, ckpt_every=3)


def vae_run(out_dir, **overrides):
    """(cfg, model, dataset) of the micro VAE run; the model's initial weights depend only on the seed."""
    cfg = vae.VAEConfig(**dict(MICRO_VAE, out_dir=out_dir, **overrides))
    torch.manual_seed(cfg.seed)
    model = vae.TrackVAE(cfg)
    data = TrackDataset("synthetic", "train", n_frames=cfg.n_frames, n_enc=cfg.n_enc, n_dec=cfg.n_dec,
                        image_size=cfg.image_size, synth_tracks=cfg.synth_tracks)
    return cfg, model, data


def train_vae(out_dir, loss_fn=vae.vae_loss, **overrides):
    cfg, model, data = vae_run(out_dir, **overrides)
    ema = vae.EMA(model, 0.9)
    vae.train(cfg, model, data, loss_fn, "vae", ema=ema, max_nonfinite=3)
    return model, ema


def train_planner(out_dir):
    """The micro planner on a randomly initialised micro VAE (only its encoder's means are used)."""
    vcfg, vae_model, data = vae_run(out_dir + "-vae")
    cfg = planner.PlannerConfig(**dict(MICRO_PLANNER, out_dir=out_dir))
    torch.manual_seed(1)
    model = planner.MotionPlanner(cfg, pretrained=False)
    ema = vae.EMA(model, cfg.ema_decay)
    vae.train(cfg, model, data, planner.make_planner_loss(model, vae_model.eval(), cfg), "planner", ema=ema)


def kill_during_second_save(point):
    """SIGKILL this process in the middle of the second checkpoint's write (point "write": half of its bytes are
    in ckpt.pt.tmp) or after the write, just before ckpt.pt.tmp is renamed over ckpt.pt (point "rename")."""
    saves, real_save, real_replace = [0], torch.save, os.replace

    def save(obj, f):
        saves[0] += 1
        if point == "write" and saves[0] == 2:
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, f)

    def replace(src, dst):
        if point == "rename" and saves[0] == 2 and src.endswith("ckpt.pt.tmp"):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    torch.save, os.replace = save, replace


def nan_on_rank1_loss(net, batch):
    """vae_loss, made NaN on rank 1 at step 2 and from step 4 on (global batch 4: step = index // 4)."""
    loss, metrics = vae.vae_loss(net, batch)
    step = int(batch["index"][0]) // 4
    if int(os.environ.get("RANK", 0)) == 1 and (step == 2 or step >= 4):
        loss = loss * float("nan")
    return loss, metrics


def main(command, out):
    if "RANK" in os.environ:
        dist.init_process_group("gloo")  # one group for several runs (train() leaves a group it did not start)
    if command == "straight":
        train_vae(out)
    elif command.startswith("kill-"):
        kill_during_second_save(command[len("kill-"):])
        train_vae(out)
    elif command == "ddp":
        train_vae(os.path.join(out, "vae"))
        train_planner(os.path.join(out, "planner"))
    elif command == "nonfinite":
        try:
            train_vae(out, nan_on_rank1_loss, max_steps=8, batch_end=4)
        except RuntimeError as e:
            with open(os.path.join(out, f"error{dist.get_rank()}.txt"), "w") as f:
                f.write(str(e))
    else:
        raise SystemExit(f"unknown command {command!r}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
