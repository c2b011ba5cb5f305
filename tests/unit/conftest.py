"""Fixtures of the in-process surface tests: the gateway's apps over a fake broker (tests/unit/inprocess.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.unit.inprocess import InProcessGateway, make_config

GatewayFactory = Callable[..., Awaitable[InProcessGateway]]


@pytest.fixture
async def gateway_factory(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Builds in-process gateways with the given ``server_config`` fields (no reader); closes them afterwards."""
    made: list[InProcessGateway] = []

    async def make(**fields: Any) -> InProcessGateway:
        gateway = InProcessGateway(make_config(tmp_path, **fields))
        await gateway.broker.start()
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        await gateway.close()


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory) -> InProcessGateway:
    """A gateway with one live generation reader, ``reader-a`` in group ``primary``."""
    made = await gateway_factory()
    made.broker.connect("reader-a", ("primary",))
    return made
