"""FID, KID, Inception Score and precision/recall on known feature sets, against independent computations:
the Fréchet distance against scipy.linalg.sqrtm (the formula pytorch-fid evaluates) including singular and
ill-conditioned covariances, KID and IS against their textbook formulas written out here with loops, and
precision/recall against a brute-force k-NN written here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg  # in the `test` extra
import torch

from latentdiff.errors import InputError
from latentdiff.metrics.fid import (
    FeatureStats,
    fid_from_features,
    frechet_distance,
    kernel_inception_distance,
    polynomial_mmd2,
)
from latentdiff.metrics.inception_score import inception_score
from latentdiff.metrics.precision_recall import knn_radii, precision_recall

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, cores are shared



# ---- FID ----------------------------------------------------------------------------------------------------
def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The reference: |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2), real part, as pytorch-fid."""
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = a.mean(axis=0) - b.mean(axis=0)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def gaussian_sets(n: int, m: int, d: int, *, seed: int, flat: float | None = None):
    """Two correlated Gaussian feature sets; `flat` shrinks a quarter of the directions (ill-conditioned S)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.2
    b = rng.standard_normal((m, d)) @ rng.standard_normal((d, d)) * 0.3 + 0.2
    if flat is not None:
        a[:, : d // 4] *= flat
        b[:, : d // 4] *= flat
    return a, b


CASES = {  # name: (N, M, D, flat)
    "full-rank": (400, 300, 48, None),
    "ill-conditioned": (400, 300, 48, 1e-5),
    "singular (N, M < D)": (40, 30, 64, None),
    "singular, one set": (300, 30, 64, None),
}


@pytest.mark.parametrize("case", CASES)
def test_frechet_distance_matches_scipy(case):
    n, m, d, flat = CASES[case]
    a, b = gaussian_sets(n, m, d, seed=len(case), flat=flat)
    expected = scipy_fid(a, b)
    stats_a, stats_b = FeatureStats.from_features(torch.from_numpy(a)), FeatureStats.from_features(torch.from_numpy(b))
    from_stats = frechet_distance(stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma)
    assert from_stats == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-6)
    # numpy arrays are accepted, float32 features too (accumulated in float64)
    assert frechet_distance(np.mean(a, 0), np.cov(a, rowvar=False), np.mean(b, 0), np.cov(b, rowvar=False)) \
        == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == pytest.approx(
        scipy_fid(a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)), rel=1e-6)


def test_frechet_distance_of_a_set_with_itself_is_zero_even_when_singular():
    a, _ = gaussian_sets(20, 2, 64, seed=3)  # rank 19 covariance in 64 dimensions
    s = FeatureStats.from_features(torch.from_numpy(a))
    scale = float(s.sigma.trace())
    assert abs(frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-6 * scale
    assert abs(fid_from_features(torch.from_numpy(a), torch.from_numpy(a))) < 1e-10 * scale
    # two Gaussians that differ only in the mean: d^2 = |mu1 - mu2|^2
    shift = torch.linspace(-1, 1, 64, dtype=torch.float64)
    assert frechet_distance(s.mu, s.sigma, s.mu + shift, s.sigma) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_feature_stats_match_numpy_and_round_trip(tmp_path):
    a, _ = gaussian_sets(50, 2, 8, seed=4)
    stats = FeatureStats.from_features(torch.from_numpy(a), block_size=7)   # blocks do not change the result
    np.testing.assert_allclose(stats.mu.numpy(), a.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma.numpy(), np.cov(a, rowvar=False), rtol=1e-10, atol=1e-14)
    back = FeatureStats.load(stats.save(tmp_path / "ref.npz"))
    assert torch.equal(back.mu, stats.mu) and torch.equal(back.sigma, stats.sigma) and back.num_samples == 50
    # a file as pytorch-fid writes it (mu, sigma only, float32), under a name without .npz
    with open(tmp_path / "pytorch_fid_stats", "wb") as f:
        np.savez(f, mu=a.mean(axis=0).astype(np.float32), sigma=np.cov(a, rowvar=False).astype(np.float32))
    other = FeatureStats.load(tmp_path / "pytorch_fid_stats")
    assert other.num_samples is None and other.sigma.dtype == torch.float64 and other.sigma.shape == (8, 8)


def test_bad_statistics_and_features_are_refused(tmp_path):
    np.savez(tmp_path / "no_sigma.npz", mu=np.zeros(4))
    np.savez(tmp_path / "pickled.npz", mu=np.zeros(4), sigma=np.array([{"a": 1}], dtype=object))
    np.savez(tmp_path / "mismatch.npz", mu=np.zeros(4), sigma=np.eye(3))
    for name, match in (("no_sigma.npz", "lacks mu or sigma"), ("pickled.npz", "not a readable"),
                        ("mismatch.npz", "do not fit"), ("missing.npz", "not found")):
        with pytest.raises(InputError, match=match):
            FeatureStats.load(tmp_path / name)
    with pytest.raises(InputError, match="NaN"):
        frechet_distance(np.zeros(2), np.eye(2), np.array([0.0, np.nan]), np.eye(2))
    with pytest.raises(InputError, match="different dimensions"):
        fid_from_features(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(InputError, match="at least two"):
        FeatureStats.from_features(torch.randn(1, 3))
    with pytest.raises(InputError, match="feature vectors"):
        fid_from_features(torch.randn(5), torch.randn(5, 4))


# ---- KID ----------------------------------------------------------------------------------------------------
def direct_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, term by term (Gretton et al. 2012, eq. 3)."""
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_polynomial_mmd_matches_the_direct_formula():
    x, y = gaussian_sets(12, 9, 5, seed=5)
    assert float(polynomial_mmd2(torch.from_numpy(x), torch.from_numpy(y))) == pytest.approx(direct_mmd2(x, y),
                                                                                         rel=1e-10)


