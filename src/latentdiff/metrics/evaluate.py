"""The paper's metrics over image folders, pipelines and autoencoders: batched, with a progress bar.

Images go through the FID Inception network once per set; FID, KID, the Inception Score and
precision/recall are then functions of the features:

    from latentdiff.metrics.evaluate import folder_features, load_inception
    from latentdiff.metrics.fid import fid_from_features

    inception = load_inception()                       # FID weights: a local file, or downloaded once
    real = folder_features("data/val", inception=inception)
    fake = folder_features("samples/", inception=inception)
    print(fid_from_features(real.pool3, fake.pool3))

`pipeline_features` draws the images from a pipeline instead (image i from seed + i), and
`reconstruction_metrics` gives an autoencoder's rFID (FID of its reconstructions against the originals),
PSNR and SSIM, as the LDM paper's first-stage tables report them. `run_eval` is `latentdiff eval`.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import is_int
from ..errors import InputError
from ..utils.images import check_image_pixels
from .fid import FeatureStats, fid_from_features, frechet_distance, kernel_inception_distance
from .image import psnr, ssim
from .inception import InceptionV3
from .inception_score import inception_score
from .precision_recall import precision_recall

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
RANDOM_WEIGHTS = "random"   # load_inception's untrained network: tests and smoke runs only
Images = torch.Tensor | list[torch.Tensor]   # a (B, 3, H, W) batch, or (3, H, W) images of different sizes


@dataclass(frozen=True)
class InceptionFeatures:
    """What the FID Inception network says about a set of N images (CPU, float32).

    pool3: (N, 2048) features for FID, KID, precision/recall; logits: (N, 1008) without the classifier
    bias, for the Inception Score (see `InceptionV3.logits`).
    """

    pool3: torch.Tensor
    logits: torch.Tensor

    def stats(self) -> FeatureStats:
        return FeatureStats.from_features(self.pool3)


def load_inception(weights: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
                   cache_dir: str | os.PathLike | None = None) -> InceptionV3:
    """The FID Inception network on `device` (default: cuda if available). weights: a local .pth /
    .safetensors file or URL, None for the release (downloaded once), or "random" (untrained: tests only)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if weights is not None and str(weights) == RANDOM_WEIGHTS:
        model = InceptionV3(pretrained=False)
    else:
        model = InceptionV3.from_pretrained(weights, cache_dir=cache_dir)
    return model.to(device)


