"""`latentdiff train lcm`: latent consistency distillation on a frozen tiny text-to-image pipeline. The target is
re-derived here from the paper's equations (guided DDIM step, c_skip / c_out), the loss falls on a fixed batch, a
resumed run ends bit for bit where an uninterrupted one does, the LoRA export is a kohya file that
`load_lora_weights` reads and that changes the images, and full distillation exports an LCM pipeline."""
from __future__ import annotations

import pytest
import torch

from latentdiff import LatentDiffusionPipeline
from latentdiff.data.shapes import write_imagefolder
from latentdiff.diffusion.samplers import LCMSampler
from latentdiff.errors import ConfigError
from latentdiff.hub import load_safetensors
from latentdiff.training.config import train_config_from_dict
from latentdiff.training.data import fixed_batches
from latentdiff.training.lcm_trainer import LORA_FILE, LCMTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, cores are shared


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from tests._support.training import tiny_text_pipeline

    root = tmp_path_factory.mktemp("lcm")
    return write_imagefolder(root / "data", 16, seed=0), tiny_text_pipeline(root / "base")


def config_for(parts, out, *, max_steps=4, lora=True, **train):
    data, base = parts
    return {
        "data": {"path": str(data), "resolution": 16, "random_flip": False},
        "model": {"pipeline": str(base), **({"lora": {"rank": 4, "alpha": 4}} if lora else {})},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 0},
        "train": {"output_dir": str(out), "max_steps": max_steps, "batch_size": 4, "ema": not lora,
                  "w_min": 1.0, "w_max": 3.0} | train,
        "checkpoint": {"every_n_steps": 2, "keep_last": 2},
        "logging": {"every_n_steps": 1, "progress_bar": False, "tensorboard": False},
        "sample": {"every_n_steps": 0, "num_images": 2},
    }


def trainer_for(parts, out, **kwargs):
    return LCMTrainer(train_config_from_dict(config_for(parts, out, **kwargs), "lcm"))


def test_targets_match_the_papers_equations(tmp_path, parts):
    """LCM Algorithm 1 with the LCM-LoRA target, computed here in float64 from the raw UNet outputs."""
    trainer = trainer_for(parts, tmp_path / "run")
    with torch.no_grad():   # a non-zero LoRA, so that teacher (LoRA off) and target (LoRA on) differ
        for p in trainer.lora.up.values():
            p.normal_(std=0.05)
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    index, w = torch.tensor([0, 20, 49]), torch.tensor([1.0, 2.5, 3.0])
    context = trainer.text_encoder(["a red circle on the left, blue background"] * 3).detach()
    z_t, t, _, target = trainer.targets(z0, noise, index, w, context)
    assert t.tolist() == [19, 419, 999]

    abar = trainer.noise_scheduler.alphas_cumprod.double()
    empty = trainer.text_encoder([""]).detach().expand(3, -1, -1)
    unet, d = trainer.unet, torch.float64
    for i in range(3):
        tn, sn = int(t[i]), max(int(t[i]) - 20, 0)
        a_t, a_s = abar[tn], abar[sn]
        x = (a_t.sqrt() * z0[i].double() + (1 - a_t).sqrt() * noise[i].double())[None]
        assert torch.allclose(z_t[i].double(), x[0], atol=1e-5)
        with torch.no_grad(), trainer.lora.disabled(trainer.pipeline):
            v_c = unet(x.float(), torch.tensor([tn]), context=context[i:i + 1]).to(d)
            v_u = unet(x.float(), torch.tensor([tn]), context=empty[i:i + 1]).to(d)
        x0_c, x0_u = a_t.sqrt() * x - (1 - a_t).sqrt() * v_c, a_t.sqrt() * x - (1 - a_t).sqrt() * v_u   # v-pred
        e_c, e_u = a_t.sqrt() * v_c + (1 - a_t).sqrt() * x, a_t.sqrt() * v_u + (1 - a_t).sqrt() * x
        x0, eps = x0_c + w[i] * (x0_c - x0_u), e_c + w[i] * (e_c - e_u)          # eq. 10: guided teacher
        z_s = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps                           # DDIM step t -> s
        with torch.no_grad():                                                    # the student, LoRA on
            v = unet(z_s.float(), torch.tensor([sn]), context=context[i:i + 1]).to(d)
        scaled = 10.0 * sn
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5   # eq. 9, sigma_data 0.5
        expected = c_skip * z_s + c_out * (a_s.sqrt() * z_s - (1 - a_s).sqrt() * v)
        err = (target[i].double() - expected[0]).abs().max() / expected.abs().max()
        assert err < 1e-4, (i, float(err))


