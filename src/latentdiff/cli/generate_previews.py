"""`latentdiff generate` flags of the tiny autoencoder (TAESD): step previews and the fast final decode.

    latentdiff generate "a red circle" --preview-every 10                  # previews/NNNN-step-SSS.png
    latentdiff generate "a red circle" --fast-decode                       # the final decode by the tiny AE
    latentdiff generate "a cat" --model sd15/ --fast-decode --tiny-vae taesd/   # a model without a built-in one

--preview-every N decodes the denoised prediction every N steps with --preview-vae (default: the built-in tiny
autoencoder of a built-in model) into a PNG grid of the call's batch under --preview-dir, and prints its path.
Previews never change the images. --fast-decode is a VAE swap: it sets the run's `vae` setting to the tiny
autoencoder (--tiny-vae, else the built-in model's), so every PNG records it and --from reproduces it.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from .. import hub
from ..builtin import BUILTIN_TINY_AUTOENCODERS, builtin_path
from ..errors import UsageError
from .generate_settings import GenerateSettings


def add_preview_flags(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--preview-every", type=int, default=None, metavar="N",
                     help="decode the denoised prediction every N steps with a tiny autoencoder into preview PNGs")
    gen.add_argument("--preview-vae", default=None, metavar="PATH",
                     help="the tiny autoencoder of the previews: an AutoencoderTiny folder, a folder with "
                          "taesd_encoder/taesd_decoder files, or a Hub id (default: the built-in model's)")
    gen.add_argument("--preview-dir", default="previews", metavar="DIR",
                     help="where the preview PNGs go (default ./previews/)")
    gen.add_argument("--fast-decode", action="store_true",
                     help="decode (and, for img2img, encode) with the tiny autoencoder instead of the model's: "
                          "faster, slightly different images (recorded as the run's vae)")
    gen.add_argument("--tiny-vae", default=None, metavar="PATH",
                     help="the tiny autoencoder of --fast-decode (default: the built-in model's)")


def tiny_vae_of(path: str | None, model: str, *, flag: str) -> str:
    """The tiny autoencoder to use: `path` when given, else the built-in one of a built-in `model`."""
    if path is not None:
        from ..models.autoencoder_tiny import is_tiny_autoencoder  # torch: only when a path is given

        local = Path(path).expanduser()
        if local.exists():
            if not is_tiny_autoencoder(local):
                raise UsageError("not a tiny autoencoder", where=flag, expected="an AutoencoderTiny folder, or a "
                                 "folder with taesd_encoder / taesd_decoder files", found=path)
            return str(local.resolve())
        if builtin_path(path) is None and not hub.is_hub_id(path):
            raise UsageError("no such tiny autoencoder", where=flag, expected="a folder, a Hub id or a built-in name",
                             found=path)
        return path
    if model in BUILTIN_TINY_AUTOENCODERS:
        return BUILTIN_TINY_AUTOENCODERS[model]
    raise UsageError(f"{flag} needs a tiny autoencoder for this model", where=flag,
                     expected=f"{flag} PATH (an AutoencoderTiny folder or TAESD files), or a built-in model "
                              f"({', '.join(sorted(BUILTIN_TINY_AUTOENCODERS))})", found=model)


def settle_fast_decode(args: argparse.Namespace, settings: GenerateSettings) -> GenerateSettings:
    """--fast-decode: the run's `vae` becomes the tiny autoencoder (checked before the model loads)."""
    if args.tiny_vae is not None and not args.fast_decode:
        raise UsageError("--tiny-vae is the autoencoder of --fast-decode", where="--tiny-vae",
                         expected="--fast-decode with it (previews take --preview-vae)", found=args.tiny_vae)
    if not args.fast_decode:
        return settings
    if args.vae is not None:
        raise UsageError("--fast-decode replaces the VAE: give one or the other", where="--fast-decode",
                         expected="--fast-decode (with --tiny-vae) or --vae", found=f"--vae {args.vae}")
    return dataclasses.replace(settings, vae=tiny_vae_of(args.tiny_vae, settings.model, flag="--tiny-vae"))


def check_preview_flags(args: argparse.Namespace, model: str) -> str | None:
    """The preview autoencoder to load (None: no previews); a UsageError for a bad --preview-every."""
    every = args.preview_every
    if every is None:
        if args.preview_vae is not None:
            raise UsageError("--preview-vae needs --preview-every", where="--preview-vae",
                             expected="--preview-every N with it", found=args.preview_vae)
        return None
    if every < 1:
        raise UsageError("bad value for --preview-every", where="--preview-every", expected="an integer >= 1",
                         found=every)
    return tiny_vae_of(args.preview_vae, model, flag="--preview-vae")


class PreviewWriter:
    """Writes each preview (a grid of the call's batch) as DIR/CCCC-step-SSS.png and prints its path."""

    def __init__(self, vae: Any, *, every: int, folder: Path):
        from ..pipelines.previews import TinyPreview

        self.folder, self.call = folder, 0
        self.preview = TinyPreview(vae, every=every, on_preview=self.write)

    def write(self, i: int, images: list[Any]) -> None:
        from ..utils.images import make_grid

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.call:04d}-step-{i + 1:03d}.png"
        make_grid(images).save(path)
        print(f"latentdiff: preview {path}", file=sys.stderr)


def make_preview(args: argparse.Namespace, settings: GenerateSettings, pipe: Any) -> PreviewWriter | None:
    """The preview writer of this run (None without --preview-every), its autoencoder on the pipeline's device."""
    source = check_preview_flags(args, settings.model)
    if source is None:
        return None
    from ..models.autoencoder_tiny import load_tiny_autoencoder

    vae = load_tiny_autoencoder(source, device=pipe.device)
    return PreviewWriter(vae, every=args.preview_every, folder=Path(args.preview_dir))
