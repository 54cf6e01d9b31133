"""AutoencoderLoss against the LDM/taming formulas written out here on tiny tensors, the discriminator
schedule, the two discriminator objectives, and the PatchGAN's layout and initialisation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.errors import ConfigError, InputError
from latentdiff.models.autoencoder_kl import DiagonalGaussian
from latentdiff.training.autoencoder_loss import AutoencoderLoss, AutoencoderLossConfig
from latentdiff.training.discriminator import ActNorm, PatchDiscriminator, hinge_d_loss, vanilla_d_loss
from latentdiff.training.lpips import LPIPS
from tests._support.parity import assert_parity

TINY = dict(disc_start=10, disc_num_layers=2, disc_ndf=8, kl_weight=0.5, disc_weight=0.7, disc_factor=0.9,
            logvar_init=0.3, perceptual_weight=0.0)
WITH_LPIPS = dict(perceptual_weight=0.8)


@pytest.fixture(scope="module")
def lpips():
    torch.manual_seed(0)
    return LPIPS(pretrained=False)


def make_loss(lpips, **changes) -> AutoencoderLoss:
    torch.manual_seed(1)
    config = AutoencoderLossConfig(**{**TINY, **changes})
    return AutoencoderLoss(config, perceptual=lpips if config.perceptual_weight > 0 else None)


def first_stage(seed: int = 2):
    """A stand-in decoder (its conv weight is the 'last layer'), inputs, reconstructions and a posterior."""
    torch.manual_seed(seed)
    decoder = nn.Conv2d(4, 3, 3, padding=1)
    inputs = torch.rand(2, 3, 16, 16) * 2 - 1
    reconstructions = decoder(torch.randn(2, 4, 16, 16))
    posterior = DiagonalGaussian(torch.randn(2, 8, 4, 4, requires_grad=True))
    return decoder, inputs, reconstructions, posterior


def reference_generator_loss(loss_fn, inputs, rec_images, *, last_layer, kl=None, codebook=None, factor):
    """LDM's formulas, written out: Laplace NLL with logvar, KL or codebook term, adaptive-weighted GAN term."""
    c = loss_fn.config
    rec = c.pixel_weight * torch.abs(inputs - rec_images)
    rec = rec + c.perceptual_weight * loss_fn.perceptual_loss(inputs, rec_images).reshape(-1, 1, 1, 1)
    nll = rec / torch.exp(loss_fn.logvar) + loss_fn.logvar
    nll = torch.mean(nll) if codebook is not None else torch.sum(nll) / nll.shape[0]
    total = nll + (c.kl_weight * torch.sum(kl) / kl.shape[0] if kl is not None else 0)
    total = total + (c.codebook_weight * codebook if codebook is not None else 0)
    g_loss = -torch.mean(loss_fn.discriminator(rec_images))
    nll_grads = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach() * c.disc_weight
    return total + d_weight * factor * g_loss, {"nll_loss": nll, "g_loss": g_loss, "d_weight": d_weight}


def test_kl_generator_loss_matches_reference(lpips):
    loss_fn = make_loss(lpips, **WITH_LPIPS)
    decoder, x, x_hat, posterior = first_stage()
    loss, log = loss_fn.generator_loss(x, x_hat, posterior=posterior, global_step=10, last_layer=decoder.weight)
    expected, parts = reference_generator_loss(loss_fn, x, x_hat, last_layer=decoder.weight, kl=posterior.kl(),
                                               factor=0.9)
    assert_parity(loss.detach(), expected.detach())
    for key, value in parts.items():
        assert_parity(log[key], value.detach())
    assert_parity(log["kl_loss"], posterior.kl().mean().detach())
    assert not any(v.requires_grad for v in log.values())
    # Same gradients at the decoder: lambda is a constant in both (detached).
    grad, = torch.autograd.grad(loss, decoder.weight, retain_graph=True)
    expected_grad, = torch.autograd.grad(expected, decoder.weight)
    assert_parity(grad, expected_grad)


def test_vq_generator_loss_matches_reference(lpips):
    loss_fn = make_loss(lpips, codebook_weight=1.3, pixel_weight=0.6, **WITH_LPIPS)
    decoder, x, x_hat, _ = first_stage(3)
    codebook_loss = torch.rand((), requires_grad=True)
    loss, log = loss_fn.generator_loss(x, x_hat, codebook_loss=codebook_loss, global_step=11,
                                       last_layer=decoder.weight)
    expected, parts = reference_generator_loss(loss_fn, x, x_hat, last_layer=decoder.weight, codebook=codebook_loss,
                                               factor=0.9)
    assert_parity(loss.detach(), expected.detach())
    assert_parity(log["nll_loss"], parts["nll_loss"].detach())
    assert_parity(log["quant_loss"], codebook_loss.detach())


