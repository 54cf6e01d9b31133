"""Original single files as the user-facing API: models, text encoders and pipelines from one file, and back.

The reference is independent of latentdiff's loaders: tiny diffusers / transformers models with random
weights are written in the original layout by the convert tables (proven against diffusers' own converters
in test_convert.py), and what latentdiff builds from that file must compute what those models compute, and
what diffusers' own `StableDiffusionPipeline.from_single_file` builds from the same file.
"""
from __future__ import annotations

import json
import warnings

import diffusers
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from latentdiff import (
    AutoencoderKL,
    CheckpointError,
    DDPMSampler,
    InputError,
    LatentDiffusionPipeline,
    RegistryError,
    TextEncoder,
    TextEncoderConfig,
    UNet2DConditional,
)
from latentdiff.cli import main
from latentdiff.convert import single_file, to_single_file
from latentdiff.convert.api import pipeline_from_single_file, pipeline_to_single_file
from latentdiff.convert.tokenizers import resolve_tokenizer
from latentdiff.registry import PIPELINES
from tests._support.convert import parts_of, same_tensors
from tests._support.hub_cache import make_hub_cache
from tests._support.parity import assert_parity, randomize
from tests._support.sd import SD_SCHEDULER, tiny_diffusers_pipeline
from tests._support.tiny_clip import random_clip_text_model, tiny_clip_config, write_tiny_clip_tokenizer

warnings.filterwarnings("ignore", category=FutureWarning)
PROMPT, NEGATIVE = "a photo of a cat", "the dog"
# An SD 1.x-like model by the released models' conventions (8 heads, GroupNorm(32), 64-wide text heads),
# so that shape inference and the YAML below both describe it exactly.
UNET = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8,
            sample_size=8)
VAE = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=16)
YAML = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
    "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": 8, "scale_factor": 0.18215,
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "channel_mult": [1, 2],
        "attention_resolutions": [1], "num_res_blocks": 1, "num_heads": 8, "use_spatial_transformer": True,
        "transformer_depth": 1, "context_dim": 64}},
    "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 2],
        "num_res_blocks": 1, "attn_resolutions": []}}},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}}}}


def latents(seed=0):
    return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """Tiny SD 1.x: diffusers models, their original-layout file (.safetensors, .ckpt), a config folder for
    diffusers' single-file loader, the tokenizer folder, and the YAML as a file."""
    root = tmp_path_factory.mktemp("single")
    torch.manual_seed(0)
    models = dict(unet=randomize(diffusers.UNet2DConditionModel(**UNET), 1).eval(),
                  vae=randomize(diffusers.AutoencoderKL(**VAE), 2).eval(),
                  text_encoder=random_clip_text_model(tiny_clip_config(hidden_size=64, num_attention_heads=1)))
    state = to_single_file({k: (v.config.to_dict() if k == "text_encoder" else dict(v.config), v.state_dict())
                            for k, v in models.items()})
    save_file(state, root / "sd.safetensors")
    torch.save({"state_dict": state, "global_step": 10}, root / "sd.ckpt")
    folder = root / "config"
    for name, model in models.items():
        model.save_pretrained(folder / name)
    diffusers.DDIMScheduler(**SD_SCHEDULER).save_pretrained(folder / "scheduler")
    tokenizer = write_tiny_clip_tokenizer(folder / "tokenizer")
    entries = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
               "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
               "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
               "feature_extractor": [None, None], "image_encoder": [None, None]}
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "requires_safety_checker": False, **entries}))
    (root / "tiny.yaml").write_text(yaml.safe_dump(YAML))
    return dict(root=root, models=models, state=state, folder=folder, tokenizer=tokenizer, yaml=root / "tiny.yaml")


