"""lllyasviel's original ControlNet files (`cldm.cldm.ControlNet`) <-> latentdiff's ControlNet (diffusers' layout).

    config, state = read_controlnet_file("control_v11p_sd15_canny.pth")        # + original_config= (its YAML)
    write_controlnet_file(controlnet, "canny.safetensors", layout="v1.1")

What the files hold (the layouts users have):

- v1.0 (`control_sd15_canny.pth`): a whole ControlLDM: the SD model (`model.diffusion_model.*`,
  `first_stage_model.*`, `cond_stage_model.*`) and beside it the ControlNet under `control_model.*`. Only the
  `control_model.*` keys are read here; the SD model loads with `LatentDiffusionPipeline.from_single_file`.
- v1.1 (`control_v11p_sd15_canny.pth`, its fp16 `.safetensors` repacks): the `control_model.*` keys alone.
- "bare": the same keys without the prefix (webui's `extract_controlnet.py` output, thibaud's SD 2.1 files).
- "difference" (webui's `extract_controlnet_diff.py`): a `difference` marker tensor, and every tensor the
  ControlNet copied from the UNet (`time_embed`, `input_blocks`, `middle_block`, `label_emb`) stored as
  (ControlNet - base UNet). Loading it needs that base UNet: `unet=` adds it back (in float32); without it the
  load is a CheckpointError saying so.

The ControlNet is the UNet's own down half (`unet_ldm.UNetArch`'s table, its input and middle blocks), plus
`zero_convs.N.0` (diffusers' controlnet_down_blocks.N), `middle_block_out.0` (controlnet_mid_block) and the hint
encoder `input_hint_block.{0, 2, 4, ...}` (an nn.Sequential of convs with SiLUs at the odd indices:
controlnet_cond_embedding.conv_in, blocks.*, conv_out). Without a YAML the architecture is read from the shapes
(hint channels and encoder widths, levels, attention, depth, cross-attention width, linear projections, SDXL's
text_time embedding); the attention heads follow the released models' conventions (SD 1.x: 8; SD 2.x / SDXL:
64-wide), as for UNets (`infer`). A YAML (`cldm_v15`, `cldm_v21` ship with latentdiff) sets the heads from
its `control_stage_config`; the hint encoder's widths are fixed in cldm's code, so they are always read from the
tensors. Files written here carry the ControlNet's diffusers config in their metadata and need neither.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import hub
from ..errors import CheckpointError, ConfigError, InputError
from ..models.base import ModelMixin, cast_state_dict
from ..models.controlnet import SHARED_WITH_UNET, UNREAD, ControlNetConfig
from ..models.diffusers_tables import CONTROLNET
from ..models.unet import UNetConfig
from ..registry import SINGLE_FILE
from .infer import _blocks, _get, _heads, _indices, _kind
from .keymap import Rename, Rule, apply_keymap, invert, prefixed
from .original_config import _params, load_original_config, unet_from_original
from .sdxl_ldm import with_text_time
from .single_file import CONTROL_PREFIX, PartState, load_single_file
from .unet_ldm import UNET_PREFIX, UNetArch

DIFFERENCE_KEY = "difference"       # the marker tensor of webui's difference files
LAYOUTS = {"v1.1": CONTROL_PREFIX, "bare": ""}   # what `write_controlnet_file` writes: the key prefix
METADATA_KEY = "latentdiff_controlnet"   # the ControlNet's diffusers config (JSON) in files written here
SHIPPED = ("cldm_v15", "cldm_v21")   # ControlNet YAMLs shipped in convert/configs
SDXL_CONTEXTS = (2048,)             # SDXL base's cross-attention width: its text_time convention applies


@dataclasses.dataclass(frozen=True)
class ControlArch:
    """What an original ControlNet's key layout depends on: the UNet half it copies, and its hint encoder."""

    trunk: UNetArch
    hint_channels: int
    hint_widths: tuple[int, ...]     # input_hint_block's conv widths per level (cldm: 16, 32, 96, 256)

    def keymap(self) -> tuple[Rule, ...]:
        """Original (without `control_model.`) -> diffusers keys; `invert()` it for the way back."""
        trunk = tuple(r for r in self.trunk.keymap()   # the UNet's table without its up half
                      if not str(getattr(r, "src", "")).startswith(("output_blocks.", "out.")))
        n = len(self.hint_widths)
        hint: list[Rule] = [Rename("input_hint_block.0.{p}", "controlnet_cond_embedding.conv_in.{p}")]
        hint += [Rename(f"input_hint_block.{2 * k + 2}.{{p}}", f"controlnet_cond_embedding.blocks.{k}.{{p}}")
                 for k in range(2 * (n - 1))]
        hint.append(Rename(f"input_hint_block.{2 * (2 * n - 1)}.{{p}}", "controlnet_cond_embedding.conv_out.{p}"))
        return trunk + tuple(hint) + (Rename("zero_convs.{i}.0.{p}", "controlnet_down_blocks.{i}.{p}"),
                                      Rename("middle_block_out.0.{p}", "controlnet_mid_block.{p}"))

    def to_config(self, *, source: str) -> ControlNetConfig:
        """latentdiff's config of this ControlNet (a layout it cannot build: CheckpointError naming the field)."""
        try:
            unet = self.trunk.to_config()
            if not isinstance(unet, UNetConfig) or self.trunk.foreign_keys():
                raise ConfigError("a ControlNet copies a cross-attention UNet (SpatialTransformers, no other "
                                  "options)", where="attention", expected="transformer",
                                  found=(self.trunk.attention, self.trunk.foreign_keys()))
            shared = {f.name: getattr(unet, f.name) for f in dataclasses.fields(UNetConfig) if f.name not in UNREAD}
            return ControlNetConfig(**shared, conditioning_channels=self.hint_channels,
                                    conditioning_embedding_out_channels=self.hint_widths)
        except ConfigError as e:
            raise CheckpointError(f"controlnet: {e.message}", where=f"{source}: {e.where}", expected=e.expected,
                                  found=e.found) from None

    @classmethod
    def from_config(cls, config: ControlNetConfig) -> ControlArch:
        """The original layout of latentdiff's ControlNet for `config`."""
        return cls(trunk=UNetArch.from_config(config), hint_channels=config.conditioning_channels,
                   hint_widths=tuple(config.conditioning_embedding_out_channels))


