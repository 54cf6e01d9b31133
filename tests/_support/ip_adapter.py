"""Tiny IP-Adapter files in the released layout (h94/IP-Adapter `ip-adapter_sd15` / `ip-adapter-plus_sd15`),
random weights, and a tiny transformers CLIPVisionModelWithProjection beside them as `image_encoder/`.

    root = write_tiny_ip_adapter(tmp / "ip", plus=False, cross_attention_layers=6, inner=[64, ...], context_dim=32)
    # root/models/ip-adapter_sd15.safetensors, root/models/image_encoder/{config.json, model.safetensors}

The key names are written out here from the released files (not from latentdiff's modules), so a test of
latentdiff's loader against diffusers' `load_ip_adapter` checks the layout itself.
"""
from __future__ import annotations

from pathlib import Path

import torch

VISION = dict(hidden_size=32, intermediate_size=37, projection_dim=24, num_hidden_layers=3, num_attention_heads=4,
              image_size=32, patch_size=8, hidden_act="gelu")
PLAIN_NAME, PLUS_NAME = "ip-adapter_sd15.safetensors", "ip-adapter-plus_sd15.safetensors"
PLUS_WIDTH, PLUS_HEADS, PLUS_QUERIES, PLUS_DEPTH = 48, 2, 16, 4   # diffusers builds 4 resampler layers always


def ip_adapter_state(*, plus: bool, inner: list[int], context_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The released keys with random values (layer norms too, so a test sees whether they are applied)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, mean: float = 0.0) -> torch.Tensor:
        return mean + 0.2 * torch.randn(*shape, generator=g)

    state: dict[str, torch.Tensor] = {}
    if plus:
        w, h, e = PLUS_WIDTH, PLUS_HEADS * 64, VISION["hidden_size"]
        state |= {"image_proj.latents": rand(1, PLUS_QUERIES, w), "image_proj.proj_in.weight": rand(w, e),
                  "image_proj.proj_in.bias": rand(w), "image_proj.proj_out.weight": rand(context_dim, w),
                  "image_proj.proj_out.bias": rand(context_dim),
                  "image_proj.norm_out.weight": rand(context_dim, mean=1),
                  "image_proj.norm_out.bias": rand(context_dim)}
        for i in range(PLUS_DEPTH):
            p = f"image_proj.layers.{i}."
            state |= {p + "0.norm1.weight": rand(w, mean=1), p + "0.norm1.bias": rand(w),
                      p + "0.norm2.weight": rand(w, mean=1), p + "0.norm2.bias": rand(w),
                      p + "0.to_q.weight": rand(h, w), p + "0.to_kv.weight": rand(2 * h, w),
                      p + "0.to_out.weight": rand(w, h), p + "1.0.weight": rand(w, mean=1), p + "1.0.bias": rand(w),
                      p + "1.1.weight": rand(4 * w, w), p + "1.3.weight": rand(w, 4 * w)}
    else:
        state |= {"image_proj.proj.weight": rand(4 * context_dim, VISION["projection_dim"]),
                  "image_proj.proj.bias": rand(4 * context_dim), "image_proj.norm.weight": rand(context_dim, mean=1),
                  "image_proj.norm.bias": rand(context_dim)}
    for i, width in enumerate(inner):   # the cross-attentions are the odd attention numbers
        state[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = rand(width, context_dim)
        state[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = rand(width, context_dim)
    return state


def write_tiny_image_encoder(folder: Path, *, seed: int = 0) -> Path:
    """A transformers CLIPVisionModelWithProjection folder (config.json + model.safetensors), random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    return folder


def write_tiny_ip_adapter(root: Path, *, plus: bool, inner: list[int], context_dim: int, seed: int = 0) -> Path:
    """h94/IP-Adapter's layout under `root`: models/<weights>.safetensors and models/image_encoder/."""
    from safetensors.torch import save_file

    models = Path(root) / "models"
    models.mkdir(parents=True, exist_ok=True)
    save_file(ip_adapter_state(plus=plus, inner=inner, context_dim=context_dim, seed=seed),
              str(models / (PLUS_NAME if plus else PLAIN_NAME)))
    if not (models / "image_encoder" / "config.json").is_file():
        write_tiny_image_encoder(models / "image_encoder")
    return Path(root)


# ---- what the IP-Adapter test modules share ------------------------------------------------------------------
def ip_setup(root: Path):
    """(root, our pipeline, inner widths): the tiny SD folder `root/sd` (diffusers-built) loaded by latentdiff, and
    both tiny IP-Adapter files under `root/ip/models` with the image encoder beside them."""
    from latentdiff import LatentDiffusionPipeline
    from latentdiff.models.ip_adapter import cross_attentions
    from tests._support.sd import tiny_diffusers_pipeline

    tiny_diffusers_pipeline(root).save_pretrained(root / "sd")
    pipe = LatentDiffusionPipeline.from_pretrained(root / "sd")
    inner = [layer.to_k.out_features for _, layer in cross_attentions(pipe.unet)]
    for plus in (False, True):
        write_tiny_ip_adapter(root / "ip", plus=plus, inner=inner, context_dim=32, seed=int(plus))
    return root, pipe, inner


def photo(seed: int = 0, size: tuple[int, int] = (40, 52)):
    """A random RGB PIL image (the image prompt)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def reference(root: Path, weight_name: str, *, scale: float = 0.6):
    """diffusers' StableDiffusionPipeline on `root/sd` with `load_ip_adapter` of `root/ip/models/<weight_name>`."""
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(root / "sd", safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(root / "ip"), subfolder="models", weight_name=weight_name)
    ref.set_ip_adapter_scale(scale)
    return ref


def fixed_latents(seed: int = 5, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
