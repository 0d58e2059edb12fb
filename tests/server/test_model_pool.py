"""The model pool: load on first use, unload when idle or asked, pinning, and one memory budget.

Scripted models stand in for real ones (their loads are recorded, their sizes
chosen), so what is loaded when is specified exactly; the real loader is
exercised by the family tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from mlx_server.chat.request import ChatRequest
from mlx_server.pool import pool as pool_module
from mlx_server.pool.pool import ModelPool
from mlx_server.pool.registry import ModelSpec, Registry
from mlx_server.settings import Settings
from mlx_server.vocabulary import ConflictError, Message, ModelUnavailableError

from .scripted import ScriptedLoader

Result = TypeVar("Result")
GIB = 2**30


def run(coroutine: Coroutine[Any, Any, Result]) -> Result:
    return asyncio.run(coroutine)


def pool_of_sizes(*specs: ModelSpec, sizes: dict[str, int], budget: int, delay: float = 0.0) -> ModelPool:
    loader = ScriptedLoader(Settings(default_temperature=0.0), sizes, delay)
    pool = ModelPool(Registry(specs), loader, budget)
    pool.preload([specs[0].name])
    return pool


def loader_of(pool: ModelPool) -> ScriptedLoader:
    loader = pool._loader
    assert isinstance(loader, ScriptedLoader)
    return loader


def states(pool: ModelPool) -> dict[str, str]:
    return {status.name: status.state for status in pool.describe()}


class TestLoading:
    def test_a_model_loads_on_first_use(self) -> None:
        pool = pool_of_sizes(ModelSpec("main", None), ModelSpec("small", None), sizes={}, budget=10 * GIB)
        assert states(pool) == {"main": "loaded", "small": "unloaded"}
        service = run(pool.chat("small"))
        assert service.name == "small" and states(pool) == {"main": "loaded", "small": "loaded"}

    def test_requests_for_a_loading_model_share_one_load(self) -> None:
        pool = pool_of_sizes(ModelSpec("main", None), ModelSpec("small", None), sizes={}, budget=10 * GIB, delay=0.2)

        async def together() -> list[Any]:
            return list(await asyncio.gather(*(pool.chat("small") for _ in range(3))))

        services = run(together())
        assert len({id(service) for service in services}) == 1
        assert loader_of(pool).loads == ["main", "small"]

    def test_a_model_that_cannot_load_is_a_clear_error(self) -> None:
        class Broken(ScriptedLoader):
            def load(self, spec: ModelSpec) -> Any:
                raise ModelUnavailableError(f"model {spec.name!r} cannot be loaded: no such file")

        pool = ModelPool(Registry((ModelSpec("main", None), ModelSpec("gone", None))), Broken(Settings()), GIB)
        with pytest.raises(ModelUnavailableError, match="cannot be loaded: no such file"):
            run(pool.chat("gone"))
        assert states(pool)["gone"] == "unloaded"


class Broken(ScriptedLoader):
    """Loads every model but ``gone``, whose load fails (after its estimate passed) with a server path in it."""

    def load(self, spec: ModelSpec) -> Any:
        if spec.name == "gone":
            self.loads.append(spec.name)
            raise ModelUnavailableError(f"model {spec.name!r} cannot be loaded: GGUF file not found: /srv/m/gone.gguf")
        return super().load(spec)


class Missing(ScriptedLoader):
    """``gone``'s source cannot be found: its estimate, before anything is unloaded, says so."""

    def estimate(self, spec: ModelSpec) -> int:
        if spec.name == "gone":
            raise ModelUnavailableError(f"model {spec.name!r} cannot be loaded: model path not found: /srv/m/gone")
        return super().estimate(spec)


