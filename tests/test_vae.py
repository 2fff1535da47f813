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
from conftest import micro_vae_config, save_model
from trainer import SampleRandom
from vae import Attention, Block, PointEmbed, RMSNorm, RoPE, SwiGLU, TrackVAE, apply_rope


def differs(a, b, by=1e-3):
    return (a - b).abs().max().item() > by


# ---------------------------------------------------------------------------------------------------- blocks

@pytest.mark.parametrize("n_axes", [1, 2, 3])
def test_rope_scores_depend_only_on_position_differences(n_axes):
    torch.manual_seed(0)
    rope = RoPE(head_dim=24, max_freqs=[40 * math.pi] * n_axes)
    q, k = torch.randn(2, 1, 1, 1, 24).unbind(0)
    pq, pk, shift = torch.rand(3, 1, n_axes) * 2 - 1

    def score(a, b):
        return (apply_rope(q, rope(a)) * apply_rope(k, rope(b))).sum()

    assert_close(score(pq, pk), score(pq + shift, pk + shift), atol=1e-4, rtol=0)
    assert differs(score(pq, pk), score(pq, pk + 0.05))   # ... and the rotation is not the identity
    assert_close(apply_rope(q, rope(pq)).norm(), q.norm())   # a rotation keeps the norm


def test_rope_frequencies_are_geometric_per_axis_in_t_y_x_order():
    tops = (10 * math.pi, 40 * math.pi, 40 * math.pi)
    rope = RoPE(head_dim=64, max_freqs=tops)
    assert [int((rope.axis == a).sum()) for a in range(3)] == [11, 11, 10]
    for a, top in enumerate(tops):
        f = rope.freq[rope.axis == a]
        assert f[0].item() == pytest.approx(1.0) and f[-1].item() == pytest.approx(top, rel=1e-5)
        ratios = f[1:] / f[:-1]
        assert_close(ratios, ratios[0].expand_as(ratios))
    # a one-pixel step at 256 px (2/255 in unit coordinates) turns the fastest pair by about 0.5 rad
    assert 0.3 < rope.freq.max().item() * 2 / 255 < 1.0
    small = RoPE(head_dim=12, max_freqs=(1.0, 2.0, 3.0))      # 2 pairs per axis: t, then y, then x
    cos, _ = small(torch.tensor([[0.0, 0.0, 1.0]]))             # only x moves
    assert_close(cos[0, :4], torch.ones(4)) and differs(cos[0, 4:6], torch.ones(2))


def test_rmsnorm_formula_and_zero_initialised_adaptive_scale():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(8))
    assert_close(norm(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight)
    ada, cond = RMSNorm(8, cond_dim=3), torch.randn(2, 3)
    assert_close(ada(x, cond), RMSNorm(8)(x))                   # zero-init: starts as the plain RMSNorm
    with torch.no_grad():
        ada.cond.bias.fill_(1.0)
    assert_close(ada(x, cond), 2 * RMSNorm(8)(x))               # x (1 + Linear(cond))


def test_swiglu_formula_and_parameter_count():
    torch.manual_seed(0)
    ffn = SwiGLU(8, ffn_mult=3)
    assert sum(p.numel() for p in ffn.parameters()) == 9 * 8 * 8
    x = torch.randn(4, 8)
    w1, w2 = ffn.w12.weight[:24], ffn.w12.weight[24:]
    assert_close(ffn(x), (F.silu(x @ w1.T) * (x @ w2.T)) @ ffn.w3.weight.T)


def test_attention_matches_the_softmax_formula_with_mask_rope_and_extra_keys():
    torch.manual_seed(0)
    attn = Attention(dim=8, head_dim=4, kv_dim=6)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    rope_x, rope_c = RoPE(4, (3.0,))(torch.rand(2, 3, 1)), RoPE(4, (3.0,))(torch.rand(2, 5, 1))
    extra = torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 4)          # [B, heads, 2 keys, head_dim]
    mask = torch.tensor([True, False, True, True, False, True, False]).view(1, 1, 1, 7)   # 2 extra + 5 keys
    out = attn(x, rope_x, ctx, rope_c, mask=mask, extra_kv=extra)
    q = apply_rope(attn.split_heads(attn.q(x)), rope_x)
    k, v = (attn.split_heads(t) for t in attn.kv(ctx).chunk(2, -1))
    k, v = torch.cat([extra[0], apply_rope(k, rope_c)], 2), torch.cat([extra[1], v], 2)
    scores = (q @ k.transpose(-1, -2)) / 2.0 + torch.where(mask, 0.0, -torch.inf)
    assert_close(out, attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 3, 8)))
    # self-attention when there is no context: the queries' own keys at their own positions
    attn_self = Attention(dim=8, head_dim=4)
    qs = apply_rope(attn_self.split_heads(attn_self.q(x)), rope_x)
    ks, vs = (attn_self.split_heads(t) for t in attn_self.kv(x).chunk(2, -1))
    expect = ((qs @ apply_rope(ks, rope_x).transpose(-1, -2)) / 2.0).softmax(-1) @ vs
    assert_close(attn_self(x, rope_x), attn_self.out(expect.transpose(1, 2).reshape(2, 3, 8)))


