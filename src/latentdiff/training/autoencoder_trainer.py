"""Stage 1: the perceptual + adversarial autoencoder (Rombach et al. 2022, sec. 3.1 and app. G).

Two optimizers per step, as in LDM (taming-transformers): the autoencoder minimises the generator loss
(L1 + LPIPS + adaptive-weight adversarial term + KL or codebook loss, `AutoencoderLoss.generator_loss`),
then the patch discriminator minimises its hinge loss on the detached reconstructions
(`AutoencoderLoss.discriminator_loss`). The discriminator's parameters are frozen during the generator
pass (its gradients there would be thrown away). KL models decode a posterior sample z ~ q(z|x) while
training; validation decodes the posterior mode and reports PSNR and SSIM.

After training, the latent scaling factor 1 / std(z) over a sample of the data (app. G: "rescale the
latents to unit standard deviation") is written into the exported autoencoder's config, so the diffusion
stage sees unit-variance latents.

    AutoencoderTrainer(load_train_config("vq-f4.yaml", "autoencoder")).fit()   # -> OUTPUT_DIR/autoencoder
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..config import ComponentConfig
from ..errors import ConfigError, describe
from ..layers.attention import SpatialSelfAttention
from ..layers.resnet import ResnetBlock
from ..models.base import ModelMixin
from .config import AutoencoderTrainConfig, build_component_configs
from .data import build_datasets, fixed_batches
from .ema import EMA
from .loop import Trainer, enable_gradient_checkpointing, save_image_grid

if TYPE_CHECKING:
    from ..models.autoencoder_kl import AutoencoderKL
    from ..models.vq import VQModel
    from .autoencoder_loss import AutoencoderLossConfig
    from .config import AutoencoderModelSection

SCALE_BATCH = 16  # images per encoder call when measuring the latent std


class AutoencoderTrainer(Trainer):
    stage = "autoencoder"
    export_name = "autoencoder"
    config: AutoencoderTrainConfig
    autoencoder: AutoencoderKL | VQModel
    loss_fn: Any        # an AutoencoderLoss-like module: generator_loss, discriminator_loss (duck-typed)

    def __init__(self, config: AutoencoderTrainConfig, *, accelerator: Any = None, loss: nn.Module | None = None):
        """`loss`: an AutoencoderLoss-like module (default: built from model.loss)."""
        super().__init__(config, accelerator=accelerator)
        where = f"{config.source}: model" if config.source else "model"
        built = build_component_configs(config, where=where)
        self.train_set, self.valid_set = build_datasets(config.data, seed=config.train.seed)  # data errors first
        self.autoencoder = build_autoencoder(config, built["architecture"]).to(self.device).train()
        factor = self.autoencoder.downsample_factor
        if config.data.resolution % factor:
            raise ConfigError("the image size must be a multiple of the autoencoder's factor",
                              where="data.resolution", expected=f"a multiple of {factor}",
                              found=config.data.resolution)
        self.loss_fn = loss if loss is not None else build_loss(config.model, built["loss"])
        self.loss_fn.to(self.device).train()
        discriminator = getattr(self.loss_fn, "discriminator", self.loss_fn)
        self.discriminator_params = [p for p in discriminator.parameters() if p.requires_grad]
        self.modules = {"autoencoder": self.autoencoder, "discriminator": discriminator}
        if config.train.gradient_checkpointing:
            enable_gradient_checkpointing(self.autoencoder, (ResnetBlock, SpatialSelfAttention))
        t = config.train
        self.ema = EMA(self.autoencoder, decay=t.ema_decay, warmup=t.ema_warmup) if t.ema else None
        optim = config.optim
        if not t.train_encoder:
            freeze_encoder(self.autoencoder, where=where)
        trainable = [p for p in self.autoencoder.parameters() if p.requires_grad]
        self.add_optimizer("autoencoder", trainable, optim)
        d_lr = optim.discriminator_learning_rate
        self.add_optimizer("discriminator", self.discriminator_params,
                           optim if d_lr is None else optim.replace(learning_rate=d_lr))

    @property
    def is_kl(self) -> bool:
        from ..models.autoencoder_kl import AutoencoderKL

        return isinstance(self.autoencoder, AutoencoderKL)

    # ---- one step: generator update, then discriminator update -------------------------------------
    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        acc, n = self.accelerator, len(micro_batches)
        last_layer = self.autoencoder.decoder.conv_out.weight
        logs: dict[str, torch.Tensor] = {}
        pairs = []
        self._discriminator_trainable(False)
        for m, batch in enumerate(micro_batches):
            x = batch["pixel_values"].to(self.device, non_blocking=True)
            with acc.autocast():
                reconstruction, extra = self.reconstruct(x, self.random(m))
                loss, log = self.loss_fn.generator_loss(x, reconstruction, global_step=self.step,
                                                        last_layer=last_layer, **extra)
            acc.backward(loss / n)
            _accumulate(logs, {"loss": loss, **log}, n, self.device)
            pairs.append((x, reconstruction.detach()))
        self._discriminator_trainable(True)
        norm = self.step_optimizer("autoencoder", max_grad_norm=self.config.optim.max_grad_norm)
        if self.ema is not None:
            self.ema.update()
        d_norm = None
        if self._discriminator_active():  # before disc_start the discriminator loss is a constant 0
            for x, reconstruction in pairs:
                with acc.autocast():
                    d_loss, d_log = self.loss_fn.discriminator_loss(x, reconstruction, global_step=self.step)
                acc.backward(d_loss / n)
                _accumulate(logs, {"loss_discriminator": d_loss, **d_log}, n, self.device)
            d_norm = self.step_optimizer("discriminator", max_grad_norm=self.config.optim.max_grad_norm)
        logs |= {k: v for k, v in (("grad_norm", norm), ("grad_norm_discriminator", d_norm)) if v is not None}
        return logs

    def reconstruct(self, x: torch.Tensor, rnd: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """x (B, 3, H, W) -> (reconstruction, generator_loss keywords). KL: decode z ~ q(z|x) drawn from the
        step's generator (the mode when rnd is None); VQ: decode the quantized code, return its loss."""
        from ..models.autoencoder_kl import AutoencoderKL

        ae = self.autoencoder
        if isinstance(ae, AutoencoderKL):        # self.is_kl, spelled so that the type checker sees it
            posterior = ae.encode(x)
            z = posterior.mode() if rnd is None else posterior.mean + posterior.std * rnd.randn(
                posterior.mean.shape, stream=0)
            return ae.decode(z), {"posterior": posterior}
        z_q, codebook_loss, _ = ae.quantize(ae.encode(x))
        return ae.decode(z_q, force_not_quantize=True), {"codebook_loss": codebook_loss}

    def _discriminator_active(self) -> bool:
        active = getattr(self.loss_fn, "discriminator_active", None)
        return True if active is None else bool(active(self.step))

    def _discriminator_trainable(self, flag: bool) -> None:
        for p in self.discriminator_params:
            p.requires_grad_(flag)

    # ---- validation, scaling factor, export --------------------------------------------------------
    @torch.no_grad()
    def validate(self, *, limit: int | None = None) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        """PSNR and SSIM of posterior-mode reconstructions over the validation images (else the first
        training images). -> (metrics, originals, reconstructions), images in [-1, 1]."""
        from ..metrics.image import psnr, ssim

        data = self.valid_set or self.train_set
        count = min(limit or self.config.sample.max_validation_images, len(data))
        was_training = self.autoencoder.training
        self.autoencoder.eval()
        scores: dict[str, float] = {"val/psnr": 0.0, "val/ssim": 0.0}
        originals, reconstructions = [], []
        try:
            for batch in fixed_batches(data, count, self.local_batch):
                x = batch["pixel_values"].to(self.device)
                rec = self.reconstruct(x)[0].float().clamp(-1, 1)
                a, b = (x + 1) / 2, (rec + 1) / 2
                scores["val/psnr"] += float(psnr(b, a, data_range=1.0).mean()) * len(x) / count
                scores["val/ssim"] += float(ssim(b, a, data_range=1.0).mean()) * len(x) / count
                originals.append(x.cpu())
                reconstructions.append(rec.cpu())
        finally:
            self.autoencoder.train(was_training)
        return scores, torch.cat(originals), torch.cat(reconstructions)

    def evaluate(self, step: int) -> None:
        with self.ema.applied() if self.ema is not None else nullcontext():
            scores, originals, reconstructions = self.validate()
        self.log.log(step, scores)
        k = self.config.sample.num_images
        grid = torch.cat([originals[:k], reconstructions[:k]])
        save_image_grid(grid, self.output_dir / "reconstructions" / f"step-{step:08d}.png", rows=2,
                        params={"step": step, **scores})
        if step == self.config.train.max_steps:
            self._write_for_rfid(originals, reconstructions)

    def _write_for_rfid(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
        """Every validation image and its reconstruction as PNG files, for rFID between the two folders."""
        from ..pipelines.base import to_output

        for name, images in (("originals", originals), ("reconstructions", reconstructions)):
            folder = self.output_dir / "rfid" / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(to_output(images, "pil")):
                image.save(folder / f"{i:06d}.png")

    @torch.no_grad()
    def scaling_factor(self) -> float | None:
        """1 / std of latents z ~ q(z|x) (VQ: the encoder output) over the first scaling_factor_images
        training images, with a fixed generator. None when scaling_factor_images is 0."""
        count = min(self.config.train.scaling_factor_images, len(self.train_set))
        if not count:
            return None
        generator = torch.Generator().manual_seed(self.config.train.seed)
        total = total_sq = 0.0
        numel = 0
        self.autoencoder.eval()
        for batch in fixed_batches(self.train_set, count, SCALE_BATCH):
            x = batch["pixel_values"].to(self.device)
            out = self.autoencoder.encode(x)
            z = out if isinstance(out, torch.Tensor) else out.sample(generator)   # VQ: the encoder output
            z = z.double()
            total, total_sq, numel = total + float(z.sum()), total_sq + float((z * z).sum()), numel + z.numel()
        self.autoencoder.train()
        variance = (total_sq - total * total / numel) / max(1, numel - 1)
        return 1.0 / max(variance, 1e-12) ** 0.5

    def export(self) -> Path:
        """The (EMA) autoencoder with the measured scaling factor, as a model folder; main process writes."""
        folder = self.export_folder()
        if self.accelerator.is_main_process:
            with self.ema.applied() if self.ema is not None else nullcontext():
                scale = self.scaling_factor()
                config = self.autoencoder.config if scale is None else \
                    self.autoencoder.config.replace(scaling_factor=scale)
                cls: type[ModelMixin[Any]] = type(self.autoencoder)   # KL or VQ, with its own config type
                model = cls.from_state_dict(config, self.autoencoder.state_dict())
            model.save_pretrained(folder)
            if scale is not None:
                self.accelerator.print(f"latentdiff: latent scaling factor {scale:.5f} (1 / std of the latents)")
        self.accelerator.wait_for_everyone()
        return folder


# ---- helpers ---------------------------------------------------------------------------------------
def freeze_encoder(autoencoder: nn.Module, *, where: str) -> None:
    """Decoder-only fine-tuning: the encoder (and quant_conv) stop learning, so q(z|x) stays what it was."""
    if not getattr(autoencoder, "quant_conv", None) and not hasattr(autoencoder, "encoder"):
        raise ConfigError("train_encoder: false needs an autoencoder with an encoder", where=where,
                          expected="AutoencoderKL or VQModel", found=describe(autoencoder))
    for part in (autoencoder.encoder, getattr(autoencoder, "quant_conv", None)):
        if part is not None:
            part.requires_grad_(False)


def build_loss(model: AutoencoderModelSection, loss_config: AutoencoderLossConfig) -> nn.Module:
    """AutoencoderLoss with the LPIPS network the model section names (published, random, or a file)."""
    from ..metrics.lpips import LPIPS
    from .autoencoder_loss import AutoencoderLoss

    perceptual = None
    if loss_config.perceptual_weight > 0:
        if model.lpips == "random":
            perceptual = LPIPS(pretrained=False)
        else:
            perceptual = LPIPS.from_pretrained(None if model.lpips == "pretrained" else model.lpips,
                                               vgg_path=model.lpips_vgg)
    return AutoencoderLoss(loss_config, perceptual=perceptual)


def build_autoencoder(config: AutoencoderTrainConfig, architecture: ComponentConfig) -> AutoencoderKL | VQModel:
    from ..models.autoencoder_kl import AutoencoderKL

    cls: type[AutoencoderKL] | type[VQModel]
    if config.model.type == "vq_model":
        from ..models.vq import VQModel

        cls = VQModel
    else:
        cls = AutoencoderKL
    if config.model.pretrained:
        return cls.from_pretrained(config.model.pretrained)
    # from_config checks that the architecture is this class's own config (a ConfigError otherwise)
    return cls.from_config(cast(Any, architecture))


def _accumulate(logs: dict[str, torch.Tensor], values: dict[str, Any], n: int, device: torch.device) -> None:
    """Running mean over the micro-batches of the scalar values (tensors detached, numbers made tensors)."""
    for k, v in values.items():
        if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1):
            v = torch.as_tensor(v, dtype=torch.float32, device=device).detach().reshape(())
            logs[k] = logs.get(k, 0) + v / n