@pytest.fixture(scope="module")
def reference(sd):
    """diffusers' own single-file loader on the same file."""
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(sd["root"] / "sd.safetensors"), config=str(sd["folder"]), local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, *, diffusers_pipe=False, output_type="np", seed=0):
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=16, width=16, num_inference_steps=2,
              guidance_scale=7.5, latents=latents(seed), output_type=output_type)
    with torch.no_grad():
        images = pipe(**kw).images if diffusers_pipe else pipe(**kw, progress=False).images
    return torch.as_tensor(images)


# ---- one model at a time --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, original_config", [(".safetensors", None), (".ckpt", None), (".safetensors", "dict"),
                                                 (".ckpt", "file")])
def test_unet_and_vae_from_single_file_match_diffusers(sd, fmt, original_config):
    path = sd["root"] / f"sd{fmt}"
    config = {None: None, "dict": YAML, "file": sd["yaml"]}[original_config]
    unet = UNet2DConditional.from_single_file(path, original_config=config)
    vae = AutoencoderKL.from_single_file(path, original_config=config)
    ref_unet, ref_vae = sd["models"]["unet"], sd["models"]["vae"]
    torch.manual_seed(1)
    x, context, image = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 64), torch.rand(1, 3, 16, 16) * 2 - 1
    t = torch.tensor([10, 900])
    with torch.no_grad():
        assert_parity(unet(x, t, context), ref_unet(x, t, context).sample)
        assert_parity(vae.decode(x), ref_vae.decode(x).sample)
        assert_parity(vae.encode(image).mean, ref_vae.encode(image).latent_dist.mean)
    assert vae.config.scaling_factor == ref_vae.config.scaling_factor


@pytest.mark.parametrize("backend", ["auto", "transformers"])
def test_text_encoder_from_single_file_matches_transformers(sd, monkeypatch, backend):
    """By default the file's CLIP loads as latentdiff's own CLIPTextModel, as a folder does (no transformers model
    on the inference path); LATENTDIFF_TEXT_BACKEND=transformers asks for transformers' class. Same numbers."""
    import transformers

    from latentdiff.models.clip_text import CLIPTextModel

    monkeypatch.setenv("LATENTDIFF_TEXT_BACKEND", backend)
    path = sd["root"] / "sd.safetensors"
    tokenizer = CLIPTokenizer.from_pretrained(sd["tokenizer"])
    by_folder = TextEncoder.from_single_file(path, tokenizer=sd["tokenizer"])
    by_object = TextEncoder.from_single_file(path, tokenizer=tokenizer)
    ids = tokenizer([PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = sd["models"]["text_encoder"](ids).last_hidden_state
        assert_parity(by_folder([PROMPT, ""]), expected)
        assert_parity(by_object.encode_ids(ids), expected)
    assert by_object.tokenizer is tokenizer and by_folder.max_length == 77
    model_class = CLIPTextModel if backend == "auto" else transformers.CLIPTextModel
    assert isinstance(by_folder.model, model_class) and isinstance(by_object.model, model_class)


def test_ema_switch(sd, tmp_path):
    from latentdiff.convert.unet_ldm import ema_name

    state = dict(sd["state"])
    unet_keys = [k for k in state if k.startswith("model.diffusion_model.")]
    state.update({ema_name(k): state[k] + 0.5 for k in unet_keys})
    state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(3)})
    torch.save({"state_dict": state}, tmp_path / "ema.ckpt")
    reference = sd["models"]["unet"].state_dict()
    ema = UNet2DConditional.from_single_file(tmp_path / "ema.ckpt").state_dict()
    live = UNet2DConditional.from_single_file(tmp_path / "ema.ckpt", use_ema=False).state_dict()
    assert ema.keys() == live.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(live[key], value) and torch.equal(ema[key], value + 0.5), key


