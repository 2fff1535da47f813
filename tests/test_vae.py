"""Tests of vae.py: the blocks against their formulas, the track VAE's structural promises (point-wise decoding, the
loss, the KL term and the reparameterisation), its loaders (round trip, EMA weights, bad files, fingerprints) and
the paper preset's parameter count."""
import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import trainer
import vae
from conftest import micro_vae_config, moved_off_zero, save_model
from trainer import SampleRandom
from vae import Attention, Block, PointEmbed, RMSNorm, RoPE, SwiGLU, TrackVAE, apply_rope


def differs(a, b, by=1e-3):
    return (a - b).abs().max().item() > by


# ---------------------------------------------------------------------------------------------------- blocks

@pytest.mark.parametrize("n_axes", [1, 2, 3])
def test_rope_scores_depend_only_on_position_differences(n_axes):
    torch.manual_seed(0)
    rope = RoPE(head_dim=32, heads=2, ranges=[(1, 40 * math.pi)] * n_axes)
    q, k = torch.randn(2, 1, 1, 2, 32).unbind(0)             # [B, S, heads, head_dim]
    pq, pk, shift = torch.rand(3, 1, 1, n_axes) * 2 - 1

    def score(a, b):
        return (apply_rope(q, rope(a)) * apply_rope(k, rope(b))).sum(-1)

    assert_close(score(pq, pk), score(pq + shift, pk + shift), atol=1e-4, rtol=0)
    assert differs(score(pq, pk), score(pq, pk + 0.05))      # ... and the rotation is not the identity
    assert_close(apply_rope(q, rope(pq)).norm(dim=-1), q.norm(dim=-1))   # a rotation keeps the norm


def test_rope_tables_interleave_geometric_frequencies_over_heads_and_leave_the_tail_unrotated():
    rope = RoPE(head_dim=64, heads=12, ranges=((1, 10 * math.pi), (1, 40 * math.pi), (1, 40 * math.pi)))
    assert rope.freqs.shape == (3, 12, 8) and rope.freqs.requires_grad          # per axis, head: 64 / 8 frequencies
    for axis, top in enumerate((10 * math.pi, 40 * math.pi, 40 * math.pi)):
        ladder = torch.exp(torch.linspace(0, math.log(top), 12 * 8 + 1)[:-1])   # 1 <= f < top, geometric
        assert_close(rope.freqs[axis], ladder.view(8, 12).T)                     # head h: entries h, h + 12, ...
    one_axis = RoPE(head_dim=64, heads=12, ranges=((1e-3, 1.0),), learn=False)   # the text layers' 1-D table
    assert one_axis.freqs.shape == (1, 12, 16) and not one_axis.freqs.requires_grad
    x, pos = torch.randn(1, 3, 12, 64), torch.rand(1, 3, 3) * 2 - 1
    angle = rope(pos)                                                             # [B, S, heads, 24]: t, then y, x
    assert angle.shape == (1, 3, 12, 24)
    assert_close(angle[0, 1, 5, 8:16], pos[0, 1, 1] * rope.freqs[1, 5])          # head 5's y angles
    turned = apply_rope(x, angle)
    assert torch.equal(turned[..., 48:], x[..., 48:])                             # dims 48..63 pass unchanged
    a, b = x[..., :24], x[..., 24:48]                                             # pairs (i, i + 24) rotate
    assert_close(turned[..., :24], a * angle.cos() - b * angle.sin())
    assert_close(turned[..., 24:48], b * angle.cos() + a * angle.sin())


