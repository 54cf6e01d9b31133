"""The documentation site builds with no warning, and every code block in it runs (see tests/_support/docs_harness.py).

The README's Python blocks run in tests/test_readme.py; its other blocks (shell) run here.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests._support import docs_harness as harness

PAGES = harness.pages()


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    return harness.StandIns(tmp_path_factory.mktemp("docs-stand-ins")).build()


def test_site_builds_strict(tmp_path):
    """mkdocs --strict fails on any warning: a page missing from the nav, a broken link or anchor."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(tmp_path / "site"),
                           "-f", str(harness.ROOT / "mkdocs.yml")], cwd=harness.ROOT, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "quickstart" / "index.html").is_file()


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_blocks_run(page, stand_ins, tmp_path, monkeypatch):
    text = page.read_text(encoding="utf-8")
    harness.docs_environment(monkeypatch, stand_ins, tmp_path / "work", text)
    with harness.page_server(monkeypatch, text):   # a page whose clients talk to `latentdiff serve` gets one
        # The README's Python blocks: tests/test_readme.py.
        timings = harness.run_page(page, skip_languages=("python",) if page == harness.README else ())
    print("".join(f"\n{wall:6.2f} s wall {cpu:6.2f} s cpu  {where}" for where, wall, cpu in timings))


# ---- the harness refuses what it cannot check ---------------------------------------------------------------
def run_text(tmp_path, text):
    page = tmp_path / "page.md"
    page.write_text(text, encoding="utf-8")
    return harness.run_page(page)


@pytest.mark.parametrize("text, message", [
    ("```\nprint(1)\n```\n", "unknown fence language"),
    ("```pycon\n>>> 1\n```\n", "unknown fence language"),
    ("Text.\n\n    latentdiff info\n", "indented rather than fenced"),
    ("```bash\nrm -rf data\n```\n", "not a command the docs may show"),
    ("```bash\nlatentdiff info | head\n```\n", "shell operator"),
    ("```bash\nlatentdiff generate --steps 0\n```\n", "returned 2"),
    ("```console\n$ latentdiff generate --steps 0\nlatentdiff: error: something else\n```\n", "the page shows"),
    ("```python\nraise ValueError('boom')\n```\n", "page.md:1 (python) failed: ValueError: boom"),
    ("```pyi\nclass LatentDiffusionPipeline:\n    def __call__(self, prompt, *, height=None): ...\n```\n",
     "documented signature differs"),
    ("```yaml\ntrain: {max_steps: 1}\nmodel: {type: autoencoder_kl}\n```\n", "missing section 'data'"),
    ("```json\n{\"a\": 1,}\n```\n", "JSONDecodeError"),
], ids=["untagged", "other-language", "indented", "unknown-command", "pipe", "failing-command", "wrong-error",
        "python-error", "wrong-signature", "bad-train-config", "bad-json"])
def test_harness_fails_on(text, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match=re.escape(message)):
        run_text(tmp_path, text)


def test_harness_runs_in_order_and_skips_only_the_listed_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_text(tmp_path, "```python\nx = 1\n```\n\n```bash\npip install . && python -m pytest\n```\n\n"
                       "```python\nassert x == 1\n```\n\n```text\nanything\n```\n")
    assert harness.shell_commands("latentdiff a \\\n  --b 'c d' # note\nx && y; z\n") == [
        ["latentdiff", "a", "--b", "c d"], ["x"], ["y"], ["z"]]


def test_substitutions_touch_only_what_they_name():
    assert harness.substitute("latentdiff generate x --height 512 --width 512 --max-height 512\n"
                              "pipe(p, height=512, width=512, num_inference_steps=50)\n"
                              "latentdiff train diffusion a.yaml --resume latest\n"
                              "latentdiff data shapes d -n 512 --size 32\n") == (
        "latentdiff generate x --height 16 --width 16 --max-height 512\n"
        "pipe(p, height=16, width=16, num_inference_steps=50)\n"
        "latentdiff train diffusion a.yaml --set train.max_steps=2 --set logging.progress_bar=false --resume latest\n"
        "latentdiff data shapes d -n 64 --size 32\n")
