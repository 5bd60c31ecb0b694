"""The server package is grouped by concern, and each layer imports only the layers below it
(``server/clipserve_server/__init__.py`` names them): an import that points up is a design
mistake this test names, with the file and the line. Neither the server nor the SDK has an import
cycle, not even one closed only for the type checker."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "server" / "clipserve_server"
CLIENT_PACKAGE = Path(__file__).resolve().parents[1] / "client" / "clipserve"

# Top to bottom. The package root (cli, app) assembles everything, so it sits above them all.
LAYERS = ["", "serving", "inference", "models", "images", "utils"]


def _layer_of(module: Path) -> str:
    relative = module.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else ""


def _imported_layer(importer: Path, node: ast.ImportFrom) -> str | None:
    """The layer that ``from ... import`` inside the package reaches, or None for outside it."""
    if node.level == 0:
        parts = (node.module or "").split(".")
        if parts[0] != "clipserve_server":
            return None
        return parts[1] if len(parts) > 2 else ""
    here = importer.parent
    for _ in range(node.level - 1):
        here = here.parent
    target = (here / (node.module or "").replace(".", "/")).resolve()
    relative = target.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 or (PACKAGE / relative).is_dir() else ""


def test_every_import_inside_the_server_points_down():
    upward = []
    for module in sorted(PACKAGE.rglob("*.py")):
        layer = _layer_of(module)
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = _imported_layer(module, node)
                if target is not None and LAYERS.index(target) < LAYERS.index(layer):
                    upward.append(f"{module.relative_to(PACKAGE)}:{node.lineno} ({layer} imports {target})")
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_every_module_lives_in_a_named_layer():
    layers = {_layer_of(m) for m in PACKAGE.rglob("*.py")}
    assert layers <= set(LAYERS)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, wherever the import statement stands
    (``if TYPE_CHECKING:`` and function bodies included): a cycle there is still a circle a
    reader has to untangle."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            where = ".".join(base + ([node.module] if node.module else []))
            # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module.
            targets = [f"{where}.{alias.name}" if f"{where}.{alias.name}" in modules else where for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in modules and target != name)
    return found


def _cycles(root: Path) -> list[list[str]]:
    paths = {_module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph = {name: _imports(path, name, set(paths)) for name, path in paths.items()}
    cycles, state = [], dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state[target] == 1:
                cycles.append(trail[trail.index(target) :] + [target])
            elif state[target] == 0:
                visit(target, trail + [target])
        state[name] = 2

    for name in graph:
        if state[name] == 0:
            visit(name, [name])
    return cycles


@pytest.mark.parametrize("root", [PACKAGE, CLIENT_PACKAGE], ids=["server", "client"])
def test_no_module_imports_itself_through_others(root):
    cycles = _cycles(root)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_cycle_check_sees_an_import_under_type_checking(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import B\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n")
    assert _cycles(package) == [["pkg.a", "pkg.b", "pkg.a"]]
