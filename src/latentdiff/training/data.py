"""Training data: an image folder, its captions or classes, and a data loader that resumes exactly.

Two folder layouts (Hugging Face `imagefolder` conventions):

    captions:  root/metadata.jsonl  {"file_name": "0001.png", "text": "a red circle"}  one JSON object a line
    classes:   root/<class name>/*.png   (labels 0..K-1 in sorted class-name order)

or no labels at all (unconditional). Images are resized (short side), cropped to a square (center, or a
random crop) and flipped at random; the crop and the flip of sample i in epoch e are drawn from a
generator seeded by (seed, e, i), so they depend neither on the worker that loads the sample nor on
how many processes train, and a resumed run sees exactly the images the interrupted one would have seen.

`ResumableBatchSampler` deals global batches from a seeded permutation per epoch; process p of P takes
the p-th slice of each, so the union over processes is the one-process batch. Its position is a count of
batches consumed: resuming starts the count there (epoch = count // batches per epoch), no batch is loaded
and thrown away.
"""
from __future__ import annotations

import dataclasses
import json
import random
import warnings
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, InputError
from ..utils.images import check_image_pixels
from .config import DataConfig

MAX_LISTED = 20  # names shown in an error that lists files
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str | None = None
    label: int | None = None
    hint: Path | None = None         # the control image of ControlNet training (`hint_column`)


@dataclasses.dataclass(frozen=True)
class ImageIndex:
    """The images of a folder with their caption or class label. labels: "captions", "classes" or "none"."""

    root: Path
    records: tuple[ImageRecord, ...]
    labels: str
    class_names: tuple[str, ...] = ()

    def subset(self, positions: Sequence[int]) -> ImageIndex:
        return dataclasses.replace(self, records=tuple(self.records[i] for i in positions))


# ---- scanning a folder ------------------------------------------------------------------------------
def scan_image_folder(config: DataConfig, path: str | Path | None = None, *,
                      hint_column: str | None = None) -> ImageIndex:
    """List the images of `path` (default config.path) with their labels; every problem is a clear error.
    hint_column: the metadata column naming each image's control image (ControlNet training: captions needed)."""
    root = Path(path if path is not None else config.path)
    if not root.is_dir():
        raise InputError("the data folder does not exist", where=str(root), expected="a folder of images")
    extensions = tuple(e.lower() for e in config.extensions)
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        found = sorted(p.name for p in root.iterdir())[:MAX_LISTED]
        raise InputError("no images in the data folder", where=str(root),
                         expected=f"files ending in {', '.join(extensions)}", found=found or "an empty folder")
    metadata = root / config.metadata_file
    labels = config.labels
    if labels == "auto":
        nested = [p for p in files if len(p.relative_to(root).parts) > 1]
        labels = "captions" if metadata.is_file() else "classes" if nested and len(nested) == len(files) else "none"
    if hint_column is not None and labels != "captions":
        raise ConfigError("control images are named in the captions' metadata file", where="data.labels",
                          expected=f"captions ({config.metadata_file} with a {hint_column!r} column)", found=labels)
    if labels == "captions":
        return _with_captions(root, files, metadata, config, hint_column)
    if labels == "classes":
        return _with_classes(root, files)
    return ImageIndex(root, tuple(ImageRecord(p) for p in files), "none")


