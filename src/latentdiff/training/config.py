"""Training configs: typed, frozen, strict, read from one YAML file per run.

    config = load_train_config("examples/train/lsun_churches-ldm-kl-8.yaml", "diffusion",
                               overrides=["train.max_steps=100"])

A file has up to seven sections, each a frozen dataclass checked on construction:

    data        where the images are, how they are cropped and labelled
    model       the networks (architecture dicts are the components' own configs)
    optim       AdamW and the learning-rate schedule
    train       steps, batch, precision, EMA, output folder (+ stage-specific settings)
    checkpoint  how often, how many kept, resume, export, Hub upload
    logging     progress bar, TensorBoard, CSV
    sample      what to draw / reconstruct while training, and how often

An unknown section or key is a ConfigError naming it and the file: a setting that would change the run
must never be silently ignored. The nested architecture dicts (`model.architecture`, `model.unet` ...) are
checked against their component configs when the file is loaded, before any data is read.
Relative paths are relative to the working directory (as for every command-line tool).
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypedDict, overload

from .. import limits
from ..config import ComponentConfig, parse_yaml, yaml_problem
from ..errors import ConfigError, describe
from .lcm_config import LCMModelSection, LCMSampleConfig, LCMTrainSection
from .sections import (  # noqa: F401 (re-exported: the sections' public path)
    IMAGE_EXTENSIONS,
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    OptimConfig,
    TrainSection,
    _positive,
)

if TYPE_CHECKING:
    from ..diffusion.noise_scheduler import NoiseSchedulerConfig
    from ..models.autoencoder_kl import AutoencoderKLConfig
    from ..models.ldm_bert import LDMBertConfig
    from ..models.unet import UNetConfig
    from ..models.unet2d import UNet2DConfig
    from ..models.vq import VQModelConfig
    from .autoencoder_loss import AutoencoderLossConfig

Kind: TypeAlias = Literal["autoencoder", "diffusion", "controlnet", "lcm"]
KINDS = ("autoencoder", "diffusion", "controlnet", "lcm")
@dataclasses.dataclass(frozen=True)
class AutoencoderOptimConfig(OptimConfig):
    betas: tuple[float, float] = (0.5, 0.9)              # LDM's first stage (taming-transformers)
    weight_decay: float = 0.0                            # LDM trains the first stage with Adam
    discriminator_learning_rate: float | None = None     # None: learning_rate

    def validate(self) -> None:
        super().validate()
        _positive(self, "discriminator_learning_rate")


@dataclasses.dataclass(frozen=True)
class AutoencoderTrainSection(TrainSection):
    ema: bool = False                  # LDM's first stages are trained without EMA
    scaling_factor_images: int = 256   # images whose latents give the scaling factor (0: keep the config's)
    train_encoder: bool = True         # False: decoder-only fine-tuning from model.pretrained (encoder and
                                       # quant_conv frozen, so the latents, and any LDM trained on them, stay
                                       # valid; as Stability AI's ft-MSE decoders)

    def validate(self) -> None:
        super().validate()
        _positive(self, "scaling_factor_images", allow_zero=True)
        if not self.train_encoder and self.scaling_factor_images:
            raise ConfigError("decoder-only fine-tuning keeps the latents, so it keeps their scaling factor",
                              where="scaling_factor_images", expected="0 with train_encoder: false",
                              found=self.scaling_factor_images)


@dataclasses.dataclass(frozen=True)
class DiffusionTrainSection(TrainSection):
    conditioning_dropout: float = 0.1  # p of replacing the condition by the null one (classifier-free guidance)
    train_text_encoder: bool = False   # LDM-BERT style joint training
    cache_latents: bool = False        # encode the data set once (needs center_crop)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.conditioning_dropout < 1.0:
            raise ConfigError("conditioning_dropout must lie in [0, 1)", where="conditioning_dropout",
                              expected="[0, 1)", found=self.conditioning_dropout)


@dataclasses.dataclass(frozen=True)
class AutoencoderModelSection(ComponentConfig):
    type: Literal["autoencoder_kl", "vq_model"] = "autoencoder_kl"
    architecture: dict | None = None   # AutoencoderKLConfig / VQModelConfig fields; None: the defaults
    pretrained: str | None = None      # start from this model folder (its architecture then wins)
    loss: dict | None = None           # AutoencoderLossConfig fields (disc_start is required)
    lpips: str = "pretrained"          # "pretrained" (published weights), "random" (smoke runs), or a weights file
    lpips_vgg: str | None = None       # the VGG16 weights file, when `lpips` holds only the linear heads


@dataclasses.dataclass(frozen=True)
class DiffusionModelSection(ComponentConfig):
    autoencoder: str                   # a trained first-stage folder (AutoencoderKL or VQModel), kept frozen
    autoencoder_subfolder: str | None = None
    conditioning: Literal["text", "class", "none", "low_res"] = "text"   # low_res: concat, x4 super-resolution
    unet_type: Literal["unet", "unet2d"] = "unet"   # unet: cross-attention UNet; unet2d: without cross-attention
    unet: dict | None = None           # the UNet config fields
    pretrained_unet: str | None = None
    noise_scheduler: dict | None = None  # NoiseSchedulerConfig fields (prediction_type: epsilon / v_prediction)
    text_encoder: str | None = None    # folder with text_encoder/ (bert/ for ldm_bert) and tokenizer/
    text_encoder_type: Literal["clip", "ldm_bert"] = "clip"
    text_encoder_config: dict | None = None  # ldm_bert from scratch: LDMBertConfig fields (then tokenizer= needed)
    tokenizer: str | None = None       # tokenizer folder for a text encoder built from scratch
    num_classes: int | None = None     # class conditioning; None: the number of class folders

    def validate(self) -> None:
        from .conditioning import CONDITIONINGS

        mode = CONDITIONINGS[self.conditioning]
        if mode.context and self.text_encoder is None and self.text_encoder_config is None:
            raise ConfigError(f"{mode.name} conditioning needs a text encoder", where="text_encoder",
                              expected="a folder (text_encoder/ + tokenizer/), or text_encoder_config + tokenizer",
                              found=None)
        if self.text_encoder_config is not None and (
                self.text_encoder_type != "ldm_bert" or self.tokenizer is None or self.text_encoder is not None):
            raise ConfigError("a text encoder built from scratch is an ldm_bert with a tokenizer folder",
                              where="text_encoder_config",
                              expected="text_encoder_type: ldm_bert, tokenizer: FOLDER, no text_encoder",
                              found=f"type {self.text_encoder_type}, tokenizer {self.tokenizer}")
        _positive(self, "num_classes")
        if self.num_classes is not None:
            limits.check_count(self.num_classes, key="num_classes", at_least=1, at_most=limits.MAX_VOCAB,
                               where="num_classes")


@dataclasses.dataclass(frozen=True)
class AutoencoderSampleConfig(ComponentConfig):
    every_n_steps: int = 1000          # validation PSNR / SSIM and a reconstruction grid; 0: only at the end
    num_images: int = 8                # images in the reconstruction grid
    max_validation_images: int = 512   # cap on the validation images scored

    def validate(self) -> None:
        _positive(self, "every_n_steps", allow_zero=True)
        _positive(self, "num_images", "max_validation_images")


@dataclasses.dataclass(frozen=True)
class DiffusionSampleConfig(ComponentConfig):
    every_n_steps: int = 1000          # a PNG grid of samples; 0: only at the end
    prompts: tuple[str, ...] = ()      # text conditioning
    class_labels: tuple[int, ...] = () # class conditioning
    seeds: tuple[int, ...] = (0,)      # one image per (condition, seed)
    num_inference_steps: int = 50
    guidance_scale: float = 1.0
    use_ema: bool = True

    def validate(self) -> None:
        _positive(self, "every_n_steps", allow_zero=True)
        _positive(self, "num_inference_steps")
        if not self.seeds:
            raise ConfigError("sample.seeds needs at least one seed", where="seeds", expected="a list of ints",
                              found=self.seeds)


@dataclasses.dataclass(frozen=True)
class _Sections:
    """What both run configs share: a plain-dict view (the sections, not the source file). A dataclass without
    fields, so that `dataclasses.fields(self)` is typed; the run configs add the sections."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name).to_dict() for f in dataclasses.fields(self) if f.name != "source"}


