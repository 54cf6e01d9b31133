"""`latentdiff generate`'s progress per denoising step (issue 15; it counted images before: 0/1 for minutes): a tqdm
bar on a terminal with the images of the current call and it/s, plain lines when stderr is not a terminal (a few
per call, never carriage returns), over every step of the run (steps x calls)."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

import latentdiff.cli.generate_outputs as generate_outputs
from latentdiff.cli import main
from latentdiff.cli.generate_outputs import StepProgress
from tests._support.tiny_builtin import make_tiny_shapes_model, use_as_builtin

SRC = Path(__file__).resolve().parents[2] / "src"
LINE = re.compile(r"^latentdiff: step (\d+)/(\d+), (images (\d+)-(\d+)|image (\d+))/(\d+), \d+\.\d it/s$")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_shapes_model(tmp_path_factory.mktemp("builtin") / "shapes-64")


def test_plain_lines_when_stderr_is_not_a_terminal(tmp_path, model):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "latentdiff", "generate", "a red circle", "--model", str(model), "--steps", "20",
            "--batch-size", "2", "--batch-count", "2", "--seed", "0", "-o", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)   # stderr: a pipe
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("latentdiff: step")]
    assert all(LINE.match(line) for line in lines), lines
    # every 10 % of each call's 20 steps: steps 2, 4 ... 20, for images 1-2, then 3-4
    assert [line.split(",")[0] for line in lines] == [f"latentdiff: step {s}/20" for s in range(2, 21, 2)] * 2
    assert [line.split(", ")[1] for line in lines] == ["images 1-2/4"] * 10 + ["images 3-4/4"] * 10


def test_the_terminal_bar_counts_every_step_and_shows_the_images_and_speed():
    stream = io.StringIO()
    progress = StepProgress(20, 16, stream=stream, tty=True)
    for first in (4, 8):                        # two calls of 4 images, 10 steps each
        progress.start(first, 4, 10)
        for i in range(10):
            progress.step(i, 999 - i, None)
        with progress.above():                  # a file name printed mid-run goes on its own line
            print("outputs/00000-1.png", file=stream)
    progress.close()
    text = stream.getvalue()
    assert progress.bar.n == progress.bar.total == 20
    assert "\routputs/00000-1.png\n" in text     # the bar cleared (back to the line's start), then the name
    assert "images 5-8/16" in text and "images 9-12/16" in text
    last = text.replace("\n", "\r").split("\r")
    assert any("20/20" in part and "it/s" in part for part in last), text[-500:]
    assert "latentdiff: step" not in text       # no plain lines on a terminal


def test_steps_a_sampler_did_not_report_still_end_the_bar_at_its_total():
    progress = StepProgress(8, 2, stream=io.StringIO(), tty=True)
    for first in (0, 1):
        progress.start(first, 1, 4)
        progress.step(0, 0.0, None)         # one step of four reported
    progress.close()
    assert progress.bar.n == 8


def test_a_process_that_does_not_show_prints_nothing():
    stream = io.StringIO()
    progress = StepProgress(4, 1, stream=stream, enabled=False, tty=True)
    progress.start(0, 1, 4)
    for i in range(4):
        progress.step(i, 0.0, None)
    progress.close()
    assert stream.getvalue() == "" and progress.bar is None


@pytest.mark.parametrize("steps, expected", [(4, [1, 2, 3, 4]), (10, list(range(1, 11))),
                                             (25, [3, 6, 9, 12, 15, 18, 21, 24, 25]), (1, [1])])
def test_a_few_plain_lines_per_call(steps, expected):
    stream = io.StringIO()
    progress = StepProgress(steps, 1, stream=stream, tty=False)
    progress.start(0, 1, steps)
    for i in range(steps):
        progress.step(i, 0.0, None)
    assert [int(LINE.match(line).group(1)) for line in stream.getvalue().splitlines()] == expected
    assert "image 1/1" in stream.getvalue()


def test_the_run_drives_it_over_steps_times_calls(tmp_path, model, monkeypatch, capsys):
    use_as_builtin(monkeypatch, model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)
    made: list[StepProgress] = []

    class Recorded(StepProgress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def step(self, *args):
            super().step(*args)
            self.counted = getattr(self, "counted", 0) + 1

    monkeypatch.setattr(generate_outputs, "StepProgress", Recorded)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["generate", "a red circle", "--steps", "3", "-n", "5", "--batch-size", "2", "--seed", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    [progress] = made
    assert progress.total_steps == progress.counted == 3 * 3    # 3 calls (2 + 2 + 1 images) of 3 steps
    err = capsys.readouterr().err
    assert "images 1-2/5" in err and "image 5/5" in err and "it/s" not in err.split("latentdiff: step")[0]
