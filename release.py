"""The authors' released ZipMo (code: CompVis/long-term-motion; weights: CompVis/ZipMo on the Hugging Face Hub) in our
stages: one key map from their state dicts onto the paper presets, which compute the same functions.

    vae.load_vae, planner.load_pair, policy.load_policy("release:NAME")   # NAME: a key of FILES; or a .safetensors path
    python3 sample.py --planner release:zipmo_planner_sparse --image photo.jpg --poke 120,200,180,150
A planner or policy-head file holds its own copies of the VAE and DINOv2: the planner's VAE is "release:<planner>"."""
import os, re

import torch

HUB = "CompVis/ZipMo"
FILES = {"zipmo_vae": "zipmo_vae.safetensors", **{f"zipmo_planner_{k}": f"zipmo_planner_{k}.safetensors" for k in (
    "sparse", "dense", "libero_atm", "libero_tramoe")}, "zipmo_policy_head_atm": "policy_heads/atm_libero.safetensors",
    **{f"zipmo_policy_head_tramoe_{s}": f"policy_heads/tramoe_libero_{s}.safetensors" for s in ("10", "goal", "object",
                                                                                            "spatial")}}
SHIFT, VARIANCE = -0.175, 11.6   # the planners' latent normalisation (z + 0.175) sqrt(0.5 / 11.6): not in their files
SUBS = {   # their key -> ours: regular-expression substitutions applied in order (as sed -e ... -e ...)
    # DINOv2: their minimal ViT -> transformers' Dinov2WithRegistersModel
    r"^img_embedder\.model\.": "image_encoder.net.",
    r"net\.(cls_token|register_tokens|mask_token)$": r"net.embeddings.\1",
    r"net\.pos_embed$": "net.embeddings.position_embeddings",
    r"net\.patch_embed\.proj\.": "net.embeddings.patch_embeddings.projection.",
    r"net\.blocks\.(\d+)\.ls(\d)\.gamma": r"net.blocks.\1.layer_scale\2.lambda1",
    r"net\.blocks\.(\d+)\.attn\.proj\.": r"net.blocks.\1.attention.o_proj.",
    r"net\.blocks\.(\d+)\.attn\.qkv\.": r"net.blocks.\1.attention.qkv_", r"net\.blocks\.": "net.encoder.layer.",
    r"net\.norm\.": "net.layernorm.",
    # each model's own modules: the VAE's, the planners', the policy head's
    r"^(en|de)coder\.backbone\.": r"\1coder.", r"^encoder\.trajs_in\.": "point_embed.",
    r"^encoder\.query_token": "latent_queries", r"^encoder\.reg_token": "register",
    r"^encoder\.to_(mean|logvar)\.": r"to_moments.\1_", r"^decoder\.latents_in\.": "latent_proj.",
    r"^decoder\.decode_token": "query_token", r"^decoder\.trajs_out\.": "to_xy.",
    r"^backbone\.": "blocks.", r"^track_cond_emb\.": "poke_embed.", r"^start_t_mapping\.": "timestep_embed.",
    r"^text_encoder\.": "text_layers.", r"^time_emb\.weight": "time_embed.freq",
    r"^time_in_proj\.": "time_embed.in_proj.", r"^mapping\.": "time_embed.", r"^in_proj\.proj\.": "latent_in.",
    r"^in_proj\.cond_proj\.": "image_proj.", r"^out_proj\.proj\.": "latent_out.", r"^learnable_emb_dino": "image_embed",
    r"^learnable_emb_grid_tokens": "view_embed", r"^ca_mask_token": "null_token",
    r"^policy_net\.": "blocks.", r"^policy_in_proj\.proj\.": "query_proj.", r"^policy_out_proj\.proj\.": "action_out.",
    r"^track_embedder\.": "latent_in.", r"^proprio_embedder\.": "proprio_in.", r"^learned_action_queries": "queries",
    r"^learnable_modality_emb": "modality_embed",
    # inside the layers and MLPs: norms, projections, the per-module RoPE tables
    r"\.mlp\.(\d+)\.": r".blocks.\1.", r"blocks\.(\d+)\.norm\.": r"blocks.\1.0.",
    r"blocks\.(\d+)\.up_proj\.": r"blocks.\1.1.w12.", r"blocks\.(\d+)\.down_proj\.": r"blocks.\1.1.w3.",
    r"self_attn\.norm\.": "norm1.", r"cross_attn\.norm\.": "norm2.", r"ff\.norm\.": "norm3.",
    r"(norm\d)\.linear\.": r"\1.cond.", r"norm_cross\.": "ctx_norm.", r"(norm\d?|ctx_norm|\.0)\.scale$": r"\1.weight",
    r"\.(q|kv|out)_proj\.": r".\1.", r"ff\.up_proj\.": "ffn.w12.", r"ff\.down_proj\.": "ffn.w3.", r"pos_emb\.": "rope.",
    r"qkv_proj\.": "qkv.", r"^text_layers\.(\d+)\.self_attn\.": r"text_layers.\1.attn.",
    r"^text_layers\.(\d+)\.norm3\.": r"text_layers.\1.norm2."}
