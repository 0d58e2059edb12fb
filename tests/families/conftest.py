"""A served tiny model per family (module-scoped), and one biased toward opening tool calls."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_server.model.loading import load_model
from testbed.serving import Served, serve
from testbed.tiny_models import FAMILIES, build


class ModelDirectories(dict[str, Path]):
    """Each family's tiny model directory, written when a test first asks for it (one to nine seconds each)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> Path:
        directory = self[family] = build(FAMILIES[family], self.root / family)
        return directory


@pytest.fixture(scope="session")
def model_directories(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ModelDirectories(tmp_path_factory.mktemp("families"))


# The token that opens a call in each family whose call format starts with one special token.
CALL_OPENERS = {"qwen3": "<tool_call>", "qwen3_moe": "<tool_call>", "qwen3_next": "<tool_call>"}


def biased_toward(model: nn.Module, token: int, bias: float = 40.0) -> None:
    """Make ``model`` prefer ``token`` wherever it may write it: a tiny model that likes to call tools."""
    plain_call = type(model).__call__

    def call(self: nn.Module, *args: Any, **kwargs: Any) -> mx.array:
        logits: mx.array = plain_call(self, *args, **kwargs)
        return logits + mx.where(mx.arange(logits.shape[-1]) == token, bias, 0.0).astype(logits.dtype)

    model.__class__ = type(f"Eager{type(model).__name__}", (type(model),), {"__call__": call})


@pytest.fixture(scope="module", params=sorted(CALL_OPENERS))
def eager(request: pytest.FixtureRequest, model_directories: dict[str, Path]) -> Iterator[Served]:
    """A family's model biased toward opening a call, served as ``served`` is."""
    family = str(request.param)
    loaded = load_model(str(model_directories[family]))
    biased_toward(loaded.model, loaded.tokenizer.convert_tokens_to_ids(CALL_OPENERS[family]))
    engine, client = serve(loaded, 32)
    yield Served(family, loaded, engine, client, client, client)
    engine.shutdown()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def served(request: pytest.FixtureRequest, model_directories: dict[str, Path]) -> Iterator[Served]:
    family = str(request.param)
    loaded = load_model(str(model_directories[family]))
    engine, client = serve(loaded, 32)
    uncached_engine, uncached = serve(loaded, 0)
    plain_engine, plain = serve(loaded, 32, speculative="off")
    yield Served(family, loaded, engine, client, uncached, plain)
    for running in (engine, uncached_engine, plain_engine):
        running.shutdown()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every family test loads a model and generates real tokens: the end-to-end tier."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)
