"""Original (CompVis / Stability AI) single-file checkpoints <-> diffusers layout, through latentdiff.convert.

The original layouts are proven independently: tiny diffusers models are written in the original layout
by our tables, and diffusers' own single-file loaders must read them back into the same weights.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
import types
import warnings

import diffusers
import pytest
import torch
from diffusers.loaders import single_file_utils as su
from safetensors.torch import save_file

from latentdiff.convert import (
    SHIPPED_CONFIGS,
    Drop,
    Keep,
    Nest,
    Rename,
    Reshape,
    Split,
    apply_keymap,
    infer_configs,
    invert,
    load_original_config,
    original_config_to_configs,
    read_single_file,
    split_single_file,
    to_single_file,
    write_single_file,
)
from latentdiff.convert.infer import ldm_betas, schedule_from_betas
from latentdiff.convert.layout import SEPARATOR
from latentdiff.convert.original_config import layout_from_original_config
from latentdiff.convert.unet_ldm import ema_name
from latentdiff.errors import CheckpointError
from tests._support.convert import parts_of, same_tensors, seeded, tiny_ldm, vae
from tests._support.parity import assert_parity
from tests._support.tiny_clip import random_clip_text_model, tiny_clip_config

warnings.filterwarnings("ignore", category=FutureWarning)
SD_UNET = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=64, attention_head_dim=8,
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=8)
SD2_UNET = {**SD_UNET, "block_out_channels": (64, 64, 128, 128), "attention_head_dim": [1, 1, 2, 2],
            "use_linear_projection": True}
UNET_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
             "up_block_types", "attention_head_dim", "cross_attention_dim", "use_linear_projection",
             "transformer_layers_per_block", "num_class_embeds", "mid_block_type")
VAE_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
            "up_block_types", "latent_channels", "num_vq_embeddings", "vq_embed_dim")


def clip(*, layers=2, act="quick_gelu"):
    return random_clip_text_model(tiny_clip_config(hidden_size=64, num_attention_heads=1, num_hidden_layers=layers,
                                                   hidden_act=act))


def normalized(value):
    return list(value) if isinstance(value, (list, tuple)) else value


@pytest.fixture(scope="module")
def sd1():
    """A tiny SD 1.x: UNet (SD's block indexing: 12 input / 12 output blocks), KL-f8 VAE, CLIP text."""
    models = dict(unet=seeded(lambda: diffusers.UNet2DConditionModel(**SD_UNET)), vae=vae(),
                  text_encoder=clip())
    return models, to_single_file(parts_of(**models))


@pytest.fixture(scope="module")
def sd2():
    """A tiny SD 2.x: linear projections, 64-wide heads, OpenCLIP with 24 blocks (the text model uses 23)."""
    full = clip(layers=24, act="gelu")
    models = dict(unet=seeded(lambda: diffusers.UNet2DConditionModel(**SD2_UNET)), vae=vae(), text_encoder=full)
    state = to_single_file(parts_of(**models))
    torch.manual_seed(1)
    state["cond_stage_model.model.text_projection"] = torch.randn(64, 64)
    state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    truncated = clip(layers=23, act="gelu")
    truncated.load_state_dict({k: v for k, v in full.state_dict().items() if "layers.23." not in k})
    return dict(models, text_encoder=truncated), state


# ---- the key-map engine --------------------------------------------------------------------------------------
def test_keymap_rules_run_both_ways():
    table = (Rename("a.{i}.w", "b.{i}.weight"), Reshape("c.w", "c.weight", ndim=(4, 2)),
             Split("qkv", into=("q", "k", "v")), Nest("blk.{n}.", "block.{n}.", (Keep("x.{p:weight|bias}"),)),
             Drop("buf"))
    state = {"a.0.w": torch.randn(2), "a.11.w": torch.randn(3), "c.w": torch.randn(4, 4, 1, 1),
             "qkv": torch.randn(6, 2), "blk.3.x.bias": torch.randn(1), "buf": torch.randn(1)}
    dropped = {}
    out = apply_keymap(state, table, source="t", dropped=dropped)
    assert sorted(out) == ["b.0.weight", "b.11.weight", "block.3.x.bias", "c.weight", "k", "q", "v"]
    assert out["c.weight"].shape == (4, 4) and torch.equal(out["k"], state["qkv"][2:4])
    assert out["b.0.weight"] is state["a.0.w"] and list(dropped) == ["buf"]
    back = apply_keymap(out, invert(table), source="t")
    same_tensors(back, {k: v for k, v in state.items() if k != "buf"})


def test_keymap_reports_every_unmatched_key_and_incomplete_merges():
    table = (Rename("a.{p}", "b.{p}"),)
    with pytest.raises(CheckpointError) as err:
        apply_keymap({"a.w": torch.ones(1), "x.w": torch.ones(1), "y.0.w": torch.ones(1)}, table, source="file.ckpt")
    assert "x.w" in str(err.value) and "y.0.w" in str(err.value) and "file.ckpt" in str(err.value)
    merge = invert((Split("qkv", into=("q", "k", "v")),))
    with pytest.raises(CheckpointError, match="incomplete"):
        apply_keymap({"q": torch.ones(1), "k": torch.ones(1)}, merge, source="t")
    with pytest.raises(CheckpointError, match="clashing"):
        apply_keymap({"a.w": torch.ones(1), "b.w": torch.ones(1)}, (Rename("a.w", "c"), Rename("b.w", "c")), source="t")
    with pytest.raises(ValueError, match="same placeholders"):
        Rename("a.{i}", "b")


def test_per_head_split_matches_ldm_legacy_attention():
    """LDM's QKVAttentionLegacy reads q, k, v of head h from rows [3 ch h, 3 ch h + ch) ... of qkv."""
    heads, ch, width = 4, 3, 12
    qkv = torch.randn(3 * width, width, 1)
    q, k, v = Split("qkv", into=("q", "k", "v"), heads=heads, ndim=(3, 2)).transform("qkv", qkv)
    rows = qkv[:, :, 0].reshape(heads, 3 * ch, width)  # the legacy reshape(bs * heads, 3 ch, T)
    for i, piece in enumerate((q, k, v)):
        assert torch.equal(piece, rows[:, i * ch:(i + 1) * ch].reshape(width, width))
    merged = invert((Split("qkv", into=("q", "k", "v"), heads=heads, ndim=(3, 2)),))
    assert torch.equal(apply_keymap({"q": q, "k": k, "v": v}, merged, source="t")["qkv"], qkv)


# ---- the original layout, proven by diffusers' own single-file loaders -----------------------------------------
def pipeline_folder(path, models):
    for name, m in models.items():
        m.save_pretrained(path / name)
    diffusers.DDIMScheduler().save_pretrained(path / "scheduler")
    from tests._support.tiny_clip import write_tiny_clip_tokenizer
    write_tiny_clip_tokenizer(path / "tokenizer")
    entries = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
               "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
               "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
               "feature_extractor": [None, None], "image_encoder": [None, None]}
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "requires_safety_checker": False, **entries}))
    return path


