"""Prometheus metrics of one gateway, exposed at ``GET /metrics`` on the management port.

The gateway counts into plain dictionaries on its event loop (no locks, a few hundred nanoseconds per event) and
renders them when scraped, through prometheus-client's exposition, under Takeoff's names where takeoff-spec §4.11
lists them (``http_requests_total``, ``http_requests_duration_seconds``, ``http_pre_handler_requests_total``,
``queue_time``, ``time_to_first_token``, ``generate_tokens``, ``generate_batch_size``, ``user_batch_size``) and
``liftoff_*`` names for the rest: requests waiting and running per group, inter-token latency, prompt tokens,
readers by state, reader restarts, rejections and timeouts. Reader-side figures (batch sizes, steps, batches) come
from the running totals each reader sends with its heartbeats, so they work for readers on other hosts.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from liftoff.broker.base import GatewayBroker
from liftoff.core.types import ReaderState
from liftoff.management.registry import ReaderRegistry

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

Key = tuple[str, ...]


class Histogram:
    """Bucketed observations per label values; rendered cumulatively, Prometheus style."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.series: dict[Key, list[float]] = {}  # per key: one count per bucket and +Inf, then sum, then count

    def observe(self, key: Key, value: float) -> None:
        """Record one value for the label values ``key``."""
        row = self.series.get(key)
        if row is None:
            row = self.series[key] = [0.0] * (len(self.bounds) + 3)
        row[bisect.bisect_left(self.bounds, value)] += 1
        row[-2] += value
        row[-1] += 1

    def metric(self, name: str, documentation: str, labels: Sequence[str]) -> Metric:
        """The histogram as a Prometheus metric family."""
        family = Metric(name, documentation, "histogram")
        for key, row in self.series.items():
            base = dict(zip(labels, key, strict=True))
            total = 0.0
            for bound, count in zip((*self.bounds, float("inf")), row, strict=False):
                total += count
                le = "+Inf" if bound == float("inf") else repr(float(bound))
                family.add_sample(f"{name}_bucket", {**base, "le": le}, total)
            family.add_sample(f"{name}_sum", base, row[-2])
            family.add_sample(f"{name}_count", base, row[-1])
        return family


def _counter(name: str, documentation: str, labels: Sequence[str], values: dict[Key, float]) -> Metric:
    family = Metric(name, documentation, "counter")
    for key, value in values.items():
        family.add_sample(name, dict(zip(labels, key, strict=True)), value)
    return family


def _gauge(name: str, documentation: str, labels: Sequence[str], values: Iterable[tuple[Key, float]]) -> Metric:
    family = Metric(name, documentation, "gauge")
    for key, value in values:
        family.add_sample(name, dict(zip(labels, key, strict=True)), value)
    return family


