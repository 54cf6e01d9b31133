"""Brownian-tree noise: the noise of SDE samplers as increments of one Brownian path per sample, so that the noise
of a step depends on the noise levels it spans and not on how many steps the grid has (k-diffusion's
`BrownianTreeNoiseSampler`, used by DPM++ SDE, DPM++ 2M SDE and 3M SDE in k-diffusion, A1111 and ComfyUI).

    tree = BrownianTree(0.03, 14.6, shape=(4, 64, 64), entropy=1234)
    w = tree(1.0, 2.0)                           W(2) - W(1) ~ N(0, 1 I); tree(1, 1.5) + tree(1.5, 2) is the same
    noise = BrownianNoise(x, sigma_min, sigma_max, entropy=[seed_0, seed_1])   one tree per sample
    z = noise(sigma, sigma_next)                 (W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma|, like x

The path is built as a binary tree of intervals (a "virtual Brownian tree", Li et al. 2020, "Scalable Gradients for
Stochastic Differential Equations", sec. 7.2): the root holds W(t1) - W(t0) ~ N(0, (t1 - t0) I); an interval
[s, u] with increment W_su is split at its midpoint m, the left part drawn from the Brownian bridge
    W_sm | W_su ~ N((m - s) / (u - s) W_su, (m - s)(u - m) / (u - s) I)
and the right part W_su - W_sm. A query [a, b] descends to the intervals that tile it (a and b rounded to `tol`)
and adds their increments. Every split draws its normal numbers from a seed that only the interval's place in the
tree and the entropy determine, so a query's answer does not depend on the queries made before it, and the tree
keeps only recent increments in memory.

The seeds and roundings are torchsde's (`torchsde.BrownianTree`, i.e. BrownianInterval(halfway_tree=True, tol=1e-6,
pool_size=24) without Levy area): numpy's SeedSequence(entropy, spawn_key=(k, depth), pool_size=24) gives an
interval's seed, the normal numbers come from torch.Generator(device).manual_seed(seed). So with the same entropy
the increments equal torchsde's (tests/diffusion/test_brownian.py), and a DPM++ SDE image of ComfyUI or diffusers'
DPMSolverSDEScheduler (`noise_sampler_seed`) can be reproduced; torchsde is not needed at run time.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from ...errors import ConfigError, InputError, describe
from .base import Generator

TOL = 1e-6          # torchsde.BrownianTree's default: query points are rounded to 6 decimals
POOL_SIZE = 24      # torchsde.BrownianTree's SeedSequence pool size
CACHE_SIZE = 64     # increments kept in memory (recomputed from their parents when dropped)
MAX_DEPTH = 200     # a query that is not reached by halving this often is a bug, not a long search


class _Node:
    """An interval [start, end] of the tree; its children once split at `mid`."""

    __slots__ = ("start", "end", "parent", "is_left", "key", "depth", "mid", "seed", "left", "right")

    def __init__(self, start: float, end: float, parent: _Node | None, is_left: bool, key: int, depth: int):
        self.start, self.end, self.parent, self.is_left = start, end, parent, is_left
        self.key, self.depth = key, depth          # torchsde's spawn key and depth of the split of this node
        self.mid: float | None = None
        self.seed = 0
        self.left: _Node | None = None
        self.right: _Node | None = None


class BrownianTree:
    """One Brownian path W on [t0, t1] with values of `shape`: tree(a, b) = W(b) - W(a) for t0 <= a <= b <= t1
    (points outside are clamped to the ends). Deterministic in `entropy` (a non-negative int)."""

    def __init__(self, t0: float, t1: float, *, shape: Sequence[int], entropy: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", tol: float = TOL, pool_size: int = POOL_SIZE):
        t0, t1 = float(t0), float(t1)
        if not (math.isfinite(t0) and math.isfinite(t1) and t0 < t1):
            raise InputError("a Brownian tree needs t0 < t1", where="t0", expected=f"< t1 = {t1}", found=t0)
        if not isinstance(entropy, (int, np.integer)) or isinstance(entropy, bool) or entropy < 0:
            raise InputError("the entropy of a Brownian tree must be a non-negative integer", where="entropy",
                             expected="int >= 0", found=describe(entropy))
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)
        self.entropy, self.pool_size, self._digits = int(entropy), pool_size, -int(math.log10(tol))
        self._cache: OrderedDict[_Node, torch.Tensor] = OrderedDict()
        self.root = _Node(self._round(t0), self._round(t1), None, True, 0, 0)
        root_seed = np.random.SeedSequence(entropy=self.entropy, pool_size=pool_size).generate_state(3)[0]
        self._root_w = self._randn(int(root_seed)) * math.sqrt(t1 - t0)

    def _round(self, t: float) -> float:
        return round(t, self._digits)

    def _randn(self, seed: int) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(seed)
        return torch.randn(self.shape, dtype=self.dtype, device=self.device, generator=generator)

    def __call__(self, a: float, b: float) -> torch.Tensor:
        """W(b) - W(a), a <= b: (shape) in the tree's dtype, on its device."""
        lo, hi = self.root.start, self.root.end
        a, b = self._round(min(max(float(a), lo), hi)), self._round(min(max(float(b), lo), hi))
        if a > b:
            raise InputError("a Brownian increment needs a <= b", where="a", expected=f"<= {b}", found=a)
        if a == b:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        nodes: list[_Node] = []
        self._tile(self.root, a, b, nodes, 0)
        w = self._increment(nodes[0])
        for node in nodes[1:]:
            w = w + self._increment(node)
        return w

    def _tile(self, node: _Node, a: float, b: float, out: list[_Node], depth: int) -> None:
        """Append the intervals of the tree that tile [a, b] (within node), left to right, splitting as needed."""
        if depth > MAX_DEPTH:
            raise InputError("a Brownian tree query did not resolve", where="tol", expected="query points on the "
                             "tolerance grid", found=(a, b))
        if a == node.start and b == node.end:
            out.append(node)
            return
        left, right, mid = self._split(node)
        if b <= mid:
            self._tile(left, a, b, out, depth + 1)
        elif a >= mid:
            self._tile(right, a, b, out, depth + 1)
        else:
            self._tile(left, a, mid, out, depth + 1)
            self._tile(right, mid, b, out, depth + 1)

    def _split(self, node: _Node) -> tuple[_Node, _Node, float]:
        if node.left is None or node.right is None or node.mid is None:
            parent = node.parent
            if parent is not None:    # torchsde's spawn key: the path of left (0) / right (1) turns from the root
                node.key, node.depth = 2 * parent.key + (0 if node.is_left else 1), parent.depth + 1
            half = 0.5 * (node.end + node.start)
            node.mid = self._round(half)
            node.seed = int(np.random.SeedSequence(entropy=self.entropy, spawn_key=(node.key, node.depth),
                                                   pool_size=self.pool_size).generate_state(4)[0])
            node.left = _Node(node.start, self._round(half), node, True, 0, 0)
            node.right = _Node(self._round(half), node.end, node, False, 0, 0)
        return node.left, node.right, node.mid

    def _increment(self, node: _Node) -> torch.Tensor:
        """W(node.end) - W(node.start): from the parent's increment by the Brownian bridge (module docstring)."""
        parent = node.parent
        if parent is None:
            return self._root_w
        cached = self._cache.get(node)
        if cached is not None:
            self._cache.move_to_end(node)
            return cached
        w_parent = self._increment(parent)
        assert parent.mid is not None       # a node with a parent was made by splitting it
        h_inv = 1 / (parent.end - parent.start)
        left_len, right_len = parent.mid - parent.start, parent.end - parent.mid
        mean = left_len * w_parent * h_inv
        w_left = mean + math.sqrt(left_len * right_len * h_inv) * self._randn(parent.seed)
        w = w_left if node.is_left else w_parent - w_left
        self._cache[node] = w
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return w