def test_block_is_pre_norm_residual_self_cross_ffn_and_shares_context_over_folded_rows():
    torch.manual_seed(0)
    block = Block(dim=8, head_dim=4, ctx_dim=6)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    h = x + block.self_attn(block.norm1(x), None)
    h = h + block.cross_attn(block.norm2(h), None, ctx, None)
    assert_close(block(x, None, ctx, None), h + block.ffn(block.norm3(h)))
    # release parameter count per layer: self 4d^2, cross 2d^2 + 2 d ctx, SwiGLU 9d^2 (+ 3 norms)
    assert sum(p.numel() for p in block.parameters()) == 4 * 64 + 2 * 64 + 2 * 8 * 6 + 9 * 64 + 3 * 8
    # the decoder's rows: 3 rows per batch element attend to their element's context, as if each had its own copy
    rows, rope = torch.randn(6, 4, 8), RoPE(4, (3.0,))(torch.rand(6, 4, 1))
    ctx_rope = RoPE(4, (3.0,))(torch.rand(5, 1))
    copies = block(rows, rope, ctx.repeat_interleave(3, 0), ctx_rope)
    assert_close(block(rows, rope, ctx, ctx_rope), copies)


def test_point_embed_is_a_linear_map_of_fourier_features():
    emb = PointEmbed(2, dim=6, n_bands=3, max_freq=4.0, n_blocks=0)
    assert_close(emb.freq, torch.tensor([1.0, 2.0, 4.0]))
    angle = torch.tensor([0.3, 0.6, 1.2, -0.7, -1.4, -2.8])    # (x, y) = (0.3, -0.7) at 1, 2, 4 rad per unit
    assert_close(emb(torch.tensor([[0.3, -0.7]])), emb.proj(torch.cat([angle.sin(), angle.cos()])[None]))


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
    model = TrackVAE(micro_vae_config(), pretrained=False)
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
    # as logvar goes to -inf (clamped at -30), the train-mode loss becomes the eval-mode loss
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
    assert torch.equal(seen["coords"][..., :2], tracks)                      # (x, y) as before ...
    assert torch.equal(seen["coords"][..., 2:], tracks - tracks[:, :, :1])   # ... and (x - x0, y - y0)


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
    assert "total parameters: 339129634" in capsys.readouterr().out
    assert sum(counts.values()) == 339129634
    for part, release, tolerance in (("image encoder", 86.6e6, 0.01), ("encoder", 131.0e6, 0.03),
                                     (None, 339.2e6, 0.03)):
        n = counts[part] if part else sum(counts.values())
        assert abs(n - release) / release < tolerance, (part, n)


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
