"""Write the A1111 sampler-name table of docs/serving.md from diffusion/samplers/names.py (tests/serve/
test_serving_doc.py checks the page holds what this writes, so the table follows the code):

    python tools/serving_doc.py            # rewrite the table between the page's markers
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "serving.md"
BEGIN, END = "<!-- sampler-table: begin (tools/serving_doc.py writes it) -->", "<!-- sampler-table: end -->"


def sampler_table() -> str:
    """A1111's names (as `sampler_name` takes them) -> latentdiff's sampler, sigma schedule and the other settings the
    label fixes (A1111's grid, Brownian noise, a dropped next-to-last sigma, Heun); then the aliases, and
    the names A1111 has that latentdiff does not implement yet, with the closest one."""
    from latentdiff.diffusion.samplers.names import (
        A1111_ALIASES,
        A1111_GRID,
        A1111_MISSING,
        accepted_names,
        resolve_sampler,
    )
    from latentdiff.utils.infotext import A1111_SAMPLER_LABELS, A1111_SCHEDULE_LABELS

    def schedule(name: str | None) -> str:
        return "—" if name is None else f"`{name}` ({A1111_SCHEDULE_LABELS.get(name, name)})"

    def options(pairs: tuple[tuple[str, object], ...]) -> str:
        grid = ["A1111's grid"] if set(A1111_GRID.items()) <= set(pairs) else []
        return ", ".join(grid + [f"`{key}={value}`" for key, value in pairs if key not in A1111_GRID]) or "—"

    rows = ["| A1111 `sampler_name` | latentdiff sampler | sigma schedule | other settings A1111 runs it with |",
            "|---|---|---|---|"]
    for label in accepted_names()["A1111"]:
        resolved = resolve_sampler(label)
        rows.append(f"| `{label}` | `{resolved.name}` | {schedule(resolved.schedule)} | {options(resolved.options)} |")
    aliases = ", ".join(f"`{alias}` = `{label}`" for alias, label in A1111_ALIASES.items()
                        if label not in A1111_MISSING)
    missing = ", ".join(f"`{label}` (closest: `{A1111_SAMPLER_LABELS.get(closest, closest)}`)"
                        for label, closest in A1111_MISSING.items())
    return "\n".join([*rows, "", f"A1111's k-diffusion aliases are accepted too: {aliases}.", "",
                      f"Not implemented yet (a 422 naming the closest sampler latentdiff has): {missing}."])


def page_with_table(text: str) -> str:
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise SystemExit(f"{PAGE}: the markers {BEGIN!r} ... {END!r} are missing")
    return f"{head}{BEGIN}\n{sampler_table()}\n{END}{tail}"


def main() -> int:
    PAGE.write_text(page_with_table(PAGE.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote the sampler table of {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
