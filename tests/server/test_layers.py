"""Dependencies run one way: edge -> dialects -> chat core -> engine -> vocabulary, and each layer keeps to its own.

Read from the source's import statements, so a module that reaches back into
its caller fails here before it confuses a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "scripts" / "mlx_server"
LAYERS = {
    "vocabulary": set(),
    "engine": {"vocabulary", "model", "machine"},
    "chat": {"vocabulary"},
    "dialects": {"vocabulary", "chat"},
    "edge": {"vocabulary", "chat", "dialects", "engine", "settings", "blas"},
}
WEB_FRAMEWORKS = {"fastapi", "starlette", "uvicorn"}


def layer_modules(layer: str) -> list[Path]:
    single = PACKAGE / f"{layer}.py"
    return [single] if single.exists() else sorted((PACKAGE / layer).glob("*.py"))


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def our_layers(path: Path) -> set[str]:
    """The layers of this package a module imports (its own excluded)."""
    own = path.parent.name if path.parent != PACKAGE else path.stem
    layers = {name.split(".")[1] for name in imports(path) if name.startswith("mlx_server.")}
    return layers - {own}


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_the_layers_below_it(layer: str) -> None:
    for path in layer_modules(layer):
        assert our_layers(path) <= LAYERS[layer], f"{path.relative_to(PACKAGE)} imports {our_layers(path)}"


@pytest.mark.parametrize("layer", ["vocabulary", "engine", "chat"])
def test_below_the_dialects_nothing_knows_http(layer: str) -> None:
    for path in layer_modules(layer):
        frameworks = {name.split(".")[0] for name in imports(path)} & WEB_FRAMEWORKS
        assert not frameworks, f"{path.relative_to(PACKAGE)} imports {frameworks}"


def test_the_vocabulary_imports_nothing_of_ours_and_nothing_heavy() -> None:
    names = {name.split(".")[0] for name in imports(PACKAGE / "vocabulary.py")}
    assert names <= {"__future__", "collections", "dataclasses", "typing"}, names
