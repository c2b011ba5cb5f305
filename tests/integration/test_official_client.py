"""The official ``takeoff-client==0.7.0`` works against Liftoff unchanged."""

from __future__ import annotations

from typing import Any

import pytest
from takeoff_client import TakeoffClient
from takeoff_client.exceptions import TakeoffException

from tests.helpers import echo_reader, wait_until


def _client(server: Any) -> TakeoffClient:
    return TakeoffClient(
        base_url="http://127.0.0.1", port=server.ports["port"], mgmt_port=server.ports["management_port"]
    )


def test_generate_and_stream(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader()}).start()
    client = _client(server)
    assert client.generate("Hello world, again")["text"] == "Hello world, again"
    assert client.generate(["one", "two three"])["text"] == ["one", "two three"]
    events = list(client.generate_stream("Hello\nnew  line and  spaces "))
    assert "".join(event.data for event in events) == "Hello\nnew  line and  spaces "
    assert all(event.event == "message" for event in events)
    batch = list(client.generate_stream(["a b", "c"]))
    import json

    pieces = [json.loads(event.data) for event in batch]
    assert "".join(p["text"] for p in pieces if p["batch_id"] == 0) == "a b"
    assert "".join(p["text"] for p in pieces if p["batch_id"] == 1) == "c"


def test_management_methods(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader()}).start()
    client = _client(server)
    status = client.get_status()
    assert "r1" in status["status"]["live_readers"]
    created = client.create_reader({"model_name": "echo", "device": "cpu", "consumer_group": "side"})
    reader_id = created["reader_id"]
    wait_until(lambda: any(r["reader_id"] == reader_id and r["ready"] for r in client.get_readers().get("side", [])))
    assert client.list_all_readers()["primary"][0]["reader_id"] == "r1"
    assert client.get_reader_config(reader_id)["consumer_group"] == "side"
    assert client.generate("via side", consumer_group="side")["text"] == "via side"
    client.delete_reader(reader_id)
    assert "side" not in client.get_readers()
    with pytest.raises(TakeoffException) as info:
        client.delete_reader(reader_id)
    assert info.value.status_code == 404


def test_create_reader_without_group_uses_primary(liftoff: Any) -> None:
    server = liftoff().start(wait=None)
    client = _client(server)
    reader_id = client.create_reader({"model_name": "echo", "device": "cpu"})["reader_id"]
    wait_until(lambda: reader_id in server.readers())
    assert server.readers()[reader_id]["consumer_groups"] == ["primary"]
    assert client.generate("default group")["text"] == "default group"


def test_errors_surface_as_takeoff_exceptions(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader()}).start()
    client = _client(server)
    with pytest.raises(TakeoffException) as info:
        client.generate("x", consumer_group="missing")
    assert info.value.status_code == 404
    with pytest.raises(TakeoffException) as info:
        list(client.generate_stream("x", max_new_tokens=0))
    assert info.value.status_code == 400
    assert "max_new_tokens is 0; allowed: from 1 to 1048576" in str(info.value)
    with pytest.raises(TakeoffException) as info:
        client.generate("x", sampling_temperature="hot")  # type: ignore[arg-type]
    assert info.value.status_code == 422
