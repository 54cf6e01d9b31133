"""`latentdiff generate --controlnet MODEL --control KIND:IMAGE[:SCALE[:START:END]]` (cli/generate_control.py) on
the tiny Stable Diffusion with tiny random ControlNets: the pixels of the Python API with the same hints, scales
and step ranges, recorded in the PNG (paths, sha256s) so that `--from` reproduces them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import ControlNet, LatentDiffusionPipeline, T2IAdapter, control
from latentdiff.utils.images import read_png_params
from tests._support.cli import generate, pixels
from tests._support.parity import randomize_
from tests._support.sd import TINY_UNET, tiny_diffusers_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle"
UNET = TINY_UNET | dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@pytest.fixture
def setup(tmp_path, monkeypatch):
    import diffusers

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    parts = tiny_diffusers_pipeline(tmp_path / "build").components
    torch.manual_seed(0)   # a cross-attention level, then a plain one: a full T2I-Adapter's features fit it
    parts["unet"] = randomize_(diffusers.UNet2DConditionModel(**UNET)).eval()
    sd = diffusers.StableDiffusionPipeline(**parts)
    sd.save_pretrained(tmp_path / "sd")
    for seed in (0, 1):
        torch.manual_seed(seed)
        cn = randomize_(diffusers.ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(16, 32)))
        cn.save_pretrained(tmp_path / f"cn{seed}")
    torch.manual_seed(2)    # a T2I-Adapter of the tiny UNet: features at 1/2 and 1/4 of the image
    randomize_(diffusers.T2IAdapter(channels=[32, 64], num_res_blocks=1, downscale_factor=2)).save_pretrained(
        tmp_path / "adapter")
    g = torch.Generator().manual_seed(5)
    photo = Image.fromarray((torch.rand(40, 40, 3, generator=g) * 255).byte().numpy())
    photo.save(tmp_path / "photo.png")
    return tmp_path, photo


RUN = ["--height", 32, "--width", 32, "--steps", 3, "--seed", 0, "--sampler", "ddim"]


def api(root, nets, adapter=None, **call) -> np.ndarray:
    cns = [ControlNet.from_pretrained(root / name) for name in nets]
    parts = {"adapter": T2IAdapter.from_pretrained(root / adapter)} if adapter else {}
    if cns:
        parts["controlnet"] = cns[0] if len(cns) == 1 else cns
    pipe = LatentDiffusionPipeline.from_pretrained(root / "sd", **parts)
    from latentdiff.diffusion.samplers import switch_sampler

    pipe.sampler = switch_sampler(pipe.sampler, "ddim")
    image = pipe(PROMPT, height=32, width=32, num_inference_steps=3, generator=[torch.Generator().manual_seed(0)],
                 progress=False, **call).images[0]
    return np.asarray(image)


def test_one_controlnet_matches_the_api_and_from_reproduces(setup):
    root, photo = setup
    assert generate(PROMPT, "--model", root / "sd", *RUN, "--controlnet", root / "cn0",
                    "--control", "canny:photo.png:0.8:0:0.5", "-o", "a.png") == 0
    expected = api(root, ["cn0"], control_image=control.canny(photo), controlnet_conditioning_scale=0.8,
                   control_guidance_end=0.5)
    assert np.array_equal(pixels("a.png"), expected)
    assert generate(PROMPT, "--model", root / "sd", *RUN, "-o", "plain.png") == 0
    assert not np.array_equal(pixels("plain.png"), expected)        # the ControlNet acted
    recorded = read_png_params("a.png")["control"]
    assert recorded == [{"model": str(root / "cn0"), "kind": "canny", "image": str(root / "photo.png"),
                         "image_sha256": recorded[0]["image_sha256"], "scale": 0.8, "start": 0.0, "end": 0.5,
                         "type": "controlnet"}]
    assert generate("--from", "a.png", "-o", "again.png") == 0
    assert np.array_equal(pixels("again.png"), expected)


def test_two_controlnets_and_guess_mode_match_the_api(setup):
    root, photo = setup
    assert generate(PROMPT, "--model", root / "sd", *RUN, "--controlnet", root / "cn0", "--control",
                    "threshold:photo.png", "--controlnet", root / "cn1", "--control", "image:photo.png:0.5:0.2:1",
                    "--guess-mode", "--control-resize", "crop-and-resize", "-o", "b.png") == 0
    expected = api(root, ["cn0", "cn1"], control_image=[control.threshold(photo), photo],
                   controlnet_conditioning_scale=[1.0, 0.5], control_guidance_start=[0.0, 0.2],
                   control_guidance_end=[1.0, 1.0], guess_mode=True, control_resize_mode=1)
    assert np.array_equal(pixels("b.png"), expected)


def test_a_t2i_adapter_beside_a_controlnet_matches_the_api(setup):
    root, photo = setup
    assert generate(PROMPT, "--model", root / "sd", *RUN, "--controlnet", root / "adapter", "--control",
                    "threshold:photo.png:0.7", "--controlnet", root / "cn0", "--control", "canny:photo.png:1:0:0.6",
                    "-o", "t.png") == 0
    expected = api(root, ["cn0"], adapter="adapter", control_image=[control.canny(photo), control.threshold(photo)],
                   control_guidance_end=0.6, adapter_conditioning_scale=0.7)
    assert np.array_equal(pixels("t.png"), expected)
    assert [e["type"] for e in read_png_params("t.png")["control"]] == ["t2i_adapter", "controlnet"]
    assert generate("--from", "t.png", "-o", "t2.png") == 0
    assert np.array_equal(pixels("t2.png"), expected)


def test_a_t2i_adapter_takes_no_step_range(setup, capsys):
    root, _ = setup
    assert generate(PROMPT, "--model", root / "sd", *RUN, "--controlnet", root / "adapter", "--control",
                    "image:photo.png:1:0:0.5", "-o", "r.png") != 0
    assert "takes no START:END" in capsys.readouterr().err


def test_a_controlnet_of_another_base_is_refused_by_name(setup, capsys, tmp_path):
    import diffusers

    root, _ = setup
    other = diffusers.ControlNetModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",
                                      "DownBlock2D"), cross_attention_dim=24, norm_num_groups=8,
                                      conditioning_embedding_out_channels=(16, 32), attention_head_dim=2)
    other.save_pretrained(root / "other")
    assert generate(PROMPT, "--model", root / "sd", *RUN, "--controlnet", root / "other",
                    "--control", "image:photo.png", "-o", "c.png") != 0
    err = capsys.readouterr().err
    assert "cross_attention_dim" in err and "Traceback" not in err
    assert not (root / "c.png").exists()
