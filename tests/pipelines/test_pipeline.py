"""LatentDiffusionPipeline: parity with diffusers' StableDiffusionPipeline, I/O both ways, bad input."""
from __future__ import annotations

import socket
import threading
import warnings

import numpy as np
import pytest
import torch

from latentdiff import CheckpointError, ConfigError, DDIMSampler, DDPMSampler, InputError, LatentDiffusionPipeline
from latentdiff.diffusion.samplers import PLMSSampler
from tests._support.hub_cache import make_hub_cache
from tests._support.parity import assert_parity
from tests._support.sd import tiny_diffusers_pipeline

PROMPT, NEGATIVE = "a photo of a cat", "the dog"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    ref = tiny_diffusers_pipeline(root)
    ref.save_pretrained(root / "diffusers")
    return ref, root


@pytest.fixture(scope="module")
def pipe(folders):
    ref, root = folders
    return LatentDiffusionPipeline.from_pretrained(root / "diffusers")


def fixed_latents(batch=1, seed=0, size=16):
    return torch.randn((batch, 4, size, size), generator=torch.Generator().manual_seed(seed))


def run_ref(ref, **kw):
    kw.setdefault("num_inference_steps", 5)
    with torch.no_grad():
        return ref(**kw).images


def test_pipeline_parity_with_diffusers(folders, pipe):
    ref, _ = folders
    latents = fixed_latents()
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, latents=latents, height=32, width=32)
    expected = run_ref(ref, output_type="np", **kw)
    ours = pipe(**kw, num_inference_steps=5, output_type="np", progress=False).images
    assert ours.shape == expected.shape == (1, 32, 32, 3)
    assert_parity(torch.from_numpy(ours), torch.from_numpy(expected))
    lat_ref = run_ref(ref, output_type="latent", **kw)
    lat_ours = pipe(**kw, num_inference_steps=5, output_type="latent", progress=False).images
    assert_parity(lat_ours, lat_ref)
    assert not torch.allclose(lat_ours, latents, atol=1e-3)  # the denoiser really ran


def test_pipeline_parity_batch_without_guidance(folders, pipe):
    ref, _ = folders
    latents = fixed_latents(batch=2, seed=3)
    kw = dict(prompt=[PROMPT, "a dog"], guidance_scale=1.0, latents=latents, height=32, width=32)
    expected = run_ref(ref, output_type="latent", **kw)
    ours = pipe(**kw, num_inference_steps=5, output_type="latent", progress=False).images
    assert_parity(ours, expected)


def test_output_types(pipe):
    kw = dict(num_inference_steps=2, latents=fixed_latents(), progress=False)
    pil = pipe(PROMPT, **kw).images
    array = pipe(PROMPT, output_type="np", **kw).images
    tensor = pipe(PROMPT, output_type="pt", **kw).images
    assert pil[0].size == (32, 32) and pil[0].mode == "RGB"
    assert array.shape == (1, 32, 32, 3) and tensor.shape == (1, 3, 32, 32)
    assert np.allclose(array, tensor.permute(0, 2, 3, 1).numpy())
    assert np.array_equal(np.asarray(pil[0]), (array[0] * 255).round().astype(np.uint8))


def test_seed_per_image_and_batch_consistency(pipe):
    kw = dict(num_inference_steps=3, output_type="latent", progress=False)
    batch = pipe([PROMPT, PROMPT], generator=[torch.Generator().manual_seed(s) for s in (7, 8)], **kw).images
    alone = pipe(PROMPT, generator=torch.Generator().manual_seed(8), **kw).images
    assert_parity(batch[1:], alone, tol=1e-5)
    again = pipe([PROMPT, PROMPT], generator=[torch.Generator().manual_seed(s) for s in (7, 8)], **kw).images
    assert torch.equal(batch, again)
    many = pipe(PROMPT, num_images_per_prompt=3, generator=torch.Generator().manual_seed(1), **kw).images
    assert many.shape[0] == 3


