"""``liftoff.broker.factory``: a broker name gives the gateway's half and the reader's link of that broker."""

from __future__ import annotations

from liftoff.broker.base import BrokerSettings
from liftoff.broker.embedded.gateway import EmbeddedBroker
from liftoff.broker.embedded.link import EmbeddedReaderLink
from liftoff.broker.factory import gateway_broker, reader_link_factory
from liftoff.broker.redis.gateway import RedisBroker
from liftoff.broker.redis.link import RedisReaderLink
from liftoff.config.models import AppConfig

SETTINGS = BrokerSettings("gw", frozenset(), 10, 1, 1000, 1000)
REDIS = "redis://:secret@cache:6379/0"


def test_the_gateway_half_follows_the_configured_broker() -> None:
    assert isinstance(gateway_broker(AppConfig(), SETTINGS), EmbeddedBroker)
    broker = gateway_broker(AppConfig(broker=REDIS, redis_max_memory=1234), SETTINGS)
    assert isinstance(broker, RedisBroker)
    assert (broker.url, broker.max_memory) == (REDIS, 1234)


def test_the_reader_link_follows_the_broker_it_joins() -> None:
    embedded = reader_link_factory("embedded", "gw-host:3005", "s3cret")()
    assert isinstance(embedded, EmbeddedReaderLink)
    redis = reader_link_factory(REDIS, "gw-host:3005", None)()
    assert isinstance(redis, RedisReaderLink)
    assert redis.url == REDIS