# ---- images from folders -------------------------------------------------------------------------
def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in `folder` (by extension), sorted by name; an InputError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("not a folder", where=str(folder), expected="a folder of images",
                         found="a file" if folder.exists() else "nothing at that path")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise InputError("no images in the folder", where=str(folder),
                         expected=f"files ending in {', '.join(IMAGE_EXTENSIONS)}")
    return files


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as RGB uint8 (3, H, W) (grey, palette and RGBA images converted, alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:     # reads the header only: the size is checked before decoding
            check_image_pixels(image.size, where=str(path))
            array = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read the image ({type(e).__name__}: {e})", where=str(path)) from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[Path]):
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return read_image(self.files[index])


def image_batches(files: Sequence[Path], *, batch_size: int, num_workers: int = 0) -> Iterator[Images]:
    """Decode `files` in batches (in `num_workers` processes): a stacked (B, 3, H, W) uint8 batch, or a
    list of (3, H, W) where the sizes differ."""
    _check_positive(batch_size, "batch_size")
    if not is_int(num_workers) or num_workers < 0:
        raise InputError("num_workers must be 0 (decode in this process) or more", where="num_workers",
                         expected=">= 0", found=num_workers)
    loader = torch.utils.data.DataLoader(_ImageFiles(files), batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=list)
    for images in loader:
        same = all(image.shape == images[0].shape for image in images)
        yield torch.stack(images) if same else images


# ---- features ---------------------------------------------------------------------------------------
@torch.inference_mode()
def extract_features(batches: Iterable[Images], *, inception: InceptionV3, total: int | None = None,
                     desc: str = "inception", progress: bool = True) -> InceptionFeatures:
    """Run `inception` (on its device) over batches of images, uint8 in [0, 255] or floats in [0, 1]."""
    device = inception.fc.weight.device
    pool3, logits = [], []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for images in batches:
            features = inception(_as_batch(images, inception).to(device))
            pool3.append(features.float().cpu())
            logits.append(inception.logits(features).float().cpu())
            bar.update(features.shape[0])
    if not pool3:
        raise InputError("no images to evaluate", where="extract_features(batches)", expected="at least one batch")
    return InceptionFeatures(torch.cat(pool3), torch.cat(logits))


def folder_features(folder: str | os.PathLike, *, inception: InceptionV3, batch_size: int = 50,
                    num_workers: int = 0, progress: bool = True) -> InceptionFeatures:
    """Inception features of every image in `folder` (see `list_images`)."""
    files = list_images(folder)
    return extract_features(image_batches(files, batch_size=batch_size, num_workers=num_workers),
                            inception=inception, total=len(files), desc=Path(folder).name or str(folder),
                            progress=progress)


def pipeline_images(pipeline: Callable[..., Any], *, num_images: int | None = None, batch_size: int = 8,
                    seed: int = 0, prompts: Sequence[str] | None = None,
                    inputs: Callable[[range], dict[str, Any]] | None = None,
                    **call_options: Any) -> Iterator[torch.Tensor]:
    """Generate `num_images` images in batches: (b, 3, H, W) in [0, 1] each; image i from seed + i.

    Each batch calls `pipeline(**inputs(indices), generator=[...], output_type="pt", progress=False,
    **call_options)`. inputs defaults to `{"prompt": [...]}` with `prompts` (cycled; num_images defaults to
    their number), else `{"batch_size": b}` (unconditional pipelines). Pass `inputs` for other conditions,
    e.g. `lambda idx: {"class_labels": [i % 1000 for i in idx]}`.
    """
    if prompts is not None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise InputError("no prompts", where="prompts", expected="at least one prompt")
        num_images = len(prompts) if num_images is None else num_images
    if num_images is None:
        raise InputError("how many images?", where="num_images", expected="a positive integer (or prompts)")
    _check_positive(num_images, "num_images")
    _check_positive(batch_size, "batch_size")
    if inputs is None:
        inputs = (lambda idx: {"prompt": [prompts[i % len(prompts)] for i in idx]}) if prompts is not None \
            else (lambda idx: {"batch_size": len(idx)})
    for start in range(0, num_images, batch_size):
        indices = range(start, min(start + batch_size, num_images))
        generators = [torch.Generator().manual_seed(seed + i) for i in indices]
        out = pipeline(**inputs(indices), generator=generators, output_type="pt", progress=False, **call_options)
        yield out.images


def pipeline_features(pipeline: Callable[..., Any], *, inception: InceptionV3, num_images: int | None = None,
                      batch_size: int = 8, seed: int = 0, prompts: Sequence[str] | None = None,
                      inputs: Callable[[range], dict[str, Any]] | None = None, progress: bool = True,
                      **call_options: Any) -> InceptionFeatures:
    """Inception features of images drawn from `pipeline` (arguments as `pipeline_images`)."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    total = num_images if num_images is not None else (None if prompts is None else len(prompts))
    batches = pipeline_images(pipeline, num_images=num_images, batch_size=batch_size, seed=seed, prompts=prompts,
                              inputs=inputs, **call_options)
    return extract_features(batches, inception=inception, total=total, desc="generated", progress=progress)


def compute_fid(real: InceptionFeatures | FeatureStats, fake: InceptionFeatures | FeatureStats) -> float:
    """FID of two sets, each given by its features or by its statistics (e.g. `FeatureStats.load(npz)`).

    Two feature sets go through `fid_from_features` (fast and exact for sets smaller than 2048 images)."""
    if isinstance(real, InceptionFeatures) and isinstance(fake, InceptionFeatures):
        return fid_from_features(real.pool3, fake.pool3)
    a, b = (x.stats() if isinstance(x, InceptionFeatures) else x for x in (real, fake))
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


# ---- autoencoders and paired images ---------------------------------------------------------------
@torch.inference_mode()
def reconstruction_metrics(autoencoder: Callable[[torch.Tensor], torch.Tensor], folder: str | os.PathLike, *,
                           inception: InceptionV3, batch_size: int = 16, num_workers: int = 0,
                           progress: bool = True) -> dict[str, float]:
    """rFID, PSNR and SSIM of an autoencoder's reconstructions of the images in `folder` (all one size).

    autoencoder: images (B, 3, H, W) in [-1, 1] -> reconstructions, e.g. a latentdiff AutoencoderKL
    (posterior mode) or VQModel. Reconstructions are clipped and rounded to 8 bits, as if saved as PNGs;
    PSNR (dB) and SSIM are means over the images in [0, 1]. -> {"rfid", "psnr", "ssim", "num_images"}
    """
    files = list_images(folder)
    weight = next(iter(autoencoder.parameters()), None) if isinstance(autoencoder, torch.nn.Module) else None
    device, dtype = (weight.device, weight.dtype) if weight is not None else (torch.device("cpu"), torch.float32)
    pool_real, pool_fake, psnrs, ssims = [], [], [], []
    batches = image_batches(files, batch_size=batch_size, num_workers=num_workers)
    for images in tqdm(batches, total=-(-len(files) // batch_size), desc="reconstructions", disable=not progress):
        if isinstance(images, list):
            raise InputError("reconstruction metrics need images of one size", where=str(folder),
                             expected="one H x W", found=sorted({tuple(x.shape[-2:]) for x in images}))
        x = images.to(device=device, dtype=dtype) / 127.5 - 1
        recon = ((autoencoder(x).float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        pool_real.append(inception(images.to(inception.fc.weight.device)).cpu())
        pool_fake.append(inception(recon.to(inception.fc.weight.device)).cpu())
        a, b = images.double() / 255, recon.double() / 255
        psnrs.append(psnr(a, b))
        ssims.append(ssim(a, b))
    return {"rfid": fid_from_features(torch.cat(pool_real), torch.cat(pool_fake)),
            "psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean()),
            "num_images": len(files)}


def paired_files(dir_a: str | os.PathLike, dir_b: str | os.PathLike) -> list[tuple[Path, Path]]:
    """Images of two folders paired by file name without extension (a.png with a.jpg); every name must pair."""
    a = {p.stem: p for p in list_images(dir_a)}
    b = {p.stem: p for p in list_images(dir_b)}
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise InputError("the two folders do not hold the same image names", where=f"{dir_a} and {dir_b}",
                         expected="one image per name in each folder",
                         found=f"only in the first: {only_a[:5]}; only in the second: {only_b[:5]}")
    return [(a[name], b[name]) for name in sorted(a)]


def paired_metrics(dir_a: str | os.PathLike, dir_b: str | os.PathLike, *,
                   progress: bool = True) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM over images paired by name, in [0, 1]. -> {"psnr", "ssim", "num_images"}"""
    pairs = paired_files(dir_a, dir_b)
    psnrs, ssims = [], []
    for path_a, path_b in tqdm(pairs, desc="pairs", unit="img", disable=not progress):
        a, b = read_image(path_a)[None].double() / 255, read_image(path_b)[None].double() / 255
        if a.shape != b.shape:
            raise InputError("paired images differ in size", where=f"{path_a} and {path_b}",
                             expected="the same H x W", found=f"{tuple(a.shape[-2:])} and {tuple(b.shape[-2:])}")
        psnrs.append(psnr(a, b))
        ssims.append(ssim(a, b))
    return {"psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean()),
            "num_images": len(pairs)}


# ---- the `latentdiff eval` command (its parser is in latentdiff.cli) ------------------------------------
def run_eval(args: argparse.Namespace) -> int:
    """Check every input, then compute one metric and print `name: value` lines (stdout)."""
    if args.metric in ("psnr", "ssim"):
        result = paired_metrics(args.dir_a, args.dir_b)
        _print({args.metric: result[args.metric], "num_images": result["num_images"]})
        return 0
    _check_positive(args.batch_size, "--batch-size")
    folders = [args.dir] if args.metric in ("is", "stats") else [args.real, args.fake]
    counts = [_count_source(folder, allow_stats=args.metric == "fid") for folder in folders]
    if args.metric == "stats" and not Path(args.output).parent.is_dir():
        raise InputError("the output folder does not exist", where=str(Path(args.output).parent))
    _check_sizes(args, counts)
    inception = load_inception(args.inception_weights, device=args.device)
    if args.inception_weights is not None and str(args.inception_weights) == RANDOM_WEIGHTS:
        print("latentdiff: warning: untrained Inception weights, the numbers mean nothing (for testing only)",
              file=sys.stderr)
    options = dict(inception=inception, batch_size=args.batch_size, num_workers=args.workers)
    if args.metric == "fid":
        sets = [FeatureStats.load(f) if n is None else folder_features(f, **options)
                for f, n in zip(folders, counts, strict=True)]
        _print({"fid": compute_fid(*sets)})
        return 0
    features = [folder_features(folder, **options) for folder in folders]
    if args.metric == "stats":
        print(features[0].stats().save(args.output))
    elif args.metric == "is":
        score = inception_score(features[0].logits, splits=args.splits)
        _print({"inception_score": score.mean, "inception_score_std": score.std})
    elif args.metric == "kid":
        kid = kernel_inception_distance(features[0].pool3, features[1].pool3, num_subsets=args.subsets,
                                        subset_size=args.subset_size)
        _print({"kid": kid.mean, "kid_std": kid.std})
    else:
        _print(precision_recall(features[0].pool3, features[1].pool3, k=args.k)._asdict())
    return 0


def _count_source(source: str, *, allow_stats: bool) -> int | None:
    """Images in a folder (checked readable as a folder), or None for an .npz statistics file."""
    if allow_stats and Path(source).suffix.lower() == ".npz":
        FeatureStats.load(source)   # fail now, not after the other set's features
        return None
    return len(list_images(source))


def _check_sizes(args: argparse.Namespace, counts: list[int | None]) -> None:
    """The set sizes each metric needs, checked before the network runs."""
    known = [n for n in counts if n is not None]
    if args.metric in ("fid", "stats") and any(n < 2 for n in known):
        raise InputError("a covariance needs at least two images per folder", where="REAL/FAKE",
                         expected=">= 2 images", found=known)
    if args.metric == "kid" and args.subset_size > min(known):
        raise InputError("KID subsets are larger than a folder", where="--subset-size",
                         expected=f"<= {min(known)} (the smaller folder)", found=args.subset_size)
    if args.metric == "is" and not 1 <= args.splits <= known[0]:
        raise InputError("more splits than images", where="--splits", expected=f"1 ... {known[0]}",
                         found=args.splits)
    if args.metric == "pr" and not 1 <= args.k < min(known):
        raise InputError("k must be smaller than the number of images in each folder", where="--k",
                         expected=f"1 ... {min(known) - 1}", found=args.k)


def _print(values: dict[str, float]) -> None:
    for name, value in values.items():
        print(f"{name}: {value:.8g}" if isinstance(value, float) else f"{name}: {value}")


# ---- helpers --------------------------------------------------------------------------------------------
def _as_batch(images: Images, inception: InceptionV3) -> torch.Tensor:
    """A list of differently sized images -> one batch, each resized to the network's input on its own
    (what the network's own resize does per image)."""
    if isinstance(images, torch.Tensor):
        return images
    if not inception.resize_input:
        raise InputError("images of different sizes need resize_input=True", where="InceptionV3.resize_input",
                         expected="one H x W per batch", found=sorted({tuple(x.shape[-2:]) for x in images}))
    return torch.cat([F.interpolate(x[None].float() / 255 if x.dtype == torch.uint8 else x[None].float(),
                                    size=(inception.input_size,) * 2, mode="bilinear", align_corners=False)
                      for x in images])


def _check_positive(value: Any, name: str) -> None:
    if not is_int(value) or value < 1:
        raise InputError(f"{name} must be a positive integer", where=name, expected=">= 1", found=value)