class BrownianNoise:
    """A k-diffusion interval noise sampler: noise(sigma, sigma_next) = (W(sigma_next) - W(sigma)) / sqrt|sigma_next
    - sigma|, standard normal, shaped like x. `entropy`: one int (one tree over the whole batch: ComfyUI, diffusers'
    DPMSolverSDEScheduler) or one per sample (a tree per sample: A1111's per-image seeds; image i of a batch then
    gets the noise it gets alone). Trees span [sigma_min, sigma_max] (the smallest positive and the largest sigma of
    the grid); the numbers are drawn on `device` in `dtype` (x's by default) and moved to x's device and dtype."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, *, entropy: int | Sequence[int],
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        self.x_dtype, self.x_device = x.dtype, x.device
        dtype, device = dtype or x.dtype, device if device is not None else x.device
        if isinstance(entropy, (list, tuple)):
            if len(entropy) != x.shape[0]:
                raise InputError("one entropy per sample is needed", where="entropy",
                                 expected=f"{x.shape[0]} integers", found=len(entropy))
            self.trees = [BrownianTree(sigma_min, sigma_max, shape=x.shape[1:], entropy=e, dtype=dtype, device=device)
                          for e in entropy]
            self.batched = True
        else:
            self.trees = [BrownianTree(sigma_min, sigma_max, shape=x.shape, entropy=entropy, dtype=dtype,   # type: ignore[arg-type]
                                       device=device)]
            self.batched = False

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        a, b = float(sigma), float(sigma_next)
        lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        w = torch.stack([tree(lo, hi) for tree in self.trees]) if self.batched else self.trees[0](lo, hi)
        return (w * (sign / math.sqrt(hi - lo))).to(self.x_device, self.x_dtype)


def entropies_from(generator: Generator, batch_size: int) -> list[int]:
    """One tree entropy per sample, drawn from `generator`: from each of a list of generators (so image i of a batch
    gets the noise it gets alone), or `batch_size` from one generator (None: torch's global one)."""
    def draw(g: torch.Generator | None, n: int) -> list[int]:
        device = g.device if g is not None else "cpu"
        return torch.randint(0, 2**63 - 1, (n,), generator=g, device=device).tolist()

    if generator is None or isinstance(generator, torch.Generator):
        return draw(generator, batch_size)
    return [draw(g, 1)[0] for g in generator]


def brownian_noise_from(generator: Generator, x: torch.Tensor, sigmas: Sequence[float], *,
                        dtype: torch.dtype | None = None, entropy: int | None = None) -> BrownianNoise:
    """The Brownian noise of a run over `sigmas` for x (B, C, H, W): one tree per sample seeded from `generator`
    (`entropies_from`), or with `entropy` one tree over the batch (diffusers' `noise_sampler_seed`). The numbers are
    drawn on the CPU (as ComfyUI's `cpu=True`), so a seed gives one image on every device."""
    positive = [s for s in sigmas if s > 0]
    seeds: int | list[int] = entropy if entropy is not None else entropies_from(generator, x.shape[0])
    return BrownianNoise(x, min(positive), max(positive), entropy=seeds, dtype=dtype, device="cpu")


NOISE_TYPES = ("gaussian", "brownian")


def check_noise_type(noise_type: object) -> None:
    """A ConfigError unless `noise_type` is "gaussian" (fresh noise per step) or "brownian" (a Brownian tree)."""
    if noise_type not in NOISE_TYPES:
        raise ConfigError("unknown noise type", where="noise_type", expected=list(NOISE_TYPES), found=repr(noise_type))
