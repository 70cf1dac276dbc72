"""The package's shape: no import circles, no import from a lower floor to a higher one, tasks reach
the training engine only through what it exports, and every moved path still imports (with a
DeprecationWarning) as what it moved to.

The floors are read from docs/DESIGN.md ("Layers"), so the document and this test cannot
disagree. Imports are read with ``ast`` from the source (every ``import`` statement, at module
level or inside a function, since a lazy import is a dependency too), resolved to modules of this
tree; importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``, so those count as
imported too (except the packages the importer itself lives in).
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "DESIGN.md"


def source_files() -> dict[str, Path]:
    """module name -> file, for pyalign/ and the Triton sources installed as pyalign.kernels."""
    files = {}
    for base, prefix in ((ROOT / "pyalign", "pyalign"), (ROOT / "kernels", "pyalign.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([prefix, *parts])] = path
    return files


FILES = source_files()
# pyalign._C is the compiled extension (csrc/): a module with no Python source.
MODULES = set(FILES) | {"pyalign._C"}


def is_package(module: str) -> bool:
    return module in FILES and FILES[module].name == "__init__.py"


def moved_modules() -> dict[str, str]:
    from pyalign._deprecated import MOVED_MODULES

    return MOVED_MODULES


MOVED = moved_modules()
MOVED_NAMES = importlib.import_module("pyalign._deprecated").MOVED_NAMES


def imported_names(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module or package, name imported from it or None, line) of every import."""
    tree = ast.parse(FILES[module].read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package(module) else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            found += [(source, alias.name, node.lineno) for alias in node.names]
    return [(source, name, line) for source, name, line in found if source.split(".")[0] == "pyalign"]


def resolve(source: str, name: str | None) -> str:
    """The module an import reaches: ``from a import b`` is module ``a.b`` when that exists."""
    if name is not None and f"{source}.{name}" in MODULES:
        return f"{source}.{name}"
    while source not in MODULES:
        source = source.rpartition(".")[0]
    return source


def edges() -> dict[str, dict[str, int]]:
    """importer -> {imported module: line}, ancestors' __init__ included."""
    graph: dict[str, dict[str, int]] = {}
    for module in FILES:
        targets = graph.setdefault(module, {})
        for source, name, line in imported_names(module):
            target = resolve(source, name)
            reached = [target]
            parts = target.split(".")
            for i in range(1, len(parts)):
                ancestor = ".".join(parts[:i])
                if not (module == ancestor or module.startswith(ancestor + ".")):
                    reached.append(ancestor)
            for reached_module in reached:
                if reached_module != module:
                    targets.setdefault(reached_module, line)
    return graph


GRAPH = edges()


def floors() -> dict[str, int]:
    """prefix -> floor, from the table under "## Layers" in docs/DESIGN.md."""
    text = DESIGN.read_text(encoding="utf-8")
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    table = {}
    for floor, cells in re.findall(r"^\|\s*(\d+)\s*\|([^|]*)\|", section, flags=re.M):
        for prefix in re.findall(r"`(pyalign[\w.]*)`", cells):
            table[prefix] = int(floor)
    assert table, "docs/DESIGN.md: no floor table under '## Layers'"
    return table


FLOORS = floors()


def floor_of(module: str) -> int:
    """The floor of the longest listed prefix (``pyalign`` itself matches only the root package)."""
    candidates = [p for p in FLOORS if module == p or (p != "pyalign" and module.startswith(p + "."))]
    if not candidates:
        raise AssertionError(f"{module}: on no floor of docs/DESIGN.md's layer table")
    return FLOORS[max(candidates, key=len)]


def test_every_module_is_on_a_floor():
    for module in MODULES:
        floor_of(module)


def test_no_import_reaches_a_higher_floor():
    upward = [
        f"{module} (floor {floor_of(module)}) imports {target} (floor {floor_of(target)}) at line {line}"
        for module, targets in GRAPH.items()
        for target, line in targets.items()
        if floor_of(target) > floor_of(module)
    ]
    assert not upward, "imports against the layer order of docs/DESIGN.md:\n" + "\n".join(upward)


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0

    def visit(node: str) -> None:  # recursion depth is bounded by the number of modules (~100)
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_no_import_circles():
    circles = [component for component in strongly_connected(GRAPH) if len(component) > 1]
    assert not circles, "modules that import each other in a circle:\n" + "\n".join(map(str, circles))


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert [c for c in strongly_connected(graph) if len(c) > 1] == [["a", "b", "c"]]


def engine_exports() -> set[str]:
    tree = ast.parse(FILES["pyalign.train"].read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("pyalign/train/__init__.py: no __all__")


def test_tasks_reach_the_engine_only_through_its_exports():
    exported = engine_exports()
    wrong = []
    for module in FILES:
        if not module.startswith("pyalign.tasks"):
            continue
        for source, name, line in imported_names(module):
            if source == "pyalign.train" and name in exported:
                continue
            if source.startswith("pyalign.train") or (source == "pyalign" and name == "train"):
                wrong.append(f"{module}:{line}: {source} import {name}")
    assert not wrong, "tasks must import the engine as `from pyalign.train import <exported name>`:\n" + "\n".join(wrong)


def test_no_module_of_the_package_imports_an_old_path():
    users = [f"{module}:{line}: {source} import {name}" for module in FILES
             for source, name, line in imported_names(module)
             if source in MOVED or f"{source}.{name}" in MOVED or (source, name) in MOVED_NAMES]
    assert not users, "\n".join(users)


def test_no_file_is_left_at_an_old_path():
    assert not set(MOVED) & set(FILES)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_import_with_a_deprecation_warning(old):
    new = importlib.import_module(MOVED[old])
    sys.modules.pop(old, None)
    parent, _, child = old.rpartition(".")
    if hasattr(sys.modules.get(parent), child):
        delattr(sys.modules[parent], child)
    with pytest.warns(DeprecationWarning, match=re.escape(old) + ".*" + re.escape(MOVED[old])):
        module = importlib.import_module(old)
    assert module is new
    assert sys.modules[old] is new


def test_an_old_path_runs_as_a_script(tmp_path):
    """``python -m pyalign.generation_measure --help`` runs the module it moved to."""
    import subprocess

    result = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-m", "pyalign.generation_measure",
                             "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pyalign.generation.measure" in result.stdout
    assert "moved to pyalign.generation.measure" in result.stderr


def test_moved_names_import_from_their_old_module_with_a_deprecation_warning():
    from pyalign._deprecated import MOVED_NAMES

    assert MOVED_NAMES
    for (old_module, name), new_module in MOVED_NAMES.items():
        with pytest.warns(DeprecationWarning, match=re.escape(f"{old_module}.{name}")):
            value = getattr(importlib.import_module(old_module), name)
        assert value is getattr(importlib.import_module(new_module), name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no_such_name"):
            importlib.import_module("pyalign.train").no_such_name
