"""FID and KID: distances between two sets of Inception features (real vs generated).

FID (Heusel et al. 2017) fits a Gaussian to each set and takes the Fréchet (2-Wasserstein) distance

    d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))

The last trace needs no general matrix square root (scipy.linalg.sqrtm): for any factor S_1 = L L^T,
S_1 S_2 = L (L^T S_2) has the nonzero eigenvalues of the symmetric PSD matrix M = L^T S_2 L, so
tr((S_1 S_2)^(1/2)) is the sum of the square roots of M's eigenvalues, from a symmetric eigensolver in
float64. L is the Cholesky factor of S_1 or, where S_1 is singular (fewer samples than dimensions),
V diag(lambda)^(1/2) from its eigendecomposition; eigenvalues that rounding pushes below zero count as
zero. Near-singular covariances need no epsilon added, and the result agrees with the sqrtm formula to
rounding (tests/metrics/test_metrics_fid.py).

KID (Binkowski et al. 2018) is the unbiased estimate of the squared MMD under the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets of both sets (100 subsets of 1000, as torch-fidelity
and the KID paper's code); it has no bias in the number of samples, unlike FID.

Reference statistics (mu, sigma) of a data set are saved and loaded as .npz files with arrays `mu` (D,)
and `sigma` (D, D), the format pytorch-fid and others write.
"""
from __future__ import annotations

import io
import os
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .. import limits
from ..errors import InputError
from .arrays import Headers, load_arrays

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


