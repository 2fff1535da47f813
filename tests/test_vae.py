"""Tests of vae.py: the blocks against their formulas, the VAE's structural promises, the training helpers."""
import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import vae
from vae import (PRESETS, Attention, Block, PointEmbed, RMSNorm, RoPE, SwiGLU, TrackVAE, VAEConfig, apply_rope,
                 global_batch_at, load_vae, lr_at, parse_config, save_checkpoint)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def micro_config(**overrides):
    """A VAE small enough for a unit test: 8 frames, 4x4 grid, 1 layer each, 32 px random DINOv2."""
    base = dict(PRESETS["tiny"], n_frames=8, n_enc=4, n_dec=4, image_size=28, image_pos_size=28, image_dim=32,
                image_layers=1, image_heads=2, dim=32, enc_layers=1, dec_layers=1, head_dim=16, latent_channels=4,
                grid_size=4, fourier_bands=8, num_workers=0)
    base.update(overrides)
    return VAEConfig(**base)


def test_the_conv_stand_in_learns_where_things_are():
    """vae.ConvStandIn (image_encoder="conv"): tokens on DINOv2's patch grid, and, trained with a linear read-out,
    it finds a bright square in a random image to within a fraction of the frame."""
    torch.manual_seed(0)
    cfg = micro_config(image_encoder="conv", image_dim=16)
    encoder = vae.ImageEncoder(cfg)
    assert isinstance(encoder.net, vae.ConvStandIn) and encoder.pos.shape == (4, 3)
    read_out = torch.nn.Linear(4 * 16, 2)

    def squares(n):  # noise, and a 6 px square of value 3 whose centre (x, y) in [-1, 1] is the target
        corner = torch.randint(0, 28 - 6, (n, 2))
        image = 0.3 * torch.randn(n, 3, 28, 28)
        for i, (x, y) in enumerate(corner.tolist()):
            image[i, :, y:y + 6, x:x + 6] = 3.0
        return image, (corner + 2.5) / 13.5 - 1
    assert encoder(squares(5)[0]).shape == (5, 4, 16)
    params = [*encoder.parameters(), *read_out.parameters()]
    opt = torch.optim.Adam(params, 3e-3)
    for _ in range(60):
        image, target = squares(32)
        loss = F.mse_loss(read_out(encoder(image).flatten(1)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    image, target = squares(256)
    with torch.no_grad():
        error = F.mse_loss(read_out(encoder(image).flatten(1)), target).item()
    assert error < 0.05 * target.var().item(), error   # (0.0008 after 100 steps; the variance is about 0.22)


# ---------------------------------------------------------------------------------------------------- blocks

@pytest.mark.parametrize("n_axes", [1, 2, 3])
def test_rope_scores_depend_only_on_position_difference(n_axes):
    torch.manual_seed(0)
    rope = RoPE(head_dim=24, max_freqs=[40 * math.pi] * n_axes)
    q, k = torch.randn(2, 1, 1, 1, 24).unbind(0)
    pq, pk, shift = torch.rand(3, 1, n_axes) * 2 - 1

    def score(a, b):
        return (apply_rope(q, rope(a)) * apply_rope(k, rope(b))).sum()

    assert torch.allclose(score(pq, pk), score(pq + shift, pk + shift), atol=1e-4)
    # ... and the score does change with the difference (the rotation is not the identity)
    assert not torch.allclose(score(pq, pk), score(pq, pk + 0.05), atol=1e-3)


def test_rope_frequencies_are_geometric_per_axis():
    rope = RoPE(head_dim=64, max_freqs=(10 * math.pi, 40 * math.pi, 40 * math.pi))
    sizes = [int((rope.axis == a).sum()) for a in range(3)]
    assert sizes == [11, 11, 10]
    for a, top in enumerate((10 * math.pi, 40 * math.pi, 40 * math.pi)):
        f = rope.freq[rope.axis == a]
        assert f[0].item() == pytest.approx(1.0) and f[-1].item() == pytest.approx(top, rel=1e-5)
        ratios = f[1:] / f[:-1]
        assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-4)
    # a one-pixel step at 256 px (2/255 in unit coordinates) turns the fastest pair by about 0.5 rad
    assert 0.3 < rope.freq.max().item() * 2 / 255 < 1.0


def test_rope_axis_order_is_t_y_x():
    rope = RoPE(head_dim=12, max_freqs=(1.0, 2.0, 3.0))  # 2 pairs per axis: t, then y, then x
    cos, _ = rope(torch.tensor([[0.0, 0.0, 1.0]]))       # only x moves
    assert torch.allclose(cos[0, :4], torch.ones(4)) and not torch.allclose(cos[0, 4:6], torch.ones(2))


def test_rmsnorm_formula_and_zero_init_adaptive():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    norm = RMSNorm(8)
    norm.weight.data = torch.rand(8)
    expect = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(norm(x), expect, atol=1e-6)
    ada = RMSNorm(8, cond_dim=3)
    cond = torch.randn(2, 3)
    assert torch.allclose(ada(x, cond), RMSNorm(8)(x), atol=1e-6)  # zero-init: starts as plain RMSNorm
    ada.cond.bias.data.fill_(1.0)
    assert torch.allclose(ada(x, cond), 2 * RMSNorm(8)(x), atol=1e-5)


def test_swiglu_formula_and_parameter_count():
    torch.manual_seed(0)
    ffn = SwiGLU(8, ffn_mult=3)
    assert sum(p.numel() for p in ffn.parameters()) == 9 * 8 * 8
    x = torch.randn(4, 8)
    w1, w2 = ffn.w12.weight[:24], ffn.w12.weight[24:]
    expect = (F.silu(x @ w1.T) * (x @ w2.T)) @ ffn.w3.weight.T
    assert torch.allclose(ffn(x), expect, atol=1e-6)


def test_attention_matches_softmax_formula_with_mask_and_rope():
    torch.manual_seed(0)
    attn = Attention(dim=8, head_dim=4, kv_dim=6)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    rope_x, rope_c = RoPE(4, (3.0,))(torch.rand(2, 3, 1)), RoPE(4, (3.0,))(torch.rand(2, 5, 1))
    mask = torch.tensor([True, True, False, True, False]).view(1, 1, 1, 5)
    out = attn(x, rope_x, ctx, rope_c, mask=mask)
    q = apply_rope(attn.split_heads(attn.q(x)), rope_x)
    k, v = (attn.split_heads(t) for t in attn.kv(ctx).chunk(2, -1))
    k = apply_rope(k, rope_c)
    scores = (q @ k.transpose(-1, -2)) / 2.0 + torch.where(mask, 0.0, -torch.inf)
    expect = attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 3, 8))
    assert torch.allclose(out, expect, atol=1e-5)


