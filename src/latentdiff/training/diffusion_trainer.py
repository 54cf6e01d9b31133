"""Stage 2: latent diffusion on the frozen first stage's latents (Rombach et al. 2022, sec. 3.2-3.3, eq. 2).

    L_LDM = E_{z0 = E(x), eps ~ N(0, I), t ~ U{0..T-1}} || eps - eps_theta(z_t, t, tau_theta(y)) ||^2

with z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps. The target is eps, or v (Salimans & Ho 2022) or z0 as
the noise scheduler's prediction_type says. z0 is a draw from the KL posterior q(z|x) (or the VQ encoder's
output), scaled by the autoencoder's scaling_factor. Conditioning y: a caption through the text encoder
(frozen, or trained jointly the LDM-BERT way), a class label, or the low-resolution image concatenated to
z_t (x4 super-resolution); for classifier-free guidance (Ho & Salimans 2021) the caption is replaced by ""
and the class by the null class with probability `conditioning_dropout`.

The export is the pipeline that samples the trained model, written by that pipeline: LatentDiffusionPipeline
(text: CLIP or LDM-BERT, KL or VQ first stage), ClassConditionalPipeline (class: id2label from the class
folders, the null class for guidance), UnconditionalPipeline (none), SuperResolutionPipeline (low_res).
SuperResolutionPipeline decodes z0 unscaled, as diffusers' LDMSuperResolutionPipeline and LDM-SR (trained on
unscaled VQ latents), so low_res mode diffuses the first stage's unscaled latents whatever its scaling_factor.
Each mode is one strategy of `conditioning.py`, chosen once; previews run through the export's pipeline.

    DiffusionTrainer(load_train_config("ldm.yaml", "diffusion")).fit()   # -> the exported pipeline folder
"""
from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import hub
from ..diffusion.noise_scheduler import NoiseScheduler
from ..diffusion.samplers import DDIMSampler
from ..errors import CheckpointError, ConfigError
from ..layers.attention import BasicTransformerBlock, SpatialSelfAttention
from ..layers.resnet import ResnetBlock
from .conditioning import (
    CONDITIONINGS,
    low_res,  # noqa: F401 (re-exported: its public path before it moved)
)
from .config import DiffusionTrainConfig, build_component_configs
from .data import build_datasets, fixed_batches
from .ema import EMA
from .loop import Trainer, enable_gradient_checkpointing, save_image_grid

if TYPE_CHECKING:
    from ..models.autoencoder_kl import AutoencoderKL
    from ..models.unet import UNet2DConditional
    from ..models.unet2d import UNet2D
    from ..models.vq import VQModel

CACHE_FILE = "latent_cache.safetensors"
CACHE_BATCH = 64  # images encoded per call while building the latent cache
CHECKPOINTED_BLOCKS = (ResnetBlock, BasicTransformerBlock, SpatialSelfAttention)


