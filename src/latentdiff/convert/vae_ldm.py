"""The first stage (`first_stage_model.*`): CompVis' AutoencoderKL / VQModel <-> diffusers AutoencoderKL / VQModel.

The original `Encoder` keeps its levels as `down.N.{block.M, attn.M, downsample}`; the `Decoder` builds
its levels from the lowest resolution up but stores them under the index of the resolution
(`up.0` is full resolution), so diffusers' up_blocks.I is the original up.(L-1-I). Mid-block attention
(and, in some VQ models, per-level attention) uses 1x1 convs q/k/v/proj_out where diffusers uses linears.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..models.autoencoder_kl import AutoencoderKLConfig
from ..models.diffusers_tables import AUTOENCODER_KL, VQ_MODEL
from ..models.vq import VQModelConfig
from .keymap import Drop, Keep, Nest, Rename, Reshape, Rule

RESNET = (  # ResnetBlock: same names but the shortcut
    Keep("norm{n:1|2}.{p}"),
    Keep("conv{n:1|2}.{p}"),
    Rename("nin_shortcut.{p}", "conv_shortcut.{p}"),
)
ATTENTION = (  # AttnBlock: GroupNorm + 1x1 convs  <->  diffusers Attention with linears
    Rename("norm.{p}", "group_norm.{p}"),
    Reshape("{x:q|k|v}.weight", "to_{x}.weight", ndim=(4, 2)),
    Rename("{x:q|k|v}.bias", "to_{x}.bias"),
    Reshape("proj_out.weight", "to_out.0.weight", ndim=(4, 2)),
    Rename("proj_out.bias", "to_out.0.bias"),
)
# Training-only modules of a first-stage checkpoint (LPIPS, discriminator): deliberately not converted.
TRAINING_ONLY = (Drop("loss.{rest*}", keep=False),)


@dataclasses.dataclass(frozen=True)
class VAEArch:
    """What the key layout of an original first stage depends on; `to_config()` is latentdiff's config of it."""

    kind: str                            # "kl" (AutoencoderKL) | "vq" (VQModel)
    in_channels: int
    out_channels: int
    channels: tuple[int, ...]            # ch * ch_mult: width per level
    layers_per_block: int                # num_res_blocks (the decoder has one more per level)
    latent_channels: int                 # z_channels
    attention_levels: tuple[bool, ...] = ()  # attention after each ResBlock of a level (attn_resolutions)
    num_vq_embeddings: int | None = None  # VQ codebook size (n_embed)
    vq_embed_dim: int | None = None       # VQ code width (embed_dim)
    scaling_factor: float = 0.18215
    sample_size: int | None = None

    def __post_init__(self):
        if not self.attention_levels:
            object.__setattr__(self, "attention_levels", (False,) * len(self.channels))
        if self.kind not in ("kl", "vq") or len(self.attention_levels) != len(self.channels):
            raise CheckpointError("first-stage description is inconsistent", where="vae",
                                  found=(self.kind, self.channels, self.attention_levels))

    @property
    def part(self) -> str:
        """The pipeline component name diffusers uses for it."""
        return "vae" if self.kind == "kl" else "vqvae"

    def keymap(self) -> tuple[Rule, ...]:
        """Original (without `first_stage_model.`) -> diffusers keys; `invert()` it for the way back."""
        rules: list[Rule] = []
        for part in ("encoder", "decoder"):
            rules += [Keep(f"{part}.conv_in.{{p}}"), Keep(f"{part}.conv_out.{{p}}"),
                      Rename(f"{part}.norm_out.{{p}}", f"{part}.conv_norm_out.{{p}}"),
                      Nest(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", RESNET),
                      Nest(f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", ATTENTION),
                      Nest(f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", RESNET)]
        levels = len(self.channels)
        for level in range(levels):
            rules.append(Nest(f"encoder.down.{level}.block.{{j}}.", f"encoder.down_blocks.{level}.resnets.{{j}}.",
                              RESNET))
            if self.attention_levels[level]:
                rules.append(Nest(f"encoder.down.{level}.attn.{{j}}.",
                                  f"encoder.down_blocks.{level}.attentions.{{j}}.", ATTENTION))
            if level != levels - 1:
                rules.append(Rename(f"encoder.down.{level}.downsample.conv.{{p}}",
                                    f"encoder.down_blocks.{level}.downsamplers.0.conv.{{p}}"))
        for up in range(levels):
            level = levels - 1 - up  # the decoder's storage order is reversed
            rules.append(Nest(f"decoder.up.{level}.block.{{j}}.", f"decoder.up_blocks.{up}.resnets.{{j}}.", RESNET))
            if self.attention_levels[level]:
                rules.append(Nest(f"decoder.up.{level}.attn.{{j}}.", f"decoder.up_blocks.{up}.attentions.{{j}}.",
                                  ATTENTION))
            if level != 0:
                rules.append(Rename(f"decoder.up.{level}.upsample.conv.{{p}}",
                                    f"decoder.up_blocks.{up}.upsamplers.0.conv.{{p}}"))
        rules += [Keep("quant_conv.{p}"), Keep("post_quant_conv.{p}")]
        if self.kind == "vq":
            rules.append(Keep("quantize.embedding.weight"))
        return tuple(rules) + TRAINING_ONLY

    def to_config(self) -> AutoencoderKLConfig | VQModelConfig:
        """The config of latentdiff's first stage for this layout (its diffusers config.json is the table's)."""
        common: dict[str, Any] = dict(
            in_channels=self.in_channels, out_channels=self.out_channels, channels=self.channels,
            layers_per_level=self.layers_per_block, latent_channels=self.latent_channels,
            attention_levels=self.attention_levels, sample_size=self.sample_size, scaling_factor=self.scaling_factor)
        if self.kind == "kl":
            return AutoencoderKLConfig(**common)
        # num_vq_embeddings None (a "vq" description without a codebook size): VQModelConfig's error names it
        codebook: dict[str, Any] = dict(num_vq_embeddings=self.num_vq_embeddings, vq_embed_dim=self.vq_embed_dim)
        return VQModelConfig(**common, **codebook)

    def to_diffusers_config(self) -> dict[str, Any]:
        """The part config: the diffusers config.json of `to_config()`'s model."""
        table = AUTOENCODER_KL if self.kind == "kl" else VQ_MODEL
        try:
            config = self.to_config()
        except ConfigError as e:  # a layout latentdiff's autoencoders cannot build with the original conventions
            raise CheckpointError(f"{self.part}: {e.message}", where=e.where, expected=e.expected,
                                  found=e.found) from None
        return {"_class_name": table.class_name, **table.to_file(config)}

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], *, source: str = "vae config") -> VAEArch:
        """The inverse of `to_diffusers_config`: through the model's table (diffusers defaults for absent keys)."""
        vq = config.get("_class_name") == VQ_MODEL.class_name or "num_vq_embeddings" in config
        table, config_class = (VQ_MODEL, VQModelConfig) if vq else (AUTOENCODER_KL, AutoencoderKLConfig)
        try:
            typed: Any = table.to_config({**config, "_class_name": table.class_name}, config_class, source=source)
        except ConfigError as e:
            raise CheckpointError(f"{'vqvae' if vq else 'vae'} config: {e.message}", where=e.where,
                                  expected=e.expected, found=e.found) from None
        fixed = {"mid_block_add_attention": ("mid_block_attention", True),  # file key: (field, value)
                 **({"norm_type": ("norm_type", "group")} if vq else
                    {"use_quant_conv": ("use_quant_conv", True), "use_post_quant_conv": ("use_post_quant_conv", True)})}
        for key, (field, want) in fixed.items():
            if getattr(typed, field) != want:
                raise CheckpointError(f"an original first stage always has {key}={want}", where=source,
                                      found=getattr(typed, field))
        return cls(kind="vq" if vq else "kl", in_channels=typed.in_channels, out_channels=typed.out_channels,
                   channels=typed.channels, layers_per_block=typed.layers_per_level,
                   latent_channels=typed.latent_channels, attention_levels=typed.attention_levels or (),
                   num_vq_embeddings=typed.num_vq_embeddings if vq else None,
                   vq_embed_dim=typed.embed_dim if vq else None,
                   scaling_factor=typed.scaling_factor, sample_size=typed.sample_size)
