"""LDMBert (the text encoder of CompVis/ldm-text2im-large-256): parity with diffusers' LDMBertModel on the same
random weights, folders in both directions, the tokenization path of diffusers' LDMTextToImagePipeline, and
errors for bad configs, checkpoints and inputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from latentdiff.errors import CheckpointError, ConfigError, InputError
from latentdiff.models.ldm_bert import LM_HEAD_KEYS, LDMBert, LDMBertConfig, LDMBertTextEncoder
from latentdiff.models.text_encoder import TextEncoder, TextEncoderConfig
from latentdiff.registry import COMPONENTS
from tests._support.hub_cache import make_hub_cache
from tests._support.ldm_bert import TINY, VOCAB, reference_model, write_bert_tokenizer
from tests._support.parity import assert_parity

PROMPTS = ["A painting of a squirrel eating a burger", "", "the RED cats sat on the mat, zebra!",
           "the cat " * 50]  # the last one: 100 words + [CLS] [SEP], truncated to 77


def reference_out(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids)[0]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A folder laid out like CompVis/ldm-text2im-large-256's bert/ and tokenizer/, written by diffusers."""
    root = tmp_path_factory.mktemp("ldm_text2im")
    reference_model().save_pretrained(root / "bert")
    write_bert_tokenizer(root / "tokenizer")
    return root


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, len(VOCAB), (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- the model ------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [77, 9])
def test_parity_with_diffusers_on_same_weights(length):
    ref = reference_model()
    ours = LDMBert.from_state_dict(LDMBertConfig(**TINY), ref.state_dict())
    ids = random_ids(3, length)
    with torch.no_grad():
        out = ours(ids)
    assert out.shape == (3, length, TINY["d_model"])
    assert_parity(out, reference_out(ref, ids))
    assert not any(k.startswith("to_logits") for k in ours.state_dict())  # the unused LM head is not kept


def test_diffusers_folder_loads_in_ours_and_ours_in_diffusers(repo, tmp_path):
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

    ids = random_ids(2, 77)
    ref = LDMBertModel.from_pretrained(repo / "bert").eval()
    ours = LDMBert.from_pretrained(repo, subfolder="bert")
    assert ours.config == LDMBertConfig(**TINY)
    with torch.no_grad():
        out = ours(ids)
    assert_parity(out, reference_out(ref, ids))

    ours.save_pretrained(tmp_path / "bert")
    assert (tmp_path / "bert" / "model.safetensors").is_file()
    back, info = LDMBertModel.from_pretrained(tmp_path / "bert", output_loading_info=True)
    assert sorted(info["missing_keys"]) == sorted(LM_HEAD_KEYS)  # only the dropped, unused LM head
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    for key in TINY:
        assert getattr(back.config, key) == TINY[key]
    assert_parity(reference_out(back.eval(), ids), out)
    again = LDMBert.from_pretrained(tmp_path / "bert")  # and our own folder back in ours
    with torch.no_grad():
        assert torch.equal(again(ids), out)


def test_pickle_only_folder_loads(repo, tmp_path):
    """Folders saved before safetensors hold pytorch_model.bin; it loads (weights-only) with the same result."""
    from safetensors.torch import load_file

    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text((repo / "bert" / "config.json").read_text())
    torch.save(load_file(repo / "bert" / "model.safetensors"), folder / "pytorch_model.bin")
    ids = random_ids(2, 20)
    with torch.no_grad():
        assert torch.equal(LDMBert.from_pretrained(folder)(ids), LDMBert.from_pretrained(repo / "bert")(ids))


def test_dtype_follows_the_load_option(repo):
    ours = LDMBert.from_pretrained(repo, subfolder="bert", torch_dtype=torch.bfloat16)
    with torch.no_grad():
        out = ours(random_ids(1, 5))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_dropout_acts_in_training_only():
    ours = LDMBert.from_state_dict(LDMBertConfig(**TINY), reference_model().state_dict())
    ids = random_ids(2, 10)
    with torch.no_grad():
        evaluated = ours(ids)
        trained = ours.train()(ids)
        ours.eval()
        assert torch.equal(ours(ids), evaluated)
    assert not torch.allclose(trained, evaluated)
    no_dropout = LDMBert.from_state_dict(LDMBertConfig(**TINY, dropout=0.0), reference_model().state_dict())
    with torch.no_grad():
        assert torch.equal(no_dropout.train()(ids), evaluated)


def test_registry_builds_and_runs_the_model():
    model = COMPONENTS.create("ldm_bert", LDMBertConfig(**TINY))
    assert isinstance(model, LDMBert) and model.registry_name == "ldm_bert"
    assert model(random_ids(1, 4)).shape == (1, 4, TINY["d_model"])
    assert COMPONENTS.get("ldm_bert_text_encoder") is LDMBertTextEncoder


