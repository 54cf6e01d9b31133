"""Random LoRA files for the tiny Stable Diffusion of sd.py, in the spellings people download, and the published
merge math (W + up @ down * alpha / rank * w) applied by the tests themselves."""
from __future__ import annotations

from collections.abc import Iterable

import torch

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1")


def targets(unet: torch.nn.Module, text: torch.nn.Module | None = None, *, unet_suffixes: Iterable[str] = ATTENTION,
            text_suffixes: Iterable[str] = TEXT) -> list[tuple[str, str, tuple[int, ...]]]:
    """[(component, module name, weight shape)] of the modules a LoRA changes."""
    found = []
    unet_suffixes, text_suffixes = tuple(unet_suffixes), tuple(text_suffixes)
    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(unet_suffixes):
            found.append(("unet", name, tuple(m.weight.shape)))
    for name, m in (text.named_modules() if text is not None else ()):
        if isinstance(m, torch.nn.Linear) and name.endswith(text_suffixes):
            found.append(("text_encoder", name, tuple(m.weight.shape)))
    return found


def factors(shape: tuple[int, ...], rank: int, seed: int, std: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(down (r, in[, kh, kw]), up (out, r[, 1, 1])) random."""
    g = torch.Generator().manual_seed(seed)
    down = torch.randn((rank, *shape[1:]), generator=g) * std
    up = torch.randn((shape[0], rank, *([1, 1] if len(shape) == 4 else [])), generator=g) * std
    return down, up


def kohya(found: list[tuple[str, str, tuple[int, ...]]], *, rank: int = 4, alpha: float | None = 2.0, seed: int = 0,
          unet_names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """kohya / A1111 keys; `unet_names`: module name -> the name spelled in the file (e.g. CompVis')."""
    state = {}
    for i, (component, name, shape) in enumerate(found):
        text_name = "text_model." + name.removeprefix("text_model.")
        spelled = (unet_names or {}).get(name, name) if component == "unet" else text_name
        key = ("lora_unet_" if component == "unet" else "lora_te_") + spelled.replace(".", "_")
        down, up = factors(shape, rank, seed + i)
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
        if alpha is not None:
            state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def peft(found: list[tuple[str, str, tuple[int, ...]]], *, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """diffusers / PEFT keys (`unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`)."""
    state = {}
    for i, (component, name, shape) in enumerate(found):
        key = ("unet." if component == "unet" else "text_encoder.") + name
        down, up = factors(shape, rank, seed + i)
        state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = down, up
    return state


@torch.no_grad()
def merge_kohya(modules: dict[str, torch.nn.Module], state: dict[str, torch.Tensor], spelled: dict[str, str],
                weight: float = 1.0) -> None:
    """The published merge, W += up @ down * alpha / rank * w, onto `modules` (component -> module), for keys
    `spelled`: kohya key prefix -> (component, module name) as "component:name"."""
    for prefix, where in spelled.items():
        component, name = where.split(":")
        module = modules[component].get_submodule(name)
        down, up = state[f"{prefix}.lora_down.weight"], state[f"{prefix}.lora_up.weight"]
        rank = down.shape[0]
        alpha = float(state[f"{prefix}.alpha"]) if f"{prefix}.alpha" in state else rank
        dw = up.flatten(1) @ down.flatten(1)
        module.weight += (dw * alpha / rank * weight).reshape(module.weight.shape)


def parameters(*modules: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.state_dict().values()]


def same_parameters(before: list[torch.Tensor], *modules: torch.nn.Module) -> bool:
    after = [p for m in modules for p in m.state_dict().values()]
    return len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
