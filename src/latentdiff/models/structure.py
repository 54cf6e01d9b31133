"""Bounds on the structure a model config describes, checked when the config is built (before any module is):
a few bytes of `config.json` (`layers_per_block: 1e9`, `model_channels: 2**30`) must be a ConfigError naming
the key, the bound and the value, never a module-building loop that runs for hours or a multi-GB allocation.

Counts (levels, resnets per level, transformer depth, heads, widths) have fixed bounds (`latentdiff.limits`);
the widths together are bounded by a parameter-count estimate: cheap arithmetic that follows the networks'
structure closely enough to stay below the real count (so no real model is ever refused) and grows the same way.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from .. import limits
from ..errors import ConfigError


def check_levels(channels: Sequence[int], *, key: str = "channels") -> None:
    """The per-level widths: at most MAX_LEVELS levels, each at most MAX_CHANNELS wide."""
    if len(channels) > limits.MAX_LEVELS:
        raise ConfigError(f"{key} lists too many resolution levels", where=key,
                          expected=f"at most {limits.MAX_LEVELS} levels", found=f"{len(channels)} levels")
    for width in channels:
        limits.check_count(width, key=key, at_least=1, at_most=limits.MAX_CHANNELS, where=key)


def check_counts(values: Iterable[tuple[str, int | Sequence[int] | None, int]]) -> None:
    """(key, an int / one int per level / None, bound) triples: every int in [1, bound]."""
    for key, value, bound in values:
        for v in (() if value is None else value if isinstance(value, (tuple, list)) else (value,)):
            limits.check_count(v, key=key, at_least=1, at_most=bound, where=key)


def _resnet(c_in: int, c_out: int) -> int:
    return 9 * c_in * c_out + 9 * c_out * c_out  # two 3x3 convolutions (norms, biases, shortcut left out)


def _transformer(width: int, depth: int, context: int | None) -> int:
    # per block: self-attention 4 c^2, cross-attention 2 c^2 + 2 c * context, feed-forward 8 c^2 (a lower bound)
    return depth * (14 * width * width + 2 * width * (context or width))


def estimate_unet_parameters(channels: Sequence[int], layers: Sequence[int], *, attention: Sequence[bool],
                             transformer_depth: Sequence[int] | None = None, context_dim: int | None = None) -> int:
    """A lower estimate of a UNet's parameters: per level `layers` resnets down and `layers + 1` up (each with
    a transformer where the level attends), and a middle block of two resnets and one attention."""
    depth = transformer_depth or (1,) * len(channels)
    total, previous = 0, channels[0]
    for c, n, attends, d in zip(channels, layers, attention, depth, strict=True):  # callers check lengths first
        total += n * _resnet(previous, c) + (n + 1) * _resnet(2 * c, c)
        if attends:
            total += (2 * n + 1) * _transformer(c, d, context_dim)
        previous = c
    return total + 2 * _resnet(channels[-1], channels[-1]) + _transformer(channels[-1], depth[-1], context_dim)


def estimate_autoencoder_parameters(channels: Sequence[int], layers: int) -> int:
    """A lower estimate of an autoencoder's parameters: `layers` resnets per encoder level, one more per decoder
    level, and the two middle resnets of each half."""
    total = sum((2 * layers + 1) * _resnet(c, c) for c in channels)
    return total + 4 * _resnet(channels[-1], channels[-1])


def estimate_text_parameters(vocab: int, width: int, ffn: int, layers: int) -> int:
    """A lower estimate of a transformer text encoder's parameters: the token table, and per layer attention
    (4 width^2) and the MLP (2 width ffn)."""
    return vocab * width + layers * (4 * width * width + 2 * width * ffn)


def check_parameters(estimate: int, *, what: str, key: str) -> None:
    """Refuse a config whose parameter estimate passes MAX_PARAMETERS (a model no machine would hold)."""
    if estimate > limits.MAX_PARAMETERS:
        raise ConfigError(f"{what} would have about {estimate:.3g} parameters: too large to build", where=key,
                          expected=f"at most {limits.MAX_PARAMETERS} parameters (limits.MAX_PARAMETERS)",
                          found=f"about {estimate} parameters")
