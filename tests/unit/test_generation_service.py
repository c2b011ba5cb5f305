"""``liftoff.gateway.generation``: a client that leaves cancels its request, except an adapter change, which the
management API carries through (the reader may already have made it, and the records must follow)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.requests import Request

from liftoff.core.errors import RequestCancelledError
from liftoff.core.frames import RequestFrame
from liftoff.core.ids import new_request_id
from liftoff.core.types import RequestKind
from liftoff.gateway.generation import Generation
from liftoff.gateway.surfaces import management
from tests.unit.inprocess import InProcessGateway

SLOW_S = 0.3  # the reader's answer comes this long after the client has gone (its watcher starts after 20 ms)


async def _gone() -> dict[str, Any]:
    return {"type": "http.disconnect"}


def _left(gateway: InProcessGateway) -> Request:
    """An HTTP request whose client has already disconnected."""
    app = SimpleNamespace(state=SimpleNamespace(liftoff=gateway.state))  # what get_state reads
    scope = {"type": "http", "method": "POST", "path": "/reader/reader-a/loras", "headers": [], "app": app}
    return Request(scope, _gone)


@pytest.fixture
def slow_services(gateway: InProcessGateway, monkeypatch: pytest.MonkeyPatch) -> InProcessGateway:
    """The fake reader answers service requests (adapter changes included) only after ``SLOW_S``."""
    serve = gateway.broker._serve

    def later(*args: Any) -> None:
        asyncio.get_running_loop().call_later(SLOW_S, serve, *args)

    monkeypatch.setattr(gateway.broker, "_serve", later)
    return gateway


def _add(name: str) -> RequestFrame:
    return RequestFrame(request_id=new_request_id(), consumer_group="", kind=RequestKind.ADD_LORA,
                        reader_id="reader-a", payload={"name": name, "source": f"adapters/{name}"})  # fmt: skip


async def test_a_client_that_leaves_cancels_its_request(slow_services: InProcessGateway) -> None:
    request = _left(slow_services)
    with Generation(request, slow_services.state) as generation:
        collector = generation.submit_to_reader(_add("one"))
        with pytest.raises(RequestCancelledError):
            await generation.result(collector)


async def test_an_adapter_change_outlives_its_client(slow_services: InProcessGateway) -> None:
    """The management API's request to the reader is not cancelled when its client goes: the answer arrives and
    the reader's adapters are what the manager records."""
    ask = management._asker(_left(slow_services), "reader-a")
    answer = await ask(RequestKind.ADD_LORA, {"name": "two", "source": "adapters/two"}, 5.0)
    assert answer == {"loras": ["two"]}