def test_disc_off_before_disc_start(lpips):
    loss_fn = make_loss(lpips, **WITH_LPIPS)
    decoder, x, x_hat, posterior = first_stage()
    assert not loss_fn.discriminator_active(9) and loss_fn.discriminator_active(10)
    loss, log = loss_fn.generator_loss(x, x_hat, posterior=posterior, global_step=9, last_layer=decoder.weight)
    nll = torch.sum((torch.abs(x - x_hat) + 0.8 * lpips(x, x_hat).view(-1, 1, 1, 1)) / torch.exp(loss_fn.logvar)
                    + loss_fn.logvar) / 2
    assert_parity(loss.detach(), (nll + 0.5 * posterior.kl().mean()).detach())
    assert log["g_loss"] == 0 and log["d_weight"] == 0 and log["disc_factor"] == 0
    loss.backward()
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())
    d_loss, d_log = loss_fn.discriminator_loss(x, x_hat, global_step=9)
    d_loss.backward()  # a constant zero: backward works and reaches nothing
    assert d_loss == 0 and d_log["disc_loss"] == 0
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())


def test_disc_factor_zero_turns_gan_off(lpips):
    loss_fn = make_loss(lpips, disc_factor=0.0)
    decoder, x, x_hat, posterior = first_stage()
    assert not loss_fn.discriminator_active(10 ** 6)
    _, log = loss_fn.generator_loss(x, x_hat, posterior=posterior, global_step=10 ** 6, last_layer=decoder.weight)
    assert log["g_loss"] == 0


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_loss_formulas(lpips, kind):
    loss_fn = make_loss(lpips, disc_loss=kind)
    _, x, x_hat, _ = first_stage()
    loss, log = loss_fn.discriminator_loss(x, x_hat, global_step=12)
    real, fake = loss_fn.discriminator(x), loss_fn.discriminator(x_hat.detach())
    if kind == "hinge":
        expected = 0.5 * (torch.mean(torch.clamp(1 - real, min=0)) + torch.mean(torch.clamp(1 + fake, min=0)))
    else:  # -log D(x) - log(1 - D(x_hat)) with D = sigmoid(logits)
        expected = 0.5 * (torch.mean(-F.logsigmoid(real)) + torch.mean(-torch.log1p(-torch.sigmoid(fake))))
    assert_parity(loss.detach(), 0.9 * expected.detach())
    assert_parity(log["logits_real"], real.mean().detach())
    loss.backward()
    grads = [p.grad for p in loss_fn.discriminator.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert x_hat.grad_fn is not None and loss_fn.logvar.grad is None  # the generator side is untouched


def test_d_loss_functions_directly():
    torch.manual_seed(4)
    real, fake = torch.randn(3, 1, 5, 5) * 2, torch.randn(3, 1, 5, 5) * 2
    hinge = 0.5 * (torch.where(real < 1, 1 - real, 0).mean() + torch.where(fake > -1, 1 + fake, 0).mean())
    assert_parity(hinge_d_loss(real, fake), hinge)
    vanilla = 0.5 * (torch.log(1 + torch.exp(-real)).mean() + torch.log(1 + torch.exp(fake)).mean())
    assert_parity(vanilla_d_loss(real, fake), vanilla)


def test_logvar_is_learned(lpips):
    loss_fn = make_loss(lpips, logvar_init=-0.4)
    assert loss_fn.perceptual_loss is None
    assert isinstance(loss_fn.logvar, nn.Parameter) and loss_fn.logvar.requires_grad
    assert any(p is loss_fn.logvar for p in loss_fn.parameters())
    assert loss_fn.logvar.item() == pytest.approx(-0.4)
    decoder, x, x_hat, _ = first_stage()
    loss, _ = loss_fn.generator_loss(x, x_hat, global_step=0, last_layer=decoder.weight)
    loss.backward()
    # d/ds [sum(|x - x_hat| e^-s + s) / B] = (N - sum|x - x_hat| e^-s) / B
    rec = (x - x_hat).abs().detach()
    expected = (rec.numel() - rec.sum() * torch.exp(torch.tensor(0.4))) / 2
    assert_parity(loss_fn.logvar.grad, expected)


def test_validation_without_graph(lpips):
    loss_fn = make_loss(lpips)
    decoder, x, x_hat, posterior = first_stage()
    with torch.no_grad():
        loss, log = loss_fn.generator_loss(x, x_hat.detach(), posterior=posterior, global_step=50,
                                           last_layer=decoder.weight)
    assert log["d_weight"] == 0  # as in the original: no gradients, no adaptive weight
    assert_parity(loss, log["nll_loss"] + 0.5 * log["kl_loss"])


def test_conditional_discriminator_and_bad_calls(lpips):
    loss_fn = make_loss(lpips, disc_conditional=True, disc_in_channels=4)
    decoder, x, x_hat, posterior = first_stage()
    cond = torch.randn(2, 1, 16, 16)
    loss, _ = loss_fn.discriminator_loss(x, x_hat, global_step=10, cond=cond)
    expected = hinge_d_loss(loss_fn.discriminator(torch.cat([x, cond], 1)),
                            loss_fn.discriminator(torch.cat([x_hat.detach(), cond], 1)))
    assert_parity(loss.detach(), 0.9 * expected.detach())
    with pytest.raises(InputError, match="cond"):
        loss_fn.discriminator_loss(x, x_hat, global_step=10)
    with pytest.raises(InputError, match="not both"):
        loss_fn.generator_loss(x, x_hat, posterior=posterior, codebook_loss=torch.zeros(()), global_step=0,
                               last_layer=decoder.weight, cond=cond)
    with pytest.raises(InputError, match="last layer"):
        loss_fn.generator_loss(x, x_hat, posterior=posterior, global_step=10, last_layer=None, cond=cond)
    with pytest.raises(InputError):
        loss_fn.generator_loss(x, x_hat[:, :2], global_step=0, last_layer=decoder.weight, cond=cond)


def test_config_is_strict():
    with pytest.raises(ConfigError):
        AutoencoderLossConfig.from_dict({"disc_start": 0, "disc_weigth": 1.0})
    with pytest.raises(ConfigError):
        AutoencoderLossConfig(disc_start=0, disc_loss="wgan")
    with pytest.raises(ConfigError):
        AutoencoderLossConfig(disc_start=0, kl_weight=-1.0)
    config = AutoencoderLossConfig.from_dict({"disc_start": 50001, "kl_weight": 1e-6, "disc_weight": 0.5})
    assert config.disc_loss == "hinge" and config.disc_factor == 1.0


def test_patch_discriminator_layout_and_init():
    torch.manual_seed(5)
    d = PatchDiscriminator(3)  # LDM's: n_layers=3, ndf=64, BatchNorm
    shapes = {k: tuple(v.shape) for k, v in d.state_dict().items() if not k.endswith("num_batches_tracked")}
    convs = {0: (64, 3), 2: (128, 64), 5: (256, 128), 8: (512, 256), 11: (1, 512)}
    for i, (cout, cin) in convs.items():
        assert shapes[f"main.{i}.weight"] == (cout, cin, 4, 4)
    assert "main.0.bias" in shapes and "main.11.bias" in shapes
    assert not any(f"main.{i}.bias" in shapes for i in (2, 5, 8))  # followed by BatchNorm: no bias
    for i, width in ((3, 128), (6, 256), (9, 512)):
        assert shapes[f"main.{i}.weight"] == (width,) and shapes[f"main.{i}.running_var"] == (width,)
    weights = torch.cat([d.main[i].weight.flatten() for i in convs])
    assert abs(weights.std().item() - 0.02) < 0.001 and abs(weights.mean().item()) < 0.001
    bn = torch.cat([d.main[i].weight for i in (3, 6, 9)])
    assert abs(bn.mean().item() - 1.0) < 0.01 and bn.std().item() < 0.03
    assert all((d.main[i].bias == 0).all() for i in (3, 6, 9))
    # 70x70 receptive fields: 3 stride-2 and 2 stride-1 4x4 convs, so a 64x64 image gives a 6x6 map.
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_actnorm_initialises_from_first_batch():
    torch.manual_seed(6)
    d = PatchDiscriminator(3, ndf=4, n_layers=2, use_actnorm=True)
    assert isinstance(d.main[3], ActNorm) and d.main[2].bias is not None
    norm = d.main[3]
    x = torch.randn(8, 8, 6, 6) * 3 + 2
    y = norm(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(8), atol=1e-5)
    assert torch.allclose(y.transpose(0, 1).reshape(8, -1).std(dim=1), torch.ones(8), atol=1e-4)
    loc = norm.loc.detach().clone()
    norm(x * 5)  # initialised once only
    assert torch.equal(norm.loc, loc) and int(norm.initialized) == 1
    fresh = ActNorm(8)
    fresh.load_state_dict(norm.state_dict())
    fresh(torch.randn(2, 8, 3, 3))  # a loaded, initialised ActNorm keeps its loaded statistics
    assert torch.equal(fresh.loc, loc)
