"""Stage 2 on a CPU: a tiny LDM's loss falls, conditioning dropout does what it says, cached latents train
like encoded ones, the export loads with LatentDiffusionPipeline.from_pretrained and samples, and the tiny
example configs run through the command line (LDM-BERT trained jointly)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from latentdiff import Pipeline
from latentdiff.cli import main as cli_main
from latentdiff.models.autoencoder_kl import AutoencoderKL
from latentdiff.models.unet import UNet2DConditional
from latentdiff.pipelines.class_conditional import ClassConditionalPipeline
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.pipelines.super_resolution import SuperResolutionPipeline
from latentdiff.pipelines.unconditional import UnconditionalPipeline
from latentdiff.training.config import train_config_from_dict
from latentdiff.training.data import fixed_batches
from latentdiff.training.diffusion_trainer import DiffusionTrainer
from tests._support.tiny_clip import make_tiny_clip
from tests._support.training import (
    EXAMPLES,
    diffusion_config,
    make_shapes,
    read_losses,
    state_of,
    tiny_autoencoder,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, cores are shared


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm")
    return {"classes": make_shapes(root / "classes", count=48, size=16, labels="classes"),
            "captions": make_shapes(root / "captions", count=16, size=16),
            "vae": tiny_autoencoder(root / "vae"), "clip": make_tiny_clip(root / "clip")[0].parent}


def fixed_loss(unet, vae, images, labels) -> float:
    """The epsilon-MSE on fixed images, noise and timesteps (all t, posterior means), computed directly."""
    from latentdiff.diffusion.noise_scheduler import NoiseScheduler

    g = torch.Generator().manual_seed(123)
    scheduler = NoiseScheduler()
    with torch.no_grad():
        z0 = vae.scale_latents(vae.encode(images).mean)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.linspace(0, 999, len(images)).long()
        x_t = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1) * z0 + \
            (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1) * noise
        return F.mse_loss(unet(x_t, t, class_labels=labels), noise).item()


def test_class_conditional_ldm_loss_falls(tmp_path, parts):
    config = diffusion_config(parts["classes"], parts["vae"], tmp_path / "run",
                              optim={"learning_rate": 2e-3, "warmup_steps": 5},
                              train={"max_steps": 150, "batch_size": 16, "ema_decay": 0.95},
                              checkpoint={"every_n_steps": 75}, logging={"every_n_steps": 5},
                              sample={"every_n_steps": 75})
    trainer = DiffusionTrainer(train_config_from_dict(config, "diffusion"))
    batch = next(fixed_batches(trainer.train_set, 48, 48))
    images, labels = batch["pixel_values"], batch["class_label"]
    before = fixed_loss(trainer.unet.eval(), trainer.vae, images, labels)
    trainer.unet.train()
    folder = trainer.fit()
    exported = UNet2DConditional.from_pretrained(folder / "unet")
    after = fixed_loss(exported, trainer.vae, images, labels)
    print(f"fixed-batch loss {before:.4f} -> {after:.4f}")
    assert after <= 0.6 * before, f"loss {before:.3f} -> {after:.3f}"
    # The export is the EMA (not the last training weights): equal to the final checkpoint's EMA.
    final = state_of(tmp_path / "run" / "checkpoints" / "checkpoint-00000150")
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, final[f"ema/unet.{name}"]), name
    assert not all(torch.equal(final[f"ema/unet.{n}"], final[f"unet/{n}"]) for n in exported.state_dict())
    index = json.loads((folder / "model_index.json").read_text())
    assert index["id2label"] == {"0": "circle", "1": "square", "2": "triangle"}
    assert index["null_class"] == 3
    assert (tmp_path / "run" / "samples" / "step-00000075.png").is_file()


def test_conditioning_dropout_replaces_caption_and_class(tmp_path, parts):
    config = diffusion_config(parts["classes"], parts["vae"], tmp_path / "run")
    trainer = DiffusionTrainer(train_config_from_dict(config, "diffusion"))
    batch = next(fixed_batches(trainer.train_set, 8, 8))
    drop = torch.tensor([True, False] * 4)
    x = torch.zeros(8, 4, 8, 8)
    _, kwargs = trainer.condition(x, batch, None, drop)
    expected = torch.where(drop, torch.tensor(3), batch["class_label"])
    assert torch.equal(kwargs["class_labels"], expected)
    rnd = trainer.random(0)
    fraction = (rnd.rand(4000, stream=3) < 0.1).float().mean().item()
    assert fraction == pytest.approx(0.1, abs=0.02)

    text = diffusion_config(parts["captions"], parts["vae"], tmp_path / "text", conditioning="text",
                            model={"text_encoder": str(parts["clip"])})
    trainer = DiffusionTrainer(train_config_from_dict(text, "diffusion"))
    batch = next(fixed_batches(trainer.train_set, 8, 8))
    _, kwargs = trainer.condition(x, batch, None, drop)
    with torch.no_grad():
        empty, captions = trainer.text_encoder([""]), trainer.text_encoder(batch["caption"])
    for i, d in enumerate(drop.tolist()):
        assert torch.equal(kwargs["context"][i], (empty[0] if d else captions[i]))


def test_cached_latents_train_like_encoded_images(tmp_path, parts):
    def run(name, cache):
        config = diffusion_config(parts["classes"], parts["vae"], tmp_path / name,
                                  train={"max_steps": 4, "cache_latents": cache}, checkpoint={"every_n_steps": 4})
        DiffusionTrainer(train_config_from_dict(config, "diffusion")).fit()
        return read_losses(tmp_path / name), state_of(tmp_path / name / "checkpoints" / "checkpoint-00000004")

    (plain_losses, plain), (cached_losses, cached) = run("plain", False), run("cached", True)
    assert (tmp_path / "cached" / "latent_cache.safetensors").is_file()
    assert [v for _, v in cached_losses] == pytest.approx([v for _, v in plain_losses], rel=1e-4)
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-4, atol=1e-5)


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path, parts):
    def run(name, precision):
        config = diffusion_config(parts["classes"], parts["vae"], tmp_path / name,
                                  train={"max_steps": 2, "mixed_precision": precision}, checkpoint={"every_n_steps": 2})
        DiffusionTrainer(train_config_from_dict(config, "diffusion")).fit()
        final = state_of(tmp_path / name / "checkpoints" / "checkpoint-00000002")
        return [v for _, v in read_losses(tmp_path / name)], final

    (fp32_losses, _), (bf16_losses, bf16) = run("fp32", "no"), run("bf16", "bf16")
    assert bf16_losses != fp32_losses                                  # autocast really ran in bf16
    assert bf16_losses == pytest.approx(fp32_losses, rel=0.05)
    assert all(v.dtype == torch.float32 for v in bf16.values())       # master weights and EMA stay fp32


def test_text_to_image_export_loads_and_samples(tmp_path, parts):
    config = diffusion_config(parts["captions"], parts["vae"], tmp_path / "run", conditioning="text",
                              model={"text_encoder": str(parts["clip"])},
                              train={"max_steps": 3, "gradient_checkpointing": True},
                              sample={"prompts": ["a red circle"], "guidance_scale": 2.0})
    folder = DiffusionTrainer(train_config_from_dict(config, "diffusion")).fit()
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe.vae, AutoencoderKL)
    images = pipe("a red circle on the left, blue background", num_inference_steps=2, height=16, width=16,
                  generator=torch.Generator().manual_seed(0), output_type="pt", progress=False).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    assert (tmp_path / "run" / "samples" / "step-00000003.png").is_file()


def _sample(pipe, mode):
    run = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt", progress=False)
    if mode == "class":
        return pipe(["square", 0], guidance_scale=2.0, **run).images
    if mode == "low_res":
        return pipe(torch.rand(2, 3, 8, 8), **run).images   # 8 x 8 low-res images -> 16 x 16 (f = 2)
    return pipe(batch_size=2, **run).images


@pytest.mark.parametrize("mode, pipeline_class", [("class", ClassConditionalPipeline), ("none", UnconditionalPipeline),
                                                  ("low_res", SuperResolutionPipeline)])
def test_export_loads_as_its_pipeline_and_samples(tmp_path, parts, mode, pipeline_class):
    """Each conditioning's export loads through `Pipeline.from_pretrained` (model_index.json dispatch) as the
    pipeline of that task, holds the EMA weights, and samples 16 x 16 images."""
    config = diffusion_config(parts["classes"], parts["vae"], tmp_path / "run", conditioning=mode,
                              train={"max_steps": 2, "ema_decay": 0.5}, checkpoint={"every_n_steps": 2})
    if mode == "low_res":
        config["model"]["unet"]["in_channels"] = 4 + 3   # x_t and the RGB low-res image
    folder = DiffusionTrainer(train_config_from_dict(config, "diffusion")).fit()
    pipe = Pipeline.from_pretrained(folder)
    assert type(pipe) is pipeline_class
    final = state_of(tmp_path / "run" / "checkpoints" / "checkpoint-00000002")
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(tensor, final[f"ema/unet.{name}"]), name
    assert not all(torch.equal(final[f"ema/unet.{n}"], final[f"unet/{n}"]) for n in pipe.unet.state_dict())
    images = _sample(pipe, mode)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    if mode == "class":
        assert pipe.null_class == 3 and pipe.label2id == {"circle": 0, "square": 1, "triangle": 2}


def test_low_res_trains_on_the_latents_its_pipeline_decodes(tmp_path, parts):
    """SuperResolutionPipeline decodes z0 unscaled (as LDM-SR): low_res mode diffuses unscaled latents, the
    other modes latents times the first stage's scaling_factor (!= 1 for this autoencoder)."""
    config = diffusion_config(parts["classes"], parts["vae"], tmp_path / "sr", conditioning="low_res")
    config["model"]["unet"]["in_channels"] = 4 + 3
    sr = DiffusionTrainer(train_config_from_dict(config, "diffusion"))
    plain = DiffusionTrainer(train_config_from_dict(
        diffusion_config(parts["classes"], parts["vae"], tmp_path / "none", conditioning="none"), "diffusion"))
    batch = next(fixed_batches(sr.train_set, 4, 4))
    with torch.no_grad():
        moments = sr.vae.encode(batch["pixel_values"]).mean
        z_sr, _ = sr.latents(batch, sr.random(0))
        z_plain, _ = plain.latents(batch, plain.random(0))
    assert sr.vae.config.scaling_factor != 1.0
    torch.testing.assert_close(z_plain, z_sr * sr.vae.config.scaling_factor)   # the same draw, scaled or not
    assert (z_sr - moments).abs().mean() < (z_plain - moments).abs().mean()
    z0 = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(sr.pipeline.decode(z0), sr.vae.decode(z0))


