"""Validate before allocating: a few bytes of input (a config key, a header, an argument) never cost gigabytes,
hours or a RecursionError. Each case is refused by a latentdiff error naming the key, the bound and the value,
with the peak RSS of its process under a stated bound and within seconds.

All inputs run in one bounded subprocess (`run_cases`: a torch import costs seconds), each checked as its own
case; the measured peak RSS is that process's, so it bounds every case (the tiny model and a 200 MB file
included).
"""
from __future__ import annotations

import json

import pytest

from tests._support.sizes import (
    assert_refused,
    copy_builtin,
    nested_json,
    nested_yaml,
    npy_claiming,
    npz_deflate_bomb,
    png_header_only,
    run_cases,
)
from tests._support.tiny import TINY_KL
from tests._support.training import autoencoder_config, write_yaml

pytestmark = pytest.mark.outcome("clear_error", fails_as="crash")

RSS_MB = 1000          # peak RSS of the one process running every case (torch, the tiny model): measured 272 MB
SECONDS = 10           # per case; measured: at most 1-2 s (a 100,000-deep YAML), most under 0.2 s

BIG_LAYERS, BIG_WIDTH, BIG_T = 10**9, 2**30, 10**11


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Every input of this module, run in one bounded subprocess (one torch import for all of them)."""
    code: dict[str, str] = {}
    for build in (model_cases, single_file_cases, generate_cases, eval_cases):
        code |= build(tmp_path_factory.mktemp(build.__name__))
    return run_cases(code, setup=GENERATE_SETUP)


# ---- model structure, schedules and config nesting, from files ----------------------------------------------
def _yaml_with(tmp, name: str, edit) -> str:
    from latentdiff.convert import load_original_config

    data = load_original_config("v1-inference")
    edit(data["model"]["params"])
    import yaml

    return str(write(tmp / f"{name}.yaml", yaml.safe_dump(data)))


def _train_yaml(tmp, name: str, **sections) -> str:
    return str(write_yaml(tmp / f"train-{name}.yaml", autoencoder_config(tmp / "data", tmp / "out", **sections)))


MODEL_CASES = {  # name: (error, what the message must name: key, bound, value)
    "unet_config_layers_per_block_1e9": ("ConfigError", ("layers_per_block", "64", str(BIG_LAYERS))),
    "unet_config_block_out_channels_2e30": ("ConfigError", ("block_out_channels", "65536", str(BIG_WIDTH))),
    "unet_config_parameter_estimate": ("ConfigError", ("block_out_channels", "20000000000", "parameters")),
    "vae_config_layers_per_block_1e8": ("ConfigError", ("layers_per_level", "64", "100000000")),
    "text_config_num_hidden_layers_1e9": ("ConfigError", ("num_hidden_layers", "256", str(BIG_LAYERS))),
    "yaml_num_res_blocks_1e8": ("ConfigError", ("unet_config.params.num_res_blocks", "64", "100000000")),
    "yaml_model_channels_2e30": ("ConfigError", ("unet_config.params.model_channels", "65536", str(BIG_WIDTH))),
    "yaml_first_stage_num_res_blocks_1e8": ("ConfigError", ("ddconfig.num_res_blocks", "64", "100000000")),
    "yaml_timesteps_1e11": ("ConfigError", ("model.params.timesteps", "100000", str(BIG_T))),
    "scheduler_num_train_timesteps_1e11": ("ConfigError", ("num_train_timesteps", "100000", str(BIG_T))),
    "scheduler_squaredcos_1e9_steps": ("ConfigError", ("num_train_timesteps", "100000", "1000000000")),
    "train_config_data_resolution_1e5": ("ConfigError", ("data.resolution", "16384", "100000")),
    "train_config_channels_2e30": ("ConfigError", ("channels", "65536", str(BIG_WIDTH))),
    "config_json_nested_100000_deep": ("ConfigError", ("config.json", "nested too deeply", "64")),
    "train_yaml_nested_100000_deep": ("ConfigError", ("deep.yaml", "nested too deeply", "64")),
}


def model_cases(tmp) -> dict[str, str]:
    unet = "from latentdiff.models.unet import UNet2DConditional as M; M.from_pretrained(r'{}')"
    vae = "from latentdiff.models.autoencoder_kl import AutoencoderKL as M; M.from_pretrained(r'{}')"
    folders = {}
    for name, config in (("deep_unet", {"_class_name": "UNet2DConditionModel", "layers_per_block": BIG_LAYERS}),
                         ("wide_unet", {"_class_name": "UNet2DConditionModel", "block_out_channels": [BIG_WIDTH] * 4}),
                         ("huge_unet", {"_class_name": "UNet2DConditionModel", "block_out_channels": [32768] * 4}),
                         ("deep_vae", {"_class_name": "AutoencoderKL", "layers_per_block": 10**8})):
        folders[name] = write(tmp / name / "config.json", json.dumps(config)).parent
    write(tmp / "nested" / "config.json", nested_json(100_000))
    for name, config in (("t_big", {"num_train_timesteps": BIG_T}),
                         ("t_cos", {"num_train_timesteps": 10**9, "beta_schedule": "squaredcos_cap_v2"})):
        config = {"_class_name": "DDIMScheduler", **config}
        write(tmp / name / "scheduler" / "scheduler_config.json", json.dumps(config))
    unet_yaml = lambda **kw: lambda p: p["unet_config"]["params"].update(kw)  # noqa: E731
    yamls = {
        "res_blocks": _yaml_with(tmp, "res_blocks", unet_yaml(num_res_blocks=10**8)),
        "channels": _yaml_with(tmp, "channels", unet_yaml(model_channels=BIG_WIDTH)),
        "vae_blocks": _yaml_with(tmp, "vae_blocks", lambda p: p["first_stage_config"]["params"]["ddconfig"].update(
            num_res_blocks=10**8)),
        "timesteps": _yaml_with(tmp, "timesteps", lambda p: p.update(timesteps=BIG_T)),
    }
    train = {
        "resolution": _train_yaml(tmp, "resolution", data={"resolution": 100_000}),
        "channels": _train_yaml(tmp, "channels", model={"architecture": {**TINY_KL, "channels": [BIG_WIDTH] * 2}}),
    }
    deep_yaml = str(write(tmp / "deep.yaml", nested_yaml(100_000)))
    convert = "from latentdiff.convert import original_config_to_configs as f; f(r'{}')"
    load_train = "from latentdiff.training.config import load_train_config as f; f(r'{}', 'autoencoder')"
    scheduler = "from latentdiff.diffusion.noise_scheduler import NoiseScheduler as S; S.from_pretrained(r'{}')"
    cases = {
        "unet_config_layers_per_block_1e9": unet.format(folders["deep_unet"]),
        "unet_config_block_out_channels_2e30": unet.format(folders["wide_unet"]),
        "unet_config_parameter_estimate": unet.format(folders["huge_unet"]),
        "vae_config_layers_per_block_1e8": vae.format(folders["deep_vae"]),
        "text_config_num_hidden_layers_1e9":
            f"from latentdiff.models.clip_text import CLIPTextConfig as C; C(num_hidden_layers={BIG_LAYERS})",
        "yaml_num_res_blocks_1e8": convert.format(yamls["res_blocks"]),
        "yaml_model_channels_2e30": convert.format(yamls["channels"]),
        "yaml_first_stage_num_res_blocks_1e8": convert.format(yamls["vae_blocks"]),
        "yaml_timesteps_1e11": convert.format(yamls["timesteps"]),
        "scheduler_num_train_timesteps_1e11": scheduler.format(tmp / "t_big"),
        "scheduler_squaredcos_1e9_steps": scheduler.format(tmp / "t_cos"),
        "train_config_data_resolution_1e5": load_train.format(train["resolution"]),
        "train_config_channels_2e30": load_train.format(train["channels"]),
        "config_json_nested_100000_deep": unet.format(tmp / "nested"),
        "train_yaml_nested_100000_deep": load_train.format(deep_yaml),
    }
    return cases


@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_model_structure_and_schedule_sizes_are_bounded_before_building(cases, name):
    error, names = MODEL_CASES[name]
    assert_refused(cases[name], error=error, names=names, rss_mb=RSS_MB, seconds=SECONDS)


# ---- single files: schedule buffers and tensors checked before they are materialised ----------------------------
SINGLE_FILE_CASES = {
    "metadata_num_train_timesteps_1e11": ("ConfigError", ("num_train_timesteps", "100000", str(BIG_T))),
    "yaml_num_res_blocks_1e8_with_weights": ("ConfigError", ("num_res_blocks", "64", "100000000")),
    "yaml_layer_counts_against_the_weight_keys": ("CheckpointError", ("input_blocks", "16 input blocks", "6 input")),
    "stride0_betas_1e10_in_4_bytes": ("CheckpointError", ("betas", "at most 1 elements", "10000000000")),
    "betas_of_200_mb": ("CheckpointError", ("betas", "100000", "50000000")),
}


def single_file_cases(tmp) -> dict[str, str]:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline

    good = LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64").save_single_file(tmp / "good.safetensors")
    with safe_open(str(good), "pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open, no __iter__)
    saved = json.loads(metadata["latentdiff"])
    saved["configs"]["scheduler"]["num_train_timesteps"] = BIG_T
    save_file(state, str(tmp / "big_t.safetensors"), metadata={**metadata, "latentdiff": json.dumps(saved)})
    torch.save({"state_dict": {**state, "betas": torch.zeros(1).expand(10**10)}}, tmp / "stride0.ckpt")
    save_file({**state, "betas": torch.full((50_000_000,), 0.01)}, str(tmp / "betas200.safetensors"),
              metadata=metadata)
    yaml = _yaml_with(tmp, "res_blocks", lambda p: p["unet_config"]["params"].update(num_res_blocks=10**8))
    three = _yaml_with(tmp, "three_blocks", lambda p: p["unet_config"]["params"].update(num_res_blocks=3))
    load = "from latentdiff.pipelines.base import Pipeline; Pipeline.from_single_file(r'{}'{})"
    return {
        "metadata_num_train_timesteps_1e11": load.format(tmp / "big_t.safetensors", ""),
        "yaml_num_res_blocks_1e8_with_weights": load.format(good, f", original_config=r'{yaml}'"),
        "yaml_layer_counts_against_the_weight_keys": load.format(good, f", original_config=r'{three}'"),
        "stride0_betas_1e10_in_4_bytes": load.format(tmp / "stride0.ckpt", ""),
        "betas_of_200_mb": load.format(tmp / "betas200.safetensors", ""),
    }


@pytest.mark.parametrize("name", sorted(SINGLE_FILE_CASES))
def test_single_file_sizes_are_checked_before_tensors_are_materialised(cases, name):
    error, names = SINGLE_FILE_CASES[name]
    assert_refused(cases[name], error=error, names=names, rss_mb=RSS_MB, seconds=SECONDS)


# ---- generation sizes: the Python API, the CLI, a --from PNG, a model folder's latentdiff_generate.json --------
GENERATE_CASES = {
    "api_height_width_100000": ("InputError", ("height", "16384", "100000")),
    "api_num_images_per_prompt_1e6": ("InputError", ("num_images_per_prompt", "1024", "1000000")),
    "api_pixels_over_default_limit": ("InputError", ("max_pixels", str(64 * 1024 * 1024), "8192 x 8192 x 2")),
    "api_max_pixels_lowered": ("InputError", ("max_pixels", "4096", "64 x 64 x 2")),
    "api_unconditional_height_100000": ("InputError", ("height", "16384", "100000")),
    "api_unconditional_batch_size_1e6": ("InputError", ("batch_size=1000000", "65536")),
    "cli_n_1e6": ("UsageError", ("-n", "1024", "1000000")),
    "cli_height_100000": ("UsageError", ("--height", "16384", "100000")),
    "cli_pixels_over_default_limit": ("UsageError", ("--height", str(64 * 1024 * 1024), "16384 x 16384 x 1")),
    "from_png_height_1e30": ("UsageError", ("from.png: height", "16384", str(10**30))),
    "from_png_n_1e6": ("UsageError", ("from_n.png: n", "1024", "1000000")),
    "from_png_params_nested_100000_deep": ("UsageError", ("deep.png", "ConfigError")),
    "generate_json_height_100000": ("UsageError", ("latentdiff_generate.json: height", "16384", "100000")),
    "generate_json_steps_1e9": ("UsageError", ("latentdiff_generate.json: steps", "10000", "1000000000")),
}


GENERATE_SETUP = """
from latentdiff.pipelines.latent_diffusion import LatentDiffusionPipeline
from latentdiff.pipelines.unconditional import UnconditionalPipeline
from latentdiff.models.unet2d import UNet2D, UNet2DConfig
pipe = LatentDiffusionPipeline.from_pretrained("latentdiff/shapes-64")
unet = UNet2D(UNet2DConfig(in_channels=pipe.vae.latent_channels, out_channels=pipe.vae.latent_channels,
                           channels=(32,), attention_levels=(False,), sample_size=8))