def test_rmsnorm_formula_and_zero_initialised_adaptive_scale():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(8))
    assert_close(norm(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight)
    ada, cond = RMSNorm(8, cond_dim=3), torch.randn(2, 3)
    assert ada.weight is None and ada.cond.bias is None                          # the release's AdaRMSNorm
    assert_close(ada(x, cond), RMSNorm(8)(x))                                     # zero-init: a plain RMSNorm
    with torch.no_grad():
        ada.cond.weight.normal_()
    assert_close(ada(x, cond), RMSNorm(8)(x) * (1 + cond @ ada.cond.weight.T)[:, None])


def test_swiglu_formula_gate_second_and_parameter_count():
    torch.manual_seed(0)
    ffn = SwiGLU(8, ffn_mult=3)
    assert sum(p.numel() for p in ffn.parameters()) == 9 * 8 * 8
    x = torch.randn(4, 8)
    assert torch.equal(ffn(x), torch.zeros(4, 8))                                 # W3 starts at zero
    with torch.no_grad():
        ffn.w3.weight.normal_()
    a, gate = ffn.w12.weight[:24], ffn.w12.weight[24:]
    assert_close(ffn(x), ((x @ a.T) * F.silu(x @ gate.T)) @ ffn.w3.weight.T)


def heads(x, n):   # [B, S, d] -> [B, S, n, d / n]
    return x.unflatten(-1, (n, -1))


def test_attention_is_cosine_similarity_with_a_learned_temperature_rope_context_norm_mask_and_extra_keys():
    torch.manual_seed(0)
    attn = moved_off_zero(Attention(dim=16, head_dim=8, kv_dim=6, rope=((1, 3.0),)))
    x, ctx, px, pc = torch.randn(2, 3, 16), torch.randn(2, 5, 6), torch.rand(2, 3, 1), torch.rand(2, 5, 1)
    extra = torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8)          # [B, heads, 2 keys, head_dim]
    mask = torch.tensor([True, False, True, True, False, True, False]).view(1, 1, 1, 7)   # 2 extra + 5 keys

    def unit(t, module):   # cosine normalisation, then sqrt(temperature) per head ([B, S, heads, head_dim])
        return t / torch.sqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6) * module.scale.sqrt()[:, None]
    out = attn(x, px, ctx, pc, mask=mask, extra_kv=extra)
    c = ctx / torch.sqrt(ctx.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.ctx_norm.weight
    k, v = (heads(t, 2) for t in attn.kv(c).chunk(2, -1))
    q, k = apply_rope(unit(heads(attn.q(x), 2), attn), attn.rope(px)), apply_rope(unit(k, attn), attn.rope(pc))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))                  # -> [B, heads, S, head_dim]
    k, v = torch.cat([extra[0], k], 2), torch.cat([extra[1], v], 2)
    scores = q @ k.transpose(-1, -2) + torch.where(mask, 0.0, -torch.inf)       # no 1 / sqrt(d): the temperature
    assert_close(out, attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 3, 16)))
    # self-attention: one q | k | v projection, the queries' own keys at their own positions, no context norm
    attn_self = moved_off_zero(Attention(dim=16, head_dim=8, rope=((1, 3.0),)))
    assert not hasattr(attn_self, "ctx_norm") and attn_self.qkv.weight.shape == (48, 16)   # the release's layout
    qs, ks, vs = (heads(t, 2) for t in attn_self.qkv(x).chunk(3, -1))
    qs, ks = (apply_rope(unit(t, attn_self), attn_self.rope(px)).transpose(1, 2) for t in (qs, ks))
    expect = (qs @ ks.transpose(-1, -2)).softmax(-1) @ vs.transpose(1, 2)
    assert_close(attn_self(x, px), attn_self.out(expect.transpose(1, 2).reshape(2, 3, 16)))
    k_lat, v_lat = attn_self.keys_values(x, px)                       # the independent decoder's cached latents
    assert_close(k_lat, ks) and assert_close(v_lat, vs.transpose(1, 2))


