"""The package's import graph: no cycles, and packages depend one way, downwards (docs/architecture.md).

Every ``import`` of every ``ddp_vad`` module counts, at module level or inside a function (a function-local import
hides a cycle from Python, not from this test), and relative ``from . import`` ones too.

Layers, lowest first; a module may import its own package's modules and any lower layer, nothing above:

0. the small utilities at the top level (``UTILITIES``), which may import each other;
1. ``data/``: reading datasets, cutting windows, shards;
2. ``train/``: pretraining, cross-validated transfer, the run files they write (``train/metrics.py``);
3. ``eval/`` (baselines, report) and ``infer/`` (detector, scorers, live sources, threshold, export, predict):
   side by side; neither imports the other;
4. the top layer (``TOP``): the CLI, the Python API, the pipeline, the package itself; may import anything.

``from ddp_vad import __version__`` is a constant, not a module: the package root imports no module at its own
module level (the public names load on first use), which is checked too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ddp_vad"

UTILITIES = {
    "errors", "files", "config", "options", "warn", "presets", "models", "motion", "weights", "runlock", "runfiles",
    "architecture_options",
}  # fmt: skip
TOP = {"ddp_vad", "__main__", "cli", "api", "pipeline", "clispec"}
LAYERS = {"data": 1, "train": 2, "eval": 3, "infer": 3}
ROOT_CONSTANTS = {"__version__"}


def module_files() -> dict[str, tuple[Path, bool]]:
    """{dotted module name: (file, is a package __init__)} of every module under ddp_vad/."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _owner(name: str, modules: dict) -> str | None:
    """The ddp_vad module an imported dotted name lives in (``a.b.func`` -> ``a.b``); None outside ddp_vad."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, modules: dict) -> set[str]:
    """The ddp_vad modules ``module`` imports anywhere in its file (module level and inside functions)."""
    path, is_pkg = modules[module]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, up level - 1 packages
                base = module.split(".")[: None if is_pkg else -1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = []
            for alias in node.names:
                if prefix == "ddp_vad" and alias.name in ROOT_CONSTANTS:
                    continue  # a constant of the package root, not an import of the top layer
                sub = f"{prefix}.{alias.name}"
                names.append(sub if sub in modules else prefix)
        else:
            continue
        found |= {m for m in (_owner(n, modules) for n in names) if m and m != module}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {m: imports_of(m, modules) for m in modules}


def layer_of(module: str) -> tuple[int, str]:
    """(layer, group) of a module: modules of one group may import each other (the cycle test still applies)."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in TOP:
        return 4, "top"
    if parts[0] in LAYERS:
        return LAYERS[parts[0]], parts[0]
    if parts[0] in UTILITIES:
        return 0, "utilities"
    raise AssertionError(f"{module}: not placed in a layer; add it to UTILITIES, TOP or LAYERS in {__file__}")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in sorted(graph.items()):
        layer, group = layer_of(module)
        for dep in sorted(deps):
            dep_layer, dep_group = layer_of(dep)
            if dep_group != group and dep_layer >= layer:
                bad.append(f"{module} -> {dep}")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per cycle found by a depth-first search (enough to name the modules involved)."""
    state: dict[str, int] = {}
    found: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                found.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_every_module_has_a_layer():
    for module in module_files():
        layer_of(module)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_packages_depend_downwards_only():
    bad = upward_imports(import_graph())
    assert not bad, f"imports of a layer above or beside (see this test's docstring): {bad}"


def test_package_root_imports_no_module_at_load():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    loads = [ast.unparse(n) for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert all("ddp_vad" not in line for line in loads), loads


def test_the_walk_sees_function_local_and_relative_imports(tmp_path):
    """The graph walk itself: a function-local import and a relative one are edges."""
    pkg = tmp_path / "ddp_vad"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("def f():\n    from ddp_vad.train import b\n")
    (pkg / "data" / "c.py").write_text("from . import a\nfrom .a import f\n")
    modules = {"ddp_vad": (pkg / "__init__.py", True), "ddp_vad.data": (pkg / "data" / "__init__.py", True),
               "ddp_vad.data.a": (pkg / "data" / "a.py", False), "ddp_vad.data.c": (pkg / "data" / "c.py", False),
               "ddp_vad.train": (pkg / "data" / "__init__.py", True),
               "ddp_vad.train.b": (pkg / "data" / "__init__.py", False)}  # fmt: skip
    assert imports_of("ddp_vad.data.a", modules) == {"ddp_vad.train.b"}
    assert imports_of("ddp_vad.data.c", modules) == {"ddp_vad.data.a"}
    assert upward_imports({"ddp_vad.data.a": {"ddp_vad.train.b"}}) == ["ddp_vad.data.a -> ddp_vad.train.b"]
    assert upward_imports({"ddp_vad.eval.x": {"ddp_vad.infer.y"}}) == ["ddp_vad.eval.x -> ddp_vad.infer.y"]
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]


# ----------------------------------------------------------------------------------- the module map of the docs

MAP_SECTION = re.compile(r"^## Where does a change go\n(.*?)(?=^#)", re.S | re.M)


def mapped_names() -> set[str]:
    """The file names the first column of docs/architecture.md's module table gives (relative to ddp_vad/)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = MAP_SECTION.search(text)
    assert section, "docs/architecture.md has no '## Where does a change go' section"
    names = set()
    for line in section.group(1).splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return names


def test_module_map_names_every_module():
    names = mapped_names()
    modules = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))
    # An empty __init__.py only makes a folder a package: it has no job to name.
    missing = [m for m in modules if m not in names and (PACKAGE / m).read_text().strip()]
    assert not missing, f"docs/architecture.md's module map lacks {missing}"


def test_module_map_names_only_what_exists():
    gone = [n for n in mapped_names() if not ((PACKAGE / n).exists() or (REPO / n).exists())]
    assert not gone, f"docs/architecture.md's module map names files that do not exist: {gone}"