# ---- config.json ---------------------------------------------------------------------------
def test_file_config_round_trip_and_released_defaults(repo):
    data = json.loads((repo / "bert" / "config.json").read_text())
    config = LDMBert.from_file_config(data)
    model = LDMBert(config)
    assert LDMBert.from_file_config(model.to_file_config()) == config
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig as RefConfig

    ref = RefConfig()  # diffusers' defaults are the released model's; so are ours
    ours = LDMBertConfig()
    for key in ("vocab_size", "max_position_embeddings", "d_model", "encoder_layers", "encoder_ffn_dim",
                "encoder_attention_heads", "head_dim", "dropout", "activation_dropout", "pad_token_id"):
        assert getattr(ours, key) == getattr(ref, key), key
    assert ours.activation == ref.activation_function


@pytest.mark.parametrize("change, named", [
    ({"hidden_act": "gelu"}, "hidden_act"),                      # an unknown key
    ({"scale_embedding": True}, "scale_embedding"),              # a key we accept only at its implemented value
    ({"encoder_layerdrop": 0.1}, "encoder_layerdrop"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"model_type": "bart"}, "model_type"),
    ({"activation_function": "relu"}, "activation_function"),
    ({"num_hidden_layers": 3}, "num_hidden_layers"),
    ({"d_model": "32"}, "d_model"),
])
def test_bad_config_raises_config_error_naming_the_key(repo, change, named):
    data = json.loads((repo / "bert" / "config.json").read_text()) | change
    with pytest.raises(ConfigError, match=named):
        LDMBert.from_file_config(data, source="bert/config.json")


def test_machinery_keys_are_accepted():
    data = {"architectures": ["LDMBertModel"], "torch_dtype": "float16", "transformers_version": "4.21.0",
            "use_cache": True, "init_std": 0.02, "bos_token_id": 0, "eos_token_id": 2, "_name_or_path": "x",
            "num_hidden_layers": 32, "scale_embedding": False}
    assert LDMBert.from_file_config(data) == LDMBertConfig()


# ---- checkpoints -----------------------------------------------------------------------------
@pytest.mark.parametrize("edit, named", [
    ("wrong_shape", r"wrong shapes.*model\.layers\.1\.fc1\.weight: expected \(64, 32\), found \(65, 32\)"),
    ("missing", r"missing keys.*model\.layers\.1\.fc1\.weight"),
    ("unexpected", r"unexpected keys.*model\.layers\.2\.fc1\.weight"),
    ("lm_head_shape", r"to_logits\.weight: expected \(25, 32\), found \(26, 32\)"),
])
def test_bad_checkpoint_raises_checkpoint_error(edit, named):
    state = dict(reference_model().state_dict())
    key = "model.layers.1.fc1.weight"
    if edit == "wrong_shape":
        state[key] = torch.zeros(65, 32)
    elif edit == "missing":
        del state[key]
    elif edit == "unexpected":
        state["model.layers.2.fc1.weight"] = state[key]
    else:
        state["to_logits.weight"] = torch.zeros(len(VOCAB) + 1, 32)
    with pytest.raises(CheckpointError, match=named):
        LDMBert.from_state_dict(LDMBertConfig(**TINY), state, source="bert")