# ---- whole pipelines ------------------------------------------------------------------------------------------
def test_pipeline_matches_diffusers_single_file_loader(sd, reference):
    pipe = pipeline_from_single_file(sd["root"] / "sd.safetensors", tokenizer=sd["tokenizer"])
    assert type(pipe) is LatentDiffusionPipeline
    expected = run(reference, diffusers_pipe=True)
    assert_parity(run(pipe), expected)
    # with the YAML, and parts passed in replacing the file's (no tokenizer needed then)
    with_yaml = pipeline_from_single_file(sd["root"] / "sd.ckpt", original_config=sd["yaml"],
                                          text_encoder=pipe.text_encoder, sampler=DDPMSampler())
    assert with_yaml.text_encoder is pipe.text_encoder and isinstance(with_yaml.sampler, DDPMSampler)
    assert with_yaml.noise_scheduler == pipe.noise_scheduler
    same = LatentDiffusionPipeline(vae=with_yaml.vae, unet=with_yaml.unet, text_encoder=pipe.text_encoder,
                                   noise_scheduler=with_yaml.noise_scheduler, sampler=pipe.sampler)
    assert_parity(run(same), expected)
    with pytest.raises(TypeError, match="safety_checker"):
        pipeline_from_single_file(sd["root"] / "sd.safetensors", tokenizer=sd["tokenizer"], safety_checker=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip_reproduces_every_tensor(sd, tmp_path, dtype):
    original = {k: v.to(dtype) for k, v in sd["state"].items()}
    save_file(original, tmp_path / "in.safetensors")
    pipe = pipeline_from_single_file(tmp_path / "in.safetensors", tokenizer=sd["tokenizer"], torch_dtype=dtype)
    pipeline_to_single_file(pipe, tmp_path / "out.safetensors")
    same_tensors(load_file(tmp_path / "out.safetensors"), original)
    unet = UNet2DConditional.from_single_file(tmp_path / "in.safetensors", torch_dtype=dtype)
    unet.save_single_file(tmp_path / "unet.safetensors")
    same_tensors(load_file(tmp_path / "unet.safetensors"),
                 {k: v for k, v in original.items() if k.startswith("model.diffusion_model.")})
    if dtype == torch.float32:  # save_single_file(dtype=) casts, as the CLI's --dtype
        unet.save_single_file(tmp_path / "half.safetensors", dtype=torch.float16)
        same_tensors(load_file(tmp_path / "half.safetensors"),
                     {k: v.half() for k, v in original.items() if k.startswith("model.diffusion_model.")})


def test_self_describing_export_reloads_without_yaml_or_inference(tmp_path, monkeypatch):
    """A model no shape inference would guess (2 heads, GroupNorm(8), clip skip) comes back exactly from the
    configs in the file's metadata."""
    ref = tiny_diffusers_pipeline(tmp_path)
    ref.save_pretrained(tmp_path / "diffusers")
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "diffusers")
    pipe.text_encoder = TextEncoder(pipe.text_encoder.model, pipe.text_encoder.tokenizer,
                                    TextEncoderConfig(layer="penultimate"))
    path = pipeline_to_single_file(pipe, tmp_path / "tiny.safetensors", metadata={"note": "tiny"})
    monkeypatch.setattr(single_file, "infer_layout", lambda *a, **k: pytest.fail("shape inference was used"))
    again = pipeline_from_single_file(path, tokenizer=pipe.text_encoder.tokenizer)
    for name in ("unet", "vae"):
        assert getattr(again, name).config == getattr(pipe, name).config, name
    assert again.text_encoder.config == pipe.text_encoder.config and again.noise_scheduler == pipe.noise_scheduler
    kw = dict(prompt=PROMPT, num_inference_steps=2, latents=torch.randn(1, 4, 16, 16), output_type="latent",
              progress=False)
    assert_parity(again(**kw).images, pipe(**kw).images)
    assert UNet2DConditional.from_single_file(path).config == pipe.unet.config


# ---- tokenizers -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("repo, sub, kind", [("openai/clip-vit-large-patch14", None, "clip"),
                                             ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer", "clip"),
                                             ("stabilityai/stable-diffusion-2", "tokenizer", "openclip")])
