"""Data sets that ship with latentdiff: `shapes`, the procedural captioned set the built-in model learns
from, and `shapes_checker`, the deterministic judge of images generated from its captions."""
from __future__ import annotations

from .shapes import (
                     COLORS,
                     PALETTE,
                     SHAPES,
                     WHERE,
                     Attributes,
                     ShapesDataset,
                     ShapeSpec,
                     caption,
                     parse_caption,
                     render,
                     sample_spec,
                     where_of,
                     write_imagefolder,
)
from .shapes_checker import CheckResult, Findings, analyze, check, compare, score

__all__ = ["COLORS", "PALETTE", "SHAPES", "WHERE", "Attributes", "ShapeSpec", "ShapesDataset", "caption",
           "parse_caption", "render", "sample_spec", "where_of", "write_imagefolder", "CheckResult", "Findings",
           "analyze", "check", "compare", "score"]
