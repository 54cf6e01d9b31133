"""The package's layering, read from the source with `ast` (lazy, in-function imports included).

    errors, config, registry, hub (+ version, utils, builtin, control, model_source)  <  layers  <  models | diffusion
        <  pipelines  <  convert  <  training, metrics, data  <  generation, integrations  <  serve  <  cli

A module may import its own layer or a lower one; `models` and `diffusion` never import each other; no two
modules import each other through any chain (no cycle). The package root (`latentdiff/__init__.py`) is the
public facade above every layer: it names its modules as strings and imports none of them eagerly.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# layer of each top-level part of the package; a part not listed here fails the test (give it a layer)
LAYERS: dict[str, int] = {
    "version": 0, "errors": 0, "config": 0, "registry": 0, "hub": 0, "utils": 0, "builtin": 0, "limits": 0,
    "safetensors_header": 0, "remote_weights": 0, "hub_files": 0, "prompt_syntax": 0, "control": 0, "model_source": 0,
    "atomic_folders": 0,
    "layers": 1,
    "models": 2, "diffusion": 2,
    "pipelines": 3,
    "convert": 4, "adapters": 4,
    "training": 5, "metrics": 5, "data": 5,
    "integrations": 6,      # library code for other frameworks (Ray): below the command line, never importing it
    "generation": 6,        # what `latentdiff generate` and the server both run: settings, loading, SDXL calls
    "serve": 7,             # the HTTP server: library code too (`latentdiff serve` starts it), below the command line
    "cli": 8, "cli_generate": 8, "__main__": 8,
}
# the command line: the top layer, alone; nothing in the library imports it
COMMAND_LINE = {"cli", "cli_generate", "__main__"}
# parts on one layer that must not import each other
INDEPENDENT = [{"models", "diffusion"}]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "latentdiff").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _targets(module: str, node: ast.Import | ast.ImportFrom, is_package: bool, mods: dict[str, Path]) -> list[str]:
    """The latentdiff modules an import statement loads (the deepest existing module of each name)."""
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".")[: len(module.split(".")) + (1 if is_package else 0) - node.level]
            name = ".".join(base + ([node.module] if node.module else []))
        else:
            name = node.module or ""
        names = [f"{name}.{alias.name}" if f"{name}.{alias.name}" in mods else name for alias in node.names]
    else:
        names = [alias.name for alias in node.names]
    found = []
    for name in names:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name.startswith("latentdiff") and name != module:
            found.append(name)
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, Path]]:
    """module -> the latentdiff modules it imports anywhere in its source (top level or inside functions)."""
    mods = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module].update(_targets(module, node, path.name == "__init__.py", mods))
    return graph, mods


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def upward_imports() -> list[str]:
    graph, _ = import_graph()
    bad = []
    for module, targets in graph.items():
        if module == "latentdiff":
            continue
        for target in targets:
            mine, theirs = _part(module), _part(target)
            if theirs == "":
                bad.append(f"{module} -> {target} (the package root is the facade: import the module itself)")
            elif LAYERS[theirs] > LAYERS[mine]:
                bad.append(f"{module} -> {target} ({mine} is below {theirs})")
            elif mine != theirs and any({mine, theirs} <= group for group in INDEPENDENT):
                bad.append(f"{module} -> {target} ({mine} and {theirs} are independent)")
    return sorted(bad)


def import_cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    graph, mods = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in sorted(mods):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_every_part_has_a_layer():
    _, mods = import_graph()
    parts = {_part(m) for m in mods if m != "latentdiff"}
    assert parts <= set(LAYERS), f"give these parts a layer in tests/test_layering.py: {sorted(parts - set(LAYERS))}"


def test_the_command_line_is_alone_on_the_top_layer():
    """No library part shares the command line's layer, where importing it would pass (serve did, and imported it)."""
    top = max(LAYERS.values())
    assert {part for part, layer in LAYERS.items() if layer == top} == COMMAND_LINE
    assert all(LAYERS[part] == top for part in COMMAND_LINE)


def test_no_upward_imports():
    bad = upward_imports()
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "import cycles (lazy imports included):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def fake_package(tmp_path, monkeypatch, files: dict[str, str]) -> None:
    """A package `latentdiff` under tmp_path with these files ("part/module.py": source), as the one analysed."""
    package = tmp_path / "latentdiff"
    for name, source in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).parent.joinpath("__init__.py").write_text("")
        (package / name).write_text(source)
    (package / "__init__.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The analysis itself: an in-function relative import against the order, and a two-module cycle, are found."""
    fake_package(tmp_path, monkeypatch, {"models/base.py": "def f():\n    from ..convert.api import g\n",
                                         "convert/api.py": "from ..models.base import f\n"})
    assert upward_imports() == ["latentdiff.models.base -> latentdiff.convert.api (models is below convert)"]
    assert import_cycles() == [["latentdiff.convert.api", "latentdiff.models.base"]]


def test_the_checker_keeps_the_library_off_the_command_line(tmp_path, monkeypatch):
    """An integration (library code) that imports the command line, even lazily, is against the order."""
    fake_package(tmp_path, monkeypatch, {
        "cli/generate_model.py": "def locate_model():\n    pass\n",
        "integrations/ray.py": "def f():\n    from ..cli.generate_model import locate_model\n"})
    assert upward_imports() == ["latentdiff.integrations.ray -> latentdiff.cli.generate_model "
                                "(integrations is below cli)"]


def test_the_checker_keeps_the_server_off_the_command_line(tmp_path, monkeypatch):
    """The server (library code) importing the command line is against the order; importing `generation`, the
    layer below both, is not."""
    fake_package(tmp_path, monkeypatch, {
        "cli/generate.py": "from ..generation.settings import load_pipeline\n",
        "generation/settings.py": "def load_pipeline():\n    pass\n",
        "serve/models.py": "from ..generation.settings import load_pipeline\n"
                           "def f():\n    from ..cli.generate import load_pipeline\n"})
    assert upward_imports() == ["latentdiff.serve.models -> latentdiff.cli.generate (serve is below cli)"]
