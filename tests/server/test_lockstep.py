"""What the ranks of a distributed model agree on, without launching them: plans, stops, refusals, failure.

The ranks themselves run under mlx.launch in ``tests/distributed``; here, the
pieces that decide what each rank does are specified one by one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from mlx_server.distributed.serving import refusal
from mlx_server.engine.kv_budget import KVBudget
from mlx_server.engine.lockstep import START_UP_SECONDS, DistributedRun, Lockstep, decode_plan, encode_plan
from mlx_server.engine.plans import Checkpoint, StepPlan
from mlx_server.engine.prompt_cache import KVPromptCache
from mlx_server.engine.scheduler import RequestSignals, Scheduler
from mlx_server.engine.sequence import Job
from mlx_server.pool.registry import build_registry
from mlx_server.settings import Settings
from mlx_server.vocabulary import GenerationRequest, Lane, Sampling
from testbed.tokenizers import load_tokenizer


def job(number: int = 0) -> Job:
    return Job(GenerationRequest([1, 2, 3], 8, request_id=f"req_{number}"), number=number)


class TestAStepPlan:
    def test_crosses_a_process_boundary_whole_as_plain_fields(self) -> None:
        request = GenerationRequest([5, 6, 7], 12, Sampling(temperature=0.7, top_k=20, stop=("END",)), "start: 'x'",
                                    stable_prefix=2, lane=Lane("claude-code", "5f1e", "a9"), timeout=30.0,
                                    request_id="req_1")  # fmt: skip
        plan = StepPlan(12.5, [Job(request, number=4)], {3: "cancelled"}, [Checkpoint([1, 2, 3])], last=False)
        data = encode_plan(plan)
        assert b"pickle" not in data and data.startswith(b"{")
        received = decode_plan(data)
        assert received.now == 12.5 and received.stops == {3: "cancelled"} and not received.last
        assert [(job.number, job.request) for job in received.admitted] == [(4, request)]
        assert [checkpoint.tokens for checkpoint in received.checkpoints] == [[1, 2, 3]]

    @pytest.mark.parametrize(
        "data",
        [
            b"[]",
            b'{"now": "soon"}',
            b'{"now": 1, "admitted": [{"number": true}], "stops": [], "checkpoints": [], "last": false}',
            b'{"now": 1, "admitted": [], "stops": [[1, "exploded"]], "checkpoints": [], "last": false}',
            b'{"now": 1, "admitted": [], "stops": [], "checkpoints": [["a"]], "last": false}',
        ],
    )
    def test_anything_but_the_schema_is_refused(self, data: bytes) -> None:
        with pytest.raises(ValueError, match="step plan"):
            decode_plan(data)


def scheduler() -> Scheduler:
    planned = Scheduler(8, 8, KVPromptCache(list, "test", 0, 1 << 20), load_tokenizer("qwen3"))
    planned.budget = KVBudget(1 << 30, 1)
    return planned


class NoBatch:
    active = decoding = 0

    def final_lengths(self) -> list[int]:
        return []

    def pending_prefixes(self) -> set[str]:
        return set()


class TestStopsComeOnlyFromPlans:
    """A job carries no signal of its own: the scheduler (rank 0's) reads its clients and writes stops in plans."""

    def test_the_scheduler_reads_why_a_running_job_should_stop_from_its_clients_signals(self) -> None:
        planned, signals = scheduler(), RequestSignals()
        running = job()
        planned.submit(running, signals)
        assert planned.plan(NoBatch(), []).admitted == [running]
        assert planned.plan(NoBatch(), [running]).stops == {}
        signals.satisfied.set()
        assert planned.plan(NoBatch(), [running]).stops == {running.number: "stop"}
        signals.cancelled.set()
        assert planned.plan(NoBatch(), [running]).stops == {running.number: "cancelled"}

    def test_a_deadline_past_is_a_timeout(self) -> None:
        planned, signals = scheduler(), RequestSignals(deadline=time.perf_counter() + 60)
        running = job()
        planned.submit(running, signals)
        planned.plan(NoBatch(), [])
        signals.deadline = time.perf_counter() - 1
        assert planned.plan(NoBatch(), [running]).stops == {running.number: "timeout"}

    def test_a_job_that_is_stopped_already_is_not_stopped_again(self) -> None:
        planned, signals = scheduler(), RequestSignals()
        running = job()
        planned.submit(running, signals)
        planned.plan(NoBatch(), [])
        signals.cancelled.set()
        running.stop = "cancelled"
        assert planned.plan(NoBatch(), [running]).stops == {}

    def test_a_job_cancelled_while_it_waits_never_joins(self) -> None:
        planned, signals = scheduler(), RequestSignals()
        delivered: list[Any] = []
        waiting = Job(GenerationRequest([1, 2, 3], 8), delivered.append)
        signals.cancelled.set()
        planned.submit(waiting, signals)
        assert planned.plan(NoBatch(), []).admitted == []
        assert delivered[-1].stats.finish_reason == "cancelled" and waiting.state == "done"


class TestTheWatchdogsPatience:
    """How long a step may last before the other ranks count as gone."""

    def lockstep(self, timeout: float) -> Lockstep:
        return Lockstep(DistributedRun(group=None, rank=1, size=2, parallel="tensor"), timeout)

    def test_start_up_gets_minutes_whatever_the_timeout(self) -> None:
        """The warm-up's first steps compile and allocate: a short timeout must not end the service at start."""
        assert self.lockstep(4).patience == START_UP_SECONDS
        assert self.lockstep(600).patience == 600

    def test_after_the_first_request_the_timeout_counts_past_the_slowest_step(self) -> None:
        lockstep = self.lockstep(4)
        lockstep.started()
        assert lockstep.patience == 4
        with lockstep.collective():
            time.sleep(0.2)
        assert 4 + 2 * 0.2 <= lockstep.patience < 4 + 2 * 1.0


class TestWhatCannotBeServedOverSeveralProcesses:
    @pytest.mark.parametrize(
        ("settings", "said"),
        [
            (Settings(models=("a=/m/a", "b=/m/b")), "the server's only model"),
            (Settings(models=("/m/a",), embedding_models=("/m/e",)), "no --embedding-model"),
            (Settings(models=("/m/a",), kv_bits=4), "--kv-bits"),
            (Settings(models=("/m/a",), export_mlx=Path("/tmp/out")), "--export-mlx"),
        ],
        ids=["two models", "an embedding model", "kv bits", "export"],
    )
    def test_is_refused_with_a_sentence(self, settings: Settings, said: str) -> None:
        reason = refusal(settings, build_registry(settings))
        assert reason is not None and said in reason

    def test_one_chat_model_is_served(self) -> None:
        settings = Settings(models=("/m/a",))
        assert refusal(settings, build_registry(settings)) is None


def test_health_says_why_a_distributed_model_failed() -> None:
    """Between a rank stopping and rank 0's exit, readiness is false and says why."""
    from starlette.testclient import TestClient

    from mlx_server.blas import BlasInfo
    from mlx_server.edge.app import ServerState, create_app

    state = ServerState(Settings(), BlasInfo("test", None, optimized=False))
    state.failure = lambda: "no answer from another rank for 30s"
    health = TestClient(create_app(state), base_url="http://localhost").get("/health")
    assert health.status_code == 503
    assert health.json() == {"status": "failed", "reason": "no answer from another rank for 30s"}
