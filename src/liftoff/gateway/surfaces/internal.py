"""The internal port (3005): the WebSocket endpoint readers connect to, served by the embedded broker.

A handshake with an ``Origin`` header comes from a web page (browsers apply no CORS to WebSockets, so any page
could otherwise pose as a reader); it is refused.
"""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from liftoff.broker.embedded.gateway import EmbeddedBroker
from liftoff.gateway.state import get_state

router = APIRouter(tags=["internal"])


@router.websocket("/reader")
async def reader_link(websocket: WebSocket) -> None:
    """A reader's link: msgpack frames both ways (see ``liftoff.core.frames``)."""
    if "origin" in websocket.headers:  # a browser: readers never send Origin, and WebSockets skip CORS
        await websocket.close(4403, "readers do not send an Origin header; web pages may not connect here")
        return
    broker = get_state(websocket).broker
    if not isinstance(broker, EmbeddedBroker):
        await websocket.close(4404, "this gateway uses an external broker; readers connect to it directly")
        return
    await broker.serve_reader(websocket)
