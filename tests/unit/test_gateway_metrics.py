"""``liftoff.gateway.metrics`` and ``liftoff.gateway.observe``: histograms, exposition, path templates."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from prometheus_client.parser import text_string_to_metric_families

from liftoff.broker.base import BrokerSettings
from liftoff.broker.embedded.gateway import EmbeddedBroker
from liftoff.config.models import ReaderConfig
from liftoff.core.frames import HeartbeatFrame, LoadedFrame
from liftoff.gateway.metrics import GatewayMetrics, Histogram
from liftoff.gateway.observe import PathNames, RequestRecord
from liftoff.management.registry import ReaderRecord, ReaderRegistry, info_for


def test_histogram_buckets_are_cumulative() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 5.0):
        histogram.observe(("g",), value)
    family = histogram.metric("latency", "doc", ("group",))
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "latency_bucket"}
    assert buckets == {"0.1": 2, "1.0": 3, "+Inf": 4}
    assert [s.value for s in family.samples if s.name == "latency_count"] == [4]
    assert [s.value for s in family.samples if s.name == "latency_sum"] == [5.65]


def _metrics() -> tuple[GatewayMetrics, ReaderRegistry]:
    settings = BrokerSettings("gw", frozenset(), 10, 1, 1000, 1000)
    registry = ReaderRegistry()
    return GatewayMetrics(registry, EmbeddedBroker(settings)), registry


def _samples(metrics: GatewayMetrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def test_exposition_parses_and_keeps_takeoffs_names() -> None:
    metrics, registry = _metrics()
    metrics.http_requests[("3000", "/generate", "POST", "200")] += 2
    metrics.generate_tokens[("primary",)] += 7
    metrics.first_token.observe(("primary",), 0.02)
    metrics.observe_queue_time("primary", 0.001)
    config = ReaderConfig(model_name="echo", device="cpu")
    registry.add(ReaderRecord(reader_id="r1", config=config, info=info_for(config)))
    registry.on_reader_loaded("r1", LoadedFrame(model_type="CAUSAL", capacity=4))
    stats = {"steps": 10.0, "step_rows": 25.0, "step_seconds": 0.5, "tokens": 25.0}
    registry.on_reader_heartbeat("r1", HeartbeatFrame(timestamp_ms=1, stats=stats))
    samples = _samples(metrics)
    assert samples["http_requests_total"] == [({"port": "3000", "path": "/generate", "method": "POST",
                                                "status": "200"}, 2.0)]  # fmt: skip
    assert samples["generate_tokens"] == [({"consumer_group": "primary"}, 7.0)]
    assert samples["time_to_first_token_count"] == [({"consumer_group": "primary"}, 1.0)]
    assert samples["queue_time_count"] == [({"consumer_group": "primary"}, 1.0)]
    labels = {"reader": "r1", "consumer_group": "primary"}
    assert samples["generate_count"] == [(labels, 10.0)]
    assert samples["generate_batch_size_sum"] == [(labels, 25.0)]
    assert samples["generate_batch_size_count"] == [(labels, 10.0)]
    assert ({"state": "live"}, 1.0) in samples["liftoff_readers"]
    assert samples["liftoff_requests_waiting"] == [({"consumer_group": "primary"}, 0.0)]


def test_encoder_totals_become_batch_sizes() -> None:
    metrics, registry = _metrics()
    config = ReaderConfig(model_name="minilm", device="cpu", consumer_group=["embed"])
    registry.add(ReaderRecord(reader_id="e1", config=config, info=info_for(config)))
    registry.on_reader_loaded("e1", LoadedFrame(model_type="EMBEDDING", capacity=32))
    stats = {"batches": 3.0, "batch_inputs": 40.0, "batch_seconds": 0.3}
    registry.on_reader_heartbeat("e1", HeartbeatFrame(timestamp_ms=1, stats=stats))
    samples = _samples(metrics)
    labels = {"reader": "e1", "consumer_group": "embed"}
    assert samples["generate_batch_size_sum"] == [(labels, 40.0)]
    assert samples["liftoff_reader_batches"] == [(labels, 3.0)]


def test_paths_are_named_by_their_route_template() -> None:
    router = APIRouter()

    @router.post("/tokenize/{reader_id}")
    async def tokenize(reader_id: str) -> str:
        return reader_id

    app = FastAPI()
    app.include_router(router)
    names = PathNames(app.routes)
    assert names.name("/tokenize/abc") == "/tokenize/{reader_id}"
    assert names.name("/docs") == "/docs"
    assert names.name("/nothing/here") == "unmatched"


def test_request_record_fields_leave_out_empty_ones() -> None:
    record = RequestRecord("id-1", consumer_group="primary", completion_tokens=3)
    assert record.fields() == {"consumer_group": "primary", "completion_tokens": 3}


def test_reader_restarts_are_a_counter_per_reader() -> None:
    settings = BrokerSettings("gw", frozenset(), 10, 1, 1000, 1000)
    counts = {"r1": 2, "r2": 0}
    metrics = GatewayMetrics(ReaderRegistry(), EmbeddedBroker(settings), lambda: counts)
    samples = _samples(metrics)["liftoff_reader_restarts_total"]
    assert sorted((labels["reader"], value) for labels, value in samples) == [("r1", 2.0), ("r2", 0.0)]
    assert "liftoff_reader_restarts_total" not in _samples(_metrics()[0])  # no supervisor, no counter
