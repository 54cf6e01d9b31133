"""Copies of the tiny SD folder with what the real Hub repos' folders hold beside the parts latentdiff runs.

    sd15 = hub_folder(tiny, tmp_path / "sd15", SD15_ENTRIES)     # stable-diffusion-v1-5/stable-diffusion-v1-5

The model_index.json entries are those the real repos ship (a safety checker, a feature extractor, an IP-Adapter
image encoder), and each listed side part gets its folder with its config only (no weights). The tokenizer's
tokenizer_config.json becomes the real repo's: its special tokens are `{"__type": "AddedToken", ...}` objects.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# stable-diffusion-v1-5/stable-diffusion-v1-5's model_index.json, beside the parts latentdiff runs
SD15_ENTRIES: dict[str, Any] = {"feature_extractor": ["transformers", "CLIPImageProcessor"],
                                "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
                                "requires_safety_checker": True}
# stabilityai/stable-diffusion-2-1 (and -base): a feature extractor, no safety checker
SD2_ENTRIES: dict[str, Any] = {"feature_extractor": ["transformers", "CLIPImageProcessor"],
                               "safety_checker": [None, None], "requires_safety_checker": False}
# an IP-Adapter image encoder saved with the pipeline (diffusers >= 0.22), which latentdiff does not use
IMAGE_ENCODER_ENTRIES: dict[str, Any] = {"image_encoder": ["transformers", "CLIPVisionModelWithProjection"]}

SIDE_FILES: dict[str, tuple[str, dict[str, Any]]] = {
    "feature_extractor": ("preprocessor_config.json", {
        "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 224}}),
    "safety_checker": ("config.json", {
        "_name_or_path": "CompVis/stable-diffusion-safety-checker", "architectures": ["StableDiffusionSafetyChecker"],
        "model_type": "clip", "projection_dim": 768, "text_config": {"hidden_size": 768},
        "vision_config": {"hidden_size": 1024, "patch_size": 14}}),
    "image_encoder": ("config.json", {
        "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model", "hidden_size": 1280,
        "projection_dim": 1024, "num_hidden_layers": 32, "patch_size": 14, "image_size": 224}),
}


# The real repo's tokenizer/tokenizer_config.json (stable-diffusion-v1-5): three special tokens as AddedToken objects.
def added_token(content: str) -> dict[str, Any]:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def real_tokenizer_config(model_max_length: int = 77) -> dict[str, Any]:
    return {"add_prefix_space": False, "bos_token": added_token("<|startoftext|>"), "do_lower_case": True,
            "eos_token": added_token("<|endoftext|>"), "errors": "replace", "model_max_length": model_max_length,
            "name_or_path": "openai/clip-vit-large-patch14", "pad_token": "<|endoftext|>",
            "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
            "unk_token": added_token("<|endoftext|>")}


def hub_folder(src: str | Path, dst: str | Path, entries: dict[str, Any], *, real_tokenizer: bool = True) -> Path:
    """A copy of the diffusers folder `src` at `dst`, its model_index.json updated with `entries` and a config-only
    side folder for each listed side part; `real_tokenizer`: the real repo's tokenizer_config.json too."""
    dst = Path(dst)
    shutil.copytree(src, dst)
    index = json.loads((dst / "model_index.json").read_text())
    index.update(entries)
    (dst / "model_index.json").write_text(json.dumps(index, indent=2))
    for key, value in entries.items():
        if isinstance(value, list) and value[0] is not None and key in SIDE_FILES:
            name, config = SIDE_FILES[key]
            (dst / key).mkdir(exist_ok=True)
            (dst / key / name).write_text(json.dumps(config, indent=2))
    if real_tokenizer:
        write_real_tokenizer(dst / "tokenizer")
    return dst


def write_real_tokenizer(folder: Path) -> Path:
    """Replace a tiny CLIP tokenizer folder by the files the real repo ships (vocab.json, merges.txt,
    special_tokens_map.json with token objects, tokenizer_config.json with "__type": "AddedToken" objects)."""
    from tests._support.tiny_clip import BOS, EOS, write_tiny_clip_tokenizer

    length = json.loads((folder / "tokenizer_config.json").read_text()).get("model_max_length", 77)
    shutil.rmtree(folder)
    write_tiny_clip_tokenizer(folder, model_max_length=length)
    plain = {k: v for k, v in added_token("").items() if k not in ("__type", "content")}
    special = {"bos_token": {"content": BOS, **plain}, "eos_token": {"content": EOS, **plain}, "pad_token": EOS,
               "unk_token": {"content": EOS, **plain}}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(real_tokenizer_config(length), indent=2))
    return folder