uncond = UnconditionalPipeline(vae=pipe.vae, unet=unet, noise_scheduler=pipe.noise_scheduler, sampler=pipe.sampler)
"""


def generate_cases(tmp) -> dict[str, str]:
    from PIL import Image

    from latentdiff.utils.images import PARAMS_KEY, save_png

    image = Image.new("RGB", (8, 8))
    base = {"prompt": "a red circle", "seed": 0, "n": 1, "model": "latentdiff/shapes-64"}
    save_png(image, tmp / "from.png", params={**base, "height": 10**30})
    save_png(image, tmp / "from_n.png", params={**base, "n": 10**6})
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMS_KEY, nested_json(100_000))
    image.save(tmp / "deep.png", pnginfo=info)
    tall = copy_builtin(tmp / "tall", settings={"height": 100_000, "width": 64})
    slow = copy_builtin(tmp / "slow", settings={"num_inference_steps": 10**9})
    out = tmp / "out.png"
    cli = "from latentdiff.cli.main import main; main(['--debug', 'generate', {}])"
    return {
        "api_height_width_100000": "pipe('x', height=100_000, width=100_000, num_inference_steps=1)",
        "api_num_images_per_prompt_1e6": "pipe('x', num_images_per_prompt=10**6, num_inference_steps=1)",
        "api_pixels_over_default_limit": "pipe('x', height=8192, width=8192, num_images_per_prompt=2)",
        "api_max_pixels_lowered": "pipe('x', num_images_per_prompt=2, max_pixels=4096, num_inference_steps=1)",
        "api_unconditional_height_100000": "uncond(batch_size=2, height=100_000, width=100_000, max_pixels=2**62)",
        "api_unconditional_batch_size_1e6": "uncond(batch_size=10**6, num_inference_steps=1)",
        "cli_n_1e6": cli.format(f"'x', '-n', '1000000', '-o', r'{out}'"),
        "cli_height_100000": cli.format(f"'x', '--height', '100000', '-o', r'{out}'"),
        "cli_pixels_over_default_limit": cli.format(f"'x', '--height', '16384', '--width', '16384', '-o', r'{out}'"),
        "from_png_height_1e30": cli.format(f"'--from', r'{tmp / 'from.png'}', '-o', r'{out}'"),
        "from_png_n_1e6": cli.format(f"'--from', r'{tmp / 'from_n.png'}', '-o', r'{out}'"),
        "from_png_params_nested_100000_deep": cli.format(f"'--from', r'{tmp / 'deep.png'}', '-o', r'{out}'"),
        "generate_json_height_100000": cli.format(f"'x', '--model', r'{tall}', '-o', r'{out}'"),
        "generate_json_steps_1e9": cli.format(f"'x', '--model', r'{slow}', '-o', r'{out}'"),
    }


@pytest.mark.parametrize("name", sorted(GENERATE_CASES))
def test_generation_sizes_are_refused_before_any_allocation(cases, name):
    error, names = GENERATE_CASES[name]
    assert_refused(cases[name], error=error, names=names, rss_mb=RSS_MB, seconds=SECONDS)


# ---- latentdiff eval: .npy / .npz headers and image headers checked before reading ------------------------------
EVAL_CASES = {
    "npy_header_claiming_1e11_values": ("InputError", ("stats.npz", "8589934592", "100000000000")),
    "npz_deflate_bomb_2_3_gb": ("InputError", ("bomb.npz", "8192", "17000")),
    "npz_member_claiming_more_than_it_holds": ("InputError", ("mu.npy", "claims more data", "(1000000000,)")),
    "png_decompression_bomb": ("InputError", ("bomb.png", "DecompressionBombError", "pixels")),
}


def eval_cases(tmp) -> dict[str, str]:
    import zipfile

    from numpy.lib import format as npy_format

    npy_claiming(tmp / "stats.npz", (10**11,))
    npz_deflate_bomb(tmp / "bomb.npz")
    with zipfile.ZipFile(tmp / "forged.npz", "w") as archive:
        with archive.open("mu.npy", "w") as member:
            npy_format.write_array_header_1_0(member, {"descr": "<f8", "fortran_order": False, "shape": (10**9,)})
        with archive.open("sigma.npy", "w") as member:
            npy_format.write_array_header_1_0(member, {"descr": "<f8", "fortran_order": False, "shape": (2, 2)})
    (tmp / "bombs").mkdir()
    (tmp / "fine").mkdir()
    png_header_only(tmp / "bombs" / "bomb.png", 40_000, 40_000)
    png_header_only(tmp / "fine" / "bomb.png", 8, 8)
    ev = "from latentdiff.cli.main import main; main(['--debug', 'eval', {}])"
    return {
        "npy_header_claiming_1e11_values": ev.format(f"'fid', r'{tmp / 'stats.npz'}', r'{tmp / 'fine'}'"),
        "npz_deflate_bomb_2_3_gb": ev.format(f"'fid', r'{tmp / 'bomb.npz'}', r'{tmp / 'fine'}'"),
        "npz_member_claiming_more_than_it_holds": ev.format(f"'fid', r'{tmp / 'forged.npz'}', r'{tmp / 'fine'}'"),
        "png_decompression_bomb": ev.format(f"'psnr', r'{tmp / 'bombs'}', r'{tmp / 'fine'}'"),
    }


@pytest.mark.parametrize("name", sorted(EVAL_CASES))
def test_eval_inputs_are_bounded_before_reading(cases, name):
    error, names = EVAL_CASES[name]
    assert_refused(cases[name], error=error, names=names, rss_mb=RSS_MB, seconds=SECONDS)
