"""Micro training runs for tests/test_train.py, in-process or as a subprocess (python or torchrun), COMMANDS a comma
list run in order in one process group:

  python tests/train_worker.py kill-write OUT    # the micro VAE run, SIGKILLed half-way through its step-4 checkpoint
  python tests/train_worker.py kill-rename OUT   # ... SIGKILLed after writing it, before it is renamed into place
  torchrun --nproc_per_node=2 tests/train_worker.py ddp,nonfinite OUT
      ddp: vae.py's main() (OUT/vae) and a planner run on a fixed VAE (OUT/planner), for the 1-process comparison
      nonfinite: the micro VAE run whose rank-1 loss is NaN at step 2 and from step 4 on (OUT/nonfinite)
"""
import io
import os
import signal
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import MICRO_PLANNER, MICRO_VAE, flags  # noqa: E402  (it puts the project root on the path)
import planner  # noqa: E402
import trainer  # noqa: E402
import vae  # noqa: E402
from data import TrackDataset  # noqa: E402

# every schedule moves: warm-up, the batch ramp 4 -> 8 (accumulation), the WSD tail; track dropout and posterior noise;
# one thread in every process (bit-identical runs across processes need the same reductions inside each op)
RUN = dict(track_dropout=0.2, max_steps=4, lr=3e-3, warmup_steps=2, decay_frac=0.5, batch_start=4, batch_end=8,
           batch_ramp_steps=2, micro_batch=2, log_every=1, val_every=1000, ckpt_every=2, threads=1)
PLANNER_RUN = dict(layers=1, max_steps=3, lr=3e-3, warmup_steps=1, batch_start=4, batch_end=4, micro_batch=2,
                   ema_decay=0.9, log_every=1, val_every=1000, ckpt_every=3, threads=1)


def vae_run(out_dir, **overrides):
    """(cfg, model, dataset) of the micro VAE run; the model's initial weights depend only on the seed."""
    cfg = vae.VAEConfig(**{**MICRO_VAE, **RUN, "out_dir": out_dir, **overrides})
    torch.manual_seed(cfg.seed)
    model = vae.TrackVAE(cfg)
    data = TrackDataset("synthetic", "train", n_frames=cfg.n_frames, n_enc=cfg.n_enc, n_dec=cfg.n_dec,
                        image_size=cfg.image_size, synth_tracks=cfg.synth_tracks)
    return cfg, model, data


def train_vae(out_dir, loss_fn=vae.vae_loss, max_nonfinite=3, **overrides):
    """The micro VAE through trainer.train with an EMA (so that resume has one to restore)."""
    cfg, model, data = vae_run(out_dir, **overrides)
    ema = planner.EMA(model, 0.9)
    trainer.train(cfg, model, data, loss_fn, "vae", ema=ema, max_nonfinite=max_nonfinite)
    return model, ema


def vae_main(out_dir):
    """vae.py's own main() on the micro run (validation at the last step, val.png)."""
    vae.main(flags(MICRO_VAE, **RUN, out_dir=out_dir))


def train_planner(out_dir):
    """The micro planner (pokes, text, both or none per sample) on the seeded, untrained micro VAE."""
    _, vae_model, data = vae_run(out_dir + "-vae")
    vae_model.eval().fingerprint = vae.fingerprint(vae_model)
    cfg = planner.PlannerConfig(**{**MICRO_PLANNER, **PLANNER_RUN, "out_dir": out_dir})
    torch.manual_seed(1)
    model = planner.build_planner(cfg, vae_model)
    shift, scale = planner.measure_latent_stats(vae_model, data, cfg.norm_samples)
    model.latent_shift.fill_(shift), model.latent_scale.fill_(scale)
    ema = planner.EMA(model, cfg.ema_decay)
    trainer.train(model.cfg, model, data, planner.make_loss(model, vae_model, model.cfg), "planner", ema=ema)


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


def main(commands, out):
    # bit-identical runs across processes need the same reductions: the caller passes its thread count
    torch.set_num_threads(int(os.environ.get("WORKER_THREADS", torch.get_num_threads())))
    owned = "RANK" in os.environ and not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo")   # one group for several runs (train() leaves a group it did not start)
    for command in commands.split(","):
        if command.startswith("kill-"):
            kill_during_second_save(command[len("kill-"):])
            train_vae(out)
        elif command == "ddp":
            vae_main(os.path.join(out, "vae"))
            train_planner(os.path.join(out, "planner"))
        elif command == "nonfinite":
            folder = os.path.join(out, "nonfinite")
            try:
                train_vae(folder, nan_on_rank1_loss, max_steps=8, batch_end=4)
            except RuntimeError as e:
                with open(os.path.join(folder, f"error{dist.get_rank() if dist.is_initialized() else 0}.txt"), "w") as f:
                    f.write(str(e))
        else:
            raise SystemExit(f"unknown command {command!r}")
    if owned:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
