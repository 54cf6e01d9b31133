"""SDXL LoRA files for the tiny SDXL of sdxl.py, in the spellings people download: kohya's (`lora_unet_*` with the
original SGM block numbers, `lora_te1_*` for CLIP-L, `lora_te2_*` for bigG) and diffusers / PEFT's (`unet.`,
`text_encoder.`, `text_encoder_2.` with lora_A / lora_B).

The kohya UNet names are spelled from latentdiff's original-layout key table (convert.unet_ldm) and each one is
checked against diffusers' own kohya conversion (`kohya_unet_names`): diffusers is the oracle of the mapping, the
parity tests then compare what both libraries do with the same file.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from tests._support.lora import factors

# the modules a kohya SDXL LoRA (+ LoCon) changes: the transformer blocks, the resnets' convs and time projections,
# the resamplers; the text encoders' attention and MLP
UNET_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                 "conv2", "time_emb_proj", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
TEXT_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                 "mlp.fc2")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# The released UNets' config.json entries that shape the original block numbering (stabilityai/stable-diffusion-xl-
# base-1.0 and -refiner-1.0; the same values as tests/models/test_unet_sdxl.py's, which builds them for parity)
_CROSS, _DOWN, _CROSS_UP, _UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
SDXL_BASE_UNET = dict(
    sample_size=128, block_out_channels=[320, 640, 1280], down_block_types=[_DOWN, _CROSS, _CROSS],
    up_block_types=[_CROSS_UP, _CROSS_UP, _UP], transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20], cross_attention_dim=2048, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True)
SDXL_REFINER_UNET = dict(
    sample_size=128, block_out_channels=[384, 768, 1536, 1536], down_block_types=[_DOWN, _CROSS, _CROSS, _DOWN],
    up_block_types=[_UP, _CROSS_UP, _CROSS_UP, _UP], transformer_layers_per_block=4,
    attention_head_dim=[6, 12, 24, 24], cross_attention_dim=1280, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560, use_linear_projection=True)
Found = list[tuple[str, str, tuple[int, ...]]]


def sdxl_targets(unet: torch.nn.Module, text_encoders: dict[str, torch.nn.Module | None], *,
                 unet_suffixes: Iterable[str] = UNET_SUFFIXES,
                 text_suffixes: Iterable[str] = TEXT_SUFFIXES) -> Found:
    """[(component, module name, weight shape)]: UNet modules by diffusers' names, text modules by transformers'
    (`text_model.encoder.layers.0.self_attn.q_proj`) whichever model holds them."""
    found = []
    unet_suffixes, text_suffixes = tuple(unet_suffixes), tuple(text_suffixes)
    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(unet_suffixes):
            found.append(("unet", name, tuple(m.weight.shape)))
    for component, model in text_encoders.items():
        for name, m in (model.named_modules() if model is not None else ()):
            if isinstance(m, torch.nn.Linear) and name.endswith(text_suffixes):
                full = name if name.startswith("text_model.") else "text_model." + name
                found.append((component, full, tuple(m.weight.shape)))
    return found


def diffusers_unet_name(kohya_prefix: str, unet_config: Any) -> str:
    """The diffusers module a kohya UNet key prefix names, by diffusers' own conversion (SGM block renumbering
    from the UNet config, then its kohya renames), spelled as the module's name."""
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers

    (key,) = _maybe_map_sgm_blocks_to_diffusers({kohya_prefix + ".lora_down.weight": None}, unet_config)
    name = _convert_unet_lora_key(key)
    for suffix in ("_lora.down.weight", ".lora.down.weight"):
        name = name.removesuffix(suffix)
    name = name.replace(".processor.", ".")
    return name + ".0" if name.endswith("to_out") else name


