"""Original LDM / Stable Diffusion inference YAMLs -> the same FileLayout (and diffusers config dicts).

The YAML structure is CompVis':

    model: {target: ...LatentDiffusion, params: {linear_start, linear_end, timesteps, parameterization,
            scale_factor, image_size, unet_config: {params: ...}, first_stage_config: {target, params},
            cond_stage_config: {target, params} | "__is_unconditional__"}}

(a stand-alone autoencoder YAML has the AutoencoderKL / VQModel as `model` itself). SDXL's YAMLs are
Stability AI's generative-models `DiffusionEngine` (`network_config`, `conditioner_config`, `first_stage_config`,
`denoiser_config`; `layout_from_sgm_config`); `sd_xl_base.yaml` and `sd_xl_refiner.yaml` are its
configs/inference files verbatim (generative-models has no inpainting YAML: SDXL inpainting files are the base's
layout with a 9-channel UNet, read from their tensors). The released
inference configs ship with latentdiff (`SHIPPED_CONFIGS`), so `original_config="v2-inference-v"` works
offline. Only the keys that shape the network or the schedule are read; training-only keys are ignored.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from .. import limits
from ..config import parse_yaml, yaml_problem
from ..errors import ConfigError
from .infer import scheduler_config
from .layout import SDXL_EMBEDDERS, Embedder, FileLayout, _family, with_conventions
from .sdxl_ldm import MICRO_CONDITIONING, SDXL_LATENT_SIZE, SDXL_VAE_SCALE, sdxl_scheduler_config, with_text_time
from .text_ldm import PROJECTION_ARCHITECTURES, TextArch, class_embedder_config, clip_config, ldmbert_config
from .unet_ldm import UNetArch
from .vae_ldm import VAEArch

SHIPPED_CONFIGS = ("v1-inference", "v1-inpainting-inference", "v2-inference", "v2-inference-v",
                   "celebahq-ldm-vq-4", "cin256-v2", "txt2img-1p4B-eval", "bsr_sr", "lsun_churches-ldm-kl-8",
                   "sd_xl_base", "sd_xl_refiner")
PARAMETERIZATION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
NO_CONDITIONING = ("__is_unconditional__", "__is_first_stage__", "torch.nn.Identity")
# The text towers SD's YAMLs name by default (their widths are not in the YAML).
CLIP_L14: dict[str, Any] = dict(vocab_size=49408, hidden_size=768, num_hidden_layers=12, intermediate_size=3072,
                                max_position_embeddings=77, hidden_act="quick_gelu")
OPENCLIP_H14: dict[str, Any] = dict(vocab_size=49408, hidden_size=1024, num_hidden_layers=24, intermediate_size=4096,
                                    max_position_embeddings=77, hidden_act="gelu", projection_dim=1024)
OPENCLIP_BIGG14: dict[str, Any] = dict(vocab_size=49408, hidden_size=1280, num_hidden_layers=32,
                                       intermediate_size=5120, max_position_embeddings=77, hidden_act="gelu",
                                       projection_dim=1280)
SGM_TEXT = ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2")   # SDXL's text embedders in generative-models
SGM_SCALINGS = {"EpsScaling": "epsilon", "VScaling": "v_prediction"}
BERT_VOCAB, BERT_HEADS, BERT_HEAD_WIDTH = 30522, 8, 64  # BERTEmbedder / x-transformers defaults


def shipped_config_path(name: str) -> Path:
    """The path of a YAML shipped with latentdiff (`name` without `.yaml`)."""
    if name not in SHIPPED_CONFIGS:
        raise ConfigError("no such shipped original config", where=name, expected=SHIPPED_CONFIGS)
    return Path(str(resources.files("latentdiff.convert") / "configs" / f"{name}.yaml"))


def load_original_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A YAML dict from a mapping, a path, or the name of a shipped config."""
    if isinstance(config, Mapping):
        return dict(config)
    import yaml  # pyyaml: only needed here

    path = shipped_config_path(str(config)) if str(config) in SHIPPED_CONFIGS else Path(config)
    try:
        data = parse_yaml(path.read_text(), where=str(path))
    except FileNotFoundError:
        raise ConfigError("original config not found", where=str(path),
                          expected=f"a YAML file or one of {SHIPPED_CONFIGS}") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"not a valid YAML file ({yaml_problem(e)})", where=str(path)) from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConfigError("not an LDM config: no `model:` section", where=str(path))
    return data