def test_tiny_example_configs_run_from_the_command_line(tmp_path):
    """The tiny examples (KL autoencoder -> class LDM with cached latents; LDM-BERT text-to-image trained
    jointly) run end to end through `latentdiff train`, a few steps each."""
    captions, classes, tokenizer = tmp_path / "shapes", tmp_path / "classes", tmp_path / "tokenizer"
    assert cli_main(["data", "shapes", str(captions), "-n", "32", "--write-tokenizer", str(tokenizer)]) == 0
    assert cli_main(["data", "shapes", str(classes), "-n", "32", "--labels", "classes"]) == 0
    common = ["--set", "train.max_steps=2", "--set", "train.batch_size=8", "--set", "logging.progress_bar=false"]
    sampling = ["--set", "sample.num_inference_steps=2"]
    ae_out = tmp_path / "runs" / "ae"
    assert cli_main(["train", "autoencoder", str(EXAMPLES / "tiny-autoencoder-kl.yaml"), *common,
                     "--set", f"data.path={captions}", "--set", f"train.output_dir={ae_out}",
                     "--set", "data.validation_split=8"]) == 0
    assert (ae_out / "autoencoder" / "config.json").is_file()
    assert cli_main(["train", "diffusion", str(EXAMPLES / "tiny-ldm-class.yaml"), *common, *sampling,
                     "--set", f"data.path={classes}", "--set", f"model.autoencoder={ae_out / 'autoencoder'}",
                     "--set", f"train.output_dir={tmp_path / 'runs' / 'class'}"]) == 0
    assert (tmp_path / "runs" / "class" / "latent_cache.safetensors").is_file()
    text_out = tmp_path / "runs" / "text"
    assert cli_main(["train", "diffusion", str(EXAMPLES / "tiny-text2img-ldm-bert.yaml"), *common, *sampling,
                     "--set", f"data.path={captions}", "--set", f"model.autoencoder={ae_out / 'autoencoder'}",
                     "--set", f"model.tokenizer={tokenizer}", "--set", f"train.output_dir={text_out}"]) == 0
    checkpoint = state_of(text_out / "checkpoints" / "checkpoint-00000002")
    assert any(k.startswith("text_encoder/") for k in checkpoint)          # trained jointly, checkpointed
    assert any(k.startswith("ema/text_encoder.") for k in checkpoint)
    index = json.loads((text_out / "pipeline" / "model_index.json").read_text())
    # 16 text positions: diffusers' LDMTextToImagePipeline (77) could not run it, so latentdiff's own class
    assert index["_class_name"] == "LatentDiffusionPipeline" and (text_out / "pipeline" / "bert").is_dir()
    pipe = LatentDiffusionPipeline.from_pretrained(text_out / "pipeline")
    images = pipe("a red circle on the left, blue background", num_inference_steps=2, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(0), output_type="pt", progress=False).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("mode", ["text", "class", "low_res", "none"])