class DiffusionTrainer(Trainer):
    stage = "diffusion"
    export_name = "pipeline"
    config: DiffusionTrainConfig
    vae: AutoencoderKL | VQModel
    unet: UNet2DConditional | UNet2D

    def __init__(self, config: DiffusionTrainConfig, *, accelerator: Any = None):
        super().__init__(config, accelerator=accelerator)
        model, train = config.model, config.train
        built = build_component_configs(config, where=f"{config.source}: model" if config.source else "model")
        self.train_set, self.valid_set = build_datasets(config.data, seed=train.seed,  # data errors first
                                                        load_pixels=not train.cache_latents)
        self.vae = load_first_stage(model.autoencoder, subfolder=model.autoencoder_subfolder).to(self.device)
        self.vae.requires_grad_(False)
        self.noise_scheduler = NoiseScheduler(built["noise_scheduler"])
        self.conditioning = CONDITIONINGS[model.conditioning]
        self.unet = build_unet(config, built["unet"]).to(self.device).train()
        self.text_encoder = load_text_encoder(config, built["text_encoder"]) if self.conditioning.context else None
        self.num_classes = self._check_labels()
        self._check_channels()
        self.modules = {"unet": self.unet}
        if self.text_encoder is not None:
            self.text_encoder.to(self.device)
            self.text_encoder.model.requires_grad_(train.train_text_encoder).train(train.train_text_encoder)
            if train.train_text_encoder:
                self.modules["text_encoder"] = self.text_encoder.model
        # The pipeline the export writes; built now so parts it cannot take are an error before training. It holds
        # the trainer's own modules, so what it samples and saves are the weights in them (the EMA's when applied).
        self.pipeline = self.build_pipeline()
        # Previews run through this pipeline's stages; the weights it holds are being trained, so its release of
        # memory-mapped weights between stages (for inference) stays off.
        self.pipeline.release_weights = False
        trained = nn.ModuleDict(self.modules)
        if train.gradient_checkpointing:
            self._enable_gradient_checkpointing(trained)
        self.ema = EMA(trained, decay=train.ema_decay, warmup=train.ema_warmup) if train.ema else None
        self.add_optimizer("model", trained.parameters(), config.optim)
        self.cache = self._latent_cache() if train.cache_latents else None

    def _enable_gradient_checkpointing(self, trained: nn.Module) -> None:
        from ..models.ldm_bert import LDMBertLayer

        enable_gradient_checkpointing(trained, CHECKPOINTED_BLOCKS + (LDMBertLayer,))
        text_model = self.modules.get("text_encoder")
        enable = getattr(text_model, "gradient_checkpointing_enable", None)
        if text_model is not None and enable is not None:
            enable()  # a transformers model checkpoints its own layers

    # ---- setup checks -----------------------------------------------------------------------------
    def _check_labels(self) -> int | None:
        mode, labels = self.conditioning, self.train_set.index.labels
        if mode.labels is not None and labels != mode.labels:
            raise ConfigError(f"{mode.name} conditioning needs {mode.labels} in the data", where="data.labels",
                              expected=mode.labels, found=labels)
        if not mode.class_embeds:
            return None
        classes = self.config.model.num_classes or len(self.train_set.index.class_names)
        embeds = getattr(self.unet.config, "num_class_embeds", None)   # a UNet2D has none: check_conditioning
        if embeds != classes + 1:
            raise ConfigError("the UNet needs one class embedding per class plus the null class",
                              where="model.unet.num_class_embeds", expected=classes + 1, found=embeds)
        return classes

    def _check_channels(self) -> None:
        c = self.vae.latent_channels
        extra = self.conditioning.extra_channels
        unet = self.unet.config
        if unet.in_channels != c + extra or unet.out_channels != c:
            raise ConfigError("the UNet's channels do not fit the autoencoder's latents", where="model.unet",
                              expected=f"in_channels {c + extra}, out_channels {c}",
                              found=f"in_channels {unet.in_channels}, out_channels {unet.out_channels}")
        if self.config.data.resolution % self.vae.downsample_factor:
            raise ConfigError("the image size must be a multiple of the autoencoder's factor",
                              where="data.resolution", expected=f"a multiple of {self.vae.downsample_factor}",
                              found=self.config.data.resolution)

    # ---- one optimizer step ---------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        acc, n = self.accelerator, len(micro_batches)
        total = torch.zeros((), device=self.device)
        for m, batch in enumerate(micro_batches):
            rnd = self.random(m)
            with torch.no_grad():
                z0, pixels = self.latents(batch, rnd)
            b = z0.shape[0]
            noise = rnd.randn(z0.shape, stream=1)
            t = rnd.randint(self.noise_scheduler.num_train_timesteps, b, stream=2)
            drop = rnd.rand(b, stream=3) < self.config.train.conditioning_dropout
            x_t = self.noise_scheduler.add_noise(z0, noise, t)
            target = self.noise_scheduler.training_target(z0, noise, t)
            with acc.autocast():
                x_in, kwargs = self.condition(x_t, batch, pixels, drop)
                prediction = self.unet(x_in, t, **kwargs)
            loss = F.mse_loss(prediction.float(), target.float())
            acc.backward(loss / n)
            total += loss.detach()
        return self.finish_step(total, n)

    def finish_step(self, total: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
        """The optimizer step after `n` micro-batches whose losses sum to `total` (clipped, then the EMA), and the
        step's logs: the mean loss and the gradient norm (when clipping measured one)."""
        norm = self.step_optimizer("model", max_grad_norm=self.config.optim.max_grad_norm)
        if self.ema is not None:
            self.ema.update()
        logs = {"loss": total / n}
        if norm is not None:
            logs["grad_norm"] = norm
        return logs

    def latents(self, batch: dict[str, Any], rnd: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (z0 (B, C, h, w) as the pipeline decodes it, pixels (B, 3, H, W) or None with cached latents)."""
        if self.cache is not None:
            moments = self.cache[batch["index"], batch["flip"].long()].to(self.device)
            return self.diffusion_latents(sample_moments(self.vae, moments, rnd)), None
        pixels = batch["pixel_values"].to(self.device, non_blocking=True)
        return self.diffusion_latents(sample_moments(self.vae, encode_moments(self.vae, pixels), rnd)), pixels

    def diffusion_latents(self, z: torch.Tensor) -> torch.Tensor:
        """First-stage latents (B, C, h, w) -> z0 the model diffuses: scaled by the scaling_factor, except for
        low_res, whose pipeline (SuperResolutionPipeline, as LDM-SR) decodes unscaled latents."""
        return self.vae.scale_latents(z) if self.conditioning.scaled_latents else z

    def condition(self, x_t: torch.Tensor, batch: dict[str, Any], pixels: torch.Tensor | None,
                  drop: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The UNet input and its conditioning keywords; dropped samples get the null condition."""
        return self.conditioning.unet_inputs(self, x_t, batch, pixels, drop)

    # ---- latent caching ---------------------------------------------------------------------------
    def _latent_cache(self) -> torch.Tensor:
        """(N, flips, C', h, w) posterior moments of every training image (and of its mirror image when
        random_flip), computed once by the main process and kept in OUTPUT_DIR/latent_cache.safetensors."""
        acc = self.accelerator
        path = self.output_dir / CACHE_FILE
        key = self._cache_key()
        if acc.is_main_process and not _cache_matches(path, key):
            flips = (False, True) if self.config.data.random_flip else (False,)
            data, rows = self.train_set, []
            with torch.no_grad():
                for start in range(0, len(data), CACHE_BATCH):
                    # an unreadable image is replaced (or an error) as the loader would do it
                    images = torch.stack([data.load_readable(i, flip=f)[0]
                                          for i in range(start, min(start + CACHE_BATCH, len(data))) for f in flips])
                    moments = encode_moments(self.vae, images.to(self.device)).cpu()
                    rows.extend(moments.unflatten(0, (-1, len(flips))))
            path.parent.mkdir(parents=True, exist_ok=True)
            hub.save_safetensors({"moments": torch.stack(rows)}, path, metadata={"key": key})
        acc.wait_for_everyone()
        return hub.load_safetensors(path)["moments"]

    def _cache_key(self) -> str:
        files = [str(r.path) for r in self.train_set.index.records]
        parts = [files, self.config.data.resolution, self.config.data.random_flip, self.config.model.autoencoder,
                 self.vae.to_file_config()]
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    # ---- samples and export -------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, *, use_ema: bool = True) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] for the sample section's conditions x seeds, by the export's pipeline
        (DDIM): x_T drawn per sample from its seed, the stages of the conditioning's pipeline, decoded once."""
        cfg = self.config.sample
        conditions = self.conditioning.preview_conditions(self)
        seeds = [s for s in cfg.seeds for _ in range(len(conditions))]
        conditions = conditions * len(cfg.seeds)
        size = self.config.data.resolution
        x_T = self.pipeline.prepare_latents(len(seeds), size, size,
                                            generator=[torch.Generator().manual_seed(s) for s in seeds])
        modules = list(self.modules.values())
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            with self.ema.applied() if (use_ema and self.ema is not None) else nullcontext():
                z0 = self.conditioning.preview(self.pipeline, conditions, x_T, guidance_scale=cfg.guidance_scale,
                                               num_inference_steps=cfg.num_inference_steps)
                return self.pipeline.decode(z0).clamp(-1, 1)  # unscaled for low_res, as the export
        finally:
            for m, mode in zip(modules, was_training, strict=True):
                m.train(mode)

    def preview_images(self, count: int) -> torch.Tensor:
        """The first `count` validation images (training images when none are held out): (count, 3, H, W)."""
        data = self.valid_set or self.train_set
        return next(fixed_batches(_with_pixels(data), count, count))["pixel_values"]

    def evaluate(self, step: int) -> None:
        images = self.sample(use_ema=self.config.sample.use_ema)
        save_image_grid(images, self.output_dir / "samples" / f"step-{step:08d}.png",
                        rows=len(self.config.sample.seeds), params={"step": step, "stage": self.stage})

    def export(self) -> Path:
        """The EMA weights (else the trained ones) as a pipeline folder; main process writes."""
        folder = self.export_folder()
        if self.accelerator.is_main_process:
            with self.ema.applied() if self.ema is not None else nullcontext(), hub.atomic_folder(folder) as tmp:
                self.pipeline.write_files(tmp)
        self.accelerator.wait_for_everyone()
        return folder

    def build_pipeline(self) -> Any:
        """The latentdiff pipeline of this conditioning over the trainer's first stage, UNet (and text encoder)."""
        parts = dict(vae=self.vae, unet=self.unet, noise_scheduler=self.noise_scheduler, sampler=DDIMSampler())
        return self.conditioning.build_pipeline(self, parts)


# ---- helpers ---------------------------------------------------------------------------------------
def load_first_stage(path: str, *, subfolder: str | None = None) -> AutoencoderKL | VQModel:
    """An AutoencoderKL or VQModel folder (config.json's _class_name says which), in eval mode."""
    from ..config import read_json
    from ..models.autoencoder_kl import AutoencoderKL
    from ..models.vq import VQModel

    root = Path(path)
    if subfolder is None and not (root / "config.json").is_file():
        subfolder = next((s for s in ("vae", "vqvae") if (root / s / "config.json").is_file()), None)
    folder = root / subfolder if subfolder else root
    if not (folder / "config.json").is_file():
        raise CheckpointError("no first-stage model folder", where=str(folder),
                              expected="config.json + weights of an AutoencoderKL or VQModel")
    name = read_json(folder / "config.json").get("_class_name")
    classes: dict[str, type[AutoencoderKL] | type[VQModel]] = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}
    if name not in classes:
        raise CheckpointError("the first stage must be an AutoencoderKL or a VQModel", where=str(folder),
                              expected=sorted(classes), found=name)
    return classes[name].from_pretrained(root, subfolder=subfolder).eval()


def build_unet(config: DiffusionTrainConfig, unet_config: Any) -> UNet2DConditional | UNet2D:
    from ..models.unet import UNet2DConditional
    from ..models.unet2d import UNet2D

    cls: type[UNet2DConditional] | type[UNet2D] = UNet2D if config.model.unet_type == "unet2d" else UNet2DConditional
    if config.model.pretrained_unet:
        return cls.from_pretrained(config.model.pretrained_unet)
    return cls.from_config(unet_config)     # cls(unet_config): the model checks the config's type


def load_text_encoder(config: DiffusionTrainConfig, scratch_config: Any) -> Any:
    """The text encoder the model section names: a CLIP-style folder, an LDM-BERT folder, or a new LDM-BERT."""
    from ..models.ldm_bert import LDMBert, LDMBertTextEncoder, load_bert_tokenizer
    from ..models.text_encoder import TextEncoder

    model = config.model
    if scratch_config is not None:
        from ..models.text_encoder import TextEncoderConfig

        settings = TextEncoderConfig(max_length=scratch_config.max_position_embeddings)
        assert model.tokenizer is not None      # DiffusionModelSection.validate: text_encoder_config needs one
        return LDMBertTextEncoder(LDMBert(scratch_config), load_bert_tokenizer(Path(model.tokenizer)), settings)
    assert model.text_encoder is not None       # validate: a context conditioning needs a text encoder
    root = Path(model.text_encoder)
    if model.text_encoder_type == "ldm_bert":
        return LDMBertTextEncoder.from_pretrained(root)
    nested = (root / "text_encoder").is_dir()
    return TextEncoder.from_pretrained(root, "text_encoder" if nested else None,
                                       tokenizer_subfolder="tokenizer" if nested else None)


def encode_moments(vae: AutoencoderKL | VQModel, pixels: torch.Tensor) -> torch.Tensor:
    """KL: the posterior's (mean, logvar) stacked on channels (B, 2C, h, w); VQ: the encoder output (B, C, h, w)."""
    out = vae.encode(pixels)
    return out if isinstance(out, torch.Tensor) else torch.cat([out.mean, out.logvar], dim=1)


def sample_moments(vae: AutoencoderKL | VQModel, moments: torch.Tensor, rnd: Any) -> torch.Tensor:
    """z ~ q(z|x) = mean + exp(logvar / 2) eps, eps from the step's generator (stream 0); VQ: as it is."""
    if moments.shape[1] == vae.latent_channels:
        return moments
    mean, logvar = moments.chunk(2, dim=1)
    return mean + torch.exp(0.5 * logvar) * rnd.randn(mean.shape, stream=0)


def _with_pixels(data: Any) -> Any:
    import copy

    if data.load_pixels:
        return data
    data = copy.copy(data)
    data.load_pixels = True
    return data


def _cache_matches(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("key") == key
