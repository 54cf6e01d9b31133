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


def test_help_runs_without_the_peers():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "cpu_peers.py"), "--help"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "--sizes" in done.stdout and "--threads" in done.stdout


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
