"""Who may do what, against a real gateway with keys and a reader secret (docs/security.md): an outsider is refused
on every port, the real clients work with their keys, a reader without the secret never gets a request, a
rebinding request is refused, and no key shows anywhere.

Route by route coverage of the key check is tests/unit/test_gateway_auth_routes.py (in-process, every route).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from takeoff_client import TakeoffClient
from takeoff_client.exceptions import TakeoffException
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from liftoff.core.frames import RegisterFrame, WelcomeFrame, decode_gateway_frames, encode_frames
from liftoff.core.types import ReaderInfo
from tests.helpers import LiftoffServer, echo_reader, wait_until

API_KEY = "api-key-for-the-tests-0001"
MANAGEMENT_KEY = "management-key-for-the-tests-0002"
READER_SECRET = "reader-secret-for-the-tests-0003"
SECRETS = (API_KEY, MANAGEMENT_KEY, READER_SECRET)
KEYED = {"api_keys": API_KEY, "management_api_keys": MANAGEMENT_KEY, "reader_secret": READER_SECRET}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiftoffServer]:
    instance = LiftoffServer(workdir=tmp_path_factory.mktemp("secure"), readers={"r1": echo_reader()}, server=KEYED)
    try:
        yield instance.start()
    finally:
        instance.close()


# ---- outsiders ----------------------------------------------------------------------------------------------------


def test_an_outsider_is_refused_on_every_port(server: LiftoffServer) -> None:
    with httpx.Client(timeout=10) as outsider:
        _refused_everywhere(server, outsider)
    assert "r1" in server.readers()  # nothing an outsider did reached it


def _refused_everywhere(server: LiftoffServer, outsider: httpx.Client) -> None:
    for key in server.ports:
        url = server.url(key)
        assert outsider.get(url + "/healthz").status_code == 200, key  # probes need no key
        for path in ("/openapi.json", "/docs"):
            refused = outsider.get(url + path)
            assert refused.status_code == 401, (key, path)
            assert refused.headers["www-authenticate"] == 'Bearer realm="liftoff"'
    calls = [("POST", "port", "/generate"), ("POST", "port", "/generate_stream"), ("POST", "openai_port",
             "/v1/chat/completions"), ("POST", "vertex_port", "/generate_vertex"), ("POST", "snowflake_port",
             "/generate_snowflake"), ("POST", "sagemaker_port", "/invocations"), ("GET", "management_port", "/status"),
             ("POST", "management_port", "/reader"), ("DELETE", "management_port", "/reader/r1"),
             ("GET", "management_port", "/metrics"), ("GET", "management_port", "/config/r1")]  # fmt: skip
    for method, key, path in calls:
        for headers in ({}, {"authorization": "Bearer wrong-key-0000000000"}, {"x-api-key": READER_SECRET}):
            response = outsider.request(method, server.url(key) + path, json={"text": "x"}, headers=headers)
            assert response.status_code == 401, (method, key, path, headers)
    assert outsider.get(server.url("sagemaker_port") + "/ping").json() == {"status": "healthy"}


def test_the_web_ui_files_are_served_and_say_which_ports_need_keys(server: LiftoffServer) -> None:
    with httpx.Client(timeout=10) as outsider:
        assert outsider.get(server.base + "/playground").status_code == 200
        assert outsider.get(server.base + "/ui/js/common.js").status_code == 200
        body = outsider.get(server.base + "/ui/config.json").json()
    assert body["keys"] == {"inference": True, "management": True}
    assert not any(secret in json.dumps(body) for secret in SECRETS)


async def _handshake(url: str, **headers: str) -> int:
    """The HTTP status a WebSocket handshake to the internal port gets (101 when it is accepted)."""
    try:
        async with connect(url, additional_headers=headers, open_timeout=5):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def test_the_internal_port_takes_only_readers_with_the_secret(server: LiftoffServer) -> None:
    url = f"ws://{server.internal_address}/reader"
    assert asyncio.run(_handshake(url)) == 401
    assert asyncio.run(_handshake(url, authorization="Bearer " + "w" * 24)) == 401
    assert asyncio.run(_handshake(url, authorization=f"Bearer {API_KEY}")) == 401
    assert asyncio.run(_handshake(url, authorization=f"Bearer {READER_SECRET}")) == 101


async def _rogue(url: str, reader_id: str, capacity: int, headers: dict[str, str]) -> tuple[Any, list[Any]]:
    """A raw reader: register as loaded with ``capacity``, then collect what the gateway sends for a while."""
    info = ReaderInfo(consumer_groups=["primary"], consumer_name=f"{reader_id}@rogue:1", device="cpu",
                      model_name="echo", model_type="CAUSAL", pids=[1])  # fmt: skip
    register = RegisterFrame(reader_id=reader_id, info=info, config={"model_name": "echo", "device": "cpu"},
                             heartbeat_interval_ms=1000, loaded=True, capacity=capacity)  # fmt: skip
    async with connect(url, additional_headers=headers, open_timeout=5) as link:
        await link.send(encode_frames([register]))
        frames = decode_gateway_frames(await link.recv())
        received: list[Any] = []
        try:
            async with asyncio.timeout(1.5):
                while True:
                    received += decode_gateway_frames(await link.recv())
        except TimeoutError:
            pass
        return frames[0], received


def test_a_rogue_reader_without_the_secret_never_receives_a_request(server: LiftoffServer) -> None:
    url = f"ws://{server.internal_address}/reader"
    with pytest.raises(InvalidStatus):
        asyncio.run(_rogue(url, "rogue", 1000, {}))
    answers = [server.generate(f"prompt {index}", return_metadata=True).json() for index in range(20)]
    assert {answer["metadata"]["reader_id"] for answer in answers} == {"r1"}
    assert set(server.readers()) == {"r1"}
    assert "rogue" not in json.dumps(server.status())


def test_a_reader_with_the_secret_gets_at_most_the_largest_capacity(server: LiftoffServer) -> None:
    url = f"ws://{server.internal_address}/reader"

    async def join_and_look() -> tuple[Any, int]:
        task = asyncio.create_task(_rogue(url, "greedy", 10**9, {"authorization": f"Bearer {READER_SECRET}"}))
        detail = await asyncio.to_thread(
            wait_until,
            lambda: (
                server.http.get(server.mgmt + "/reader/greedy").json().get("state") == "live"
                and server.http.get(server.mgmt + "/reader/greedy")
            ),
        )
        welcome, _ = await task
        return welcome, int(detail.json()["capacity"])

    welcome, capacity = asyncio.run(join_and_look())
    assert isinstance(welcome, WelcomeFrame)
    assert capacity == 1024  # not 10**9: it would be handed the other readers' share of the queue
    wait_until(lambda: "greedy" in server.readers("dead"), what="the greedy reader to be dead once gone")
    assert server.http.delete(server.mgmt + "/reader/greedy").status_code == 204


def test_a_rebinding_request_is_refused(server: LiftoffServer) -> None:
    """The issue's own attack: a page on evil:3000 whose name now points here posts to evil:3001."""
    port = server.ports["management_port"]
    headers = {"host": f"evil.example:{port}", "origin": f"http://evil.example:{server.ports['port']}"}
    response = server.http.post(server.mgmt + "/reader", json=echo_reader("evil"), headers=headers)
    assert response.status_code == 400
    assert response.json()["error_type"] == "unknown_host"
    assert server.http.get(server.mgmt + "/status", headers={"host": f"localhost:{port}"}).status_code == 200
    assert (
        server.http.get(server.mgmt + "/status", headers={"host": f"{socket.gethostname()}:{port}"}).status_code == 200
    )
    assert "evil" not in json.dumps(server.status())


