"""Dependencies run one way: edge -> dialects -> chat core (and embeddings) -> engine -> vocabulary.

The model pool, assembled at start-up, builds each model's engine and service and is handed to the edge as
the dialects' ``ModelDirectory``: nothing below it imports it.  ``distributed`` assembles one model over
several processes the same way, at start-up, beside the pool.

Read from the source's import statements, so a module that reaches back into
its caller fails here before it confuses a reader.  Beside the layers sit
leaf modules every layer may use: ``mlx_lm_compat`` (the only place that
names mlx-lm's private parts), ``stop_text``, ``server_paths``, ``pdf_text`` and ``machine``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "scripts" / "mlx_server"
LAYERS = {
    "vocabulary": set(),
    "mlx_lm_compat": set(),
    "stop_text": set(),
    "server_paths": set(),
    "pdf_text": set(),
    "model": {"vocabulary", "machine", "mlx_lm_compat"},
    "engine": {"vocabulary", "model", "machine", "mlx_lm_compat", "stop_text"},
    "chat": {"vocabulary", "mlx_lm_compat", "pdf_text"},
    "embeddings": {"vocabulary"},
    "dialects": {"vocabulary", "chat", "embeddings"},
    "edge": {"vocabulary", "chat", "embeddings", "dialects", "settings", "blas"},
    "pool": {"vocabulary", "chat", "embeddings", "engine", "model", "machine", "mlx_lm_compat", "settings",
             "agent_environment", "server_paths"},
    "distributed": {"vocabulary", "chat", "engine", "model", "mlx_lm_compat", "pool", "settings", "blas"},
}  # fmt: skip
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


@pytest.mark.parametrize("layer", ["vocabulary", "engine", "chat", "embeddings", "pool"])
def test_below_the_dialects_nothing_knows_http(layer: str) -> None:
    for path in layer_modules(layer):
        frameworks = {name.split(".")[0] for name in imports(path)} & WEB_FRAMEWORKS
        assert not frameworks, f"{path.relative_to(PACKAGE)} imports {frameworks}"


def test_the_vocabulary_imports_nothing_of_ours_and_nothing_heavy() -> None:
    names = {name.split(".")[0] for name in imports(PACKAGE / "vocabulary.py")}
    assert names <= {"__future__", "collections", "dataclasses", "typing"}, names


def test_the_scripted_engine_of_the_fast_tests_imports_no_engine_module() -> None:
    """It stands in for the engine through the vocabulary's protocol, so the fast tier needs no engine."""
    scripted = ROOT / "tests" / "server" / "scripted.py"
    engine_modules = {name for name in imports(scripted) if name.startswith(("mlx_server.engine", "mlx_server.model"))}
    assert not engine_modules, engine_modules


def private_mlx_lm_uses(path: Path, names: set[str]) -> set[str]:
    """The names of ``names`` that ``path`` reaches on something other than its own objects, the private names it
    imports from mlx-lm, and the mlx-lm classes it subclasses (a subclass reaches their private state as its own)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    from_mlx_lm = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlx_lm")
        for alias in node.names
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            found.update(f"a subclass of {base.id}" for base in node.bases
                         if isinstance(base, ast.Name) and base.id in from_mlx_lm)  # fmt: skip
        elif isinstance(node, ast.Attribute) and node.attr in names:
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                found.add(node.attr)
        elif isinstance(node, ast.Constant) and node.value in names:  # getattr(x, "_name")
            found.add(str(node.value))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlx_lm"):
            found.update(alias.name for alias in node.names if alias.name.startswith("_"))
    return found


def test_mlx_lms_private_names_appear_only_in_its_adapter() -> None:
    """Every private mlx-lm attribute the server relies on is named in mlx_lm_compat alone, so an mlx-lm release
    has one place to check (and the compatibility check at start-up names each one)."""
    from mlx_server.mlx_lm_compat import REQUIRED_ATTRIBUTES

    names = {attribute.name for attribute in REQUIRED_ATTRIBUTES}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "mlx_lm_compat.py":
            assert not private_mlx_lm_uses(path, names), (
                f"{path.relative_to(PACKAGE)}: {private_mlx_lm_uses(path, names)}"
            )
