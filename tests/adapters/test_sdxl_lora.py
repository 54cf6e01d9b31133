"""SDXL LoRAs on the tiny SDXL, against diffusers' StableDiffusionXLPipeline with peft (the oracle): kohya files
(lora_unet_* in the original SGM block numbering, lora_te1_* / lora_te2_*), diffusers / PEFT files and diffusers'
older names (lora.down / lora.up, lora_linear_layer) give the same UNet outputs and the same text conditioning
(both encoders' hidden states, bigG's pooled output) at weight 1 and per-component weights, runtime and fused;
unloading gives the base bit for bit; every kohya name of the released base and refiner UNets is diffusers'; the
refiner (bigG only) takes UNet and lora_te2_ keys and refuses lora_te1_ ones; a LoRA of the other family (SDXL on
SD 1.x, SD 1.x on SDXL) is a CheckpointError naming the file, the key and the pipeline, with nothing changed."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from latentdiff import CheckpointError
from latentdiff.adapters.names import original_unet_names, patchable
from latentdiff.models.unet import UNet2DConditional
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from tests._support.lora import kohya, parameters, same_parameters, targets
from tests._support.parity import assert_parity
from tests._support.sd import tiny_diffusers_pipeline
from tests._support.sdxl import tiny_sdxl
from tests._support.sdxl_lora import (
    SDXL_BASE_UNET,
    SDXL_REFINER_UNET,
    conditioning,
    diffusers_conditioning,
    diffusers_unet_name,
    kohya_sdxl,
    kohya_unet_names,
    load_parts,
    old_diffusers_sdxl,
    peft_sdxl,
    sdxl_targets,
    unet_inputs,
)

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("peft")
PROMPT = "a photo of a cat"


def found_of(parts):
    return sdxl_targets(parts.unet, {"text_encoder": getattr(parts.text_encoder, "model", None),
                                     "text_encoder_2": parts.text_encoder_2.model})


@pytest.fixture(scope="module")
def base(tmp_path_factory, diffusers):
    """(folder, diffusers pipeline, latentdiff parts, targets, kohya UNet names), the kohya and PEFT files."""
    root = tmp_path_factory.mktemp("sdxl_lora")
    ref = tiny_sdxl(root / "base")
    parts = load_parts(root / "base")
    found = found_of(parts)
    names = kohya_unet_names(parts.unet, [n for c, n, _ in found if c == "unet"], ref.unet.config)
    save_file(kohya_sdxl(found, names, seed=1, alpha=2.0), root / "kohya.safetensors")
    (root / "peft").mkdir()
    save_file(peft_sdxl(found, seed=2, std=0.1), root / "peft" / "pytorch_lora_weights.safetensors")
    save_file(old_diffusers_sdxl(found, seed=6, std=0.1), root / "old_diffusers.safetensors")
    return root, ref, parts, found, names


@torch.no_grad()
def outputs(model, parts_or_ref, *, diffusers: bool):
    """(UNet output, text conditioning, pooled) of either library on the same inputs."""
    x, t, context, added = unet_inputs(parts_or_ref.unet)
    if diffusers:
        return (model.unet(x, t, context, added_cond_kwargs=added).sample, *diffusers_conditioning(model, PROMPT))
    return (model.unet(x, t, context, added_cond=added), *conditioning(model, PROMPT))


def assert_same(ours, expected):
    for a, e in zip(ours, expected, strict=True):
        assert_parity(a, e, 1e-4)


def test_kohya_names_are_the_original_layout_and_diffusers_agrees(base):
    _, _, parts, found, names = base
    unet_modules = [n for c, n, _ in found if c == "unet"]
    assert len(names) == len(unet_modules) > 100
    spelled = set(names.values())
    # SDXL's numbering from the config: level 0 without attention (input_blocks 1, 2), its downsampler 3,
    # level 1 with 2 transformer blocks (4, 5), middle block, output blocks 0-2 with attention, 3-5 without
    for key in ("lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_3_0_op",
                "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", "lora_unet_input_blocks_5_1_proj_in",
                "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj",
                "lora_unet_output_blocks_0_1_proj_in", "lora_unet_output_blocks_2_2_conv",
                "lora_unet_output_blocks_5_0_skip_connection"):
        assert key in spelled
    assert not any("_1_1_" in k and "input_blocks" in k for k in spelled)    # no attention at level 0
    assert original_unet_names(parts.unet)["down_blocks.1.attentions.0.proj_in"] == "input_blocks.4.1.proj_in"


@pytest.mark.parametrize("config", ["base", "refiner"])
def test_full_size_kohya_names_agree_with_diffusers(config):
    """Every patchable module of the released SDXL base and refiner UNets (on the meta device: no weights) gets
    the original name diffusers' kohya conversion maps back to it, but one: diffusers takes the refiner's first
    upsampler (`output_blocks.2.1.conv`, sub-index 1 at a level without attention, as in the refiner's own
    checkpoint) for an attention block; kohya files of that module load in latentdiff, not in diffusers."""
    from diffusers import UNet2DConditionModel

    kwargs = SDXL_BASE_UNET if config == "base" else SDXL_REFINER_UNET
    with torch.device("meta"):
        ours = UNet2DConditional(UNet2DConditional.from_file_config(kwargs))
        ref = UNet2DConditionModel(**kwargs)
    names = original_unet_names(ours)
    assert len(names) == len(list(patchable(ours))) == (794 if config == "base" else 554)
    differ = {name: original for name, original in names.items()
              if diffusers_unet_name("lora_unet_" + original.replace(".", "_"), ref.config) != name}
    assert differ == ({} if config == "base" else {"up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv"})


@pytest.mark.parametrize("file", ["kohya.safetensors", "peft", "old_diffusers.safetensors"])
def test_same_outputs_as_diffusers(base, file):
    root, ref, parts, _, _ = base
    before = parameters(parts.unet, parts.text_encoder.model, parts.text_encoder_2.model)
    plain = outputs(parts, parts, diffusers=False)
    ref.load_lora_weights(root / file, adapter_name="a")
    parts.load_lora_weights(root / file, adapter_name="a")
    try:
        assert parts.get_list_adapters() == {"unet": ["a"], "text_encoder": ["a"], "text_encoder_2": ["a"]}
        for weight in (1.0, {"unet": 0.7, "text_encoder": 0.3, "text_encoder_2": 0.6}):
            ref.set_adapters(["a"], adapter_weights=[weight])
            parts.set_adapters(["a"], adapter_weights=[weight])
            ours, expected = outputs(parts, parts, diffusers=False), outputs(ref, parts, diffusers=True)
            assert_same(ours, expected)
            for changed, base_output in zip(ours, plain, strict=True):   # the LoRA changes all three
                assert (changed - base_output).abs().max() > 1e-3
        parts.fuse_lora()
        assert_same(outputs(parts, parts, diffusers=False), expected)   # fused == runtime, at the last weights
        parts.unfuse_lora()
    finally:
        ref.unload_lora_weights()
        parts.unload_lora_weights()
    assert same_parameters(before, parts.unet, parts.text_encoder.model, parts.text_encoder_2.model)
    for a, b in zip(outputs(parts, parts, diffusers=False), plain, strict=True):
        assert torch.equal(a, b)


def test_saved_file_is_kohya_sdxl_and_diffusers_reads_it(base, tmp_path):
    """save_lora_weights on SDXL writes kohya's SDXL spelling (original block names, lora_te1_ / lora_te2_,
    ss_base_model_version sdxl) and diffusers' kohya loader gives the same outputs from it."""
    root, ref, parts, _, _ = base
    parts.load_lora_weights(root / "peft", adapter_name="p")
    try:
        parts.save_lora_weights(tmp_path / "saved.safetensors")
        with safe_open(str(tmp_path / "saved.safetensors"), framework="pt") as f:
            keys, meta = set(f.keys()), f.metadata()
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
        assert "lora_te2_text_model_encoder_layers_2_mlp_fc2.alpha" in keys
        assert not any("down_blocks" in k for k in keys)
        ref.load_lora_weights(tmp_path / "saved.safetensors", adapter_name="s")
        assert_same(outputs(parts, parts, diffusers=False), outputs(ref, parts, diffusers=True))
    finally:
        ref.unload_lora_weights()
        parts.unload_lora_weights()