def _with_captions(root: Path, files: list[Path], metadata: Path, config: DataConfig,
                   hint_column: str | None = None) -> ImageIndex:
    if not metadata.is_file():
        raise InputError("captions need a metadata file", where=str(metadata),
                         expected=f'one JSON object a line: {{"{config.image_column}": ..., '
                                  f'"{config.caption_column}": ...}}', found="no such file")
    captions: dict[str, str | None] = {}
    hints: dict[str, str] = {}
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"metadata line is not JSON ({e.msg})", where=f"{metadata}:{number}") from None
        name = row.get(config.image_column) if isinstance(row, dict) else None
        if not isinstance(name, str):
            raise InputError(f"metadata line has no {config.image_column!r}", where=f"{metadata}:{number}",
                             expected=f'a string "{config.image_column}"', found=line[:120])
        if name in captions:
            raise InputError("an image is listed twice in the metadata file", where=f"{metadata}:{number}",
                             found=name)
        caption = row.get(config.caption_column)
        captions[name] = caption if isinstance(caption, str) else None
        if hint_column is not None:
            hint = row.get(hint_column)
            if not isinstance(hint, str) or not (root / hint).is_file():
                raise InputError(f"metadata line names no control image in {hint_column!r}",
                                 where=f"{metadata}:{number}", expected="the path of an image under the data folder",
                                 found=repr(hint))
            hints[name] = hint
    # control images live in the folder too: they are not training images
    hint_files = set(hints.values())
    present = {p.relative_to(root).as_posix(): p for p in files if p.relative_to(root).as_posix() not in hint_files}
    unknown = sorted(set(captions) - set(present))
    if unknown:
        raise InputError(f"{len(unknown)} metadata entries name no image in the folder", where=str(metadata),
                         expected="every file_name an image under the data folder", found=unknown[:MAX_LISTED])
    missing = sorted(name for name in present if captions.get(name) is None)
    records = []
    if missing:
        policy = config.on_missing_caption
        if policy == "error":
            raise InputError(f"{len(missing)} image(s) have no caption", where=str(metadata),
                             expected=f'a "{config.caption_column}" string per image '
                                      "(or data.on_missing_caption: skip / empty)", found=missing[:MAX_LISTED])
        action = "dropped" if policy == "skip" else 'captioned ""'
        warnings.warn(f"{len(missing)} image(s) without a caption {action}: {missing[:MAX_LISTED]}", UserWarning,
                      stacklevel=3)
    for name, path in present.items():
        caption = captions.get(name)
        if caption is None and config.on_missing_caption == "skip":
            continue
        records.append(ImageRecord(path, caption=caption if caption is not None else "",
                                   hint=root / hints[name] if name in hints else None))
    if not records:
        raise InputError("no captioned images left", where=str(metadata))
    return ImageIndex(root, tuple(records), "captions")


def _with_classes(root: Path, files: list[Path]) -> ImageIndex:
    loose = [p.name for p in files if len(p.relative_to(root).parts) == 1]
    if loose:
        raise InputError("class-folder data has images outside any class folder", where=str(root),
                         expected="root/<class>/<image>", found=loose[:MAX_LISTED])
    class_names = tuple(sorted({p.relative_to(root).parts[0] for p in files}))
    label = {name: i for i, name in enumerate(class_names)}
    records = tuple(ImageRecord(p, label=label[p.relative_to(root).parts[0]]) for p in files)
    return ImageIndex(root, records, "classes", class_names)


def split_validation(index: ImageIndex, count: int, *, seed: int) -> tuple[ImageIndex, ImageIndex]:
    """Hold `count` images out, chosen by a seeded permutation; both parts keep the folder order."""
    n = len(index.records)
    if count >= n:
        raise ConfigError("validation_split leaves no training images", where="data.validation_split",
                          expected=f"< {n} (the images found)", found=count)
    held = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()[:count])
    return (index.subset([i for i in range(n) if i not in held]), index.subset(sorted(held)))