@pytest.mark.parametrize("variant", ["sd1", "inpaint", "class"])
def test_stable_diffusion_file_loads_in_diffusers(tmp_path, sd1, variant):
    models, state = sd1
    if variant != "sd1":
        extra = {"in_channels": 9} if variant == "inpaint" else {"num_class_embeds": 10}
        models = dict(models, unet=seeded(lambda: diffusers.UNet2DConditionModel(**SD_UNET, **extra)))
        state = to_single_file(parts_of(**models))
    save_file(state, tmp_path / "sd.safetensors")
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(tmp_path / "sd.safetensors"), config=str(pipeline_folder(tmp_path / "cfg", models)),
        local_files_only=True, safety_checker=None)
    for name, model in models.items():
        same_tensors(getattr(pipe, name).state_dict(), model.state_dict())
    # every original tensor was consumed by diffusers' converters (no key of ours is unknown to them)
    used = {id(v) for v in su.convert_ldm_unet_checkpoint(state, dict(models["unet"].config)).values()}
    assert used == {id(v) for k, v in state.items() if k.startswith("model.diffusion_model.")}


def test_sd2_openclip_file_matches_diffusers(tmp_path, sd2):
    models, state = sd2
    save_file(state, tmp_path / "sd2.safetensors")
    folder = tmp_path / "cfg"
    models["text_encoder"].save_pretrained(folder / "text_encoder")
    models["unet"].save_pretrained(folder / "unet")
    unet = diffusers.UNet2DConditionModel.from_single_file(str(tmp_path / "sd2.safetensors"), config=str(folder),
                                                           subfolder="unet", local_files_only=True)
    same_tensors(unet.state_dict(), models["unet"].state_dict())
    from transformers import CLIPTextModel
    text = su.create_diffusers_clip_model_from_ldm(CLIPTextModel, state, config=str(folder), subfolder="text_encoder",
                                                   local_files_only=True)
    parts = split_single_file(state)
    same_tensors(text.state_dict(), models["text_encoder"].state_dict())
    same_tensors(parts["text_encoder"][1], text.state_dict())
    assert parts["text_encoder"][0]["num_hidden_layers"] == 23
    assert sorted(parts["extras"][1]) == sorted(k for k in state if "resblocks.23." in k or k.endswith(
        ("text_projection", "logit_scale")))
    # a file converted from a diffusers folder holds only the 23 blocks used (and no projection)
    used_only = to_single_file({"text_encoder": parts["text_encoder"], "unet": parts["unet"]})
    assert "cond_stage_model.model.transformer.resblocks.22.ln_1.weight" in used_only
    assert infer_configs(used_only)["text_encoder"]["num_hidden_layers"] == 23


