"""The gateway's half of the Redis broker: requests go to per-group streams, outputs come back on this gateway's
reply stream, and the reader registry is read from Redis (see :mod:`liftoff.broker.redis.common` for the keys).

The gateway decides the fate of its own requests: a reader says when it claims one (``ClaimedFrame``), and only
the reader that owns a request may answer it. When a reader dies, the requests it had started fail with
``reader_died``; the ones it had not started stay in its pending list until a live reader of the group re-claims
them (``max_retries`` times at most). When Redis is lost every request in flight fails at once with 503 and new
ones are refused until the connection is back (reconnects with backoff).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from liftoff.broker.base import BrokerSettings, GatewayBroker
from liftoff.broker.redis.common import (
    ABORTS,
    ABORTS_MAXLEN,
    BACKOFF_MAX_S,
    BACKOFF_START_S,
    LOST,
    READERS,
    RESERVED,
    SETTINGS,
    Fields,
    RedisError,
    cancel_all,
    connect,
    control_key,
    describe,
    drop_entry,
    gateway_key,
    queue_key,
    reader_key,
    reply_key,
    stream_entries,
    update_reader,
)
from liftoff.broker.redis.jobs import JobBook, RedisJob
from liftoff.broker.redis.registry import RegistryMirror, snapshot
from liftoff.config.access import redact_url
from liftoff.core.clock import monotonic
from liftoff.core.errors import (
    BrokerUnavailableError,
    LiftoffError,
    NoReadersAvailableError,
    OverloadedError,
    RequestTimeoutError,
)
from liftoff.core.frames import (
    OutputFrame,
    RequestFrame,
    StopFrame,
    decode_reader_frames,
    encode_frames,
)

logger = logging.getLogger(__name__)

Op = tuple[Callable[[Pipeline], Any], Callable[[Any], None] | None]
_SWEEP_S = 0.05


class RedisBroker(GatewayBroker):
    """Gateway-side broker over Redis Streams."""

    shared = True

    def __init__(self, settings: BrokerSettings, url: str, max_memory: int = 0) -> None:
        super().__init__(settings)
        self.url = url
        self.shown = redact_url(url)  # for logs: never Redis' password
        self.max_memory = max_memory
        self._client: aioredis.Redis | None = None
        self._up = False
        self._closing = False  # redis-py may turn a cancellation into a connection error: loops check this
        self._book = JobBook(settings, self)
        self._ops: list[Op] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._reply_key = reply_key(settings.gateway_id)
        self._last_reply = "0-0"
        self._mirror = RegistryMirror(self._book.reader_gone)
        self._shared_reserved: list[str] = []
        hb_s = settings.heartbeat_interval_ms / 1000.0
        self._poll_s = max(0.02, min(hb_s, settings.reader_message_timeout_ms / 1000.0) / 4)
        self._gateway_ttl_ms = max(5_000, 5 * settings.heartbeat_interval_ms)

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._client = connect(self.url)
        try:
            await self._announce()
        except LOST as exc:
            logger.warning("Redis at %s is unreachable (%s); requests get 503 until it is back", self.shown,
                           describe(exc))  # fmt: skip
        else:
            self._up = True
            logger.info("redis broker: connected to %s (gateway %s)", self.shown, self.settings.gateway_id)
        for name, loop in (("writer", self._write_forever), ("replies", self._read_replies_forever),
                           ("poll", self._poll_forever), ("sweep", self._sweep_forever)):  # fmt: skip
            self._tasks.append(asyncio.create_task(self._keep_running(loop), name=f"liftoff-redis-{name}"))

    async def close(self) -> None:
        self._closing = True
        await cancel_all(self._tasks)
        for job in list(self._book.jobs.values()):
            self._book.fail(job, BrokerUnavailableError("the gateway is shutting down"))
        if self._client is not None:
            with contextlib.suppress(RedisError, *LOST):
                if self._ops:
                    await self._flush(self._client)
                await self._client.delete(gateway_key(self.settings.gateway_id), self._reply_key)
            await self._client.aclose()

    async def _keep_running(self, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a background loop; a bug in it is logged and the loop starts again (a dead loop would hang requests)."""
        while not self._closing:
            try:
                await loop()
            except Exception:
                logger.exception("redis broker: %s failed; restarting it", loop.__name__)
                await asyncio.sleep(0.5)

    async def _announce(self) -> None:
        """Create this gateway's reply stream and liveness key, and publish the settings readers follow."""
        client = self.client
        settings = self.settings
        if self.max_memory:
            try:
                await client.config_set("maxmemory", self.max_memory)
            except LOST:
                raise
            except RedisError as exc:
                logger.warning("could not set Redis maxmemory to %d: %s", self.max_memory, exc)
        if not await client.exists(self._reply_key):
            self._last_reply = "0-0"
        async with client.pipeline(transaction=False) as pipe:
            pipe.xadd(self._reply_key, {b"hello": b"1"})
            pipe.pexpire(self._reply_key, self._gateway_ttl_ms)
            pipe.set(gateway_key(settings.gateway_id), b"1", px=self._gateway_ttl_ms)
            pipe.hset(SETTINGS, mapping={"reader_message_timeout_ms": settings.reader_message_timeout_ms,
                                         "heartbeat_interval_ms": settings.heartbeat_interval_ms})  # fmt: skip
            if settings.reserved_groups:
                pipe.sadd(RESERVED, *sorted(settings.reserved_groups))
            await pipe.execute()

    @property
    def client(self) -> aioredis.Redis:
        """The Redis client (after ``start``)."""
        if self._client is None:
            raise RuntimeError("the redis broker is not started")
        return self._client

    # ---- gateway API --------------------------------------------------------------------------------------------

    def submit(self, frame: RequestFrame, queue_deadline: float) -> None:
        book = self._book
        if not self._up:
            raise BrokerUnavailableError("the broker (Redis) is unreachable; try again shortly")
        if book.queued >= self.settings.max_queued_requests:
            raise OverloadedError(f"{book.queued} requests are already waiting (max_queued_requests); try again later")
        job = RedisJob(frame=frame, deadline=queue_deadline)
        if frame.reader_id:
            if not self._mirror.live(frame.reader_id):
                raise NoReadersAvailableError(f"reader {frame.reader_id!r} is not live")
            job.reader = frame.reader_id
            book.jobs[frame.request_id] = job
            self._op(lambda p: p.xadd(control_key(frame.reader_id), self._entry(job)))
            return
        book.queue(job)
        key = queue_key(frame.consumer_group)
        self._op(lambda p: p.xadd(key, self._entry(job)), lambda entry_id: self._added(job, entry_id))

    def _entry(self, job: RedisJob) -> Fields:
        return {b"f": encode_frames([job.frame]), b"gw": self.settings.gateway_id.encode()}

    def _added(self, job: RedisJob, entry_id: Any) -> None:
        if isinstance(entry_id, BaseException):
            self._book.fail(job, BrokerUnavailableError(f"could not queue the request in Redis: {entry_id}"))
            return
        job.entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        if job.cancelled:
            self.forget_entry(job)

    def abort(self, request_id: str) -> None:
        job = self._book.pop(request_id)
        if job is not None:
            self.forget_entry(job)
            self.publish_abort(request_id)

    def evict_reader(self, reader_id: str, reason: str) -> None:
        seen = self._mirror.seen.get(reader_id)
        if seen is not None:  # dead before its requests are settled: its group may have no live reader left
            seen.entry = msgspec.structs.replace(seen.entry, state="dead", error=reason)
        self._book.reader_gone(reader_id, reason)
        if seen is not None:  # in Redis too, unless it was deleted meanwhile (no half-made entry)
            fields = {"state": "dead", "error": reason, "why": "lost"}
            self._op(lambda pipe: update_reader(pipe, reader_id, fields))
            self.events.on_reader_lost(reader_id, reason)

    def stop_reader(self, reader_id: str, reason: str) -> None:
        seen = self._mirror.seen.pop(reader_id, None)  # first: its group may have no live reader left
        self._book.reader_gone(reader_id, reason)
        # Addressed to this process of the reader: a reader created later with the same id must not obey it.
        stop: Fields = {b"f": encode_frames([StopFrame(reason=reason)]), b"to": seen.consumer_name if seen else ""}

        def ops(pipe: Pipeline) -> None:
            pipe.xadd(control_key(reader_id), stop)
            pipe.srem(READERS, reader_id)
            pipe.delete(reader_key(reader_id))

        self._op(ops)

    def forget_reader(self, reader_id: str) -> None:
        """Remove a dead reader from the shared registry (no stop frame: its process is gone, or cut off)."""
        self._mirror.seen.pop(reader_id, None)
        self._op(lambda pipe: (pipe.srem(READERS, reader_id), pipe.delete(reader_key(reader_id))))

    def settle(self, group: str) -> None:
        del group  # the book settles every group at once
        self._book.fail_orphans()

    def queue_depth(self, group: str | None = None) -> int:
        if group is None:
            return self._book.queued
        return sum(1 for job in self._book.jobs.values() if job.queued and job.frame.consumer_group == group)

    def in_flight(self, group: str | None = None) -> int:
        return sum(
            1
            for job in self._book.jobs.values()
            if job.reader is not None and not job.frame.reader_id
            and (group is None or job.frame.consumer_group == group)
        )  # fmt: skip

    def reserved_groups(self, own: list[str]) -> list[str]:
        return [*own, *(group for group in self._shared_reserved if group not in own)]

    # ---- what the job book needs (Hooks) -----------------------------------------------------------------------

    def forget_entry(self, job: RedisJob) -> None:
        """Take the job's entry out of its stream (unread) and out of any pending list (read)."""
        if job.entry and not job.frame.reader_id:
            group, entry = job.frame.consumer_group, job.entry
            self._op(lambda pipe: drop_entry(pipe, group, entry))

    def publish_abort(self, request_id: str) -> None:
        rid = request_id.encode()
        self._op(lambda p: p.xadd(ABORTS, {b"id": rid}, maxlen=ABORTS_MAXLEN, approximate=True))

    def emit(self, frames: list[OutputFrame]) -> None:
        self.events.on_outputs(frames)

    def live_in(self, group: str) -> bool:
        return self._mirror.live_in(group)

    def observe_queue_time(self, group: str, seconds: float) -> None:
        if self.queue_time_observer is not None:
            self.queue_time_observer(group, seconds)

    # ---- background tasks ---------------------------------------------------------------------------------------

    def _op(self, op: Callable[[Pipeline], Any], done: Callable[[Any], None] | None = None) -> None:
        self._ops.append((op, done))
        self._wake.set()

    async def _flush(self, client: aioredis.Redis) -> None:
        ops, self._ops = self._ops, []
        async with client.pipeline(transaction=False) as pipe:
            counts = []
            for op, _ in ops:
                before = len(pipe.command_stack)
                op(pipe)
                counts.append(len(pipe.command_stack) - before)
            results = await pipe.execute(raise_on_error=False)
        index = 0
        for (_, done), count in zip(ops, counts, strict=True):
            if done is not None:
                done(results[index])
            index += count

    async def _write_forever(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            if not self._ops or self._client is None:
                continue
            try:
                await self._flush(self._client)
            except LOST as exc:
                self._lost(exc)

    async def _read_replies_forever(self) -> None:
        while not self._closing:
            if not self._up:
                await self._reconnect()
                continue
            try:
                streams = await self.client.xread({self._reply_key: self._last_reply}, count=2048, block=1000)
            except LOST as exc:
                self._lost(exc)
                continue
            outputs: list[OutputFrame] = []
            for _, entries in stream_entries(streams):
                for entry_id, fields in entries:
                    self._last_reply = entry_id.decode()
                    data, reader = fields.get(b"f"), fields.get(b"rd")
                    if data and reader:
                        self._on_replies(reader.decode(), data, outputs)
            if outputs:
                self.events.on_outputs(outputs)

    def _on_replies(self, reader_id: str, data: bytes, outputs: list[OutputFrame]) -> None:
        seen = self._mirror.seen.get(reader_id)
        if seen is not None:
            seen.heard = monotonic()  # any message counts as a sign of life, as with the embedded broker
        try:
            frames = decode_reader_frames(data)
        except ValueError as exc:
            logger.error("dropped a reply of reader %s: not reader frames (%s)", reader_id, exc)
            return
        self._book.on_replies(reader_id, frames, outputs)

    def _lost(self, exc: BaseException) -> None:
        """Redis went away: fail everything in flight now (503) and refuse new work until it is back."""
        if not self._up or self._closing:
            return
        self._up = False
        logger.error("lost Redis at %s (%s): failing %d requests in flight, reconnecting", self.shown,
                     describe(exc), len(self._book.jobs))  # fmt: skip
        error = BrokerUnavailableError(f"the connection to the broker (Redis) was lost: {describe(exc)}")
        for job in list(self._book.jobs.values()):
            self._book.fail(job, error)
        self._ops.clear()  # nothing queued for Redis can be sent: what it held is gone or will be
        for reader_id in list(self._mirror.seen):
            self.events.on_reader_lost(reader_id, "the broker (Redis) was lost")
            self.events.on_reader_removed(reader_id)
        self._mirror.forget()

    async def _reconnect(self) -> None:
        delay = BACKOFF_START_S
        while not self._up and not self._closing:
            try:
                # Connections from before the outage are dead (a restarted Redis closed them): start afresh, or the
                # first command on one of them would count as a new loss and fail the requests of the new session.
                await self.client.connection_pool.disconnect()
                await self._announce()
            except LOST:
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            self._up = True
            logger.info("reconnected to Redis at %s", self.shown)

    async def _poll_forever(self) -> None:
        settings = self.settings
        while not self._closing:
            await asyncio.sleep(self._poll_s)
            if not self._up:
                continue
            try:
                entries = await snapshot(self.client)
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.set(gateway_key(settings.gateway_id), b"1", px=self._gateway_ttl_ms)
                    pipe.pexpire(self._reply_key, self._gateway_ttl_ms)
                    pipe.xtrim(self._reply_key, minid=self._last_reply, approximate=False)
                    pipe.smembers(RESERVED)
                    *_, reserved = await pipe.execute()
            except LOST as exc:
                self._lost(exc)
                continue
            self._shared_reserved = sorted(member.decode() for member in reserved)
            self._mirror.apply(entries, self.events)
            self._check_silence()

    def _check_silence(self) -> None:
        """Evict readers silent for longer than ``reader_message_timeout_ms`` while they hold our requests."""
        limit = self.settings.reader_message_timeout_ms / 1000.0 + self._poll_s
        now = monotonic()
        for reader_id in self._book.owners():
            seen = self._mirror.seen.get(reader_id)
            if seen is not None and seen.entry.state != "dead" and seen.silent_for(now) > limit:
                silent = seen.silent_for(now) * 1000
                self.evict_reader(reader_id, f"silent for {silent:.0f} ms with requests in flight")

    async def _sweep_forever(self) -> None:
        while not self._closing:
            await asyncio.sleep(_SWEEP_S)
            for job in list(self._book.expired(monotonic())):
                group = job.frame.consumer_group
                error: LiftoffError
                if self._mirror.live_in(group):
                    error = RequestTimeoutError(f"the request waited too long in the queue of group '{group}'")
                else:
                    error = NoReadersAvailableError(f"no reader of consumer group '{group}' became live in time")
                self._book.fail(job, error)
