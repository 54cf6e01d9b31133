"""Foreign checkpoint formats -> latentdiff (diffusers layout) and back, through key tables.

    from latentdiff.convert import read_single_file, write_single_file
    parts = read_single_file("sd-v1-5.ckpt")      # {"unet": (config, state), "vae": ..., "text_encoder": ...}

Modules: `keymap` (the engine), `unet_ldm` / `vae_ldm` / `text_ldm` (the tables of CompVis' layout),
`layout` (a whole file), `infer` (architecture from shapes), `sdxl_ldm` (what SDXL files add, and its
conventions), `original_config` (CompVis and generative-models YAMLs),
`single_file` (file I/O).
"""
from .infer import infer_configs, infer_layout
from .keymap import Drop, Keep, Merge, Nest, Rename, Reshape, Split, apply_keymap, invert
from .layout import FileLayout
from .original_config import SHIPPED_CONFIGS, load_original_config, original_config_to_configs, shipped_config_path
from .single_file import (
                          file_layout,
                          load_single_file,
                          read_single_file,
                          split_single_file,
                          to_single_file,
                          write_single_file,
)

__all__ = [
    "Drop", "Keep", "Merge", "Nest", "Rename", "Reshape", "Split", "apply_keymap", "invert",
    "FileLayout", "infer_configs", "infer_layout", "SHIPPED_CONFIGS", "load_original_config",
    "original_config_to_configs", "shipped_config_path", "file_layout", "load_single_file", "read_single_file",
    "split_single_file", "to_single_file", "write_single_file",
]
