"""``bench/gateway.py --broker redis``: the embedded broker against the Redis broker, and two gateways on one Redis.

The script's docstring says what is measured. This module starts the ``redis-server`` and the gateways, runs the
``POST /generate`` phases with the load generator of the gateway benches (``common.load``), counts the Redis
commands each phase made (``INFO commandstats`` before and after it), and writes the report. It imports only
``common``, never bench/gateway.py, which imports it for ``--broker redis``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from common.gateways import SHORT_GENERATE, echo_config, launch_liftoff, liftoff_ports
from common.http_json import get_json
from common.load import Phase, Settings, run_async, run_phase
from common.log import log
from common.ports import HOST, free_ports
from common.procs import Managed, wait_for
from common.report import cpu_table, error_lines, mark, num, run_lines, run_meta

TARGET_DELTA_MS = 1.0  # Redis adds no more than this to p50
CPU_COLUMNS = (("client", "load generator"), ("gateway", "gateway 1"), ("gateway2", "gateway 2"),
               ("readers", "readers"), ("redis", "redis-server"), ("other", "other processes"))  # fmt: skip
ROWS = (  # result key, broker, gateways
    ("embedded_generate", "embedded", 1),
    ("redis_generate", "redis", 1),
    ("redis2_generate", "redis", 2),
    ("embedded_latency", "embedded", 1),
    ("redis_latency", "redis", 1),
)
DELTAS = {"latency": ("embedded_latency", "redis_latency"), "generate": ("embedded_generate", "redis_generate")}


# ---- servers -----------------------------------------------------------------------------------------------------


def redis_client(port: int) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, socket_timeout=5)


def redis_ready(port: int) -> bool:
    try:
        with redis_client(port) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def start_redis(workdir: Path, stack: contextlib.ExitStack) -> tuple[Managed, int]:
    """A ``redis-server`` without persistence on a free loopback port, answering; ``stack`` stops it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
    port = free_ports(1)[0]
    command = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    server = Managed("redis-server", command, workdir, workdir / "redis.log")
    stack.callback(server.stop)
    wait_for(server, lambda: redis_ready(port), timeout=20)
    return server, port


def redis_calls(port: int) -> Counter[str]:
    """Calls of each Redis command so far (without ``info``, which this module sends)."""
    with redis_client(port) as client:
        stats = client.info("commandstats")
    return Counter({key.removeprefix("cmdstat_"): int(value["calls"]) for key, value in stats.items()
                    if key != "cmdstat_info"})  # fmt: skip


def start_gateway(
    workdir: Path,
    name: str,
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
    broker: str,
    *,
    readers: bool = True,
) -> tuple[Managed, dict[str, int]]:
    """A gateway with ``broker``, with the echo readers of ``--readers`` in its config or none (then it waits until
    it sees ``--readers`` live readers through the broker); returns it and its ports."""
    gateway_dir = workdir / name
    gateway_dir.mkdir()
    ports = liftoff_ports()
    config = echo_config(ports, gateway_dir, readers=args.readers, batch_size=args.batch_size,
                         paced_token_delay_ms=args.paced_token_delay_ms, api_key=args.api_key)  # fmt: skip
    config["takeoff"]["server_config"]["broker"] = broker
    if args.reader_message_timeout_ms is not None:
        config["takeoff"]["server_config"]["reader_message_timeout_ms"] = args.reader_message_timeout_ms
    if not readers:
        config["takeoff"]["readers_config"] = {}
    server = launch_liftoff(gateway_dir, config, ports, stack, name=name, live_readers=args.readers)
    return server, ports


# ---- phases ------------------------------------------------------------------------------------------------------

SHORT = SHORT_GENERATE


def cpu_groups(redis_server: Managed, *gateways: Managed) -> dict[str, list[int]]:
    groups = {"client": [os.getpid()], "redis": [redis_server.pid], "readers": []}
    for index, gateway in enumerate(gateways):
        groups["gateway" if index == 0 else f"gateway{index + 1}"] = [gateway.pid]
        groups["readers"] += gateway.track_children()
    return groups


def one_gateway(key: str, label: str, port: int, args: argparse.Namespace, cpu: dict[str, list[int]]) -> list[Phase]:
    """``POST /generate`` from ``--concurrency`` clients, then from ``--latency-concurrency`` clients."""
    clients = args.latency_concurrency
    return [
        Phase(f"{key}_generate", f"{label} /generate", port, "/generate", SHORT, args.concurrency, None, cpu),
        Phase(f"{key}_latency", f"{label} /generate, {clients} client{'s' * (clients > 1)}", port, "/generate",
              SHORT, clients, None, cpu),
    ]  # fmt: skip


