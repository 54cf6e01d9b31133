"""A UNet call's batch split across threads (`pipelines.split_batch`, `optimize_for_cpu(split_batch=True)`).

What is proven, at two torch threads (the split needs at least two):
* the split call runs its parts on two threads (seen by a hook) and gives, per sample, exactly that sample's own
  forward (fp32, 1e-5: only the thread count differs) and the whole-batch call within 1e-4,
  with per-sample timesteps and contexts, SDXL's added_cond, ControlNet residuals and FreeU's factors;
* it runs whole (one thread, the plain forward) with gradients, under autocast, with DeepCache's state, with token
  merging, with an unknown keyword, on one thread, on a batch of one;
* the caller's thread count is restored after the call, also when a part raises (the error reaches the caller);
  an inference-mode call gives inference tensors;
* on a pipeline: `optimize_for_cpu` installs it, the images equal `split_batch=False`'s within 1e-4 (fp32), a deep
  copy of the UNet gets a split forward of its own, and `undo_cpu_optimization` removes it.
"""
from __future__ import annotations

import copy
import threading

import pytest
import torch

from latentdiff import LatentDiffusionPipeline
from latentdiff.models.deep_cache import DeepCacheState
from latentdiff.models.freeu import FreeU
from latentdiff.models.residuals import Residuals
from latentdiff.models.unet import UNet2DConditional
from latentdiff.pipelines import cpu_paths, split_batch
from latentdiff.pipelines.token_merging import disable_tome, enable_tome
from tests._support.parity import max_rel_error, randomize_
from tests._support.sd import TINY_UNET_SD_LAYOUT
from tests._support.sdxl import PROJECTION, tiny_unet_config
from tests._support.tiny_builtin import make_tiny_shapes_model