@dataclasses.dataclass(frozen=True)
class AutoencoderTrainConfig(_Sections):
    data: DataConfig
    model: AutoencoderModelSection
    train: AutoencoderTrainSection
    optim: AutoencoderOptimConfig = AutoencoderOptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    sample: AutoencoderSampleConfig = AutoencoderSampleConfig()
    source: str | None = None          # the file it was read from

    kind = "autoencoder"


@dataclasses.dataclass(frozen=True)
class DiffusionTrainConfig(_Sections):
    data: DataConfig
    model: DiffusionModelSection
    train: DiffusionTrainSection
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    sample: DiffusionSampleConfig = DiffusionSampleConfig()
    source: str | None = None

    kind = "diffusion"


@dataclasses.dataclass(frozen=True)
class ControlDataConfig(DataConfig):
    conditioning_image_column: str = "conditioning_image"  # metadata column: each image's control image
    random_flip: bool = False          # a flipped image keeps its control image aligned, not its caption's words


@dataclasses.dataclass(frozen=True)
class ControlNetModelSection(ComponentConfig):
    pipeline: str                      # the frozen base: a LatentDiffusionPipeline folder or built-in name
    pretrained_controlnet: str | None = None   # continue from this ControlNet folder, else ControlNet.from_unet
    conditioning_channels: int = 3
    # the hint encoder's widths; None: (16, 32, 96, 256) cut to the autoencoder's factor (one level per halving)
    conditioning_embedding_out_channels: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class ControlNetTrainSection(TrainSection):
    conditioning_dropout: float = 0.1  # p of training on the empty prompt (the control image stays): guidance
    cache_latents: bool = False        # encode the data set once (needs center_crop)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.conditioning_dropout < 1.0:
            raise ConfigError("conditioning_dropout must lie in [0, 1)", where="conditioning_dropout",
                              expected="[0, 1)", found=self.conditioning_dropout)


