"""The internal port (3005): the WebSocket endpoint readers connect to, served by the embedded broker."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from liftoff.broker.embedded import EmbeddedBroker
from liftoff.gateway.state import get_state

router = APIRouter(tags=["internal"])


@router.websocket("/reader")
async def reader_link(websocket: WebSocket) -> None:
    """A reader's link: msgpack frames both ways (see ``liftoff.core.frames``)."""
    broker = get_state(websocket).broker
    if not isinstance(broker, EmbeddedBroker):
        await websocket.close(4404, "this gateway uses an external broker; readers connect to it directly")
        return
    await broker.serve_reader(websocket)
