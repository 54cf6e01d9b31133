"""The FID Inception network on random weights (shapes, determinism, the resize path, the FID graph's pooling
irregularities), its weight files (the release's state-dict layout loads strictly, a wrong key does not, the
download is checked against its sha256 and refused offline), and the metrics over folders, pipelines and
autoencoders and through `latentdiff eval`.

The network's resize target is lowered from 299 to 80 pixels in most tests (`SMALL`): the code path is the
same and the CPU time a tenth; one test runs the real 299 x 299 path."""
from __future__ import annotations

import functools
import hashlib
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from latentdiff.cli import main
from latentdiff.errors import CheckpointError, InputError
from latentdiff.hub import save_safetensors
from latentdiff.metrics import inception as inception_module
from latentdiff.metrics.evaluate import (
    compute_fid,
    extract_features,
    folder_features,
    load_inception,
    paired_metrics,
    pipeline_features,
    pipeline_images,
    read_image,
    reconstruction_metrics,
)
from latentdiff.metrics.fid import FeatureStats, fid_from_features, kernel_inception_distance
from latentdiff.metrics.image import psnr, ssim
from latentdiff.metrics.inception import FID_WEIGHTS, InceptionA, InceptionV3
from latentdiff.metrics.inception_score import inception_score
from latentdiff.metrics.precision_recall import precision_recall
from latentdiff.training.lpips import RemoteFile

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, cores are shared

SMALL = 80




@pytest.fixture(scope="module")
def net():
    model = InceptionV3(pretrained=False)   # seed 0, as `--inception-weights random`
    model.input_size = SMALL
    return model


# ---- the release's layout, written out independently of the implementation ------------------------------------
def release_layout() -> dict[str, tuple[int, ...]]:
    """Every tensor of pt_inception-2015-12-05 by name: the BasicConv2d units (conv weight (out, in, kh, kw),
    batch-norm weight, bias, running_mean, running_var) of torchvision's Inception3 naming, and fc (1008 classes)."""
    convs = {"Conv2d_1a_3x3": (32, 3, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3), "Conv2d_2b_3x3": (64, 32, 3, 3),
             "Conv2d_3b_1x1": (80, 64, 1, 1), "Conv2d_4a_3x3": (192, 80, 3, 3)}
    for block, c, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        convs |= {f"{block}.branch1x1": (64, c, 1, 1), f"{block}.branch5x5_1": (48, c, 1, 1),
                  f"{block}.branch5x5_2": (64, 48, 5, 5), f"{block}.branch3x3dbl_1": (64, c, 1, 1),
                  f"{block}.branch3x3dbl_2": (96, 64, 3, 3), f"{block}.branch3x3dbl_3": (96, 96, 3, 3),
                  f"{block}.branch_pool": (pool, c, 1, 1)}
    convs |= {"Mixed_6a.branch3x3": (384, 288, 3, 3), "Mixed_6a.branch3x3dbl_1": (64, 288, 1, 1),
              "Mixed_6a.branch3x3dbl_2": (96, 64, 3, 3), "Mixed_6a.branch3x3dbl_3": (96, 96, 3, 3)}
    for block, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        convs |= {f"{block}.branch1x1": (192, 768, 1, 1), f"{block}.branch7x7_1": (c7, 768, 1, 1),
                  f"{block}.branch7x7_2": (c7, c7, 1, 7), f"{block}.branch7x7_3": (192, c7, 7, 1),
                  f"{block}.branch7x7dbl_1": (c7, 768, 1, 1), f"{block}.branch7x7dbl_2": (c7, c7, 7, 1),
                  f"{block}.branch7x7dbl_3": (c7, c7, 1, 7), f"{block}.branch7x7dbl_4": (c7, c7, 7, 1),
                  f"{block}.branch7x7dbl_5": (192, c7, 1, 7), f"{block}.branch_pool": (192, 768, 1, 1)}
    convs |= {"Mixed_7a.branch3x3_1": (192, 768, 1, 1), "Mixed_7a.branch3x3_2": (320, 192, 3, 3),
              "Mixed_7a.branch7x7x3_1": (192, 768, 1, 1), "Mixed_7a.branch7x7x3_2": (192, 192, 1, 7),
              "Mixed_7a.branch7x7x3_3": (192, 192, 7, 1), "Mixed_7a.branch7x7x3_4": (192, 192, 3, 3)}
    for block, c in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        convs |= {f"{block}.branch1x1": (320, c, 1, 1), f"{block}.branch3x3_1": (384, c, 1, 1),
                  f"{block}.branch3x3_2a": (384, 384, 1, 3), f"{block}.branch3x3_2b": (384, 384, 3, 1),
                  f"{block}.branch3x3dbl_1": (448, c, 1, 1), f"{block}.branch3x3dbl_2": (384, 448, 3, 3),
                  f"{block}.branch3x3dbl_3a": (384, 384, 1, 3), f"{block}.branch3x3dbl_3b": (384, 384, 3, 1),
                  f"{block}.branch_pool": (192, c, 1, 1)}
    layout = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}
    for name, shape in convs.items():
        layout[f"{name}.conv.weight"] = shape
        layout |= {f"{name}.bn.{stat}": (shape[0],) for stat in ("weight", "bias", "running_mean", "running_var")}
    return layout


