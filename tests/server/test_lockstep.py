"""What the ranks of a distributed model agree on, without launching them: plans, stops, refusals, failure.

The ranks themselves run under mlx.launch in ``tests/distributed``; here, the
pieces that decide what each rank does are specified one by one.
"""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path

import pytest

from mlx_server.distributed.serving import refusal
from mlx_server.engine.lockstep import START_UP_SECONDS, DistributedRun, Lockstep, StepPlan
from mlx_server.engine.sequence import Job
from mlx_server.pool.registry import build_registry
from mlx_server.settings import Settings
from mlx_server.vocabulary import GenerationRequest, Lane, Sampling


def job(**fields: object) -> Job:
    return Job(GenerationRequest([1, 2, 3], 8), threading.Event(), lambda _event: None, 0.0, **fields)  # type: ignore[arg-type]


class TestAStepPlan:
    def test_crosses_a_process_boundary_whole(self) -> None:
        request = GenerationRequest([5, 6, 7], 12, Sampling(temperature=0.7, stop=("END",)), "start: 'x'",
                                    stable_prefix=2, lane=Lane("claude-code", "5f1e"), timeout=30.0)  # fmt: skip
        plan = StepPlan(12.5, [(4, request)], {3: "cancelled"}, [[1, 2, 3]], stopping=False)
        assert pickle.loads(pickle.dumps(plan)) == plan


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


class TestAJobInLockstep:
    def test_stops_only_when_the_plan_says_so(self) -> None:
        follower = job(lockstep=True)
        follower.cancelled.set()  # a client rank 0 knows about; this rank's own signals do not count
        assert not follower.should_stop() and not follower.end_wanted()
        follower.decided_stop = "timeout"
        assert follower.should_stop() and follower.stop_reason() == "timeout"

    def test_rank_zero_reads_why_it_should_stop_from_its_own_signals(self) -> None:
        leader = job(lockstep=True)
        assert leader.wanted_stop() is None
        leader.end_requested.set()
        assert leader.wanted_stop() == "stop"
        leader.cancelled.set()
        assert leader.wanted_stop() == "cancelled"

    def test_alone_a_job_stops_on_its_own_signals(self) -> None:
        alone = job()
        alone.cancelled.set()
        assert alone.should_stop() and alone.stop_reason() == "cancelled"


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
