"""A1111's parameters text (utils/infotext.py): texts as the web UI writes them, latentdiff's own written and read
back, and truncated or garbled text, which is a UsageError naming where it came from, never another exception."""
from __future__ import annotations

import random

import pytest

from latentdiff import limits
from latentdiff.errors import UsageError
from latentdiff.utils.infotext import (
    FIELDS,
    Infotext,
    format_infotext,
    parse_infotext,
    quote,
    settings_from_infotext,
)

KNOWN = ("prompt", "negative", "seed", "steps", "guidance", "sampler", "eta", "height", "width", "n", "model",
         "dtype", "tokenizer", "schedule", "latentdiff")

# As the AUTOMATIC1111 web UI 1.10 writes them (multi-line prompts, quoted values, hires fix, LoRA hashes).
A1111_TXT2IMG = """masterpiece, best quality, a lighthouse on a cliff,
(dramatic sky:1.2), <lora:detail:0.6>
Negative prompt: lowres, bad anatomy, (worst quality:1.4)
Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, VAE: vae-ft-mse-840000-ema-pruned.ckpt, \
Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires steps: 12, Hires upscaler: Latent, \
Lora hashes: "detail: 2a3f9b1c7d0e", TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1"""
A1111_OLD = """a red circle on the left, blue background
Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"""
A1111_IMG2IMG = """portrait of a cat
Steps: 25, Sampler: DDIM, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 640x640, Model: sd15, \
Denoising strength: 0.6, Mask blur: 4, Version: v1.9.4"""


def test_a1111_txt2img_with_hires_fix_and_hashes():
    info = parse_infotext(A1111_TXT2IMG, where="x.png")
    assert info.prompt == "masterpiece, best quality, a lighthouse on a cliff,\n(dramatic sky:1.2), <lora:detail:0.6>"
    assert info.negative == "lowres, bad anatomy, (worst quality:1.4)"
    assert info.fields["Lora hashes"] == "detail: 2a3f9b1c7d0e" and info.fields["Size"] == "512x768"
    known = (*KNOWN, "clip_skip", "hires_scale", "hires_steps", "hires_strength", "hires_upscaler")
    settings, ignored = settings_from_infotext(info, known=known, where="x.png")
    assert settings == {"prompt": info.prompt, "negative": info.negative, "steps": 30, "sampler": "DPM++ 2M",
                        "schedule": "Karras", "guidance": 6.5, "seed": 3141592653, "width": 512, "height": 768,
                        "model": "v1-5-pruned-emaonly", "hires_strength": 0.45, "clip_skip": 2, "hires_scale": 2.0,
                        "hires_steps": 12, "hires_upscaler": "latent"}
    assert ignored == ["Model hash", "VAE hash", "VAE", "Lora hashes", "TI hashes"]   # A1111's version: not listed
    settings, ignored = settings_from_infotext(info, known=KNOWN, where="x.png")    # without those settings
    assert {"Clip skip", "Denoising strength", "Hires upscale", "Hires steps", "Hires upscaler"} <= set(ignored)
    assert "clip_skip" not in settings and "hires_scale" not in settings


def test_an_old_a1111_text_without_negative_prompt_or_version():
    info = parse_infotext(A1111_OLD, where="old.png")
    assert (info.prompt, info.negative) == ("a red circle on the left, blue background", "")
    settings, ignored = settings_from_infotext(info, known=KNOWN, where="old.png")
    assert settings["negative"] is None and settings["sampler"] == "Euler a" and settings["guidance"] == 7.0
    assert ignored == ["Model hash"]


def test_img2img_denoising_strength_is_the_strength():
    settings, _ = settings_from_infotext(parse_infotext(A1111_IMG2IMG, where="i.png"), known=(*KNOWN, "strength"),
                                         where="i.png")
    assert settings["strength"] == 0.6 and settings["schedule"] == "Automatic"