@dataclasses.dataclass(frozen=True)
class ControlNetSampleConfig(ComponentConfig):
    every_n_steps: int = 1000          # a PNG grid of control images beside samples; 0: only at the end
    num_images: int = 4                # the first validation (else training) images' control images and captions
    seeds: tuple[int, ...] = (0,)
    num_inference_steps: int = 25
    guidance_scale: float = 1.5
    use_ema: bool = True

    def validate(self) -> None:
        _positive(self, "every_n_steps", allow_zero=True)
        _positive(self, "num_images", "num_inference_steps")
        if not self.seeds:
            raise ConfigError("sample.seeds needs at least one seed", where="seeds", expected="a list of ints",
                              found=self.seeds)


@dataclasses.dataclass(frozen=True)
class ControlNetTrainConfig(_Sections):
    data: ControlDataConfig
    model: ControlNetModelSection
    train: ControlNetTrainSection
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    sample: ControlNetSampleConfig = ControlNetSampleConfig()
    source: str | None = None

    kind = "controlnet"


@dataclasses.dataclass(frozen=True)
class LCMTrainConfig(_Sections):
    """`latentdiff train lcm`: latent consistency distillation of a pipeline (lcm_config.py, lcm_trainer.py)."""

    data: DataConfig
    model: LCMModelSection
    train: LCMTrainSection
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    sample: LCMSampleConfig = LCMSampleConfig()
    source: str | None = None

    kind = "lcm"


TrainConfig: TypeAlias = AutoencoderTrainConfig | DiffusionTrainConfig | ControlNetTrainConfig | LCMTrainConfig
_CLASSES: dict[str, type] = {"autoencoder": AutoencoderTrainConfig, "diffusion": DiffusionTrainConfig,
                             "controlnet": ControlNetTrainConfig, "lcm": LCMTrainConfig}


def train_config_from_dict(data: Mapping[str, Any], kind: Kind, *, source: str | None = None) -> TrainConfig:
    """Build a train config from a {section: {key: value}} mapping; strict, errors name `source` and the key."""
    if kind not in _CLASSES:
        raise ConfigError("unknown training stage", where="kind", expected=list(KINDS), found=kind)
    config = sections_from_dict(data, _CLASSES[kind], source=source)
    check_components(config)
    return config


