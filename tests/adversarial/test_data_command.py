"""`latentdiff data shapes` (issue 15): a few characters of a command line never cost gigabytes or hours, and a
data set is never silently mixed with, or written over, other files."""
from __future__ import annotations

import pytest

from tests._support.bounded import run_bounded

RSS_MB = 400       # measured about 100 MB: the refusals happen before PIL draws anything
SECONDS = 30       # per bounded run (an interpreter start and the imports); the refusal itself is instant

BIG = ["-n", "1000000000"], ["--size", "1000000"]


@pytest.mark.outcome("clear_error", fails_as="crash")
@pytest.mark.parametrize("args", BIG, ids=["count", "size"])
def test_huge_sizes_are_refused_before_any_work(tmp_path, args):
    code = f"""
import contextlib, io
from latentdiff.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    rc = main(["data", "shapes", {str(tmp_path / "x")!r}, *{args!r}])
assert rc == 2, rc
from latentdiff.errors import InputError
raise InputError(err.getvalue())
"""
    result = run_bounded(code, timeout_s=SECONDS, address_space_gb=4)
    assert result.raised == "InputError" and result.is_latentdiff_error, result.traceback
    assert args[0] in result.message and args[1] in result.message and "out of bounds" in result.message
    assert result.peak_rss_mb < RSS_MB
    assert not (tmp_path / "x").exists()


@pytest.mark.outcome("clear_error", fails_as="data_loss")
def test_an_existing_data_set_is_not_mixed_with_a_new_one(tmp_path):
    from latentdiff.data.quick_shapes import write_shapes_folder
    from latentdiff.errors import InputError

    folder = write_shapes_folder(tmp_path / "d", 6, size=8)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(InputError, match="not empty") as caught:
        write_shapes_folder(folder, 3, size=8, seed=1)
    assert str(folder) in str(caught.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.outcome("clear_error", fails_as="data_loss")
def test_overwrite_refuses_a_folder_that_holds_other_files(tmp_path):
    """`--overwrite` on a folder with other things in it (a home folder, a project) deletes nothing."""
    from latentdiff.data.quick_shapes import write_shapes_folder
    from latentdiff.errors import InputError

    home = tmp_path / "home"
    (home / "project").mkdir(parents=True)
    (home / "project" / "main.py").write_text("print(1)")
    (home / "photo.png").write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match="does not write") as caught:
        write_shapes_folder(home, 2, size=8, overwrite=True)
    assert "project" in str(caught.value)
    assert (home / "project" / "main.py").read_text() == "print(1)" and (home / "photo.png").is_file()


@pytest.mark.outcome("clear_error", fails_as="data_loss")
def test_overwrite_refuses_a_link_inside_the_folder(tmp_path):
    from latentdiff.data.quick_shapes import write_shapes_folder
    from latentdiff.errors import InputError

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.png").write_bytes(b"x")
    folder = write_shapes_folder(tmp_path / "d", 2, size=8, labels="classes")
    (folder / "circle").rename(tmp_path / "moved")
    (folder / "circle").symlink_to(outside)
    with pytest.raises(InputError, match="does not write"):
        write_shapes_folder(folder, 2, size=8, labels="classes", overwrite=True)
    assert (outside / "keep.png").read_bytes() == b"x"