# ---- images -> tensors -------------------------------------------------------------------------------
class ImageDataset(torch.utils.data.Dataset):
    """Item (i, epoch) -> {"pixel_values": (3, R, R) in [-1, 1], "caption", "class_label", "index", "flip",
    "skipped"}; the crop and flip come from a generator seeded by (seed, epoch, i).

    An unreadable image is replaced by the next readable one (and counted in "skipped", with a warning)
    when on_corrupt == "skip"; else it is an InputError naming the file. `load_pixels=False` returns the
    labels and the flip only (for cached latents).
    """

    def __init__(self, index: ImageIndex, *, resolution: int, center_crop: bool = True, random_flip: bool = True,
                 seed: int = 0, on_corrupt: str = "skip", load_pixels: bool = True):
        self.index, self.resolution, self.center_crop = index, resolution, center_crop
        self.random_flip, self.seed, self.on_corrupt, self.load_pixels = random_flip, seed, on_corrupt, load_pixels

    def __len__(self) -> int:
        return len(self.index.records)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = np.random.default_rng([self.seed, epoch, i])
        crop = None if self.center_crop else (float(rng.random()), float(rng.random()))
        flip = bool(self.random_flip and rng.random() < 0.5)
        record = self.index.records[i]
        item: dict[str, Any] = {"caption": record.caption or "",
                                "class_label": -1 if record.label is None else record.label,
                                "index": i, "flip": flip, "skipped": 0}
        if self.load_pixels:
            item["pixel_values"], item["index"], item["skipped"] = self.load_readable(i, crop=crop, flip=flip)
            record = self.index.records[item["index"]]
            item["caption"] = record.caption or ""
            item["class_label"] = -1 if record.label is None else record.label
        if record.hint is not None:   # cropped and flipped as its image; [0, 1], as a ControlNet takes it
            item["control_image"] = self.load(item["index"], crop=crop, flip=flip, hint=True).add_(1.0).mul_(0.5)
        return item

    def load(self, i: int, *, flip: bool = False, crop: tuple[float, float] | None = None,
             hint: bool = False) -> torch.Tensor:
        """Image i (its control image with hint=True) as (3, R, R) in [-1, 1]; an unreadable file: InputError."""
        record = self.index.records[i]
        path = record.hint if hint and record.hint is not None else record.path
        try:
            with Image.open(path) as image:
                check_image_pixels(image.size, where=str(path))
                image = image.convert("RGB")
        except UNREADABLE as e:
            raise InputError(f"unreadable image ({type(e).__name__}: {e})", where=str(path),
                             expected="a readable image file (or data.on_corrupt: skip)") from None
        return to_tensor(crop_square(image, self.resolution, crop=crop, flip=flip))

    def load_readable(self, i: int, *, crop: tuple[float, float] | None = None,
                      flip: bool = False) -> tuple[torch.Tensor, int, int]:
        """-> (image, index of the image loaded, unreadable images skipped on the way), by the on_corrupt policy."""
        n = len(self)
        for skipped in range(n):
            j = (i + skipped) % n
            try:
                return self.load(j, crop=crop, flip=flip), j, skipped
            except InputError as e:
                if self.on_corrupt == "error":
                    raise
                warnings.warn(f"skipping an unreadable image: {e}", UserWarning, stacklevel=2)
        raise InputError("no image of the data set is readable", where=str(self.index.root))


def crop_square(image: Image.Image, size: int, *, crop: tuple[float, float] | None = None,
                flip: bool = False) -> Image.Image:
    """Resize the short side to `size` (bicubic, as LDM), crop a size x size square (centered, or at the
    relative offsets `crop` in [0, 1)), and flip horizontally if `flip`."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if crop is None:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    else:
        left, top = int(crop[0] * (new_w - size + 1)), int(crop[1] * (new_h - size + 1))
    image = image.crop((left, top, left + size, top + size))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB (H, W) -> (3, H, W) float32 in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {"caption": [it["caption"] for it in items],
                             "class_label": torch.tensor([it["class_label"] for it in items], dtype=torch.long),
                             "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
                             "flip": torch.tensor([it["flip"] for it in items], dtype=torch.bool),
                             "skipped": sum(it["skipped"] for it in items)}
    for key in ("pixel_values", "control_image"):
        if key in items[0]:
            batch[key] = torch.stack([it[key] for it in items])
    return batch


# ---- the resumable loader ------------------------------------------------------------------------------
def mix_seed(*parts: int) -> int:
    """One 64-bit seed from several non-negative integers (numpy's SeedSequence: no two tuples collide in
    practice, unlike sums and products of them)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


