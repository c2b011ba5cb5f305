"""The reader's half of the embedded broker: a WebSocket client to the gateway's internal port.

Frames handed to :meth:`EmbeddedReaderLink.send` from the same loop iteration go out in one message. A gateway
with a ``reader_secret`` accepts the handshake only with it (``Authorization: Bearer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from liftoff.broker.base import LinkClosedError, ReaderLink
from liftoff.core.frames import GatewayFrame, RegisterFrame, WelcomeFrame, decode_gateway_frames, encode_frames

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def gateway_url(address: str) -> str:
    """Normalise ``host``, ``host:port`` or a ``ws://`` URL to the reader endpoint URL."""
    if address.startswith(("ws://", "wss://")):
        return address if address.rstrip("/").endswith("/reader") else address.rstrip("/") + "/reader"
    if address.startswith(("http://", "https://")):
        return "ws" + address.removeprefix("http").rstrip("/") + "/reader"
    if ":" not in address.rsplit("]", 1)[-1]:
        address = f"{address}:3005"
    return f"ws://{address}/reader"


class EmbeddedReaderLink(ReaderLink):
    """A reader's connection to one gateway."""

    def __init__(self, address: str, secret: str | None = None) -> None:
        self.url = gateway_url(address)
        self._headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self._conn: ClientConnection | None = None
        self._outbox: list[Any] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._early: list[GatewayFrame] = []

    async def connect(self, register: RegisterFrame) -> WelcomeFrame:
        try:
            self._conn = await connect(self.url, max_size=MAX_MESSAGE_BYTES, open_timeout=10, compression=None,
                                       additional_headers=self._headers)  # fmt: skip
        except InvalidStatus as exc:
            if exc.response.status_code != 401:
                raise LinkClosedError(f"the gateway at {self.url} refused the connection: {exc}") from exc
            given = "a reader_secret it does not accept" if self._headers else "no reader_secret"
            raise LinkClosedError(
                f"the gateway at {self.url} requires its reader_secret and this reader presented {given}: set "
                "TAKEOFF_READER_SECRET or --reader-secret-file"
            ) from exc
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            raise LinkClosedError(f"cannot reach the gateway at {self.url}: {exc}") from exc
        self._outbox = []
        await self._conn.send(encode_frames([register]))
        frames = await self.receive()
        if not frames or not isinstance(frames[0], WelcomeFrame):
            raise LinkClosedError("the gateway did not answer the registration")
        self._early = frames[1:]  # work sent with the welcome (a loaded reader reconnecting to queued requests)
        self._writer = asyncio.create_task(self._write_forever(self._conn), name="liftoff-link-writer")
        return frames[0]

    def send(self, frames: list[Any]) -> None:
        if self._writer is None or self._writer.done():
            return
        self._outbox.extend(frames)
        self._wake.set()

    async def _write_forever(self, conn: ClientConnection) -> None:
        """Send what is queued; if writing fails for any reason but a closed connection, close the connection, so
        the reader sees the link gone (and reconnects or exits) instead of staying live with a dead writer."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._outbox:
                    batch, self._outbox = self._outbox, []
                    await conn.send(encode_frames(batch))
        except ConnectionClosed:
            return
        except Exception:
            logger.exception("the link's writer failed; closing the connection to the gateway")
            with contextlib.suppress(Exception):
                await conn.close(1011, "the reader could not write to the gateway")

    async def receive(self) -> list[GatewayFrame]:
        if self._early:
            early, self._early = self._early, []
            return early
        if self._conn is None:
            raise LinkClosedError("not connected")
        try:
            data = await self._conn.recv()
        except ConnectionClosed as exc:
            reason = exc.rcvd.reason if exc.rcvd is not None else ""
            raise LinkClosedError(reason or "the connection to the gateway closed") from exc
        if isinstance(data, str):
            raise LinkClosedError("the gateway sent a text message; expected msgpack frames")
        return decode_gateway_frames(data)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self._outbox:
            with contextlib.suppress(ConnectionClosed):
                await conn.send(encode_frames(self._outbox))
            self._outbox = []
        with contextlib.suppress(Exception):
            await conn.close()