# ---- the real clients, with keys ---------------------------------------------------------------------------------


def test_takeoff_client_sends_the_key_in_its_url(server: LiftoffServer) -> None:
    """takeoff-client cannot set headers, but httpx turns a URL's user information into HTTP Basic credentials."""
    client = TakeoffClient(base_url=f"http://liftoff:{API_KEY}@127.0.0.1", port=server.ports["port"],
                           mgmt_port=server.ports["management_port"])  # fmt: skip
    assert client.generate("with a key")["text"] == "with a key"
    assert "".join(event.data for event in client.generate_stream("streamed too")) == "streamed too"
    with pytest.raises(TakeoffException) as info:
        client.get_status()  # the inference key is not the management key
    assert info.value.status_code == 401
    manager = TakeoffClient(base_url=f"http://liftoff:{MANAGEMENT_KEY}@127.0.0.1", port=server.ports["port"],
                            mgmt_port=server.ports["management_port"])  # fmt: skip
    reader_id = manager.create_reader({"model_name": "echo", "device": "cpu", "consumer_group": "keyed"})["reader_id"]
    wait_until(lambda: any(r["ready"] for r in manager.get_readers().get("keyed", [])), what="the keyed reader")
    assert "r1" in manager.get_status()["status"]["live_readers"]
    manager.delete_reader(reader_id)
    anonymous = TakeoffClient(base_url="http://127.0.0.1", port=server.ports["port"])
    with pytest.raises(TakeoffException) as info:
        anonymous.generate("no key")
    assert info.value.status_code == 401


def test_openai_sdk_sends_its_api_key(server: LiftoffServer) -> None:
    base = server.url("openai_port") + "/v1"
    messages: Any = [{"role": "user", "content": "hello there"}]
    with openai.OpenAI(base_url=base, api_key=API_KEY, max_retries=0) as client:
        reply = client.chat.completions.create(model="primary", messages=messages)
        assert reply.choices[0].message.content == "user: hello there\nassistant:"
        with client.chat.completions.create(model="primary", messages=messages, stream=True) as chunks:
            assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert [model.id for model in client.models.list()] == ["primary"]
    with (
        openai.OpenAI(base_url=base, api_key="not-the-key", max_retries=0) as wrong,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        wrong.chat.completions.create(model="primary", messages=messages)
    assert info.value.body["code"] == "unauthorized"  # type: ignore[index]


@pytest.mark.filterwarnings("ignore:`langchain-community` is being sunset:DeprecationWarning")
def test_langchain_titan_takeoff_with_a_key(server: LiftoffServer) -> None:
    from langchain_community.llms import TitanTakeoff

    llm = TitanTakeoff(base_url=f"http://liftoff:{API_KEY}@127.0.0.1", port=server.ports["port"],
                       mgmt_port=server.ports["management_port"])  # fmt: skip
    assert llm.invoke("the quick brown fox") == "the quick brown fox"
    assert "".join(llm.stream("one two")) == "one two"


# ---- secrets stay secret -----------------------------------------------------------------------------------------


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)