def local_batch_size(global_batch: int, num_processes: int) -> int:
    """The per-process batch; a global batch that does not split evenly is an error, never a rounding."""
    if global_batch % num_processes:
        raise ConfigError("the batch size must split evenly over the processes", where="train.batch_size",
                          expected=f"a multiple of {num_processes} (the number of processes)", found=global_batch)
    return global_batch // num_processes


class ResumableBatchSampler:
    """Yields, forever, this process's share [(index, epoch), ...] of global batch s = start, start + 1, ...

    Epoch e is a permutation of the n items seeded by (seed, e) (or the folder order when not shuffled),
    cut into n // global_batch batches (the incomplete tail is dropped, so every step has the same batch).
    """

    def __init__(self, num_items: int, *, global_batch: int, num_processes: int = 1, process_index: int = 0,
                 seed: int = 0, shuffle: bool = True, start: int = 0):
        self.local = local_batch_size(global_batch, num_processes)
        if num_items < global_batch:
            raise ConfigError("the data set is smaller than one batch", where="train.batch_size",
                              expected=f"<= {num_items} (the training images)", found=global_batch)
        self.num_items, self.global_batch, self.process_index = num_items, global_batch, process_index
        self.seed, self.shuffle, self.start = seed, shuffle, start
        self.batches_per_epoch = num_items // global_batch

    def position(self, batches: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) after `batches` global batches."""
        return divmod(batches, self.batches_per_epoch)

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        return torch.randperm(self.num_items, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch))
                              ).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset = self.position(self.start)
        while True:
            order = self._order(epoch)
            for b in range(offset, self.batches_per_epoch):
                first = b * self.global_batch + self.process_index * self.local
                yield [(i, epoch) for i in order[first:first + self.local]]
            epoch, offset = epoch + 1, 0


def seed_worker(worker_id: int, *, seed: int, process_index: int) -> None:
    """Seed the global RNGs of a loader worker from (seed, process, worker), for any user-added randomness."""
    s = mix_seed(seed, process_index, worker_id) % 2**32
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def make_loader(dataset: ImageDataset, sampler: ResumableBatchSampler, *, num_workers: int,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over `sampler`; the loader is not handed to accelerate (the sampler already shards)."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory,
        worker_init_fn=partial(seed_worker, seed=sampler.seed, process_index=sampler.process_index),
        generator=torch.Generator().manual_seed(sampler.seed), prefetch_factor=2 if num_workers else None)


def build_datasets(config: DataConfig, *, seed: int, load_pixels: bool = True, hint_column: str | None = None
                   ) -> tuple[ImageDataset, ImageDataset | None]:
    """The training set and the validation set (None without one) the data section describes; with
    hint_column, each item also has its "control_image" (3, R, R) in [0, 1]."""
    index = scan_image_folder(config, hint_column=hint_column)
    validation = None
    if config.validation_path is not None:
        validation = scan_image_folder(config, config.validation_path, hint_column=hint_column)
    elif config.validation_split:
        index, validation = split_validation(index, config.validation_split, seed=seed)
    dataset = partial(ImageDataset, resolution=config.resolution, seed=seed, on_corrupt=config.on_corrupt)
    train = dataset(index, center_crop=config.center_crop, random_flip=config.random_flip, load_pixels=load_pixels)
    valid = dataset(validation, center_crop=True, random_flip=False) if validation else None
    return train, valid


def fixed_batches(dataset: ImageDataset, count: int, batch_size: int) -> Iterator[dict[str, Any]]:
    """The first `count` images of `dataset` (epoch 0's crop and flip) in batches, for validation and statistics."""
    count = min(count, len(dataset))
    for start in range(0, count, batch_size):
        yield collate([dataset[(i, 0)] for i in range(start, min(start + batch_size, count))])