DROPPED = r"(encoder\.(reg_pos|query_pos|pos_cross)|decoder\.pos_cross)"   # their position buffers: ours computes them

def is_release(source):
    return str(source).startswith("release:") or str(source).endswith(".safetensors")

def read(source):
    """'release:NAME' (from the Hub, or its local cache) or a local .safetensors file -> its state dict."""
    from safetensors.torch import load_file
    path = source = str(source)
    if source.startswith("release:"):
        name = source.split(":", 1)[1]
        if name not in FILES:
            raise ValueError(f"{source}: unknown release file; expected release: and one of {', '.join(FILES)}")
        try:
            from huggingface_hub import hf_hub_download
            path = hf_hub_download(HUB, FILES[name])
        except Exception as e:   # offline, a missing cache, a proxy: hf_hub_download raises many kinds
            raise ValueError(f"{source}: cannot fetch {FILES[name]} from the Hugging Face Hub repository {HUB} ("
                             f"{type(e).__name__}); download it where there is network and give its local path instead "
                             f"(e.g. /data/{os.path.basename(FILES[name])})") from None
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file (a release .safetensors file, or release:NAME: {', '.join(FILES)})")
    try:
        return load_file(path)
    except Exception as e:   # safetensors raises its own error kinds for a damaged file
        raise ValueError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {str(e)[:200]})") from None

def part(state, prefix, exclude=()):   # the keys under prefix (none under exclude), prefix stripped
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.startswith(exclude)}