@dataclass(frozen=True)
class FeatureStats:
    """The Gaussian fit of a feature set: mu (D,) and the unbiased covariance sigma (D, D), float64."""

    mu: torch.Tensor
    sigma: torch.Tensor
    num_samples: int | None = None

    @classmethod
    def from_features(cls, features: Any, *, block_size: int = 4096) -> FeatureStats:
        """features: (N, D), N >= 2 -> mean and covariance (normalised by N - 1, as numpy.cov).

        Accumulated in float64 over blocks of rows: no float64 copy of the whole set is made.
        """
        features = feature_set(features, "features")
        n = features.shape[0]
        if n < 2:
            raise InputError("a covariance needs at least two samples", where="features",
                             expected="(N, D) with N >= 2", found=tuple(features.shape))
        mu = features.sum(dim=0, dtype=torch.float64) / n
        scatter = torch.zeros(mu.shape[0], mu.shape[0], dtype=torch.float64, device=features.device)
        for block in features.split(block_size):
            centered = block.to(torch.float64) - mu
            scatter += centered.T @ centered
        return cls(mu, scatter / (n - 1), n)

    def save(self, path: str | os.PathLike) -> Path:
        """Write `mu`, `sigma` (and `num_samples`) as an .npz file, atomically."""
        path = Path(path)
        arrays: dict[str, Any] = {"mu": self.mu.cpu().numpy(), "sigma": self.sigma.cpu().numpy()}
        if self.num_samples is not None:
            arrays["num_samples"] = np.asarray(self.num_samples)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)   # to a buffer: savez would add ".npz" to a name that lacks it
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_bytes(buffer.getvalue())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read an .npz with arrays `mu` (D,) and `sigma` (D, D) (pytorch-fid's format); nothing is unpickled."""
        path = Path(path)
        try:
            arrays = load_arrays(path, check=partial(_check_stats_headers, where=str(path)))
        except FileNotFoundError:
            raise InputError("statistics file not found", where=str(path),
                             expected="an .npz with mu and sigma") from None
        except OSError as e:
            raise InputError(f"not a readable .npz file ({e})", where=str(path),
                             expected="an .npz with arrays mu and sigma") from None
        if "mu" not in arrays or "sigma" not in arrays:
            raise InputError("statistics file lacks mu or sigma", where=str(path), expected="arrays mu, sigma",
                             found=sorted(arrays))
        mu, sigma = torch.from_numpy(arrays["mu"]).double(), torch.from_numpy(arrays["sigma"]).double()
        _check_stats(mu, sigma, where=str(path))
        n = int(arrays["num_samples"]) if "num_samples" in arrays else None
        return cls(mu, sigma, n)


def _check_stats_headers(headers: Headers, *, where: str) -> None:
    """Before any array is read: mu (D,) and sigma (D, D) with D <= limits.MAX_FEATURE_DIM (a forged sigma of
    (17000, 17000) would inflate a 2 MB file to 2.3 GB)."""
    if "mu" not in headers or "sigma" not in headers:
        raise InputError("statistics file lacks mu or sigma", where=where, expected="arrays mu, sigma",
                         found=sorted(headers))
    (mu, _), (sigma, _) = headers["mu"], headers["sigma"]
    if len(mu) != 1 or len(sigma) != 2 or max(*mu, *sigma) > limits.MAX_FEATURE_DIM:
        raise InputError("statistics must be mu (D,) and sigma (D, D) of a bounded width D", where=where,
                         expected=f"D <= {limits.MAX_FEATURE_DIM} (limits.MAX_FEATURE_DIM)",
                         found=f"mu {mu}, sigma {sigma}")
    if "num_samples" in headers and headers["num_samples"][0] != ():
        raise InputError("num_samples must be a single number", where=where, expected="shape ()",
                         found=headers["num_samples"][0])


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2). mu: (D,), sigma: (D, D) -> float

    Accepts tensors or numpy arrays; computed in float64 on the device of `sigma1`.
    """
    device = sigma1.device if isinstance(sigma1, torch.Tensor) else None
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(a, dtype=torch.float64, device=device)
                                for a in (mu1, sigma1, mu2, sigma2))
    _check_stats(mu1, sigma1, where="frechet_distance(mu1, sigma1)")
    _check_stats(mu2, sigma2, where="frechet_distance(mu2, sigma2)")
    if mu1.shape != mu2.shape:
        raise InputError("the two feature sets have different dimensions", where="frechet_distance",
                         expected="equal D", found=f"{mu1.shape[0]} and {mu2.shape[0]}")
    diff = mu1 - mu2
    # tr((S1 S2)^(1/2)) = sum sqrt(eig(L^T S2 L)) with S1 = L L^T (see the module docstring)
    factor = _psd_factor(sigma1)
    m = factor.T @ sigma2 @ factor
    trace_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    distance = diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return float(distance)


def fid_from_features(real: Any, fake: Any) -> float:
    """FID of two feature sets (N, D) and (M, D): the same number as `frechet_distance` of their statistics.

    With fewer samples than dimensions (N or M <= D) the covariances are singular, and the trace term is
    computed from the samples instead: with centred X (N, D), Y (M, D), S_1 S_2 has the nonzero eigenvalues
    of C C^T / ((N - 1)(M - 1)), C = X Y^T (N, M), so tr((S_1 S_2)^(1/2)) = ||C||_* / sqrt((N - 1)(M - 1)):
    an N x M singular value problem instead of D x D ones, exact to rounding.
    """
    real, fake = feature_set(real, "real"), feature_set(fake, "fake")
    n, m, d = real.shape[0], fake.shape[0], real.shape[1]
    if fake.shape[1] != d:
        raise InputError("the two feature sets have different dimensions", where="fid_from_features",
                         expected="equal D", found=f"{d} and {fake.shape[1]}")
    if min(n, m) < 2:
        raise InputError("a covariance needs at least two samples", where="fid_from_features",
                         expected="N, M >= 2", found=f"{n} and {m}")
    if min(n, m) > d:
        a, b = FeatureStats.from_features(real), FeatureStats.from_features(fake)
        return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    x, y = real.to(torch.float64), fake.to(torch.float64)
    mu_x, mu_y = x.mean(dim=0), y.mean(dim=0)
    x, y = x - mu_x, y - mu_y
    trace_sqrt = torch.linalg.svdvals(x @ y.T).sum() / ((n - 1) * (m - 1)) ** 0.5
    diff = mu_x - mu_y
    distance = diff @ diff + x.square().sum() / (n - 1) + y.square().sum() / (m - 1) - 2 * trace_sqrt
    return float(distance)


def _psd_factor(sigma: torch.Tensor) -> torch.Tensor:
    """L with L L^T = sigma: Cholesky (cheap) if sigma is positive definite, else V diag(lambda)^(1/2) from
    the eigendecomposition, with eigenvalues that rounding pushed below zero taken as zero."""
    sigma = (sigma + sigma.T) / 2
    factor, info = torch.linalg.cholesky_ex(sigma)
    if int(info) == 0:
        return factor
    eigenvalues, vectors = torch.linalg.eigh(sigma)
    return vectors * eigenvalues.clamp(min=0).sqrt()


class KID(NamedTuple):
    """Kernel Inception Distance: mean and standard deviation of the unbiased MMD^2 over the subsets."""

    mean: float
    std: float


def polynomial_mmd2(x: torch.Tensor, y: torch.Tensor, *, degree: int = 3, gamma: float | None = None,
                    coef0: float = 1.0) -> torch.Tensor:
    """Unbiased MMD^2 of samples x (m, D), y (n, D) with k(a, b) = (gamma a.b + coef0)^degree -> scalar

    gamma None: 1 / D. The within-set terms leave out the diagonal k(x_i, x_i) (Gretton et al. 2012, eq. 3).
    """
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    m, n = x.shape[0], y.shape[0]
    k_xx = (x @ x.T * gamma + coef0) ** degree
    k_yy = (y @ y.T * gamma + coef0) ** degree
    k_xy = (x @ y.T * gamma + coef0) ** degree
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2 * k_xy.mean()


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, *, num_subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, degree: int = 3, gamma: float | None = None,
                              coef0: float = 1.0, seed: int = 0) -> KID:
    """KID of feature sets real (N, D) and fake (M, D): MMD^2 over `num_subsets` random subsets of
    `subset_size` samples of each set (drawn without replacement within a subset, from `seed`)."""
    real, fake = feature_set(real, "real"), feature_set(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise InputError("the two feature sets have different dimensions", where="kernel_inception_distance",
                         expected="equal D", found=f"{real.shape[1]} and {fake.shape[1]}")
    smallest = min(real.shape[0], fake.shape[0])
    if not 2 <= subset_size <= smallest:
        raise InputError("KID subset size must be between 2 and the size of the smaller set",
                         where="subset_size", expected=f"2 <= subset_size <= {smallest} (--subset-size)",
                         found=subset_size)
    if num_subsets < 1:
        raise InputError("KID needs at least one subset", where="num_subsets", expected=">= 1", found=num_subsets)
    generator = torch.Generator().manual_seed(seed)
    values: list[torch.Tensor] = []
    for _ in range(num_subsets):
        pick_real = torch.randperm(real.shape[0], generator=generator)[:subset_size].to(real.device)
        pick_fake = torch.randperm(fake.shape[0], generator=generator)[:subset_size].to(fake.device)
        values.append(polynomial_mmd2(real[pick_real].double(), fake[pick_fake].double(), degree=degree,
                                      gamma=gamma, coef0=coef0))
    per_subset = torch.stack(values)
    return KID(float(per_subset.mean()), float(per_subset.std(correction=0)))


def feature_set(x: Any, name: str) -> torch.Tensor:
    """A set of feature vectors (tensor or array), checked: (N, D) floats with N >= 1, returned as it is."""
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] == 0 or not x.is_floating_point():
        raise InputError("expected a set of feature vectors", where=name, expected="(N, D) floats, N >= 1",
                         found=f"{tuple(x.shape)} {x.dtype}")
    return x


def _check_stats(mu: torch.Tensor, sigma: torch.Tensor, *, where: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise InputError("mu and sigma do not fit together", where=where, expected="mu (D,) and sigma (D, D)",
                         found=f"{tuple(mu.shape)} and {tuple(sigma.shape)}")
    if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
        raise InputError("statistics hold NaN or inf", where=where, expected="finite mu and sigma")
