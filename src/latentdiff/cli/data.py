"""`latentdiff data shapes DIR -n 512`: the data sets the tiny training examples need (docs/training.md), made by
the installed package rather than a repository script (latentdiff.data.quick_shapes)."""
from __future__ import annotations

import argparse

from ..limits import MAX_SHAPES_IMAGES, MAX_SHAPES_SIZE, MIN_SHAPES_SIZE


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="make the data sets of the tiny training examples",
                          description="Make a data set the training examples use (docs/training.md).")
    kinds = data.add_subparsers(dest="data_kind", required=True)
    shapes = kinds.add_parser(
        "shapes", help="one colored shape on a plain background, captioned or in class folders",
        description="Write N images of one colored shape (circle, square, triangle) on a plain background, with "
                    "captions (metadata.jsonl: 'a red circle on the left, blue background') or one folder per "
                    "shape. Deterministic from --seed; the same bytes on every run.")
    shapes.add_argument("folder", metavar="DIR", help="the folder to write (new or empty, unless --overwrite)")
    shapes.add_argument("-n", "--count", type=int, default=512,
                        help=f"how many images (default 512, at most {MAX_SHAPES_IMAGES:,})")
    shapes.add_argument("--size", type=int, default=32,
                        help=f"image side in pixels (default 32, {MIN_SHAPES_SIZE} to {MAX_SHAPES_SIZE})")
    shapes.add_argument("--labels", choices=("text", "classes"), default="text",
                        help="text: captions in metadata.jsonl (default); classes: one folder per shape")
    shapes.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    shapes.add_argument("--write-tokenizer", default=None, metavar="DIR",
                        help="also write a word-level BERT vocabulary of the caption words (for LDM-BERT)")
    shapes.add_argument("--overwrite", action="store_true",
                        help="replace the data set (and tokenizer) already in DIR; never deletes other files")
    shapes.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.quick_shapes import check_tokenizer_folder, write_shapes_folder, write_word_tokenizer

    if args.write_tokenizer:   # both folders are checked before either is written
        check_tokenizer_folder(Path(args.write_tokenizer), overwrite=args.overwrite)
    print(write_shapes_folder(args.folder, args.count, size=args.size, seed=args.seed, labels=args.labels,
                              overwrite=args.overwrite, progress=not args.no_progress))
    if args.write_tokenizer:
        print(write_word_tokenizer(args.write_tokenizer, overwrite=args.overwrite))
    return 0
