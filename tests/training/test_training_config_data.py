"""Training configs, data, sampler, EMA, schedule: strict errors and exact positions (fast units)."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.errors import CheckpointError, ConfigError, InputError
from latentdiff.training.config import DataConfig, OptimConfig, load_train_config, train_config_from_dict
from latentdiff.training.data import (
    ImageDataset,
    ResumableBatchSampler,
    collate,
    crop_square,
    local_batch_size,
    make_loader,
    scan_image_folder,
    split_validation,
)
from latentdiff.training.ema import EMA
from latentdiff.training.loop import StepRandom, lr_factor
from tests._support.training import EXAMPLES, autoencoder_config, diffusion_config, make_shapes, write_yaml


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), count=24, size=20)


# ---- configs ------------------------------------------------------------------------------------
def test_unknown_key_names_key_and_file(tmp_path, shapes):
    config = autoencoder_config(shapes, tmp_path / "out", train={"max_stpes": 3})
    path = write_yaml(tmp_path / "ae.yaml", config)
    with pytest.raises(ConfigError) as e:
        load_train_config(path, "autoencoder")
    assert "max_stpes" in str(e.value) and str(path) in str(e.value) and "train" in str(e.value)


def test_unknown_section_and_nested_key(tmp_path, shapes):
    config = autoencoder_config(shapes, tmp_path / "out")
    config["optimiser"] = {"learning_rate": 1.0}
    with pytest.raises(ConfigError, match="optimiser"):
        load_train_config(write_yaml(tmp_path / "a.yaml", config), "autoencoder")
    config = autoencoder_config(shapes, tmp_path / "out", model={"architecture": {"chanels": [8, 16]}})
    path = write_yaml(tmp_path / "b.yaml", config)
    with pytest.raises(ConfigError) as e:
        load_train_config(path, "autoencoder")
    assert "chanels" in str(e.value) and "model.architecture" in str(e.value) and str(path) in str(e.value)
    config = autoencoder_config(shapes, tmp_path / "out", model={"loss": {"disc_start": 0, "kl_wieght": 1.0}})
    with pytest.raises(ConfigError, match="kl_wieght"):
        load_train_config(write_yaml(tmp_path / "c.yaml", config), "autoencoder")


def test_wrong_type_missing_section_and_stage_mismatch(tmp_path, shapes):
    config = autoencoder_config(shapes, tmp_path / "out", train={"max_steps": "ten"})
    with pytest.raises(ConfigError, match="max_steps"):
        train_config_from_dict(config, "autoencoder", source="x.yaml")
    del config["train"]
    with pytest.raises(ConfigError, match="missing section 'train'"):
        train_config_from_dict(config, "autoencoder", source="x.yaml")
    # a diffusion-only key in an autoencoder config is unknown there
    config = autoencoder_config(shapes, tmp_path / "out", train={"conditioning_dropout": 0.1})
    with pytest.raises(ConfigError, match="conditioning_dropout"):
        train_config_from_dict(config, "autoencoder", source="x.yaml")


def test_overrides_and_conditioning_checks(tmp_path, shapes):
    config = diffusion_config(shapes, tmp_path / "ae", tmp_path / "out", conditioning="class")
    path = write_yaml(tmp_path / "d.yaml", config)
    loaded = load_train_config(path, "diffusion", overrides=["train.max_steps=7", "sample.seeds=[3, 4]"])
    assert loaded.train.max_steps == 7 and loaded.sample.seeds == (3, 4)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_train_config(path, "diffusion", overrides=["max_steps"])
    with pytest.raises(ConfigError, match="num_class_embeds"):
        load_train_config(path, "diffusion", overrides=["model.unet.num_class_embeds=null"])
    with pytest.raises(ConfigError, match="cross-attention"):
        load_train_config(path, "diffusion", overrides=["model.conditioning=text", "model.text_encoder=x"])
    with pytest.raises(ConfigError, match="fixed crop"):
        load_train_config(path, "diffusion", overrides=["train.cache_latents=true", "data.center_crop=false"])


def test_yaml_boolean_words_are_read_as_the_choice_they_spell(tmp_path, shapes):
    """YAML 1.1 reads `mixed_precision: no` (file or --set) as False: it means the choice "no"; a bool that
    spells no choice is still a type error naming the field."""
    config = diffusion_config(shapes, tmp_path / "ae", tmp_path / "out", conditioning="class")
    path = write_yaml(tmp_path / "d.yaml", config)
    assert load_train_config(path, "diffusion", overrides=["train.mixed_precision=no"]).train.mixed_precision == "no"
    path.write_text(path.read_text().replace("train:\n", "train:\n  mixed_precision: no\n", 1))
    assert "\n  mixed_precision: no\n" in path.read_text()
    assert load_train_config(path, "diffusion").train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_train_config(path, "diffusion", overrides=["train.mixed_precision=yes"])
    with pytest.raises(ConfigError, match="lr_schedule"):
        load_train_config(path, "diffusion", overrides=["optim.lr_schedule=off"])


def test_example_configs_are_valid():
    """Every example config loads (strictly) as the stage its name says (LDMs have "ldm" in their names, ControlNets
    "silhouette", tiny autoencoders end in "-tiny-autoencoder", consistency distillations in "-lcm")."""
    from latentdiff.training.tiny_autoencoder import load_tiny_autoencoder_config

    paths = sorted(EXAMPLES.glob("*.yaml"))
    assert len(paths) >= 6
    for path in paths:
        if path.name.endswith("-tiny-autoencoder.yaml"):
            assert load_tiny_autoencoder_config(path).kind == "tiny-autoencoder"
            continue
        kind = "diffusion" if "ldm" in path.name else "controlnet" if "silhouette" in path.name else \
            "lcm" if path.name.endswith("-lcm.yaml") else "autoencoder"
        config = load_train_config(path, kind)
        assert config.kind == kind


# ---- data -----------------------------------------------------------------------------------------
def test_scan_captions_classes_and_none(tmp_path, shapes):
    index = scan_image_folder(DataConfig(path=str(shapes)))
    assert index.labels == "captions" and len(index.records) == 24
    first = json.loads((shapes / "metadata.jsonl").read_text().splitlines()[0])
    assert index.records[0].caption == first["text"]
    classes = make_shapes(tmp_path / "classes", count=12, size=8, labels="classes")
    index = scan_image_folder(DataConfig(path=str(classes)))
    assert index.labels == "classes" and index.class_names == ("circle", "square", "triangle")
    assert [index.class_names[r.label] for r in index.records] == [r.path.parent.name for r in index.records]
    assert scan_image_folder(DataConfig(path=str(shapes), labels="none")).records[0].caption is None


def test_no_images_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="no images") as e:
        scan_image_folder(DataConfig(path=str(tmp_path / "empty")))
    assert "notes.txt" in str(e.value)
    with pytest.raises(InputError, match="does not exist"):
        scan_image_folder(DataConfig(path=str(tmp_path / "nowhere")))


def test_missing_captions_listed_or_handled(tmp_path):
    folder = make_shapes(tmp_path / "d", count=6, size=8)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[1].pop("text")
    rows[4]["text"] = None
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))  # 00005 unlisted
    with pytest.raises(InputError, match="3 image") as e:
        scan_image_folder(DataConfig(path=str(folder)))
    assert all(name in str(e.value) for name in ("00001.png", "00004.png", "00005.png"))
    with pytest.warns(UserWarning, match="3 image"):
        kept = scan_image_folder(DataConfig(path=str(folder), on_missing_caption="skip"))
    assert [r.path.name for r in kept.records] == ["00000.png", "00002.png", "00003.png"]
    with pytest.warns(UserWarning):
        empty = scan_image_folder(DataConfig(path=str(folder), on_missing_caption="empty"))
    assert len(empty.records) == 6 and empty.records[1].caption == ""
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(InputError, match="name no image") as e:
        scan_image_folder(DataConfig(path=str(folder)))
    assert "gone.png" in str(e.value)


def test_corrupt_image_skipped_and_counted_or_error(tmp_path):
    folder = make_shapes(tmp_path / "d", count=4, size=8, labels="classes")
    bad = sorted(folder.rglob("*.png"))[1]
    bad.write_bytes(b"not a png at all")
    index = scan_image_folder(DataConfig(path=str(folder)))
    data = ImageDataset(index, resolution=8, random_flip=False)
    with pytest.warns(UserWarning, match=bad.name):
        batch = collate([data[(i, 0)] for i in range(4)])
    assert batch["skipped"] == 1 and batch["pixel_values"].shape == (4, 3, 8, 8)
    assert batch["index"].tolist() == [0, 2, 2, 3]  # the unreadable image 1 was replaced by the next one
    strict = ImageDataset(index, resolution=8, on_corrupt="error")
    with pytest.raises(InputError, match="unreadable image") as e:
        strict[(1, 0)]
    assert bad.name in str(e.value)


def test_transforms_resize_crop_flip():
    image = Image.fromarray(np.arange(30 * 20 * 3, dtype=np.uint8).reshape(20, 30, 3) % 251)
    out = crop_square(image, 10, flip=False)
    expected = image.resize((15, 10), Image.Resampling.BICUBIC).crop((2, 0, 12, 10))
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    flipped = crop_square(image, 10, flip=True)
    assert np.array_equal(np.asarray(flipped), np.asarray(expected)[:, ::-1])
    right = crop_square(image, 10, crop=(0.999, 0.0))
    assert np.array_equal(np.asarray(right), np.asarray(image.resize((15, 10), Image.Resampling.BICUBIC))[:, 5:])


def test_per_sample_randomness_is_seeded_not_worker_bound(shapes):
    index = scan_image_folder(DataConfig(path=str(shapes)))
    data = ImageDataset(index, resolution=16, center_crop=False, random_flip=True, seed=3)
    a, b = data[(5, 2)], data[(5, 2)]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["flip"] == b["flip"]
    flips = [data[(i, e)]["flip"] for i in range(8) for e in range(4)]
    assert 0 < sum(flips) < len(flips)
    sampler = ResumableBatchSampler(len(data), global_batch=4, seed=3)
    serial = [b for _, b in zip(range(3), make_loader(data, sampler, num_workers=0), strict=False)]
    parallel = [b for _, b in zip(range(3), make_loader(data, sampler, num_workers=2), strict=False)]
    for x, y in zip(serial, parallel, strict=True):
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and x["caption"] == y["caption"]


def test_validation_split_is_seeded_and_disjoint(shapes):
    index = scan_image_folder(DataConfig(path=str(shapes)))
    train, valid = split_validation(index, 5, seed=1)
    assert len(valid.records) == 5 and len(train.records) == 19
    assert not {r.path for r in train.records} & {r.path for r in valid.records}
    assert split_validation(index, 5, seed=1)[1] == valid
    with pytest.raises(ConfigError, match="validation_split"):
        split_validation(index, 24, seed=1)


# ---- the sampler ------------------------------------------------------------------------------------
def test_batch_not_divisible_by_processes():
    with pytest.raises(ConfigError, match="split evenly") as e:
        local_batch_size(6, 4)
    assert "multiple of 4" in str(e.value)
    with pytest.raises(ConfigError, match="smaller than one batch"):
        ResumableBatchSampler(5, global_batch=8)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_sampler_shards_the_global_batch_and_resumes_without_iterating():
    one = _take(iter(ResumableBatchSampler(10, global_batch=4, seed=7)), 7)  # 2 batches an epoch: 3+ epochs
    shards = [_take(iter(ResumableBatchSampler(10, global_batch=4, num_processes=2, process_index=p, seed=7)), 7)
              for p in range(2)]
    assert [a + b for a, b in zip(*shards, strict=True)] == one
    epochs = [batch[0][1] for batch in one]
    assert epochs == [0, 0, 1, 1, 2, 2, 3]
    for batch in one:
        assert len({i for i, _ in batch}) == 4
    epoch0 = sorted(i for batch in one[:2] for i, _ in batch)
    assert len(set(epoch0)) == 8  # no repeats within an epoch; the tail of 2 is dropped
    resumed = _take(iter(ResumableBatchSampler(10, global_batch=4, seed=7, start=3)), 4)
    assert resumed == one[3:]


# ---- EMA, schedule, step randomness ----------------------------------------------------------------
def test_ema_matches_direct_formula_and_round_trips():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.99, warmup=True)
    expected = [p.detach().clone() for p in net.parameters()]
    for n in range(1, 6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        d = min(0.99, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, net.parameters(), strict=True)]
    for e, s in zip(expected, ema.shadow, strict=True):
        torch.testing.assert_close(s, e, rtol=1e-6, atol=1e-7)
    before = [p.detach().clone() for p in net.parameters()]
    with ema.applied():
        assert all(torch.equal(p, s) for p, s in zip(net.parameters(), ema.shadow, strict=True))
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))
    other = EMA(torch.nn.Linear(3, 2), decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 5 and all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow, strict=True))
    with pytest.raises(CheckpointError, match="does not match"):
        EMA(torch.nn.Linear(4, 2)).load_state_dict(ema.state_dict())


def test_lr_schedule_warmup_then_cosine():
    optim = OptimConfig(learning_rate=1.0, warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.1)
    values = [lr_factor(s, optim, 14) for s in range(14)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == pytest.approx(1.0)
    assert values[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(values[4:], values[5:], strict=False))
    assert lr_factor(100, OptimConfig(), 10) == 1.0


def test_step_random_slices_the_global_draw():
    full = StepRandom(1, 5, 0, device=torch.device("cpu"), num_processes=1, process_index=0)
    parts = [StepRandom(1, 5, 0, device=torch.device("cpu"), num_processes=2, process_index=p) for p in range(2)]
    assert torch.equal(torch.cat([p.randn((2, 3), stream=1) for p in parts]), full.randn((4, 3), stream=1))
    assert torch.equal(torch.cat([p.randint(10, 2, stream=2) for p in parts]), full.randint(10, 4, stream=2))
    assert not torch.equal(full.randn((4, 3), stream=1), full.randn((4, 3), stream=2))
    other_step = StepRandom(1, 6, 0, device=torch.device("cpu"), num_processes=1, process_index=0)
    assert not torch.equal(full.rand(4, stream=3), other_step.rand(4, stream=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full.rand(4, stream=0)


def test_adamw_is_fused_on_cpu_and_steps_like_the_loop():
    """make_adamw: fused where every parameter is a float CPU/CUDA tensor; one step lands where torch's
    per-parameter AdamW lands (to float rounding)."""
    from latentdiff.training.loop import make_adamw

    torch.manual_seed(0)
    optim = OptimConfig(learning_rate=1e-3)
    a = torch.nn.Linear(8, 4)
    b = torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    start = [p.detach().clone() for p in a.parameters()]
    fused = make_adamw(list(a.parameters()), optim, 1e-3)
    loop = torch.optim.AdamW(b.parameters(), lr=1e-3, betas=optim.betas, weight_decay=optim.weight_decay,
                             eps=optim.eps, foreach=False)
    assert fused.defaults["fused"] is True
    x = torch.randn(16, 8)
    for _ in range(3):
        for model, opt in ((a, fused), (b, loop)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for pa, pb, p0 in zip(a.parameters(), b.parameters(), start, strict=True):
        assert not torch.equal(pa, p0)                  # the steps moved the weights
        assert torch.allclose(pa, pb, rtol=1e-6, atol=1e-7)