def test_eta_and_sampler_swap(pipe):
    kw = dict(num_inference_steps=3, output_type="latent", progress=False, latents=fixed_latents())
    a = pipe(PROMPT, eta=1.0, generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe(PROMPT, eta=1.0, generator=torch.Generator().manual_seed(0), **kw).images
    c = pipe(PROMPT, eta=0.0, **kw).images
    assert torch.equal(a, b) and not torch.allclose(a, c)
    ddpm = LatentDiffusionPipeline(vae=pipe.vae, unet=pipe.unet, text_encoder=pipe.text_encoder,
                                   noise_scheduler=pipe.noise_scheduler, sampler=DDPMSampler())
    out = ddpm(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    assert out.shape == a.shape and torch.isfinite(out).all()
    with pytest.raises(InputError, match="eta"):
        ddpm(PROMPT, eta=0.5, **kw)


def test_callback_per_step(pipe):
    seen = []
    pipe(PROMPT, num_inference_steps=4, output_type="latent", progress=False,
         callback=lambda i, t, x: seen.append((i, int(t), tuple(x.shape))))
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert seen[0][1] > seen[-1][1]


def test_callback_sees_the_x0_prediction(pipe):
    """A callback naming `denoised` gets the step's x0 prediction, shaped like the latents; the result is the one a
    three-argument callback sees (the callback's form changes nothing)."""
    seen = []
    kw = dict(num_inference_steps=3, output_type="latent", progress=False, latents=fixed_latents())
    out = pipe(PROMPT, **kw, callback=lambda i, t, x, denoised: seen.append((x, denoised))).images
    assert torch.equal(out, pipe(PROMPT, **kw, callback=lambda i, t, x: None).images)
    assert len(seen) == 3 and all(d.shape == x.shape and torch.isfinite(d).all() for x, d in seen)
    assert torch.equal(seen[-1][0], out)


def test_two_threads_share_one_pipeline(pipe):
    kw = dict(output_type="latent", progress=False, latents=fixed_latents())
    expected = {n: pipe(PROMPT, num_inference_steps=n, **kw).images for n in (2, 4)}
    results = {}

    def work(n):
        results[n] = pipe(PROMPT, num_inference_steps=n, **kw).images

    threads = [threading.Thread(target=work, args=(n,)) for n in (2, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in (2, 4):
        assert torch.equal(results[n], expected[n])


def test_saved_folder_loads_in_diffusers(pipe, tmp_path):
    import diffusers

    pipe.save_pretrained(tmp_path / "ours")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "ours", safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    assert type(ref.scheduler).__name__ == "DDIMScheduler"
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, latents=fixed_latents(1, 5))
    expected = run_ref(ref, output_type="np", **kw)
    ours = pipe(**kw, num_inference_steps=5, output_type="np", progress=False).images
    assert_parity(torch.from_numpy(ours), torch.from_numpy(expected))
    again = LatentDiffusionPipeline.from_pretrained(tmp_path / "ours")
    assert_parity(again(**kw, num_inference_steps=5, output_type="np", progress=False).images, ours)


def test_variant_save_loads_back_with_the_variant_in_both_libraries(pipe, tmp_path):
    """save_pretrained(variant="fp16") names every weights file <name>.fp16.safetensors, the text encoder's too;
    the folder loads back with variant="fp16" here and in diffusers, and nothing loads it without the variant."""
    import diffusers

    pipe.save_pretrained(tmp_path / "ours", variant="fp16")
    weights = sorted(p.relative_to(tmp_path / "ours").as_posix() for p in (tmp_path / "ours").rglob("*.safetensors"))
    assert weights == ["text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                       "vae/diffusion_pytorch_model.fp16.safetensors"]
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, latents=fixed_latents(1, 5),
              num_inference_steps=3, output_type="np")
    expected = pipe(**kw, progress=False).images
    again = LatentDiffusionPipeline.from_pretrained(tmp_path / "ours", variant="fp16")
    assert np.array_equal(again(**kw, progress=False).images, expected)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "ours", variant="fp16", safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    assert_parity(torch.from_numpy(run_ref(ref, **kw)), torch.from_numpy(expected))
    with pytest.raises(CheckpointError):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "ours")


def test_interrupted_save_keeps_previous(pipe, tmp_path, monkeypatch):
    from latentdiff import hub

    pipe.save_pretrained(tmp_path / "model")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "model").rglob("*"))
    real = hub.save_safetensors
    calls = []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-save")
        return real(*args, **kwargs)

    monkeypatch.setattr(hub, "save_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        pipe.save_pretrained(tmp_path / "model")
    monkeypatch.undo()
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "model").rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    LatentDiffusionPipeline.from_pretrained(tmp_path / "model")


