"""``liftoff.management.restarts``: which exits are restarted, the backoff between restarts, the crash-loop limit."""

from __future__ import annotations

import pytest

from liftoff.core.exits import EXIT_GATEWAY_LOST, EXIT_LOAD_FAILED, describe_exit
from liftoff.management.restarts import Phase, RestartBook, RestartLimits, RestartPolicy

LIMITS = RestartLimits(max_restarts=3, window_s=100.0, first_delay_s=1.0, max_delay_s=30.0, stable_s=20.0)
KILLED = -9


def book(policy: RestartPolicy = "on-failure", limits: RestartLimits = LIMITS) -> RestartBook:
    made = RestartBook(policy, limits)
    made.went_live(0.0)
    return made


def fail_and_restart(made: RestartBook, at: float) -> float | None:
    """One failure at ``at``; when a restart is due, restart at once and go live. The delay, or None."""
    delay = made.exited(KILLED, "killed", at)
    if delay is not None:
        made.restarted(at + delay)
        made.went_live(at + delay)
    return delay


def test_failures_are_restarted_with_doubling_delays_until_the_crash_loop_limit() -> None:
    made = book()
    assert [fail_and_restart(made, at) for at in (1.0, 3.0, 7.0)] == [1.0, 2.0, 4.0]
    assert made.restarts == 3
    assert fail_and_restart(made, 15.0) is None
    assert made.phase is Phase.DOWN
    assert made.verdict == "crash loop: restarted 3 times within 100 s (reader_max_restarts); last failure: killed"
    assert made.restarts == 3


def test_delays_are_capped() -> None:
    limits = RestartLimits(max_restarts=10, window_s=1000.0, first_delay_s=1.0, max_delay_s=5.0, stable_s=1000.0)
    made = book(limits=limits)
    assert [fail_and_restart(made, at * 10.0) for at in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_restarts_older_than_the_window_no_longer_count() -> None:
    limits = RestartLimits(max_restarts=2, window_s=50.0, first_delay_s=1.0, max_delay_s=30.0, stable_s=1000.0)
    made = book(limits=limits)
    fail_and_restart(made, 1.0)  # restarted at 2
    fail_and_restart(made, 5.0)  # restarted at 7
    assert fail_and_restart(made, 53.0) == 2.0  # the restart at 2 left the window: one counts (restarted at 55)
    assert fail_and_restart(made, 56.0) is None  # the restarts at 7 and 55 are within 50 s: the limit


def test_a_reader_that_stayed_live_long_enough_starts_counting_afresh() -> None:
    made = book()
    for at in (1.0, 3.0):
        fail_and_restart(made, at)  # live again at 2 and 5
    assert fail_and_restart(made, 5.0 + LIMITS.stable_s) == 1.0  # live 20 s: forgiven, the first delay again
    assert made.restarts == 3  # the total keeps growing (it is the metric)


def test_a_failure_while_loading_does_not_reset_the_count() -> None:
    made = book()
    made.exited(KILLED, "killed", 1.0)
    made.restarted(2.0)  # loading, never live
    assert made.exited(KILLED, "killed", 100.0) == 2.0


@pytest.mark.parametrize(
    ("policy", "code", "declared_dead", "restarted"),
    [
        ("on-failure", KILLED, False, True),
        ("on-failure", 70, False, True),
        ("on-failure", EXIT_GATEWAY_LOST, False, True),
        ("on-failure", 0, True, True),  # stopped by the gateway because it was declared dead
        ("on-failure", 0, False, False),  # a clean exit nobody asked for
        ("always", 0, False, True),
        ("always", KILLED, False, True),
        ("never", KILLED, False, False),
        ("never", 0, True, False),
        ("always", EXIT_LOAD_FAILED, False, False),  # a model that fails to load would fail again
        ("on-failure", EXIT_LOAD_FAILED, False, False),
    ],
)
def test_what_each_policy_restarts(policy: RestartPolicy, code: int, declared_dead: bool, restarted: bool) -> None:
    made = book(policy)
    made.lost()
    made.declared_dead = declared_dead
    delay = made.exited(code, "gone", 1.0)
    assert (delay is not None) is restarted
    assert made.phase is (Phase.WAITING if restarted else Phase.DOWN)
    assert made.last_exit == "gone"
    assert not made.declared_dead  # it was about that process only
    if not restarted:
        assert made.verdict is not None
        assert made.verdict.startswith("gone (not restarted: ")


def test_no_restarts_at_all_when_the_limit_is_zero() -> None:
    made = book(limits=RestartLimits(max_restarts=0))
    assert made.exited(KILLED, "killed", 1.0) is None
    assert made.verdict == "killed (not restarted: reader_max_restarts is 0)"


def test_groups_hold_their_requests_only_while_the_reader_may_come_back() -> None:
    first = RestartBook("on-failure", LIMITS)
    assert not first.holds()  # loading for the first time: as before restarts existed
    first.went_live(0.0)
    assert first.holds()
    first.lost()
    assert first.holds()  # its exit decides
    first.exited(KILLED, "killed", 1.0)
    assert first.holds()  # a restart is due
    first.restarted(2.0)
    assert first.holds()  # loading again
    first.give_up("deleted")
    assert not first.holds()
    never = book("never")
    assert not never.holds()


def test_view_shows_when_the_next_restart_is_due() -> None:
    made = book()
    assert made.view(0.0, 1_000_000) == {"restart_policy": "on-failure", "restarts": 0, "last_exit": None,
                                         "next_restart_ms": None}  # fmt: skip
    made.exited(KILLED, "killed", 10.0)
    view = made.view(10.25, 1_000_000)
    assert view["next_restart_ms"] == 1_000_750
    assert view["last_exit"] == "killed"


def test_exits_in_words() -> None:
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(0) == "exited with code 0 (a clean stop)"
    assert describe_exit(EXIT_LOAD_FAILED) == "exited with code 3 (its model failed to load)"
    assert describe_exit(EXIT_GATEWAY_LOST) == "exited with code 4 (it lost its gateway)"
    assert describe_exit(70) == "exited with code 70"
    assert describe_exit(-200) == "was killed by signal 200"
