"""ClassConditionalPipeline against an independent reference: diffusers' UNet and VQModel on the same weights, the
class token looked up in the table by hand, classifier-free guidance as two separate forwards, and diffusers'
DDIMScheduler stepping (diffusers has no class-conditional LDM pipeline). Both ways a class reaches the UNet (a
ClassEmbedder's token by cross-attention, as cin256; the UNet's own label table), every kind of label, folders and
single files both ways, and bad input refused before any UNet call."""
from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from latentdiff import ConfigError, InputError
from latentdiff.convert import to_single_file
from latentdiff.models.conditioners import ClassEmbedder, ClassEmbedderConfig
from latentdiff.models.unet import UNet2DConditional
from latentdiff.models.unet2d import UNet2D
from latentdiff.models.vq import VQModel
from latentdiff.pipelines.base import Pipeline
from latentdiff.pipelines.class_conditional import ClassConditionalPipeline
from tests._support.ldm import (
    decoded,
    ldm_scheduler,
    manual_ddim,
    no_unet_calls,
    noise,
    ours,
    schedule,
    seeded,
    tiny_unet2d,
    tiny_vq,
)
from tests._support.parity import assert_parity

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, cores are shared

CLASSES, NULL, WIDTH = 11, 10, 16
ID2LABEL = {0: "tench, Tinca tinca", 3: "goldfish", 7: "great white shark"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Reference diffusers parts and the pipelines of both routes built from their folders."""
    root = tmp_path_factory.mktemp("class_cond")
    ref = {"vq": tiny_vq(scaling_factor=1.0), "unet": seeded(lambda: diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, attention_head_dim=1), 1),  # cin256's convention: one head
        "table_unet": tiny_unet2d(num_class_embeds=CLASSES, seed=4)}
    torch.manual_seed(3)
    embedder = ClassEmbedder(ClassEmbedderConfig(num_classes=CLASSES, embed_dim=WIDTH, null_class=NULL)).eval()
    noise_scheduler, sampler = schedule(ldm_scheduler(), root / "scheduler")
    common = dict(vae=ours(ref["vq"], VQModel, root / "vq"), noise_scheduler=noise_scheduler, sampler=sampler)
    pipes = {"embedder": ClassConditionalPipeline(unet=ours(ref["unet"], UNet2DConditional, root / "unet"),
                                                  class_embedder=embedder, id2label=ID2LABEL, **common),
             "table": ClassConditionalPipeline(unet=ours(ref["table_unet"], UNet2D, root / "table_unet"),
                                               null_class=NULL, **common)}
    return ref, pipes, embedder.embedding.weight.detach()


def reference(ref, table, labels, x_T, *, guidance_scale, route="embedder"):
    """The manual run: eps = eps(null) + s (eps(c) - eps(null)) from two separate UNet calls, DDIM, decode."""
    labels, null = torch.tensor(labels), torch.full((len(labels),), NULL)

    def eps(x, t, which):
        if route == "embedder":
            return ref["unet"](x, t, encoder_hidden_states=table[which][:, None]).sample
        return ref["table_unet"](x, t, class_labels=which).sample

    def guided(x, t):
        cond = eps(x, t, labels)
        return cond if guidance_scale == 1.0 else eps(x, t, null) + guidance_scale * (cond - eps(x, t, null))

    return decoded(ref["vq"], manual_ddim(guided, x_T, ldm_scheduler()))


@pytest.mark.parametrize("route, guidance_scale", [("embedder", 1.0), ("embedder", 3.0), ("table", 2.5)])
def test_matches_the_manual_reference(setup, route, guidance_scale):
    ref, pipes, table = setup
    x_T = noise((2, 3, 8, 8), seed=1)
    expected = reference(ref, table, [3, 7], x_T, guidance_scale=guidance_scale, route=route)
    ours_pt = pipes[route]([3, 7], guidance_scale=guidance_scale, latents=x_T, output_type="pt",
                           num_inference_steps=4, progress=False).images
    assert ours_pt.shape == (2, 3, 16, 16)
    assert_parity(ours_pt, expected)


def test_every_kind_of_label_gives_the_same_images(setup):
    _, pipes, _ = setup
    pipe = pipes["embedder"]
    run = dict(latents=noise((1, 3, 8, 8), seed=2), output_type="pt", num_inference_steps=2, progress=False)
    expected = pipe(3, **run).images
    for labels in ("goldfish", ["goldfish"], torch.tensor([3]), torch.tensor(3), np.array([3]), [np.int64(3)]):
        assert torch.equal(pipe(labels, **run).images, expected), labels
    assert pipe.label_ids(["Tinca tinca", "tench", 7, "great white shark"]).tolist() == [0, 0, 7, 7]


@pytest.mark.parametrize("route", ["embedder", "table"])
def test_save_and_load_round_trip(setup, tmp_path, route):
    _, pipes, _ = setup
    pipe = pipes[route]
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "LatentDiffusionClassConditionalPipeline" and index["null_class"] == NULL
    assert index["vqvae"] == ["diffusers", "VQModel"]
    if route == "embedder":
        assert index["class_embedder"] == ["latentdiff", "ClassEmbedder"]
        assert index["id2label"] == {str(k): v for k, v in ID2LABEL.items()}
    else:
        assert "class_embedder" not in index and "id2label" not in index
    back = Pipeline.from_pretrained(tmp_path / "saved")
    assert type(back) is ClassConditionalPipeline and back.id2label == pipe.id2label
    run = dict(latents=noise((1, 3, 8, 8), seed=3), guidance_scale=2.0, output_type="pt", num_inference_steps=2,
               progress=False)
    assert torch.equal(back([7], **run).images, pipe([7], **run).images)


def test_single_file_both_ways(setup, tmp_path):
    """A cin256-layout file (UNet + VQ first stage + cond_stage_model ClassEmbedder) of the reference weights loads
    as this pipeline (its null class given: the original config has none), and a saved file loads back."""
    ref, pipes, table = setup
    pipe = pipes["embedder"]
    parts = {"unet": (dict(ref["unet"].config), ref["unet"].state_dict()),
             "vqvae": (dict(ref["vq"].config), ref["vq"].state_dict()),
             "class_embedder": ({"_class_name": "ClassEmbedder", "num_classes": CLASSES, "embed_dim": WIDTH},
                                {"embedding.weight": table})}
    save_file(to_single_file(parts), tmp_path / "cin.safetensors")
    schedule_parts = dict(noise_scheduler=pipe.noise_scheduler, sampler=pipe.sampler)
    loaded = Pipeline.from_single_file(tmp_path / "cin.safetensors", null_class=NULL, **schedule_parts)
    assert type(loaded) is ClassConditionalPipeline and loaded.num_classes == CLASSES
    run = dict(latents=noise((1, 3, 8, 8), seed=4), guidance_scale=3.0, output_type="pt", num_inference_steps=2,
               progress=False, height=16, width=16)  # an original file does not record the sample size
    assert_parity(loaded([3], **run).images, pipe([3], **run).images)
    pipe.save_single_file(tmp_path / "ours.safetensors")
    again = ClassConditionalPipeline.from_single_file(tmp_path / "ours.safetensors", **schedule_parts)
    assert again.null_class == NULL  # the embedder's config travels in the metadata
    assert_parity(again([3], **run).images, pipe([3], **run).images)


def test_parts_that_do_not_fit_are_a_config_error(setup):
    ref, pipes, _ = setup
    pipe = pipes["embedder"]
    narrow = ClassEmbedder(ClassEmbedderConfig(num_classes=CLASSES, embed_dim=8))
    with pytest.raises(ConfigError, match="cross-attention width"):
        ClassConditionalPipeline(vae=pipe.vae, unet=pipe.unet, class_embedder=narrow)
    with pytest.raises(ConfigError, match="label table"):
        ClassConditionalPipeline(vae=pipe.vae, unet=pipe.unet)  # a cross-attention UNet needs the embedder
    with pytest.raises(ConfigError, match="null_class"):
        ClassConditionalPipeline(vae=pipe.vae, unet=pipe.unet, class_embedder=pipe.class_embedder, null_class=2)
    with pytest.raises(ConfigError, match="id2label"):
        ClassConditionalPipeline(vae=pipe.vae, unet=pipe.unet, class_embedder=pipe.class_embedder,
                                 id2label={CLASSES: "beyond the table"})
    with pytest.raises(ConfigError, match="null_class"):
        ClassConditionalPipeline(vae=pipe.vae, unet=pipes["table"].unet, null_class=CLASSES)


@pytest.mark.parametrize("route, labels, kwargs, match", [
    ("embedder", 11, {}, "class id out of range"),
    ("embedder", [3, -1], {}, "class id out of range"),
    ("table", torch.tensor([2, 11]), {}, "class id out of range"),
    ("embedder", "tiger shark", {}, "unknown class name"),
    ("table", "goldfish", {}, "id2label"),
    ("embedder", torch.tensor([1.0]), {}, "integer"),
    ("embedder", [], {}, "no class labels"),
    ("embedder", [True], {}, "int or a class name"),
    ("embedder", {3}, {}, "unsupported"),
    ("embedder", 3, dict(guidance_scale=-1.0), "guidance_scale"),
    ("embedder", 3, dict(latents=torch.zeros(2, 3, 8, 8)), "latents"),
    ("embedder", 3, dict(height=13), "height"),
    ("embedder", [1, 2], dict(generator=[torch.Generator()]), "generator"),
    ("embedder", 3, dict(num_inference_steps=0), "num_inference_steps"),
])
def test_bad_input_is_refused_before_any_unet_call(setup, route, labels, kwargs, match):
    _, pipes, _ = setup
    pipe = pipes[route]
    with no_unet_calls(pipe), pytest.raises(InputError, match=match):
        pipe(labels, num_inference_steps=kwargs.pop("num_inference_steps", 2), progress=False, **kwargs)


def test_guidance_without_a_null_class_is_refused(setup):
    _, pipes, _ = setup
    pipe = ClassConditionalPipeline(vae=pipes["embedder"].vae, unet=pipes["embedder"].unet,
                                    class_embedder=ClassEmbedder(ClassEmbedderConfig(num_classes=CLASSES,
                                                                                     embed_dim=WIDTH)))
    with no_unet_calls(pipe), pytest.raises(InputError, match="null class") as info:
        pipe(3, guidance_scale=3.0, num_inference_steps=2, progress=False)
    assert info.value.where == "guidance_scale" and "null_class=" in info.value.expected
