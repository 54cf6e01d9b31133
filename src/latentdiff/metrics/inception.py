"""The Inception network of FID: InceptionV3 as frozen in TensorFlow's `inception-2015-12-05` graph.

FID (Heusel et al. 2017), KID, the Inception Score and most published numbers use this one network, not
torchvision's InceptionV3: its weights differ, and so do three details that the FID ports (pytorch-fid,
torch-fidelity, clean-fid) reproduce and that are kept here:

- every "same"-padded 3x3 average pool of the A, C and E blocks averages over the real pixels only
  (TensorFlow's pooling ignores the padding: `count_include_pad=False`);
- the last block (Mixed_7c) pools its fourth branch with a 3x3 *max* pool, where Mixed_7b uses the average;
- the classifier has 1008 outputs (1000 ImageNet classes and 8 unused ones).

Input: RGB images (B, 3, H, W), floats in [0, 1] (or uint8 in [0, 255]), bilinearly resized to 299 x 299
(`align_corners=False`, as pytorch-fid) and mapped to [-1, 1]. Output: the 2048-d "pool3" features (the
global average pool after Mixed_7c) that FID, KID and precision/recall compare; `logits` gives the 1008
class logits from them for the Inception Score.

Weights are the published conversion of the TensorFlow graph, `pt_inception-2015-12-05-6726825d.pth`,
whose state-dict names (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, ..., `fc.weight`)
are the module names below, so it loads strictly with no key map. It is read from a local file (safetensors,
or a .pth through `torch.load(weights_only=True)`) or downloaded once into torch's hub cache (the same file
name pytorch-fid uses, so an existing download is reused) and checked against its sha256; `HF_HUB_OFFLINE=1`
forbids the download.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InputError
from ..models.base import check_state_dict, init_skipped_on_meta
from ..remote_weights import RemoteFile, read_state_dict

# sha256 of the release file: as pinned by public code that downloads this URL and by notes recording the
# file (95,628,359 bytes); its first 8 hex digits are the `6726825d` in the file name (torch.hub's convention),
# and torch-fidelity's copy of the same weights has the same digest. Not re-computed here (no network).
FID_WEIGHTS = RemoteFile(
    "pt_inception-2015-12-05-6726825d.pth",
    ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
     "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"),
    "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2")
INPUT_SIZE = 299        # the graph's input side
MIN_SIZE = 75           # smallest side the stem and the two stride-2 reductions leave >= 1 pixel for
POOL_FEATURES = 2048    # pool3
NUM_CLASSES = 1008      # the 2015 graph's softmax: 1000 ImageNet classes + 8 unused
BN_EPS = 1e-3           # TensorFlow's batch-norm epsilon in this graph
# Checkpoints saved from torch's BatchNorm2d carry a step counter that inference never reads; dropped on load.
IGNORED_KEY_SUFFIXES = (".num_batches_tracked",)


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics: (x - running_mean) / sqrt(running_var + eps) * weight + bias."""

    weight: torch.Tensor          # buffers, (C,) each
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, channels: int):
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((channels,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            eps=BN_EPS)


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm -> ReLU. `same`: pad odd kernels to keep the size (stride 1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int], *, stride: int = 1,
                 same: bool = True):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        padding = (kh // 2, kw // 2) if same else (0, 0)
        self.conv = nn.Conv2d(in_channels, out_channels, (kh, kw), stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's 3x3 "same" average pool: the mean over the pixels inside the image only."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Szegedy et al. 2016, fig. 5): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg-pool-1x1.
    (B, C, 35, 35) -> (B, 224 + pool_features, 35, 35)"""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | max-pool/2. (B, C, 35, 35) -> (B, 480 + C, 17, 17)"""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2, same=False)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, same=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (fig. 6), c7 channels inside. (B, 768, 17, 17) -> same"""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = conv(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_avg_pool(x))], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max-pool/2. (B, 768, 17, 17) -> (B, 1280, 8, 8)"""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, same=False)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, same=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)],
                         dim=1)


class InceptionE(nn.Module):
    """8x8 block with expanded 1x3 / 3x1 outputs (fig. 7). (B, C, 8, 8) -> (B, 2048, 8, 8)

    pool: "avg" (Mixed_7b) or "max" (Mixed_7c, the FID graph's irregularity) for the pooling branch.
    """

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3), self.branch_pool(pooled)], dim=1)


# The mixed blocks in order: (checkpoint name, block, constructor arguments).
MIXED_BLOCKS: tuple[tuple[str, type[nn.Module], tuple[Any, ...]], ...] = (
    ("Mixed_5b", InceptionA, (192, 32)), ("Mixed_5c", InceptionA, (256, 64)), ("Mixed_5d", InceptionA, (288, 64)),
    ("Mixed_6a", InceptionB, (288,)),
    ("Mixed_6b", InceptionC, (768, 128)), ("Mixed_6c", InceptionC, (768, 160)),
    ("Mixed_6d", InceptionC, (768, 160)), ("Mixed_6e", InceptionC, (768, 192)),
    ("Mixed_7a", InceptionD, (768,)),
    ("Mixed_7b", InceptionE, (1280, "avg")), ("Mixed_7c", InceptionE, (2048, "max")),
)


