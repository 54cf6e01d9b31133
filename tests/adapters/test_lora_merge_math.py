"""The kohya keys diffusers does not read (CompVis-style module names; conv_in, conv_out, the time embedding,
time_emb_proj, proj_in, ff, LoCon on 3x3 convolutions) against the published merge math
W + up @ down * alpha / rank * w, applied by the test itself to a second copy of the tiny Stable Diffusion."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from tests._support.lora import kohya, merge_kohya, parameters, same_parameters
from tests._support.parity import assert_parity
from tests._support.sd import tiny_diffusers_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

# diffusers name -> the CompVis (openaimodel) name of the same module in the tiny UNet (levels 32 / 64+attention,
# two ResBlocks per level): written out here from the original layout, independently of convert.unet_ldm
COMPVIS = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "down_blocks.0.resnets.0.time_emb_proj": "input_blocks.1.0.emb_layers.1",
    "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.1.proj_in": "input_blocks.5.1.proj_in",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": "middle_block.1.transformer_blocks.0.ff.net.0.proj",
    "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
    "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_k": "output_blocks.2.1.transformer_blocks.0.attn2.to_k",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.resnets.2.conv_shortcut": "output_blocks.5.0.skip_connection",
    "conv_out": "out.2",
}
TEXT = ["encoder.layers.0.mlp.fc1", "encoder.layers.1.self_attn.q_proj"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, diffusers):
    root = tmp_path_factory.mktemp("lora_math")
    tiny_diffusers_pipeline(root).save_pretrained(root / "sd")
    return root


def found(pipe):
    unet = [("unet", n, tuple(pipe.unet.get_submodule(n).weight.shape)) for n in COMPVIS]
    text = [("text_encoder", n, tuple(pipe.text_encoder.model.get_submodule(n).weight.shape)) for n in TEXT]
    return unet + text


def images(pipe):
    return pipe("a castle", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0),
                progress=False).images


@pytest.mark.parametrize("names", ["compvis", "diffusers"])
def test_runtime_and_fused_match_the_merge_math(folder, names, tmp_path):
    pipe = LatentDiffusionPipeline.from_pretrained(folder / "sd")
    reference = LatentDiffusionPipeline.from_pretrained(folder / "sd")
    state = kohya(found(pipe), rank=3, alpha=1.5, seed=5, unet_names=COMPVIS if names == "compvis" else None)
    save_file(state, tmp_path / "style.safetensors")
    spelled = {}
    for n in COMPVIS:
        spelled["lora_unet_" + (COMPVIS[n] if names == "compvis" else n).replace(".", "_")] = f"unet:{n}"
    for n in TEXT:
        spelled["lora_te_text_model_" + n.replace(".", "_")] = f"text_encoder:{n}"
    merge_kohya({"unet": reference.unet, "text_encoder": reference.text_encoder.model}, state, spelled, weight=0.7)
    expected = images(reference)

    before = parameters(pipe.unet, pipe.text_encoder)
    base = images(pipe)
    assert pipe.load_lora_weights(tmp_path / "style.safetensors") == "style"
    pipe.set_adapters("style", adapter_weights=0.7)
    assert_parity(images(pipe), expected, 1e-4)          # runtime
    assert same_parameters(before, pipe.unet, pipe.text_encoder)   # runtime writes no weight
    pipe.fuse_lora()
    assert_parity(images(pipe), expected, 1e-4)          # fused
    assert not any(m._forward_hooks for m in pipe.unet.modules())  # fused: plain weights, no hooks
    pipe.unfuse_lora()
    assert same_parameters(before, pipe.unet, pipe.text_encoder)   # bit for bit
    pipe.unload_lora_weights()
    assert torch.equal(images(pipe), base)
    assert not any(m._forward_hooks for m in pipe.unet.modules())