def test_prompt_tags_weigh_both_text_encoders(base):
    """`<lora:NAME:W_unet:W_te>` in prompt or prompt_2: the text-encoder weight applies to both encoders (A1111),
    for the block only; the outputs are diffusers' at those weights."""
    from latentdiff.adapters.api import prompt_adapters

    root, ref, parts, _, _ = base
    ref.load_lora_weights(root / "kohya.safetensors", adapter_name="kohya")
    ref.set_adapters(["kohya"], adapter_weights=[{"unet": 0.5, "text_encoder": 0.25, "text_encoder_2": 0.25}])
    try:
        prompts = {"prompt": "a cat <lora:kohya:0.5:0.25>", "prompt_2": "a cat <lora:kohya:0.5:0.25>"}
        with prompt_adapters(parts, prompts, lora_dirs=[root]) as stripped:
            assert stripped == {"prompt": "a cat ", "prompt_2": "a cat "}
            assert parts.get_active_adapters() == ["kohya"]
            assert_same(outputs(parts, parts, diffusers=False), outputs(ref, parts, diffusers=True))
        assert parts.get_active_adapters() == []
    finally:
        ref.unload_lora_weights()
        parts.unload_lora_weights()


@pytest.fixture(scope="module")
def refiner(base):
    root = base[0]
    ref = tiny_sdxl(root / "refiner", kind="refiner")
    parts = load_parts(root / "refiner", refiner=True)
    found = found_of(parts)
    names = kohya_unet_names(parts.unet, [n for c, n, _ in found if c == "unet"], ref.unet.config)
    save_file(kohya_sdxl(found, names, seed=5), root / "refiner_lora.safetensors")
    return root, ref, parts, found, names