def test_folder_without_weights_or_config(repo, tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text((repo / "bert" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights"):
        LDMBert.from_pretrained(tmp_path / "bert")
    with pytest.raises(CheckpointError, match="config.json"):
        LDMBert.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad", [torch.zeros(5, dtype=torch.long), torch.zeros(1, 5), torch.zeros(1, 78).long(),
                                 torch.zeros(1, 0).long(), [[1, 2]]])
def test_bad_input_ids_raise_input_error(bad):
    with pytest.raises(InputError, match="input_ids"):
        LDMBert(LDMBertConfig(**TINY))(bad)


# ---- the text-encoder wrapper ---------------------------------------------------------------
class Capture:
    """Records what diffusers' pipeline gives its bert and gets back."""

    def __init__(self, module):
        self.ids: list[torch.Tensor] = []
        self.out: list[torch.Tensor] = []
        module.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        self.ids.append(args[0].clone())
        self.out.append(output[0].clone())


def diffusers_pipeline_embeddings(repo: Path, prompts: list[str]):
    """Run diffusers' LDMTextToImagePipeline (1 step, tiny UNet and VQ autoencoder) and record its bert calls."""
    from diffusers import DDIMScheduler, LDMTextToImagePipeline, UNet2DConditionModel, VQModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel
    from transformers import BertTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TINY["d_model"],
                                attention_head_dim=8, norm_num_groups=8)
    vqvae = VQModel(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), norm_num_groups=8,
                    down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    bert = LDMBertModel.from_pretrained(repo / "bert").eval()
    pipe = LDMTextToImagePipeline(vqvae=vqvae, bert=bert, tokenizer=BertTokenizer.from_pretrained(repo / "tokenizer"),
                                  unet=unet, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    capture = Capture(bert)
    pipe(prompts, height=32, width=32, num_inference_steps=1, guidance_scale=2.0, output_type="pt")
    return capture  # calls: [uncond (""), cond (prompts)]


def test_wrapper_matches_diffusers_pipeline_tokenization_and_embeddings(repo):
    encoder = LDMBertTextEncoder.from_pretrained(repo)
    assert isinstance(encoder, TextEncoder) and encoder.max_length == 77 and encoder.hidden_size == TINY["d_model"]
    capture = diffusers_pipeline_embeddings(repo, PROMPTS)
    (uncond_ids, cond_ids), (uncond_ref, cond_ref) = capture.ids, capture.out
    with pytest.warns(UserWarning, match="truncated to 77"):  # the long prompt, as diffusers silently does
        assert torch.equal(encoder.tokenize(PROMPTS), cond_ids)
    assert torch.equal(encoder.tokenize([""] * len(PROMPTS)), uncond_ids)
    assert (cond_ids[0, :4] == torch.tensor([2, 5, 6, 7])).all()  # [CLS] a painting of: real words, not [UNK]
    with torch.no_grad():
        cond = encoder(PROMPTS)
        uncond = encoder([""] * len(PROMPTS))
    assert cond.shape == (len(PROMPTS), 77, TINY["d_model"])
    assert_parity(cond, cond_ref)
    assert_parity(uncond, uncond_ref)


def test_wrapper_save_load_round_trip_and_diffusers_reads_it(repo, tmp_path):
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel
    from transformers import BertTokenizer

    encoder = LDMBertTextEncoder.from_pretrained(repo, config=TextEncoderConfig(max_length=40))
    encoder.save_pretrained(tmp_path / "bert", tokenizer_directory=tmp_path / "tokenizer")
    again = LDMBertTextEncoder.from_pretrained(tmp_path)
    assert again.max_length == 40  # the wrapper's settings travel beside config.json
    with torch.no_grad():
        expected = encoder(PROMPTS[:3])
        assert torch.equal(again(PROMPTS[:3]), expected)
    bert = LDMBertModel.from_pretrained(tmp_path / "bert").eval()
    tokenizer = BertTokenizer.from_pretrained(tmp_path / "tokenizer")
    ids = tokenizer(PROMPTS[:3], padding="max_length", max_length=40, truncation=True, return_tensors="pt").input_ids
    assert_parity(expected, reference_out(bert, ids))
    assert encoder.diffusers_entries() == {"bert": ["latent_diffusion", "LDMBertModel"],
                                           "tokenizer": ["transformers", "BertTokenizer"]}


def test_wrapper_loads_from_offline_hub_cache(repo, tmp_path, monkeypatch):
    make_hub_cache(tmp_path / "cache", "CompVis/ldm-text2im-large-256", repo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = LDMBertTextEncoder.from_pretrained("CompVis/ldm-text2im-large-256", cache_dir=tmp_path / "cache")
    local = LDMBertTextEncoder.from_pretrained(repo)
    with torch.no_grad():
        assert torch.equal(encoder(PROMPTS[:2]), local(PROMPTS[:2]))


def test_wrapper_errors(repo, tmp_path):
    encoder = LDMBertTextEncoder.from_pretrained(repo)
    with pytest.raises(ConfigError, match="layer"):
        LDMBertTextEncoder(encoder.model, encoder.tokenizer, TextEncoderConfig(max_length=77, layer="penultimate"))
    with pytest.raises(ConfigError, match="LDMBert"):
        LDMBertTextEncoder(torch.nn.Linear(2, 2), encoder.tokenizer)
    with pytest.raises(ConfigError, match="max_length"):
        LDMBertTextEncoder(encoder.model, encoder.tokenizer, TextEncoderConfig(max_length=100))
    with pytest.raises(InputError, match="attention_mask"):
        encoder.encode_ids(torch.zeros(1, 5).long(), attention_mask=torch.ones(1, 5))
    with pytest.raises(InputError, match="prompts"):
        encoder([3])
    (tmp_path / "bert").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "bert" / name).write_bytes((repo / "bert" / name).read_bytes())
    with pytest.raises(CheckpointError, match="tokenizer"):
        LDMBertTextEncoder.from_pretrained(tmp_path)