def test_loss_falls_on_a_fixed_batch(tmp_path, parts):
    config = config_for(parts, tmp_path / "run", loss="l2")
    config["optim"]["learning_rate"] = 1e-2
    trainer = LCMTrainer(train_config_from_dict(config, "lcm"))
    batch = next(fixed_batches(trainer.train_set, 4, 4))
    losses = [float(trainer.train_step([batch])["loss"]) for _ in range(6)]   # step 0's noise, t, w each time
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] < 0.95 * losses[0], losses


def test_only_the_lora_trains_and_the_export_loads_and_changes_images(tmp_path, parts):
    trainer = trainer_for(parts, tmp_path / "run")
    unet_before = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    folder = trainer.fit()
    assert all(torch.equal(v, trainer.unet.state_dict()[k]) for k, v in unet_before.items())
    tensors = load_safetensors(folder / LORA_FILE)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert any(k.endswith("attn1_to_q.lora_up.weight") for k in tensors)
    assert any(k.endswith("resnets_0_conv1.lora_down.weight") for k in tensors)

    pipe = LatentDiffusionPipeline.from_pretrained(parts[1])
    pipe.sampler = LCMSampler()
    prompt = ["a red circle on the left, blue background"]

    def image():
        return pipe(prompt, height=16, width=16, num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0), progress=False).images

    before = image()
    pipe.load_lora_weights(str(folder))
    after = image()
    assert (after - before).abs().max() > 1e-3
    pipe.unload_lora_weights()
    assert torch.equal(image(), before)


def test_resumed_run_ends_bit_for_bit(tmp_path, parts):
    straight = trainer_for(parts, tmp_path / "straight")
    straight.fit()
    trainer_for(parts, tmp_path / "split", max_steps=2).fit()
    resumed = LCMTrainer(train_config_from_dict(
        config_for(parts, tmp_path / "split") | {"checkpoint": {"every_n_steps": 2, "resume": "latest"}}, "lcm"))
    resumed.fit()
    assert resumed.step == 4
    for key, value in straight.lora.state_dict().items():
        assert torch.equal(value, resumed.lora.state_dict()[key]), key


def test_full_distillation_exports_an_lcm_pipeline(tmp_path, parts):
    trainer = trainer_for(parts, tmp_path / "run", lora=False, max_steps=2)
    teacher = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    folder = trainer.fit()
    assert all(torch.equal(v, trainer.teacher.state_dict()[k]) for k, v in teacher.items())
    assert any(not torch.equal(v, teacher[k]) for k, v in trainer.unet.state_dict().items())
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe.sampler, LCMSampler)
    with pytest.raises(ConfigError, match="EMA"):
        trainer_for(parts, tmp_path / "no-ema", lora=False, ema=False)


def test_config_errors(tmp_path, parts):
    with pytest.raises(ConfigError, match="w_max"):
        trainer_for(parts, tmp_path / "a", w_min=2.0, w_max=1.0)
    bad = config_for(parts, tmp_path / "b")
    bad["model"]["lora"] = {"rank": 4, "unknown": 1}
    with pytest.raises(ConfigError, match="unknown"):
        train_config_from_dict(bad, "lcm")
    bad["model"]["lora"] = {"rank": 4, "targets": ["no_such_module"]}
    with pytest.raises(ConfigError, match="targets"):
        LCMTrainer(train_config_from_dict(bad, "lcm"))


def test_the_shipped_lcm_lora_fits_the_builtin_model():
    from latentdiff.builtin import builtin_path

    folder = builtin_path("latentdiff/shapes-64-lcm-lora")
    assert folder is not None and (folder / LORA_FILE).is_file()
    pipe = LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64")
    pipe.sampler = LCMSampler()

    def image():
        return pipe(["a red circle on the left, blue background"], num_inference_steps=1, guidance_scale=1.0,
                    output_type="pt", generator=torch.Generator().manual_seed(0), progress=False).images

    before = image()
    pipe.load_lora_weights("latentdiff/shapes-64-lcm-lora")   # every key matched to a module of the UNet (strict)
    assert (image() - before).abs().max() > 0