# ---- architecture from the tensors ------------------------------------------------------------------------
def infer_controlnet(sd: Mapping[str, torch.Tensor], *, source: str) -> ControlArch:
    """ControlArch of an original ControlNet state dict (keys without `control_model.`). The levels are delimited
    by the downsamplers (`input_blocks.N.0.op`): a ControlNet has no output blocks to read them from."""
    return ControlArch(trunk=infer_trunk(sd, source=source), **infer_hint(sd, source=source))


def infer_trunk(sd: Mapping[str, torch.Tensor], *, source: str) -> UNetArch:
    """The copied UNet half: conv_in, the down levels, the middle block, the time (and SDXL's text_time)
    embedding."""
    conv_in = _get(sd, "input_blocks.0.0.weight", source)
    ins = _blocks(sd, "input_blocks")
    if sorted(ins) != list(range(len(ins))):
        raise CheckpointError("the input blocks are not numbered 0 .. N-1", where=f"{source}input_blocks",
                              found=sorted(ins))
    levels: list[list[int]] = [[]]
    for n in range(1, len(ins)):
        kind = _kind(ins[n].get(0, {}))
        if kind == "conv":        # a downsampler closes its level
            levels.append([])
        elif kind == "res" and set(ins[n]) <= {0, 1}:
            levels[-1].append(n)
        else:
            raise CheckpointError("unknown layout of an input block (expected a ResBlock, optionally with a "
                                  "SpatialTransformer, or a downsampler)", where=f"{source}input_blocks.{n}",
                                  found=sorted(f"{s}.{k}" for s in ins[n] for k in ins[n][s])[:20])
    if any(not level for level in levels):
        raise CheckpointError("unknown layout: a resolution level without ResBlocks", where=f"{source}input_blocks",
                              found=[len(level) for level in levels])
    channels, attention, depth = [], [], []
    transformer: Mapping[str, torch.Tensor] | None = None
    for level in levels:
        kinds = {_kind(ins[n][1]) if 1 in ins[n] else "none" for n in level}
        if len(kinds) != 1 or not kinds <= {"none", "transformer"}:
            raise CheckpointError("attention must be SpatialTransformers on every block of a level, or none",
                                  where=f"{source}input_blocks.{level[0]}", found=sorted(kinds))
        attention.append(kinds.pop())
        channels.append(int(_get(ins[level[0]][0], "out_layers.3.weight", f"{source}input_blocks.{level[0]}.0.")
                            .shape[0]))
        first = ins[level[0]].get(1, {})
        transformer = transformer or (first if attention[-1] == "transformer" else None)
        depth.append(len(_indices(first, r"transformer_blocks\.(\d+)\.")))
    mid = prefixed("middle_block.1.", sd)
    if _kind(mid) != "transformer":
        raise CheckpointError("a ControlNet's middle block has a SpatialTransformer", where=f"{source}middle_block.1",
                              expected="middle_block.1.proj_in.weight", found=sorted(mid)[:10] or "absent")
    mid_depth = len(_indices(mid, r"transformer_blocks\.(\d+)\."))
    transformer = transformer or mid
    depth = [d or mid_depth for d in depth]
    if attention[-1] == "none":
        depth[-1] = mid_depth   # diffusers gives the middle block the last level's depth
    context = int(_get(transformer, "transformer_blocks.0.attn2.to_k.weight", f"{source}attention ").shape[1])
    linear = transformer["proj_in.weight"].ndim == 2
    emb = int(_get(sd, "time_embed.0.weight", source).shape[0])
    label = sd.get("label_emb.0.0.weight")
    trunk = UNetArch(
        in_channels=int(conv_in.shape[1]), out_channels=int(conv_in.shape[1]), channels=tuple(channels),
        layers_per_level=tuple(len(level) for level in levels), attention=tuple(attention),
        mid_attention="transformer", transformer_depth=tuple(depth), cross_attention_dim=context,
        heads=_heads(tuple(channels), mid_kind="transformer", sd2=linear or context >= 1024, cond_kind=None,
                     source=source),
        use_linear_projection=linear,
        num_class_embeds=int(sd["label_emb.weight"].shape[0]) if "label_emb.weight" in sd else None,
        projection_class_embeddings_input_dim=int(label.shape[1]) if label is not None else None,
        time_embedding_dim=None if emb == 4 * channels[0] else emb)
    if label is not None and context in SDXL_CONTEXTS:
        trunk = with_text_time(trunk, conditioning="sdxl", pooled=None, source=source)
    return trunk


