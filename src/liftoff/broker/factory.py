"""The one broker factory: which broker a process joins, and both of its halves.

A broker is named by a string: ``embedded`` (the gateway itself, readers connect to its internal port) or a
``redis://`` URL (many gateways and readers share Redis Streams). :func:`gateway_broker` builds the gateway's half
(:class:`~liftoff.broker.base.GatewayBroker`), :func:`reader_broker` decides which broker a reader joins and
:func:`reader_link_factory` builds the reader's half (:class:`~liftoff.broker.base.ReaderLink`). Each
implementation is imported only when it is chosen: the redis client only for Redis, and a reader never imports the
gateway's half.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from liftoff.broker.base import BrokerSettings, GatewayBroker, ReaderLink
from liftoff.config.models import AppConfig

EMBEDDED = "embedded"


def gateway_broker(config: AppConfig, settings: BrokerSettings) -> GatewayBroker:
    """The gateway's half of the broker ``config.broker`` names: embedded, or Redis (imported only then)."""
    if config.broker == EMBEDDED:
        from liftoff.broker.embedded.gateway import EmbeddedBroker

        return EmbeddedBroker(settings)
    from liftoff.broker.redis.gateway import RedisBroker

    return RedisBroker(settings, config.broker, config.redis_max_memory)


def reader_broker(flag: str | None, configured: str, redis_host: str | None) -> str:
    """The broker a reader joins: ``--broker``; else the configuration's (``server_config.broker``,
    ``TAKEOFF_BROKER``, ``TAKEOFF_REDIS_HOST``/``PORT``); else the reader's own ``redis_host``; else a gateway's
    embedded broker (``--gateway``)."""
    from liftoff.config.loader import redis_url
    from liftoff.config.models import check_broker

    if flag:
        return check_broker(flag)
    if configured != EMBEDDED:
        return configured
    if redis_host:
        return redis_url({**os.environ, "TAKEOFF_REDIS_HOST": redis_host})
    return EMBEDDED


def reader_link_factory(broker: str, gateway_address: str, secret: str | None) -> Callable[[], ReaderLink]:
    """What makes the reader's link (once per connection): to the gateway at ``gateway_address`` on the embedded
    broker (presenting ``secret``), or to Redis at the URL ``broker``."""
    if broker != EMBEDDED:
        from liftoff.broker.redis.link import RedisReaderLink

        return lambda: RedisReaderLink(broker)
    from liftoff.broker.embedded.link import EmbeddedReaderLink

    return lambda: EmbeddedReaderLink(gateway_address, secret)
