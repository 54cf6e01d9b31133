"""IP-Adapter (Ye et al. 2023): image prompts through decoupled cross-attention.

A CLIP image embedding becomes a few context tokens (the image projection), and every cross-attention of the UNet
gets its own key and value projections for them: Attention(q, K_text, V_text) + scale * Attention(q, K_ip, V_ip),
the UNet's weights unchanged. Two projections, as the released SD 1.5 files hold them:

    plain   (`ip-adapter_sd15`)       image_proj.proj (Linear E -> 4 x D) + image_proj.norm (LayerNorm D): 4 tokens
                                      from the projected pooled embedding (`image_embeds`, (B, E))
    plus    (`ip-adapter-plus_sd15`)  a Perceiver resampler (Jaegle et al. 2021; Flamingo's) over the penultimate
                                      hidden states of the vision tower ((B, 257, E)): 16 learned queries
                                      cross-attending to the patches, 4 layers (`image_proj.latents`, `proj_in`,
                                      `layers.N.0` = attention, `layers.N.1` = feed-forward, `proj_out`, `norm_out`)

The parameter names here are the released files' (`image_proj.*`, `ip_adapter.N.to_k_ip.weight`), so a file loads
strictly without a key map. `ip_adapter.N` numbers the UNet's attention layers as the original code (and diffusers)
enumerate them (down blocks, up blocks, then the mid block; self- and cross-attention alternating): the cross-
attentions are the odd numbers 1, 3, 5, ... in that order (`cross_attentions`).

How the image tokens reach the layers: the pipeline appends them to the text context (so every batch split that a
sampler or guidance makes keeps them with their rows), and says how many they are for the call in a context
variable (`image_tokens`): each installed `ImageAttention` splits that many off the end of its context
(`layers.attention.ExtraTokens`). Outside such a call the count is 0: the UNet is the base model.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import cast

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from ..layers.attention import Attention, attention
from ..layers.prepacked import restore_weights

# How many image tokens the context of the current UNet call ends with, per loaded adapter in order (its `slot`;
# () or 0: none). A context variable, not module state: two threads sharing one pipeline see their own call's.
IMAGE_TOKENS: contextvars.ContextVar[tuple[int, ...]] = contextvars.ContextVar("ip_adapter_image_tokens", default=())
# The same count as a plain global for a compiled UNet (`pipe.compile()`): torch.compile cannot read a context
# variable, but it reads (and guards on) a module global, recompiling when it changes. Compiled and threaded with
# different image counts at once is the one case where calls could see each other's count.
_COMPILED_TOKENS: tuple[int, ...] = ()
PLAIN_TOKENS = 4           # the plain projection's tokens per image (`proj` is E -> 4 x D)
DIM_HEAD = 64              # the resampler's head width (the released files' to_q rows = heads x 64)


@contextlib.contextmanager
def image_tokens(counts: tuple[int, ...]) -> Iterator[None]:
    """Within the block, UNet calls' contexts end with counts[0] image tokens of the first adapter, then counts[1]
    of the second ..."""
    global _COMPILED_TOKENS
    token, before = IMAGE_TOKENS.set(counts), _COMPILED_TOKENS
    _COMPILED_TOKENS = counts
    try:
        yield
    finally:
        IMAGE_TOKENS.reset(token)
        _COMPILED_TOKENS = before


class ImageProjection(nn.Module):
    """Plain IP-Adapter: image_embeds (B, E) -> (B, tokens, D) = LayerNorm(reshape(proj(image_embeds)))."""

    def __init__(self, embed_dim: int, cross_attention_dim: int, *, tokens: int = PLAIN_TOKENS):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(embed_dim, tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.proj(image_embeds.to(self.proj.weight.dtype))
        return self.norm(x.reshape(x.shape[0], self.tokens, -1))


class PerceiverAttention(nn.Module):
    """The resampler's attention: the latents (queries) attend to the image features and to themselves.

    x: (B, L, W) features, latents: (B, Q, W) -> (B, Q, W). Keys and values come from one `to_kv` (2W rows: keys
    then values), as the released files store them."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        inner = heads * DIM_HEAD
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(attention(self.to_q(latents), k, v, self.heads))


