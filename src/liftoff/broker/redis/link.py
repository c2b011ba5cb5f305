"""The reader's half of the Redis broker: claim requests from the consumer groups' streams, answer on the reply
stream of the gateway that sent each one, keep the shared registry entry current.

A reader pulls at most its free slots (capacity plus a small prefetch) with ``XREADGROUP``, so the readers of a
group share its load. It acknowledges (and deletes) an entry after the request's final frame. Once a heartbeat
period it re-claims the entries of dead readers of its groups (:mod:`liftoff.broker.redis.reclaim`) and aborts the
requests of gateways that are gone. Losing Redis closes the link; the reader process reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from liftoff.broker.base import LinkClosedError, ReaderLink
from liftoff.broker.redis.common import (
    ABORTS,
    ACK_IF_MINE,
    LOST,
    READERS,
    SETTINGS,
    Entry,
    RedisError,
    Timing,
    cancel_all,
    connect,
    control_key,
    describe,
    drop_entry,
    pack,
    queue_key,
    reader_key,
    reply_key,
    stream_entries,
    update_reader,
)
from liftoff.broker.redis.reclaim import forget_dead_consumers, gone_gateways, reclaim_dead
from liftoff.config.access import redact_url
from liftoff.core.clock import monotonic
from liftoff.core.frames import (
    AbortFrame,
    ClaimedFrame,
    DrainFrame,
    ErrorFrame,
    FinalFrame,
    GatewayFrame,
    HeartbeatFrame,
    LoadedFrame,
    LoadFailedFrame,
    RegisterFrame,
    RequestFrame,
    ResultFrame,
    TokenFrame,
    WelcomeFrame,
    decode_gateway_frames,
    encode_frames,
)

logger = logging.getLogger(__name__)

_ABORT_MEMORY_S = 300.0
_CLAIM_DELAY_S = 0.005
_TIDY_S = 60.0  # how often a reader deletes the consumers dead readers left in its groups


@dataclass(slots=True)
class Claim:
    """A request this reader took: where to answer, and which entry to acknowledge when it ends."""

    gateway: str
    group: str = ""  # "" for a per-reader request (from the control stream)
    entry: str = ""


class RedisReaderLink(ReaderLink):
    """A reader's connection to the Redis broker."""

    tied_to_gateway = False

    def __init__(self, url: str) -> None:
        self.url = url
        self.shown = redact_url(url)  # for logs and errors: never Redis' password
        self._client: aioredis.Redis | None = None
        self._register: RegisterFrame | None = None
        self._consumer = ""
        self._groups: tuple[str, ...] = ()
        self._capacity = 0
        self._unhealthy = False
        self._live = False
        self._draining = False
        self._claims: dict[str, Claim] = {}
        self._aborted: dict[str, float] = {}
        self._outbox: list[Any] = []
        self._wake = asyncio.Event()
        self._free = asyncio.Event()
        self._inbox: asyncio.Queue[list[GatewayFrame]] = asyncio.Queue()
        self._closed: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._timing = Timing(500, 1000)

    @property
    def client(self) -> aioredis.Redis:
        """The Redis client (after ``connect``)."""
        if self._client is None:
            raise LinkClosedError("not connected")
        return self._client

    # ---- ReaderLink ---------------------------------------------------------------------------------------------

    async def connect(self, register: RegisterFrame) -> WelcomeFrame:
        self._client = connect(self.url)
        self._register = register
        self._consumer = register.info.consumer_name
        self._groups = tuple(register.info.consumer_groups)
        try:
            await self._join(register)
        except (*LOST, RedisError) as exc:
            await self._client.aclose()
            raise LinkClosedError(f"cannot reach Redis at {self.shown}: {describe(exc)}") from exc
        if register.loaded:
            self._went_live(register.capacity)
        for name, loop in (("writer", self._write_forever), ("control", self._control_forever),
                           ("keeper", self._keep_forever)):  # fmt: skip
            self._spawn(name, loop())
        for group in self._groups:
            self._spawn(f"claim-{group}", self._claim_forever(group))
        timing = self._timing
        return WelcomeFrame(gateway_id=f"redis {self.shown}",
                            reader_message_timeout_ms=timing.reader_message_timeout_ms,
                            heartbeat_interval_ms=timing.heartbeat_interval_ms)  # fmt: skip

    async def _join(self, register: RegisterFrame) -> None:
        """Create the groups' streams and consumer groups, and enter the registry."""
        client = self.client
        self._timing = Timing.parse(await client.hgetall(SETTINGS), register.heartbeat_interval_ms)
        for group in self._groups:
            with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                await client.xgroup_create(queue_key(group), group, id="0", mkstream=True)
        aborts = cast(list[Entry], await client.xrevrange(ABORTS, count=1))
        self._last_abort = aborts[0][0].decode() if aborts else "0-0"
        self._last_control = "0-0"
        key = reader_key(register.reader_id)
        async with client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping={"register": pack(register), "state": "live" if register.loaded else "loading"})
            if register.loaded:
                pipe.hset(key, "loaded", pack(LoadedFrame(model_type=register.info.model_type,
                                                          capacity=register.capacity)))  # fmt: skip
            pipe.sadd(READERS, register.reader_id)
            await pipe.execute()

    def send(self, frames: list[Any]) -> None:
        if self._closed is not None:
            return
        self._outbox.extend(frames)
        self._wake.set()

    async def receive(self) -> list[GatewayFrame]:
        if self._closed is not None and self._inbox.empty():
            raise LinkClosedError(self._closed)
        frames = await self._inbox.get()
        if not frames:
            raise LinkClosedError(self._closed or "the link closed")
        return frames

    async def close(self) -> None:
        if self._client is None:
            return
        self._shut("the reader closed its link")
        await cancel_all(self._tasks)
        client, self._client = self._client, None
        with contextlib.suppress(*LOST, RedisError):
            if self._outbox:
                await self._flush(client)
            if self._register is not None:
                fields = {"state": "dead", "error": "the reader disconnected", "why": "lost"}
                await update_reader(client, self._register.reader_id, fields)
        await client.aclose()

    # ---- internals ----------------------------------------------------------------------------------------------

    def _spawn(self, name: str, coro: Any) -> None:
        self._tasks.append(asyncio.create_task(self._guard(coro), name=f"liftoff-redis-link-{name}"))

    async def _guard(self, coro: Any) -> None:
        """Run one background loop; losing Redis closes the link."""
        try:
            await coro
        except LOST as exc:
            self._shut(f"lost Redis at {self.shown}: {describe(exc)}")
        except Exception as exc:  # a refused command, or a bug: the link closes, the reader reconnects
            logger.exception("redis link failed")
            self._shut(f"the link to Redis failed: {describe(exc)}")

    def _shut(self, reason: str) -> None:
        if self._closed is None:
            self._closed = reason
            self._inbox.put_nowait([])

    def _went_live(self, capacity: int) -> None:
        self._capacity = capacity
        self._live = True
        self._free.set()

    def _free_slots(self) -> int:
        if not self._live or self._draining or self._unhealthy:
            return 0
        return self._capacity + max(1, self._capacity // 4) - len(self._claims)

    # ---- claiming -----------------------------------------------------------------------------------------------

    async def _claim_forever(self, group: str) -> None:
        key = queue_key(group)
        start = "0"  # first our own pending entries (claimed before a reconnect), then new ones
        while self._closed is None:
            await self._free.wait()
            count = self._free_slots()
            if count <= 0:
                self._free.clear()
                continue
            try:
                streams = await self.client.xreadgroup(group, self._consumer, {key: start}, count=count,
                                                       block=None if start == "0" else 1000)  # fmt: skip
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.client.xgroup_create(key, group, id="0", mkstream=True)
                continue
            backlog = start == "0"
            entries = [entry for _, batch in stream_entries(streams) for entry in batch]
            if backlog and len(entries) < count:
                start = ">"  # the backlog is done
            for entry_id, fields in entries:
                if fields:  # an entry deleted meanwhile comes back without fields
                    self.take(group, entry_id, fields, reclaimed=backlog)
                else:
                    self._acknowledge(group, entry_id.decode())

    def take(self, group: str, entry_id: bytes, fields: dict[bytes, bytes], *, reclaimed: bool) -> None:
        """Start serving one stream entry (claimed, or re-claimed from a dead reader)."""
        entry = entry_id.decode()
        try:
            frame = decode_gateway_frames(fields[b"f"])[0]
            gateway = fields[b"gw"].decode()
        except (KeyError, IndexError, ValueError) as exc:  # not a Liftoff entry: drop it, or it comes back forever
            logger.error("dropped entry %s of %s: not a request frame (%s)", entry, queue_key(group), exc)
            self._acknowledge(group, entry)
            return
        if not isinstance(frame, RequestFrame) or frame.request_id in self._aborted:
            self._acknowledge(group, entry)
            return
        assert self._register is not None
        self._claims[frame.request_id] = Claim(gateway, group, entry)
        # Sent a moment later, so that it usually goes with the request's first output: one write for both.
        self._outbox.append(ClaimedFrame(request_id=frame.request_id, reader_id=self._register.reader_id,
                                         entry=entry, reclaimed=reclaimed))  # fmt: skip
        asyncio.get_running_loop().call_later(_CLAIM_DELAY_S, self._wake.set)
        self._inbox.put_nowait([frame])

    def _acknowledge(self, group: str, entry: str) -> None:
        self.send([lambda pipe: drop_entry(pipe, group, entry)])

    # ---- control stream and aborts ------------------------------------------------------------------------------

    async def _control_forever(self) -> None:
        assert self._register is not None
        control = control_key(self._register.reader_id)
        while self._closed is None:
            streams = await self.client.xread({control: self._last_control, ABORTS: self._last_abort},
                                              count=512, block=1000)  # fmt: skip
            for stream, entries in stream_entries(streams):
                if stream.decode() == ABORTS:
                    self._last_abort = entries[-1][0].decode()
                    self._on_aborts([fields.get(b"id", b"").decode() for _, fields in entries])
                else:
                    self._last_control = entries[-1][0].decode()
                    await self._on_control(control, entries)

    def _on_aborts(self, request_ids: list[str]) -> None:
        now = monotonic()
        frames: list[GatewayFrame] = []
        for request_id in request_ids:
            if request_id in self._claims:
                frames.append(AbortFrame(request_id=request_id))
            else:
                self._aborted[request_id] = now
        if frames:
            self._inbox.put_nowait(frames)

    async def _on_control(self, control: str, entries: list[Entry]) -> None:
        frames: list[GatewayFrame] = []
        for entry_id, fields in entries:
            to = fields.get(b"to", b"").decode()
            if to and to != self._consumer:
                continue  # for an earlier process with this reader id
            try:
                decoded = decode_gateway_frames(fields[b"f"])
                gateway = fields.get(b"gw", b"").decode()
            except (KeyError, ValueError) as exc:
                logger.error("dropped control entry %s: not gateway frames (%s)", entry_id.decode(), exc)
                continue
            for frame in decoded:
                if isinstance(frame, RequestFrame):
                    self._claims[frame.request_id] = Claim(gateway)
                frames.append(frame)
        await self.client.xdel(control, *(entry_id for entry_id, _ in entries))
        if frames:
            self._inbox.put_nowait(frames)

    # ---- keeping up: dead readers' entries, gone gateways, old aborts --------------------------------------------

    async def _keep_forever(self) -> None:
        period = self._timing.heartbeat_interval_ms / 1000.0
        tidied = monotonic()
        while self._closed is None:
            await asyncio.sleep(period)
            now = monotonic()
            self._aborted = {rid: at for rid, at in self._aborted.items() if at > now - _ABORT_MEMORY_S}
            await self._abort_orphans()
            if now - tidied > _TIDY_S:
                tidied = now
                for group in self._groups:
                    await forget_dead_consumers(self.client, group)
            free = self._free_slots()
            for group in self._groups:
                if free <= 0:
                    break
                taken = await reclaim_dead(self.client, group, self._consumer, free)
                for entry_id, fields in taken:
                    self.take(group, entry_id, fields, reclaimed=True)
                free -= len(taken)

    async def _abort_orphans(self) -> None:
        """Abort the requests of gateways that are gone (their clients are gone with them)."""
        gone = await gone_gateways(self.client, {claim.gateway for claim in self._claims.values()})
        frames: list[GatewayFrame] = [AbortFrame(request_id=r) for r, c in self._claims.items() if c.gateway in gone]
        if frames:
            logger.warning("aborting %d requests of gateways that are gone: %s", len(frames), ", ".join(sorted(gone)))
            self._inbox.put_nowait(frames)

    # ---- writing ------------------------------------------------------------------------------------------------

    async def _write_forever(self) -> None:
        while self._closed is None:
            await self._wake.wait()
            self._wake.clear()
            if self._outbox:
                await self._flush(self.client)

    async def _flush(self, client: aioredis.Redis) -> None:
        batch, self._outbox = self._outbox, []
        answered = {f.request_id for f in batch if isinstance(f, TokenFrame | FinalFrame | ResultFrame | ErrorFrame)}
        if answered:  # a first claim that goes with an output is implied by it
            batch = [f for f in batch if not isinstance(f, ClaimedFrame) or f.reclaimed or f.request_id not in answered]
        replies: dict[str, list[Any]] = {}
        async with client.pipeline(transaction=False) as pipe:
            heartbeat: int | None = None  # the index of the heartbeat's command, whose result is our state
            for frame in batch:
                at = len(pipe.command_stack)
                if self._queue_frame(pipe, frame, replies):
                    heartbeat = at
            assert self._register is not None
            reader = self._register.reader_id.encode()
            for gateway, frames in replies.items():
                pipe.xadd(reply_key(gateway), {b"rd": reader, b"f": encode_frames(frames)}, nomkstream=True)
            results = await pipe.execute(raise_on_error=False)
        if heartbeat is not None:
            self._check_heartbeat(results[heartbeat])
        if self._free_slots() > 0:
            self._free.set()

    def _queue_frame(self, pipe: Pipeline, frame: Any, replies: dict[str, list[Any]]) -> bool:
        """Add one outgoing frame to the pipeline; True for a heartbeat (whose result says our registry state)."""
        if callable(frame):
            frame(pipe)
        elif isinstance(frame, TokenFrame | FinalFrame | ResultFrame | ErrorFrame | ClaimedFrame):
            self._route(pipe, frame, replies)
        elif isinstance(frame, HeartbeatFrame):
            self._pipe_update(pipe, {"heartbeat": pack(frame)})
            self._unhealthy = bool(frame.unhealthy)  # it cannot serve (its upstream is down): take nothing new
            return True
        elif isinstance(frame, LoadedFrame):
            self._pipe_update(pipe, {"state": "live", "loaded": pack(frame)})
            self._went_live(frame.capacity)
        elif isinstance(frame, LoadFailedFrame):
            self._pipe_update(pipe, {"state": "dead", "error": f"model failed to load: {frame.reason}",
                                     "why": "load_failed"})  # fmt: skip
        elif isinstance(frame, DrainFrame):
            self._draining = True
        return False

    def _pipe_update(self, pipe: Pipeline, fields: dict[str, Any]) -> None:
        assert self._register is not None
        update_reader(pipe, self._register.reader_id, fields)

    def _route(self, pipe: Pipeline, frame: Any, replies: dict[str, list[Any]]) -> None:
        claim = self._claims.get(frame.request_id)
        if claim is None:
            return
        replies.setdefault(claim.gateway, []).append(frame)
        if isinstance(frame, TokenFrame | ClaimedFrame):
            return
        del self._claims[frame.request_id]
        if claim.group:  # acknowledged only while still ours (not re-claimed after this reader was declared dead)
            pipe.eval(ACK_IF_MINE, 1, queue_key(claim.group), claim.group, claim.entry, self._consumer)

    def _check_heartbeat(self, state: Any) -> None:
        """A gateway declared this reader dead (it was silent too long): its requests went to other readers or
        failed, so the link closes and the reader registers again."""
        if state == b"dead" and self._live:
            self._claims.clear()
            self._shut("a gateway declared this reader dead (silent too long); registering again")
