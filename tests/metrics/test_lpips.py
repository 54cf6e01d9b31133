"""LPIPS: the distance against a layer-by-layer reference written here from the paper's formula, its
properties, and strict loading of weights in their publishers' layouts (torchvision VGG16, LPIPS heads)."""
from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.errors import CheckpointError, InputError
from latentdiff.hub import save_safetensors
from latentdiff.training.lpips import LPIPS, LPIPS_VGG_V01, RemoteFile, download_weights
from tests._support.parity import assert_parity

# torchvision vgg16().features, written out: conv indices and widths; a 2x2 max-pool precedes the
# convs at 5, 10, 17 and 24; LPIPS taps the ReLU after the convs at 2, 7, 14, 21 and 28.
CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256), 14: (256, 256),
         17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512)}
POOL_BEFORE = {5, 10, 17, 24}
TAP_AFTER = (2, 7, 14, 21, 28)
HEAD_WIDTHS = (64, 128, 256, 512, 512)
SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


def reference_lpips(vgg: dict[str, torch.Tensor], heads: list[torch.Tensor], x, y) -> torch.Tensor:
    """Zhang et al. 2018 eq. 1 with plain ops, in the original order (1x1 conv per pixel, then mean)."""
    def taps(img):
        h, out = (img - SHIFT) / SCALE, []
        for i, _ in sorted(CONVS.items()):
            if i in POOL_BEFORE:
                h = F.max_pool2d(h, 2, 2)
            h = F.relu(F.conv2d(h, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1))
            if i in TAP_AFTER:
                out.append(h)
        return out

    def normalize_tensor(f, eps=1e-10):
        return f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + eps)

    total = 0
    for fx, fy, w in zip(taps(x), taps(y), heads, strict=True):
        diff = (normalize_tensor(fx) - normalize_tensor(fy)) ** 2
        total = total + F.conv2d(diff, w).mean(dim=(2, 3))
    return total.flatten()


