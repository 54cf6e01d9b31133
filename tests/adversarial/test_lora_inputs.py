"""LoRA files and adapter arguments (issue 16): each bad input a latentdiff error naming the file / key / argument,
and the pipeline's weights unchanged after it."""
from __future__ import annotations

import pytest
from safetensors.torch import save_file

from latentdiff.errors import CheckpointError, InputError
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from tests._support.lora import kohya, parameters, same_parameters, targets
from tests._support.sd import tiny_diffusers_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
clear = pytest.mark.outcome("clear_error", fails_as="crash")
silent = pytest.mark.outcome("clear_error", fails_as="unclear")
security = pytest.mark.outcome("clear_error", fails_as="security")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, diffusers):
    root = tmp_path_factory.mktemp("lora_inputs")
    tiny_diffusers_pipeline(root).save_pretrained(root / "sd")
    pipe = LatentDiffusionPipeline.from_pretrained(root / "sd")
    found = targets(pipe.unet, pipe.text_encoder.model)
    save_file(kohya(found, seed=1), root / "good.safetensors")
    return root, pipe, found


@pytest.fixture
def pipe(setup):
    _, pipe, _ = setup
    before = parameters(pipe.unet, pipe.text_encoder)
    yield pipe
    pipe.unload_lora_weights()
    assert same_parameters(before, pipe.unet, pipe.text_encoder)


def unchanged_after(pipe, error, call, *named):
    before = parameters(pipe.unet, pipe.text_encoder)
    hooks = sum(len(m._forward_hooks) for m in pipe.unet.modules())
    with pytest.raises(error) as e:
        call()
    assert same_parameters(before, pipe.unet, pipe.text_encoder)
    assert sum(len(m._forward_hooks) for m in pipe.unet.modules()) == hooks
    for text in named:
        assert text in str(e.value), str(e.value)
    return e.value


@clear
def test_lora_down_of_the_wrong_rank_of_tensor(setup, pipe, tmp_path):
    root, _, found = setup
    state = kohya(found, seed=2)
    key = sorted(k for k in state if k.endswith("lora_down.weight"))[0]
    state[key] = state[key].flatten()
    save_file(state, tmp_path / "flat.safetensors")
    unchanged_after(pipe, CheckpointError, lambda: pipe.load_lora_weights(tmp_path / "flat.safetensors"),
                    "flat.safetensors", key.removesuffix(".lora_down.weight"))


@silent
def test_nan_in_a_lora(setup, pipe, tmp_path):
    root, _, found = setup
    state = kohya(found, seed=3)
    key = sorted(k for k in state if k.endswith("lora_up.weight"))[1]
    state[key][0, 0] = float("nan")
    save_file(state, tmp_path / "nan.safetensors")
    unchanged_after(pipe, CheckpointError, lambda: pipe.load_lora_weights(tmp_path / "nan.safetensors"),
                    "nan.safetensors", "lora_up", "NaN")


@clear
def test_empty_file(pipe, tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    unchanged_after(pipe, CheckpointError, lambda: pipe.load_lora_weights(tmp_path / "empty.safetensors"),
                    "empty.safetensors")


@clear
def test_file_without_tensors(pipe, tmp_path):
    save_file({}, tmp_path / "none.safetensors")
    unchanged_after(pipe, CheckpointError, lambda: pipe.load_lora_weights(tmp_path / "none.safetensors"),
                    "none.safetensors")


@clear
def test_state_dict_with_a_non_tensor(pipe):
    unchanged_after(pipe, InputError, lambda: pipe.load_lora_weights({"lora_unet_conv_in.alpha": 1.0}),
                    "state_dict", "lora_unet_conv_in.alpha")


@clear
def test_adapter_name_not_a_string(setup, pipe):
    root, _, _ = setup
    unchanged_after(pipe, InputError, lambda: pipe.load_lora_weights(root / "good.safetensors", adapter_name=3),
                    "adapter_name")


@clear
@pytest.mark.parametrize("weights", [[float("nan")], ["strong"], [1.0, 2.0]])
def test_bad_adapter_weights(setup, pipe, weights):
    root, _, _ = setup
    pipe.load_lora_weights(root / "good.safetensors")
    unchanged_after(pipe, InputError, lambda: pipe.set_adapters(["good"], adapter_weights=weights), "adapter_weights")
    assert pipe.get_active_adapters() == ["good"]


@clear
def test_unknown_adapter_name(setup, pipe):
    root, _, _ = setup
    pipe.load_lora_weights(root / "good.safetensors")
    unchanged_after(pipe, InputError, lambda: pipe.set_adapters(["nope"]), "nope", "good")


@security
def test_tag_name_that_leaves_the_lora_folder(setup, pipe, tmp_path):
    root, _, _ = setup
    (tmp_path / "loras").mkdir()
    (tmp_path / "secret.safetensors").write_bytes((root / "good.safetensors").read_bytes())
    unchanged_after(pipe, CheckpointError, lambda: pipe("x <lora:../secret:1>", num_inference_steps=1,
                                                         lora_dirs=[tmp_path / "loras"], progress=False),
                    "outside")
    assert pipe.get_list_adapters() == {}


@clear
def test_lora_dirs_of_the_wrong_type(pipe):
    unchanged_after(pipe, InputError, lambda: pipe("x <lora:a:1>", num_inference_steps=1, lora_dirs=3,
                                                   progress=False), "lora_dirs")