@pytest.mark.parametrize("levels", [3, 4])  # f4, f8
def test_standalone_vae_file_loads_in_diffusers(tmp_path, levels):
    model = vae(levels)
    state = to_single_file(parts_of(vae=model))
    assert "encoder.mid.attn_1.q.weight" in state and state["encoder.mid.attn_1.q.weight"].ndim == 4
    save_file(state, tmp_path / "vae.safetensors")
    model.save_pretrained(tmp_path / "cfg")
    loaded = diffusers.AutoencoderKL.from_single_file(str(tmp_path / "vae.safetensors"), config=str(tmp_path / "cfg"),
                                                      local_files_only=True)
    same_tensors(loaded.state_dict(), model.state_dict())
    configs = infer_configs(state)
    assert configs["family"] == "vae"
    for key in VAE_KEYS:
        assert normalized(configs["vae"].get(key)) == normalized(model.config.get(key)), key


def test_vq_first_stage_matches_diffusers_converter():
    model = vae(3, diffusers.VQModel, latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3)
    state = to_single_file(parts_of(vqvae=model))
    ref = su.convert_ldm_vae_checkpoint(state, dict(model.config))  # encoder/decoder/quant convs, not the codebook
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("quantize.")}
    assert ref.keys() == ours.keys() and all(torch.equal(ref[k], ours[k]) for k in ours)
    assert torch.equal(state["quantize.embedding.weight"], model.quantize.embedding.weight)
    configs = infer_configs(state)
    assert configs["family"] == "vqvae"
    for key in VAE_KEYS:
        assert normalized(configs["vqvae"].get(key)) == normalized(model.config.get(key)), key
    loaded = diffusers.VQModel.from_config(configs["vqvae"])
    loaded.load_state_dict(split_single_file(state)["vqvae"][1], strict=True)


# ---- shape inference -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["sd1", "sd2", "inpaint", "class"])
def test_inference_recovers_the_diffusers_config(sd1, sd2, variant):
    models, state = sd2 if variant == "sd2" else sd1
    if variant in ("inpaint", "class"):
        extra = {"in_channels": 9} if variant == "inpaint" else {"num_class_embeds": 10}
        models = dict(models, unet=seeded(lambda: diffusers.UNet2DConditionModel(**SD_UNET, **extra)))
        state = to_single_file(parts_of(**models))
    configs = infer_configs(state)
    assert configs["family"] == {"inpaint": "sd-inpaint", "class": "sd1"}.get(variant, variant)
    source = models["unet"].config
    for key in UNET_KEYS:
        assert normalized(configs["unet"].get(key)) == normalized(source.get(key)), key
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                "vocab_size", "max_position_embeddings"):
        assert configs["text_encoder"][key] == getattr(models["text_encoder"].config, key), key
    parts = split_single_file(state)
    unet = diffusers.UNet2DConditionModel.from_config(configs["unet"])
    unet.load_state_dict(parts["unet"][1], strict=True)
    x, t = torch.randn(1, source.in_channels, 8, 8), torch.tensor([10])
    kw = {"class_labels": torch.tensor([3])} if variant == "class" else {}
    context = torch.randn(1, 5, 64)
    with torch.no_grad():
        assert_parity(unet(x, t, context, **kw).sample, models["unet"](x, t, context, **kw).sample)


