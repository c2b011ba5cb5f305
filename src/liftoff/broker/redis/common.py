"""What both halves of the Redis broker share: key names, the connection, and the reader registry's records.

Layout (every key starts with ``liftoff:``):

- ``q:{group}``: stream of the requests of one consumer group. A Redis consumer group named ``{group}`` reads it;
  each reader is a consumer named by its ``consumer_name``. Readers XACK and XDEL an entry after its final frame.
- ``r:{gateway}``: stream of output frames for one gateway; ``gw:{gateway}``: that gateway's liveness key (TTL).
- ``ctl:{reader}``: control stream of one reader (stop frames, per-reader requests); ``aborts``: cancellations.
- ``readers`` (set of ids) and ``reader:{id}`` (hash): the shared reader registry; ``reserved``: reserved groups;
  ``settings``: the timing readers must follow (written by gateways).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError, RedisError, TimeoutError as RedisTimeoutError

from liftoff.core.frames import HeartbeatFrame, LoadedFrame, RegisterFrame

logger = logging.getLogger(__name__)
_F = TypeVar("_F", bound=msgspec.Struct)

PREFIX = "liftoff:"
READERS = PREFIX + "readers"
RESERVED = PREFIX + "reserved"
SETTINGS = PREFIX + "settings"
ABORTS = PREFIX + "aborts"

ABORTS_MAXLEN = 10_000
BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 5.0

# Errors that mean "Redis is not reachable right now" (reconnect), as opposed to a refused command.
LOST = (RedisConnectionError, RedisTimeoutError, OSError)


Entry = tuple[bytes, dict[bytes, bytes]]
Fields = dict[Any, Any]  # what XADD takes (redis-py's annotation is invariant on the key and value types)


def stream_entries(result: Any) -> list[tuple[bytes, list[Entry]]]:
    """An XREAD/XREADGROUP answer, typed (redis-py leaves it ``Any``)."""
    return cast(list[tuple[bytes, list[Entry]]], result or [])


async def reader_ids(client: aioredis.Redis) -> list[str]:
    """The ids in the registry's set, sorted."""
    members: set[bytes] = cast(set[bytes], await client.smembers(READERS))
    return sorted(member.decode() for member in members)


def queue_key(group: str) -> str:
    """The request stream of a consumer group."""
    return f"{PREFIX}q:{group}"


def reply_key(gateway_id: str) -> str:
    """The output stream of a gateway."""
    return f"{PREFIX}r:{gateway_id}"


def gateway_key(gateway_id: str) -> str:
    """The key that exists while a gateway is alive."""
    return f"{PREFIX}gw:{gateway_id}"


def control_key(reader_id: str) -> str:
    """The control stream of a reader."""
    return f"{PREFIX}ctl:{reader_id}"


def reader_key(reader_id: str) -> str:
    """The registry hash of a reader."""
    return f"{PREFIX}reader:{reader_id}"


def connect(url: str) -> aioredis.Redis:
    """A client for ``url`` (commands time out rather than hang; blocking reads pass their own timeout)."""
    return aioredis.Redis.from_url(
        url, socket_connect_timeout=2.0, socket_timeout=10.0, health_check_interval=0, retry_on_timeout=False
    )


