"""Keeping up with dead readers and gateways (Redis broker, reader side): re-claiming the pending entries of dead
readers, deleting their consumers, finding the gateways that are gone.

An entry a reader claimed stays in its consumer's pending list until the reader acknowledges it. When the reader
dies first, another reader of the group takes the entry over with ``XCLAIM``. A consumer counts as dead when no
registered reader that is not dead has its ``consumer_name`` (gateways mark silent readers dead in the registry;
a restarted process has a new consumer name). The gateway that owns each request decides what happens next: a
request that had started answering fails, one that had not runs on its new reader (``ClaimedFrame.reclaimed``).
"""

from __future__ import annotations

import logging
from typing import Any, cast

import redis.asyncio as aioredis

from liftoff.broker.redis.common import Entry, ReaderEntry, gateway_key, queue_key, reader_ids, reader_key

logger = logging.getLogger(__name__)

# An entry must have been idle this long to be taken over (two readers re-claiming at once: the first one wins).
MIN_IDLE_MS = 200


async def living_consumers(client: aioredis.Redis) -> set[str]:
    """The consumer names of every registered reader that is not dead."""
    ids = await reader_ids(client)
    if not ids:
        return set()
    async with client.pipeline(transaction=False) as pipe:
        for reader_id in ids:
            pipe.hmget(reader_key(reader_id), ["register", "state"])
        rows = await pipe.execute()
    names = set()
    for fields in rows:
        entry = ReaderEntry.parse({b"register": fields[0] or b"", b"state": fields[1] or b""})
        if entry is not None and entry.state != "dead":
            names.add(entry.register_frame().info.consumer_name)
    return names


async def reclaim_dead(client: aioredis.Redis, group: str, consumer: str, limit: int) -> list[Entry]:
    """Take over up to ``limit`` entries of ``group`` that dead consumers left pending; forget emptied consumers."""
    key = queue_key(group)
    summary = await client.xpending(key, group)
    if not summary["pending"]:
        return []
    holders = {entry["name"].decode(): int(entry["pending"]) for entry in summary["consumers"] or []}
    living = await living_consumers(client)
    taken: list[Entry] = []
    for name, pending in holders.items():
        if name == consumer or name in living or len(taken) >= limit:
            continue
        rows = await client.xpending_range(key, group, "-", "+", limit - len(taken), consumername=name,
                                           idle=MIN_IDLE_MS)  # fmt: skip
        ids: list[Any] = [row["message_id"] for row in rows]
        claimed = cast(list[Entry], await client.xclaim(key, group, consumer, MIN_IDLE_MS, ids)) if ids else []
        if claimed:
            taken.extend(entry for entry in claimed if entry and entry[1])
            logger.warning("took over %d requests of the dead reader %s in group %s", len(claimed), name, group)
        if len(claimed) >= pending:  # nothing left in its pending list (deleting it would drop what is)
            await client.xgroup_delconsumer(key, group, name)
    return taken


async def forget_dead_consumers(client: aioredis.Redis, group: str, idle_ms: int = 60_000) -> int:
    """Delete the consumers of ``group`` that belong to no living reader, hold nothing, and have been idle for
    ``idle_ms`` (readers come and go, under Kubernetes with every new pod); how many were deleted."""
    key = queue_key(group)
    consumers = await client.xinfo_consumers(key, group)
    idle = [c for c in consumers if not int(c["pending"]) and int(c["idle"]) >= idle_ms]
    if not idle:
        return 0
    living = await living_consumers(client)
    gone = [_text(c["name"]) for c in idle if _text(c["name"]) not in living]
    for name in gone:
        await client.xgroup_delconsumer(key, group, name)
    return len(gone)


async def gone_gateways(client: aioredis.Redis, gateways: set[str]) -> set[str]:
    """Those of ``gateways`` whose liveness key has expired (one round trip)."""
    if not gateways:
        return set()
    names = sorted(gateways)
    async with client.pipeline(transaction=False) as pipe:
        for gateway in names:
            pipe.exists(gateway_key(gateway))
        flags = await pipe.execute()
    return {gateway for gateway, flag in zip(names, flags, strict=True) if not flag}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