def release_state(seed: int, *, with_step_counters: bool = True) -> dict[str, torch.Tensor]:
    """Random tensors in the release's layout; torch's BatchNorm2d also saves `num_batches_tracked`."""
    state = dict(_random_release(seed))   # a new dict each time, the (24M) random values drawn once
    if with_step_counters:
        state |= {k.replace(".running_var", ".num_batches_tracked"): torch.tensor(0) for k in list(state)
                  if k.endswith(".running_var")}
    return state


@functools.lru_cache(maxsize=2)
def _random_release(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(shape, generator=g) + 0.5 for k, shape in release_layout().items()}


def test_the_network_has_the_release_layout(net):
    layout = release_layout()
    assert sum(k.endswith(".conv.weight") for k in layout) == 94
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == layout


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "pth without step counters"])
def test_release_layout_loads_strictly(tmp_path, fmt):
    state = release_state(2, with_step_counters=fmt != "pth without step counters")
    path = tmp_path / ("weights.safetensors" if fmt == "safetensors" else "weights.pth")
    save_safetensors(state, path) if fmt == "safetensors" else torch.save(state, path)
    model = InceptionV3.from_pretrained(path)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in release_layout())
    # built on the meta device without initialisation: every tensor is real now, and frozen
    assert not any(t.is_meta for t in loaded.values()) and not any(p.requires_grad for p in model.parameters())


def test_loaded_network_computes_what_the_saved_one_did(tmp_path, net):
    save_safetensors(net.state_dict(), tmp_path / "weights.safetensors")
    loaded = InceptionV3.from_pretrained(tmp_path / "weights.safetensors")
    loaded.input_size = net.input_size
    x = torch.rand(2, 3, 80, 80, generator=torch.Generator().manual_seed(0))
    expected = net(x)
    assert torch.isfinite(expected).all() and torch.equal(loaded(x), expected)


def test_wrong_keys_and_shapes_are_checkpoint_errors(tmp_path):
    state = release_state(2)
    state["Mixed_6b.branch7x7_2.conv.kernel"] = state.pop("Mixed_6b.branch7x7_2.conv.weight")
    torch.save(state, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): Mixed_6b.branch7x7_2.conv.weight.*"
                                              r"unexpected keys \(1\): Mixed_6b.branch7x7_2.conv.kernel"):
        InceptionV3.from_pretrained(tmp_path / "renamed.pth")
    state = release_state(2)
    state["fc.weight"] = torch.zeros(1000, 2048)   # torchvision's 1000-class head, not the FID graph's
    with pytest.raises(CheckpointError, match=r"wrong shapes \(1\): fc.weight"):
        InceptionV3(pretrained=False).load_state(state)
    with pytest.raises(CheckpointError, match="not found"):
        InceptionV3.from_pretrained(tmp_path / "missing.pth")


# ---- weights from the network -----------------------------------------------------------------------------------
def test_release_constants_agree():
    """The 8 hex digits torch.hub puts in the file name are the start of the pinned sha256."""
    tag = FID_WEIGHTS.filename.rsplit("-", 1)[1].removesuffix(".pth")
    assert len(FID_WEIGHTS.sha256) == 64 and FID_WEIGHTS.sha256.startswith(tag)
    assert all(url.startswith("https://") and url.endswith(f"-{tag}.pth") for url in FID_WEIGHTS.urls)


def test_offline_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used while offline"))
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE=1 forbids") as error:
        load_inception(cache_dir=tmp_path, device="cpu")
    assert "--inception-weights PATH" in str(error.value) and str(tmp_path) in str(error.value)