def describe(error: BaseException) -> str:
    """A short reason for a Redis failure."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


# Update fields of a reader's hash only while it is registered (a deleted reader must not come back half-made);
# returns the state before the update.
UPDATE_IF_REGISTERED = """
if redis.call('HEXISTS', KEYS[1], 'register') == 0 then return false end
local state = redis.call('HGET', KEYS[1], 'state')
redis.call('HSET', KEYS[1], unpack(ARGV))
return state
"""

# Acknowledge and delete a stream entry only if the given consumer still holds it: a reader declared dead that
# finishes a request another reader re-claimed must not take the entry out of the new owner's pending list.
ACK_IF_MINE = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if pending[1] == nil or pending[1][2] ~= ARGV[3] then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""


def update_reader(target: aioredis.Redis | Pipeline, reader_id: str, fields: dict[str, Any]) -> Any:
    """Set fields of a reader's registry hash while it is registered (``UPDATE_IF_REGISTERED``): on a client, an
    awaitable whose result is the state before; on a pipeline, one more queued command."""
    args = [item for pair in fields.items() for item in pair]
    return target.eval(UPDATE_IF_REGISTERED, 1, reader_key(reader_id), *args)


def drop_entry(pipe: Pipeline, group: str, entry: str) -> None:
    """Queue the removal of a stream entry: out of its group's pending list (read) and out of the stream (unread)."""
    key = queue_key(group)
    pipe.xack(key, group, entry)
    pipe.xdel(key, entry)


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel tasks and wait until they have ended. redis-py runs commands under ``asyncio.wait_for``, which on
    Python 3.11 can lose a cancellation that arrives as a command completes: cancel again until each one ends."""
    for task in tasks:
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("task %s ended with %r", task.get_name(), task.exception())


_encoder = msgspec.msgpack.Encoder()


class ReaderEntry(msgspec.Struct, frozen=True):
    """A reader as the shared registry holds it (fields of ``reader:{id}``; heartbeat and loaded are raw)."""

    register: bytes
    state: str
    error: str = ""
    why: str = ""  # "load_failed" when the model failed to load
    heartbeat: bytes = b""
    loaded: bytes = b""

    @staticmethod
    def parse(fields: dict[bytes, bytes]) -> ReaderEntry | None:
        """From ``HGETALL``; None for a partial or missing hash."""
        register = fields.get(b"register")
        if not register or _decode(register, RegisterFrame) is None:
            return None  # missing, half-made, or not Liftoff's: ignored
        return ReaderEntry(
            register=register,
            state=fields.get(b"state", b"loading").decode(),
            error=fields.get(b"error", b"").decode(errors="replace"),
            why=fields.get(b"why", b"").decode(),
            heartbeat=fields.get(b"heartbeat", b""),
            loaded=fields.get(b"loaded", b""),
        )

    def register_frame(self) -> RegisterFrame:
        """The reader's registration (checked by ``parse``)."""
        return msgspec.msgpack.decode(self.register, type=RegisterFrame)

    def heartbeat_frame(self) -> HeartbeatFrame | None:
        """Its last heartbeat."""
        return _decode(self.heartbeat, HeartbeatFrame)

    def loaded_frame(self) -> LoadedFrame | None:
        """What it said when it finished loading."""
        return _decode(self.loaded, LoadedFrame)


def _decode(data: bytes, kind: type[_F]) -> _F | None:
    """One frame from registry bytes; None when empty or not that frame."""
    if not data:
        return None
    try:
        return msgspec.msgpack.decode(data, type=kind)
    except msgspec.DecodeError:
        return None


def pack(frame: msgspec.Struct) -> bytes:
    """One frame as registry bytes."""
    return _encoder.encode(frame)


@dataclass(frozen=True)
class Timing:
    """The timing gateways publish for readers (``settings``)."""

    reader_message_timeout_ms: int
    heartbeat_interval_ms: int

    @staticmethod
    def parse(fields: dict[Any, Any], default_heartbeat_ms: int) -> Timing:
        """From ``HGETALL settings``, with defaults when no gateway has written them yet."""
        return Timing(
            reader_message_timeout_ms=int(fields.get(b"reader_message_timeout_ms", 500)),
            heartbeat_interval_ms=int(fields.get(b"heartbeat_interval_ms", default_heartbeat_ms)),
        )


__all__ = [
    "ABORTS",
    "ACK_IF_MINE",
    "LOST",
    "READERS",
    "RESERVED",
    "SETTINGS",
    "Entry",
    "Fields",
    "ReaderEntry",
    "RedisError",
    "Timing",
    "cancel_all",
    "connect",
    "drop_entry",
    "reader_ids",
    "stream_entries",
    "update_reader",
]