def test_block_is_pre_norm_residual_self_cross_ffn_and_shares_context_over_folded_rows():
    torch.manual_seed(0)
    rope = ((1, 3.0), (1, 5.0), (1, 5.0))
    block = moved_off_zero(Block(dim=16, head_dim=8, ctx_dim=6, rope=rope))
    x, ctx, pos, cpos = torch.randn(2, 3, 16), torch.randn(2, 5, 6), torch.rand(2, 3, 3), torch.rand(2, 5, 3)
    h = x + block.self_attn(block.norm1(x), pos)
    h = h + block.cross_attn(block.norm2(h), pos, ctx, cpos)
    assert_close(block(x, pos, ctx, cpos), h + block.ffn(block.norm3(h)))
    # the release's count per layer: self 4d^2 + norm + temperatures + RoPE table; cross 2d^2 + 2 d ctx + norm + the
    # context's norm + temperatures + table; SwiGLU 9d^2 + norm
    table = 3 * 2 * (8 // 8)
    assert sum(p.numel() for p in block.parameters()) == (4 * 256 + 16 + 2 + table) + (2 * 256 + 2 * 16 * 6 + 16 + 6 + 2
                                                                                         + table) + (9 * 256 + 16)
    # the decoder's rows: 3 rows per batch element attend to their element's context, as if each had its own copy
    rows, rpos = torch.randn(6, 4, 16), torch.rand(6, 4, 3)
    copies = block(rows, rpos, ctx.repeat_interleave(3, 0), cpos.repeat_interleave(3, 0))
    assert_close(block(rows, rpos, ctx, cpos), copies)
    assert Block(16, 8, 6, rope=rope, cross_rope=False).cross_attn.rope is None   # the LIBERO planner's


def test_point_embed_is_random_fourier_features_per_coordinate_then_residual_mlp():
    torch.manual_seed(0)
    emb = PointEmbed(2, dim=14, max_freq=4.0, n_blocks=0)
    assert emb.coeffs.shape == (3,) and "coeffs" in emb.state_dict()            # 14 // (2 * 2) frequencies, saved
    c, (y, x) = emb.coeffs, (0.3, -0.7)
    expect = torch.cat([(y * c).sin(), (y * c).cos(), (x * c).sin(), (x * c).cos(), torch.zeros(2)])   # zero-padded
    assert_close(emb(torch.tensor([[y, x]])), expect[None])
    mlp = moved_off_zero(PointEmbed(2, dim=14, max_freq=4.0, n_blocks=2))
    features, out = mlp.coeffs.new_zeros(1, 14), mlp(torch.tensor([[y, x]]))
    features[:, :12] = torch.stack([(y * mlp.coeffs).sin(), (y * mlp.coeffs).cos(), (x * mlp.coeffs).sin(),
                                    (x * mlp.coeffs).cos()]).reshape(1, 12)
    for block in mlp.blocks:
        features = features + block(features)
    assert_close(out, features)
    big = PointEmbed(2, dim=768)   # the release's track embedding: std 40 pi / 1.96 (95% below 40 pi)
    assert 0.8 < big.coeffs.std().item() / (40 * math.pi / 1.96) < 1.2


# ---------------------------------------------------------------------------------------------------- the VAE

@pytest.fixture(scope="module")
def micro_vae():
    torch.manual_seed(0)
    return TrackVAE(micro_vae_config(), pretrained=False).eval()


def inputs(B=2, N=8, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 28, 28, generator=g), torch.rand(B, N, T, 2, generator=g) * 2 - 1


@pytest.mark.parametrize("position_content", [True, False])
def test_a_point_decoded_alone_equals_the_point_among_others(position_content):
    torch.manual_seed(1)
    model = TrackVAE(micro_vae_config(position_content=position_content), pretrained=False).eval()
    image, z = torch.randn(1, 3, 28, 28), torch.randn(1, model.n_latents, 4)
    queries = torch.rand(1, 101, 2) * 2 - 1
    together = model.decode(z, image, queries)
    assert together.shape == (1, 101, 8, 2)
    assert_close(model.decode(z, image, queries[:, :1]), together[:, :1], atol=1e-5, rtol=0)
    perm = torch.randperm(101)
    assert_close(model.decode(z, image, queries[:, perm]), together[:, perm], atol=1e-5, rtol=0)
    assert_close(model.decode(z, image, queries, chunk=7), together, atol=1e-5, rtol=0)


def test_dense_decode_equals_pointwise_decode(micro_vae):
    image, z = torch.randn(1, 3, 28, 28), torch.randn(1, 16, 4)
    dense = micro_vae.decode_dense(z, image, height=4, width=6, chunk=5)
    assert dense.shape == (1, 4, 6, 8, 2)
    # pixel (row r, col c) of a 4 x 6 frame in unit coordinates: (2 c / 5 - 1, 2 r / 3 - 1)
    points = torch.tensor([[[2 * c / 5 - 1, 2 * r / 3 - 1] for r in range(4) for c in range(6)]])
    assert_close(dense.reshape(1, 24, 8, 2), micro_vae.decode(z, image, points), atol=1e-5, rtol=0)


def test_latent_layout_and_temporal_slots():
    torch.manual_seed(0)
    seq = TrackVAE(micro_vae_config(latent_layout="sequence"), pretrained=False)
    assert torch.count_nonzero(seq.latent_pos) == 0
    slots = TrackVAE(micro_vae_config(temporal_slots=2), pretrained=False)
    assert slots.n_latents == 2 * 16 and sorted(set(slots.latent_pos[:, 0].tolist())) == [-0.5, 0.5]
    image, tracks = inputs(1, 3)
    mean, logvar = slots.encode(image, tracks)
    assert mean.shape == logvar.shape == (1, 32, 4)
    assert slots.decode(mean, image, tracks[:, :, 0]).shape == (1, 3, 8, 2)


def test_predicted_offsets_start_at_the_query_point():
    torch.manual_seed(0)
    model = TrackVAE(micro_vae_config(predict_offsets=True), pretrained=False).eval()
    with torch.no_grad():
        model.to_xy[-1].weight.zero_(), model.to_xy[-1].bias.zero_()
    image, start = torch.randn(1, 3, 28, 28), torch.rand(1, 5, 2) * 2 - 1
    assert torch.equal(model.decode(torch.randn(1, 16, 4), image, start), start.unsqueeze(2).expand(1, 5, 8, 2))


@pytest.mark.parametrize("recon_loss, formula", [
    ("l1", lambda d: d.abs()),
    ("l2", lambda d: d.pow(2)),
    ("huber", lambda d: torch.where(d.abs() < 1, 0.5 * d.pow(2), d.abs() - 0.5)),
])
def test_the_loss_is_the_reconstruction_term_plus_beta_kl(recon_loss, formula):
    torch.manual_seed(0)
    model = TrackVAE(micro_vae_config(recon_loss=recon_loss, kl_weight=0.25), pretrained=False).eval()
    image, tracks = inputs()
    tracks = tracks * 1.5                                  # some errors beyond huber's 1
    out = model(image, tracks)
    d = out["pred"] - tracks
    assert_close(out["loss"], formula(d).mean() + 0.25 * out["kl"])
    assert_close(out["l1"], d.abs().mean())


def test_kl_is_the_closed_form_against_the_standard_normal_summed_per_sample_and_averaged():
    torch.manual_seed(0)
    model = TrackVAE(micro_vae_config(), pretrained=False).eval()
    g = torch.Generator().manual_seed(3)
    mu, logvar = torch.randn(2, 16, 4, generator=g), torch.rand(2, 16, 4, generator=g) * 4 - 2
    mu[1] *= 3                                             # the samples differ: the batch mean is not a sum
    model.to_moments.register_forward_hook(lambda module, args, out: torch.cat([mu, logvar], -1))
    out = model(*inputs())
    assert_close(out["kl"], 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum((1, 2)).mean())
    assert_close(model.encode(*inputs())[1], logvar)
    # and it is zero at the prior
    mu.zero_(), logvar.zero_()
    assert model(*inputs())["kl"].item() == 0.0


def test_train_mode_samples_the_posterior_by_reparameterisation():
    """z = mean + eps exp(logvar / 2), eps drawn from the batch's SampleRandom; eval mode decodes the mean."""
    torch.manual_seed(0)
    model = moved_off_zero(TrackVAE(micro_vae_config(), pretrained=False))   # (zero-initialised outputs ignore z)
    g = torch.Generator().manual_seed(3)
    mu, logvar = torch.randn(2, 16, 4, generator=g), torch.rand(2, 16, 4, generator=g) * 2 - 1
    model.to_moments.register_forward_hook(lambda module, args, out: torch.cat([mu, logvar], -1))
    decoded = []
    model.latent_proj.register_forward_pre_hook(lambda module, args: decoded.append(args[0].detach().clone()))
    image, tracks = inputs()
    train = model.train()(image, tracks, rng=SampleRandom([5, 9], seed=0))
    eps = SampleRandom([5, 9], seed=0).randn(16, 4)      # (track dropout off: the posterior noise is the first draw)
    assert_close(decoded[-1], mu + eps * (0.5 * logvar).exp())
    assert_close(model(image, tracks, rng=SampleRandom([5, 9], seed=0))["loss"], train["loss"], rtol=0, atol=0)
    assert differs(model(image, tracks, rng=SampleRandom([6, 9], seed=0))["loss"], train["loss"], 1e-6)
    evaluated = model.eval()(image, tracks)
    assert_close(decoded[-1], mu, rtol=0, atol=0)
    # as logvar goes to -inf, the train-mode loss becomes the eval-mode loss
    logvar.fill_(-1e9)
    collapsed = model.train()(image, tracks, rng=SampleRandom([5, 9], seed=0))
    assert_close(collapsed["loss"], model.eval()(image, tracks)["loss"], atol=1e-6, rtol=0)
    assert differs(evaluated["pred"], train["pred"], 1e-4)     # (the noise did move the reconstruction)


def test_encode_offsets_feeds_each_token_its_displacement():
    model = TrackVAE(micro_vae_config(encode_offsets=True), pretrained=False).eval()
    seen = {}
    model.point_embed.register_forward_hook(lambda module, args, out: seen.update(coords=args[0]))
    image, tracks = inputs(2, 3)
    model.encode(image, tracks)
    assert seen["coords"].shape == (2, 3, 8, 4)
    yx = tracks.flip(-1)                                                  # embedded as (y, x), as the release ...
    assert torch.equal(seen["coords"][..., :2], yx)
    assert torch.equal(seen["coords"][..., 2:], yx - yx[:, :, :1])        # ... and (y - y0, x - x0)


def test_the_occlusion_mask_removes_points_from_the_loss():
    torch.manual_seed(0)
    model = TrackVAE(micro_vae_config(mask_occluded=True), pretrained=False).eval()
    image, tracks = inputs(1)
    visible = torch.ones(1, 8, 8, dtype=torch.bool)
    visible[0, 6:, 3:] = False
    moved = tracks.clone()
    moved[0, 6:, 3:] += 0.5
    # moving the occluded targets changes nothing when they are masked ...
    assert_close(model(image, moved, visible)["l1"], model(image, tracks, visible)["l1"])
    # ... and does change the loss of the default model
    model.cfg = dataclasses.replace(model.cfg, mask_occluded=False)
    assert differs(model(image, moved, visible)["l1"], model(image, tracks, visible)["l1"])


def test_the_micro_model_overfits_one_batch():
    torch.manual_seed(0)
    model = TrackVAE(micro_vae_config(dim=48, n_enc=8, n_dec=0), pretrained=False)
    image = torch.randn(2, 3, 28, 28)
    t = torch.linspace(0, 1, 8).view(1, 1, 8, 1)
    start, velocity = torch.rand(2, 8, 1, 2) * 1.6 - 0.8, torch.rand(2, 8, 1, 2) * 0.4 - 0.2
    tracks = start + t * velocity + 0.05 * torch.sin(6 * t) * velocity.flip(-1)
    static = (tracks - tracks[:, :, :1]).abs().mean().item()      # the error of predicting no motion
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    for step in range(300):
        out = model(image, tracks)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        if out["l1"].item() < 0.15 * static:
            break
    assert model.eval()(image, tracks)["l1"].item() < 0.3 * static


def test_the_paper_preset_has_the_release_parameter_count(capsys):
    with torch.device("meta"):   # the Table F model, built without memory
        counts = vae.main(["--preset=paper", "--dry-run"])
    assert "total parameters: 339161698" in capsys.readouterr().out                 # the release's, to the parameter
    assert counts == {"encoder": 131012672, "decoder": 121565474, "image encoder": 86583552}


# ---------------------------------------------------------------------------------------------------- loaders

def test_load_vae_round_trips_and_prefers_the_ema_weights(tmp_path, micro_vae):
    loaded = vae.load_vae(save_model(tmp_path / "ckpt.pt", "vae", micro_vae))
    assert loaded.cfg == micro_vae.cfg and not loaded.training
    for name, tensor in micro_vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.fingerprint == vae.fingerprint(micro_vae)
    averaged = {k: v + 1 if v.is_floating_point() else v for k, v in micro_vae.state_dict().items()}
    loaded = vae.load_vae(save_model(tmp_path / "ema.pt", "vae", micro_vae, ema={"model": averaged}))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in averaged.items())


