"""The server package is grouped by concern, and each layer imports only the layers below it
(``server/clipserve_server/__init__.py`` names them): an import that points up is a design
mistake this test names, with the file and the line."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "server" / "clipserve_server"

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
