"""What a control network adds to the UNet: `Residuals`, the one value ControlNets and T2I-Adapters hand the UNet.

    residuals = Residuals(down=down, mid=mid)                 # a ControlNet (Zhang et al. 2023)
    residuals = Residuals(intrablock=features)                # a T2I-Adapter (Mou et al. 2023)
    eps = unet(x, t, context, residuals=residuals_1 + residuals_2)   # several: their sum

- `down`: one tensor per UNet skip (conv_in's output, then every resnet / downsampler output of the way down, the
  order `UNet2DConditional` keeps them in), added to the skips after the way down;
- `mid`: added to the mid level's output;
- `intrablock`: one tensor per down level (and, SDXL adapters, one more for the mid level): added inside the way
  down, where diffusers' `down_intrablock_additional_residuals` go: after a cross-attention level's last
  resnet + transformer pair (so its skip carries it), after a plain level's downsampler (the next level's input
  only), after the mid level when one is left over with the mid level's shape.

Sums are elementwise (several ControlNets, several adapters, or both): `None` parts are absent, not zero.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..errors import InputError


def _add_optional(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def _add_sequences(a: tuple[torch.Tensor, ...] | None, b: tuple[torch.Tensor, ...] | None,
                   *, name: str) -> tuple[torch.Tensor, ...] | None:
    if a is None or b is None:
        return b if a is None else a
    if len(a) != len(b):
        raise InputError(f"residuals of two control networks differ in their number of {name} tensors",
                         where=f"residuals.{name}", expected=len(a), found=len(b))
    return tuple(x + y for x, y in zip(a, b, strict=True))


@dataclasses.dataclass(frozen=True)
class Residuals:
    """Features a control network adds to the UNet's (see the module docstring for where each part goes)."""

    down: tuple[torch.Tensor, ...] | None = None
    mid: torch.Tensor | None = None
    intrablock: tuple[torch.Tensor, ...] | None = None

    def __add__(self, other: Residuals) -> Residuals:
        if not isinstance(other, Residuals):
            return NotImplemented
        return Residuals(down=_add_sequences(self.down, other.down, name="down"),
                         mid=_add_optional(self.mid, other.mid),
                         intrablock=_add_sequences(self.intrablock, other.intrablock, name="intrablock"))

    def scaled(self, scale: float) -> Residuals:
        """Every part times `scale` (a python float: fp16 stays fp16)."""
        return Residuals(down=None if self.down is None else tuple(r * scale for r in self.down),
                         mid=None if self.mid is None else self.mid * scale,
                         intrablock=None if self.intrablock is None else tuple(r * scale for r in self.intrablock))

    def rows(self, index: torch.Tensor | slice) -> Residuals:
        """The residuals of some batch rows (tiled or chunked calls)."""
        def pick(parts: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
            return None if parts is None else tuple(r[index] for r in parts)
        return Residuals(down=pick(self.down), mid=None if self.mid is None else self.mid[index],
                         intrablock=pick(self.intrablock))

    def check(self, skips: Sequence[torch.Tensor]) -> None:
        """The down residuals must match the UNet's skips one for one (count and shape): InputError first."""
        if self.down is None:
            return
        if len(self.down) != len(skips):
            raise InputError("residuals.down must have one tensor per UNet skip", where="residuals.down",
                             expected=len(skips), found=len(self.down))
        for i, (r, s) in enumerate(zip(self.down, skips, strict=True)):
            if r.shape != s.shape:
                raise InputError(f"residuals.down[{i}] does not match the UNet's skip {i}",
                                 where=f"residuals.down[{i}]", expected=tuple(s.shape), found=tuple(r.shape))
