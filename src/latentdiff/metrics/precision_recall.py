"""Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019): fidelity and coverage, separately.

Each set of features is taken as an estimate of its manifold: the union of balls around its samples, each
ball reaching to the sample's k-th nearest neighbour in the same set (k = 3 in the paper). Then

    precision = fraction of generated samples inside the real manifold   (are the images realistic?)
    recall    = fraction of real samples inside the generated manifold    (is the data covered?)

A point on a ball's boundary counts as inside. Distances are Euclidean, computed in blocks of `batch_size`
rows so that memory stays O(batch_size x N) rather than O(N^2). The paper measures in VGG-16 features;
latentdiff's `evaluate` uses the Inception pool3 features it already has (as FID), so numbers are comparable
between latentdiff runs, not with the paper's tables.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..errors import InputError
from .fid import feature_set

K_NEAREST = 3
BATCH_SIZE = 4096


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def knn_radii(features: torch.Tensor, *, k: int = K_NEAREST, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """Distance from each sample to its k-th nearest *other* sample of the set. (N, D) -> (N,)"""
    n = features.shape[0]
    if not 1 <= k < n:
        raise InputError("k must be at least 1 and smaller than the number of samples", where="k",
                         expected=f"1 <= k < {n}", found=k)
    radii = []
    for start in range(0, n, batch_size):
        block = torch.cdist(features[start:start + batch_size], features)      # (b, N)
        rows = torch.arange(block.shape[0], device=block.device)
        block[rows, rows + start] = float("inf")   # a sample is not its own neighbour
        radii.append(block.kthvalue(k, dim=1).values)
    return torch.cat(radii)


def inside_manifold(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, *,
                    batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """Whether each point lies in at least one ball |p - c_j| <= r_j. points (P, D), centers (N, D),
    radii (N,) -> (P,) bool"""
    inside = []
    for start in range(0, points.shape[0], batch_size):
        inside.append((torch.cdist(points[start:start + batch_size], centers) <= radii).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: Any, fake: Any, *, k: int = K_NEAREST, batch_size: int = BATCH_SIZE) -> PrecisionRecall:
    """Improved precision and recall of feature sets real (N, D) and fake (M, D), k-NN manifolds."""
    real, fake = feature_set(real, "real"), feature_set(fake, "fake")
    dtype = torch.promote_types(torch.promote_types(real.dtype, fake.dtype), torch.float32)  # no half-precision cdist
    real, fake = real.to(dtype), fake.to(dtype)
    if real.shape[1] != fake.shape[1]:
        raise InputError("the two feature sets have different dimensions", where="precision_recall",
                         expected="equal D", found=f"{real.shape[1]} and {fake.shape[1]}")
    precision = inside_manifold(fake, real, knn_radii(real, k=k, batch_size=batch_size), batch_size=batch_size)
    recall = inside_manifold(real, fake, knn_radii(fake, k=k, batch_size=batch_size), batch_size=batch_size)
    return PrecisionRecall(float(precision.double().mean()), float(recall.double().mean()))

