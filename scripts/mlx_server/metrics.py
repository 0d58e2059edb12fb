"""``GET /metrics``: Prometheus text format, through prometheus_client, on a registry of the server's own.

Requests are counted by route and status in a middleware, around the whole
response, streaming included (paths that are not routes count as ``other``,
so a scan of random URLs cannot grow the label set).  Token counts and the
latency histograms come from each completion's stats; queue depth and the
caches are read when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_server.generation import GenerationStats

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "MetricsMiddleware"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_PER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1)


class _LiveState(Collector):
    """Values read at scrape time: the queue and the caches."""

    def __init__(self, read: Callable[[], dict[str, Any] | None]) -> None:
        self._read = read

    def collect(self) -> Iterator[Any]:
        state = self._read()
        if state is None:
            return
        queue = GaugeMetricFamily("mlx_server_queue_requests", "Chat requests in the engine", labels=["state"])
        for name, value in state["queue"].items():
            queue.add_metric([name], value)
        yield queue
        for cache_name, stats in (("prompt", state["prompt_cache"]), ("response", state["response_cache"])):
            if not stats:
                continue
            lookups = CounterMetricFamily(
                f"mlx_server_{cache_name}_cache_lookups", f"{cache_name} cache lookups", labels=["result"]
            )
            lookups.add_metric(["hit"], stats.get("hits", 0))
            lookups.add_metric(["miss"], stats.get("misses", 0))
            yield lookups
            yield GaugeMetricFamily(
                f"mlx_server_{cache_name}_cache_entries", f"{cache_name} cache entries", value=stats.get("entries", 0)
            )
            if "bytes" in stats:
                yield GaugeMetricFamily(
                    f"mlx_server_{cache_name}_cache_bytes", f"{cache_name} cache resident bytes", value=stats["bytes"]
                )


class Metrics:
    """The server's metrics; ``live_state`` returns queue and cache stats (None while the model loads)."""

    def __init__(self, routes: set[str], live_state: Callable[[], dict[str, Any] | None]) -> None:
        self.registry = CollectorRegistry()
        self.routes = routes
        self.requests = Counter(
            "mlx_server_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.completions = Counter(
            "mlx_server_completions", "Chat completions by finish reason", ["finish_reason"], registry=self.registry
        )
        self.prompt_tokens = Counter("mlx_server_prompt_tokens", "Prompt tokens received", registry=self.registry)
        self.cached_tokens = Counter(
            "mlx_server_cached_prompt_tokens", "Prompt tokens served from the prompt cache", registry=self.registry
        )
        self.generated_tokens = Counter(
            "mlx_server_generated_tokens", "Completion tokens generated", registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "mlx_server_time_to_first_token_seconds",
            "Time from arrival to the first generated token, queue included",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_per_token = Histogram(
            "mlx_server_time_per_output_token_seconds",
            "Decode time per generated token after the first",
            buckets=_PER_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "mlx_server_queue_wait_seconds",
            "Time waiting for the model",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_LiveState(live_state))

    def observe(self, stats: GenerationStats) -> None:
        self.completions.labels(stats.finish_reason).inc()
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.cached_tokens.inc(stats.cached_tokens)
        self.generated_tokens.inc(stats.completion_tokens)
        self.queue_wait.observe(stats.queue_ms / 1000)
        if stats.completion_tokens:
            self.time_to_first_token.observe((stats.queue_ms + stats.time_to_first_token_ms) / 1000)
        if stats.completion_tokens > 1 and stats.tokens_per_second > 0:
            self.time_per_token.observe(1 / stats.tokens_per_second)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP response by route and status, when its headers go out."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.metrics.routes else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