def sections_from_dict(data: Mapping[str, Any], cls: Any, *, source: str | None = None) -> Any:
    """A run config of class `cls` (a dataclass of sections, with `kind`) from a {section: {key: value}} mapping,
    strictly; the one parser of every stage's file, also for stages defined outside this module."""
    kind = cls.kind
    if not isinstance(data, Mapping):
        raise ConfigError("a train config must be a mapping of sections", where=source, expected="a YAML mapping",
                          found=describe(data))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    hints = typing.get_type_hints(cls)
    unknown = sorted(k for k in data if k not in fields)
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown} in the {kind} config", where=source,
                          expected=f"sections among {sorted(fields)}", found=unknown)
    sections: dict[str, Any] = {}
    for name, field in fields.items():
        section_class = hints[name]
        value = data.get(name)
        if value is None and field.default is dataclasses.MISSING:
            raise ConfigError(f"missing section {name!r} in the {kind} config", where=source,
                              expected=f"a {name}: mapping", found=sorted(data))
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"section {name!r} must be a mapping", where=f"{source}: {name}",
                              expected="key: value pairs", found=describe(value))
        where = f"{source}: {name}" if source else name
        try:
            sections[name] = section_class.from_dict(value or {}, source=where)
        except ConfigError as e:
            if e.where is not None and str(e.where).startswith(where):
                raise
            raise ConfigError(e.message, where=f"{where}.{e.where}" if e.where else where, expected=e.expected,
                              found=e.found) from None
    return cls(**sections, source=source)


def load_train_config(path: str | Path, kind: Kind, *, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML train config; `overrides` are "section.key=value" strings (value parsed as YAML)."""
    return train_config_from_dict(read_train_file(path, overrides=overrides), kind, source=str(path))


def read_train_file(path: str | Path, *, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The {section: {key: value}} mapping of a YAML train file, with the overrides applied."""
    yaml = _yaml()
    path = Path(path)
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"), where=str(path))
    except FileNotFoundError:
        raise ConfigError("train config file not found", where=str(path)) from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"train config is not valid YAML ({yaml_problem(e)})", where=str(path)) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError("a train config must be a mapping of sections", where=str(path),
                          expected="a YAML mapping", found=describe(data))
    for item in overrides:
        apply_override(data, item)
    return data


def _yaml() -> Any:
    """pyyaml, imported lazily (only training reads YAML), with an error that says how to get it."""
    try:
        import yaml
    except ModuleNotFoundError:
        raise ConfigError("reading a train config needs pyyaml", expected="pip install 'latentdiff[train]'",
                          found="pyyaml not installed") from None
    return yaml


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set data[section][key] from "section.key=value" (value parsed as YAML, so 3 is an int, [1, 2] a list)."""
    yaml = _yaml()
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError("an override must look like section.key=value", where="--set",
                          expected="e.g. train.max_steps=100", found=item)
    target = data
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError("override path goes through a value that is not a mapping", where=item)
    try:
        target[parts[-1]] = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"override value is not valid YAML ({yaml_problem(e)})", where="--set",
                          expected="e.g. train.max_steps=100", found=item) from None


def check_components(config: TrainConfig) -> None:
    """Check the nested component dicts against their own configs now, with the file and key in errors."""
    where = f"{config.source}: model" if config.source else "model"
    if isinstance(config, (ControlNetTrainConfig, LCMTrainConfig)):   # networks from the base pipeline, checked at load
        if config.train.cache_latents and not config.data.center_crop:
            raise ConfigError("cached latents need a fixed crop", where="train.cache_latents",
                              expected="data.center_crop: true", found="center_crop: false")
        return
    build_component_configs(config, where=where)


class AutoencoderComponents(TypedDict):
    """The autoencoder stage's component configs (`build_component_configs`)."""

    architecture: AutoencoderKLConfig | VQModelConfig
    loss: AutoencoderLossConfig


class DiffusionComponents(TypedDict):
    """The diffusion stage's component configs (`build_component_configs`); text_encoder: a new LDM-BERT's."""

    unet: UNetConfig | UNet2DConfig
    noise_scheduler: NoiseSchedulerConfig
    text_encoder: LDMBertConfig | None


