"""A local huggingface_hub cache entry, so that Hub ids load offline in tests."""
from __future__ import annotations

import shutil
from pathlib import Path


def make_hub_cache(cache_dir, repo_id: str, src_folder, *, commit: str = "0" * 40) -> Path:
    """Lay `src_folder` out as a huggingface_hub cache entry for `repo_id` (models--owner--name/...).

    Tests use it to prove that a Hub id loads from the local cache with HF_HUB_OFFLINE=1.
    """
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(src_folder, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
