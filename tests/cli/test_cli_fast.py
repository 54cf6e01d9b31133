"""`latentdiff generate --deepcache N [--deepcache-branch B] --freeu S1,S2,B1,B2` (issue 20, cli/generate_fast.py)
on the tiny stand-in for the built-in model: the pixels of `pipe.enable_deepcache` / `enable_freeu` with the same
settings, recorded in the PNG and reproduced by `--from`; bad values are a one-line error naming the flag or PNG
key before any image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.utils.images import read_png_params, save_png
from tests._support.cli import BUILTIN, PROMPT, pixels
from tests._support.cli import generate_at_seed_0 as generate

pytestmark = pytest.mark.usefixtures("offline_builtin")
RUN = dict(num_inference_steps=4, guidance_scale=3.0, progress=False)


def test_flags_are_the_api_recorded_and_reproduced(model):
    assert generate(PROMPT, "--deepcache", 2, "--deepcache-branch", 1, "--freeu", "0.9,0.2,1.5,1.6",
                    "-o", "a.png") == 0
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    plain = np.asarray(pipe(PROMPT, generator=torch.Generator().manual_seed(0), **RUN).images[0])
    pipe.enable_deepcache(2, 1)
    pipe.enable_freeu(0.9, 0.2, 1.5, 1.6)
    expected = np.asarray(pipe(PROMPT, generator=torch.Generator().manual_seed(0), **RUN).images[0])
    assert np.array_equal(pixels("a.png"), expected) and not np.array_equal(expected, plain)
    recorded = read_png_params("a.png")
    assert (recorded["deepcache"], recorded["deepcache_branch"], recorded["freeu"]) == (2, 1, [0.9, 0.2, 1.5, 1.6])
    assert generate("--from", "a.png", "-o", "again.png") == 0
    assert np.array_equal(pixels("again.png"), pixels("a.png"))
    assert generate(PROMPT, "-o", "plain.png") == 0
    assert not {"deepcache", "deepcache_branch", "freeu"} & set(read_png_params("plain.png"))


@pytest.mark.parametrize(("argv", "words"), [
    (["--deepcache", 0], ["--deepcache", "[1,"]),
    (["--deepcache-branch", 1], ["--deepcache-branch", "with --deepcache"]),
    (["--deepcache", 2, "--deepcache-branch", 99], ["--deepcache-branch", "0 .. "]),
    (["--freeu", "0.9,0.2,1.5"], ["--freeu", "four positive numbers"]),
    (["--freeu", "a,b,c,d"], ["--freeu"]),
])
def test_bad_values_name_the_flag(capsys, argv, words):
    assert generate(PROMPT, *argv, "--steps", 2, "-o", "bad.png") == 2
    err = capsys.readouterr().err
    assert all(str(w) in err for w in words), err


@pytest.mark.parametrize(("key", "value"), [("freeu", [0.9, 0.2, -1, 1.6]), ("freeu", [10**400, 1, 1, 1]),
                                            ("freeu", {"s1": 1}), ("deepcache", 2.5), ("deepcache", 10**400),
                                            ("deepcache_branch", 1)])
def test_a_png_with_a_bad_record_names_the_key(capsys, key, value):
    params = {"prompt": PROMPT, "seed": 0, "n": 1, "model": BUILTIN, "steps": 2, key: value}
    save_png(Image.new("RGB", (64, 64)), "tampered.png", params=params)
    assert generate("--from", "tampered.png", "-o", "out.png") == 2
    assert f"tampered.png: {key}" in capsys.readouterr().err


def test_the_switches_reach_img2img_through_from_pipe(model):
    """--init-image runs `ImageToImagePipeline.from_pipe(pipe)`: the switches, settings of the shared UNet, are
    in effect there (they were dropped before issue 20's from_pipe fix)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save("init.png")
    assert generate(PROMPT, "--init-image", "init.png", "--strength", 0.6, "--deepcache", 2, "--freeu",
                    "0.9,0.2,1.5,1.6", "-o", "a.png") == 0
    from latentdiff.pipelines.image_to_image import ImageToImagePipeline

    img2img = ImageToImagePipeline.from_pipe(LatentDiffusionPipeline.from_pretrained(model))

    def api() -> np.ndarray:
        with Image.open("init.png") as init:
            return np.asarray(img2img(PROMPT, init, strength=0.6, generator=torch.Generator().manual_seed(0),
                                      **RUN).images[0])

    plain = api()
    img2img.enable_deepcache(2, 0)
    img2img.enable_freeu(0.9, 0.2, 1.5, 1.6)
    assert np.array_equal(pixels("a.png"), api()) and not np.array_equal(pixels("a.png"), plain)


def test_optimize_cpu_flag_packs_the_pipeline_and_keeps_the_image(model, monkeypatch):
    from latentdiff.pipelines import cpu_paths

    packed = []
    optimize = cpu_paths.optimize_for_cpu
    monkeypatch.setattr(cpu_paths, "optimize_for_cpu",
                        lambda pipe, **kw: packed.append(kw) or optimize(pipe, **kw))
    assert generate(PROMPT, "--optimize-cpu", "-o", "fast.png") == 0
    assert packed == [{"keep_weights": False}]        # the command owns its weights: held once
    assert generate(PROMPT, "-o", "plain.png") == 0 and len(packed) == 1
    # fp32: the packed convolutions and GEMMs round in another order; the image is the same to 1/255
    difference = np.abs(pixels("fast.png").astype(int) - pixels("plain.png").astype(int))
    assert difference.max() <= 1
    assert "optimize_cpu" not in read_png_params("fast.png")   # no effect on what the image is: not recorded
