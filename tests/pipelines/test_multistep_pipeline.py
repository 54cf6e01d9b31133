"""UniPC, DEIS and TCD through a tiny Stable Diffusion pipeline: a diffusers folder with UniPCMultistepScheduler /
DEISMultistepScheduler / TCDScheduler loads as the native sampler (diffusion.scheduler_io), gives diffusers'
StableDiffusionPipeline's latents (fp32, 1e-4) from the same latents and seed, and saves back to the same config."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from latentdiff import LatentDiffusionPipeline
from latentdiff.diffusion.noise_scheduler import NoiseScheduler, NoiseSchedulerConfig
from latentdiff.diffusion.samplers import DEISSampler, TCDSampler, UniPCSampler
from latentdiff.diffusion.scheduler_io import load_scheduler_folder, write_scheduler_folder
from tests._support.parity import assert_parity, max_rel_error
from tests._support.sd import tiny_diffusers_pipeline

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return tiny_diffusers_pipeline(root), root


def _with_scheduler(ref, class_name, **options):
    import diffusers

    scheduler = getattr(diffusers, class_name).from_config(ref.scheduler.config, **options)
    other = diffusers.StableDiffusionPipeline(**{**ref.components, "scheduler": scheduler})
    other.set_progress_bar_config(disable=True)
    return other


@pytest.mark.parametrize("class_name,options,sampler", [
    ("UniPCMultistepScheduler", dict(), UniPCSampler()),
    # bh1 to sigma = 0 is NaN in diffusers (multistep.py): to the karras grid's last sigma here
    ("UniPCMultistepScheduler", dict(solver_type="bh1", solver_order=3, use_karras_sigmas=True,
                                     prediction_type="v_prediction", final_sigmas_type="sigma_min"),
     UniPCSampler(solver_type="bh1", solver_order=3, sigma_schedule="karras", final_sigmas_type="sigma_min")),
    ("UniPCMultistepScheduler", dict(disable_corrector=[0, 1], final_sigmas_type="sigma_min", predict_x0=False),
     UniPCSampler(disable_corrector=(0, 1), final_sigmas_type="sigma_min", predict_x0=False)),
    ("DEISMultistepScheduler", dict(solver_order=3), DEISSampler(solver_order=3)),
    ("TCDScheduler", dict(), TCDSampler()),
])
def test_scheduler_folder_loads_as_the_native_sampler_and_matches_diffusers(folders, tmp_path, class_name, options,
                                                                            sampler):
    ref_base, _ = folders
    ref = _with_scheduler(ref_base, class_name, **options)
    ref.save_pretrained(tmp_path / "sd")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)     # a native class: no "not implemented" warning
        pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "sd")
    cfg = ref.scheduler.config
    assert pipe.sampler == sampler.with_options(timestep_spacing=cfg.timestep_spacing, steps_offset=cfg.steps_offset)
    assert pipe.noise_scheduler.config.prediction_type == ref.scheduler.config.prediction_type
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(prompt=PROMPT, guidance_scale=7.5, latents=latents, height=32, width=32, output_type="latent",
              num_inference_steps=6)
    extra = {"eta": sampler.eta} if isinstance(sampler, TCDSampler) else {}
    with torch.no_grad():
        expected = ref(**kw, **extra, generator=torch.Generator().manual_seed(3)).images
    ours = pipe(**kw, generator=torch.Generator().manual_seed(3), progress=False).images
    assert_parity(ours, expected, tol=1e-4)
    assert max_rel_error(ours, latents) > 0.1       # the run did something


@pytest.mark.parametrize("sampler", [
    UniPCSampler(solver_order=3, solver_type="bh1", disable_corrector=(2,), sigma_schedule="exponential",
                 final_sigmas_type="sigma_min", sigma_max=12.0, timestep_spacing="trailing"),
    DEISSampler(solver_order=1, sigma_schedule="karras", lower_order_final=False),
    TCDSampler(eta=0.7, original_inference_steps=25),
], ids=lambda s: type(s).__name__)
def test_scheduler_config_round_trip(tmp_path, sampler, diffusers):
    noise_scheduler = NoiseScheduler(NoiseSchedulerConfig(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction"))
    path = write_scheduler_folder(tmp_path, noise_scheduler, sampler)
    loaded_schedule, loaded = load_scheduler_folder(tmp_path)
    assert loaded == sampler and loaded_schedule.config == noise_scheduler.config
    data = json.loads(path.read_text())
    ref = getattr(diffusers, data["_class_name"]).from_config(data)     # diffusers reads the same settings
    assert ref.config.get("use_karras_sigmas", False) == (getattr(sampler, "sigma_schedule", "") == "karras")
    for key in ("solver_order", "solver_type", "disable_corrector", "original_inference_steps", "timestep_spacing"):
        if hasattr(sampler, key) and key in ref.config:
            assert ref.config[key] == (list(getattr(sampler, key)) if key == "disable_corrector"
                                       else getattr(sampler, key))
