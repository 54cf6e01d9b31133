"""`latentdiff train controlnet`: a ControlNet trained on a frozen tiny text-to-image pipeline. Only the ControlNet
changes, a resumed run ends bit for bit where an uninterrupted one does, the export is a ControlNet folder that
loads; and the shipped silhouette ControlNet fits the built-in model's UNet."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from latentdiff import ControlNet, LatentDiffusionPipeline
from latentdiff.data.shapes import write_imagefolder
from latentdiff.data.shapes_silhouette import silhouette
from latentdiff.errors import ConfigError, InputError
from latentdiff.models.residuals import Residuals
from latentdiff.training.config import train_config_from_dict
from latentdiff.training.controlnet_trainer import ControlNetTrainer
from tests._support.training import read_losses, tiny_text_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, cores are shared


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    data = write_imagefolder(root / "data", 24, seed=0, conditioning=silhouette)
    return data, tiny_text_pipeline(root / "base")


def config_for(parts, out, *, max_steps=6, **train):
    data, base = parts
    return {
        "data": {"path": str(data), "resolution": 16},    # 64 px shapes -> 16 px; the tiny autoencoder has f = 2
        "model": {"pipeline": str(base), "conditioning_embedding_out_channels": [8, 16]},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 2},
        "train": {"output_dir": str(out), "max_steps": max_steps, "batch_size": 4, "ema_decay": 0.9,
                  "conditioning_dropout": 0.25} | train,
        "checkpoint": {"every_n_steps": 3, "keep_last": 2},
        "logging": {"every_n_steps": 1, "progress_bar": False},
        "sample": {"every_n_steps": 0, "num_images": 2, "num_inference_steps": 2},
    }


def trainer_for(parts, out, **kwargs):
    return ControlNetTrainer(train_config_from_dict(config_for(parts, out, **kwargs), "controlnet"))


def states(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_only_the_controlnet_trains_and_its_export_loads(tmp_path, parts):
    trainer = trainer_for(parts, tmp_path / "run", cache_latents=True)
    frozen = {name: states(getattr(trainer, name)) for name in ("unet", "vae")}
    frozen["text_encoder"] = states(trainer.text_encoder.model)
    start = states(trainer.controlnet)
    folder = trainer.fit()
    for name, before in frozen.items():
        module = trainer.text_encoder.model if name == "text_encoder" else getattr(trainer, name)
        after = module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), f"{name} changed"
    moved = [k for k, v in trainer.controlnet.state_dict().items() if not torch.equal(v, start[k])]
    assert any("controlnet_down_blocks" in k for k in moved) and any("down_blocks.0" in k for k in moved)
    assert read_losses(tmp_path / "run")[-1][0] == 6
    loaded = ControlNet.from_pretrained(folder)   # a diffusers ControlNetModel folder, the EMA weights
    with trainer.ema.applied():
        expected = trainer.controlnet.state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    assert (tmp_path / "run" / "samples" / "step-00000006.png").is_file()   # control images over samples


def test_resumed_run_ends_bit_for_bit(tmp_path, parts):
    straight = trainer_for(parts, tmp_path / "straight")
    straight.fit()
    trainer_for(parts, tmp_path / "split", max_steps=3).fit()
    resumed = ControlNetTrainer(train_config_from_dict(
        config_for(parts, tmp_path / "split") | {"checkpoint": {"every_n_steps": 3, "resume": "latest"}},
        "controlnet"))
    resumed.fit()
    assert resumed.step == 6
    for key, value in straight.controlnet.state_dict().items():
        assert torch.equal(value, resumed.controlnet.state_dict()[key]), key
    assert read_losses(tmp_path / "straight") == read_losses(tmp_path / "split")


def test_bad_setups_are_clear_errors(tmp_path, parts):
    data, base = parts
    with pytest.raises(ConfigError, match="latent's size"):
        ControlNetTrainer(train_config_from_dict(
            config_for(parts, tmp_path / "a") | {"model": {"pipeline": str(base),
                                                           "conditioning_embedding_out_channels": [8, 16, 32]}},
            "controlnet"))
    plain = write_imagefolder(tmp_path / "plain", 8, seed=1)     # no control images
    with pytest.raises(InputError, match="control image"):
        ControlNetTrainer(train_config_from_dict(
            config_for(parts, tmp_path / "b") | {"data": {"path": str(plain), "resolution": 16}}, "controlnet"))
    with pytest.raises(ConfigError, match="unknown"):
        train_config_from_dict(config_for(parts, tmp_path / "c") | {"model": {"pipeline": str(base), "unet": {}}},
                               "controlnet")


def test_shipped_silhouette_controlnet_fits_the_builtin_unet(monkeypatch):
    import huggingface_hub

    from latentdiff.builtin import builtin_path

    def refuse(*args, **kwargs):
        raise AssertionError("the Hub was consulted for a built-in ControlNet")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    folder = builtin_path("latentdiff/shapes-64-silhouette")
    assert sum(p.stat().st_size for p in folder.glob("*.safetensors")) <= 6 * 2**20    # a few MB (fp16)
    controlnet = ControlNet.from_pretrained("latentdiff/shapes-64-silhouette")
    assert controlnet.dtype == torch.float32                                          # loads as fp32
    pipe = LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64")
    unet = pipe.unet
    for name in ("in_channels", "channels", "attention_levels", "layers_per_level", "cross_attention_dim",
                 "attention_heads", "norm_num_groups"):
        assert getattr(controlnet.config, name) == getattr(unet.config, name), name
    assert controlnet.config.hint_factor == pipe.vae.downsample_factor
    x, context = torch.randn(1, 4, 16, 16), pipe.text_encoder(["a red circle on the left, blue background"])
    hint = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        down, mid = controlnet(x, torch.tensor([500]), context, hint)
        unet(x, torch.tensor([500]), context, residuals=Residuals(down=down, mid=mid))   # shapes fit the skips
    assert any(p.abs().sum() > 0 for p in controlnet.controlnet_down_blocks.parameters())   # trained, not zero


def test_previews_compute_what_the_pipeline_call_does(parts):
    """controlled_unet through `denoise(model=)` (the trainer's previews) = the pipeline's call with controlnet=."""
    from latentdiff.data.shapes import ShapesDataset, caption
    from latentdiff.training.controlnet_trainer import controlled_unet
    from tests._support.parity import randomize_

    base = LatentDiffusionPipeline.from_pretrained(parts[1])
    controlnet = ControlNet.from_unet(base.unet, conditioning_embedding_out_channels=(8, 16))
    torch.manual_seed(3)
    randomize_(controlnet)       # the zero convolutions too: a ControlNet that adds nothing could not fail this
    pipe = LatentDiffusionPipeline.from_pretrained(parts[1], controlnet=controlnet)
    specs = [ShapesDataset(2, seed=5).spec(i) for i in range(2)]
    prompts, hints = [caption(s) for s in specs], [silhouette(s).resize((16, 16)) for s in specs]
    run = dict(guidance_scale=1.5, num_inference_steps=3)
    called = pipe(prompts, control_image=hints, height=16, width=16, output_type="pt", progress=False,
                  generator=[torch.Generator().manual_seed(i) for i in range(2)], **run).images
    x_T = pipe.prepare_latents(2, 16, 16, generator=[torch.Generator().manual_seed(i) for i in range(2)])
    cond, uncond = pipe.encode_prompt(prompts)
    control = torch.stack([torch.from_numpy(np.asarray(h)).permute(2, 0, 1).float() / 255 for h in hints])
    with torch.no_grad():
        z0 = pipe.denoise(x_T, cond, uncond, progress=False, model=controlled_unet(pipe.unet, controlnet, control),
                          **run)
        staged = (pipe.decode(z0).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(staged, called, rtol=1e-4, atol=1e-5)