def _params(section: Any, where: str) -> dict[str, Any]:
    if not isinstance(section, Mapping):
        raise ConfigError("expected a mapping with `target` and `params`", where=where, found=section)
    return dict(section.get("params") or {})


def unet_from_original(p: Mapping[str, Any], *, image_size: int | None = None) -> UNetArch:
    """UNetArch from `unet_config.params` (openaimodel.UNetModel's arguments)."""
    where = "model.params.unet_config.params"
    if p.get("dims", 2) != 2 or not p.get("conv_resample", True) or p.get("disable_self_attentions"):
        raise ConfigError("unsupported UNet options", where=where,
                          found={k: p.get(k) for k in ("dims", "conv_resample", "disable_self_attentions")})
    _check_sizes(p, where, widths=("model_channels", "context_dim", "in_channels", "out_channels"),
                 counts={"num_res_blocks": limits.MAX_LAYERS_PER_LEVEL, "channel_mult": limits.MAX_CHANNELS,
                         "transformer_depth": limits.MAX_TRANSFORMER_DEPTH, "num_heads": limits.MAX_HEADS})
    channels = tuple(p["model_channels"] * m for m in p["channel_mult"])
    levels = len(channels)
    res_blocks = p["num_res_blocks"]
    layers = (res_blocks,) * levels if isinstance(res_blocks, int) else tuple(res_blocks)
    kind = "transformer" if p.get("use_spatial_transformer", False) else "self"
    attention = tuple(kind if 2 ** level in p["attention_resolutions"] else "none" for level in range(levels))
    num_heads, head_channels = p.get("num_heads", -1), p.get("num_head_channels", -1)
    if num_heads == -1 and head_channels == -1:
        raise ConfigError("either num_heads or num_head_channels must be set", where=where)
    heads = tuple(num_heads if head_channels == -1 else c // head_channels for c in channels)
    depth = p.get("transformer_depth", 1)
    context = p.get("context_dim")
    if isinstance(context, (list, tuple)):
        context = context[0]
    classes = p.get("num_classes")
    if classes is not None and classes != "sequential" and not isinstance(classes, int):
        raise ConfigError("unsupported num_classes", where=where, found=classes)
    return UNetArch(
        in_channels=p["in_channels"], out_channels=p["out_channels"], channels=channels, layers_per_level=layers,
        attention=attention, mid_attention=kind, heads=heads,
        transformer_depth=(depth,) * levels if isinstance(depth, int) else tuple(depth),
        cross_attention_dim=context if kind == "transformer" else None,
        use_linear_projection=bool(p.get("use_linear_in_transformer", False)),
        num_class_embeds=classes if isinstance(classes, int) else None,
        projection_class_embeddings_input_dim=p.get("adm_in_channels") if classes == "sequential" else None,
        resnet_time_scale_shift="scale_shift" if p.get("use_scale_shift_norm", False) else "default",
        resample="resnet" if p.get("resblock_updown", False) else "conv",
        legacy_qkv_order=not p.get("use_new_attention_order", False), sample_size=image_size)


def _check_sizes(p: Mapping[str, Any], where: str, *, widths: tuple[str, ...], counts: Mapping[str, int]) -> None:
    """The YAML's sizes within latentdiff.limits before anything loops over them (`num_res_blocks: 1e8` must not
    build a 10^8-entry key table): widths and per-level counts (an int or a list of them), and the level count."""
    for key in widths:
        if p.get(key) is not None and not isinstance(p.get(key), (list, tuple)):
            limits.check_count(p[key], key=key, at_least=1, at_most=limits.MAX_CHANNELS, where=f"{where}.{key}")
    for key, bound in counts.items():
        value = p.get(key)
        values = value if isinstance(value, (list, tuple)) else () if value is None or value == -1 else (value,)
        if len(values) > limits.MAX_LEVELS:
            raise ConfigError(f"{key} lists too many levels", where=f"{where}.{key}",
                              expected=f"at most {limits.MAX_LEVELS} entries", found=f"{len(values)} entries")
        for v in values:
            limits.check_count(v, key=key, at_least=1, at_most=bound, where=f"{where}.{key}")


def vae_from_original(section: Mapping[str, Any], *, scaling_factor: float, where: str) -> VAEArch:
    """VAEArch from a first-stage section (`target` AutoencoderKL / VQModel[Interface], `params.ddconfig`)."""
    target = str(section.get("target", ""))
    p = _params(section, where)
    dd = p.get("ddconfig") or {}
    vq = target.rsplit(".", 1)[-1] in ("VQModel", "VQModelInterface")
    if not vq and not target.endswith("AutoencoderKL"):
        raise ConfigError("unsupported first stage", where=f"{where}.target",
                          expected="ldm.models.autoencoder.AutoencoderKL / VQModel / VQModelInterface", found=target)
    if not vq and p.get("embed_dim", dd["z_channels"]) != dd["z_channels"]:
        raise ConfigError("KL autoencoder with embed_dim != z_channels is not supported", where=where,
                          found=(p.get("embed_dim"), dd["z_channels"]))
    _check_sizes(dd, f"{where}.params.ddconfig", widths=("ch", "z_channels", "in_channels", "out_ch"),
                 counts={"num_res_blocks": limits.MAX_LAYERS_PER_LEVEL, "ch_mult": limits.MAX_CHANNELS})
    levels = len(dd["ch_mult"])
    resolution = dd.get("resolution", 256)
    return VAEArch(
        kind="vq" if vq else "kl", in_channels=dd.get("in_channels", 3), out_channels=dd.get("out_ch", 3),
        channels=tuple(dd["ch"] * m for m in dd["ch_mult"]), layers_per_block=dd["num_res_blocks"],
        latent_channels=dd["z_channels"],
        attention_levels=tuple(resolution // 2 ** level in (dd.get("attn_resolutions") or [])
                               for level in range(levels)),
        num_vq_embeddings=p.get("n_embed") if vq else None, vq_embed_dim=p.get("embed_dim") if vq else None,
        scaling_factor=scaling_factor, sample_size=resolution)


def text_from_original(section: Any) -> TextArch | None:
    """TextArch from `cond_stage_config` (None when the model is unconditional or concat-conditioned)."""
    where = "model.params.cond_stage_config"
    if section is None or (isinstance(section, str) and section in NO_CONDITIONING):
        return None
    target = str(section.get("target", "")) if isinstance(section, Mapping) else str(section)
    if target in NO_CONDITIONING:
        return None
    p = _params(section, where)
    name = target.rsplit(".", 1)[-1]
    if name == "FrozenCLIPEmbedder":
        if p.get("version", "openai/clip-vit-large-patch14") != "openai/clip-vit-large-patch14" or \
                p.get("layer", "last") != "last":
            raise ConfigError("only CLIP ViT-L/14, last layer, is supported", where=where, found=p)
        return TextArch("clip", clip_config(**CLIP_L14))
    if name == "FrozenOpenCLIPEmbedder":
        layer = p.get("layer", "last")
        if p.get("arch", "ViT-H-14") != "ViT-H-14" or layer not in ("last", "penultimate"):
            raise ConfigError("only OpenCLIP ViT-H-14, last or penultimate layer, is supported", where=where, found=p)
        skip = 1 if layer == "penultimate" else 0
        return TextArch("openclip", clip_config(**{**OPENCLIP_H14, "num_hidden_layers": 24 - skip}),
                        skipped_layers=skip)
    if name == "BERTEmbedder":
        width = p["n_embed"]
        return TextArch("ldmbert", ldmbert_config(
            vocab_size=p.get("vocab_size", BERT_VOCAB), d_model=width, encoder_layers=p["n_layer"],
            encoder_ffn_dim=4 * width, max_position_embeddings=p.get("max_seq_len", 77),
            inner_dim=BERT_HEADS * BERT_HEAD_WIDTH))
    if name == "ClassEmbedder":
        return TextArch("class", class_embedder_config(num_classes=p.get("n_classes", 1000), embed_dim=p["embed_dim"]))
    raise ConfigError("unsupported conditioning stage", where=f"{where}.target",
                      expected="FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, BERTEmbedder, ClassEmbedder, none",
                      found=target)


def layout_from_original_config(config: str | os.PathLike | Mapping[str, Any], *, prediction_type: str | None = None,
                                scale_factor: float | None = None) -> FileLayout:
    """The FileLayout an original YAML describes. `scale_factor` (the file's buffer, for scale_by_std
    models) overrides the YAML's."""
    data = load_original_config(config)
    model = data["model"]
    target = str(model.get("target", ""))
    params = dict(model.get("params") or {})
    if target.rsplit(".", 1)[-1] in ("AutoencoderKL", "VQModel", "VQModelInterface"):
        first = vae_from_original(model, scaling_factor=1.0 if scale_factor is None else scale_factor, where="model")
        return FileLayout(family=first.part, first_stage=first, standalone_first_stage=True)
    if "network_config" in params or target.rsplit(".", 1)[-1] == "DiffusionEngine":
        return layout_from_sgm_config(params, prediction_type=prediction_type, scale_factor=scale_factor)
    if "unet_config" not in params or "first_stage_config" not in params:
        raise ConfigError("not a latent-diffusion config: no unet_config / first_stage_config",
                          where="model.params", found=sorted(params))
    scale = scale_factor if scale_factor is not None else float(params.get("scale_factor", 1.0))
    unet = unet_from_original(_params(params["unet_config"], "model.params.unet_config"),
                              image_size=params.get("image_size"))
    first = vae_from_original(params["first_stage_config"], scaling_factor=scale,
                              where="model.params.first_stage_config")
    if unet.sample_size:
        first = dataclasses.replace(first, sample_size=unet.sample_size * 2 ** (len(first.channels) - 1))
    text = text_from_original(params.get("cond_stage_config"))
    unet = with_conventions(unet, text)
    parameterization = params.get("parameterization", "eps")
    if parameterization not in PARAMETERIZATION:
        raise ConfigError("unsupported parameterization", where="model.params.parameterization",
                          expected=tuple(PARAMETERIZATION), found=parameterization)
    if params.get("beta_schedule", "linear") != "linear":
        raise ConfigError("unsupported beta_schedule", where="model.params.beta_schedule", expected="linear",
                          found=params.get("beta_schedule"))
    timesteps = limits.check_count(params.get("timesteps", 1000), key="timesteps", at_least=1,
                                   at_most=limits.MAX_TRAIN_TIMESTEPS, where="model.params.timesteps")
    schedule = {"beta_start": float(params.get("linear_start", 1e-4)),
                "beta_end": float(params.get("linear_end", 2e-2)),
                "num_train_timesteps": timesteps, "beta_schedule": "scaled_linear"}
    scheduler = scheduler_config(prediction_type=prediction_type or PARAMETERIZATION[parameterization],
                                 schedule=schedule)
    return FileLayout(family=_family(unet, first, text), unet=unet, first_stage=first, cond_stage=text,
                      scheduler=scheduler)


def layout_from_sgm_config(params: Mapping[str, Any], *, prediction_type: str | None = None,
                           scale_factor: float | None = None) -> FileLayout:
    """The FileLayout of a generative-models `DiffusionEngine` YAML (SDXL base / refiner: `sd_xl_base`,
    `sd_xl_refiner`): `network_config` (always SpatialTransformers), `conditioner_config.params.emb_models` (the
    text embedders in order, then one ConcatTimestepEmbedderND per micro-conditioning input), `first_stage_config`,
    `denoiser_config` (EpsScaling / VScaling, LegacyDDPMDiscretization)."""
    where = "model.params"
    for key in ("network_config", "first_stage_config", "conditioner_config"):
        if key not in params:
            raise ConfigError(f"not an SDXL DiffusionEngine config: no {key}", where=where, found=sorted(params))
    unet = unet_from_original({**_params(params["network_config"], f"{where}.network_config"),
                               "use_spatial_transformer": True})
    scale = scale_factor if scale_factor is not None else float(params.get("scale_factor", SDXL_VAE_SCALE))
    first = vae_from_original(params["first_stage_config"], scaling_factor=scale, where=f"{where}.first_stage_config")
    models = _params(params["conditioner_config"], f"{where}.conditioner_config").get("emb_models") or []
    texts, time_dims = [], set()
    for i, entry in enumerate(models):
        name = str(entry.get("target", "")).rsplit(".", 1)[-1] if isinstance(entry, Mapping) else ""
        p = _params(entry, f"{where}.conditioner_config.params.emb_models[{i}]")
        if name in SGM_TEXT:
            if name == "FrozenOpenCLIPEmbedder2" and p.get("arch", "ViT-bigG-14") != "ViT-bigG-14":
                raise ConfigError("unsupported OpenCLIP tower", where=f"{where}.conditioner_config.emb_models[{i}]",
                                  expected="ViT-bigG-14", found=p.get("arch"))
            texts.append(name)
        elif name == "ConcatTimestepEmbedderND":
            time_dims.add(p.get("outdim"))
        else:
            raise ConfigError("unsupported SDXL embedder", where=f"{where}.conditioner_config.emb_models[{i}]",
                              expected=("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2", "ConcatTimestepEmbedderND"),
                              found=entry.get("target") if isinstance(entry, Mapping) else entry)
    conditioning = {("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2"): "sdxl",
                    ("FrozenOpenCLIPEmbedder2",): "sdxl-refiner"}.get(tuple(texts))
    if conditioning is None or len(time_dims) != 1:
        raise ConfigError("an SDXL conditioner is CLIP-L then bigG (base) or bigG alone (refiner), then the "
                          "micro-conditioning embedders of one outdim", where=f"{where}.conditioner_config",
                          found={"text": texts, "outdim": sorted(map(str, time_dims))})
    index = SDXL_EMBEDDERS["refiner" if conditioning == "sdxl-refiner" else "base"]
    embedders = tuple(Embedder(index[part], part, arch) for part, arch in
                      (("text_encoder", TextArch("clip", clip_config(**CLIP_L14))),
                       ("text_encoder_2", TextArch("openclip-projection", {**clip_config(**OPENCLIP_BIGG14),
                                                   "architectures": list(PROJECTION_ARCHITECTURES)})))
                      if part in index)
    # label_emb.0.0 reads the pooled text embedding and `numbers` Fourier features of `outdim` each; the text towers'
    # widths are the released ones the YAML names (a file's own are checked when its encoders load, strictly)
    outdim = time_dims.pop()
    numbers = MICRO_CONDITIONING[conditioning]
    unet = with_text_time(unet, conditioning=conditioning,
                          pooled=(unet.projection_class_embeddings_input_dim or 0) - numbers * limits.check_count(
                              outdim, key="outdim", at_least=1, at_most=limits.MAX_CHANNELS,
                              where=f"{where}.conditioner_config.params.emb_models: outdim"),
                          source=f"{where}.network_config.params.adm_in_channels: ")
    unet = dataclasses.replace(unet, sample_size=SDXL_LATENT_SIZE)
    first = dataclasses.replace(first, sample_size=SDXL_LATENT_SIZE * 2 ** (len(first.channels) - 1))
    scaling = _params(params.get("denoiser_config") or {}, f"{where}.denoiser_config").get("scaling_config") or {}
    scaling_name = str(scaling.get("target", "EpsScaling")).rsplit(".", 1)[-1]
    if scaling_name not in SGM_SCALINGS:
        raise ConfigError("unsupported denoiser scaling", where=f"{where}.denoiser_config.params.scaling_config",
                          expected=tuple(SGM_SCALINGS), found=scaling.get("target"))
    return FileLayout(family=_family(unet, first, None, conditioning=conditioning), unet=unet, first_stage=first,
                      embedders=embedders,
                      scheduler=sdxl_scheduler_config(prediction_type=prediction_type or SGM_SCALINGS[scaling_name]))


def original_config_to_configs(config: str | os.PathLike | Mapping[str, Any], *,
                               prediction_type: str | None = None) -> dict[str, Any]:
    """{"family": ..., part: diffusers-format config, ..., "scheduler": ...} from an original YAML."""
    layout = layout_from_original_config(config, prediction_type=prediction_type)
    return {"family": layout.family, **layout.configs()}
