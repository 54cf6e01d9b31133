"""`latentdiff data shapes DIR -n N`: the data the tiny training examples need, made by the installed command
rather than a repository script (issue 15)."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

from latentdiff.cli import main
from latentdiff.limits import MAX_SHAPES_IMAGES, MAX_SHAPES_SIZE

SRC = Path(__file__).resolve().parents[2] / "src"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_the_command_writes_a_data_set_and_a_tokenizer(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "latentdiff", "data", "shapes", "shapes", "-n", "6", "--size", "16",
                           "--write-tokenizer", "tok"], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["shapes", "tok"]
    assert len(list((tmp_path / "shapes").glob("*.png"))) == 6 and (tmp_path / "shapes" / "metadata.jsonl").is_file()
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer_config.json", "vocab.txt"]


def test_class_folders_and_the_same_bytes_for_the_same_seed(tmp_path):
    assert run("data", "shapes", str(tmp_path / "a"), "-n", "9", "--size", "8", "--labels", "classes",
               "--seed", "4")[0] == 0
    assert run("data", "shapes", str(tmp_path / "b"), "--count", "9", "--size", "8", "--labels", "classes",
               "--seed", "4", "--no-progress")[0] == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 9 and all(p.parent.name in ("circle", "square", "triangle") for p in files)
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in files)


def test_a_non_empty_folder_is_refused_unless_overwrite(tmp_path):
    assert run("data", "shapes", str(tmp_path / "d"), "-n", "5", "--size", "8")[0] == 0
    rc, _, err = run("data", "shapes", str(tmp_path / "d"), "-n", "2", "--size", "8")
    assert rc == 2 and err.startswith("latentdiff: error: the output folder is not empty")
    assert str(tmp_path / "d") in err and "--overwrite" in err
    assert len(list((tmp_path / "d").glob("*.png"))) == 5
    assert run("data", "shapes", str(tmp_path / "d"), "-n", "2", "--size", "8", "--overwrite")[0] == 0
    assert len(list((tmp_path / "d").glob("*.png"))) == 2


def test_the_tokenizer_folder_is_checked_before_the_data_set_is_written(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("[PAD]\n")
    rc, _, err = run("data", "shapes", str(tmp_path / "d"), "-n", "2", "--size", "8", "--write-tokenizer",
                     str(tmp_path / "tok"))
    assert rc == 2 and str(tmp_path / "tok") in err
    assert not (tmp_path / "d").exists()


def test_bounds_name_the_argument_the_bound_and_the_value(tmp_path):
    big = str(MAX_SHAPES_IMAGES + 1)
    for args, names in [(["-n", big], ["-n", str(MAX_SHAPES_IMAGES), big]),
                        (["-n", "0"], ["-n", "0"]),
                        (["--size", "100000"], ["--size", str(MAX_SHAPES_SIZE), "100000"])]:
        rc, _, err = run("data", "shapes", str(tmp_path / "x"), *args)
        assert rc == 2 and all(name in err for name in names), (args, err)
    assert not (tmp_path / "x").exists()
