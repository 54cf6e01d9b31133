"""Releasing memory-mapped weights between pipeline stages (latentdiff.utils.memory) and the streaming cast of
from_pretrained(torch_dtype=...): pages really leave the resident set, values never change, and a weight
modified in place (copy-on-write page) is never released."""
from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest
import torch

from latentdiff import hub
from latentdiff.utils import memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise/pagemap: Linux only")


def resident_pages(tensor: torch.Tensor) -> int:
    """How many of the pages only this tensor occupies are present in memory (an independent read of
    /proc/self/pagemap; a page shared with a neighbouring tensor is left out)."""
    page = mmap.PAGESIZE
    lo, hi = -(-tensor.data_ptr() // page), (tensor.data_ptr() + tensor.nbytes) // page
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        f.seek(lo * 8)
        entries = np.frombuffer(f.read((hi - lo) * 8), dtype="<u8")
    return int(np.count_nonzero(entries & np.uint64(1 << 63)))


@pytest.fixture()
def mapped(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    original = {"a": torch.randn(512, 1024, generator=g), "b": torch.randn(300, 700, generator=g),
                "steps": torch.arange(10)}
    save_file(original, tmp_path / "w.safetensors")
    return original, hub.load_safetensors(tmp_path / "w.safetensors")


def test_release_drops_pages_and_keeps_values(mapped):
    original, state = mapped
    assert all(float(v.sum()) == float(original[k].sum()) for k, v in state.items())  # touch every page
    assert resident_pages(state["a"]) > 100
    released = memory.release_mapped(list(state.values()))
    assert released >= state["a"].nbytes + state["b"].nbytes - 4 * mmap.PAGESIZE
    assert resident_pages(state["a"]) == 0 and resident_pages(state["b"]) == 0
    for k, v in state.items():  # faulted back from the file, bit for bit
        assert torch.equal(v, original[k])


def test_modified_weights_are_never_released(mapped):
    original, state = mapped
    state["a"].add_(1.0)  # copy-on-write: these pages now exist only in memory
    float(state["b"].sum())
    memory.release_mapped([state["a"], state["b"]])
    assert torch.equal(state["a"], original["a"] + 1.0)
    assert resident_pages(state["a"]) > 0
    assert resident_pages(state["b"]) == 0


def test_memory_not_from_a_file_is_untouched():
    t = torch.randn(256, 1024)
    before = t.clone()
    assert memory.release_mapped([t]) == 0
    assert torch.equal(t, before)
    assert memory.release_mapped(torch.nn.Linear(4, 4)) == 0


def test_streaming_cast_equals_plain_cast(tmp_path, monkeypatch):
    from latentdiff import UNet2DConditional
    from latentdiff.models import base
    from latentdiff.models.unet import UNetConfig

    unet = UNet2DConditional(UNetConfig(channels=(32, 64), attention_levels=(True, False), layers_per_level=1,
                                        attention_heads=2, norm_num_groups=8, cross_attention_dim=32))
    unet.save_pretrained(tmp_path / "unet")
    calls = []
    monkeypatch.setattr(base, "RELEASE_EVERY_BYTES", 4096)  # release after (almost) every tensor
    monkeypatch.setattr(base, "release_mapped", lambda ts: calls.append(len(ts)) or memory.release_mapped(ts))
    loaded = UNet2DConditional.from_pretrained(tmp_path / "unet", torch_dtype=torch.bfloat16)
    assert len(calls) > 10 and sum(calls) == sum(1 for v in unet.state_dict().values() if v.is_floating_point())
    for (k, want), got in zip(unet.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(got, want.to(torch.bfloat16) if want.is_floating_point() else want), k
    calls.clear()
    # fp32 from an fp32 file, weights kept mapped (opt-in): nothing copied, nothing released
    UNet2DConditional.from_pretrained(tmp_path / "unet", mmap_weights=True)
    assert calls == [0]


def test_pipeline_releases_each_stage_and_images_do_not_change(tmp_path):
    from latentdiff import LatentDiffusionPipeline
    from tests._support.sd import tiny_diffusers_pipeline

    tiny_diffusers_pipeline(tmp_path / "src").save_pretrained(tmp_path / "sd")
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "sd", mmap_weights=True)  # releases (opt-in)
    keep = LatentDiffusionPipeline.from_pretrained(tmp_path / "sd", mmap_weights=True)
    keep.release_weights = False
    run = dict(num_inference_steps=3, height=32, width=32, output_type="pt", progress=False)
    images = [pipe("a cat", generator=torch.Generator().manual_seed(0), **run).images for _ in range(2)]
    want = keep("a cat", generator=torch.Generator().manual_seed(0), **run).images
    assert torch.equal(images[0], want) and torch.equal(images[1], want)
    mapped_unet = [p for p in pipe.unet.parameters() if p.nbytes >= 4 * mmap.PAGESIZE]
    assert mapped_unet and all(resident_pages(p) == 0 for p in mapped_unet)
    assert any(resident_pages(p) > 0 for p in keep.unet.parameters() if p.nbytes >= 4 * mmap.PAGESIZE)


def test_per_block_release_same_images_and_hooks_removed(tmp_path):
    from latentdiff import LatentDiffusionPipeline
    from tests._support.sd import tiny_diffusers_pipeline

    tiny_diffusers_pipeline(tmp_path / "src").save_pretrained(tmp_path / "sd")
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "sd", mmap_weights=True)
    run = dict(num_inference_steps=3, height=32, width=32, output_type="pt", progress=False)
    want = pipe("a cat", generator=torch.Generator().manual_seed(0), **run).images
    pipe.release_weights = "blocks"
    released = []
    original = memory.release_mapped
    try:
        memory.release_mapped = lambda module: released.append(type(module).__name__) or original(module)  # noqa: E731
        got = pipe("a cat", generator=torch.Generator().manual_seed(0), **run).images
    finally:
        memory.release_mapped = original
    assert torch.equal(got, want)
    blocks = sum(len(c) if isinstance(c, torch.nn.ModuleList) else 1 for c in pipe.unet.children())
    assert len(released) >= 3 * blocks                      # every block, at every step
    assert all(not m._forward_hooks for m in pipe.unet.modules())   # hooks gone after the call


def test_pagemap_check_treats_swapped_and_anonymous_pages_as_modified():
    import io

    def pagemap(*entries):
        return io.BytesIO(np.array(entries, dtype="<u8").tobytes())

    span = (0, 3 * memory.PAGE)
    file_page, absent = memory.PM_PRESENT | memory.PM_FILE, 0
    assert memory._unmodified(pagemap(file_page, absent, file_page), *span)
    assert not memory._unmodified(pagemap(file_page, memory.PM_PRESENT, file_page), *span)   # copy-on-written
    assert not memory._unmodified(pagemap(file_page, memory.PM_SWAPPED, absent), *span)      # written, swapped out
    assert not memory._unmodified(pagemap(file_page), *span)                                 # short read: unsure


def test_sdxl_pipeline_releases_both_text_encoders(tmp_path):
    """SDXL's encode_prompt gives back both text encoders' mapped pages once encoded, as SD's does (a 1024 px SDXL
    generation with release_weights then holds neither CLIP-L nor bigG through denoising; benchmarks/RESULTS.md)."""
    from latentdiff import StableDiffusionXLPipeline
    from tests._support.sdxl import tiny_sdxl

    tiny_sdxl(tmp_path / "xl")
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "xl", mmap_weights=True)  # releases (opt-in)
    keep = StableDiffusionXLPipeline.from_pretrained(tmp_path / "xl", mmap_weights=True)
    keep.release_weights = False
    run = dict(num_inference_steps=2, height=32, width=32, output_type="pt", progress=False)
    got = pipe("a cat", generator=torch.Generator().manual_seed(0), **run).images
    assert torch.equal(got, keep("a cat", generator=torch.Generator().manual_seed(0), **run).images)
    for released, kept in ((pipe.text_encoder, keep.text_encoder), (pipe.text_encoder_2, keep.text_encoder_2)):
        big = [p for p in released.parameters() if p.nbytes >= 4 * mmap.PAGESIZE]
        assert big and all(resident_pages(p) == 0 for p in big)
        assert any(resident_pages(p) > 0 for p in kept.parameters() if p.nbytes >= 4 * mmap.PAGESIZE)