class Resampler(nn.Module):
    """IP-Adapter plus: hidden states (B, L, E) -> (B, Q, D) through `depth` layers of [latents + attn, latents +
    FF] on Q learned latents (width W), then proj_out and norm_out. FF: LayerNorm, Linear W -> W x ratio, GELU,
    Linear back (bias-free)."""

    def __init__(self, *, embed_dim: int, width: int, output_dim: int, queries: int, depth: int, heads: int,
                 ff_inner: int):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, queries, width))
        self.proj_in = nn.Linear(embed_dim, width)
        self.proj_out = nn.Linear(width, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(width, heads),
                           nn.Sequential(nn.LayerNorm(width), nn.Linear(width, ff_inner, bias=False), nn.GELU(),
                                         nn.Linear(ff_inner, width, bias=False))])
            for _ in range(depth))

    @property
    def tokens(self) -> int:
        return self.latents.shape[1]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(hidden_states.to(self.proj_in.weight.dtype))
        latents = self.latents.repeat(x.shape[0], 1, 1)
        for layer in self.layers:   # each is the ModuleList [attention, feed-forward]
            attn, ff = cast(nn.ModuleList, layer)
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class ImageAttention(nn.Module):
    """The image half of one decoupled cross-attention: scale x Attention(q, to_k_ip(tokens), to_v_ip(tokens)),
    with the layer's heads and attention settings (`layers.attention.ExtraTokens`)."""

    def __init__(self, context_dim: int, inner: int, *, slot: int = 0):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
        self.to_v_ip = nn.Linear(context_dim, inner, bias=False)
        self.scale = 1.0   # set_ip_adapter_scale: a plain float, read at each call
        self.slot = slot   # which adapter of the pipeline's it belongs to: its place among the appended tokens

    def count(self) -> int:
        counts = _COMPILED_TOKENS if torch.compiler.is_compiling() else IMAGE_TOKENS.get()
        return counts[self.slot] if self.slot < len(counts) else 0

    def forward(self, q: torch.Tensor, tokens: torch.Tensor, layer: Attention) -> torch.Tensor:
        tokens = tokens.to(self.to_k_ip.weight.dtype)
        out = attention(q, self.to_k_ip(tokens), self.to_v_ip(tokens), layer.heads, upcast=layer.upcast,
                        chunk_size=layer.chunk_size, max_bytes=layer.max_bytes)
        return out * self.scale if self.scale != 1.0 else out


