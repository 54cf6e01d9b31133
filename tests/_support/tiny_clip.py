"""A tiny CLIP text encoder and tokenizer, built offline, for tests.

    text_encoder_dir, tokenizer_dir = make_tiny_clip(tmp_path / "sd")   # .../sd/text_encoder, .../sd/tokenizer

The tokenizer folder is laid out like Stable Diffusion's `tokenizer/` (vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json) and loads with transformers' CLIPTokenizer,
CLIPTokenizerFast and AutoTokenizer. Its byte-level BPE vocabulary is built here, in CLIP's order:
the 256 byte characters, their end-of-word forms ("a</w>"), one token per merge, then
<|startoftext|> and <|endoftext|>. A few merges make whole-word tokens ("photo</w>", "cat</w>") so
that tokenization is more than byte splitting. Words the merges don't cover still tokenize, byte by
byte, so any prompt works.

The text encoder folder is a plain transformers CLIPTextModel folder (config.json + model.safetensors)
with random weights from `seed`; the layer norms get random affine parameters too, so a test can tell
whether the final layer norm was applied.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# (left, right) pairs in merge-rank order; each adds the token left+right to the vocabulary.
MERGES: tuple[tuple[str, str], ...] = (
    ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"),
    ("o", "f</w>"), ("c", "a"), ("ca", "t</w>"), ("t", "h"), ("th", "e</w>"),
    ("d", "o"), ("do", "g</w>"),
)


def byte_chars() -> list[str]:
    """GPT-2 / CLIP's byte -> printable-character table, in its canonical order (256 characters)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)  # unprintable bytes map past 255, as in CLIP's bytes_to_unicode
            extra += 1
    return [chr(c) for c in codes]


def tiny_clip_vocab() -> dict[str, int]:
    """token -> id, in CLIP's order; <|startoftext|> and <|endoftext|> are the last two ids."""
    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in MERGES] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


TINY_VOCAB_SIZE = len(tiny_clip_vocab())  # 256 + 256 + len(MERGES) + 2


def write_tiny_clip_tokenizer(folder: str | Path, *, model_max_length: int = 77) -> Path:
    """Write a CLIP tokenizer folder (SD layout: vocab.json, merges.txt and the two small json files)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tiny_clip_vocab(), ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES)
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def tiny_clip_config(*, hidden_size: int = 32, num_hidden_layers: int = 2, num_attention_heads: int = 4,
                     intermediate_size: int = 37, hidden_act: str = "quick_gelu",
                     max_position_embeddings: int = 77, vocab_size: int = TINY_VOCAB_SIZE):
    """A transformers CLIPTextConfig matching the tiny tokenizer's special-token ids."""
    from transformers import CLIPTextConfig

    vocab = tiny_clip_vocab()
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                          num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                          hidden_act=hidden_act, max_position_embeddings=max_position_embeddings,
                          bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])


def random_clip_text_model(config, *, seed: int = 0, architecture: str = "CLIPTextModel"):
    """A transformers CLIPTextModel (or `architecture`, e.g. CLIPTextModelWithProjection) with random weights from
    `seed` (layer norms' weight and bias randomised too), in eval mode."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
    return model.eval()


def make_tiny_clip(path: str | Path, *, seed: int = 0, hidden_size: int = 32, num_hidden_layers: int = 2,
                   num_attention_heads: int = 4, intermediate_size: int = 37, hidden_act: str = "quick_gelu",
                   max_position_embeddings: int = 77, text_encoder_subfolder: str = "text_encoder",
                   tokenizer_subfolder: str = "tokenizer") -> tuple[Path, Path]:
    """Write a tiny CLIPTextModel folder and a CLIP tokenizer folder under `path`; return both folders.

    `path/text_encoder` holds config.json + model.safetensors (plain transformers, no latentdiff files);
    `path/tokenizer` holds the tokenizer. hidden_size is the UNet's cross-attention width.
    `hidden_act="gelu"` with a penultimate-layer TextEncoderConfig mimics SD 2.x.
    """
    path = Path(path)
    config = tiny_clip_config(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                              num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                              hidden_act=hidden_act, max_position_embeddings=max_position_embeddings)
    text_encoder_dir = path / text_encoder_subfolder
    random_clip_text_model(config, seed=seed).save_pretrained(text_encoder_dir)
    tokenizer_dir = write_tiny_clip_tokenizer(path / tokenizer_subfolder, model_max_length=max_position_embeddings)
    return text_encoder_dir, tokenizer_dir


def run_without_transformers(code: str) -> None:
    """Run `code` in a fresh interpreter and fail if it imported transformers (the native CLIP path's promise)."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(code) + "\nassert 'transformers' not in sys.modules, 'transformers was imported'\n"
    result = subprocess.run([sys.executable, "-c", "import sys\n" + code], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