def test_download_is_checked_and_cached(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    source = tmp_path / "published.pth"
    torch.save(release_state(2), source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    monkeypatch.setattr(inception_module, "FID_WEIGHTS", RemoteFile("fid.pth", (source.as_uri(),), "0" * 64))
    with pytest.raises(CheckpointError, match="wrong sha256"):
        InceptionV3.from_pretrained(cache_dir=cache)
    assert not (cache / "fid.pth").exists()
    monkeypatch.setattr(inception_module, "FID_WEIGHTS", RemoteFile("fid.pth", (source.as_uri(),), digest))
    model = InceptionV3.from_pretrained(cache_dir=cache)
    assert (cache / "fid.pth").is_file() and torch.equal(model.fc.bias, release_state(2)["fc.bias"])
    source.unlink()   # the cached copy is used from now on
    assert torch.equal(InceptionV3.from_pretrained(cache_dir=cache).fc.bias, model.fc.bias)


# ---- the forward pass -------------------------------------------------------------------------------------------
def test_forward_shapes_and_determinism(net):
    x = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        pool3 = net(x)
        assert pool3.shape == (3, 2048) and torch.isfinite(pool3).all() and (pool3 >= 0).all() and pool3.std() > 0
        assert torch.allclose(net(x[1:2]), pool3[1:2], rtol=1e-4, atol=1e-6)   # images do not interact
        logits = net.logits(pool3)
        assert logits.shape == (3, 1008)
        assert torch.allclose(net.logits(pool3, bias=True) - logits, net.fc.bias.expand(3, -1), atol=1e-6)
        again = InceptionV3(pretrained=False)
        again.input_size = SMALL
        assert torch.equal(again(x), pool3)
        other = InceptionV3(pretrained=False, seed=1)
        other.input_size = SMALL
        assert not torch.allclose(other(x), pool3)
    net.train()
    assert not net.training   # a metric network stays in eval mode


def test_resize_and_input_conventions(net, monkeypatch):
    x = torch.rand(1, 3, 37, 52, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        monkeypatch.setattr(net, "input_size", 299)   # the real path once
        resized = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        assert torch.allclose(net(x), net(resized), rtol=1e-5, atol=1e-6)
        monkeypatch.undo()
        u8 = (x * 255).round().to(torch.uint8)
        assert torch.allclose(net(u8), net(u8.float() / 255), rtol=1e-5, atol=1e-6)
        direct = net(x)
        monkeypatch.setattr(net, "normalize_input", False)
        assert torch.allclose(net(2 * x - 1), direct, rtol=1e-5, atol=1e-6)
        monkeypatch.setattr(net, "resize_input", False)
        with pytest.raises(InputError, match="too small"):
            net(x)
        assert net(F.interpolate(x, size=(80, 80))).shape == (1, 2048)
    with pytest.raises(InputError, match="RGB"):
        net(torch.rand(1, 1, 80, 80))


def test_the_fid_graph_pooling_irregularities(net):
    """A, C and E pool over real pixels only (a constant input stays constant at the border), and the last
    block, Mixed_7c, pools its fourth branch with a max where Mixed_7b averages."""
    block = InceptionA(8, pool_features=4).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        pooled = block(torch.ones(1, 8, 6, 6))[:, -4:]    # branch_pool: 1x1 conv of the 3x3 average
    assert torch.allclose(pooled, pooled[..., :1, :1].expand_as(pooled))
    assert (net.Mixed_7b.pool, net.Mixed_7c.pool) == ("avg", "max")
    spike = torch.zeros(1, 2048, 8, 8)
    spike[..., 4, 4] = 9.0
    branch = net.Mixed_7c.branch_pool
    with torch.inference_mode():
        expected = branch(F.max_pool2d(spike, 3, stride=1, padding=1))
        assert torch.allclose(net.Mixed_7c(spike)[:, -192:], expected)


# ---- over folders, pipelines, autoencoders ---------------------------------------------------------------------
def write_folder(folder, count, *, seed, size=(32, 32), offset=0.0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        array = np.clip(rng.random((*size, 3)) * 200 + offset, 0, 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"img{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_folder(root / "real", 5, seed=0)
    write_folder(root / "fake", 4, seed=1, offset=40.0)
    mixed = write_folder(root / "mixed", 3, seed=2)
    Image.fromarray(np.full((20, 44, 3), 90, np.uint8)).convert("L").save(mixed / "grey.png")
    (mixed / "notes.txt").write_text("not an image")
    return root


def direct_features(net, folder):
    files = sorted(p for p in folder.iterdir() if p.suffix == ".png")
    with torch.inference_mode():
        return torch.cat([net(read_image(f)[None]) for f in files])


def test_folder_features_and_metrics(net, folders):
    real = folder_features(folders / "real", inception=net, batch_size=2, progress=False)
    fake = folder_features(folders / "fake", inception=net, batch_size=3, progress=False)
    assert real.pool3.shape == (5, 2048) and real.logits.shape == (5, 1008)
    assert torch.allclose(real.pool3, direct_features(net, folders / "real"), rtol=1e-4, atol=1e-6)
    assert torch.allclose(real.logits, net.logits(real.pool3), rtol=1e-4, atol=1e-5)
    mixed = folder_features(folders / "mixed", inception=net, batch_size=4, progress=False)   # sizes differ
    assert torch.allclose(mixed.pool3, direct_features(net, folders / "mixed"), rtol=1e-4, atol=1e-6)
    fid = compute_fid(real, fake)
    assert fid == pytest.approx(fid_from_features(real.pool3, fake.pool3)) and fid > 0
    assert compute_fid(real, real) == pytest.approx(0, abs=1e-9)
    with pytest.raises(InputError, match="no images"):
        folder_features(folders, inception=net, progress=False)
    with pytest.raises(InputError, match="cannot read the image"):
        read_image(folders / "mixed" / "notes.txt")


def test_pipeline_images_seed_per_image(net):
    from latentdiff.models.identity import IdentityFirstStage, IdentityFirstStageConfig
    from latentdiff.models.unet2d import UNet2D, UNet2DConfig
    from latentdiff.pipelines.unconditional import UnconditionalPipeline

    torch.manual_seed(0)
    unet = UNet2D(UNet2DConfig(in_channels=3, out_channels=3, sample_size=8, channels=(32, 32),
                               attention_levels=(False, False), layers_per_level=1, norm_num_groups=8))
    pipe = UnconditionalPipeline(vae=IdentityFirstStage(IdentityFirstStageConfig(channels=3)), unet=unet)
    batches = list(pipeline_images(pipe, num_images=3, batch_size=2, seed=5, num_inference_steps=2))
    assert [b.shape for b in batches] == [(2, 3, 8, 8), (1, 3, 8, 8)]
    for i, image in enumerate(torch.cat(batches)):
        alone = pipe(batch_size=1, generator=torch.Generator().manual_seed(5 + i), num_inference_steps=2,
                     output_type="pt", progress=False).images[0]
        assert torch.allclose(image, alone, atol=1e-6)
    features = pipeline_features(pipe, inception=net, num_images=3, batch_size=2, seed=5, num_inference_steps=2,
                                 progress=False)
    with torch.inference_mode():
        assert torch.allclose(features.pool3, net(torch.cat(batches)), rtol=1e-4, atol=1e-6)

    calls = []
    def fake_pipe(**kw):
        calls.append(kw)
        return type("Out", (), {"images": torch.rand(len(kw["prompt"]), 3, 8, 8)})

    list(pipeline_images(fake_pipe, prompts=["a", "b", "c"], batch_size=2))
    assert [c["prompt"] for c in calls] == [["a", "b"], ["c"]] and calls[0]["output_type"] == "pt"
    with pytest.raises(InputError, match="how many"):
        next(pipeline_images(fake_pipe))


def test_reconstruction_metrics(net, folders):
    from latentdiff.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
    from latentdiff.models.identity import IdentityFirstStage, IdentityFirstStageConfig

    identity = reconstruction_metrics(IdentityFirstStage(IdentityFirstStageConfig()), folders / "real",
                                      inception=net, batch_size=2, progress=False)
    assert identity["rfid"] == pytest.approx(0, abs=1e-6) and identity["ssim"] == pytest.approx(1.0)
    assert identity["psnr"] == float("inf") and identity["num_images"] == 5

    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderKLConfig(channels=(8, 8), layers_per_level=1, latent_channels=2,
                                            norm_num_groups=4, sample_size=32)).eval()
    result = reconstruction_metrics(vae, folders / "real", inception=net, batch_size=3, progress=False)
    originals = torch.stack([read_image(f) for f in sorted((folders / "real").iterdir())])
    with torch.inference_mode():
        recon = ((vae(originals / 127.5 - 1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        expected_fid = fid_from_features(net(originals), net(recon))
    assert result["rfid"] == pytest.approx(expected_fid, rel=1e-5) and result["rfid"] > 0
    a, b = originals.double() / 255, recon.double() / 255
    assert result["psnr"] == pytest.approx(float(psnr(a, b).mean()), rel=1e-6)
    assert result["ssim"] == pytest.approx(float(ssim(a, b).mean()), rel=1e-6)
    with pytest.raises(InputError, match="one size"):
        reconstruction_metrics(vae, folders / "mixed", inception=net, progress=False)


# ---- latentdiff eval -----------------------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, dict(line.split(": ", 1) for line in out.strip().splitlines() if ": " in line), out, err


@pytest.fixture
def small_cli(monkeypatch):
    """The CLI's network (`--inception-weights random`, seed 0) resizing to SMALL, like the `net` fixture."""
    monkeypatch.setattr(inception_module, "INPUT_SIZE", SMALL)


def test_cli_metrics_match_the_api(net, folders, capsys, small_cli, tmp_path):
    real, fake = folders / "real", folders / "fake"
    a = folder_features(real, inception=net, progress=False)
    b = folder_features(fake, inception=net, progress=False)
    weights = ("--inception-weights", "random", "--batch-size", "3")
    code, values, _, err = run_cli(capsys, "fid", real, fake, *weights)
    assert code == 0 and float(values["fid"]) == pytest.approx(compute_fid(a, b), rel=1e-5)
    assert "for testing only" in err
    code, values, _, _ = run_cli(capsys, "is", fake, "--splits", "2", *weights)
    assert float(values["inception_score"]) == pytest.approx(inception_score(b.logits, splits=2).mean, rel=1e-5)
    code, values, _, _ = run_cli(capsys, "kid", real, fake, "--subsets", "4", "--subset-size", "3", *weights)
    expected = kernel_inception_distance(a.pool3, b.pool3, num_subsets=4, subset_size=3)
    assert float(values["kid"]) == pytest.approx(expected.mean, rel=1e-6, abs=1e-12)
    code, values, _, _ = run_cli(capsys, "pr", real, fake, "--k", "2", *weights)
    assert (float(values["precision"]), float(values["recall"])) == precision_recall(a.pool3, b.pool3, k=2)
    # reference statistics: saved once, then FID against a folder (the covariance route, singular here)
    code, _, out, _ = run_cli(capsys, "stats", real, tmp_path / "real.npz", *weights)
    assert code == 0 and FeatureStats.load(tmp_path / "real.npz").num_samples == 5
    code, values, _, _ = run_cli(capsys, "fid", tmp_path / "real.npz", fake, *weights)
    assert float(values["fid"]) == pytest.approx(compute_fid(a, b), rel=1e-6)


def test_cli_paired_metrics(folders, capsys, tmp_path):
    recon = tmp_path / "recon"
    recon.mkdir()
    for path in sorted((folders / "real").iterdir()):   # same names, other format, slightly changed pixels
        array = np.asarray(Image.open(path)).astype(np.int16)
        Image.fromarray(np.clip(array + 7, 0, 255).astype(np.uint8)).save(recon / f"{path.stem}.bmp")
    expected = paired_metrics(folders / "real", recon, progress=False)
    for name in ("psnr", "ssim"):
        code, values, _, _ = run_cli(capsys, name, folders / "real", recon)
        assert code == 0 and float(values[name]) == pytest.approx(expected[name], rel=1e-7)
        assert values["num_images"] == "5"
    a = torch.stack([read_image(p) for p in sorted((folders / "real").iterdir())]).double() / 255
    b = torch.stack([read_image(p) for p in sorted(recon.iterdir())]).double() / 255
    assert expected["psnr"] == pytest.approx(float(psnr(a, b).mean())) and expected["ssim"] < 1
    code, _, _, err = run_cli(capsys, "psnr", folders / "real", folders / "fake")   # img04 has no partner
    assert code == 2 and "only in the first: ['img04']" in err


@pytest.mark.parametrize("argv, message", [
    (("fid", "{root}/nowhere", "{root}/fake"), "not a folder"),
    (("kid", "{root}/real", "{root}/fake"), "KID subsets are larger than a folder"),
    (("is", "{root}/fake", "--splits", "9"), "more splits than images"),
    (("pr", "{root}/real", "{root}/fake", "--k", "4"), "k must be smaller"),
    (("fid", "{root}/real", "{root}/fake"), "HF_HUB_OFFLINE=1 forbids"),
])
def test_cli_errors_are_one_line_and_a_hint(folders, capsys, tmp_path, monkeypatch, argv, message):
    """Checked before anything heavy: with no weights anywhere, only the last case gets as far as the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    code, _, out, err = run_cli(capsys, *(a.format(root=folders) for a in argv))
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 2
    assert lines[0].startswith("latentdiff: error: ") and message in lines[0] and lines[1].startswith("hint: ")
    assert "Traceback" not in err


def test_extract_features_needs_images(net):
    with pytest.raises(InputError, match="no images"):
        extract_features(iter(()), inception=net, progress=False)
