"""A WebSocket client of an ASGI app, in process and on the test's event loop: it speaks the ASGI WebSocket
messages a server (uvicorn) would, carrying broker frames (msgpack, ``liftoff.core.frames``) as a reader does."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message

from liftoff.core.frames import GatewayFrame, decode_gateway_frames, encode_frames

WAIT_S = 5.0  # the longest any step waits for the app


class ClosedError(Exception):
    """The app closed the WebSocket (or refused the handshake) with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed with {code}: {reason}")
        self.code = code
        self.reason = reason


class ReaderSocket:
    """One reader's link to the internal port's app (``/reader``), without a network."""

    def __init__(self, app: ASGIApp, headers: dict[str, str] | None = None, path: str = "/reader") -> None:
        self._app = app
        self._path = path
        self._headers = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Future[None] | None = None

    async def __aenter__(self) -> ReaderSocket:
        scope: dict[str, Any] = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "scheme": "ws",
            "path": self._path,
            "raw_path": self._path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"127.0.0.1:3005"), *self._headers],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 3005),
            "subprotocols": [],
            "state": {},
        }
        self._task = asyncio.ensure_future(self._app(scope, self._to_app.get, self._from_app.put))
        await self._to_app.put({"type": "websocket.connect"})
        try:
            message = await self._next()
            if message["type"] == "websocket.close":
                raise ClosedError(message.get("code", 1000), message.get("reason", ""))
            assert message["type"] == "websocket.accept", message
        except BaseException:
            await self._finish()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._finish()

    async def _next(self) -> Message:
        return await asyncio.wait_for(self._from_app.get(), WAIT_S)

    async def _finish(self) -> None:
        """The client is gone: the app sees a disconnect and its handler returns."""
        await self._to_app.put({"type": "websocket.disconnect", "code": 1000})
        if self._task is not None:
            await asyncio.wait_for(self._task, WAIT_S)

    async def send(self, *frames: Any) -> None:
        """Send frames in one message, as a reader does."""
        await self._to_app.put({"type": "websocket.receive", "bytes": encode_frames(list(frames))})

    async def receive(self) -> list[GatewayFrame]:
        """The next message's frames; raises :class:`ClosedError` when the app closes the link."""
        message = await self._next()
        if message["type"] == "websocket.close":
            raise ClosedError(message.get("code", 1000), message.get("reason", ""))
        return decode_gateway_frames(message["bytes"])