def test_latentdiffs_text_reads_back_the_same_settings():
    params = {"prompt": "a red circle, left\nsecond line: more", "negative": 'blur, "noise"', "steps": 4,
              "sampler": "dpmpp_2m", "schedule": "karras", "guidance": 7.5, "seed": 12, "width": 64, "height": 96,
              "model": "C:\\models\\sd, v1", "eta": 0.25, "latentdiff": "0.3.0", "n": 2}
    text = format_infotext(params)
    assert text.splitlines()[-1] == ('Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 12, '
                                     'Size: 64x96, Model: "C:\\\\models\\\\sd, v1", Eta DDIM: 0.25, '
                                     'Version: latentdiff 0.3.0')
    info = parse_infotext(text, where="t")
    settings, ignored = settings_from_infotext(info, known=KNOWN, where="t")
    expected = dict(params, sampler="DPM++ 2M", schedule="Karras")
    del expected["n"]
    assert settings == expected and ignored == []


def test_format_leaves_out_what_a1111_leaves_out():
    text = format_infotext({"prompt": "p", "negative": None, "steps": 2, "sampler": "ddim", "schedule": None,
                            "guidance": 3.0, "seed": 0, "width": 64, "height": 64, "eta": 0.0})
    assert text == "p\nSteps: 2, Sampler: DDIM, CFG scale: 3, Seed: 0, Size: 64x64"
    assert quote("a, b") == '"a, b"' and quote("plain") == "plain" and quote("x: y") == '"x: y"'


def test_one_table_both_ways():
    labels = [field.label for field in FIELDS]
    assert len(labels) == len(set(labels)) and labels[:6] == ["Steps", "Sampler", "Schedule type", "CFG scale",
                                                              "Seed", "Size"]


@pytest.mark.parametrize("text, words", [
    ("just a prompt", ["no A1111 settings line"]),
    ("a prompt\nSteps: 20, Sampler: Euler a, Seed: 1, Model: \"unterminated", ["broken quoted value", "Model"]),
    ("p\nSteps: twenty, Sampler: Euler, Seed: 1", ["Steps", "an integer", "twenty"]),
    ("p\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512", ["Size", "WIDTHxHEIGHT"]),
    ("p\nSteps: 20, Sampler: Euler, Seed: 1, CFG scale: 7.5.1", ["CFG scale", "a number"]),
    ("p\nSteps: 20, Sampler: Euler, Seed: 1e400000", ["Seed", "an integer"]),
    ("p\nSteps: 20, Sampler: Euler, Seed: " + "9" * 5000, ["Seed", "an integer"]),
    ("p\nSteps: 20, Sampler: Euler, Seed: 1, #$%: 3", ["no A1111 settings line"]),
    ("p\x00\nSteps: 20, Sampler: Euler, Seed: 1", ["NUL"]),
    ("p" * (limits.MAX_INFOTEXT_CHARS + 1), ["too long", str(limits.MAX_INFOTEXT_CHARS)]),
    (b"Steps: 20", ["not text"]),
])
def test_bad_texts_are_usage_errors_naming_where(text, words):
    with pytest.raises(UsageError) as info:
        settings_from_infotext(parse_infotext(text, where="bad.png: parameters"), known=KNOWN, where="bad.png")
    assert "bad.png" in str(info.value)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_truncated_and_garbled_texts_never_raise_anything_else():
    """Every prefix of a real text, and a few hundred random corruptions of it: parsed, or a UsageError."""
    rng = random.Random(15)
    texts = [A1111_TXT2IMG[:k] for k in range(0, len(A1111_TXT2IMG), 7)]
    alphabet = ',:"\\\n x5.-()'
    for _ in range(300):
        chars = list(rng.choice((A1111_TXT2IMG, A1111_OLD, A1111_IMG2IMG)))
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(chars))
            action = rng.random()
            if action < 0.4:
                chars[i] = rng.choice(alphabet)
            elif action < 0.7:
                del chars[i]
            else:
                chars.insert(i, rng.choice(alphabet))
        texts.append("".join(chars))
    parsed = 0
    for text in texts:
        try:
            info = parse_infotext(text, where="fuzz.png")
            settings_from_infotext(info, known=(*KNOWN, "clip_skip", "hires_scale", "hires_steps",
                                                "hires_strength", "hires_upscaler"), where="fuzz.png")
            assert isinstance(info, Infotext)
            parsed += 1
        except UsageError as e:
            assert "fuzz.png" in str(e)
    assert 0 < parsed < len(texts)
