"""``liftoff status``: the readers table, from a ``/status`` body."""

from __future__ import annotations

import pytest

from liftoff.reader.process import progress_bar
from liftoff.status_table import StatusError, fetch, render, rows

STATUS = {
    "status": {
        "live_readers": {"r1": {"consumer_groups": ["primary"], "model_name": "smollm2", "model_type": "CAUSAL",
                                "device": "cpu", "pids": [11], "consumer_name": "x"}},
        "loading_readers": {"r2": {"consumer_groups": ["embed"], "model_name": "minilm", "model_type": "CAUSAL",
                                   "device": "cpu", "pids": [12], "consumer_name": "y"}},
        "dead_readers": {"r3": {"consumer_groups": ["side"], "model_name": "gone", "model_type": "CAUSAL",
                                "device": "cpu", "pids": [], "consumer_name": "z"}},
        "last_heartbeat": {"r1": {"heartbeat_timestamp": 9_000, "heartbeat_wait_interval": 1000}},
    }
}  # fmt: skip


def test_rows_and_table() -> None:
    table = rows(STATUS, {"r2": 0.5}, now_ms=10_500)
    assert table[0] == ("r1", "live", "primary", "smollm2", "CAUSAL", "cpu", "11", "1.5s ago")
    assert table[1][:2] == ("r2", "loading 50%")
    assert table[2][1] == "dead"
    assert table[2][6] == "-"
    text = render(table).splitlines()
    assert text[0].split() == ["READER", "STATE", "GROUPS", "MODEL", "TYPE", "DEVICE", "PIDS", "HEARTBEAT"]
    assert len(text) == 4
    assert "no readers" in render([])


def test_an_unreachable_gateway_is_explained() -> None:
    with pytest.raises(StatusError, match=r"cannot reach .* \(is `liftoff serve` running there\?\)"):
        fetch("http://127.0.0.1:9/status", timeout=1)


def test_progress_bar() -> None:
    assert progress_bar("load", 0.5, width=10) == "load [#####.....]  50%"
    assert progress_bar("load", 2.0, width=4) == "load [####] 100%"