class IPAdapter(nn.Module):
    """One IP-Adapter file as a module: `image_proj` (ImageProjection or Resampler) and `ip_adapter` (one
    ImageAttention per attention layer number; the self-attention numbers hold none). Its state dict is the
    released safetensors file's, key for key."""

    def __init__(self, image_proj: ImageProjection | Resampler, attentions: Mapping[int, ImageAttention]):
        super().__init__()
        self.image_proj = image_proj
        self.ip_adapter = nn.ModuleDict({str(n): attentions[n] for n in sorted(attentions)})

    @property
    def is_plus(self) -> bool:
        """Whether it reads the vision tower's penultimate hidden states (the resampler), not the image embedding."""
        return isinstance(self.image_proj, Resampler)

    @property
    def tokens(self) -> int:
        """Context tokens per image."""
        return self.image_proj.tokens

    def attentions(self) -> list[ImageAttention]:
        return [m for m in self.ip_adapter.values() if isinstance(m, ImageAttention)]

    def project(self, embeds: torch.Tensor) -> torch.Tensor:
        """Per-image CLIP features (B, K, E) (plain) or (B, K, L, E) (plus), K images per row -> the context tokens
        (B, K x tokens, D), as diffusers' MultiIPAdapterImageProjection + IPAdapterAttnProcessor lay them out."""
        b, k = embeds.shape[:2]
        out = self.image_proj(embeds.reshape(b * k, *embeds.shape[2:]))
        return out.reshape(b, k * out.shape[1], out.shape[2])

    @classmethod
    @torch.no_grad()
    def for_unet(cls, unet: nn.Module, *, image_embed_dim: int, plus: bool = False, queries: int = 16,
                 depth: int = 4) -> IPAdapter:
        """An untrained adapter for `unet`, as IP-Adapter's training starts one: the image keys and values copied
        from each layer's text ones (to_k, to_v), the projection freshly initialised. image_embed_dim: the
        encoder's projection_dim (plain) or hidden_size (plus); plus: a resampler of the released shape (width and
        output the UNet's context width, 64-wide heads, `queries` tokens, `depth` layers)."""
        layers = [layer for _, layer in cross_attentions(unet)]
        if not layers:
            raise InputError("this UNet has no cross-attention for an IP-Adapter", where="unet",
                             expected="a UNet with cross_attention_dim", found=type(unet).__name__)
        cross = layers[0].to_k.in_features
        proj: ImageProjection | Resampler
        if plus:
            proj = Resampler(embed_dim=image_embed_dim, width=cross, output_dim=cross, queries=queries, depth=depth,
                             heads=max(1, cross // DIM_HEAD), ff_inner=4 * cross)
            proj.latents.copy_(torch.randn(1, queries, cross) / cross**0.5)
        else:
            proj = ImageProjection(image_embed_dim, cross)
        attentions = {}
        for i, layer in enumerate(layers):
            restore_weights(layer)   # their plain values, if optimize_for_cpu packed them in place
            attentions[2 * i + 1] = ImageAttention(layer.to_k.in_features, layer.to_k.out_features)
            attentions[2 * i + 1].to_k_ip.weight.copy_(layer.to_k.weight)
            attentions[2 * i + 1].to_v_ip.weight.copy_(layer.to_v.weight)
        return cls(proj, attentions).to(layers[0].to_k.weight.device)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], *, source: str) -> IPAdapter:
        """The module of a released file's tensors (`image_proj.*`, `ip_adapter.N.to_k_ip.weight` /
        `to_v_ip.weight`; a .bin's nested {"image_proj": ..., "ip_adapter": ...} flattened first), shapes read from
        the tensors, loaded strictly (a CheckpointError naming the file for anything else)."""
        state = flatten(state, source=source)
        proj = {k.removeprefix("image_proj."): v for k, v in state.items() if k.startswith("image_proj.")}
        numbers = sorted({int(k.split(".")[1]) for k in state if k.startswith("ip_adapter.")
                          and k.split(".")[1].isdigit()})
        if not proj or not numbers:
            raise CheckpointError("not an IP-Adapter file: it needs image_proj.* and ip_adapter.N.* tensors",
                                  where=source, expected="image_proj.proj.weight (plain) or image_proj.latents "
                                  "(plus), and ip_adapter.1.to_k_ip.weight ...", found=sorted(state)[:8])
        image_proj = _projection(proj, source=source)
        attentions = {}
        for n in numbers:
            weight = state.get(f"ip_adapter.{n}.to_k_ip.weight")
            if weight is None or weight.ndim != 2:
                raise CheckpointError("an ip_adapter entry without its to_k_ip weight", where=source,
                                      expected=f"ip_adapter.{n}.to_k_ip.weight (inner, context_dim)",
                                      found=sorted(k for k in state if k.startswith(f"ip_adapter.{n}.")))
            attentions[n] = ImageAttention(weight.shape[1], weight.shape[0])
        model = cls(image_proj, attentions)
        _load(model, state, source=source)
        return model.eval()


