"""Tiny SDXL models by the released models' conventions, and their original (generative-models) single files.

`tiny_sdxl` (tests/_support/sdxl.py) is narrower than any released model's conventions allow (16-wide text heads,
GroupNorm(8)): a file of it reads back through its metadata, never from its tensors alone. `released_sdxl` builds
the same diffusers pipelines with what the tensors of a file do not record set as in the released models (64-wide
heads in the UNet and both text encoders, GroupNorm(32)), so that reading without a YAML must reproduce them.

    ref = released_sdxl(tmp / "base")                   # a diffusers pipeline, saved as a folder
    state = original_file(tmp / "base")                  # the folder's weights in the original layout, as
                                                         # Stability's releases hold them (position ids, logit scale)

`REAL_KEY_PATTERNS`: the key families of the released sd_xl_base_1.0 / sd_xl_refiner_1.0 files (generative-models'
module names, as diffusers' single-file loader and the SDXL conversion scripts read them), with their shape rules.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from tests._support.sdxl import assemble, tiny_unet_config, write_tokenizer_2
from tests._support.tiny_clip import random_clip_text_model, tiny_clip_config, write_tiny_clip_tokenizer

TE1, TE2, POOLED, TIME_DIM = 64, 128, 96, 8   # hidden widths (64-wide heads), bigG's projection != its width
RELEASED_VAE = dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    layers_per_block=1, sample_size=32, scaling_factor=0.13025, force_upcast=True)


def released_unet_config(kind: str = "base") -> dict[str, Any]:
    """tiny_sdxl's UNet at 64-wide heads and GroupNorm(32): levels (no attention, 1 then 2 transformer blocks)."""
    numbers = 5 if kind == "refiner" else 6
    return {**tiny_unet_config("base" if kind == "inpaint" else kind, in_channels=9 if kind == "inpaint" else 4),
            "block_out_channels": (64, 128), "attention_head_dim": (1, 2), "norm_num_groups": 32,
            "cross_attention_dim": TE2 if kind == "refiner" else TE1 + TE2, "addition_time_embed_dim": TIME_DIM,
            "projection_class_embeddings_input_dim": POOLED + numbers * TIME_DIM}