def test_prediction_type_conventions(sd1, sd2):
    assert infer_configs(sd1[1])["scheduler"]["prediction_type"] == "epsilon"
    assert infer_configs(sd2[1])["scheduler"]["prediction_type"] == "v_prediction"
    assert infer_configs(sd2[1], global_step=875000)["scheduler"]["prediction_type"] == "epsilon"
    assert infer_configs(sd2[1], prediction_type="epsilon")["scheduler"]["prediction_type"] == "epsilon"
    assert infer_configs(sd2[1])["unet"]["sample_size"] == 96


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear"])
def test_schedule_recovered_from_the_betas_buffer(schedule):
    ref = diffusers.DDIMScheduler(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012)
    found = schedule_from_betas(ref.betas)
    assert found["beta_schedule"] == schedule and found["trained_betas"] is None
    rebuilt = diffusers.DDIMScheduler(**{k: v for k, v in found.items() if k != "trained_betas"})
    assert torch.allclose(rebuilt.betas, ref.betas, rtol=1e-6)
    odd = schedule_from_betas(torch.rand(50).sort().values * 0.02)
    assert odd["trained_betas"] is not None and len(odd["trained_betas"]) == 50


# ---- EMA, round trips, self-describing files ----------------------------------------------------------------------
def test_ema_weights_are_chosen_by_default(sd1):
    _, state = sd1
    unet_keys = [k for k in state if k.startswith("model.diffusion_model.")]
    with_ema = dict(state, **{ema_name(k): state[k] + 1 for k in unet_keys},
                    **{"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)})
    assert ema_name("model.diffusion_model.input_blocks.10.0.in_layers.0.weight") == \
        "model_ema.diffusion_modelinput_blocks100in_layers0weight"
    ema = split_single_file(with_ema)
    live = split_single_file(with_ema, use_ema=False)
    for key, value in live["unet"][1].items():
        assert torch.equal(ema["unet"][1][key], value + 1), key
    assert sorted(ema["extras"][1]) == ["model_ema.decay", "model_ema.num_updates"]
    stray = dict(with_ema, **{"model_ema.diffusion_modelnot_a_key": torch.ones(1)})
    with pytest.raises(CheckpointError, match="not_a_key"):
        split_single_file(stray)


@pytest.mark.parametrize("fmt", [".safetensors", ".ckpt"])
def test_round_trip_is_bit_exact(tmp_path, sd1, sd2, fmt):
    for name, (_, state) in (("sd1", sd1), ("sd2", sd2)):
        original = {k: (v.half() if i % 3 == 0 else v) for i, (k, v) in enumerate(state.items())}
        original["betas"] = ldm_betas(0.00085, 0.012, 1000).float()
        original["alphas_cumprod"] = torch.cumprod(1 - original["betas"].double(), 0).float()
        if name == "sd1":
            original["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        path = tmp_path / f"{name}{fmt}"
        if fmt == ".ckpt":
            torch.save({"state_dict": original, "global_step": 10, "epoch": 1}, path)
        else:
            save_file(original, path)
        parts = read_single_file(path)
        assert parts["scheduler"][0]["beta_schedule"] == "scaled_linear"
        same_tensors(to_single_file(parts), original)


def test_self_describing_file_round_trips_without_inference(tmp_path, sd2):
    _, state = sd2
    parts = split_single_file(state, prediction_type="epsilon")
    path = write_single_file(tmp_path / "model.safetensors", parts, metadata={"note": "tiny"})
    again = read_single_file(path)
    assert again.keys() == parts.keys()
    for name in parts:
        assert json.loads(json.dumps(again[name][0])) == json.loads(json.dumps(parts[name][0])), name
        same_tensors(again[name][1], parts[name][1])
    same_tensors(to_single_file(again), state)


@pytest.mark.parametrize("cond", ["ldmbert", "class"])
def test_ldm_text_and_class_conditioning_round_trip(sd1, cond):
    """LDM text-to-image (LDMBert, stored as 2 entries per layer) and class-conditional (ClassEmbedder) stages."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    models, _ = sd1
    if cond == "ldmbert":
        stage = seeded(lambda: LDMBertModel(LDMBertConfig(encoder_layers=2, d_model=64, encoder_ffn_dim=96,
                                                          encoder_attention_heads=1, head_dim=64, vocab_size=50)))
        part = ("text_encoder", stage.config.to_dict(), stage.state_dict())
    else:
        table = torch.randn(11, 64)
        part = ("class_embedder", {"_class_name": "ClassEmbedder", "num_classes": 11, "embed_dim": 64},
                {"embedding.weight": table})
    parts = dict(parts_of(unet=models["unet"], vae=models["vae"]), **{part[0]: part[1:]})
    state = to_single_file(parts)
    probe = {"ldmbert": "cond_stage_model.transformer.attn_layers.layers.3.1.net.2.weight",
             "class": "cond_stage_model.embedding.weight"}[cond]
    assert probe in state
    again = split_single_file(state)
    assert again["extras"][0]["family"] == "ldm"
    same_tensors(again[part[0]][1], part[2])
    for key, value in part[1].items():
        if key in ("d_model", "encoder_layers", "encoder_ffn_dim", "encoder_attention_heads", "head_dim",
                   "vocab_size", "max_position_embeddings", "num_classes", "embed_dim"):
            assert again[part[0]][0][key] == value, key
    if cond == "class":  # cin256-v2's convention: one head
        assert again["unet"][0]["attention_head_dim"] == 1
    same_tensors(to_single_file(again), state)


def test_clip_saved_without_text_model_prefix(sd1):
    models, state = sd1
    old = {k.replace("transformer.text_model.", "transformer."): v for k, v in state.items()}
    parts = split_single_file(old)
    same_tensors(parts["text_encoder"][1], models["text_encoder"].state_dict())
    assert to_single_file(parts).keys() == state.keys()  # written back in the usual (text_model.) form
    legacy = dict(parts, text_encoder=(parts["text_encoder"][0],  # transformers 4's names are accepted too
                                       {"text_model." + k: v for k, v in parts["text_encoder"][1].items()}))
    same_tensors(to_single_file(legacy), state)


# ---- LDM: AttentionBlock UNets need the head count; a YAML supplies it -----------------------------------------------
def test_ldm_attention_block_needs_the_yaml_and_converts_exactly():
    unet, vq, yaml = tiny_ldm()
    # the config the YAML describes writes the same file as the diffusers models' own configs
    configs = original_config_to_configs(yaml)
    state = to_single_file({"unet": (configs["unet"], unet.state_dict()), "vqvae": (configs["vqvae"], vq.state_dict())})
    same_tensors(state, to_single_file(parts_of(unet=unet, vqvae=vq)))
    with pytest.raises(CheckpointError, match="original_config"):
        split_single_file(state)
    parts = split_single_file(state, original_config=yaml)
    loaded = diffusers.UNet2DModel.from_config(parts["unet"][0])
    loaded.load_state_dict(parts["unet"][1], strict=True)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([5])
    with torch.no_grad():
        assert_parity(loaded(x, t).sample, unet(x, t).sample)
        # the original tensors compute what diffusers' attention computes (LDM's legacy QKV attention)
        h = torch.randn(1, 64, 2, 2)
        assert_parity(ldm_attention_block(state, "model.diffusion_model.middle_block.1.", h, heads=8),
                      unet.mid_block.attentions[0](h))
    same_tensors(to_single_file(parts), state)


def ldm_attention_block(state, prefix, x, *, heads):
    """CompVis openaimodel.AttentionBlock with QKVAttentionLegacy, written from the paper code's equations."""
    b, c, hh, ww = x.shape
    flat = torch.nn.functional.group_norm(x, 32, state[prefix + "norm.weight"], state[prefix + "norm.bias"], 1e-5)
    qkv = torch.nn.functional.conv1d(flat.reshape(b, c, -1), state[prefix + "qkv.weight"], state[prefix + "qkv.bias"])
    ch = c // heads
    q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
    scale = ch ** -0.25
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
    out = torch.nn.functional.conv1d(a, state[prefix + "proj_out.weight"], state[prefix + "proj_out.bias"])
    return x + out.reshape(b, c, hh, ww)


# ---- shipped YAMLs: against diffusers' YAML reader and full-size diffusers models (meta device) ---------------------
@pytest.mark.parametrize("name", ["v1-inference", "v1-inpainting-inference", "v2-inference", "v2-inference-v",
                                  "txt2img-1p4B-eval", "cin256-v2"])
def test_shipped_yaml_matches_diffusers_reader(name):
    original = load_original_config(name)
    ours = original_config_to_configs(name)
    ref = su.create_unet_diffusers_config_from_ldm(original, {}, image_size=512)
    for key, value in ref.items():
        if key != "sample_size":
            assert normalized(ours["unet"].get(key)) == normalized(value), key
    if "vae" in ours:
        ref = su.create_vae_diffusers_config_from_ldm(original, {}, image_size=512)
        for key, value in ref.items():
            if key != "sample_size":
                assert normalized(ours["vae"].get(key)) == normalized(value), key
    expected = {"v2-inference-v": "v_prediction"}.get(name, "epsilon")
    assert ours["scheduler"]["prediction_type"] == expected


def meta_model(part, config):
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    with torch.device("meta"):
        if part == "text_encoder_2":  # SDXL's bigG
            return CLIPTextModelWithProjection(CLIPTextConfig(**config))
        if part == "text_encoder":
            if config["model_type"] == "ldmbert":
                return LDMBertModel(LDMBertConfig(**config))
            return CLIPTextModel(CLIPTextConfig(**config))
        if part == "class_embedder":
            return torch.nn.ModuleDict({"embedding": torch.nn.Embedding(config["num_classes"], config["embed_dim"])})
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        if isinstance(config.get("attention_head_dim"), list) and "UNet2DModel" in str(part):
            config["attention_head_dim"] = config["attention_head_dim"][0]  # widths do not change shapes
        return getattr(diffusers, "UNet2DModel" if "UNet2DModel" in str(part) else
                       {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "vqvae": "VQModel"}[part]
                       ).from_config(config)


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_shipped_yaml_tables_cover_full_size_models(name):
    """Every tensor of the full-size model the YAML describes maps to an original key and back."""
    layout = layout_from_original_config(name)
    flat, models = {}, {}
    for part, config in layout.configs().items():
        if part != "scheduler":
            kind = part if config.get("_class_name") != "UNet2DModel" else "UNet2DModel"
            models[part] = meta_model(kind, config)
            flat.update({part + SEPARATOR + k: v for k, v in models[part].state_dict().items()})
    original = apply_keymap(flat, invert(layout.keymap()), source=name)
    assert apply_keymap(original, layout.keymap(), source=name).keys() == flat.keys()
    if name.startswith("v"):  # SD: the same keys diffusers' converters read
        yaml = load_original_config(name)
        unet_config = su.create_unet_diffusers_config_from_ldm(yaml, {}, image_size=512)
        ref = su.convert_ldm_unet_checkpoint(original, unet_config)
        assert ref.keys() == models["unet"].state_dict().keys()
        text = su.convert_ldm_clip_checkpoint(original) if layout.cond_stage.kind == "clip" else \
            su.convert_open_clip_checkpoint(models["text_encoder"], original)
        assert {k.removeprefix("text_model.") for k in text} == set(models["text_encoder"].state_dict())


# ---- bad files ---------------------------------------------------------------------------------------------------
def test_unknown_keys_are_all_listed(sd1):
    _, state = sd1
    bad = dict(state, **{"model.diffusion_model.lora_up.weight": torch.ones(1), "cond_stage_model.extra": torch.ones(1),
                         "something_else": torch.ones(1)})
    with pytest.raises(CheckpointError) as err:
        split_single_file(bad, source="bad.ckpt")
    for key in ("lora_up", "cond_stage_model.extra", "something_else", "bad.ckpt"):
        assert key in str(err.value)


class Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_runs_nothing(tmp_path, legacy):
    marker, path = tmp_path / "pwned", tmp_path / "evil.ckpt"
    payload = {"state_dict": {"x": torch.ones(1)}, "boom": Exploit(marker)}
    if legacy:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError) as err:
        read_single_file(path)
    assert str(path) in str(err.value) and not marker.exists()


def test_lightning_checkpoint_with_callback_class_key(tmp_path, sd2):
    """Old Lightning keyed callback states by the class; it is read by name, pytorch_lightning never imported."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    modules = {n: types.ModuleType(n) for n in names}
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    modules[names[-1]].ModelCheckpoint = cls
    sys.modules.update(modules)
    try:
        torch.save({"state_dict": sd2[1], "global_step": 875000, "callbacks": {cls: {"best_model_path": "x"}}},
                   tmp_path / "pl.ckpt")
    finally:
        for n in names:
            sys.modules.pop(n)
    parts = read_single_file(tmp_path / "pl.ckpt")
    assert parts["scheduler"][0]["prediction_type"] == "epsilon"  # global_step 875000: SD 2.0-base
    assert "pytorch_lightning" not in sys.modules


def test_truncated_and_foreign_files_name_the_file(tmp_path, sd1):
    _, state = sd1
    save_file({k: v for k, v in list(state.items())[:20]}, tmp_path / "ok.safetensors")
    torch.save({"state_dict": dict(list(state.items())[:20])}, tmp_path / "ok.ckpt")
    cases = {"cut.safetensors": (tmp_path / "ok.safetensors").read_bytes()[:-100],
             "cut.ckpt": (tmp_path / "ok.ckpt").read_bytes()[:-100],
             "notes.ckpt": b"just some text, not a checkpoint\n", "noise.safetensors": os.urandom(64)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as err:
            read_single_file(tmp_path / name)
        assert str(tmp_path / name) in str(err.value), name
    with pytest.raises(CheckpointError, match="not found"):
        read_single_file(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {"a": torch.ones(1)}, "x": 1}, tmp_path / "tiny.ckpt")
    with pytest.raises(CheckpointError, match="not a latent-diffusion checkpoint"):
        read_single_file(tmp_path / "tiny.ckpt")


# ---- LSUN churches (LDM-KL-8): scale-shift norms, ResBlock up/downsampling, 8 heads at every level -----------------
def churches_yaml(unet_params):
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0155, "image_size": 8,
        "unet_config": {"params": unet_params},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3,
                                         "out_ch": 3, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                                         "attn_resolutions": []}}},
        "cond_stage_config": "__is_unconditional__"}}}


TINY_CHURCHES_UNET = {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
                      "attention_resolutions": [1, 2], "num_res_blocks": 1, "channel_mult": [1, 2, 2], "num_heads": 2,
                      "use_scale_shift_norm": True, "resblock_updown": True}


def test_churches_yaml_builds_a_unet2d_with_the_original_keys():
    """The shipped YAML's full-size UNet2D (meta device) has exactly the tensors the convert tables map to and from
    the original layout; spot checks of original shapes that follow from openaimodel's constructor."""
    from latentdiff.models.unet2d import UNet2D

    layout = layout_from_original_config("lsun_churches-ldm-kl-8")
    config = UNet2D.from_file_config(layout.configs()["unet"])
    assert config.time_scale_shift and config.downsample_type == config.upsample_type == "resnet"
    assert config.attention_head_dim == (24, 48, 48, 96, 96)  # 8 heads at every level
    with torch.device("meta"):
        ours = UNet2D(config)
    flat = {"unet" + SEPARATOR + k: v for k, v in ours.state_dict().items()}
    unet_keymap = tuple(r for r in layout.keymap() if "unet" in repr(r))
    original = apply_keymap(flat, invert(unet_keymap), source="churches")
    back = apply_keymap(original, unet_keymap, source="churches")
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in flat.items()}
    o = {k.removeprefix("model.diffusion_model."): tuple(v.shape) for k, v in original.items()}
    assert o["input_blocks.1.0.emb_layers.1.weight"] == (2 * 192, 4 * 192)  # scale and shift
    assert o["input_blocks.3.0.in_layers.0.weight"] == (192,)  # level 0's downsampler is a ResBlock
    assert "input_blocks.3.0.op.weight" not in o and "output_blocks.2.2.in_layers.0.weight" not in o
    assert o["output_blocks.2.1.out_layers.3.weight"] == (768, 768, 3, 3)  # last level (no attention): res, res-up
    assert o["middle_block.1.norm.weight"] == (768,) and o["middle_block.1.qkv.weight"] == (3 * 768, 768, 1)
    assert o["output_blocks.11.2.emb_layers.1.weight"] == (2 * 384, 4 * 192)  # level 1's upsampling ResBlock
    assert "output_blocks.14.1.qkv.weight" in o and not any(k.startswith("output_blocks.14.2.") for k in o)


def ldm_resblock(state, prefix, x, emb, *, resample=None):
    """CompVis openaimodel.ResBlock(use_scale_shift_norm=True, up/down), written from the paper code's equations."""
    def gn(h, name):
        return torch.nn.functional.group_norm(h, 32, state[prefix + name + ".weight"], state[prefix + name + ".bias"],
                                              1e-5)

    def conv(h, name):
        return torch.nn.functional.conv2d(h, state[prefix + name + ".weight"], state[prefix + name + ".bias"],
                                          padding=1)

    h = torch.nn.functional.silu(gn(x, "in_layers.0"))
    if resample == "down":
        h, x = torch.nn.functional.avg_pool2d(h, 2, 2), torch.nn.functional.avg_pool2d(x, 2, 2)
    elif resample == "up":
        h, x = (torch.nn.functional.interpolate(v, scale_factor=2, mode="nearest") for v in (h, x))
    h = conv(h, "in_layers.2")
    emb_out = torch.nn.functional.linear(torch.nn.functional.silu(emb), state[prefix + "emb_layers.1.weight"],
                                         state[prefix + "emb_layers.1.bias"])[:, :, None, None]
    scale, shift = emb_out.chunk(2, dim=1)
    h = conv(torch.nn.functional.silu(gn(h, "out_layers.0") * (1 + scale) + shift), "out_layers.3")
    return x + h


def test_tiny_churches_file_loads_runs_and_round_trips(tmp_path):
    """A churches-like original file (written by the convert tables from a random UNet2D) loads with
    UNet2D.from_single_file and the YAML, computes what the original equations compute on its tensors, and writes
    back bit-exactly."""
    from safetensors.torch import load_file

    from latentdiff.models.unet2d import UNet2D
    from tests._support.parity import randomize_

    yaml = churches_yaml(TINY_CHURCHES_UNET)
    unet_config = original_config_to_configs(yaml)["unet"]
    torch.manual_seed(0)
    source = randomize_(UNet2D(UNet2D.from_file_config(unet_config))).eval()
    assert source.config.attention_head_dim == (16, 32, 32)
    state = to_single_file({"unet": (unet_config, source.state_dict())})
    save_file(state, tmp_path / "churches.safetensors")
    loaded = UNet2D.from_single_file(tmp_path / "churches.safetensors", original_config=yaml)
    assert loaded.config == source.config
    same_tensors(loaded.state_dict(), source.state_dict())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 900])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), source(x, t))
        # the original tensors, through openaimodel's equations, compute what our modules compute
        emb = torch.randn(2, 128)
        h = torch.randn(2, 32, 8, 8)
        assert_parity(ldm_resblock(state, "model.diffusion_model.input_blocks.2.0.", h, emb, resample="down"),
                      loaded.down_blocks[0].downsamplers[0](h, emb))
        h = torch.randn(2, 64, 2, 2)
        assert_parity(ldm_resblock(state, "model.diffusion_model.output_blocks.1.1.", h, emb, resample="up"),
                      loaded.up_blocks[0].upsamplers[0](h, emb))
        h = torch.randn(2, 64, 2, 2)
        assert_parity(ldm_attention_block(state, "model.diffusion_model.middle_block.1.", h, heads=2),
                      loaded.mid_block.attentions[0](h))
    loaded.save_single_file(tmp_path / "back.safetensors")
    back = load_file(tmp_path / "back.safetensors")
    same_tensors({k: v for k, v in back.items() if k in state}, state)
    assert set(back) == set(state)