def test_no_key_is_shown_anywhere(server: LiftoffServer) -> None:
    shown = [server.http.get(server.mgmt + path).text for path in ("/status", "/config/r1", "/reader/r1", "/metrics",
                                                                  "/reader_groups")]  # fmt: skip
    shown += [server.http.get(server.base + path).text for path in ("/status", "/ui/config.json", "/openapi.json")]
    shown.append(server.http.get(server.url("openai_port") + "/v1/models").text)
    shown.append(server.log())
    for text in shown:
        assert not any(secret in text for secret in SECRETS), text[:300]
    (pid,) = server.readers()["r1"]["pids"]
    environment = _environ(pid)
    assert environment["TAKEOFF_READER_SECRET"] == READER_SECRET  # how a spawned reader gets it
    assert API_KEY not in json.dumps(environment)
    assert MANAGEMENT_KEY not in json.dumps(environment)
    command_line = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    assert not any(secret in command_line for secret in SECRETS)


def _headless(server: LiftoffServer, log: Path, reader_id: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "liftoff", "reader", "--gateway", server.internal_address, "--reader-id",
               reader_id, "--model-name", "echo", "--consumer-group", "edge", *args]  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})


def test_headless_readers_join_with_the_secret_only(server: LiftoffServer, tmp_path: Path) -> None:
    secret_file = tmp_path / "reader-secret"
    secret_file.write_text(READER_SECRET + "\n")
    good = _headless(server, tmp_path / "good.log", "headless-ok", "--reader-secret-file", str(secret_file))
    bad = _headless(server, tmp_path / "bad.log", "headless-bad", TAKEOFF_READER_SECRET="x" * 24)
    try:
        wait_until(lambda: "headless-ok" in server.readers(), what="the reader with the secret to be live")
        assert server.generate("from afar", consumer_group="edge").json() == {"text": "from afar"}
        wait_until(lambda: "requires its reader_secret" in (tmp_path / "bad.log").read_text(), what="the refusal")
        assert bad.poll() is None  # it keeps trying, and never gets in
        assert "headless-bad" not in json.dumps(server.status())
    finally:
        for process in (good, bad):
            process.send_signal(signal.SIGTERM)
            process.wait(20)
    assert server.http.delete(server.mgmt + "/reader/headless-ok").status_code == 204


def test_dead_registrations_are_pruned_and_the_gateways_own_readers_kept(liftoff: Any, tmp_path: Path) -> None:
    short = {**KEYED, "dead_reader_retention_s": 1, "reader_load_timeout_s": 2}
    gateway = liftoff(readers={"own": echo_reader(crash_after_ms=300, restart_policy="never")}, server=short)
    gateway.start(wait="loading")
    stuck = _headless(gateway, tmp_path / "stuck.log", "stuck", "--backend-options", '{"load_delay_ms": 60000}',
                      TAKEOFF_READER_SECRET=READER_SECRET)  # fmt: skip
    gone = _headless(gateway, tmp_path / "gone.log", "gone", TAKEOFF_READER_SECRET=READER_SECRET)
    try:
        wait_until(lambda: "gone" in gateway.readers(), what="the headless reader to be live")
        gone.kill()
        gone.wait(10)
        wait_until(lambda: "gone" in gateway.readers("dead"), what="the killed reader to be dead")
        wait_until(lambda: "gone" not in json.dumps(gateway.status()), timeout=15, what="it to be forgotten")
        wait_until(lambda: "stuck" not in json.dumps(gateway.status()), timeout=20, what="the stuck one dropped")
        assert "own" in gateway.readers("dead")  # crashed, not restarted: kept, with why, until it is deleted
        assert "still loading after" in gateway.log()
    finally:
        for process in (stuck, gone):
            if process.poll() is None:
                process.kill()
            process.wait(10)


def test_liftoff_status_sends_the_management_key_from_the_environment(server: LiftoffServer) -> None:
    command = [sys.executable, "-m", "liftoff", "status", "--url", server.mgmt]
    keyed = subprocess.run(command, capture_output=True, text=True, timeout=30,
                           env={**os.environ, "TAKEOFF_MANAGEMENT_API_KEYS": MANAGEMENT_KEY})  # fmt: skip
    assert keyed.returncode == 0, keyed.stderr
    assert "r1" in keyed.stdout
    bare = {key: value for key, value in os.environ.items() if not key.startswith("TAKEOFF_MANAGEMENT_API_KEYS")}
    refused = subprocess.run(command, capture_output=True, text=True, timeout=30, env=bare)
    assert refused.returncode == 1
    assert "answered 401" in refused.stderr