class TestFailedLoads:
    def test_a_failed_load_is_remembered_and_refused_at_once_until_its_back_off_passes(self) -> None:
        now = [0.0]
        pool = ModelPool(Registry((ModelSpec("main", None), ModelSpec("gone", None))), Broken(Settings()), GIB,
                         clock=lambda: now[0])  # fmt: skip
        pool.preload(["main"])
        for _ in range(3):
            with pytest.raises(ModelUnavailableError, match="cannot be loaded"):
                run(pool.chat("gone"))
        assert loader_of(pool).loads == ["main", "gone"], "tried once, then refused from memory"
        now[0] += pool_module.RETRY_SECONDS + 1
        with pytest.raises(ModelUnavailableError):
            run(pool.chat("gone"))
        assert loader_of(pool).loads == ["main", "gone", "gone"], "tried again after the back-off"
        now[0] += pool_module.RETRY_SECONDS + 1
        with pytest.raises(ModelUnavailableError, match="tried again in"):
            run(pool.chat("gone"))  # the back-off doubled
        with pytest.raises(ModelUnavailableError):
            run(pool.load("gone"))  # an explicit load tries at once
        assert loader_of(pool).loads.count("gone") == 3

    def test_what_a_client_reads_names_no_server_path_and_the_log_does(self, caplog: pytest.LogCaptureFixture) -> None:
        pool = ModelPool(Registry((ModelSpec("main", None), ModelSpec("gone", None))), Broken(Settings()), GIB)
        pool.preload(["main"])
        with pytest.raises(ModelUnavailableError) as raised:
            run(pool.chat("gone"))
        assert "/srv/m" not in raised.value.message and "…/gone.gguf" in raised.value.message
        assert "/srv/m/gone.gguf" in caplog.text
        assert pool.status("gone").failure is not None and "/srv" not in (pool.status("gone").failure or "")

    def test_a_model_whose_source_is_missing_evicts_nothing(self) -> None:
        specs = (ModelSpec("main", None), ModelSpec("gone", None))
        loader = Missing(Settings(), {"main": 4 * GIB, "gone": 4 * GIB})
        pool = ModelPool(Registry(specs), loader, 5 * GIB)
        pool.preload(["main"])
        with pytest.raises(ModelUnavailableError, match="model path not found"):
            run(pool.chat("gone"))
        assert states(pool) == {"main": "loaded", "gone": "unloaded"} and loader.loads == ["main"]


class TestResidency:
    def test_two_models_that_do_not_fit_together_swap_at_most_once_per_residency(self) -> None:
        """a (loaded at start) makes room for b at once; b, loaded on demand, stays its residency before a returns."""
        now = [0.0]
        specs = (ModelSpec("a", None), ModelSpec("b", None))
        loader = ScriptedLoader(Settings(), {"a": 4 * GIB, "b": 4 * GIB})
        pool = ModelPool(Registry(specs), loader, 5 * GIB, clock=lambda: now[0], min_residency=60)
        pool.preload(["a"])

        async def alternate() -> list[dict[str, str]]:
            seen = []
            await pool.chat("b")
            seen.append(states(pool))
            waiting = asyncio.ensure_future(pool.chat("a"))
            await asyncio.sleep(0.2)
            seen.append(states(pool))  # a waits: b is in its residency
            now[0] += 61
            await waiting
            seen.append(states(pool))
            return seen

        pool_module.WATCH_SECONDS, watch = 0.01, pool_module.WATCH_SECONDS
        try:
            seen = run(alternate())
        finally:
            pool_module.WATCH_SECONDS = watch
        assert seen == [{"a": "unloaded", "b": "loaded"}, {"a": "unloaded", "b": "loaded"},
                        {"a": "loaded", "b": "unloaded"}]  # fmt: skip
        assert loader.loads == ["a", "b", "a"]

    def test_what_could_never_fit_is_refused_at_once_not_after_the_residency(self) -> None:
        specs = (ModelSpec("a", None), ModelSpec("b", None), ModelSpec("huge", None))
        loader = ScriptedLoader(Settings(), {"a": GIB, "b": GIB, "huge": 8 * GIB})
        pool = ModelPool(Registry(specs), loader, 4 * GIB, min_residency=600)
        pool.preload(["a"])
        run(pool.chat("b"))
        with pytest.raises(ModelUnavailableError, match="does not fit"):
            run(asyncio.wait_for(pool.chat("huge"), timeout=10))


