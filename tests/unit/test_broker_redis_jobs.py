"""``liftoff.broker.redis.jobs.JobBook``: who owns a request, and what happens to it when its reader dies."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from liftoff.broker.base import BrokerSettings
from liftoff.broker.redis.jobs import JobBook, RedisJob
from liftoff.core.frames import ClaimedFrame, ErrorFrame, FinalFrame, OutputFrame, RequestFrame, TokenFrame


@dataclass
class Hooks:
    forgotten: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    emitted: list[OutputFrame] = field(default_factory=list)
    live_groups: set[str] = field(default_factory=lambda: {"primary"})
    buffering: frozenset[str] = frozenset()
    waits: list[tuple[str, float]] = field(default_factory=list)

    def forget_entry(self, job: RedisJob) -> None:
        self.forgotten.append(job.frame.request_id)

    def publish_abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def emit(self, frames: list[OutputFrame]) -> None:
        self.emitted.extend(frames)

    def live_in(self, group: str) -> bool:
        return group in self.live_groups

    def buffers(self, group: str) -> bool:
        return group in self.buffering

    def observe_queue_time(self, group: str, seconds: float) -> None:
        self.waits.append((group, seconds))


def book(max_retries: int = 1, reserved: frozenset[str] = frozenset()) -> tuple[JobBook, Hooks]:
    settings = BrokerSettings("gw", reserved, 100, max_retries, 500, 1000)
    hooks = Hooks(buffering=reserved)  # as the broker answers: reserved groups buffer
    return JobBook(settings, hooks), hooks


def queued(jobs: JobBook, request_id: str = "q1", group: str = "primary") -> RedisJob:
    job = RedisJob(frame=RequestFrame(request_id=request_id, consumer_group=group), deadline=1e18)
    jobs.queue(job)
    return job


def claim(request_id: str, reader_id: str, *, reclaimed: bool = False) -> ClaimedFrame:
    return ClaimedFrame(request_id=request_id, reader_id=reader_id, reclaimed=reclaimed)


def test_a_claim_makes_the_reader_the_owner_and_only_its_frames_are_delivered() -> None:
    jobs, hooks = book()
    job = queued(jobs)
    outputs: list[OutputFrame] = []
    jobs.on_replies("r1", [claim("q1", "r1"), TokenFrame(request_id="q1", seq=0, text="a")], outputs)
    jobs.on_replies("r2", [TokenFrame(request_id="q1", seq=1, text="b")], outputs)
    assert (job.reader, job.started, jobs.queued) == ("r1", True, 0)
    assert [f.text for f in outputs if isinstance(f, TokenFrame)] == ["a"]
    assert [group for group, _ in hooks.waits] == ["primary"]


def test_a_first_output_is_a_claim() -> None:
    jobs, _ = book()
    job = queued(jobs)
    outputs: list[OutputFrame] = []
    jobs.on_replies("r1", [FinalFrame(request_id="q1", seq=0, finish_reason="stop")], outputs)
    assert job.reader == "r1"
    assert len(outputs) == 1
    assert "q1" not in jobs.jobs


def test_a_claim_of_an_unknown_request_is_answered_with_an_abort() -> None:
    jobs, hooks = book()
    jobs.on_claimed(claim("gone", "r1"))
    assert hooks.aborted == ["gone"]


@pytest.mark.parametrize("started", [True, False])
def test_a_dead_readers_requests_fail_if_started_else_wait_again(started: bool) -> None:
    jobs, hooks = book()
    job = queued(jobs)
    jobs.on_claimed(claim("q1", "r1"))
    job.started = started
    jobs.reader_gone("r1", "killed")
    if started:
        assert isinstance(hooks.emitted[-1], ErrorFrame)
        assert hooks.emitted[-1].error_type == "reader_died"
        assert hooks.forgotten == ["q1"]
    else:
        assert (job.reader, job.lost_reader, jobs.queued) == (None, "r1", 1)
        jobs.on_claimed(claim("q1", "r2", reclaimed=True))
        assert (job.reader, job.frame.attempt, jobs.queued) == ("r2", 1, 0)


def test_a_reclaim_past_max_retries_fails_and_aborts() -> None:
    jobs, hooks = book(max_retries=0)
    queued(jobs)
    jobs.on_claimed(claim("q1", "r1"))
    jobs.on_claimed(claim("q1", "r2", reclaimed=True))  # r1 was judged dead by a reader before this gateway knew
    assert isinstance(hooks.emitted[-1], ErrorFrame)
    assert hooks.aborted == ["q1"]


@pytest.mark.parametrize("claimant", ["r2", "r1"], ids=["another reader", "its own reader after a reconnect"])
def test_a_started_request_claimed_again_fails_rather_than_repeat(claimant: str) -> None:
    jobs, hooks = book()
    job = queued(jobs)
    jobs.on_claimed(claim("q1", "r1"))
    job.started = True
    jobs.on_claimed(claim("q1", claimant, reclaimed=True))
    assert isinstance(hooks.emitted[-1], ErrorFrame)
    assert hooks.aborted == ["q1"]


def test_a_reader_declared_dead_too_soon_keeps_the_request_it_is_still_answering() -> None:
    jobs, _ = book()
    job = queued(jobs)
    jobs.on_claimed(claim("q1", "r1"))
    jobs.reader_gone("r1", "silent")
    outputs: list[OutputFrame] = []
    jobs.on_replies("r1", [TokenFrame(request_id="q1", seq=0, text="a")], outputs)
    assert job.reader == "r1"
    assert len(outputs) == 1


def test_the_last_readers_death_fails_waiting_requests_unless_the_group_is_reserved() -> None:
    for reserved, fails in ((frozenset(), True), (frozenset({"primary"}), False)):
        jobs, hooks = book(reserved=reserved)
        queued(jobs)
        other = queued(jobs, "q2")
        jobs.on_claimed(claim("q2", "r1"))
        hooks.live_groups.clear()
        jobs.reader_gone("r1", "killed")
        assert bool(hooks.emitted) is fails
        assert other.reader is None


def test_expired_yields_only_waiting_jobs_past_their_deadline() -> None:
    jobs, _ = book()
    early = RedisJob(frame=RequestFrame(request_id="early", consumer_group="primary"), deadline=1.0)
    late = RedisJob(frame=RequestFrame(request_id="late", consumer_group="primary"), deadline=5.0)
    taken = RedisJob(frame=RequestFrame(request_id="taken", consumer_group="primary"), deadline=1.0)
    for job in (early, late, taken):
        jobs.queue(job)
    jobs.adopt(taken, "r1")
    assert [job.frame.request_id for job in jobs.expired(2.0)] == ["early"]
    assert jobs.pop("early") is early
    assert jobs.queued == 1


def test_a_group_the_gateway_holds_keeps_its_waiting_requests_until_it_no_longer_does() -> None:
    jobs, hooks = book()
    hooks.buffering = frozenset({"primary"})  # a reader of it is being restarted
    queued(jobs)
    hooks.live_groups.clear()
    jobs.reader_gone("r1", "killed")
    assert hooks.emitted == []
    hooks.buffering = frozenset()
    jobs.fail_orphans()
    (error,) = hooks.emitted
    assert isinstance(error, ErrorFrame)
    assert error.error_type == "unavailable"