class InceptionV3(nn.Module):
    """The FID Inception network, frozen and always in eval mode. x: (B, 3, H, W) -> pool3 (B, 2048)

    `InceptionV3(pretrained=True)` (same as `InceptionV3.from_pretrained()`) loads the FID weights;
    `pretrained=False` keeps a random He-initialised network (identity batch norms), deterministic for a
    given `seed`: for tests and smoke runs only, its numbers mean nothing. `resize_input=False` skips the
    resize to `input_size` (299; inputs must then be at least 75 x 75); `normalize_input=False` takes inputs
    already in [-1, 1].
    """

    def __init__(self, *, pretrained: bool, resize_input: bool = True, normalize_input: bool = True,
                 seed: int | None = 0):
        super().__init__()
        self.resize_input, self.normalize_input = resize_input, normalize_input
        self.input_size = INPUT_SIZE
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, same=False)   # 299 -> 149
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, same=False)            # -> 147
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3)                        # (max pool -> 73)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, same=False)           # -> 71 (max pool -> 35)
        for name, block, args in MIXED_BLOCKS:
            self.add_module(name, block(*args))
        self.fc = nn.Linear(POOL_FEATURES, NUM_CLASSES)
        self.requires_grad_(False)
        self.eval()
        if pretrained:
            self.load_weights()
        elif seed is not None:   # None: torch's own initialisation only (weights loaded afterwards)
            self._init_random(seed)

    def _init_random(self, seed: int) -> None:
        # He init (fan_in, ReLU gain) keeps the activations near unit scale through the 94 conv layers,
        # so random-weight features are neither vanishing nor overflowing in tests.
        generator = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
        nn.init.normal_(self.fc.weight, std=POOL_FEATURES ** -0.5, generator=generator)
        nn.init.zeros_(self.fc.bias)

    def train(self, mode: bool = True) -> InceptionV3:
        """Stay in eval mode whatever a parent module asks: the metric network is fixed."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [0, 1] (float) or [0, 255] (uint8) -> pool3 features (B, 2048)"""
        x = self.prepare(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name, _, _ in MIXED_BLOCKS:
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the network's input: the weights' dtype, 299 x 299 (bilinear), [-1, 1]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError("the Inception network takes a batch of RGB images", where="InceptionV3(x)",
                             expected="(B, 3, H, W)", found=tuple(x.shape))
        if not self.resize_input and min(x.shape[-2:]) < MIN_SIZE:
            raise InputError("images too small for the Inception network without resizing", where="InceptionV3(x)",
                             expected=f"H and W >= {MIN_SIZE}, or resize_input=True", found=tuple(x.shape))
        dtype = self.fc.weight.dtype
        x = x.to(dtype) / 255 if x.dtype == torch.uint8 else x.to(dtype)
        size = (self.input_size, self.input_size)
        if self.resize_input and tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return 2 * x - 1 if self.normalize_input else x

    def logits(self, pool3: torch.Tensor, *, bias: bool = False) -> torch.Tensor:
        """pool3 (B, 2048) -> class logits (B, 1008).

        bias=False is what the Inception Score uses: the reference code of Salimans et al. (2016) multiplies
        pool3 by the softmax weights alone (torch-fidelity's "logits_unbiased").
        """
        weight = self.fc.weight.to(pool3.dtype)
        logits = pool3 @ weight.T
        return logits + self.fc.bias.to(pool3.dtype) if bias else logits

    # ---- weights --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_url: str | os.PathLike | None = None, *,
                        cache_dir: str | os.PathLike | None = None, resize_input: bool = True,
                        normalize_input: bool = True) -> InceptionV3:
        """The FID network with the weights of `path_or_url`: a local .safetensors / .pth file, a URL, or
        None for the published release (downloaded into `cache_dir`, default torch's hub cache, once)."""
        # built on the meta device with no initialisation (random weights that the load replaces would cost time:
        # benchmarks/RESULTS.md)
        with torch.device("meta"), init_skipped_on_meta():
            model = cls(pretrained=False, resize_input=resize_input, normalize_input=normalize_input, seed=None)
        return model.load_weights(path_or_url, cache_dir=cache_dir)

    def load_weights(self, path_or_url: str | os.PathLike | None = None, *,
                     cache_dir: str | os.PathLike | None = None) -> InceptionV3:
        """Load weights in place, strictly (see `from_pretrained`); returns self."""
        if path_or_url is not None and str(path_or_url) in FID_WEIGHTS.urls:
            path_or_url = None   # the release itself: cached under its name and checked against its sha256
        try:
            state, where = read_state_dict(path_or_url, default=FID_WEIGHTS, cache_dir=cache_dir)
        except CheckpointError as e:
            if path_or_url is not None:
                raise
            raise CheckpointError(f"no FID Inception weights: {e.message}", where=e.where,
                                  expected=f"{e.expected} (latentdiff eval: --inception-weights PATH)",
                                  found=e.found) from None
        self.load_state(state, source=where)
        return self

    def load_state(self, state: dict[str, torch.Tensor], *, source: str | None = None) -> None:
        """Load a state dict in the release's layout strictly (a CheckpointError lists any mismatch)."""
        state = {k: v for k, v in state.items() if not k.endswith(IGNORED_KEY_SUFFIXES)}
        check_state_dict(self, state, source=source)
        on_meta = any(t.is_meta for t in self.state_dict().values())
        self.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
                             if on_meta else state, strict=True, assign=on_meta)
