"""Token merging for Stable Diffusion (ToMe for SD: Bolya & Hoffman 2023, "Token Merging for Fast Stable
Diffusion"): a transformer block merges its N tokens into N - r before self-attention and copies the merged
results back ("unmerges") after it, so the attention runs over fewer tokens.

Bipartite soft matching with a 2-d destination set (the paper's sec. 3-4):

1. Split the h x w token grid into sy x sx cells; one token per cell is a destination (dst), chosen at random in
   the cell (`use_rand`, drawn from the settings' own torch.Generator) or the cell's top-left one; the others
   are sources (src). A grid that the strides do not divide keeps its last rows / columns as sources.
2. Cosine similarity of every src token to every dst token, on the block's input x (the "metric").
3. Each src token's best dst; the r src tokens with the highest best similarity are merged into their dst
   (averaged with it and with the other sources merged into it), the rest stay as they are:
   merge: (B, N, C) -> (B, N - r, C) = [unmerged src; dst].
4. unmerge: every dst token's result goes back to its own position and to those of the src tokens merged into
   it; the unmerged src tokens to theirs: (B, N - r, C) -> (B, N, C).

r = int(N x ratio) (at most the number of sources: a ratio above 1 - 1 / (sx sy) merges every source). The
matching is computed once per block call from x and applied around the self-attention (`merge_attn`, the
default), and optionally around the cross-attention and the feed-forward (the same matching). As in the paper's
code, the random destination choice is turned off for an odd batch (a batch that is not [uncond; cond] of
classifier-free guidance). Which blocks merge: those of the UNet levels downsampled at most `max_downsample`
times the latent size (1: the full-resolution levels only), set by `pipelines.token_merging.enable_tome`.
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import is_int, is_real
from ..errors import InputError


@dataclasses.dataclass(frozen=True)
class TokenMerging:
    """A transformer block's ToMe settings (`BasicTransformerBlock.token_merging`; None: no merging).

    generator: the random destination choice's; shared by all the blocks of a UNet, so that a run's choices
    follow one sequence (`restart` re-seeds it: the same pipeline call gives the same image again)."""

    ratio: float
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: int = 0
    generator: torch.Generator = dataclasses.field(default_factory=torch.Generator, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_settings(ratio=self.ratio, sx=self.sx, sy=self.sy)
        self.restart()

    def restart(self) -> None:
        """Re-seed the destination choice (at the start of each pipeline call)."""
        self.generator.manual_seed(self.seed)

    def matching(self, x: torch.Tensor, size: tuple[int, int], *,
                 picks: torch.Tensor | None = None) -> Matching | None:
        """The matching of this block call (x (B, N, C) the block's input, size (h, w) its token grid), or None
        when it merges nothing (r = 0). picks: the random cell positions drawn for this call ahead of it
        (`draw_picks`, what a compiled UNet needs: no generator inside its graph); None: drawn here."""
        r = int(x.shape[1] * self.ratio)
        if r <= 0:
            return None
        use_rand = self.use_rand and x.shape[0] % 2 == 0
        dst = destinations(*size, sx=self.sx, sy=self.sy, generator=self.generator if use_rand else None,
                           device=x.device, picks=picks if use_rand else None)
        return bipartite_matching(x, dst, r, n_dst=(size[0] // self.sy) * (size[1] // self.sx))

    def draw_picks(self, blocks: int, size: tuple[int, int], device: torch.device) -> torch.Tensor:
        """(blocks, cells) random cell positions, one row per merging block of a UNet call whose latent is
        size (h, w): cells = (h // sy) * (w // sx), the most any level has (a level's grid is at most the
        latent's); a block uses the first rows * cols of its row (`destinations`). On `device`, drawn from
        the generator."""
        cells = (size[0] // self.sy) * (size[1] // self.sx)
        picks = torch.randint(self.sy * self.sx, (blocks, cells), generator=self.generator,
                              device=self.generator.device)
        return picks.to(device)


def check_settings(*, ratio: float, sx: int, sy: int) -> None:
    if not is_real(ratio) or not 0.0 <= ratio < 1.0:
        raise InputError("the token merging ratio must lie in [0, 1)", where="ratio",
                         expected="0 <= ratio < 1 (0.5: half the tokens; at most 1 - 1/(sx*sy) merge)",
                         found=repr(ratio))
    for name, value in (("sx", sx), ("sy", sy)):
        if not is_int(value) or value < 1:
            raise InputError(f"{name} must be a positive integer", where=name, expected="int >= 1", found=repr(value))


def destinations(h: int, w: int, *, sx: int, sy: int, generator: torch.Generator | None,
                 device: torch.device, picks: torch.Tensor | None = None) -> torch.Tensor:
    """(h * w,) bool, row-major: True for the one destination token of each full sy x sx cell (at a random
    position in it: the first rows * cols of `picks` (cell positions drawn ahead, `TokenMerging.draw_picks`), else
    drawn from `generator`; its top-left one when both are None)."""
    rows, cols = h // sy, w // sx
    if picks is not None and picks.shape[0] >= rows * cols:   # (shorter: drawn for another call's size)
        pick = picks[:rows * cols].view(rows, cols)
    elif generator is None:
        pick = torch.zeros(rows, cols, dtype=torch.int64, device=device)
    else:   # drawn on the generator's device, as the choice must not depend on where the model runs
        pick = torch.randint(sy * sx, (rows, cols), generator=generator, device=generator.device)
    cells = torch.nn.functional.one_hot(pick, sy * sx).bool()             # (rows, cols, sy*sx), k = dy*sx + dx
    grid = cells.view(rows, cols, sy, sx).permute(0, 2, 1, 3).reshape(rows * sy, cols * sx)
    mask = torch.zeros(h, w, dtype=torch.bool, device=pick.device)
    mask[:rows * sy, :cols * sx] = grid
    return mask.flatten().to(device)


@dataclasses.dataclass(frozen=True)
class Matching:
    """The merge of one block call: token indices of the sources and destinations ((N_src,), (N_dst,)), and per
    batch row the sources kept (B, N_src - r) and merged (B, r) (indices into the sources), and the destination
    each merged source goes to (B, r) (an index into the destinations)."""

    src: torch.Tensor
    dst: torch.Tensor
    kept: torch.Tensor
    merged: torch.Tensor
    target: torch.Tensor

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - r, C): [kept sources; destinations averaged with the sources merged into them]."""
        c = y.shape[-1]
        sources, dests = y[:, self.src], y[:, self.dst]
        kept = sources.gather(1, self.kept[..., None].expand(-1, -1, c))
        moved = sources.gather(1, self.merged[..., None].expand(-1, -1, c))
        dests = dests.scatter_reduce(1, self.target[..., None].expand(-1, -1, c), moved, reduce="mean")
        return torch.cat([kept, dests], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N - r, C) -> (B, N, C): each token gets the result of the token it was merged into (or its own)."""
        b, _, c = y.shape
        n_kept = self.kept.shape[1]
        kept, dests = y[:, :n_kept], y[:, n_kept:]
        out = y.new_empty(b, self.src.shape[0] + self.dst.shape[0], c)
        out[:, self.dst] = dests
        rows = torch.arange(b, device=y.device)[:, None]
        out[rows, self.src[self.kept]] = kept
        out[rows, self.src[self.merged]] = dests.gather(1, self.target[..., None].expand(-1, -1, c))
        return out


@torch.no_grad()
def bipartite_matching(metric: torch.Tensor, dst_mask: torch.Tensor, r: int, *, n_dst: int | None = None) -> Matching:
    """Merge the r sources most similar (cosine, on metric (B, N, C)) to a destination into it (module docstring,
    steps 2-3). dst_mask: (N,) bool, True for the destinations; n_dst: how many (None: counted, a host sync).
    The indices come from a stable sort of the mask (sources, then destinations, each in token order): shapes
    known before the data, so torch.compile(fullgraph=True) traces it, where nonzero() has a data-dependent
    size."""
    n_dst = int(dst_mask.sum()) if n_dst is None else n_dst
    order = dst_mask.to(torch.uint8).argsort(stable=True)
    src, dst = order[:order.shape[0] - n_dst], order[order.shape[0] - n_dst:]
    r = min(r, src.shape[0])
    unit = metric / metric.norm(dim=-1, keepdim=True)
    scores = unit[:, src] @ unit[:, dst].transpose(1, 2)                   # (B, N_src, N_dst)
    best, best_dst = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:]
    return Matching(src=src, dst=dst, kept=kept, merged=merged, target=best_dst.gather(1, merged))