def test_block_is_pre_norm_residual_self_cross_ffn():
    torch.manual_seed(0)
    block = Block(dim=8, head_dim=4, ctx_dim=6)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    h = x + block.self_attn(block.norm1(x), None)
    h = h + block.cross_attn(block.norm2(h), None, ctx, None)
    h = h + block.ffn(block.norm3(h))
    assert torch.allclose(block(x, None, ctx, None), h, atol=1e-6)
    # release parameter count per layer: self 4d^2, cross 2d^2 + 2 d ctx, SwiGLU 9d^2 (+ 3 norms)
    assert sum(p.numel() for p in block.parameters()) == 4 * 64 + 2 * 64 + 2 * 8 * 6 + 9 * 64 + 3 * 8


def test_point_embed_fourier_features():
    emb = PointEmbed(2, dim=6, n_bands=3, max_freq=4.0, n_blocks=0)
    assert torch.allclose(emb.freq, torch.tensor([1.0, 2.0, 4.0]))
    xy = torch.tensor([[0.3, -0.7]])
    angle = torch.tensor([0.3, 0.6, 1.2, -0.7, -1.4, -2.8])
    expect = emb.proj(torch.cat([angle.sin(), angle.cos()])[None])
    assert torch.allclose(emb(xy), expect, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- the VAE

@pytest.fixture(scope="module")
def micro_vae():
    torch.manual_seed(0)
    return TrackVAE(micro_config()).eval()


def test_encode_decode_shapes(micro_vae):
    cfg = micro_vae.cfg
    image = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    tracks = torch.rand(2, 5, cfg.n_frames, 2) * 2 - 1
    mean, logvar = micro_vae.encode(image, tracks)
    assert mean.shape == logvar.shape == (2, cfg.grid_size ** 2, cfg.latent_channels)
    out = micro_vae.decode(mean, image, torch.rand(2, 7, 2) * 2 - 1)
    assert out.shape == (2, 7, cfg.n_frames, 2)
    dense = micro_vae.decode_dense(mean, image, height=3, width=5)
    assert dense.shape == (2, 3, 5, cfg.n_frames, 2)
    with pytest.raises(ValueError, match="tracks"):
        micro_vae.encode(image, tracks.transpose(1, 2)[..., :1])
    with pytest.raises(ValueError, match="image"):
        micro_vae.encode(image[:, :, :20], tracks)


@pytest.mark.parametrize("position_content", [True, False])
def test_point_decoded_alone_equals_point_among_others(position_content):
    torch.manual_seed(1)
    micro_vae = TrackVAE(micro_config(position_content=position_content)).eval()
    cfg = micro_vae.cfg
    image = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    z = torch.randn(1, cfg.grid_size ** 2, cfg.latent_channels)
    queries = torch.rand(1, 101, 2) * 2 - 1
    together = micro_vae.decode(z, image, queries)
    alone = micro_vae.decode(z, image, queries[:, :1])
    assert torch.allclose(together[:, :1], alone, atol=1e-5)
    perm = torch.randperm(101)
    assert torch.allclose(micro_vae.decode(z, image, queries[:, perm]), together[:, perm], atol=1e-5)
    assert torch.allclose(micro_vae.decode(z, image, queries, chunk=7), together, atol=1e-5)


def test_dense_decode_equals_pointwise_decode(micro_vae):
    cfg = micro_vae.cfg
    image = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    z = torch.randn(1, cfg.grid_size ** 2, cfg.latent_channels)
    dense = micro_vae.decode_dense(z, image, height=4, width=6, chunk=5)
    # pixel (row 1, col 4) of a 4 x 6 frame in unit coordinates: u = 2 p / (size - 1) - 1
    point = torch.tensor([[[2 * 4 / 5 - 1, 2 * 1 / 3 - 1]]])
    assert torch.allclose(dense[0, 1, 4], micro_vae.decode(z, image, point)[0, 0], atol=1e-5)


def test_latent_layout_and_temporal_slots():
    torch.manual_seed(0)
    seq = TrackVAE(micro_config(latent_layout="sequence"))
    assert torch.count_nonzero(seq.latent_pos) == 0
    slots = TrackVAE(micro_config(temporal_slots=2))
    assert slots.n_latents == 2 * 16 and sorted(set(slots.latent_pos[:, 0].tolist())) == [-0.5, 0.5]
    mean, _ = slots.encode(torch.randn(1, 3, 28, 28), torch.rand(1, 3, 8, 2))
    assert mean.shape == (1, 32, 4)


def test_offset_prediction_and_loss_choices():
    torch.manual_seed(0)
    model = TrackVAE(micro_config(predict_offsets=True)).eval()
    torch.nn.init.zeros_(model.to_xy[-1].weight)
    torch.nn.init.zeros_(model.to_xy[-1].bias)
    image, z, start = torch.randn(1, 3, 28, 28), torch.randn(1, 16, 4), torch.rand(1, 5, 2) * 2 - 1
    assert torch.equal(model.decode(z, image, start), start.unsqueeze(2).expand(1, 5, 8, 2))  # zero offset = still
    tracks = torch.rand(1, 8, 8, 2) * 2 - 1
    pred = model(image, tracks)["pred"]
    model.cfg.recon_loss = "l2"
    assert torch.allclose(model(image, tracks)["loss"], (pred - tracks).pow(2).mean(), atol=1e-6)
    model.cfg.recon_loss = "l3"
    with pytest.raises(ValueError, match="recon_loss"):
        model(image, tracks)


def test_encode_offsets_feeds_each_token_its_displacement():
    model = TrackVAE(micro_config(encode_offsets=True)).eval()
    seen = {}
    model.point_embed.register_forward_hook(lambda module, args, out: seen.update(coords=args[0]))
    tracks = torch.rand(2, 3, 8, 2) * 2 - 1
    model.encode(torch.randn(2, 3, 28, 28), tracks)
    assert seen["coords"].shape == (2, 3, 8, 4)
    assert torch.equal(seen["coords"][..., :2], tracks)                      # (x, y) as before ...
    assert torch.equal(seen["coords"][..., 2:], tracks - tracks[:, :, :1])   # ... and (x - x0, y - y0)
    assert (seen["coords"][:, :, 0, 2:] == 0).all()


def test_occlusion_mask_removes_points_from_loss():
    torch.manual_seed(0)
    model = TrackVAE(micro_config(mask_occluded=True)).eval()
    image, tracks = torch.randn(1, 3, 28, 28), torch.rand(1, 8, 8, 2) * 2 - 1
    visible = torch.ones(1, 8, 8, dtype=torch.bool)
    visible[0, 6:, 3:] = False
    out = model(image, tracks, visible)
    # moving the occluded targets changes nothing when they are masked ...
    moved = tracks.clone()
    moved[0, 6:, 3:] += 0.5
    assert torch.allclose(model(image, moved, visible)["l1"], out["l1"])
    # ... and does change the loss of the default model
    model.cfg.mask_occluded = False
    assert not torch.allclose(model(image, moved, visible)["l1"], model(image, tracks, visible)["l1"])


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    cfg = micro_config(dim=48, enc_layers=1, dec_layers=1, n_enc=8, n_dec=0)
    model = TrackVAE(cfg)
    image = torch.randn(2, 3, 28, 28)
    t = torch.linspace(0, 1, 8).view(1, 1, 8, 1)
    start = torch.rand(2, 8, 1, 2) * 1.6 - 0.8
    velocity = torch.rand(2, 8, 1, 2) * 0.4 - 0.2
    tracks = start + t * velocity + 0.05 * torch.sin(6 * t) * velocity.flip(-1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    for step in range(500):
        out = model(image, tracks)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        if out["l1"].item() < 0.02:
            break
    model.eval()
    assert model(image, tracks)["l1"].item() < 0.02


def test_paper_preset_parameter_count():
    cfg = VAEConfig(image_encoder="random")  # the paper's architecture, built without weights
    with torch.device("meta"):
        model = TrackVAE(cfg, pretrained=False)
    groups = vae.vae_parameter_groups(model)
    assert abs(sum(groups.values()) - 339.2e6) / 339.2e6 < 0.03
    assert abs(groups["image encoder"] - 86.6e6) / 86.6e6 < 0.01
    assert abs(groups["encoder"] - 131.0e6) / 131.0e6 < 0.03


# ---------------------------------------------------------------------------------------------------- helpers

def test_schedules_at_chosen_steps():
    cfg = VAEConfig(lr=1e-4, warmup_steps=300, max_steps=1000, decay_frac=0.2, batch_start=64, batch_end=256,
                    batch_ramp_steps=100)
    assert lr_at(0, cfg) == pytest.approx(1e-4 / 300)
    assert lr_at(299, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg) == pytest.approx(1e-4)
    assert lr_at(900, cfg) == pytest.approx(0.5e-4)
    assert lr_at(999, cfg) == pytest.approx(1e-4 / 200)
    assert [global_batch_at(s, cfg) for s in (0, 50, 75, 100, 5000)] == [64, 128, 192, 256, 256]
    assert vae.accumulation_steps(75, dataclasses.replace(cfg, micro_batch=16), world=4) == 3
    with pytest.raises(ValueError, match="micro_batch"):
        vae.accumulation_steps(0, dataclasses.replace(cfg, micro_batch=48), world=1)


def test_step_sampler_same_samples_for_any_world_size():
    cfg = VAEConfig(max_steps=3, batch_start=8, batch_end=16, batch_ramp_steps=2, micro_batch=2)  # 8, 8, 16

    def per_step(world):
        samplers = [iter(vae.StepSampler(cfg, r, world, 0, 0)) for r in range(world)]
        steps = []
        for s in range(3):
            n_acc = vae.accumulation_steps(s, cfg, world)
            steps.append(sorted(i for it in samplers for _ in range(n_acc) for i in next(it)))
        return steps

    assert per_step(1) == per_step(2) == per_step(4) == [list(range(8)), list(range(8, 16)), list(range(16, 32))]


def test_parse_config_presets_types_and_unknown_flags():
    cfg = parse_config(VAEConfig, PRESETS, ["--preset", "tiny", "--max_steps=7", "--dry-run", "--lr", "0.5"])
    assert (cfg.max_steps, cfg.dry_run, cfg.lr, cfg.dim) == (7, True, 0.5, PRESETS["tiny"]["dim"])
    assert parse_config(VAEConfig, PRESETS, ["--preset=paper"]).dim == 768
    for bad in (["--no_such_flag=1"], ["--max_steps=seven"], ["--preset=huge"]):
        with pytest.raises(SystemExit):
            parse_config(VAEConfig, PRESETS, bad)


def test_checkpoint_round_trip_and_bad_files(tmp_path, micro_vae):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"kind": "vae", "model": micro_vae.state_dict(),
                           "config": dataclasses.asdict(micro_vae.cfg)})
    loaded = load_vae(path)
    for (name, a), b in zip(micro_vae.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    save_checkpoint(path, {"kind": "planner", "model": {}, "config": {}})
    with pytest.raises(ValueError, match="expected a 'vae' checkpoint"):
        load_vae(path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_vae(str(tmp_path / "junk.pt"))
    other = dataclasses.asdict(micro_config(dim=64))
    save_checkpoint(path, {"kind": "vae", "model": micro_vae.state_dict(), "config": other})
    with pytest.raises(ValueError, match="do not fit"):
        load_vae(path)
    with pytest.raises(ValueError, match="no such"):
        load_vae(str(tmp_path / "missing.pt"))


def micro_flags(**overrides):
    cfg = dataclasses.asdict(micro_config(**overrides))
    return [f"--{k}={v}" for k, v in cfg.items() if k not in ("preset",)]


def test_non_square_clips_through_the_loader_and_model(tmp_path):
    from data import TrackDataset, make_synthetic_clip, save_clip
    for i in range(2):
        clip = make_synthetic_clip(seed=i, T=8, H=48, W=80, n_tracks=64)
        save_clip(str(tmp_path / f"{i}.npz"), clip["video"], clip["tracks"], clip["visibility"], clip["text"])
    cfg = micro_config()
    data = TrackDataset(str(tmp_path), "val", n_frames=8, n_enc=4, n_dec=4, image_size=28)
    batch = torch.utils.data.default_collate([data[0], data[1]])
    assert batch["tracks"].shape == (2, 8, 8, 2) and batch["image"].shape == (2, 3, 28, 28)
    out = TrackVAE(cfg)(batch["image"], batch["tracks"], batch["visible"])
    assert out["pred"].shape == batch["tracks"].shape and torch.isfinite(out["loss"])


def test_torchrun_two_processes_train_and_only_rank0_writes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "vae.py",
           *micro_flags(), "--max_steps=3", "--batch_start=4", "--batch_end=4", "--micro_batch=2", "--log_every=1",
           "--val_every=3", "--val_clips=2", "--ckpt_every=3", "--device=cpu", f"--out_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out / "log.txt").read_text().splitlines()
    assert [line.split()[1] for line in log if line.startswith("step ")] == ["1/3", "2/3", "3/3"]  # once each
    assert sorted(os.listdir(out)) == ["ckpt.pt", "config.json", "log.txt", "val.png"]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["sample"] == 12


def test_resume_continues_the_same_run(tmp_path):
    flags = micro_flags() + ["--batch_start=2", "--batch_end=2", "--micro_batch=2", "--warmup_steps=1",
                             "--decay_frac=0", "--val_every=1000", "--log_every=1", "--device=cpu"]
    vae.main(flags + ["--max_steps=4", f"--out_dir={tmp_path / 'straight'}"])
    vae.main(flags + ["--max_steps=2", f"--out_dir={tmp_path / 'split'}"])
    vae.main(flags + ["--max_steps=4", f"--out_dir={tmp_path / 'split'}", "--resume"])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("straight", "split"))
    assert b["step"] == 4 and b["sample"] == a["sample"] == 8
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert "resumed" in (tmp_path / "split" / "log.txt").read_text()