def infer_hint(sd: Mapping[str, torch.Tensor], *, source: str) -> dict[str, Any]:
    """hint_channels and hint_widths of `input_hint_block`: convs at the even indices 0 .. 2(2n - 1); per level a
    same-width conv then a stride-2 conv to the next width, the last conv (to the UNet's width) zero-initialised."""
    found = _indices(sd, r"input_hint_block\.(\d+)\.")
    convs = len(found)
    if convs < 2 or convs % 2 or found != list(range(0, 2 * convs, 2)):
        raise CheckpointError("unknown layout of the hint encoder (input_hint_block)",
                              where=f"{source}input_hint_block",
                              expected="convs at indices 0, 2, 4, ... (2 per level, SiLUs between)",
                              found=found or "absent")
    first = _get(sd, "input_hint_block.0.weight", source)
    widths = [int(first.shape[0])] + [int(_get(sd, f"input_hint_block.{4 * j + 4}.weight", source).shape[0])
                                      for j in range(convs // 2 - 1)]
    return {"hint_channels": int(first.shape[1]), "hint_widths": tuple(widths)}


def arch_from_original_config(config: Any, sd: Mapping[str, torch.Tensor], *, source: str) -> ControlArch:
    """ControlArch from a ControlLDM YAML (`control_stage_config`: the ControlNet's own arguments), the hint
    encoder's widths from the tensors (cldm fixes them in code)."""
    if isinstance(config, str) and config in SHIPPED:
        from importlib import resources

        config = Path(str(resources.files("latentdiff.convert") / "configs" / f"{config}.yaml"))
    data = load_original_config(config)
    params = dict(data["model"].get("params") or {})
    if "control_stage_config" not in params:
        raise ConfigError("not a ControlNet YAML: no model.params.control_stage_config", where=str(config),
                          expected=f"a ControlLDM config (cldm_v15.yaml, control_v11p_sd15_*.yaml; shipped: {SHIPPED})")
    p = _params(params["control_stage_config"], "model.params.control_stage_config")
    if "hint_channels" not in p or "in_channels" not in p:
        raise ConfigError("control_stage_config needs hint_channels and in_channels",
                          where="model.params.control_stage_config.params", found=sorted(p))
    if p.get("global_average_pooling"):   # v1.1's shuffle: diffusers' global_pool_conditions
        raise ConfigError("ControlNets that pool their residuals (global_average_pooling, v1.1 shuffle) are not "
                          "supported", where="model.params.control_stage_config.params.global_average_pooling",
                          expected=False, found=True)
    if p.get("global_average_pooling"):   # v1.1's shuffle: diffusers' global_pool_conditions
        raise ConfigError("ControlNets that pool their residuals (global_average_pooling, v1.1 shuffle) are not "
                          "supported", where="model.params.control_stage_config.params.global_average_pooling",
                          expected=False, found=True)
    trunk = unet_from_original({**p, "out_channels": p["in_channels"]})
    if trunk.projection_class_embeddings_input_dim is not None and trunk.cross_attention_dim in SDXL_CONTEXTS:
        trunk = with_text_time(trunk, conditioning="sdxl", pooled=None, source=source)
    return ControlArch(trunk=trunk, hint_channels=int(p["hint_channels"]),
                       hint_widths=infer_hint(sd, source=source)["hint_widths"])


# ---- reading ------------------------------------------------------------------------------------------------
def controlnet_keys(raw: Mapping[str, torch.Tensor], *, source: str) -> tuple[dict[str, torch.Tensor], str]:
    """(the ControlNet's tensors without their prefix, the prefix): `control_model.*` (v1.0 beside the SD model,
    v1.1 alone), else bare cldm keys. A file without a ControlNet is a CheckpointError saying what it holds."""
    if any(k.startswith(CONTROL_PREFIX) for k in raw):
        return prefixed(CONTROL_PREFIX, raw), CONTROL_PREFIX
    if "input_hint_block.0.weight" in raw or "zero_convs.0.0.weight" in raw:
        return dict(raw), ""
    if any(k.startswith(UNET_PREFIX) for k in raw):
        what = "a Stable Diffusion checkpoint without a ControlNet"
    elif "controlnet_cond_embedding.conv_in.weight" in raw:
        what = "a ControlNet in diffusers' layout (load its folder with ControlNet.from_pretrained)"
    else:
        what = "no ControlNet keys"
    raise CheckpointError(f"not an original ControlNet file: {what}", where=source,
                          expected=f"{CONTROL_PREFIX}* keys (v1.0 / v1.1 files), or bare cldm keys "
                                   "(input_hint_block.*, zero_convs.*)", found=sorted(raw)[:6])


def read_controlnet_file(path: str | os.PathLike, *, original_config: Any = None,
                         unet: Any = None) -> tuple[ControlNetConfig, PartState]:
    """(config, state in latentdiff's names, each key's file name in `state.origins`) of the ControlNet in an
    original file. `original_config`: its YAML (a path, a dict, or "cldm_v15" / "cldm_v21"); `unet`: the base
    UNet a "difference" file was made from. Everything is checked before any tensor is combined."""
    source = str(path)
    raw, info = load_single_file(path)
    sd, prefix = controlnet_keys(raw, source=source)
    # the marker at the root or under the prefix (webui strips the prefix before it looks)
    marker = [name for name in (DIFFERENCE_KEY, prefix + DIFFERENCE_KEY) if name in raw]
    sd.pop(DIFFERENCE_KEY, None)
    difference = bool(marker)
    if difference and unet is None:
        raise CheckpointError("a 'difference' ControlNet: the weights it copied from the UNet are stored as "
                              "differences from the base model it was made from, which is needed to load it",
                              where=f"{source}: {marker[0]}",
                              expected="ControlNet.from_single_file(path, unet=<the base model's UNet>)",
                              found="no unet=")
    if unet is not None and not difference:
        raise InputError("unet= is for 'difference' ControlNet files, and this one holds the weights themselves",
                         where="unet", expected=None, found=type(unet).__name__)
    saved = info["metadata"].get(METADATA_KEY)
    if saved is not None and original_config is None:
        config = saved_config(saved, source=f"{source}: __metadata__.{METADATA_KEY}")
        arch = ControlArch.from_config(config)
    else:
        arch = (arch_from_original_config(original_config, sd, source=source) if original_config is not None
                else infer_controlnet(sd, source=f"{source}: {prefix}"))
        config = arch.to_config(source=source)
    origins: dict[str, str] = {}
    state = apply_keymap(sd, arch.keymap(), source=source, origins=origins)
    if difference:
        state = add_base(state, unet, source=source, names={k: prefix + v for k, v in origins.items()})
    return config, PartState(state, origins={k: prefix + v for k, v in origins.items()})


def saved_config(text: str, *, source: str) -> ControlNetConfig:
    """The ControlNet config a file written here carries (its diffusers config.json, as JSON)."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"unreadable ControlNet metadata ({e})", where=source, expected="JSON") from None
    if not isinstance(data, dict):
        raise CheckpointError("ControlNet metadata is not an object", where=source, expected="a config.json object",
                              found=type(data).__name__)
    try:
        return CONTROLNET.to_config(data, ControlNetConfig, source=source)
    except ConfigError as e:
        raise CheckpointError(f"ControlNet metadata: {e.message}", where=e.where, expected=e.expected,
                              found=e.found) from None


def add_base(state: dict[str, torch.Tensor], unet: Any, *, source: str,
             names: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """A difference file's tensors with the base UNet's added back to those the ControlNet copied from it
    (SHARED_WITH_UNET), in float32; the UNet must have each such key at the same shape (checked first)."""
    from ..models.unet import UNet2DConditional

    if not isinstance(unet, UNet2DConditional):
        raise InputError("unet= must be the base model's UNet2DConditional", where="unet",
                         expected="UNet2DConditional", found=type(unet).__name__)
    base = unet.state_dict()
    shared = [k for k in state if k.split(".")[0] in SHARED_WITH_UNET]
    bad = [f"{names.get(k, k)}: expected {tuple(state[k].shape)}, found "
           f"{tuple(base[k].shape) if k in base else 'absent'} in the UNet"
           for k in shared if k not in base or base[k].shape != state[k].shape]
    if bad:
        raise CheckpointError("the difference file was not made from this base UNet", where=source,
                              expected="the UNet of the base model (same architecture)", found=bad[:8])
    out = dict(state)
    for k in shared:
        out[k] = state[k].float() + base[k].detach().to("cpu", torch.float32)
    return out


# ---- writing ------------------------------------------------------------------------------------------------
def controlnet_file_state(model: Any, *, layout: str = "v1.1", dtype: torch.dtype | None = None
                          ) -> dict[str, torch.Tensor]:
    """`model`'s weights in the original layout (`layout`: "v1.1" `control_model.*`, "bare" no prefix), floating
    point ones cast to `dtype` (None: as they are); tensors are not copied otherwise."""
    if layout not in LAYOUTS:
        raise InputError("unknown ControlNet file layout", where="layout", expected=sorted(LAYOUTS), found=layout)
    state = cast_state_dict(model.state_dict(), dtype=dtype)
    table = invert(ControlArch.from_config(model.config).keymap())
    out = apply_keymap(state, table, source=type(model).__name__)
    return {LAYOUTS[layout] + k: v for k, v in out.items()}


def write_controlnet_file(model: Any, path: str | os.PathLike, *, layout: str = "v1.1",
                          dtype: torch.dtype | None = None) -> Path:
    """Write `model` as an original ControlNet `.safetensors` file (atomically: a temporary name, then renamed),
    its diffusers config in the metadata (read back without a YAML)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError("ControlNet files are written as safetensors", where=str(path), expected="*.safetensors")
    state = controlnet_file_state(model, layout=layout, dtype=dtype)
    config = json.dumps(CONTROLNET.to_file(model.config), sort_keys=True)
    hub.save_safetensors(state, path, metadata={"format": "pt", METADATA_KEY: config})
    return path


def is_controlnet_file(path: str | os.PathLike) -> bool:
    """Whether an original file holds a ControlNet (`control_model.*` or bare cldm keys): a safetensors file by its
    header alone; a pickle is loaded (weights only, memory-mapped where torch.save's zip format allows)."""
    path = Path(path)
    keys: Any = hub.check_safetensors_header(path) if path.suffix == ".safetensors" else load_single_file(path)[0]
    return any(k.startswith(CONTROL_PREFIX) for k in keys) or "input_hint_block.0.weight" in keys


# ---- the hooks ControlNet.from_single_file / save_single_file call ------------------------------------------
@SINGLE_FILE.register("controlnet_from_single_file")
def controlnet_from_single_file(cls: type[ModelMixin[Any]], path: str | os.PathLike, *, original_config: Any = None,
                                unet: Any = None, torch_dtype: torch.dtype | None = None, device: Any = None) -> Any:
    """`ControlNet.from_single_file`: the file read and converted, then built strictly on the meta device."""
    config, state = read_controlnet_file(path, original_config=original_config, unet=unet)
    return cls.from_state_dict(config, state, torch_dtype=torch_dtype, device=device, source=str(path),
                               key_names=state.origins)


@SINGLE_FILE.register("controlnet_to_single_file")
def controlnet_to_single_file(model: Any, path: str | os.PathLike, *, layout: str = "v1.1",
                              dtype: torch.dtype | None = None) -> Path:
    """`ControlNet.save_single_file`: see `write_controlnet_file`."""
    return write_controlnet_file(model, path, layout=layout, dtype=dtype)
