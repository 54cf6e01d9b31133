"""SDXL single files in Stability AI's generative-models layout: recognised from their tensors (no YAML), each part
computing what diffusers' does on the same weights, written back bit for bit, the shipped YAMLs, bad files.

The reference is independent of latentdiff's reader: tiny diffusers SDXL pipelines (base, refiner, 9-channel
inpainting) by the released conventions (tests/_support/sdxl_file.py) are saved as folders; the test writes their
weights in the original layout through latentdiff's writer, checks that file against the key families and shapes of
the released files, and has diffusers' own single-file loader read it back to the same weights.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import diffusers
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from latentdiff import AutoencoderKL, CheckpointError, UNet2DConditional
from latentdiff.convert import read_single_file, to_single_file, write_single_file
from latentdiff.convert.api import module_from_part
from latentdiff.convert.original_config import layout_from_original_config
from tests._support.parity import assert_parity
from tests._support.sdxl_file import POOLED, TIME_DIM, check_real_layout, original_file, released_sdxl

warnings.filterwarnings("ignore", category=FutureWarning)
KINDS = ("base", "refiner", "inpaint")
FAMILIES = {"base": "sdxl", "refiner": "sdxl-refiner", "inpaint": "sdxl-inpaint"}
# what the tensors record of each part's config (the rest follows the released models' conventions)
UNET_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
             "up_block_types", "cross_attention_dim", "addition_embed_type", "addition_time_embed_dim",
             "projection_class_embeddings_input_dim", "use_linear_projection", "attention_head_dim")
TEXT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
             "vocab_size", "max_position_embeddings")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """kind -> (diffusers pipeline, its folder, its original single file without any metadata)."""
    root = tmp_path_factory.mktemp("sdxl")
    out = {}
    for kind in KINDS:
        pipe = released_sdxl(root / kind, kind=kind)
        save_file(original_file(root / kind, to_single_file), root / f"{kind}.safetensors")
        out[kind] = (pipe, root / kind, root / f"{kind}.safetensors")
    return out


def same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:10]
    for key, value in b.items():
        assert a[key].dtype == value.dtype and a[key].shape == value.shape and torch.equal(a[key], value), key


# ---- the file the test writes is laid out as the released ones --------------------------------------------------
@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_written_file_has_the_released_layout(files, kind):
    check_real_layout(load_file(files[kind][2]), refiner=kind == "refiner")


def test_diffusers_reads_our_file_to_the_same_weights(files):
    """diffusers' own SDXL single-file loader (its key tables, not ours) gets the folder's weights back."""
    pipe, folder, path = files["base"]
    theirs = diffusers.StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder),
                                                                  local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ref = getattr(pipe, name).state_dict()
        got = getattr(theirs, name).state_dict()
        for key in ref:
            assert torch.equal(got[key], ref[key]), (name, key)


# ---- recognised from the tensors alone ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_recognised_from_tensors(files, kind):
    pipe, _, path = files[kind]
    parts = read_single_file(path)
    assert parts["extras"][0]["family"] == FAMILIES[kind]
    texts = ["text_encoder_2"] if kind == "refiner" else ["text_encoder", "text_encoder_2"]
    assert sorted(p for p in parts if p.startswith("text")) == texts
    unet = parts["unet"][0]
    ref = dict(pipe.unet.config)
    assert {k: _plain(unet[k]) for k in UNET_KEYS} == {k: _plain(ref[k]) for k in UNET_KEYS}
    assert unet["addition_time_embed_dim"] == TIME_DIM
    assert unet["projection_class_embeddings_input_dim"] - POOLED == (5 if kind == "refiner" else 6) * TIME_DIM
    vae = parts["vae"][0]
    assert vae["scaling_factor"] == 0.13025 and vae["force_upcast"] is True
    for name in texts:
        ref_text = getattr(pipe, name).config.to_dict()
        assert {k: parts[name][0][k] for k in TEXT_KEYS} == {k: ref_text[k] for k in TEXT_KEYS}
    assert parts["text_encoder_2"][0]["projection_dim"] == POOLED
    assert parts["text_encoder_2"][0]["architectures"] == ["CLIPTextModelWithProjection"]
    scheduler = parts["scheduler"][0]
    assert scheduler["_class_name"] == "EulerDiscreteScheduler"
    assert {k: scheduler[k] for k in ("beta_start", "beta_end", "beta_schedule", "timestep_spacing", "steps_offset",
                                      "prediction_type")} == \
        {k: pipe.scheduler.config[k] for k in ("beta_start", "beta_end", "beta_schedule", "timestep_spacing",
                                               "steps_offset", "prediction_type")}


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


# ---- each part computes what diffusers' does ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_parts_match_diffusers(files, kind):
    """UNet (with the text_time add embedding), VAE decode, both text encoders' penultimate states and the pooled
    projection: latentdiff's models built from the file against diffusers' / transformers' on the same weights."""
    pipe, _, path = files[kind]
    parts = read_single_file(path)
    built = {name: module_from_part(name, *parts[name], source=name) for name in parts if name in
             ("unet", "vae", "text_encoder", "text_encoder_2")}
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (2, 77), generator=g)
    ids[:, 9] = pipe.text_encoder_2.config.eos_token_id
    contexts, pooled = [], None
    with torch.no_grad():
        for name in ("text_encoder", "text_encoder_2"):
            if name not in built:
                continue
            ours = built[name](ids, output_hidden_states=True)
            theirs = getattr(pipe, name)(ids, output_hidden_states=True)
            assert_parity(ours.hidden_states[-2], theirs.hidden_states[-2])
            contexts.append(theirs.hidden_states[-2])
            if name == "text_encoder_2":
                assert_parity(ours.text_embeds, theirs.text_embeds)
                pooled = theirs.text_embeds
        context = torch.cat(contexts, dim=-1)
        numbers = 5 if kind == "refiner" else 6
        time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0][:numbers],
                                 [48.0, 24.0, 8.0, 4.0, 32.0, 16.0][:numbers]])
        x = torch.randn(2, 4, 16, 16, generator=g)
        t = torch.tensor([999, 17])
        added = {"text_embeds": pooled, "time_ids": time_ids}
        assert_parity(built["unet"](x, t, context, added_cond=added),
                      pipe.unet(x, t, context, added_cond_kwargs=added).sample)
        z = torch.randn(1, 4, 16, 16, generator=g)
        assert_parity(built["vae"].decode(z), pipe.vae.decode(z).sample)