def test_load_vae_names_what_is_wrong_with_a_file(tmp_path, micro_vae):
    missing = tmp_path / "run" / "ckpt.pt"
    with pytest.raises(ValueError, match=re.escape(f"no such checkpoint; make it with: python3 vae.py --out_dir "
                                                   f"{tmp_path / 'run'}")):
        vae.load_vae(str(missing))
    with pytest.raises(ValueError, match="make it with: python3 vae.py --preset tiny_robot"):
        vae.load_vae(str(missing), make="python3 vae.py --preset tiny_robot")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable checkpoint"):
        vae.load_vae(str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match="expected a 'vae' checkpoint, got 'planner'"):
        vae.load_vae(save_model(tmp_path / "planner.pt", "planner", micro_vae))
    bare = str(tmp_path / "bare.pt")
    trainer.save_checkpoint(bare, {"kind": "vae", "config": dataclasses.asdict(micro_vae.cfg), "step": 3})
    with pytest.raises(ValueError, match="a 'vae' checkpoint without its weights"):
        vae.load_vae(bare)
    other = str(tmp_path / "other.pt")   # a field this config does not know: another stage's or version's checkpoint
    trainer.save_checkpoint(other, {"kind": "vae", "config": dict(dataclasses.asdict(micro_vae.cfg), max_pokes=4),
                                    "model": micro_vae.state_dict(), "step": 3})
    with pytest.raises(ValueError, match=r"other.pt: config has fields \['max_pokes'\] that VAEConfig does not know"):
        vae.load_vae(other)
    other = TrackVAE(micro_vae_config(dim=64), pretrained=False)
    trainer.save_checkpoint(bare, {"kind": "vae", "model": micro_vae.state_dict(), "config": dataclasses.asdict(other.cfg)})
    with pytest.raises(ValueError, match="weights do not fit the config"):
        vae.load_vae(bare)
    trainer.save_checkpoint(bare, {"kind": "vae", "model": micro_vae.state_dict(),
                                   "config": dict(dataclasses.asdict(micro_vae.cfg), max_pokes=16)})
    with pytest.raises(ValueError, match=r"config has fields \['max_pokes'\]"):
        vae.load_vae(bare)


def test_the_fingerprint_tells_models_apart_and_check_pair_refuses_another(micro_vae):
    same = TrackVAE(micro_vae.cfg, pretrained=False)
    same.load_state_dict(micro_vae.state_dict())
    assert vae.fingerprint(same) == vae.fingerprint(micro_vae)
    retuned = TrackVAE(dataclasses.replace(micro_vae.cfg, kl_weight=1e-6), pretrained=False)
    retuned.load_state_dict(micro_vae.state_dict())
    with torch.no_grad():
        nudged = next(same.parameters())
        nudged.view(-1)[0] = torch.nextafter(nudged.view(-1)[0], torch.tensor(math.inf))   # one bit of one weight
    prints = {vae.fingerprint(m) for m in (micro_vae, same, retuned)}
    assert len(prints) == 3 and all(len(p) == 16 for p in prints)
    same.fingerprint = vae.fingerprint(same)
    vae.check_pair(same, same.fingerprint, "VAE", "a.pt")
    with pytest.raises(ValueError, match=f"a.pt: not the VAE .*{same.fingerprint}.*{vae.fingerprint(micro_vae)}"):
        vae.check_pair(same, vae.fingerprint(micro_vae), "VAE", "a.pt")
