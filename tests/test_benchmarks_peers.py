"""benchmarks/cpu_peers.py without its peers: it starts (--help), skips a peer that is not installed with the
reason, and its table's ratios are to latentdiff's fastest path at each size. No model runs here."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def cpu_peers(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import cpu_peers

    monkeypatch.setattr(cpu_peers, "WEIGHTS", tmp_path / "weights")
    monkeypatch.setattr(cpu_peers, "SDCPP", tmp_path / "no-sd-cli")
    monkeypatch.setattr(cpu_peers, "OV_PYTHON", tmp_path / "no-python")
    return cpu_peers


def script_help(script: str) -> str:
    """The --help of benchmarks/`script`, run as a user runs it (no peer installed); -> its text."""
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_runs_without_the_peers():
    text = script_help("cpu_peers.py")
    assert "--sizes" in text and "--threads" in text


def test_missing_peers_are_skipped_with_the_reason(cpu_peers, tmp_path):
    args = cpu_peers.argparse.Namespace(sizes=[256], steps=5, threads=1, timeout=10, latentdiff_options="")
    assert "no sd-cli" in cpu_peers.measure("sdcpp-q8_0", args, tmp_path / "images")["skipped"]
    assert "no OpenVINO interpreter" in cpu_peers.measure("openvino-int8", args, tmp_path / "images")["skipped"]
    assert "no weights folder" in cpu_peers.measure("latentdiff-bf16", args, tmp_path / "images")["skipped"]


def test_ratios_are_to_latentdiffs_fastest_path_per_size(cpu_peers, tmp_path, capsys):
    def result(**per_step):
        rows = [dict(size=size, one_step_s=1.0, image_s=5.0, per_step_s=s) for size, s in per_step.items()]
        return dict(rows=rows, cold_s=3.0, maxrss_mb=100.0, notes="", versions={})

    results = [("latentdiff-fp32", result(**{"256": 2.0})), ("latentdiff-bf16", result(**{"256": 0.8})),
               ("openvino-bf16", result(**{"256": 0.4})), ("sdcpp-f16", dict(skipped="no sd-cli"))]
    results = [(name, {**r, "rows": [{**row, "size": int(row["size"])} for row in r.get("rows", [])]})
               for name, r in results]
    args = cpu_peers.argparse.Namespace(sizes=[256], steps=5)
    rows = cpu_peers.report(results, args, tmp_path)
    ratios = {r["peer"]: r["vs_latentdiff_best"] for r in rows if "skipped" not in r}
    assert ratios == pytest.approx({"latentdiff-fp32": 2.5, "latentdiff-bf16": 1.0, "openvino-bf16": 0.5})
    assert "skipped: no sd-cli" in capsys.readouterr().out


def test_probe_ov_parity_help_runs_without_openvino():
    text = script_help("probe_ov_parity.py")
    assert "--ir" in text and "--hint" in text


def test_an_unchecked_openvino_ir_is_marked_not_comparable(cpu_peers, tmp_path):
    """An IR exported before peers_setup checked its text encoder (no stamp) keeps its times, and its note says its
    image is not comparable; a stamped one has no such note."""
    python = tmp_path / "no-python"
    python.write_text("")
    ir = tmp_path / "weights" / "openvino-fp32"
    ir.mkdir(parents=True)
    (ir / "model_index.json").write_text("{}")
    args = cpu_peers.argparse.Namespace(sizes=[256], steps=5, threads=1, timeout=10, latentdiff_options="")
    _, code = cpu_peers.python_case("openvino-fp32", args, tmp_path / "images")
    assert "text encoder unchecked, image not comparable" in code
    (ir / cpu_peers.OV_STAMP).write_text("{}")
    _, code = cpu_peers.python_case("openvino-fp32", args, tmp_path / "images")
    assert "text encoder unchecked" not in code
    compile(code, "child", "exec")


def test_export_copy_gives_old_transformers_prefixed_names_without_writing_the_source(monkeypatch, tmp_path):
    """transformers >= 5.24 saves CLIPTextModel without "text_model."; the OpenVINO venv's 5.5 read none of those
    weights and exported a random text encoder. readable_copy renames them in a hard-linked copy: the copy loads
    the same weights, the source file keeps its bytes and names."""
    pytest.importorskip("transformers")
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    from tests._support.tiny_clip import random_clip_text_model, tiny_clip_config

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import peers_setup

    source = tmp_path / "sd15"
    model = random_clip_text_model(tiny_clip_config(), seed=3)
    model.save_pretrained(source / "text_encoder")
    (source / "model_index.json").write_text("{}")
    weights = source / "text_encoder" / "model.safetensors"
    state = {name.removeprefix("text_model."): value for name, value in load_file(weights).items()}
    save_file(state, weights, metadata={"format": "pt"})   # transformers 5.24's layout, whichever one saved it
    before, names = weights.read_bytes(), sorted(state)

    count = peers_setup.readable_copy(source, tmp_path / "copy")

    assert count == len(names)
    assert weights.read_bytes() == before and sorted(load_file(weights)) == names
    copied = load_file(tmp_path / "copy" / "text_encoder" / "model.safetensors")
    assert sorted(copied) == sorted("text_model." + name for name in names)
    ids = torch.tensor([[0, 5, 7, 1]])
    with torch.no_grad():
        expected = model(ids)[0]
        actual = CLIPTextModel.from_pretrained(tmp_path / "copy" / "text_encoder")(ids)[0]
    assert torch.equal(actual, expected)


def test_the_export_child_is_valid_python():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import peers_setup
    finally:
        sys.path.remove(str(BENCHMARKS))
    for int8 in (False, True):
        code = peers_setup.OV_EXPORT.format(folder="/w/sd15", path="/w/openvino-fp32", int8=int8,
                                            stamp=peers_setup.OV_STAMP, readable_copy=peers_setup.EXPORT_HELPER)
        compile(code, "export", "exec")
