"""docs/serving.md's A1111 sampler table is the one tools/serving_doc.py writes from diffusion/samplers/names.py,
and every name in it resolves as the table says (tests/test_docs.py runs the page's blocks against a server)."""
from __future__ import annotations

import re

from tests._support import load_script


def load_tool():
    return load_script("tools/serving_doc.py", "serving_doc")


def test_the_sampler_table_follows_the_code():
    tool = load_tool()
    page = tool.PAGE.read_text(encoding="utf-8")
    assert tool.page_with_table(page) == page, "run `python tools/serving_doc.py` to rewrite the table"


def test_the_table_rows_resolve_as_written():
    from latentdiff.diffusion.samplers.names import resolve_sampler

    table = load_tool().sampler_table()
    rows = re.findall(r"^\| `([^`]+)` \| `(\w+)` \| (?:`(\w+)`|—)", table, flags=re.MULTILINE)
    assert len(rows) >= 10 and ("DPM++ 2M Karras", "dpmpp_2m", "karras") in rows and ("Euler a",
                                                                                      "euler_ancestral", "") in rows
    for label, name, schedule in rows:
        resolved = resolve_sampler(label)
        assert (resolved.name, resolved.schedule or "") == (name, schedule), label
