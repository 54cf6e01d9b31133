"""Control hints made without model weights: Canny edges, binary (scribble / silhouette) masks, and the A1111
resize modes that bring a hint to the generation size. Depth maps, poses and the like come from the user as
images: their estimators are models, outside this package."""
from __future__ import annotations

from .hints import canny, threshold, to_array
from .resize import RESIZE_MODES, fit

__all__ = ["RESIZE_MODES", "canny", "fit", "threshold", "to_array"]