def released_sdxl(folder: str | Path, *, kind: str = "base", scheduler_class: str = "EulerDiscreteScheduler") -> Any:
    """A diffusers SDXL pipeline ("base", "refiner" or "inpaint") of tiny random parts by the released
    conventions, saved to `folder` (tokenizers beside it, in `<folder>_sources`)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    one = random_clip_text_model(tiny_clip_config(hidden_size=TE1, num_attention_heads=1, intermediate_size=96,
                                                  hidden_act="quick_gelu"), seed=11)
    config = tiny_clip_config(hidden_size=TE2, num_attention_heads=2, intermediate_size=160, hidden_act="gelu",
                              num_hidden_layers=3)
    config.projection_dim = POOLED
    two = random_clip_text_model(config, seed=12, architecture="CLIPTextModelWithProjection")
    sources = folder.with_name(folder.name + "_sources")
    tok1 = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(sources / "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(write_tokenizer_2(sources / "tokenizer_2"))
    pipe = assemble(kind, (one, tok1, two, tok2), unet_config=released_unet_config(kind), vae_config=RELEASED_VAE,
                    scheduler_class=scheduler_class)
    pipe.save_pretrained(folder)
    return pipe


def folder_parts(folder: Path) -> dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """The networks of a saved diffusers SDXL folder as (config.json, weights) by part name, read from the files."""
    import json

    from safetensors.torch import load_file

    parts = {}
    for name, weights in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                          ("text_encoder", "model"), ("text_encoder_2", "model")):
        if (folder / name).is_dir():
            parts[name] = (json.loads((folder / name / "config.json").read_text()),
                           load_file(folder / name / f"{weights}.safetensors"))
    return parts


def original_file(folder: Path, to_original: Callable[[Mapping[str, Any]], dict[str, torch.Tensor]]) -> dict:
    """The folder's weights in the original layout through `to_original` (latentdiff's `to_single_file`), with the
    two tensors the released files hold that no network uses: CLIP-L's position ids and bigG's logit scale."""
    parts = folder_parts(folder)
    refiner = "text_encoder" not in parts
    bigg = "conditioner.embedders.0." if refiner else "conditioner.embedders.1."
    extras = {bigg + "model.logit_scale": torch.tensor(4.6052)}
    if not refiner:
        extras["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return to_original({**parts, "extras": ({"family": "sdxl-refiner" if refiner else None}, extras)})


# The key families of the released SDXL files: (regex, shape rule or None). Every key of a file must match one,
# and every family (of the parts present) must be matched.
UNET_PATTERNS = (
    r"model\.diffusion_model\.time_embed\.[02]\.(weight|bias)",
    r"model\.diffusion_model\.label_emb\.0\.[02]\.(weight|bias)",
    r"model\.diffusion_model\.input_blocks\.0\.0\.(weight|bias)",
    r"model\.diffusion_model\.(input_blocks|output_blocks)\.\d+\.0\.(in_layers\.[02]|emb_layers\.1|out_layers\.[03]|"
    r"skip_connection)\.(weight|bias)",
    r"model\.diffusion_model\.middle_block\.[02]\.(in_layers\.[02]|emb_layers\.1|out_layers\.[03])\.(weight|bias)",
    r"model\.diffusion_model\.(input_blocks\.\d+\.1|output_blocks\.\d+\.1|middle_block\.1)\.(norm|proj_in|proj_out)\."
    r"(weight|bias)",
    r"model\.diffusion_model\.(input_blocks\.\d+\.1|output_blocks\.\d+\.1|middle_block\.1)\.transformer_blocks\.\d+\."
    r"(attn[12]\.to_[qkv]\.weight|attn[12]\.to_out\.0\.(weight|bias)|norm[123]\.(weight|bias)|"
    r"ff\.net\.0\.proj\.(weight|bias)|ff\.net\.2\.(weight|bias))",
    r"model\.diffusion_model\.input_blocks\.\d+\.0\.op\.(weight|bias)",
    r"model\.diffusion_model\.output_blocks\.\d+\.[12]\.conv\.(weight|bias)",
    r"model\.diffusion_model\.out\.[02]\.(weight|bias)",
)
CLIP_L_PATTERNS = (
    r"conditioner\.embedders\.0\.transformer\.text_model\.embeddings\.(token|position)_embedding\.weight",
    r"conditioner\.embedders\.0\.transformer\.text_model\.embeddings\.position_ids",
    r"conditioner\.embedders\.0\.transformer\.text_model\.encoder\.layers\.\d+\.(self_attn\.[qkv]_proj|"
    r"self_attn\.out_proj|layer_norm[12]|mlp\.fc[12])\.(weight|bias)",
    r"conditioner\.embedders\.0\.transformer\.text_model\.final_layer_norm\.(weight|bias)",
)
BIGG_PATTERNS = (
    r"conditioner\.embedders\.N\.model\.(token_embedding\.weight|positional_embedding|text_projection|logit_scale)",
    r"conditioner\.embedders\.N\.model\.ln_final\.(weight|bias)",
    r"conditioner\.embedders\.N\.model\.transformer\.resblocks\.\d+\.(attn\.in_proj_(weight|bias)|"
    r"attn\.out_proj\.(weight|bias)|ln_[12]\.(weight|bias)|mlp\.c_(fc|proj)\.(weight|bias))",
)
VAE_PATTERNS = (
    r"first_stage_model\.(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)",
    r"first_stage_model\.(encoder\.down|decoder\.up)\.\d+\.block\.\d+\.(norm[12]|conv[12]|nin_shortcut)\.(weight|bias)",
    r"first_stage_model\.encoder\.down\.\d+\.downsample\.conv\.(weight|bias)",
    r"first_stage_model\.decoder\.up\.\d+\.upsample\.conv\.(weight|bias)",
    r"first_stage_model\.(encoder|decoder)\.mid\.(block_[12]\.(norm[12]|conv[12])|attn_1\.(norm|q|k|v|proj_out))\."
    r"(weight|bias)",
    r"first_stage_model\.(quant_conv|post_quant_conv)\.(weight|bias)",
)


def real_key_patterns(*, refiner: bool) -> tuple[str, ...]:
    bigg = tuple(p.replace(r"embedders\.N", r"embedders\.0" if refiner else r"embedders\.1") for p in BIGG_PATTERNS)
    return UNET_PATTERNS + (() if refiner else CLIP_L_PATTERNS) + bigg + VAE_PATTERNS


def check_real_layout(state: Mapping[str, torch.Tensor], *, refiner: bool) -> None:
    """The keys and the shapes that tie parts together as in the released files: every key in a family, every
    family present; OpenCLIP's fused in_proj (3 h, h), its (h, P) projection, the UNet's context width (the
    text encoders' widths summed) and label_emb.0.0's input (P + numbers * time width)."""
    patterns = real_key_patterns(refiner=refiner)
    stray = [k for k in state if not any(re.fullmatch(p, k) for p in patterns)]
    assert not stray, stray[:10]
    unmatched = [p for p in patterns if not any(re.fullmatch(p, k) for k in state)]
    assert not unmatched, unmatched
    g = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
    width = state[g + "token_embedding.weight"].shape[1]
    assert state[g + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    assert state[g + "text_projection"].shape == (width, POOLED)
    assert state[g + "positional_embedding"].shape == (77, width)
    context = width if refiner else width + state[
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"].shape[1]
    assert state["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].shape[1] == context
    numbers = 5 if refiner else 6
    assert state["model.diffusion_model.label_emb.0.0.weight"].shape[1] == POOLED + numbers * TIME_DIM