def test_unet_and_vae_alone_from_the_file(files):
    """A part's from_single_file reads that part (the text encoders' tensors left out, their shapes still giving
    the pooled width that sizes the add embedding)."""
    pipe, _, path = files["base"]
    unet = UNet2DConditional.from_single_file(path)
    assert unet.config.addition_time_embed_dim == TIME_DIM
    same(dict(unet.state_dict()), dict(pipe.unet.state_dict()))
    vae = AutoencoderKL.from_single_file(path)
    assert vae.config.scaling_factor == 0.13025
    same(dict(vae.state_dict()), dict(pipe.vae.state_dict()))


# ---- bit for bit -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_bit_for_bit(files, kind, tmp_path):
    path = files[kind][2]
    original = load_file(path)
    parts = read_single_file(path)
    same(to_single_file(parts), original)
    written = write_single_file(tmp_path / "again.safetensors", parts)
    same(load_file(written), original)
    again = read_single_file(written)   # through latentdiff's metadata this time
    assert again["extras"][0]["family"] == FAMILIES[kind]
    same(to_single_file(again), original)


def test_half_precision_file_round_trips(files, tmp_path):
    original = {k: v.half() if v.is_floating_point() else v for k, v in load_file(files["refiner"][2]).items()}
    save_file(original, tmp_path / "fp16.safetensors")
    same(to_single_file(read_single_file(tmp_path / "fp16.safetensors")), original)


# ---- the shipped YAMLs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kind", [("sd_xl_base", "sdxl"), ("sd_xl_refiner", "sdxl-refiner")])
def test_shipped_yaml_describes_what_the_tensors_of_that_model_give(name, kind):
    """The released-size UNet / VAE / text encoders of each YAML, built on the meta device by diffusers and
    transformers from their Hub configs' values as the YAML's layout writes them, written in the original layout
    and read back from the shapes alone: the same parts."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    layout = layout_from_original_config(name)
    assert layout.family == kind
    configs = layout.configs()
    parts = {}
    with init_empty_weights():
        for part, config in configs.items():
            if part in ("unet", "vae"):
                cls = getattr(diffusers, config["_class_name"])
                model = cls.from_config(config)
                parts[part] = (config, model.state_dict())
            elif part.startswith("text_encoder"):
                cls = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
                parts[part] = (config, cls(CLIPTextConfig.from_dict(config)).state_dict())
    state = to_single_file(parts)
    from latentdiff.convert.infer import infer_layout

    inferred = infer_layout(state)
    assert inferred.family == kind
    got = inferred.configs()
    assert got["unet"] == {**configs["unet"], "transformer_layers_per_block": got["unet"][
        "transformer_layers_per_block"]}  # levels without attention: any depth
    assert got["vae"] == configs["vae"]
    for part in ("text_encoder", "text_encoder_2"):
        assert got.get(part) == configs.get(part)
    assert got["scheduler"] == configs["scheduler"]


def test_tiny_sgm_yaml_reads_the_file(files, tmp_path):
    """A YAML in the shipped ones' format for the tiny model: the UNet and VAE it describes are the file's; the
    released text towers it names are not, which the strict load of an encoder says by key."""
    pipe, _, path = files["base"]
    data = yaml.safe_load(Path(layout_path("sd_xl_base")).read_text())
    net = data["model"]["params"]["network_config"]["params"]
    net.update(adm_in_channels=POOLED + 6 * TIME_DIM, model_channels=64, channel_mult=[1, 2], attention_resolutions=[2],
               transformer_depth=[1, 2], context_dim=pipe.unet.config.cross_attention_dim)
    dd = data["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    dd.update(ch=32, ch_mult=[1, 2], num_res_blocks=1)
    for entry in data["model"]["params"]["conditioner_config"]["params"]["emb_models"]:
        if entry["target"].endswith("ConcatTimestepEmbedderND"):
            entry["params"]["outdim"] = TIME_DIM
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(data))
    parts = read_single_file(path, original_config=tmp_path / "tiny.yaml")
    for name, model in (("unet", pipe.unet), ("vae", pipe.vae)):
        built = module_from_part(name, *parts[name])
        same(dict(built.state_dict()), dict(model.state_dict()))
    assert parts["unet"][0]["addition_time_embed_dim"] == TIME_DIM
    with pytest.raises(CheckpointError, match="token_embedding"):
        module_from_part("text_encoder_2", *parts["text_encoder_2"], source="text_encoder_2")


def layout_path(name: str) -> str:
    from latentdiff.convert import shipped_config_path

    return str(shipped_config_path(name))


# ---- bad files ---------------------------------------------------------------------------------------------------
def test_base_file_without_its_bigg_encoder_is_refused_by_name(files):
    state = {k: v for k, v in load_file(files["base"][2]).items() if not k.startswith("conditioner.embedders.1.")}
    from latentdiff.convert import split_single_file

    with pytest.raises(CheckpointError, match="incomplete SDXL conditioner") as info:
        split_single_file(state, source="half.safetensors")
    assert "conditioner.embedders" in info.value.where and "openclip" in str(info.value.expected)


def test_unet_with_another_models_text_encoders_is_refused(files):
    """A base UNet (context CLIP-L + bigG) beside the refiner's conditioner (bigG alone)."""
    base, refiner = load_file(files["base"][2]), load_file(files["refiner"][2])
    mixed = {k: v for k, v in base.items() if not k.startswith("conditioner.")}
    mixed.update({k: v for k, v in refiner.items() if k.startswith("conditioner.")})
    from latentdiff.convert import split_single_file

    with pytest.raises(CheckpointError, match="context width"):
        split_single_file(mixed, source="mixed.safetensors")