def convert(state, model, source, what, device):
    """Their state dict -> `model` (loaded, on device, eval, with .fingerprint): renamed by SUBS, DINOv2's q|k|v split,
    t and (y, x) RoPE tables stacked, to_mean | to_logvar concatenated, (y, x) outputs flipped, one-token shapes."""
    from vae import fingerprint
    out, target = {}, model.state_dict()
    for key, value in state.items():
        if not re.fullmatch(DROPPED, key):
            for pattern, repl in SUBS.items():
                key = re.sub(pattern, repl, key)
            out[key] = value
    for key in [k for k in out if "attention.qkv_" in k]:   # DINOv2: [q | k | v] with biases
        out.update(zip([key.replace("qkv_", f"{n}_proj.") for n in "qkv"], out.pop(key).chunk(3)))
    for key in [k for k in out if k.endswith("rope.t_freqs")]:
        out[key[:-7] + "freqs"] = torch.cat([out.pop(key)[None], out.pop(key[:-7] + "yx_freqs")])
    for key in [k for k in out if k.startswith("to_moments.mean_")]:
        out[key.replace("mean_", "")] = torch.cat([out.pop(key), out.pop(key.replace("mean_", "logvar_"))])
    out.update({k: v.flip(0) for k, v in out.items() if k.startswith("to_xy.5.")})   # their decoder writes (y, x)
    if "attention.q_proj.weight" not in " ".join(target):   # transformers 4.x names DINOv2's attention otherwise
        names = dict(q_proj="attention.query", k_proj="attention.key", v_proj="attention.value", o_proj="output.dense")
        out = {re.sub(r"attention\.([qkvo]_proj)", lambda m: "attention." + names[m[1]], k): v for k, v in out.items()}
    if getattr(model, "poke_embed", 1) is None:   # their LIBERO planners carry an unused poke embedding
        out = {k: v for k, v in out.items() if not k.startswith("poke_embed.")}
    out = {k: v.reshape(target[k].shape) if k in target and v.numel() == target[k].numel() else v
           for k, v in out.items()}
    missing, unexpected = sorted(set(target) - set(out)), sorted(set(out) - set(target))
    bad = [k for k in sorted(set(out) & set(target)) if out[k].shape != target[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{source}: not the release's {what} at these sizes (missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, other shapes {bad[:4]})")
    model.load_state_dict(out)
    model.fingerprint = fingerprint(model)
    return model.to(device).eval()

def load_vae(source, device="cpu", state=None, **overrides):
    """A TrackVAE (paper preset + overrides) from their VAE file, or the VAE inside a planner or policy-head file."""
    from vae import PRESETS, TrackVAE, VAEConfig
    state = read(source) if state is None else state
    prefix = next((p for p in ("", "vae.", "track_predictor.vae.") if p + "encoder.query_token" in state), None)
    if prefix is None:
        raise ValueError(f"{source}: holds no release VAE (no encoder.query_token, vae.* or track_predictor.vae.*)")
    model = TrackVAE(VAEConfig(**{**PRESETS["paper"], **overrides}), pretrained=False)
    return convert(part(state, prefix), model, source, "VAE", device)

def load_planner(source, device="cpu", state=None, vae_overrides=(), **overrides):
    """A MotionPlanner from their sparse / dense / LIBERO planner file (or a policy-head file's): paper or libero preset
    (+ overrides), their latent normalisation, 40 poke slots if *dense*, TraMoE's timestep token; cfg.vae = source."""
    from planner import PRESETS, MotionPlanner, PlannerConfig
    state = read(source) if state is None else state
    prefix = "track_predictor." if "track_predictor.backbone.0.ff.up_proj.weight" in state else ""
    if prefix + "backbone.0.ff.up_proj.weight" not in state:
        raise ValueError(f"{source}: holds no release planner (no backbone.* or track_predictor.backbone.*)")
    libero = prefix + "text_encoder.0.ff.up_proj.weight" in state
    preset = {**PRESETS["libero" if libero else "paper"], "max_pokes": 40 if "dense" in str(source) else 16,
              "timestep_scale": float(prefix + "start_t_mapping.coeffs" in state), **overrides}
    vae = load_vae(source, device, state, **dict(vae_overrides))
    model = MotionPlanner(PlannerConfig(**{**preset, "vae": str(source), "vae_fingerprint": vae.fingerprint}),
                          pretrained=False)
    buffers = dict(latent_shift=torch.tensor(SHIFT), latent_scale=torch.tensor((0.5 / VARIANCE) ** 0.5))
    return convert({**part(state, prefix, prefix + "vae."), **buffers}, model, source, "planner", device)

def load_head(source, device="cpu", state=None, planner=None, **overrides):
    """A PolicyHead (paper preset + overrides) from their policy-head file, raw actions (mean 0, std 1), reading the
    planner's normalised latents; cfg.planner names the file itself, whose LIBERO planner it was trained on."""
    from policy import PRESETS, PolicyConfig, PolicyHead
    state = read(source) if state is None else state
    if "learned_action_queries" not in state:
        raise ValueError(f"{source}: holds no release policy head (no learned_action_queries)")
    planner = planner or load_planner(source, device, state)
    cfg = PolicyConfig(**{**PRESETS["paper"], "planner": str(source), "planner_fingerprint": planner.fingerprint,
                          "latent_tokens": planner.n_views * planner.n_latents, "grid_size": planner.cfg.grid_size,
                          "latent_channels": planner.cfg.latent_channels, **overrides})
    head = PolicyHead(cfg)
    buffers = dict(latent_shift=planner.latent_shift, latent_scale=planner.latent_scale, action_mean=head.action_mean,
                   action_std=head.action_std)
    return convert({**part(state, "", "track_predictor."), **buffers}, head, source, "policy head", device)