@overload
def build_component_configs(config: AutoencoderTrainConfig, *, where: str = "model") -> AutoencoderComponents: ...


@overload
def build_component_configs(config: DiffusionTrainConfig, *, where: str = "model") -> DiffusionComponents: ...


def build_component_configs(config: AutoencoderTrainConfig | DiffusionTrainConfig, *,
                            where: str = "model") -> AutoencoderComponents | DiffusionComponents:
    """The component configs named by the model section (architecture dicts -> typed configs)."""
    if isinstance(config, AutoencoderTrainConfig):
        return _autoencoder_components(config.model, where)
    return _diffusion_components(config, where)


def _autoencoder_components(model: AutoencoderModelSection, where: str) -> AutoencoderComponents:
    from ..models.autoencoder_kl import AutoencoderKLConfig
    from .autoencoder_loss import AutoencoderLossConfig

    architecture: AutoencoderKLConfig | VQModelConfig
    if model.type == "vq_model":
        from ..models.vq import VQModelConfig

        architecture = VQModelConfig.from_dict(model.architecture or {}, source=f"{where}.architecture")
    else:
        architecture = AutoencoderKLConfig.from_dict(model.architecture or {}, source=f"{where}.architecture")
    return {"architecture": architecture,
            "loss": AutoencoderLossConfig.from_dict(model.loss or {}, source=f"{where}.loss")}


def _diffusion_components(config: DiffusionTrainConfig, where: str) -> DiffusionComponents:
    from ..diffusion.noise_scheduler import NoiseSchedulerConfig

    model = config.model
    unet: UNetConfig | UNet2DConfig
    if model.unet_type == "unet2d":
        from ..models.unet2d import UNet2DConfig

        unet = UNet2DConfig.from_dict(model.unet or {}, source=f"{where}.unet")
    else:
        from ..models.unet import UNetConfig

        unet = UNetConfig.from_dict(model.unet or {}, source=f"{where}.unet")
    built: DiffusionComponents = {
        "unet": unet,
        "noise_scheduler": NoiseSchedulerConfig.from_dict(model.noise_scheduler or {},
                                                          source=f"{where}.noise_scheduler"),
        "text_encoder": None,
    }
    if model.text_encoder_config is not None:
        from ..models.ldm_bert import LDMBertConfig

        built["text_encoder"] = LDMBertConfig.from_dict(model.text_encoder_config,
                                                        source=f"{where}.text_encoder_config")
    check_conditioning(config, built["unet"], where=where)
    return built


def check_conditioning(config: DiffusionTrainConfig, unet: Any, *, where: str) -> None:
    """The UNet must be able to take the conditioning the config asks for."""
    from .conditioning import CONDITIONINGS

    mode, cross = CONDITIONINGS[config.model.conditioning], getattr(unet, "cross_attention_dim", None)
    if mode.context and (config.model.unet_type != "unet" or cross is None):
        raise ConfigError(f"{mode.name} conditioning needs a cross-attention UNet", where=f"{where}.unet",
                          expected="unet_type: unet with cross_attention_dim set", found=config.model.unet_type)
    if not mode.context and cross is not None and config.model.unet_type == "unet":
        raise ConfigError(f"conditioning {mode.name!r} has no context for cross-attention", where=f"{where}.unet",
                          expected="cross_attention_dim: null", found=cross)
    class_conditional = getattr(unet, "num_class_embeds", None) is not None
    if mode.class_embeds != class_conditional:
        raise ConfigError("class conditioning and the UNet's num_class_embeds go together", where=f"{where}.unet",
                          expected="num_class_embeds = classes + 1 (the null class) iff conditioning: class",
                          found=getattr(unet, "num_class_embeds", None))
    if config.train.cache_latents and not config.data.center_crop:
        raise ConfigError("cached latents need a fixed crop", where="train.cache_latents",
                          expected="data.center_crop: true", found="center_crop: false")
    if config.train.cache_latents and mode.needs_pixels:
        raise ConfigError(f"{mode.name} conditioning needs the images, not only their latents",
                          where="train.cache_latents", expected=f"false with conditioning: {mode.name}", found=True)
