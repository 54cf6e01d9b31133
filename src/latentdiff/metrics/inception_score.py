"""The Inception Score (Salimans et al. 2016): how confidently, and how diversely, the FID Inception
network classifies a set of generated images.

    IS = exp( E_x KL( p(y|x) || p(y) ) ),   p(y) = E_x p(y|x)

p(y|x) is the softmax over the network's 1008 logits (pool3 times the classifier weights, without the
bias, as the reference code; see `InceptionV3.logits`). The set is cut into `splits` consecutive parts
(10 in the paper's protocol, on 50,000 images); the score is computed on each, and their mean and
standard deviation are reported. Higher is better; it does not look at real images at all.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..errors import InputError

IS_SPLITS = 10


class InceptionScore(NamedTuple):
    """Mean and (population) standard deviation of the score over the splits."""

    mean: float
    std: float


def inception_score(logits: Any, *, splits: int = IS_SPLITS, shuffle_seed: int | None = None) -> InceptionScore:
    """logits: (N, K) class logits of N generated images -> InceptionScore(mean, std) over `splits` parts.

    Split i holds samples [i N / splits, (i + 1) N / splits). shuffle_seed: permute the samples first
    (torch-fidelity shuffles; the reference code does not), e.g. when a folder is sorted by class.
    """
    logits = torch.as_tensor(logits)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise InputError("expected class logits", where="inception_score(logits)", expected="(N, K), K >= 2",
                         found=tuple(logits.shape))
    n = logits.shape[0]
    if not 1 <= splits <= n:
        raise InputError("the number of splits must be between 1 and the number of images", where="splits",
                         expected=f"1 <= splits <= {n}", found=splits)
    logits = logits.to(torch.float64)
    if shuffle_seed is not None:
        logits = logits[torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed)).to(logits.device)]
    log_p = torch.log_softmax(logits, dim=1)           # log p(y|x): (N, K)
    scores: list[torch.Tensor] = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        # log p(y) of the split: log of the mean of p(y|x), computed stably in log space
        log_marginal = torch.logsumexp(part, dim=0) - torch.log(torch.tensor(float(part.shape[0]), dtype=part.dtype))
        kl = (part.exp() * (part - log_marginal)).sum(dim=1)     # KL(p(y|x) || p(y)) per image
        scores.append(kl.mean().exp())
    per_split = torch.stack(scores)
    return InceptionScore(float(per_split.mean()), float(per_split.std(correction=0)))