def test_kid_over_subsets():
    x, y = gaussian_sets(15, 11, 4, seed=6)
    # one subset holding every sample of the smaller set ... of both sets when they are the same size
    full = kernel_inception_distance(torch.from_numpy(x[:11]), torch.from_numpy(y), num_subsets=1, subset_size=11)
    assert full.mean == pytest.approx(direct_mmd2(x[:11], y), rel=1e-10) and full.std == 0
    # subsets: every value is the MMD of some subsets; the mean lies between the extremes, the std is spread
    kid = kernel_inception_distance(torch.from_numpy(x), torch.from_numpy(y), num_subsets=20, subset_size=6, seed=1)
    assert kid.std > 0
    assert kernel_inception_distance(x, y, num_subsets=20, subset_size=6, seed=1) == kid   # deterministic
    # unbiased: two samples of one distribution give a KID near zero, relative to a shifted distribution
    rng = np.random.default_rng(0)
    p, q = rng.standard_normal((400, 8)), rng.standard_normal((400, 8))
    same = kernel_inception_distance(p, q, num_subsets=10, subset_size=200)
    shifted = kernel_inception_distance(p, q + 1.0, num_subsets=10, subset_size=200)
    assert abs(same.mean) < 3 * same.std + 1e-3 and shifted.mean > 20 * abs(same.mean)
    with pytest.raises(InputError, match="subset size"):
        kernel_inception_distance(x, y, subset_size=12)


# ---- Inception Score ----------------------------------------------------------------------------------------
def direct_inception_score(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """exp(mean_x KL(p(y|x) || p(y))) per consecutive split, then mean and population std, with loops."""
    n = len(logits)
    scores = []
    for i in range(splits):
        part = logits[i * n // splits:(i + 1) * n // splits]
        p = np.exp(part - part.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        marginal = p.mean(axis=0)
        kl = [sum(p_x[c] * math.log(p_x[c] / marginal[c]) for c in range(len(p_x)) if p_x[c] > 0) for p_x in p]
        scores.append(math.exp(sum(kl) / len(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_matches_the_direct_formula_and_its_extremes():
    logits = np.random.default_rng(7).standard_normal((23, 10)) * 3
    mean, std = inception_score(torch.from_numpy(logits), splits=4)
    expected = direct_inception_score(logits, 4)
    assert mean == pytest.approx(expected[0], rel=1e-10) and std == pytest.approx(expected[1], rel=1e-8, abs=1e-12)
    # confident and uniformly spread over K classes: IS = K; the same prediction for every image: IS = 1
    k = 8
    confident = torch.eye(k).repeat(3, 1) * 200.0
    assert inception_score(confident, splits=3).mean == pytest.approx(k, rel=1e-6)
    assert inception_score(torch.randn(1, k).repeat(12, 1), splits=2).mean == pytest.approx(1.0, rel=1e-12)
    # shuffling permutes samples across the splits, a single split does not care
    assert inception_score(logits, splits=1, shuffle_seed=3).mean == pytest.approx(direct_inception_score(logits, 1)[0])
    with pytest.raises(InputError, match="splits"):
        inception_score(logits, splits=24)


# ---- precision and recall -----------------------------------------------------------------------------------
def brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(points):
        return [sorted(np.linalg.norm(p - q) for j, q in enumerate(points) if j != i)[k - 1]
                for i, p in enumerate(points)]

    def covered(points, centers, r):
        return np.mean([any(np.linalg.norm(p - c) <= r_c for c, r_c in zip(centers, r, strict=True)) for p in points])

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


@pytest.mark.parametrize("batch_size", [5, 4096])
def test_precision_recall_matches_brute_force(batch_size):
    rng = np.random.default_rng(8)
    real = rng.standard_normal((40, 6))
    fake = np.concatenate([rng.standard_normal((25, 6)) * 0.6, rng.standard_normal((12, 6)) * 0.5 + 3.0])
    result = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3, batch_size=batch_size)
    expected = brute_force_precision_recall(real, fake, 3)
    assert (result.precision, result.recall) == pytest.approx(expected, abs=1e-12)
    assert 0 < result.precision < 1 and 0 < result.recall < 1   # the sets differ, so the test can tell
    assert knn_radii(torch.from_numpy(real), k=1, batch_size=batch_size).shape == (40,)


def test_precision_recall_extremes():
    real = torch.randn(30, 5, generator=torch.Generator().manual_seed(9))
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    with pytest.raises(InputError, match="k must be"):
        precision_recall(real[:3], real, k=3)
