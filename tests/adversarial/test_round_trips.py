"""Loads that must not depend on each other, and round trips that must not lie: a model's part of a single file
loads alone, a penultimate-layer text encoder saves as diffusers reads it, a custom UNet's folder reloads, the
CLI records a model path that resolves from anywhere, concurrent loads leave torch.nn.init alone, a real SD
tokenizer folder loads silently, and the docs say VQModel tiles."""
from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from latentdiff import (
    AutoencoderKL,
    CheckpointError,
    ConfigError,
    LatentDiffusionPipeline,
    TextEncoder,
    TextEncoderConfig,
    UNet2DConditional,
)
from latentdiff.cli import main
from latentdiff.convert import to_single_file
from latentdiff.convert.api import pipeline_from_single_file
from latentdiff.utils.images import read_png_params
from tests._support.hub_folders import write_real_tokenizer
from tests._support.parity import assert_parity
from tests._support.sd import tiny_diffusers_pipeline
from tests._support.tiny_clip import random_clip_text_model, tiny_clip_config, write_tiny_clip_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a photo of a cat"
FILE_KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
SD1_UNET = dict(block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8,
                sample_size=8)
SD1_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny SD folder (diffusers' save), and a tiny SD 1.x by the released models' conventions (so that
    shape inference describes it) as one original-layout file."""
    import diffusers

    root = tmp_path_factory.mktemp("trips")
    ref = tiny_diffusers_pipeline(root)
    ref.save_pretrained(root / "diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**SD1_UNET)
    vae = diffusers.AutoencoderKL(**SD1_VAE)
    text = random_clip_text_model(tiny_clip_config(hidden_size=64, num_attention_heads=1))
    state = to_single_file({"unet": (dict(unet.config), unet.state_dict()), "vae": (dict(vae.config), vae.state_dict()),
                            "text_encoder": (text.config.to_dict(), text.state_dict())})
    save_file(state, root / "sd.safetensors")
    write_tiny_clip_tokenizer(root / "tokenizer")
    return dict(root=root, ref=ref, state=state, text=text)


def with_unreadable_text_encoder(tiny, path):
    """The single file with a CLIP text encoder whose architecture cannot be inferred (a weight it needs is gone)."""
    state = {k: v for k, v in tiny["state"].items() if "encoder.layers.0.mlp.fc1." not in k}
    assert len(state) == len(tiny["state"]) - 2
    save_file(state, path)
    with pytest.raises(CheckpointError, match="fc1"):   # the whole file does not load
        pipeline_from_single_file(path, tokenizer=tiny["root"] / "tokenizer")
    return path


# ---- single files: each part alone ------------------------------------------------------------------------
@pytest.mark.outcome("correct", fails_as="crash")
def test_unet_from_a_whole_file_whose_text_encoder_cannot_be_inferred(tiny, tmp_path):
    path = with_unreadable_text_encoder(tiny, tmp_path / "odd.safetensors")
    unet = UNet2DConditional.from_single_file(path)
    expected = UNet2DConditional.from_single_file(tiny["root"] / "sd.safetensors")
    assert unet.config == expected.config
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), expected.state_dict().values(),
                                                  strict=True))


@pytest.mark.outcome("correct", fails_as="crash")
def test_vae_from_a_whole_file_whose_text_encoder_cannot_be_inferred(tiny, tmp_path):
    path = with_unreadable_text_encoder(tiny, tmp_path / "odd.safetensors")
    vae = AutoencoderKL.from_single_file(path)
    expected = AutoencoderKL.from_single_file(tiny["root"] / "sd.safetensors")
    assert vae.config == expected.config
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), expected.state_dict().values(),
                                                  strict=True))


@pytest.mark.outcome("correct", fails_as="crash")
def test_pipeline_from_single_file_with_text_encoder_given_never_reads_the_files(tiny, tmp_path, monkeypatch):
    from latentdiff.convert import api

    path = with_unreadable_text_encoder(tiny, tmp_path / "odd.safetensors")
    encoder = TextEncoder.from_single_file(tiny["root"] / "sd.safetensors", tokenizer=tiny["root"] / "tokenizer")
    built: list[str] = []
    real = api.text_encoder_from_part
    monkeypatch.setattr(api, "text_encoder_from_part", lambda *a, **k: built.append("text") or real(*a, **k))
    pipe = pipeline_from_single_file(path, text_encoder=encoder)
    assert pipe.text_encoder is encoder and built == []
    assert type(pipe) is LatentDiffusionPipeline


@pytest.mark.outcome("clear_error")
def test_wrong_shape_in_a_single_file_names_the_key_in_the_file(tiny, tmp_path):
    state = dict(tiny["state"])
    state[FILE_KEY] = state[FILE_KEY][:, :, :1, :1].clone()   # a 3x3 conv stored as 1x1
    save_file(state, tmp_path / "shape.safetensors")
    with pytest.raises(CheckpointError) as info:
        UNet2DConditional.from_single_file(tmp_path / "shape.safetensors")
    message = str(info.value)
    assert FILE_KEY in message and "down_blocks.0.resnets.0.conv1.weight" in message
    assert "expected (32, 32, 3, 3), found (32, 32, 1, 1)" in message and "shape.safetensors" in message


# ---- a penultimate-layer text encoder, saved as diffusers reads it ---------------------------------------------
@pytest.mark.outcome("correct", fails_as="data_loss")
def test_penultimate_text_encoder_folder_loads_in_diffusers_to_the_same_images(tiny, tmp_path, diffusers):
    pipe = LatentDiffusionPipeline.from_pretrained(tiny["root"] / "diffusers")
    encoder = pipe.text_encoder
    pipe.text_encoder = TextEncoder(encoder.model, encoder.tokenizer, TextEncoderConfig(layer="penultimate"))
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(prompt=PROMPT, num_inference_steps=2, guidance_scale=7.5, height=32, width=32, output_type="np")
    ours = pipe(**kw, latents=latents, progress=False).images
    pipe.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "text_encoder" / "config.json").read_text())
    assert config["num_hidden_layers"] == encoder.model.config.num_hidden_layers - 1   # as SD 2.x folders are
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = ref(**kw, latents=latents).images
    assert_parity(torch.from_numpy(ours), torch.from_numpy(theirs))
    again = LatentDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert torch.equal(torch.from_numpy(again(**kw, latents=latents, progress=False).images), torch.from_numpy(ours))


@pytest.mark.outcome("clear_error", fails_as="data_loss")
def test_penultimate_without_final_norm_is_refused_not_saved_wrong(tiny, tmp_path):
    pipe = LatentDiffusionPipeline.from_pretrained(tiny["root"] / "diffusers")
    encoder = pipe.text_encoder
    pipe.text_encoder = TextEncoder(encoder.model, encoder.tokenizer,
                                    TextEncoderConfig(layer="penultimate", apply_final_norm=False))
    with pytest.raises(ConfigError, match="penultimate") as info:
        pipe.save_pretrained(tmp_path / "saved")
    assert "apply_final_norm" in str(info.value) and not (tmp_path / "saved").exists()


# ---- a custom UNet's folder ------------------------------------------------------------------------------------
@pytest.mark.outcome("correct")
def test_folder_with_a_custom_unet_reloads_with_that_unet_passed(tiny, tmp_path):
    pipe = LatentDiffusionPipeline.from_pretrained(tiny["root"] / "diffusers")

    class MyUNet(UNet2DConditional):
        diffusers_class_name = None   # saved as ["latentdiff", "MyUNet"]: no diffusers class loads it

    mine = MyUNet.from_state_dict(pipe.unet.config, pipe.unet.state_dict())
    LatentDiffusionPipeline(vae=pipe.vae, unet=mine, text_encoder=pipe.text_encoder,
                            noise_scheduler=pipe.noise_scheduler, sampler=pipe.sampler).save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["unet"] == ["latentdiff", "MyUNet"]
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "m", unet=mine)
    assert loaded.unet is mine
    with pytest.raises(ConfigError, match="unet") as info:   # without it: the class is named
        LatentDiffusionPipeline.from_pretrained(tmp_path / "m")
    assert "MyUNet" in str(info.value) and "model_index.json" in str(info.value)


# ---- the CLI records what resolves -------------------------------------------------------------------------------
@pytest.mark.outcome("correct")
def test_generate_records_a_relative_model_path_that_from_finds_elsewhere(tiny, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny["root"] / "diffusers", tmp_path / "work" / "models" / "sd")
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    flags = ["--steps", "1", "--height", "32", "--width", "32"]
    assert main(["generate", PROMPT, "-o", "out.png", "--model", "models/sd", *flags]) == 0
    assert read_png_params("out.png")["model"] == str((tmp_path / "work" / "models" / "sd").resolve())
    monkeypatch.chdir(tmp_path / "other")
    assert main(["generate", "--from", str(tmp_path / "work" / "out.png"), "-o", "again.png"]) == 0
    assert Path("again.png").is_file()


# ---- concurrent loads change no global state ---------------------------------------------------------------
@pytest.mark.outcome("correct", fails_as="crash")
def test_concurrent_from_pretrained_leaves_torch_nn_init_as_it_was(tiny):
    from latentdiff.models.base import INIT_FUNCTIONS

    originals = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS if hasattr(torch.nn.init, name)}
    folder = tiny["root"] / "diffusers" / "unet"
    serial = UNet2DConditional.from_pretrained(folder).state_dict()
    results: list[dict] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def load():
        try:
            barrier.wait()
            for _ in range(3):
                results.append(UNet2DConditional.from_pretrained(folder).state_dict())
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12
    assert {name: getattr(torch.nn.init, name) for name in originals} == originals
    assert all(torch.equal(r[k], serial[k]) for r in results for k in serial)
    # the interleaving that left the wrappers behind, forced: A enters, B enters, A leaves, B leaves
    from latentdiff.models.base import init_skipped_on_meta

    steps = [threading.Event() for _ in range(3)]

    def first():
        with init_skipped_on_meta():
            steps[0].set()
            steps[1].wait(10)
        steps[2].set()

    def second():
        steps[0].wait(10)
        with init_skipped_on_meta():
            steps[1].set()
            steps[2].wait(10)
            assert torch.nn.init.normal_(torch.empty(2, device="meta")).is_meta   # still skipping on meta

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {name: getattr(torch.nn.init, name) for name in originals} == originals


# ---- the real repo's tokenizer folder loads silently -----------------------------------------------------------
@pytest.mark.outcome("correct")
def test_real_sd_tokenizer_config_loads_without_printing(tiny, tmp_path, capfd):
    import shutil

    folder = tmp_path / "sd"
    shutil.copytree(tiny["root"] / "diffusers", folder)
    write_real_tokenizer(folder / "tokenizer")
    capfd.readouterr()
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    out, err = capfd.readouterr()
    assert "Ignored unknown kwarg" not in out + err and out == ""
    ids = pipe.text_encoder.tokenize([PROMPT])
    reference = LatentDiffusionPipeline.from_pretrained(tiny["root"] / "diffusers").text_encoder.tokenize([PROMPT])
    assert torch.equal(ids, reference)


@pytest.mark.outcome("clear_error")
def test_an_added_token_with_an_unknown_field_is_a_config_error(tmp_path):
    from latentdiff.models.tokenizers import added_token

    with pytest.raises(ConfigError, match="added token") as info:
        added_token({"content": "<x>", "sparkle": True}, where="tokenizer_config.json: bos_token")
    assert "sparkle" in str(info.value) and "tokenizer_config.json: bos_token" in str(info.value)


# ---- docs ------------------------------------------------------------------------------------------------------
@pytest.mark.outcome("correct")
def test_docs_say_vqmodel_tiles_and_it_does():
    from latentdiff.models.vq import VQModel, VQModelConfig

    text = (Path(__file__).parents[2] / "docs" / "memory.md").read_text()
    assert "VQModel` for now" not in text and "`VQModel`" in text
    vq = VQModel(VQModelConfig(channels=(8, 8), layers_per_level=1, norm_num_groups=4, latent_channels=3,
                               num_vq_embeddings=8, vq_embed_dim=3)).eval()
    vq.enable_tiling(tile_sample_size=16, overlap=0.25)
    with torch.no_grad():
        assert vq.decode(torch.randn(1, 3, 16, 16)).shape == (1, 3, 32, 32)


# ---- a custom sampler -------------------------------------------------------------------------------------------
@pytest.mark.outcome("correct", fails_as="crash")
def test_pipeline_with_a_registered_custom_sampler_saves_and_loads_back(tiny, tmp_path, monkeypatch, diffusers):
    from latentdiff import DDIMSampler
    from latentdiff.registry import SAMPLERS

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class QuietDDIM(DDIMSampler):
        """DDIM with a setting of its own (diffusers has no class for it)."""

        quietness: float = 0.5

    SAMPLERS.names()   # the built-in samplers first
    monkeypatch.setitem(SAMPLERS._entries, "test_quiet_ddim", QuietDDIM)
    monkeypatch.setattr(QuietDDIM, "registry_name", "test_quiet_ddim", raising=False)
    pipe = LatentDiffusionPipeline.from_pretrained(tiny["root"] / "diffusers")
    pipe.sampler = QuietDDIM(quietness=0.25, timestep_spacing="trailing", steps_offset=1)
    pipe.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "scheduler" / "scheduler_config.json").read_text())
    assert config["_latentdiff_sampler"]["name"] == "test_quiet_ddim" and "diffusers" in config["_latentdiff_note"]
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert loaded.sampler == pipe.sampler and type(loaded.sampler) is QuietDDIM
    assert loaded.noise_scheduler.config == pipe.noise_scheduler.config
    schedule = diffusers.DDIMScheduler.from_pretrained(tmp_path / "saved" / "scheduler")   # diffusers reads it
    assert schedule.config.timestep_spacing == "trailing"
    monkeypatch.delitem(SAMPLERS._entries, "test_quiet_ddim")
    with pytest.raises(ConfigError, match="not registered") as info:   # loading it where it is not registered
        LatentDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert "_latentdiff_sampler" in str(info.value) and "test_quiet_ddim" in str(info.value)