@pytest.fixture(autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def make_unet(config: dict) -> UNet2DConditional:
    torch.manual_seed(0)
    return randomize_(UNet2DConditional(UNet2DConditional.from_file_config(config))).eval()


@pytest.fixture(scope="module")
def unet() -> UNet2DConditional:
    return make_unet(TINY_UNET_SD_LAYOUT)


def inputs(unet: UNet2DConditional, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([900, 3, 500, 20][:batch]),
            torch.randn(batch, 5, unet.config.cross_attention_dim, generator=g))


def threads_seen(unet: torch.nn.Module):
    seen: list[str] = []
    handle = unet.conv_in.register_forward_pre_hook(lambda m, a: seen.append(threading.current_thread().name))
    return seen, handle


def per_sample(unet: UNet2DConditional, x, t, context, **kwargs) -> torch.Tensor:
    def one(i: int):
        cut = {k: ({n: v[i:i + 1] for n, v in value.items()} if isinstance(value, dict) else value)
               for k, value in kwargs.items()}
        return UNet2DConditional.forward(unet, x[i:i + 1], t if t.dim() == 0 else t[i:i + 1], context[i:i + 1],
                                         **cut)
    return torch.cat([one(i) for i in range(x.shape[0])])


def check_split(unet: UNet2DConditional, x, t, context, expected_per_sample=None, **kwargs) -> torch.Tensor:
    forward = split_batch.SplitBatchForward(unet)
    seen, handle = threads_seen(unet)
    try:
        with torch.no_grad():
            got = forward(x, t, context, **kwargs)
            whole = UNet2DConditional.forward(unet, x, t, context, **kwargs)
            alone = per_sample(unet, x, t, context, **kwargs) if expected_per_sample is None else expected_per_sample
    finally:
        handle.remove()
    assert len(seen[:2]) == 2 and seen[0] != seen[1], seen   # the two halves ran on two threads
    assert max_rel_error(got, alone) <= 1e-5
    assert max_rel_error(got, whole) <= 1e-4
    assert torch.get_num_threads() == 2
    return got


def test_split_equals_the_per_sample_calls(unet):
    x, t, context = inputs(unet)
    check_split(unet, x, t, context)


def test_split_of_four_samples_on_two_threads(unet):
    x, t, context = inputs(unet, batch=4)
    with torch.no_grad():
        assert split_batch.SplitBatchForward(unet).part_count(x, (context,), {}, 2) == 2
    check_split(unet, x, t, context)


def test_split_cuts_added_cond_and_keeps_freeu_factors():
    sdxl = make_unet(tiny_unet_config("base"))
    x, t, _ = inputs(sdxl)
    g = torch.Generator().manual_seed(5)
    context = torch.randn(2, 5, sdxl.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(2, PROJECTION, generator=g), "time_ids": torch.randn(2, 6, generator=g) * 100}
    freeu = FreeU(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    check_split(sdxl, x, t, context, added_cond=added, freeu=freeu)


def test_split_cuts_controlnet_residuals(unet):
    x, t, context = inputs(unet)
    with torch.no_grad():
        h = unet.conv_in(x)
        skips, emb = [h], unet.embed(x, t, None, None)
        for down in unet.down_blocks:
            h = down(h, emb, context, skips)
    g = torch.Generator().manual_seed(7)
    down = tuple(torch.randn(s.shape, generator=g) for s in skips)
    mid = torch.randn(h.shape, generator=g)
    residuals = Residuals(down=down, mid=mid)
    with torch.no_grad():
        alone = torch.cat([UNet2DConditional.forward(
            unet, x[i:i + 1], t[i:i + 1], context[i:i + 1],
            residuals=Residuals(down=tuple(d[i:i + 1] for d in down), mid=mid[i:i + 1])) for i in (0, 1)])
        plain = UNet2DConditional.forward(unet, x, t, context)
    got = check_split(unet, x, t, context, expected_per_sample=alone, residuals=residuals)
    assert (got - plain).abs().max() > 1e-2   # the residuals reached the output


def test_a_shared_timestep_is_passed_whole(unet):
    x, _, context = inputs(unet)
    check_split(unet, x, torch.tensor(250), context)


@pytest.mark.parametrize("case", ["grad", "autocast", "deepcache", "tome", "keyword", "one thread", "batch of one"])
def test_runs_whole_where_the_split_does_not_apply(unet, case):
    forward = split_batch.SplitBatchForward(unet)
    x, t, context = inputs(unet, batch=1 if case == "batch of one" else 2)
    kwargs = {"cache": DeepCacheState()} if case == "deepcache" else {}
    if case == "keyword":
        kwargs = {"something_new": 1}
    threads = 1 if case == "one thread" else 2
    if case == "tome":
        enable_tome(unet, 0.5)
    try:
        with torch.set_grad_enabled(case == "grad"), torch.autocast("cpu", enabled=case == "autocast"):
            assert forward.part_count(x, (context,), kwargs, threads) == 1
    finally:
        disable_tome(unet)
    if case != "batch of one":
        with torch.no_grad():   # and the same call splits otherwise
            assert forward.part_count(x, (context,), {}, 2) == 2


def test_a_failing_part_raises_and_the_threads_are_restored(unet):
    forward = split_batch.SplitBatchForward(unet)
    x, t, context = inputs(unet)
    calls = []

    def fail_second(module, args):
        calls.append(threading.current_thread().name)
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("part failed")
    handle = unet.conv_in.register_forward_pre_hook(fail_second)
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="part failed"):
            forward(x, t, context)
    finally:
        handle.remove()
    assert len(calls) == 2 and torch.get_num_threads() == 2


def test_inference_mode_reaches_the_parts(unet):
    x, t, context = inputs(unet)
    with torch.inference_mode():
        out = split_batch.SplitBatchForward(unet)(x, t, context)
    assert out.is_inference()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_shapes_model(tmp_path_factory.mktemp("split") / "shapes-64")


def images(pipe) -> torch.Tensor:
    return pipe(["a red circle", "a blue square"], num_inference_steps=2, guidance_scale=3.0, output_type="pt",
                progress=False, generator=torch.Generator().manual_seed(0)).images


def test_optimize_for_cpu_splits_the_batch_and_keeps_the_images(folder):
    plain = cpu_paths.optimize_for_cpu(LatentDiffusionPipeline.from_pretrained(folder), split_batch=False)
    assert "forward" not in plain.unet.__dict__
    expected = images(plain)
    pipe = cpu_paths.optimize_for_cpu(LatentDiffusionPipeline.from_pretrained(folder))
    assert isinstance(pipe.unet.__dict__["forward"], split_batch.SplitBatchForward)
    seen, handle = threads_seen(pipe.unet)
    got = images(pipe)
    handle.remove()
    assert len(set(seen)) == 2                 # the CFG batch of 4 ran as two parts of 2
    assert max_rel_error(got, expected) <= 1e-4

    copied = copy.deepcopy(pipe.unet)
    forward = copied.__dict__["forward"]
    assert isinstance(forward, split_batch.SplitBatchForward) and forward.unet is copied
    x, t, context = inputs(copied)
    context = torch.randn(2, 5, copied.config.cross_attention_dim)
    with torch.no_grad():
        assert torch.equal(copied(x, t, context), pipe.unet(x, t, context))

    cpu_paths.undo_cpu_optimization(pipe)
    assert "forward" not in pipe.unet.__dict__
