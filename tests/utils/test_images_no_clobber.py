"""utils.images.save_image / save_png with replace=False never write over a file, with no window between a check
and the rename (a hard link fails on an existing name), and leave no temporary file; generate's `write` turns the
race into its usual usage error."""
from __future__ import annotations

import pytest
from PIL import Image

from latentdiff.cli import generate_outputs
from latentdiff.errors import UsageError
from latentdiff.utils.images import save_image, save_png


@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.webp"])
def test_no_replace_keeps_the_file_that_is_there(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"the old file")
    with pytest.raises(FileExistsError):
        save_image(Image.new("RGB", (8, 8), "red"), path, {"prompt": "x"}, replace=False)
    assert path.read_bytes() == b"the old file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]      # no temporary file left


def test_no_replace_writes_a_new_file_and_replace_replaces(tmp_path):
    path = tmp_path / "new.png"
    save_png(Image.new("RGB", (8, 8), "red"), path, params={"prompt": "x"}, replace=False)
    assert Image.open(path).getpixel((0, 0)) == (255, 0, 0)
    save_png(Image.new("RGB", (8, 8), "blue"), path, params={"prompt": "x"})          # the default replaces
    assert Image.open(path).getpixel((0, 0)) == (0, 0, 255)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.png"]


def test_a_dangling_link_is_not_written_through(tmp_path):
    link = tmp_path / "out.png"
    link.symlink_to(tmp_path / "elsewhere.png")
    with pytest.raises(FileExistsError):
        save_image(Image.new("RGB", (8, 8)), link, {}, replace=False)
    assert not (tmp_path / "elsewhere.png").exists()


def test_a_file_that_appears_after_the_check_is_not_replaced(tmp_path, monkeypatch):
    path = tmp_path / "00000-1.png"
    checks = []

    def late(target):      # the first check passes; another process writes the file before the rename
        checks.append(target)
        if len(checks) == 1:
            target.write_bytes(b"written meanwhile")
        else:
            real(target)

    real = generate_outputs.refuse_existing
    monkeypatch.setattr(generate_outputs, "refuse_existing", late)
    with pytest.raises(UsageError, match="exists"):
        generate_outputs.write(Image.new("RGB", (8, 8)), path, {"prompt": "x"}, overwrite=False)
    assert path.read_bytes() == b"written meanwhile"
