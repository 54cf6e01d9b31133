"""The first-stage objective: reconstruction + perceptual + regulariser + patch-GAN (Rombach et al. 2022,
sec. 3.1 and app. G; Esser et al. 2021, eq. 4-7).

One callable covers LDM's LPIPSWithDiscriminator (KL autoencoder) and VQLPIPSWithDiscriminator (VQ),
with one method per optimiser instead of an `optimizer_idx` switch:

    rec    = pixel_weight * |x - x_hat| + perceptual_weight * LPIPS(x, x_hat)          per pixel
    nll    = rec / exp(logvar) + logvar         (a Laplace likelihood with one learned scale)
    L_G    = nll + kl_weight * KL(q(z|x) || N(0, I))  [KL]   or  + codebook_weight * L_codebook  [VQ]
             + lambda * disc_factor * (-E D(x_hat))
    lambda = disc_weight * ||grad_last nll|| / (||grad_last (-E D(x_hat))|| + 1e-4), clamped to [0, 1e4]
    L_D    = disc_factor * {hinge | vanilla}(D(x), D(x_hat))

`lambda` (Esser et al. eq. 7) balances the two gradients at the decoder's last layer. disc_factor is 0
before `disc_start` (the reconstruction warms up first), and then the discriminator is not run at all.
Reductions follow the originals: the KL loss sums nll over pixels and averages over the batch, the VQ
loss averages nll over everything. LDM declares `logvar` as a parameter but leaves it out of the
autoencoder optimiser, so it stays at `logvar_init` there; put `loss.logvar` in the optimiser to learn it.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from ..config import ComponentConfig
from ..errors import ConfigError, InputError, describe
from ..metrics.lpips import LPIPS
from .discriminator import D_LOSSES, PatchDiscriminator

if TYPE_CHECKING:
    from ..models.autoencoder_kl import DiagonalGaussian

GRAD_NORM_EPS = 1e-4
MAX_ADAPTIVE_WEIGHT = 1e4


@dataclasses.dataclass(frozen=True)
class AutoencoderLossConfig(ComponentConfig):
    disc_start: int                   # global step from which the adversarial terms count
    kl_weight: float = 1e-6           # KL autoencoders (LDM's kl-f* configs)
    codebook_weight: float = 1.0      # VQ autoencoders
    pixel_weight: float = 1.0         # weight of the L1 term (stored but unused in the originals, i.e. 1)
    perceptual_weight: float = 1.0    # 0: no LPIPS network is built
    disc_weight: float = 0.5          # multiplies the adaptive weight lambda
    disc_factor: float = 1.0          # 0: no adversarial training at all
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    logvar_init: float = 0.0
    disc_num_layers: int = 3
    disc_in_channels: int = 3
    disc_ndf: int = 64
    use_actnorm: bool = False
    disc_conditional: bool = False    # the discriminator also sees `cond`, concatenated on channels

    def validate(self) -> None:
        for name in ("disc_start", "kl_weight", "codebook_weight", "pixel_weight", "perceptual_weight",
                     "disc_weight", "disc_factor"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative", where=name, expected=">= 0",
                                  found=getattr(self, name))
        for name in ("disc_num_layers", "disc_in_channels", "disc_ndf"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive", where=name, expected=">= 1", found=getattr(self, name))


class AutoencoderLoss(nn.Module):
    """LDM's first-stage loss. Holds the learned `logvar`, the frozen `perceptual_loss` (LPIPS) and the
    `discriminator`; give `discriminator.parameters()` to the discriminator optimiser.

    `perceptual`: the LPIPS network to use (e.g. `LPIPS(pretrained=False)` for smoke runs); None loads
    the published weights (`LPIPS.from_pretrained()`) when perceptual_weight > 0.
    """

    def __init__(self, config: AutoencoderLossConfig, *, perceptual: LPIPS | None = None):
        super().__init__()
        if perceptual is not None and config.perceptual_weight == 0:
            raise InputError("an LPIPS network was given but perceptual_weight is 0", where="perceptual",
                             expected="perceptual=None, or perceptual_weight > 0", found=describe(perceptual))
        self.config = config
        self.logvar = nn.Parameter(torch.full((), float(config.logvar_init)))
        self.perceptual_loss = None
        if config.perceptual_weight > 0:
            self.perceptual_loss = perceptual if perceptual is not None else LPIPS.from_pretrained()
        self.discriminator = PatchDiscriminator(config.disc_in_channels, ndf=config.disc_ndf,
                                                n_layers=config.disc_num_layers, use_actnorm=config.use_actnorm)
        self.d_loss = D_LOSSES[config.disc_loss]

    def disc_factor(self, global_step: int) -> float:
        """adopt_weight: disc_factor from `disc_start` on, 0 before."""
        return self.config.disc_factor if global_step >= self.config.disc_start else 0.0

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the adversarial terms count at this step; a loop may skip the discriminator step if not."""
        return self.disc_factor(global_step) > 0

    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, *,
                       posterior: DiagonalGaussian | None = None,
                       codebook_loss: torch.Tensor | None = None, global_step: int,
                       last_layer: torch.Tensor | None, cond: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss L_G. inputs, reconstructions: (B, C, H, W) in [-1, 1]; posterior: a
        DiagonalGaussian (KL) or codebook_loss: scalar (VQ), not both; last_layer: the decoder's final
        weight (`decoder.conv_out.weight`), for lambda. -> (loss scalar, log of detached scalars)"""
        self._check(inputs, reconstructions, cond, posterior=posterior, codebook_loss=codebook_loss)
        nll, log = self.nll(inputs, reconstructions, reduction="mean" if codebook_loss is not None else "sum")
        loss = nll
        if posterior is not None:
            log["kl_loss"] = posterior.kl().mean()  # sum over latent dims, mean over the batch
            loss = loss + self.config.kl_weight * log["kl_loss"]
        if codebook_loss is not None:
            log["quant_loss"] = codebook_loss.mean()
            loss = loss + self.config.codebook_weight * log["quant_loss"]
        factor = self.disc_factor(global_step)
        d_weight = g_loss = nll.new_zeros(())
        if factor > 0:  # before disc_start the discriminator is not even run: no D gradient, no cost
            g_loss = -self._discriminate(reconstructions, cond).mean()
            d_weight = self.adaptive_weight(nll, g_loss, last_layer=last_layer)
            loss = loss + d_weight * factor * g_loss
        log.update(total_loss=loss, d_weight=d_weight, g_loss=g_loss, disc_factor=torch.full_like(nll, factor))
        return loss, {k: v.detach() for k, v in log.items()}

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, *, global_step: int,
                           cond: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss L_D on detached images (B, C, H, W). Before disc_start it is a constant
        zero whose backward is a no-op. -> (loss scalar, log of detached scalars)"""
        self._check(inputs, reconstructions, cond)
        factor = self.disc_factor(global_step)
        if factor == 0:
            zero = torch.zeros((), device=inputs.device, dtype=self.logvar.dtype, requires_grad=True)
            return zero, {"disc_loss": zero.detach(), "disc_factor": zero.detach()}
        logits_real = self._discriminate(inputs.detach(), cond)
        logits_fake = self._discriminate(reconstructions.detach(), cond)
        loss = factor * self.d_loss(logits_real, logits_fake)
        log = {"disc_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean(),
               "disc_factor": torch.full_like(loss, factor)}
        return loss, {k: v.detach() for k, v in log.items()}

    def nll(self, inputs: torch.Tensor, reconstructions: torch.Tensor, *, reduction: Literal["sum", "mean"],
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reconstruction term: "sum" over pixels then mean over the batch (KL), or "mean" (VQ). -> (nll, log)"""
        rec = (inputs - reconstructions).abs()
        if self.config.pixel_weight != 1:
            rec = self.config.pixel_weight * rec
        log = {}
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(inputs, reconstructions)  # (B,)
            rec = rec + self.config.perceptual_weight * p_loss.view(-1, 1, 1, 1)
            log["p_loss"] = p_loss.mean()
        nll = rec / self.logvar.exp() + self.logvar
        nll = nll.mean() if reduction == "mean" else nll.sum() / nll.shape[0]
        log.update(nll_loss=nll, rec_loss=rec.mean(), logvar=self.logvar)
        return nll, log

    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor, *, last_layer: torch.Tensor | None,
                        ) -> torch.Tensor:
        """lambda = disc_weight * ||grad nll|| / (||grad g_loss|| + 1e-4) at `last_layer`, clamped, detached.
        Without a graph (validation under no_grad) it is 0, as in the original."""
        if not (torch.is_grad_enabled() and nll.requires_grad and g_loss.requires_grad):
            return nll.new_zeros(())
        if last_layer is None:
            raise InputError("the adaptive GAN weight needs the decoder's last layer", where="last_layer",
                             expected="e.g. model.decoder.conv_out.weight", found=None)
        try:
            nll_grad, = torch.autograd.grad(nll, last_layer, retain_graph=True)
            g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
        except RuntimeError as e:
            raise InputError(f"could not differentiate the losses with respect to last_layer ({e})",
                             where="last_layer", expected="a parameter the reconstructions depend on") from None
        weight = nll_grad.norm() / (g_grad.norm() + GRAD_NORM_EPS)
        return weight.clamp(0.0, MAX_ADAPTIVE_WEIGHT).detach() * self.config.disc_weight

    def _discriminate(self, images: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.discriminator(images if cond is None else torch.cat([images, cond], dim=1))

    def _check(self, inputs: torch.Tensor, reconstructions: torch.Tensor, cond: torch.Tensor | None, *,
               posterior: DiagonalGaussian | None = None, codebook_loss: torch.Tensor | None = None) -> None:
        if inputs.ndim != 4 or inputs.shape != reconstructions.shape:
            raise InputError("inputs and reconstructions must be image batches of one shape", where="inputs",
                             expected="(B, C, H, W) twice",
                             found=f"{tuple(inputs.shape)} and {tuple(reconstructions.shape)}")
        if posterior is not None and codebook_loss is not None:
            raise InputError("give posterior (KL autoencoder) or codebook_loss (VQ), not both", where="generator_loss",
                             expected="one of them", found="both")
        if (cond is not None) != self.config.disc_conditional:
            raise InputError("cond must be given exactly when the discriminator is conditional", where="cond",
                             expected=f"cond {'given' if self.config.disc_conditional else 'None'} "
                                      f"(disc_conditional={self.config.disc_conditional})",
                             found="a tensor" if cond is not None else None)
