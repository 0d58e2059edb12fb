"""Every rank runs the same steps: rank 0 decides what only it knows and shares it once per step.

A distributed model's ranks must run the same collectives in the same order
(every forward pass is one), or they wait on each other forever.  So the
scheduler on rank 0 decides, before each step, everything that depends on
something only it knows (``plans.StepPlan``: the requests that join, the ones
that stop because a client left, a deadline passed or the reader has what it
needs, the clock the prompt cache reads, checkpoints to prefill, the end of
serving) and shares it with ``Lockstep.share``; everything else (batch
composition, prefill chunks, sampling and its random state, grammar masks,
speculation, prompt-cache lookups and evictions) follows from it the same
way on every rank.  Rank 0 sends a plan at least every heartbeat, an empty
one when idle.

A plan crosses between ranks as JSON of plain fields in a fixed schema
(``encode_plan``, ``decode_plan``), read field by field: nothing a rank
receives can run code in it, as unpickling could.

A rank that dies or stops answering leaves the others inside a collective.
The watchdog sees a step (or, on a follower, the wait for rank 0's next
plan) outlast its patience (the timeout past twice the slowest step yet),
and ends this process: rank 0 first says why, answers 503 and fails what is
running (``on_failure``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, get_args

import mlx.core as mx
import numpy as np

from mlx_server.engine.plans import Checkpoint, StepPlan
from mlx_server.engine.sequence import Job
from mlx_server.vocabulary import FinishReason, GenerationRequest, Lane, Sampling

__all__ = [
    "EXIT_DISTRIBUTED_FAILURE",
    "START_UP_SECONDS",
    "DistributedRun",
    "Lockstep",
    "decode_plan",
    "encode_plan",
]

logger = logging.getLogger("mlx")

EXIT_DISTRIBUTED_FAILURE = 3
FAILURE_GRACE_SECONDS = 2.0  # rank 0 answers the requests it fails before it exits
START_UP_SECONDS = 120.0  # the patience until the first request (the warm-up) has finished: first compiles, allocations


@dataclass(frozen=True)
class DistributedRun:
    """This process's place: its rank among ``size``, the group, and how the model is split (tensor or pipeline)."""

    group: Any
    rank: int
    size: int
    parallel: str

    @property
    def leader(self) -> bool:
        """Rank 0: it serves HTTP and decides every step; the others follow."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size} ({self.parallel} parallel)"


class Lockstep:
    """One rank's side of the step plans, and the watchdog over its collectives."""

    def __init__(self, run: DistributedRun, timeout: float, on_failure: Callable[[str], None] | None = None) -> None:
        self.run = run
        self._timeout = timeout
        self._on_failure = on_failure
        self._busy_since: float | None = None
        self._longest = 0.0  # the slowest step so far (seconds)
        self._started = False  # a request has finished on this rank: the start-up's one-off work is done
        self._failed = False
        self._watchdog = threading.Thread(target=self._watch, name="mlx-distributed-watchdog", daemon=True)
        self._watchdog.start()

    @property
    def leader(self) -> bool:
        return self.run.leader

    def share(self, plan: StepPlan | None) -> StepPlan:
        """Rank 0 passes its plan, the others None; every rank gets rank 0's plan (two all_sums)."""
        try:
            if self.run.leader:
                assert plan is not None
                data = np.frombuffer(encode_plan(plan), dtype=np.uint8)
                mx.eval(mx.distributed.all_sum(mx.array([data.size], dtype=mx.int32), group=self.run.group))
                mx.eval(mx.distributed.all_sum(mx.array(data), group=self.run.group))
                return plan
            size = int(np.array(mx.distributed.all_sum(mx.array([0], dtype=mx.int32), group=self.run.group))[0])
            received = mx.distributed.all_sum(mx.zeros((size,), dtype=mx.uint8), group=self.run.group)
            return decode_plan(np.array(received).tobytes())
        except Exception as error:
            self.fail(f"the ranks stopped exchanging step plans ({type(error).__name__}: {error})")
            raise

    def agree(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (a start-up figure every rank must decide by)."""
        mine = value if self.run.leader else 0
        return int(np.array(mx.distributed.all_sum(mx.array([mine], dtype=mx.int64), group=self.run.group))[0])

    @contextlib.contextmanager
    def collective(self) -> Iterator[None]:
        """A stretch of work the other ranks take part in: the watchdog times it."""
        started = self._busy_since = time.monotonic()
        try:
            yield
        finally:
            self._busy_since = None
            self._longest = max(self._longest, time.monotonic() - started)

    def started(self) -> None:
        """The first request finished (every rank sees it in the same step): from now on the timeout is the rule."""
        self._started = True

    @property
    def patience(self) -> float:
        """How long a step may take before the other ranks count as gone: the timeout past the slowest step yet.

        A prefill step of a large model on a slow machine may take longer than
        the timeout, and the first request's steps compile kernels and
        allocate (``START_UP_SECONDS`` at least); a rank that stopped answering
        takes far longer than either.
        """
        timeout = self._timeout if self._started else max(self._timeout, START_UP_SECONDS)
        return timeout + 2 * self._longest

    def fail(self, reason: str) -> None:
        """The ranks can no longer run in step: say so, let rank 0 answer what it holds, and end the process."""
        if self._failed:
            return
        self._failed = True
        role = "rank 0 stops serving" if self.run.leader else f"rank {self.run.rank} stops"
        logger.error("Distributed model (%s): %s; %s", self.run.describe(), reason, role)
        if self._on_failure is not None:
            with contextlib.suppress(Exception):
                self._on_failure(reason)
        threading.Timer(FAILURE_GRACE_SECONDS if self.run.leader else 0.0, _exit_now).start()

    def _watch(self) -> None:
        while not self._failed:
            time.sleep(0.25)
            started = self._busy_since
            if started is not None and time.monotonic() - started > self.patience:
                waited = time.monotonic() - started
                others = "rank 0" if not self.run.leader else "another rank"
                self.fail(f"no answer from {others} for {waited:.0f}s (--distributed-timeout {self._timeout:g}, "
                          f"past the slowest step yet)")  # fmt: skip


def _exit_now() -> None:
    logging.shutdown()
    os._exit(EXIT_DISTRIBUTED_FAILURE)


# -- the plan on the wire ------------------------------------------------------------------------------------

_FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)


def encode_plan(plan: StepPlan) -> bytes:
    """The plan as JSON of plain fields (its tasks are this process's own: a shared plan has none)."""
    if plan.tasks:
        raise ValueError("a plan with worker tasks runs in one process only")
    document = {
        "now": plan.now,
        "admitted": [{"number": job.number, "request": _request_fields(job.request)} for job in plan.admitted],
        "stops": [[number, reason] for number, reason in plan.stops.items()],
        "checkpoints": [list(checkpoint.tokens) for checkpoint in plan.checkpoints],
        "last": plan.last,
    }
    return json.dumps(document, separators=(",", ":")).encode()


def decode_plan(data: bytes) -> StepPlan:
    """A plan from ``encode_plan``'s bytes, each field checked (ValueError on anything else)."""
    document = json.loads(data)
    if not isinstance(document, dict):
        raise ValueError("a step plan is a JSON object")
    admitted = [
        Job(_request(_field(item, "request", dict)), number=_field(item, "number", int))
        for item in _field(document, "admitted", list)
    ]
    stops: dict[int, FinishReason] = {}
    for pair in _field(document, "stops", list):
        number, reason = pair if isinstance(pair, list) and len(pair) == 2 else (None, None)
        if not isinstance(number, int) or reason not in _FINISH_REASONS:
            raise ValueError(f"a step plan's stop is a job number and a finish reason, not {pair!r}")
        stops[number] = reason
    checkpoints = [Checkpoint(_tokens(tokens)) for tokens in _field(document, "checkpoints", list)]
    now = _field(document, "now", float)
    return StepPlan(now, admitted, stops, checkpoints, _field(document, "last", bool))


def _request_fields(request: GenerationRequest) -> dict[str, Any]:
    if request.images:
        raise ValueError("a distributed model reads no images")
    sampling = request.sampling
    lane = request.lane
    return {
        "prompt": list(request.prompt),
        "max_tokens": request.max_tokens,
        "sampling": {
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "min_p": sampling.min_p,
            "repetition_penalty": sampling.repetition_penalty,
            "presence_penalty": sampling.presence_penalty,
            "frequency_penalty": sampling.frequency_penalty,
            "seed": sampling.seed,
            "stop": list(sampling.stop),
        },
        "grammar": request.grammar,
        "stable_prefix": request.stable_prefix,
        "turn_start": request.turn_start,
        "after_user": request.after_user,
        "lane": None if lane is None else [lane.kind, lane.session, lane.agent],
        "use_cache": request.use_cache,
        "timeout": request.timeout,
        "request_id": request.request_id,
    }


def _request(fields: dict[str, Any]) -> GenerationRequest:
    sampling = _field(fields, "sampling", dict)
    floats = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
    numbers = {name: _optional(sampling, name, float) for name in floats}
    lane = _optional(fields, "lane", list)
    if lane is not None and not (len(lane) == 3 and all(isinstance(part, (str, type(None))) for part in lane)):
        raise ValueError(f"a step plan's lane is [kind, session, agent], not {lane!r}")
    stop = _field(sampling, "stop", list)
    if not all(isinstance(text, str) for text in stop):
        raise ValueError("a step plan's stop sequences are strings")
    return GenerationRequest(
        prompt=_tokens(_field(fields, "prompt", list)),
        max_tokens=_field(fields, "max_tokens", int),
        sampling=Sampling(
            **numbers, top_k=_optional(sampling, "top_k", int), seed=_optional(sampling, "seed", int), stop=tuple(stop)
        ),
        grammar=_optional(fields, "grammar", str),
        stable_prefix=_field(fields, "stable_prefix", int),
        turn_start=_field(fields, "turn_start", int),
        after_user=_field(fields, "after_user", bool),
        lane=None if lane is None else Lane(str(lane[0]), str(lane[1]), lane[2]),
        use_cache=_field(fields, "use_cache", bool),
        timeout=_optional(fields, "timeout", float),
        request_id=_field(fields, "request_id", str),
    )


def _field(document: dict[str, Any], name: str, kind: type) -> Any:
    value = document.get(name)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"a step plan's {name} must be {kind.__name__}, not {type(value).__name__}")
    return value


def _optional(document: dict[str, Any], name: str, kind: type) -> Any:
    return None if document.get(name) is None else _field(document, name, kind)


def _tokens(tokens: Any) -> list[int]:
    if not isinstance(tokens, list) or not all(isinstance(token, int) and not isinstance(token, bool)
                                               for token in tokens):  # fmt: skip
        raise ValueError("a step plan's tokens are a list of integers")
    return tokens