class TestTheMemoryBudget:
    def test_loading_a_model_that_does_not_fit_unloads_the_least_recently_used_idle_one(self) -> None:
        specs = (ModelSpec("a", None), ModelSpec("b", None), ModelSpec("c", None))
        pool = pool_of_sizes(*specs, sizes={"a": 4 * GIB, "b": 4 * GIB, "c": 4 * GIB}, budget=9 * GIB)
        run(pool.chat("b"))
        run(pool.chat("a"))  # a is now the most recently used
        run(pool.chat("c"))
        assert states(pool) == {"a": "loaded", "b": "unloaded", "c": "loaded"}
        assert loader_of(pool).models["b"].closed_with == [pool_module.DRAIN_SECONDS]

    def test_a_model_that_came_back_stays_before_one_used_once(self) -> None:
        specs = (ModelSpec("a", None), ModelSpec("b", None), ModelSpec("c", None))
        pool = pool_of_sizes(*specs, sizes={"a": 4 * GIB, "b": 4 * GIB, "c": 4 * GIB}, budget=9 * GIB)
        for _ in range(3):
            pool.ready("a")  # a keeps being asked for
        run(pool.chat("b"))  # b is the most recent, but it has been asked for once
        run(pool.chat("c"))
        assert states(pool) == {"a": "loaded", "b": "unloaded", "c": "loaded"}

    def test_pinned_and_busy_models_stay_and_the_error_says_what_is_loaded(self) -> None:
        specs = (ModelSpec("a", None, pinned=True), ModelSpec("b", None), ModelSpec("c", None))
        pool = pool_of_sizes(*specs, sizes={"a": 4 * GIB, "b": 4 * GIB, "c": 4 * GIB}, budget=9 * GIB)
        run(pool.chat("b"))
        busy = run(pool.chat("b"))
        run(busy.start(ChatRequest(messages=(Message("user", "Hi"),))))  # a request is running on b
        with pytest.raises(ModelUnavailableError) as refused:
            run(pool.chat("c"))
        message = refused.value.message
        assert "'c' needs about 4.0 GiB" in message and "9.0 GiB memory budget" in message
        assert "a (4.0 GiB, pinned)" in message and "b (4.0 GiB, in use)" in message
        assert refused.value.code == "model_does_not_fit"
        assert states(pool) == {"a": "loaded", "b": "loaded", "c": "unloaded"}

    def test_a_model_larger_than_the_whole_budget_is_refused_without_unloading_anything(self) -> None:
        pool = pool_of_sizes(ModelSpec("a", None), ModelSpec("huge", None), sizes={"a": GIB, "huge": 8 * GIB},
                             budget=4 * GIB)  # fmt: skip
        with pytest.raises(ModelUnavailableError, match="does not fit"):
            run(pool.chat("huge"))
        assert states(pool)["a"] == "loaded"


class TestUnloading:
    def test_asked_to_unload_and_loaded_again_on_the_next_request(self) -> None:
        pool = pool_of_sizes(ModelSpec("main", None), sizes={}, budget=GIB)
        assert run(pool.unload("main")).state == "unloaded"
        assert run(pool.load("main")).state == "loaded"
        assert loader_of(pool).loads == ["main", "main"]

    def test_a_pinned_model_is_never_unloaded_by_request(self) -> None:
        pool = pool_of_sizes(ModelSpec("main", None, pinned=True), sizes={}, budget=GIB)
        with pytest.raises(ConflictError, match="'main' is pinned") as refused:
            run(pool.unload("main"))
        assert refused.value.code == "model_pinned" and states(pool) == {"main": "loaded"}

    def test_an_idle_model_unloads_after_its_time_to_live_and_a_pinned_one_never(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(pool_module, "WATCH_SECONDS", 0.01)
        now = [0.0]
        specs = (ModelSpec("main", None, pinned=True, ttl=5), ModelSpec("small", None, ttl=5))
        pool = ModelPool(Registry(specs), ScriptedLoader(Settings()), GIB, clock=lambda: now[0])
        pool.preload(["main", "small"])

        async def idle() -> list[dict[str, str]]:
            pool.start_watching()
            seen = []
            for seconds in (4, 2):
                now[0] += seconds
                await asyncio.sleep(0.1)
                seen.append(states(pool))
            return seen

        assert run(idle()) == [{"main": "loaded", "small": "loaded"}, {"main": "loaded", "small": "unloaded"}]