def test_refiner_takes_unet_and_bigg_keys(refiner):
    root, ref, parts, _, _ = refiner
    ref.load_lora_weights(root / "refiner_lora.safetensors", adapter_name="r")
    parts.load_lora_weights(root / "refiner_lora.safetensors", adapter_name="r")
    try:
        assert parts.get_list_adapters() == {"unet": ["r"], "text_encoder_2": ["r"]}
        assert_same(outputs(parts, parts, diffusers=False), outputs(ref, parts, diffusers=True))
    finally:
        ref.unload_lora_weights()
        parts.unload_lora_weights()


def test_refiner_refuses_first_text_encoder_keys(base, refiner):
    root, _, _, _, _ = base
    _, _, parts, _, _ = refiner
    before = parameters(parts.unet, parts.text_encoder_2.model)
    with pytest.raises(CheckpointError) as info:
        parts.load_lora_weights(root / "kohya.safetensors")
    message = str(info.value)
    assert "kohya.safetensors: lora_te1_text_model_encoder_layers_0" in message
    assert "first text encoder" in message and "second text encoder only" in message
    assert same_parameters(before, parts.unet, parts.text_encoder_2.model) and parts.get_list_adapters() == {}


@pytest.fixture(scope="module")
def sd15(base, diffusers):
    root = base[0]
    tiny_diffusers_pipeline(root).save_pretrained(root / "sd")
    pipe = LatentDiffusionPipeline.from_pretrained(root / "sd")
    save_file(kohya(targets(pipe.unet, pipe.text_encoder.model), seed=3), root / "sd15.safetensors")
    unet_only = kohya(targets(pipe.unet), seed=4)
    save_file(unet_only, root / "sd15_unet.safetensors")
    return root, pipe


def test_sdxl_lora_on_sd15_is_refused(base, sd15):
    root, pipe = sd15
    before = parameters(pipe.unet, pipe.text_encoder.model)
    with pytest.raises(CheckpointError) as info:
        pipe.load_lora_weights(root / "kohya.safetensors")
    message = str(info.value)
    assert "an SDXL LoRA" in message and "kohya.safetensors: lora_te2_" in message
    assert "one text encoder" in message    # what the pipeline is
    assert same_parameters(before, pipe.unet, pipe.text_encoder.model) and pipe.get_list_adapters() == {}


@pytest.mark.parametrize("file", ["sd15.safetensors", "sd15_unet.safetensors"])
def test_sd15_lora_on_sdxl_is_refused(base, sd15, file):
    root, _, parts, _, _ = base
    before = parameters(parts.unet, parts.text_encoder.model, parts.text_encoder_2.model)
    with pytest.raises(CheckpointError) as info:
        parts.load_lora_weights(root / file)
    message = str(info.value)
    context = parts.unet.config.cross_attention_dim
    sd_context = sd15[1].unet.config.cross_attention_dim
    assert f"{file}: lora_unet_" in message and "attn2_to_k" in message and "another model family" in message
    assert f"input width {context}" in message and f"input width {sd_context}" in message
    assert "SDXL's two text encoders" in message
    assert same_parameters(before, parts.unet, parts.text_encoder.model, parts.text_encoder_2.model)
    assert parts.get_list_adapters() == {}