def test_sdxl_conditioner_beside_an_sd_conditioning_stage_is_refused(files):
    state = load_file(files["refiner"][2])
    state["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    from latentdiff.convert import split_single_file

    with pytest.raises(CheckpointError, match="cond_stage_model"):
        split_single_file(state, source="mixed.safetensors")


def test_truncated_file_is_a_checkpoint_error(files, tmp_path):
    data = files["base"][2].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        read_single_file(cut)


def test_v_prediction_markers(files):
    """Fine-tunes that predict v mark it with empty `v_pred` / `ztsnr` tensors: the scheduler follows, and the
    markers are written back."""
    from latentdiff.convert import split_single_file

    state = {**load_file(files["refiner"][2]), "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}
    parts = split_single_file(state, source="vpred.safetensors")
    assert parts["scheduler"][0]["prediction_type"] == "v_prediction"
    assert parts["scheduler"][0]["rescale_betas_zero_snr"] is True
    same(to_single_file(parts), state)
    plain = split_single_file(load_file(files["refiner"][2]))
    assert plain["scheduler"][0]["prediction_type"] == "epsilon" and "rescale_betas_zero_snr" not in \
        plain["scheduler"][0]


def test_narrow_model_round_trips_through_its_metadata(tmp_path):
    """A model off the released conventions (tiny_sdxl: 16-wide text heads, GroupNorm(8)) is written with its configs
    in the metadata and read back through them, also part by part (its shapes alone could not describe it)."""
    from latentdiff import Pipeline
    from tests._support.sdxl import tiny_sdxl

    tiny_sdxl(tmp_path / "narrow")
    pipe = Pipeline.from_pretrained(tmp_path / "narrow")
    path = pipe.save_single_file(tmp_path / "narrow.safetensors")
    sources = tmp_path / "narrow_sources"
    again = Pipeline.from_single_file(path, tokenizer=sources / "tokenizer", tokenizer_2=sources / "tokenizer_2")
    assert type(again) is type(pipe)
    for name in ("unet", "vae"):
        same(dict(getattr(again, name).state_dict()), dict(getattr(pipe, name).state_dict()))
    for name in ("text_encoder", "text_encoder_2"):
        same(dict(getattr(again, name).model.state_dict()), dict(getattr(pipe, name).model.state_dict()))
    unet = UNet2DConditional.from_single_file(path)
    assert unet.config == pipe.unet.config


def test_writing_refuses_text_encoders_without_sdxls_layout(files):
    """SDXL's first encoder is written in transformers' CLIP layout, its second in OpenCLIP's: a first encoder
    that would take OpenCLIP's (gelu), or a refiner given a CLIP-L, is refused rather than written wrongly."""
    parts = read_single_file(files["base"][2])
    gelu = dict(parts, text_encoder=({**parts["text_encoder"][0], "hidden_act": "gelu"}, parts["text_encoder"][1]))
    with pytest.raises(CheckpointError, match="CLIP-L"):
        to_single_file(gelu)
    refiner = dict(read_single_file(files["refiner"][2]), text_encoder=parts["text_encoder"])
    with pytest.raises(CheckpointError, match="CLIP-L"):
        to_single_file(refiner)
