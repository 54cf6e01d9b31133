"""The Brownian tree of the SDE samplers: bit for bit torchsde's BrownianTree for the same entropy (the test-only
oracle), the Brownian bridge's statistics, consistency of increments, independence from the query order, one tree
per sample."""
from __future__ import annotations

import math

import pytest
import torch

from latentdiff.diffusion.samplers.brownian import BrownianNoise, BrownianTree, entropies_from
from latentdiff.errors import InputError

QUERIES = [(1.0, 2.0), (0.5, 0.7), (3.3, 14.614642), (0.0291675, 0.1), (5.123456789, 5.2), (1.0, 1.5), (1.5, 2.0),
           (0.0291675, 14.614642), (7.0, 7.0000031), (2.0, 1.0e9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("entropy,shape", [(1234, (2, 3)), (0, (4, 2, 2)), (2**62 + 17, ())])
def test_bit_for_bit_torchsde(dtype, entropy, shape):
    torchsde = pytest.importorskip("torchsde")
    ref = torchsde.BrownianTree(0.0291675, torch.zeros(shape, dtype=dtype), 14.614642, entropy=entropy)
    ours = BrownianTree(0.0291675, 14.614642, shape=shape, entropy=entropy, dtype=dtype)
    with pytest.warns(UserWarning):          # torchsde warns where it clamps the last query; we clamp quietly
        expected = [ref(a, b) for a, b in QUERIES]
    for (a, b), w in zip(QUERIES, expected, strict=True):
        assert torch.equal(ours(a, b), w), (a, b)


def test_increments_are_consistent_and_independent_of_query_order():
    points = [0.03, 0.2, 0.77, 1.5, 3.1234, 9.0, 14.6]
    forward = BrownianTree(0.03, 14.6, shape=(64,), entropy=5, dtype=torch.float64)
    backward = BrownianTree(0.03, 14.6, shape=(64,), entropy=5, dtype=torch.float64)
    steps = list(zip(points[:-1], points[1:], strict=True))
    ws = [forward(a, b) for a, b in steps]
    ws_back = [backward(a, b) for a, b in reversed(steps)][::-1]
    for w, w_back in zip(ws, ws_back, strict=True):
        assert torch.equal(w, w_back)
    whole = BrownianTree(0.03, 14.6, shape=(64,), entropy=5, dtype=torch.float64)(0.03, 14.6)
    torch.testing.assert_close(sum(ws), whole, rtol=0, atol=1e-12)   # W(s, t) = sum of W over a partition
    torch.testing.assert_close(forward(0.2, 3.1234), ws[1] + ws[2] + ws[3], rtol=0, atol=1e-12)
    assert not torch.equal(forward(0.2, 0.77), BrownianTree(0.03, 14.6, shape=(64,), entropy=6,
                                                            dtype=torch.float64)(0.2, 0.77))


def test_bridge_statistics():
    """Increments over disjoint intervals are independent N(0, length) and W(s, u) given W(s, t) has the bridge
    mean (u - s)/(t - s) W(s, t) and variance (u - s)(t - u)/(t - s): checked over 200k independent coordinates."""
    n, (s, u, t) = 200_000, (0.5, 1.7, 4.0)
    tree = BrownianTree(0.0, 4.0, shape=(n,), entropy=2024, dtype=torch.float64)
    w_su, w_ut = tree(s, u), tree(u, t)
    tol = 4 / math.sqrt(n)                  # ~4 standard errors of a normalised moment
    assert abs(w_su.mean() / math.sqrt(u - s)) < tol and abs(w_ut.mean() / math.sqrt(t - u)) < tol
    assert abs(w_su.var() / (u - s) - 1) < 3 * tol and abs(w_ut.var() / (t - u) - 1) < 3 * tol
    assert abs(torch.corrcoef(torch.stack([w_su, w_ut]))[0, 1]) < tol
    w_st = w_su + w_ut
    residual = w_su - (u - s) / (t - s) * w_st
    assert abs(residual.var() / ((u - s) * (t - u) / (t - s)) - 1) < 3 * tol
    assert abs(torch.corrcoef(torch.stack([residual, w_st]))[0, 1]) < tol


def test_noise_is_standard_normal_and_signed():
    x = torch.zeros(1, 4, 64, 64)
    noise = BrownianNoise(x, 0.03, 14.6, entropy=[3])
    z = noise(14.6, 7.0)
    assert z.shape == x.shape and z.dtype == x.dtype
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05
    torch.testing.assert_close(noise(7.0, 14.6), -z)        # the increment over the same interval, other way round


def test_one_tree_per_sample_equals_the_sample_alone():
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    batch = BrownianNoise(x, 0.1, 10.0, entropy=[11, 12, 13])
    alone = BrownianNoise(x[1:2], 0.1, 10.0, entropy=[12])
    for a, b in [(10.0, 5.0), (5.0, 0.1), (3.3, 3.2)]:
        assert torch.equal(batch(a, b)[1:2], alone(a, b))
    one_tree = BrownianNoise(x, 0.1, 10.0, entropy=12)       # one int: a tree over the whole batch (ComfyUI)
    assert one_tree(10.0, 5.0).shape == x.shape and not torch.equal(one_tree(10.0, 5.0)[1:2], alone(10.0, 5.0))


def test_entropies_from_generators():
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    both = entropies_from(gens, 2)
    assert both[1] == entropies_from([torch.Generator().manual_seed(2)], 1)[0]
    assert len(entropies_from(torch.Generator().manual_seed(1), 3)) == 3
    assert all(0 <= e < 2**63 for e in both)


def test_bad_arguments():
    with pytest.raises(InputError, match="t0 < t1"):
        BrownianTree(1.0, 1.0, shape=(2,), entropy=0)
    with pytest.raises(InputError, match="entropy"):
        BrownianTree(0.0, 1.0, shape=(2,), entropy=-1)
    with pytest.raises(InputError, match="a <= b"):
        BrownianTree(0.0, 1.0, shape=(2,), entropy=0)(0.6, 0.5)
    with pytest.raises(InputError, match="one entropy per sample"):
        BrownianNoise(torch.zeros(2, 3), 0.1, 1.0, entropy=[1])
