"""``liftoff.gateway.surfaces.health.parse_wait``: seconds or a duration with a unit, capped at 600 s."""

from __future__ import annotations

import pytest

from liftoff.core.errors import InvalidRequestError
from liftoff.gateway.surfaces.health import MAX_WAIT_S, parse_wait


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("7", 7.0),
        ("0.25s", 0.25),
        ("1500ms", 1.5),
        (" 3 s ", 3.0),
        ("1.5m", 90.0),
    ],
)
def test_durations(value: str, seconds: float) -> None:
    assert parse_wait(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [None, ""])
def test_absent_means_no_wait(value: str | None) -> None:
    assert parse_wait(value) == 0.0


@pytest.mark.parametrize(("value", "seconds"), [("600", 600.0), ("601", 600.0), ("1h", 600.0), ("11m", 600.0)])
def test_capped_at_600_seconds(value: str, seconds: float) -> None:
    assert MAX_WAIT_S == 600.0
    assert parse_wait(value) == seconds


@pytest.mark.parametrize("value", ["abc", "-1", "5 days", "1e3", "s", "10x", "1.2.3", "ms500", ".5", "1,5"])
def test_bad_values_raise_invalid_request(value: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_wait(value)
    assert info.value.param == "wait"
    assert info.value.status == 400
    assert repr(value) in info.value.message
    assert "'30s'" in info.value.message