def kohya_unet_names(unet: torch.nn.Module, names: Iterable[str], diffusers_config: Any) -> dict[str, str]:
    """{diffusers module name: kohya key prefix in the original SGM numbering} for `names` of latentdiff's UNet,
    each checked to be what diffusers' conversion (with the diffusers UNet's `diffusers_config`) maps back to the
    same module (AssertionError otherwise)."""
    from latentdiff.convert.keymap import invert, resolve
    from latentdiff.convert.unet_ldm import UNetArch

    table = invert(UNetArch.from_config(unet.config).keymap())
    out = {}
    for name in names:
        hit = resolve(table, name + ".weight")
        (original,) = hit.outputs()
        prefix = "lora_unet_" + original.removesuffix(".weight").replace(".", "_")
        out[name] = prefix
        assert diffusers_unet_name(prefix, diffusers_config) == name, (prefix, name)
    return out


def kohya_sdxl(found: Found, unet_names: dict[str, str], *, rank: int = 4, alpha: float | None = 2.0,
               seed: int = 0, std: float = 0.2) -> dict[str, torch.Tensor]:
    """A kohya SDXL file: lora_unet_<SGM name> (`unet_names`), lora_te1_ / lora_te2_ + transformers' name."""
    state = {}
    for i, (component, name, shape) in enumerate(found):
        key = unet_names[name] if component == "unet" else KOHYA_PREFIXES[component] + name.replace(".", "_")
        down, up = factors(shape, rank, seed + i, std)
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
        if alpha is not None:
            state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def peft_sdxl(found: Found, *, rank: int = 4, seed: int = 0, std: float = 0.2) -> dict[str, torch.Tensor]:
    """A diffusers / PEFT SDXL file: `<component>.<module>.lora_A.weight` / `.lora_B.weight`."""
    state = {}
    for i, (component, name, shape) in enumerate(found):
        down, up = factors(shape, rank, seed + i, std)
        state[f"{component}.{name}.lora_A.weight"], state[f"{component}.{name}.lora_B.weight"] = down, up
    return state


# ---- latentdiff's SDXL pipelines, and what both libraries compute -------------------------------------------------
def load_parts(folder: Any, *, refiner: bool = False) -> Any:
    """latentdiff's StableDiffusionXLPipeline (the refiner: StableDiffusionXLImg2ImgPipeline) of a tiny SDXL
    folder: the UNet and text encoders the adapters patch, with the adapter methods."""
    from latentdiff import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    return (StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline).from_pretrained(folder)


def unet_inputs(unet: Any, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """x, t, context and added_cond for the tiny SDXL UNet (6 time ids, or the refiner's 5)."""
    g = torch.Generator().manual_seed(seed)
    config = unet.config
    numbers = (config.projection_class_embeddings_input_dim - 24) // config.addition_time_embed_dim
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 7, config.cross_attention_dim, generator=g)
    ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0], [24.0, 32.0, 4.0, 2.0, 32.0, 28.0]])[:, :numbers]
    return x, torch.tensor([999, 17]), context, {"text_embeds": torch.randn(2, 24, generator=g), "time_ids": ids}


@torch.no_grad()
def conditioning(pipe: Any, prompt: str, *, prompt_syntax: str = "plain") -> tuple[torch.Tensor, torch.Tensor]:
    """latentdiff's SDXL text conditioning of one prompt without guidance (`encode_prompt`): both encoders'
    penultimate states concatenated (the refiner: bigG's) and bigG's projected pooled output."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, guidance=False, prompt_syntax=prompt_syntax)
    return embeds, pooled


@torch.no_grad()
def diffusers_conditioning(ref: Any, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' SDXL encode_prompt (one prompt, no guidance): (prompt_embeds, pooled_prompt_embeds)."""
    embeds, _, pooled, _ = ref.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                             do_classifier_free_guidance=False)
    return embeds, pooled


def old_diffusers_sdxl(found: Found, *, rank: int = 4, seed: int = 0, std: float = 0.2) -> dict[str, torch.Tensor]:
    """diffusers' older LoRA names (before PEFT): `unet.<module>.lora.down.weight` / `.lora.up.weight`, the text
    encoders' `<component>.<module>.lora_linear_layer.down.weight`."""
    state = {}
    for i, (component, name, shape) in enumerate(found):
        down, up = factors(shape, rank, seed + i, std)
        part = "lora" if component == "unet" else "lora_linear_layer"
        state[f"{component}.{name}.{part}.down.weight"], state[f"{component}.{name}.{part}.up.weight"] = down, up
    return state
