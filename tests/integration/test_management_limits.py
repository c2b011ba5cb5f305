"""What the management API may start, and config.yaml kept whole, against real gateways: refusals that leave nothing
half-made, write failures the client sees, two gateways writing one manifest at once, and a gateway that will
not expose its management port without keys."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from liftoff.config.loader import load_config
from tests.helpers import LiftoffServer, echo_reader, wait_until


def error(response: httpx.Response, status: int, words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert words in body["detail"], body
    return body


def test_refused_readers_leave_nothing_behind(liftoff: Any, tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "config.json").write_text("{}")
    server = liftoff(readers={"r1": echo_reader()}, server={"max_readers": 2, "max_reader_batch_size": 32}).start()
    post = lambda body: server.http.post(server.mgmt + "/reader", json=body)  # noqa: E731
    refusals = {
        str(tmp_path / "outside"): post({"model_name": str(tmp_path / "outside"), "device": "cpu"}),
        str(tmp_path / "missing"): post({"model_name": str(tmp_path / "missing"), "device": "cpu"}),
        "/etc": post({"model_name": "/etc", "device": "cpu"}),
        "someone/model": post({"model_name": "someone/model", "device": "cpu"}),
    }
    details = {error(response, 400, "is not a model POST /reader may start")["detail"].replace(repr(name), "NAME")
               for name, response in refusals.items()}  # fmt: skip
    assert len(details) == 1  # the same answer whether a path exists or not
    error(post({**echo_reader("big"), "max_batch_size": 33}), 400, "at most 32 (max_reader_batch_size)")
    second = post(echo_reader("second"))
    assert second.status_code == 201
    error(post(echo_reader("third")), 400, "max_readers is 2")
    expected = {"r1", second.json()["reader_id"]}
    status = server.status()["status"]
    assert {*status["loading_readers"], *status["live_readers"]} == expected
    assert status["dead_readers"] == {}
    assert set(yaml.safe_load(server.config_path.read_text())["takeoff"]["readers_config"]) == expected


def test_a_manifest_that_cannot_be_written_is_the_clients_error_and_changes_nothing(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader()}).start()
    good = server.config_path.read_text()
    server.config_path.write_text("takeoff: {unclosed\n")  # someone broke the file after the start
    created = server.http.post(server.mgmt + "/reader", json=echo_reader("side"))
    error(created, 500, "nothing was started")
    assert server.status()["status"]["loading_readers"] == {}
    assert set(server.readers()) == {"r1"}
    deleted = server.http.delete(server.mgmt + "/reader/r1")
    error(deleted, 500, "the reader keeps running")
    assert set(server.readers()) == {"r1"}
    assert server.generate("still served").json()["text"] == "still served"
    server.config_path.write_text(good)
    assert server.http.delete(server.mgmt + "/reader/r1").status_code == 204
    assert "r1" not in yaml.safe_load(server.config_path.read_text())["takeoff"]["readers_config"]


def test_two_gateways_changing_one_manifest_at_once_keep_it_valid_and_complete(liftoff: Any, tmp_path: Path) -> None:
    shared = tmp_path / "config.yaml"
    shared.write_text("# shared by two gateways\ntakeoff:\n  server_config: {}\n  readers_config: {}\n")
    gateways = [liftoff(config_file=False, args=["--config", str(shared)]).start(wait=None) for _ in range(2)]

    def create(gateway: LiftoffServer) -> str:
        response = gateway.http.post(gateway.mgmt + "/reader", json=echo_reader("g"))
        assert response.status_code == 201, response.text
        return str(response.json()["reader_id"])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        created = list(pool.map(create, [gateway for gateway in gateways for _ in range(4)]))
        owners = {reader_id: gateways[index // 4] for index, reader_id in enumerate(created)}
        doomed = created[::2]

        def delete(reader_id: str) -> int:
            owner = owners[reader_id]
            return owner.http.delete(f"{owner.mgmt}/reader/{reader_id}").status_code

        assert list(pool.map(delete, doomed)) == [204] * len(doomed)
    readers = yaml.safe_load(shared.read_text())["takeoff"]["readers_config"]
    assert set(readers) == set(created) - set(doomed)
    assert "# shared by two gateways" in shared.read_text()
    assert set(load_config(config_path=str(shared), env={}).readers) == set(created) - set(doomed)
    for gateway in gateways:
        wait_until(lambda gateway=gateway: len(gateway.readers()) == 2, what="the readers left on each gateway")


def test_the_management_port_is_not_opened_beyond_loopback_without_keys(liftoff: Any) -> None:
    server = liftoff(server={"management_host": "0.0.0.0"})
    with pytest.raises(AssertionError, match="liftoff exited with 1") as info:
        server.start(wait=None)
    assert "refusing to start: management_host is '0.0.0.0'" in str(info.value)
    assert "Set management_api_keys" in str(info.value)
    internal = liftoff(server={"internal_host": "0.0.0.0"})
    with pytest.raises(AssertionError, match=r"internal_host is '0\.0\.0\.0'.*reader_secret"):
        internal.start(wait=None)