def test_preview_is_what_its_pipeline_computes(tmp_path, parts, mode):
    """A training preview (sample section: conditions x seeds, guidance 2) equals the trainer's own pipeline
    called on the same weights, conditions and per-sample seeds: previews run through the pipeline's stages."""
    config = diffusion_config(parts["captions" if mode == "text" else "classes"], parts["vae"], tmp_path / "run",
                              conditioning=mode, sample={"prompts": ["a red circle", "blue"], "class_labels": [0, 2],
                                                         "guidance_scale": 2.0, "num_inference_steps": 3,
                                                         "seeds": [0, 5]})
    if mode == "text":
        config["model"]["text_encoder"] = str(parts["clip"])
    if mode == "low_res":
        config["model"]["unet"]["in_channels"] = 4 + 3
    trainer = DiffusionTrainer(train_config_from_dict(config, "diffusion"))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainer.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)   # not the zero-initialised output layers: a non-trivial prediction
    preview = trainer.sample(use_ema=False)

    pipe, seeds = trainer.pipeline, [0, 0, 5, 5]
    run = dict(num_inference_steps=3, output_type="latent", progress=False,
               generator=[torch.Generator().manual_seed(s) for s in seeds])
    if mode == "text":
        z0 = pipe(["a red circle", "blue"] * 2, guidance_scale=2.0, **run).images
    elif mode == "class":
        z0 = pipe([0, 2] * 2, guidance_scale=2.0, **run).images
    elif mode == "low_res":
        from latentdiff.training.conditioning import low_res

        images = trainer.preview_images(4).repeat(2, 1, 1, 1)          # 4 images x 2 seeds
        seeds = [0] * 4 + [5] * 4
        run["generator"] = [torch.Generator().manual_seed(s) for s in seeds]
        z0 = pipe((low_res(images, (8, 8)) + 1) / 2, **run).images      # the pipeline takes [0, 1] images
    else:
        run["generator"] = run["generator"][::2]                        # one condition (none) x 2 seeds
        z0 = pipe(batch_size=2, **run).images
    expected = pipe.decode(z0).clamp(-1, 1)
    assert preview.shape == expected.shape
    if mode == "low_res":   # [-1, 1] -> [0, 1] -> [-1, 1] rounds
        torch.testing.assert_close(preview, expected)
    else:
        assert torch.equal(preview, expected)