class GatewayMetrics:
    """Every figure of one gateway; the broker and registry are read when scraped."""

    def __init__(self, registry: ReaderRegistry, broker: GatewayBroker,
                 restarts: Callable[[], dict[str, int]] | None = None) -> None:  # fmt: skip
        self.readers = registry
        self.broker = broker
        self.restarts = restarts  # reader id → restarts, of the readers this gateway started
        self.http_requests: dict[Key, float] = defaultdict(float)  # port, path, method, status
        self.http_pre_handler: dict[Key, float] = defaultdict(float)  # port, path
        self.http_duration = Histogram(LATENCY_BUCKETS)  # port, path
        self.generate_tokens: dict[Key, float] = defaultdict(float)  # consumer_group
        self.prompt_tokens: dict[Key, float] = defaultdict(float)  # consumer_group
        self.rejections: dict[Key, float] = defaultdict(float)  # consumer_group, reason
        self.timeouts: dict[Key, float] = defaultdict(float)  # consumer_group
        self.errors: dict[Key, float] = defaultdict(float)  # consumer_group, error_type
        self.queue_time = Histogram(LATENCY_BUCKETS)  # consumer_group
        self.first_token = Histogram(LATENCY_BUCKETS)  # consumer_group
        self.token_gap = Histogram(TOKEN_GAP_BUCKETS)  # consumer_group
        self.user_batch = Histogram(SIZE_BUCKETS)  # consumer_group
        self.prometheus = CollectorRegistry(auto_describe=False)
        self.prometheus.register(self)

    def exposition(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.prometheus)

    def observe_queue_time(self, group: str, seconds: float) -> None:
        """A request waited ``seconds`` in its group's queue before a reader took it (broker hook)."""
        self.queue_time.observe((group,), seconds)

    # ---- scrape -----------------------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """Every metric family, from the counters kept and from the broker and registry now."""
        yield _counter("http_requests_total", "HTTP requests answered.", ("port", "path", "method", "status"),
                       self.http_requests)  # fmt: skip
        yield _counter("http_pre_handler_requests_total", "HTTP requests received, before validation.",
                       ("port", "path"), self.http_pre_handler)  # fmt: skip
        yield self.http_duration.metric("http_requests_duration_seconds", "HTTP request duration to the last byte.",
                                        ("port", "path"))  # fmt: skip
        group = ("consumer_group",)
        yield self.queue_time.metric("queue_time", "Seconds a request waited for a reader.", group)
        yield self.first_token.metric("time_to_first_token", "Seconds from submission to the first token.", group)
        yield self.token_gap.metric("liftoff_inter_token_latency_seconds", "Seconds between a stream's frames.",
                                    group)  # fmt: skip
        yield self.user_batch.metric("user_batch_size", "Prompts or inputs in one user request.", group)
        yield _counter("generate_tokens", "Tokens generated.", group, self.generate_tokens)
        yield _counter("liftoff_prompt_tokens", "Prompt tokens of finished generations.", group, self.prompt_tokens)
        yield _counter("liftoff_rejections_total", "Requests refused before queueing.", ("consumer_group", "reason"),
                       self.rejections)  # fmt: skip
        yield _counter("liftoff_timeouts_total", "Requests that passed their deadline.", group, self.timeouts)
        yield _counter("liftoff_request_errors_total", "Requests that ended with an error from a reader.",
                       ("consumer_group", "error_type"), self.errors)  # fmt: skip
        yield from self._live()

    def _live(self) -> Iterator[Metric]:
        groups = self.readers.groups()
        yield _gauge("liftoff_requests_waiting", "Requests queued for a reader.", ("consumer_group",),
                     (((g,), self.broker.queue_depth(g)) for g in groups))  # fmt: skip
        yield _gauge("liftoff_requests_running", "Requests assigned to readers and not finished.",
                     ("consumer_group",), (((g,), self.broker.in_flight(g)) for g in groups))  # fmt: skip
        yield _gauge("liftoff_readers", "Readers by state.", ("state",),
                     (((state.value,), self.readers.count(state)) for state in ReaderState))  # fmt: skip
        if self.restarts is not None:
            counts: dict[Key, float] = {(reader_id,): float(count) for reader_id, count in self.restarts().items()}
            yield _counter("liftoff_reader_restarts_total", "Times the gateway restarted a reader it started.",
                           ("reader",), counts)  # fmt: skip
        yield from reader_metrics(self.readers)


# reader running total → (metric, kind, documentation); batch sizes are summaries (sum of rows over steps)
_READER_TOTALS: dict[str, tuple[str, str, str]] = {
    "steps": ("generate_count", "counter", "Engine steps run (one token for every running sequence)."),
    "step_seconds": ("liftoff_reader_step_seconds", "counter", "Seconds the engine spent in steps."),
    "tokens": ("liftoff_reader_tokens", "counter", "Tokens the reader generated."),
    "batches": ("liftoff_reader_batches", "counter", "Encoder batches run."),
    "batch_seconds": ("liftoff_reader_batch_seconds", "counter", "Seconds the encoder spent in batches."),
    "upstream_requests": ("liftoff_reader_upstream_requests", "counter", "Requests an API reader sent upstream."),
    "upstream_failures": ("liftoff_reader_upstream_failures", "counter", "API reader requests that failed."),
}


def reader_metrics(registry: ReaderRegistry) -> Iterator[Metric]:
    """Each live reader's running totals (from its heartbeats), labelled by reader and consumer group."""
    families: dict[str, Metric] = {}
    batch = Metric("generate_batch_size", "Sequences or inputs per engine step or encoder batch.", "summary")
    for record in registry.records.values():
        if record.state is not ReaderState.LIVE or not record.stats:
            continue
        labels = {"reader": record.reader_id, "consumer_group": ",".join(record.info.consumer_groups)}
        stats = record.stats
        for key, (name, kind, documentation) in _READER_TOTALS.items():
            if key in stats:
                family = families.setdefault(name, Metric(name, documentation, kind))
                family.add_sample(name, labels, stats[key])
        rows, count = _batch_totals(stats)
        if count:
            batch.add_sample("generate_batch_size_sum", labels, rows)
            batch.add_sample("generate_batch_size_count", labels, count)
    yield from families.values()
    yield batch


def _batch_totals(stats: dict[str, Any]) -> tuple[float, float]:
    if "steps" in stats:
        return float(stats.get("step_rows", 0.0)), float(stats["steps"])
    return float(stats.get("batch_inputs", 0.0)), float(stats.get("batches", 0.0))