def flatten(state: Mapping[str, object], *, source: str) -> dict[str, torch.Tensor]:
    """The .bin layout ({"image_proj": {...}, "ip_adapter": {...}}) or the flat safetensors one -> flat keys."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, Mapping):
            for inner, tensor in value.items():
                flat[f"{key}.{inner}"] = tensor
        elif isinstance(value, torch.Tensor):
            flat[key] = value
        else:
            raise CheckpointError("an IP-Adapter file holds tensors (or the .bin's two dicts of them)", where=source,
                                  expected="tensors", found=f"{key}: {type(value).__name__}")
    return flat


def _projection(proj: Mapping[str, torch.Tensor], *, source: str) -> ImageProjection | Resampler:
    """The image projection the tensors describe: plain (`proj.weight` + `norm`) or plus (`latents` + layers)."""
    if "proj.weight" in proj and "norm.weight" in proj:
        cross = proj["norm.weight"].shape[0]
        return ImageProjection(proj["proj.weight"].shape[1], cross, tokens=proj["proj.weight"].shape[0] // cross)
    if "latents" in proj and "proj_in.weight" in proj and "proj_out.weight" in proj:
        depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
        q = proj.get("layers.0.0.to_q.weight")
        ff = proj.get("layers.0.1.1.weight")
        if q is None or ff is None:
            raise CheckpointError("a resampler without its first layer", where=source,
                                  expected="image_proj.layers.0.0.to_q.weight and image_proj.layers.0.1.1.weight",
                                  found=sorted(proj)[:8])
        return Resampler(embed_dim=proj["proj_in.weight"].shape[1], width=proj["latents"].shape[2],
                         output_dim=proj["proj_out.weight"].shape[0], queries=proj["latents"].shape[1],
                         depth=depth, heads=q.shape[0] // DIM_HEAD, ff_inner=ff.shape[0])
    raise CheckpointError("an IP-Adapter image projection of a kind latentdiff does not load", where=source,
                          expected="plain (image_proj.proj + image_proj.norm) or plus (image_proj.latents, "
                          "proj_in, layers, proj_out, norm_out)", found=sorted(proj)[:8])


def _load(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Strict: every key used, every shape the module's."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError("the IP-Adapter file does not match its own layout", where=source,
                              expected=f"missing: {missing[:5]}", found=f"unexpected: {unexpected[:5]}, "
                              f"wrong shapes: {[(k, tuple(state[k].shape)) for k in wrong[:5]]}")
    model.load_state_dict({k: v.detach().to(torch.float32) for k, v in state.items()}, strict=True)


def cross_attentions(unet: nn.Module) -> list[tuple[str, Attention]]:
    """The UNet's cross-attention layers in the IP-Adapter numbering's order (down blocks, up blocks, mid block; as
    each block's layers come): the i-th is `ip_adapter.{2i + 1}`."""
    found = [(name, m) for name, m in unet.named_modules()
             if isinstance(m, Attention) and name.endswith("attn2")]
    order = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
    return sorted(found, key=lambda item: order.get(item[0].split(".")[0], 3))   # stable: block order kept


def check_fits(adapter: IPAdapter, unet: nn.Module, *, source: str) -> list[Attention]:
    """The UNet layers the adapter's attentions go into, in order; a CheckpointError (before anything is changed)
    when the numbers or widths do not match this UNet."""
    layers = cross_attentions(unet)
    expected = [str(2 * i + 1) for i in range(len(layers))]
    if list(adapter.ip_adapter) != expected:
        raise CheckpointError("the IP-Adapter's attention layers do not match this UNet's cross-attentions",
                              where=source, expected=f"ip_adapter.{{{', '.join(expected[:4])}, ...}} "
                              f"({len(layers)} layers)",
                              found=f"{len(adapter.ip_adapter)}: {list(adapter.ip_adapter)[:6]}")
    for (name, layer), ip in zip(layers, adapter.attentions(), strict=True):
        want = (layer.to_k.out_features, layer.to_k.in_features)
        if tuple(ip.to_k_ip.weight.shape) != want:
            raise CheckpointError("an IP-Adapter attention of another width than the UNet layer it goes into",
                                  where=f"{source}: {name}", expected=want, found=tuple(ip.to_k_ip.weight.shape))
    return [layer for _, layer in layers]


def check_image_features(adapter: IPAdapter, embeds: torch.Tensor, *, where: str) -> None:
    """(B, K, E) for a plain adapter, (B, K, L, E) for plus; E the projection's input width."""
    plus = adapter.is_plus
    proj = adapter.image_proj
    width = proj.proj_in.in_features if isinstance(proj, Resampler) else proj.proj.in_features
    ndim = 4 if plus else 3
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != ndim or embeds.shape[-1] != width \
            or not embeds.is_floating_point():
        shape = "(B, K images, L tokens, E)" if plus else "(B, K images, E)"
        raise InputError("IP-Adapter image embeddings of the wrong shape", where=where,
                         expected=f"a float tensor {shape} with E = {width}",
                         found=tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__)


__all__ = ["IPAdapter", "ImageProjection", "Resampler", "ImageAttention", "image_tokens", "cross_attentions",
           "check_fits", "check_image_features", "IMAGE_TOKENS"]