def test_hub_id_loads_offline_from_cache(folders, tmp_path, monkeypatch):
    _, root = folders
    make_hub_cache(tmp_path / "cache", "someone/tiny-sd", root / "diffusers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    loaded = LatentDiffusionPipeline.from_pretrained("someone/tiny-sd", cache_dir=tmp_path / "cache")
    assert loaded.unet.config.cross_attention_dim == 32
    with pytest.raises(CheckpointError, match="local Hub cache"):
        LatentDiffusionPipeline.from_pretrained("someone/absent", cache_dir=tmp_path / "cache")


def test_push_to_hub_uploads_saved_folder(pipe, monkeypatch):
    import huggingface_hub

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploaded["repo"] = repo_id

        def upload_folder(self, folder_path, repo_id, commit_message, revision=None):
            from pathlib import Path

            uploaded["files"] = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*.json"))
            return "https://hub/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert pipe.push_to_hub("me/my-model") == "https://hub/commit/1"
    assert uploaded["repo"] == "me/my-model"
    assert "model_index.json" in uploaded["files"] and "unet/config.json" in uploaded["files"]


def _with_scheduler(ref, class_name, **options):
    """The diffusers pipeline `ref` with another scheduler (same components otherwise)."""
    import diffusers

    scheduler = getattr(diffusers, class_name).from_config(ref.scheduler.config, **options)
    other = diffusers.StableDiffusionPipeline(**{**ref.components, "scheduler": scheduler})
    other.set_progress_bar_config(disable=True)
    return other


def test_pndm_scheduler_folder_loads_as_plms(folders, tmp_path):
    ref = _with_scheduler(folders[0], "PNDMScheduler", skip_prk_steps=True)   # Stable Diffusion v1's scheduler
    ref.save_pretrained(tmp_path / "pndm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "pndm")
    assert isinstance(pipe.sampler, PLMSSampler)
    assert [w for w in caught if issubclass(w.category, UserWarning)] == []
    kw = dict(prompt=PROMPT, guidance_scale=7.5, latents=fixed_latents(), height=32, width=32, output_type="latent",
              num_inference_steps=4)
    assert_parity(pipe(**kw, progress=False).images, run_ref(ref, **kw))


@pytest.mark.parametrize("class_name,options,sampler_class", [
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True), "EulerSampler"),
    ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="leading"), "EulerAncestralSampler"),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), "DPMSolverMultistepSDESampler"),
])
def test_sigma_samplers_in_the_pipeline_match_diffusers(folders, pipe, tmp_path, class_name, options, sampler_class):
    """The pipeline multiplies x_T by sampler.init_noise_sigma (1.0); the sampler scales x_T to its first sigma
    itself, as diffusers' pipeline does with the scheduler's init_noise_sigma: same latents, same result."""
    from latentdiff.diffusion.scheduler_io import load_scheduler_folder

    ref = _with_scheduler(folders[0], class_name, **options)
    ref.scheduler.save_pretrained(tmp_path)
    noise_scheduler, sampler = load_scheduler_folder(tmp_path)
    assert type(sampler).__name__ == sampler_class and sampler.init_noise_sigma == 1.0
    ours = LatentDiffusionPipeline(vae=pipe.vae, unet=pipe.unet, text_encoder=pipe.text_encoder,
                                   noise_scheduler=noise_scheduler, sampler=sampler)
    kw = dict(prompt=PROMPT, guidance_scale=7.5, latents=fixed_latents(), height=32, width=32, output_type="latent",
              num_inference_steps=3)
    expected = run_ref(ref, generator=torch.Generator().manual_seed(4), **kw)
    assert_parity(ours(**kw, generator=torch.Generator().manual_seed(4), progress=False).images, expected)


def test_scheduler_class_latentdiff_lacks_falls_back_to_ddim(folders, tmp_path):
    _with_scheduler(folders[0], "DPMSolverSinglestepScheduler").save_pretrained(tmp_path / "single")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "single")
    assert isinstance(pipe.sampler, DDIMSampler)
    assert sum("DPMSolverSinglestepScheduler" in str(w.message) for w in caught) == 1


def test_components_replace_loaded_ones(folders, pipe):
    _, root = folders
    sampler = DDIMSampler(eta=0.5)
    other = LatentDiffusionPipeline.from_pretrained(root / "diffusers", sampler=sampler, unet=pipe.unet)
    assert other.sampler is sampler and other.unet is pipe.unet


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=31), "height"),
    (dict(width=0), "width"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(latents=torch.zeros(1, 4, 8, 8)), "latents"),
    (dict(generator=[torch.Generator()] * 3), "generator"),
])
def test_bad_input_is_a_clear_error(pipe, kwargs, match):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InputError, match=match):
            pipe(PROMPT, num_inference_steps=kwargs.pop("num_inference_steps", 2), progress=False, **kwargs)
    finally:
        handle.remove()
    assert calls == []  # rejected before any denoising work


def test_bad_folders(folders, tmp_path):
    import json
    import shutil

    _, root = folders
    with pytest.raises(CheckpointError, match="model_index.json"):
        LatentDiffusionPipeline.from_pretrained(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(root / "diffusers", broken)
    cfg = json.loads((broken / "unet" / "config.json").read_text())
    cfg["mystery_option"] = 3
    (broken / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="mystery_option"):
        LatentDiffusionPipeline.from_pretrained(broken)
    cfg.pop("mystery_option")
    (broken / "unet" / "config.json").write_text(json.dumps(cfg))
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="vae"):
        LatentDiffusionPipeline.from_pretrained(broken)
    index = json.loads((root / "diffusers" / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="StableDiffusionXLPipeline"):
        LatentDiffusionPipeline.from_pretrained(broken)