def test_tokenizer_from_the_local_hub_cache(sd, tmp_path, monkeypatch, repo, sub, kind):
    source = tmp_path / "repo"
    write_tiny_clip_tokenizer(source / sub if sub else source)
    make_hub_cache(tmp_path / "cache", repo, source)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = resolve_tokenizer(kind, cache_dir=tmp_path / "cache")
    assert tokenizer.get_vocab() == CLIPTokenizer.from_pretrained(sd["tokenizer"]).get_vocab()
    by_id = resolve_tokenizer(kind, repo, cache_dir=tmp_path / "cache")  # tokenizer= a Hub id: its root or tokenizer/
    assert by_id.get_vocab() == tokenizer.get_vocab()
    if kind == "clip":
        encoder = TextEncoder.from_single_file(sd["root"] / "sd.safetensors", cache_dir=tmp_path / "cache")
        with torch.no_grad():
            assert_parity(encoder(PROMPT), TextEncoder.from_single_file(sd["root"] / "sd.safetensors",
                                                                        tokenizer=sd["tokenizer"])(PROMPT))


def test_missing_tokenizer_error_says_what_was_tried(sd, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        TextEncoder.from_single_file(sd["root"] / "sd.safetensors", cache_dir=tmp_path / "empty")
    message = str(err.value)
    for part in ("openai/clip-vit-large-patch14", str(tmp_path / "empty"), "HF_HUB_OFFLINE", "tokenizer=",
                 "sd.safetensors"):
        assert part in message, part
    # online, but the download fails: the error says so (no network is touched here)
    real = huggingface_hub.snapshot_download
    tried = []

    def offline_hub(repo_id, **kw):
        if not kw.get("local_files_only"):
            tried.append(repo_id)
            raise OSError("network unreachable")
        return real(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline_hub)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(CheckpointError, match="downloading openai/clip-vit-large-patch14 failed.*network unreachable"):
        pipeline_from_single_file(sd["root"] / "sd.safetensors", cache_dir=tmp_path / "empty")
    assert tried == ["openai/clip-vit-large-patch14"]


# ---- the command line -------------------------------------------------------------------------------------------
def test_cli_converts_both_ways(sd, tmp_path, capsys):
    folder, back, half = tmp_path / "diffusers", tmp_path / "back.safetensors", tmp_path / "half.safetensors"
    assert main(["convert", str(sd["root"] / "sd.ckpt"), str(folder), "--tokenizer", str(sd["tokenizer"])]) == 0
    assert "converting" in capsys.readouterr().err  # the progress bar
    loaded = LatentDiffusionPipeline.from_pretrained(folder)
    for name in ("unet", "vae"):
        same_tensors(getattr(loaded, name).state_dict(), sd["models"][name].state_dict())
    same_tensors(loaded.text_encoder.model.state_dict(), sd["models"]["text_encoder"].state_dict())
    assert main(["convert", str(folder), str(back)]) == 0
    same_tensors(load_file(back), sd["state"])
    assert main(["convert", str(folder), str(half), "--dtype", "fp16", "--to", "single-file"]) == 0
    same_tensors(load_file(half), {k: v.half() for k, v in sd["state"].items()})
    assert main(["convert", str(sd["root"] / "sd.safetensors"), str(folder), "--tokenizer", str(sd["tokenizer"])]) == 2
    assert "destination exists" in capsys.readouterr().err


def test_standalone_autoencoder_converts_to_a_model_folder(sd, tmp_path):
    vae = AutoencoderKL.from_single_file(sd["root"] / "sd.safetensors")
    vae.save_single_file(tmp_path / "vae.safetensors")
    assert "encoder.conv_in.weight" in load_file(tmp_path / "vae.safetensors")  # CompVis' stand-alone layout
    assert main(["convert", str(tmp_path / "vae.safetensors"), str(tmp_path / "vae")]) == 0
    same_tensors(diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").state_dict(),
                 sd["models"]["vae"].state_dict())
    with pytest.raises(CheckpointError, match="no denoiser"):
        pipeline_from_single_file(tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match=r"no 'unet' part.*found: \['vae'\]") as err:
        UNet2DConditional.from_single_file(tmp_path / "vae.safetensors")
    assert str(tmp_path / "vae.safetensors") in str(err.value)


# ---- bad input ----------------------------------------------------------------------------------------------------
def bad_files(sd, tmp_path):
    good = (sd["root"] / "sd.safetensors").read_bytes()
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    (tmp_path / "cut.safetensors").write_bytes(good[:-1000])
    wrong = dict(sd["state"])
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    wrong[key] = wrong[key][:, :, :1, :1].clone()  # a 3x3 conv stored as 1x1
    save_file(wrong, tmp_path / "shape.safetensors")
    return {"notes.ckpt": "not a checkpoint", "cut.safetensors": "truncated",
            "shape.safetensors": r"down_blocks\.0\.resnets\.0\.conv1\.weight: expected \(32, 32, 3, 3\)"}


def test_bad_files_fail_clearly_and_write_nothing(sd, tmp_path, capsys):
    for name, message in bad_files(sd, tmp_path).items():
        path = tmp_path / name
        with pytest.raises(CheckpointError, match=message) as err:
            pipeline_from_single_file(path, tokenizer=sd["tokenizer"])
        assert str(path) in str(err.value), name
        for dst in (tmp_path / f"{name}.out", tmp_path / f"{name}.out.safetensors"):
            assert main(["convert", str(path), str(dst), "--tokenizer", str(sd["tokenizer"])]) == 2
            error, hint = capsys.readouterr().err.strip().splitlines()[-2:]  # one line + hint, after any progress bar
            assert error.startswith("latentdiff: error:") and str(path) in error and hint.startswith("hint:"), name
            assert not dst.exists() and not list(tmp_path.glob(f".{dst.name}*")), name


def test_wrong_class_and_arguments(sd, tmp_path):
    from latentdiff.models.unet2d import UNet2D

    with pytest.raises(CheckpointError, match="UNet2DConditional.from_single_file"):
        UNet2D.from_single_file(sd["root"] / "sd.safetensors")
    with pytest.raises(InputError, match="source does not exist"):
        main(["--debug", "convert", str(tmp_path / "absent.ckpt"), str(tmp_path / "x")])
    with pytest.raises(InputError, match="safetensors"):
        main(["--debug", "convert", str(sd["folder"]), str(tmp_path / "x.ckpt")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.ckpt").exists()


def test_pipeline_class_follows_the_family(sd, tmp_path, monkeypatch):
    """An inpainting file runs in the 'inpainting' pipeline when PIPELINES has one, else a clear error."""
    torch.manual_seed(0)
    inpaint = randomize(diffusers.UNet2DConditionModel(**{**UNET, "in_channels": 9}), 3).eval()
    parts = parts_of(unet=inpaint, vae=sd["models"]["vae"])
    parts["text_encoder"] = (sd["models"]["text_encoder"].config.to_dict(), sd["models"]["text_encoder"].state_dict())
    save_file(to_single_file(parts), tmp_path / "inpaint.safetensors")
    PIPELINES.names()  # the built-in pipelines are registered before the registry is patched
    monkeypatch.delitem(PIPELINES._entries, "inpainting", raising=False)
    with pytest.raises(CheckpointError, match="sd-inpaint checkpoint runs in the 'inpainting' pipeline"):
        pipeline_from_single_file(tmp_path / "inpaint.safetensors", tokenizer=sd["tokenizer"])

    class Inpaint(LatentDiffusionPipeline):
        def unet_in_channels(self):  # latents + mask + masked-image latents
            return (2 * self.vae.latent_channels + 1,)

    class Unrelated(LatentDiffusionPipeline):
        pass

    monkeypatch.setitem(PIPELINES._entries, "inpainting", Inpaint)
    pipe = pipeline_from_single_file(tmp_path / "inpaint.safetensors", tokenizer=sd["tokenizer"],
                                     pipeline_class=LatentDiffusionPipeline)  # a base class gets the subclass
    assert type(pipe) is Inpaint and pipe.unet.config.in_channels == 9
    x, t, context = torch.randn(1, 9, 8, 8), torch.tensor([3]), torch.randn(1, 5, 64)
    with torch.no_grad():
        assert_parity(pipe.unet(x, t, context), inpaint(x, t, context).sample)
    with pytest.raises(CheckpointError, match="runs in Inpaint, not Unrelated"):
        pipeline_from_single_file(tmp_path / "inpaint.safetensors", tokenizer=sd["tokenizer"],
                                  pipeline_class=Unrelated)
    with pytest.raises(RegistryError, match="text-to-image"):
        pipeline_from_single_file(tmp_path / "inpaint.safetensors", tokenizer=sd["tokenizer"], task="nonsense")


def test_class_embedder_part(sd, tmp_path, monkeypatch):
    """The class-conditional LDM's ClassEmbedder (cin256): loaded, written back, and its pipeline looked up."""
    from latentdiff.models.conditioners import ClassEmbedder

    table = torch.randn(11, 64)
    parts = parts_of(unet=sd["models"]["unet"], vae=sd["models"]["vae"])
    parts["class_embedder"] = ({"_class_name": "ClassEmbedder", "num_classes": 11, "embed_dim": 64},
                               {"embedding.weight": table})
    state = to_single_file(parts)
    save_file(state, tmp_path / "cin.safetensors")
    embedder = ClassEmbedder.from_single_file(tmp_path / "cin.safetensors")
    assert torch.equal(embedder(torch.tensor([4]))[0, 0], table[4])
    embedder.save_single_file(tmp_path / "embedder.safetensors")
    assert ClassEmbedder.from_single_file(tmp_path / "embedder.safetensors").config == embedder.config
    PIPELINES.names()
    monkeypatch.delitem(PIPELINES._entries, "class-conditional", raising=False)
    with pytest.raises(CheckpointError, match="ldm checkpoint runs in the 'class-conditional' pipeline"):
        pipeline_from_single_file(tmp_path / "cin.safetensors")


def test_ldm_first_stage_and_unet_without_cross_attention(tmp_path):
    """The LDM family: a VQ first stage and a UNet2DModel denoiser (AttentionBlock heads from the YAML)."""
    from latentdiff.models.unet2d import UNet2D
    from latentdiff.models.vq import VQModel
    from tests._support.convert import tiny_ldm

    unet, vq, yaml_config = tiny_ldm()
    save_file(to_single_file(parts_of(unet=unet, vqvae=vq)), tmp_path / "ldm.safetensors")
    ours = UNet2D.from_single_file(tmp_path / "ldm.safetensors", original_config=yaml_config)
    first_stage = VQModel.from_single_file(tmp_path / "ldm.safetensors", original_config=yaml_config)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([5])
    with torch.no_grad():
        assert_parity(ours(x, t), unet(x, t).sample)
        assert_parity(first_stage.decode(x), vq.decode(x).sample)
    first_stage.save_single_file(tmp_path / "vq.safetensors")
    same_tensors(load_file(tmp_path / "vq.safetensors"), to_single_file(parts_of(vqvae=vq)))
    if "unconditional" in PIPELINES:
        assert type(pipeline_from_single_file(tmp_path / "ldm.safetensors", original_config=yaml_config)) is \
            PIPELINES.get("unconditional")
    else:
        with pytest.raises(CheckpointError, match="ldm checkpoint runs in the 'unconditional' pipeline"):
            pipeline_from_single_file(tmp_path / "ldm.safetensors", original_config=yaml_config)
