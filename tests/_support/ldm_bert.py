"""A tiny LDMBert as diffusers builds it (the reference of the LDMBert tests), and an offline WordPiece tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ("a", "painting", "of", "squirrel", "eating", "burger", "the", "cat", "dog", "photo", "red", "blue",
         "##s", "##ing", "sat", "on", "mat", ",", ".", "!")
VOCAB = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") + WORDS
TINY = dict(vocab_size=len(VOCAB), max_position_embeddings=77, encoder_layers=2, encoder_ffn_dim=64,
            encoder_attention_heads=2, head_dim=16, d_model=32)


def reference_model(seed: int = 0, **overrides):
    """diffusers' LDMBertModel with random weights (layer norms too, so a skipped norm shows), eval mode."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig as RefConfig
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

    torch.manual_seed(seed)
    model = LDMBertModel(RefConfig(**(TINY | overrides))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "norm" not in name else 0.2) + (1.0 if "norm.weight" in name else 0))
    return model


def write_bert_tokenizer(folder: Path) -> Path:
    """An offline BERT WordPiece tokenizer (uncased) over VOCAB, laid out like the repo's tokenizer/ folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(f"{t}\n" for t in VOCAB))
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512,
              "unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
              "mask_token": "[MASK]"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
