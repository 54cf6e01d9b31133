"""LPIPS moved to `latentdiff.metrics.lpips` (a metric, used here as a loss) and its weight downloads to
`latentdiff.remote_weights`; this module keeps the old import path working."""
from __future__ import annotations

from ..metrics.lpips import LPIPS, LPIPS_VGG_V01, TORCHVISION_VGG16, LinearHead, VGG16Features
from ..remote_weights import RemoteFile, download_weights, read_state_dict

__all__ = ["LPIPS", "LPIPS_VGG_V01", "TORCHVISION_VGG16", "LinearHead", "RemoteFile", "VGG16Features",
           "download_weights", "read_state_dict"]