def torchvision_vgg16_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (cin, cout) in CONVS.items():
        state[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2.0 / (9 * cin)) ** 0.5
        state[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.01
    for i, shape in ((0, (16, 8)), (3, (16, 16)), (6, (10, 16))):  # a (shrunken) ImageNet classifier
        state[f"classifier.{i}.weight"] = torch.randn(*shape, generator=g)
        state[f"classifier.{i}.bias"] = torch.zeros(shape[0])
    return state


def lpips_heads_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(HEAD_WIDTHS)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lpips")
    vgg, heads = torchvision_vgg16_state(0), lpips_heads_state(1)
    torch.save(vgg, folder / "vgg16.pth")
    save_safetensors(heads, folder / "heads.safetensors")
    torch.save(heads, folder / "heads.pth")
    return folder, vgg, heads


@pytest.fixture(scope="module")
def model(files):
    folder, _, _ = files
    return LPIPS.from_pretrained(folder / "heads.safetensors", vgg_path=folder / "vgg16.pth")


def images(seed: int, batch: int = 2, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def test_distance_matches_reference_formula(model, files):
    _, vgg, heads = files
    x, y = images(0, size=20), images(1, size=20)
    expected = reference_lpips(vgg, [heads[f"lin{i}.model.1.weight"] for i in range(5)], x, y)
    actual = model(x, y)
    assert actual.shape == (2,)
    assert_parity(actual, expected, tol=1e-5)


def test_random_weights_match_reference_too():
    torch.manual_seed(0)
    model = LPIPS(pretrained=False)
    vgg = {k.removeprefix("net."): v for k, v in model.state_dict().items() if k.startswith("net.")}
    heads = model.heads
    assert all(torch.equal(w, torch.ones_like(w)) for w in heads)  # the paper's unlearned baseline weighting
    x, y = images(2, size=24), images(3, size=24)
    assert_parity(model(x, y), reference_lpips(vgg, heads, x, y), tol=1e-5)


def test_symmetric_zero_on_identical_and_positive(model):
    x, y = images(4), images(5)
    torch.testing.assert_close(model(x, y), model(y, x), rtol=1e-5, atol=1e-7)
    assert model(x, x).abs().max() < 1e-6
    assert (model(x, y) > 0).all()


def test_frozen_eval_and_gradient_reaches_inputs(model):
    assert not any(p.requires_grad for p in model.parameters())
    parent = nn.ModuleDict({"lpips": model}).train()
    assert parent.training and not model.training and not model.net.training
    x = images(6).requires_grad_(True)
    model(x, images(7)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_publisher_layouts_load_strictly(files, model):
    folder, vgg, heads = files
    for name, value in model.net.state_dict().items():
        assert torch.equal(value, vgg[name])
    for i in range(5):
        assert torch.equal(getattr(model, f"lin{i}").model[0].weight, heads[f"lin{i}.model.1.weight"])
    from_pickle = LPIPS.from_pretrained(folder / "heads.pth", vgg_path=folder / "vgg16.pth")
    x, y = images(8), images(9)
    torch.testing.assert_close(from_pickle(x, y), model(x, y), rtol=0, atol=0)


def test_whole_state_dict_in_one_file(tmp_path, model):
    save_safetensors(model.state_dict(), tmp_path / "lpips.safetensors")
    again = LPIPS.from_pretrained(tmp_path / "lpips.safetensors")
    x, y = images(10), images(11)
    torch.testing.assert_close(again(x, y), model(x, y), rtol=0, atol=0)
    with pytest.raises(InputError, match="already holds the VGG"):
        LPIPS.from_pretrained(tmp_path / "lpips.safetensors", vgg_path=tmp_path / "lpips.safetensors")


@pytest.mark.parametrize("corrupt", ["vgg_key", "vgg_shape", "head_key", "head_missing"])
def test_wrong_checkpoint_is_a_checkpoint_error(tmp_path, files, corrupt):
    folder, vgg, heads = files
    vgg, heads = dict(vgg), dict(heads)
    if corrupt == "vgg_key":
        vgg["features.1.weight"] = vgg.pop("features.0.weight")
    elif corrupt == "vgg_shape":
        vgg["features.2.bias"] = torch.zeros(65)
    elif corrupt == "head_key":
        heads["lin0.model.0.weight"] = heads.pop("lin0.model.1.weight")
    else:
        del heads["lin4.model.1.weight"]
    vgg_file, heads_file = folder / "vgg16.pth", folder / "heads.safetensors"
    if corrupt.startswith("vgg"):
        torch.save(vgg, vgg_file := tmp_path / "bad_vgg.pth")
    else:
        save_safetensors(heads, heads_file := tmp_path / "bad_heads.safetensors")
    with pytest.raises(CheckpointError, match="bad_"):
        LPIPS.from_pretrained(heads_file, vgg_path=vgg_file)


def test_missing_file_and_offline_never_download(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="not found"):
        LPIPS.from_pretrained(tmp_path / "nope.pth", vgg_path=tmp_path / "nope.pth")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE") as info:
        LPIPS.from_pretrained(cache_dir=tmp_path)
    assert LPIPS_VGG_V01.urls[0] in str(info.value)
    assert not any(tmp_path.iterdir())


def test_download_checks_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    source = tmp_path / "published.pth"
    torch.save(lpips_heads_state(3), source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="sha256"):
        download_weights(RemoteFile("heads.pth", (source.as_uri(),), "0" * 64), cache_dir=cache)
    assert not any(cache.iterdir())  # nothing half-written or unverified is left behind
    path = download_weights(RemoteFile("heads.pth", (source.as_uri(),), digest), cache_dir=cache)
    assert path.read_bytes() == source.read_bytes()


def test_bad_inputs(model):
    with pytest.raises(InputError):
        model(images(0), images(1, size=24))
    with pytest.raises(InputError):
        model(images(0, size=8), images(1, size=8))
    with pytest.raises(InputError):
        model(images(0)[:, :1], images(1)[:, :1])