def measure(plan: list[Phase], settings: Settings, redis_port: int) -> dict[str, dict[str, Any]]:
    """Run the phases; add to each the Redis commands it made (warm-up included) and how its clients were spread."""
    results = {}
    for phase in plan:
        before = redis_calls(redis_port)
        result = run_async(run_phase(phase, settings))
        calls = redis_calls(redis_port) - before
        responses = sum(result["statuses"].values())  # warm-up included, like the calls
        result["clients_per_port"] = {str(port): count for port, count in Counter(phase.client_ports()).items()}
        result["redis_calls"] = dict(calls.most_common())
        result["redis_calls_per_request"] = calls.total() / responses if responses else None
        results[phase.key] = result
    return results


# ---- the run -----------------------------------------------------------------------------------------------------


def p50_deltas(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Redis p50 - embedded p50 (ms), at the latency and at the load concurrency."""
    deltas: dict[str, float | None] = {}
    for name, (embedded, over_redis) in DELTAS.items():
        low, high = (results.get(key, {}).get("p50_ms") for key in (embedded, over_redis))
        deltas[name] = None if low is None or high is None else high - low
    return deltas


def process_meta(server: Managed) -> dict[str, Any]:
    problems = [line for line in server.log_problems() if "Memory overcommit" not in line]  # the host's, not ours
    return {"name": server.name, "exit_code": server.exit_code, "stop_s": round(server.stop_s, 2),
            "leftover_pids": server.leftovers, "log_problems": problems}  # fmt: skip


class Stage:
    """Starts the gateways of one part of the run; a gateway that cannot start is recorded, not fatal, so that the
    figures of the other parts are still reported."""

    def __init__(self, workdir: Path, args: argparse.Namespace, meta: dict[str, Any]) -> None:
        self.workdir = workdir
        self.args = args
        self.failures: list[str] = meta["failures"]
        self.servers: list[Managed] = []
        self.management_ports: list[int] = []

    def gateway(self, name: str, stack: contextlib.ExitStack, broker: str, *, readers: bool = True) -> int | None:
        """Start a gateway (see :func:`start_gateway`); its inference port, or None if it could not start."""
        try:
            server, ports = start_gateway(self.workdir, name, self.args, stack, broker, readers=readers)
        except RuntimeError as exc:
            log(f"{name} could not start; its phases are skipped: {exc}")
            self.failures.append(f"{name} could not start: {str(exc).splitlines()[0]}")
            return None
        self.servers.append(server)
        self.management_ports.append(ports["management_port"])
        return ports["port"]

    def still_live(self) -> bool:
        """Whether the last gateway still has every reader live (a second gateway could not see them otherwise)."""
        status, body = get_json(f"http://{HOST}:{self.management_ports[-1]}/healthz")
        if status == 200 and int(body["live_readers"]) >= self.args.readers:
            return True
        name = self.servers[-1].name
        self.failures.append(f"gateway-redis-2 and its phase: {name} has lost its readers ({body})")
        log(self.failures[-1])
        return False


def benchmark_redis(args: argparse.Namespace) -> dict[str, Any]:
    """Start redis-server; embedded gateway, phases, stop; Redis gateway, phases; a second Redis gateway, phase;
    stop everything. Returns the results, the metadata and the p50 differences."""
    meta = run_meta(
        readers=args.readers,
        batch_size=args.batch_size,
        reader_message_timeout_ms=args.reader_message_timeout_ms,
        clients={"generate": args.concurrency, "latency": args.latency_concurrency},
        failures=[],
    )
    settings = Settings(args.warmup, args.duration, args.request_timeout)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="liftoff-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        redis_server, redis_port = start_redis(workdir, stack)
        url = f"redis://{HOST}:{redis_port}/0"
        with redis_client(redis_port) as client:
            meta["redis"] = {"url": url, "version": client.info("server")["redis_version"]}
        stage = Stage(workdir, args, meta)
        with contextlib.ExitStack() as embedded_stack:
            port = stage.gateway("embedded", embedded_stack, "embedded")
            if port is not None:
                cpu = cpu_groups(redis_server, *stage.servers[-1:])
                results |= measure(one_gateway("embedded", "embedded", port, args, cpu), settings, redis_port)
        with contextlib.ExitStack() as redis_stack:
            port1 = stage.gateway("gateway-redis-1", redis_stack, url)
            if port1 is not None:
                first = stage.servers[-1]
                plan = one_gateway("redis", "Redis", port1, args, cpu_groups(redis_server, first))
                results |= measure(plan, settings, redis_port)
                live = stage.still_live()
                port2 = stage.gateway("gateway-redis-2", redis_stack, url, readers=False) if live else None
                if port2 is not None:
                    cpu = cpu_groups(redis_server, first, stage.servers[-1])
                    plan = [Phase("redis2_generate", "2 gateways on Redis /generate", port1, "/generate", SHORT,
                                  args.concurrency, None, cpu, extra_ports=(port2,))]  # fmt: skip
                    results |= measure(plan, settings, redis_port)
        stack.close()
        meta["processes"] = [process_meta(server) for server in (*stage.servers, redis_server)]
        if args.keep_logs:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for path in workdir.rglob("*.log"):
                shutil.copy(path, args.keep_logs / path.name)
            log(f"copied the logs to {args.keep_logs}")
    meta["loadavg_after"] = [round(value, 2) for value in os.getloadavg()]
    deltas = p50_deltas(results)
    passed = {name: delta is not None and delta <= TARGET_DELTA_MS for name, delta in deltas.items()}
    summary = {"target_ms": TARGET_DELTA_MS, "p50_delta_ms": deltas, "pass": passed}
    return {"meta": meta, "results": results, "redis": summary}


# ---- the report --------------------------------------------------------------------------------------------------


def _clients(result: dict[str, Any]) -> str:
    split = list(result["clients_per_port"].values())
    return f"{result['concurrency']}" + (f" ({' + '.join(map(str, split))})" if len(split) > 1 else "")


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def report_redis(outcome: dict[str, Any]) -> list[str]:
    results, meta, summary = outcome["results"], outcome["meta"], outcome["redis"]
    lines = [
        "| Broker | Gateways | Clients | requests/s | p50 ms | p99 ms | errors | Redis commands / request |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for key, broker, gateways in ROWS:
        result = results.get(key)
        if result is None:
            lines.append(f"| {broker} | {gateways} | not run (see below) | | | | | |")
            continue
        calls = "—" if broker == "embedded" else num(result["redis_calls_per_request"], 1)
        cells = [broker, gateways, _clients(result), num(result["requests_per_s"]), num(result["p50_ms"], 2),
                 num(result["p99_ms"], 2), result["errors"], calls]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    errors = sum(result["errors"] for result in results.values())
    lines += [
        "",
        "| Redis p50 - embedded p50 | embedded p50 ms | Redis p50 ms | difference ms | Target | Result |",
        "|---|--:|--:|--:|---|---|",
    ]
    for name, keys in DELTAS.items():
        low, high = (results.get(key, {}).get("p50_ms") for key in keys)
        clients = meta["clients"][name]
        lines.append(f"| {clients} client{'s' * (clients > 1)} | {num(low, 2)} | {num(high, 2)} "
                     f"| {_signed(summary['p50_delta_ms'][name])} | ≤ {TARGET_DELTA_MS:g} ms "
                     f"| {mark(summary['pass'][name])} |")  # fmt: skip
    good = errors == 0 and len(results) == len(ROWS)
    lines.append(f"| errors, all phases | — | — | {errors} | 0, every phase run | {mark(good)} |")
    stops = ", ".join(f"{p['name']} {p['exit_code']} in {p['stop_s']:.1f} s" for p in meta["processes"])
    problems = ", ".join(f"{p['name']} {len(p['log_problems'])}" for p in meta["processes"])
    lines += [
        "",
        "CPU use during each measurement window (100 % = one core):",
        "",
        *cpu_table(results, CPU_COLUMNS),
        "",
        *run_lines(meta),
        f"- Liftoff: {meta['readers']} echo reader(s), max_batch_size {meta['batch_size']}, token_delay_ms 0 (in the "
        f"config of the embedded gateway and of Redis gateway 1; gateway 2 has none and uses them through Redis); "
        f"redis-server {meta['redis']['version']} without persistence; reader_message_timeout_ms "
        f"{meta['reader_message_timeout_ms'] or 'default'}",
        "- Redis commands / request: Redis command calls during the phase (warm-up included, background polling "
        "included) / responses",
        f"- Exit codes: {stops}; warning/error log lines: {problems}",
        *error_lines(results),
        *(f"- Not run: {failure}" for failure in meta["failures"]),
    ]
    for process in meta["processes"]:
        lines += [f"  {process['name']} log: {line[:200]}" for line in process["log_problems"][:10]]
    return lines
