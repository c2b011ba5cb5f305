"""Gateway overhead benchmark: what Liftoff's HTTP gateway costs on top of a bare uvicorn + Starlette app.

What it measures (echo readers with no token delay, so the model costs nothing and the gateway is the work):

1. ``POST /generate`` (a short prompt, exactly 2 tokens, not streamed) from ``--concurrency`` keep-alive
   clients: successful requests/s, p50 and p99 latency, errors (a status other than 200, a body other than the
   first answer's, a broken connection, no answer within ``--request-timeout``).
2. The same load against a minimal uvicorn + Starlette app (one endpoint that reads the body and returns
   ``{"text": "hello"}``, same uvicorn settings: httptools, uvloop, no access log, one worker), and the ratio
   Liftoff / minimal (target >= 0.5).
3. The SSE relay: ``POST /generate_stream`` with ``min_new_tokens = max_new_tokens = --stream-tokens`` from
   ``--stream-concurrency`` clients: relayed tokens/s, counted from the ``data:`` events received (target
   >= 20,000/s), and that every stream delivered exactly ``--stream-tokens`` events. The minimal app's peer
   figure comes from an endpoint that streams as many ``data: hello`` events, one chunk each. With no token
   delay the echo reader produces a stream's tokens faster than they are relayed, so Liftoff sends many events
   per HTTP chunk (the report shows how many): this is the relay's bulk throughput.
4. Optional (``--paced-token-delay-ms``): the same stream from a reader that sleeps per token, so events come
   one or two per chunk, as from a real model: the per-chunk cost of the relay. No peer and no target.

It also reports the CPU time of each process (load generator, gateway, readers, minimal app) and of everything
else on the machine during each measurement, as a hint to where the time goes and how noisy the run was.

How it works: this script starts the servers (``python -m liftoff serve --config <tmp>/config.yaml`` and
``python bench/gateway.py --minimal-server PORT``) on free loopback ports in their own process groups, runs
the load generator in its own process (this one: asyncio + uvloop on raw streams, pre-built request bytes,
httptools to parse the answers), and stops every process it started at the end, on Ctrl-C or on an error.
Each phase warms up for ``--warmup`` seconds, then measures for ``--duration`` seconds; requests that end in
the window count. Targets missed are marked MISS; the exit code is 0 unless a server could not start.

Run it from the repository root::

    .venv/bin/python bench/gateway.py                      # defaults: 10 s phases, 64 clients, 1 reader
    .venv/bin/python bench/gateway.py --duration 3 --warmup 1 --json /tmp/gateway.json
    .venv/bin/python bench/gateway.py --paced-token-delay-ms 1   # also the paced stream phase

The figures depend on the machine and on what else runs on it: the CPU table's "other processes" column shows
how much of the machine something else used during each window.

Redis broker (``--broker redis``, code in ``bench/gateway_redis.py``): the script also starts its own
``redis-server`` (``--port P --bind 127.0.0.1 --save '' --appendonly no``, a free loopback port, its own process
group, stopped at the end) and runs, one after the other (only one part's gateways run at a time), the
``POST /generate`` phase (``--concurrency`` clients) against (a) a gateway with the embedded broker, (b) a gateway
with ``broker: redis://...`` and the same echo readers, and (c) two gateways on that Redis (the first is (b)'s,
with the readers in its config; the second has none and uses them through Redis), the load generator sending
half of its connections to each. For (a) and (b) it also measures ``POST /generate`` from
``--latency-concurrency`` clients (default 1: one client, sequential requests), where latency is not queueing:
that is the cleanest "what does Redis add per request" figure (at ``--concurrency`` clients p50 is mostly
queueing in a saturated gateway, so its difference follows the requests/s). The report gives requests/s, p50,
p99 and errors of each, ``Redis p50 - embedded p50`` at both concurrencies against the target (at most 1 ms),
the CPU table with the ``redis-server`` process, and the Redis commands per request (``INFO commandstats``).
The minimal-uvicorn peer and the stream phases are not run in this mode (``--paced-token-delay-ms`` is refused).
``--latency-concurrency``, ``--reader-message-timeout-ms`` (set on every gateway of the run, the embedded one
too) and ``--keep-logs`` are used only in this mode. A gateway that cannot start skips its phases (the others
are still reported) and makes the exit code 1::

    .venv/bin/python bench/gateway.py --broker redis --duration 3 --warmup 1 --json /tmp/gateway-redis.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from common.gateways import ECHO_BATCH_SIZE, PACED_GROUP, PROMPT, SHORT_GENERATE, SHORT_TOKENS, start_echo_liftoff
from common.http_json import get_json
from common.load import Phase, Settings, run_async, run_phase
from common.log import log
from common.ports import HOST, free_ports
from common.procs import Managed, terminate_on_sigterm, wait_for
from common.report import cpu_table, error_lines, mark, num, run_lines, run_meta

MINIMAL_BODY = {"text": "hello"}
TARGET_RATIO = 0.5
TARGET_TOKENS_PER_S = 20_000


# ---- the minimal peer server -------------------------------------------------------------------------------------


def uvicorn_settings() -> dict[str, Any]:
    """The uvicorn settings of the peer: those of Liftoff's gateway (``liftoff.gateway.server``, where ``http``
    is ``auto``, which picks httptools, and uvloop is the loop of ``liftoff serve``)."""
    return {"http": "httptools", "loop": "uvloop", "access_log": False, "lifespan": "off", "log_config": None,
            "server_header": False, "workers": 1}  # fmt: skip


def serve_minimal(port: int) -> None:
    """Run the peer: ``POST /generate`` answers ``{"text": "hello"}``; ``POST /generate_stream`` streams events."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    async def generate(request: Request) -> Response:
        await request.body()
        return JSONResponse(MINIMAL_BODY)

    async def generate_stream(request: Request) -> Response:
        count = int(json.loads(await request.body()).get("max_new_tokens", 1))

        async def events() -> AsyncIterator[bytes]:
            for _ in range(count):
                yield b"data: hello\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    routes = [
        Route("/generate", generate, methods=["POST"]),
        Route("/generate_stream", generate_stream, methods=["POST"]),
    ]
    uvicorn.run(Starlette(routes=routes), host=HOST, port=port, log_level="warning", **uvicorn_settings())


# ---- servers -----------------------------------------------------------------------------------------------------


def start_liftoff(
    workdir: Path, args: argparse.Namespace, stack: contextlib.ExitStack
) -> tuple[Managed, dict[str, int]]:
    """A Liftoff gateway with the echo readers of the options (``common.gateways.echo_config``), live; ``stack``
    stops it."""
    return start_echo_liftoff(workdir, stack, readers=args.readers, batch_size=args.batch_size,
                              paced_token_delay_ms=args.paced_token_delay_ms, api_key=args.api_key)  # fmt: skip


def start_minimal(workdir: Path, stack: contextlib.ExitStack) -> tuple[Managed, int]:
    """The minimal uvicorn + Starlette peer, answering; ``stack`` stops it."""
    port = free_ports(1)[0]
    command = [sys.executable, str(Path(__file__).resolve()), "--minimal-server", str(port)]
    server = Managed("minimal", command, workdir, workdir / "minimal.log")
    stack.callback(server.stop)
    wait_for(server, lambda: get_json(f"http://{HOST}:{port}/generate", b"{}")[0] == 200)
    return server, port


# ---- the report --------------------------------------------------------------------------------------------------


def _streams(result: dict[str, Any]) -> str:
    return f"{result['streams_exact']:,}/{result['streams_checked']:,}"


def table(results: dict[str, dict[str, Any]], ratio: float) -> list[str]:
    lift, peer = results["liftoff_generate"], results["minimal_generate"]
    slift, speer = results["liftoff_stream"], results["minimal_stream"]
    conc, sconc, tokens = lift["concurrency"], slift["concurrency"], slift["expected_events"]
    exact = slift["streams_checked"] > 0 and slift["streams_exact"] == slift["streams_checked"]
    return [
        "| Measure | Liftoff | Peer (minimal uvicorn + Starlette) | Target | Result |",
        "|---|--:|--:|---|---|",
        f"| `POST /generate` ({SHORT_TOKENS} tokens), {conc} clients: requests/s | {num(lift['requests_per_s'])} "
        f"| {num(peer['requests_per_s'])} | ≥ {TARGET_RATIO:g} x peer | {mark(ratio >= TARGET_RATIO)} |",
        f"| Liftoff / peer requests/s | {ratio:.2f} | 1 | ≥ {TARGET_RATIO:.2f} | {mark(ratio >= TARGET_RATIO)} |",
        f"| p50 latency (ms) | {num(lift['p50_ms'], 2)} | {num(peer['p50_ms'], 2)} | — | — |",
        f"| p99 latency (ms) | {num(lift['p99_ms'], 2)} | {num(peer['p99_ms'], 2)} | — | — |",
        f"| errors | {lift['errors']} | {peer['errors']} | 0 | {mark(lift['errors'] == 0)} |",
        f"| `POST /generate_stream`, {sconc} streams x {tokens} tokens: tokens/s | {num(slift['tokens_per_s'])} "
        f"| {num(speer['tokens_per_s'])} | ≥ {TARGET_TOKENS_PER_S:,} | "
        f"{mark(slift['tokens_per_s'] >= TARGET_TOKENS_PER_S)} |",
        f"| streams with exactly {tokens} events | {_streams(slift)} | {_streams(speer)} | all | {mark(exact)} |",
        f"| stream p50 / p99 (ms) | {num(slift['p50_ms'], 1)} / {num(slift['p99_ms'], 1)} "
        f"| {num(speer['p50_ms'], 1)} / {num(speer['p99_ms'], 1)} | — | — |",
        f"| first event p50 / p99 (ms) | {num(slift['first_event_p50_ms'], 1)} / "
        f"{num(slift['first_event_p99_ms'], 1)} | {num(speer['first_event_p50_ms'], 1)} / "
        f"{num(speer['first_event_p99_ms'], 1)} | — | — |",
        f"| events per HTTP chunk (mean) | {num(slift['events_per_chunk'], 1)} "
        f"| {num(speer['events_per_chunk'], 1)} | — | — |",
        f"| stream errors | {slift['errors']} | {speer['errors']} | 0 | {mark(slift['errors'] == 0)} |",
    ]


CPU_COLUMNS = (("client", "load generator"), ("gateway", "Liftoff gateway"), ("readers", "Liftoff readers"),
               ("minimal", "minimal app"), ("other", "other processes"))  # fmt: skip


def paced_rows(results: dict[str, dict[str, Any]], delay_ms: float) -> list[str]:
    """The optional paced stream phase: no peer, no target; a measure of the per-chunk relay cost."""
    paced = results.get("liftoff_paced_stream")
    if paced is None:
        return []
    good = paced["streams_checked"] > 0 and paced["streams_exact"] == paced["streams_checked"] and not paced["errors"]
    label = f"paced `POST /generate_stream` (token_delay_ms {delay_ms:g}), {paced['concurrency']} streams"
    return [
        f"| {label}: tokens/s | {num(paced['tokens_per_s'])} | — | — | — |",
        f"| {label}: events per HTTP chunk | {num(paced['events_per_chunk'], 1)} | — | — | — |",
        f"| {label}: exact streams, errors | {_streams(paced)}, {paced['errors']} | — | all, 0 | {mark(good)} |",
    ]


def report(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> tuple[list[str], float]:
    peer = results["minimal_generate"]["requests_per_s"]
    ratio = results["liftoff_generate"]["requests_per_s"] / peer if peer else 0.0
    delay = meta["paced_token_delay_ms"]
    paced = f", and a reader with token_delay_ms {delay:g} (group '{PACED_GROUP}')" if delay > 0 else ""
    lines = [
        *table(results, ratio),
        *paced_rows(results, meta["paced_token_delay_ms"]),
        "",
        "CPU use during each measurement window (100 % = one core):",
        "",
        *cpu_table(results, CPU_COLUMNS),
        "",
        *run_lines(meta),
        f"- Liftoff: {meta['readers']} echo reader(s), max_batch_size {meta['batch_size']}, token_delay_ms 0"
        f"{paced}; "
        f"stopped with exit code {meta['liftoff_exit']} in {meta['liftoff_stop_s']:.1f} s; "
        f"{len(meta['liftoff_log_problems'])} warning/error log lines",
    ]
    return lines + error_lines(results), ratio


# ---- main --------------------------------------------------------------------------------------------------------


def phases(args: argparse.Namespace, liftoff: Managed, lift_port: int, minimal: Managed, peer_port: int) -> list[Phase]:
    """The phases of the default mode, each against Liftoff then the peer, with the CPU groups of each."""
    short = SHORT_GENERATE
    long = {"text": PROMPT, "max_new_tokens": args.stream_tokens, "min_new_tokens": args.stream_tokens}
    lift_cpu = {"client": [os.getpid()], "gateway": [liftoff.pid], "readers": liftoff.track_children()}
    peer_cpu = {"client": [os.getpid()], "minimal": [minimal.pid]}
    plan = [
        Phase("liftoff_generate", "Liftoff /generate", lift_port, "/generate", short, args.concurrency, None, lift_cpu),
        Phase("minimal_generate", "minimal /generate", peer_port, "/generate", short, args.concurrency, None, peer_cpu),
        Phase("liftoff_stream", "Liftoff /generate_stream", lift_port, "/generate_stream", long,
              args.stream_concurrency, args.stream_tokens, lift_cpu),
        Phase("minimal_stream", "minimal /generate_stream", peer_port, "/generate_stream", long,
              args.stream_concurrency, args.stream_tokens, peer_cpu),
    ]  # fmt: skip
    if args.paced_token_delay_ms > 0:
        paced = {**long, "consumer_group": PACED_GROUP}
        plan.append(Phase("liftoff_paced_stream", "Liftoff paced /generate_stream", lift_port, "/generate_stream",
                          paced, args.paced_concurrency, args.stream_tokens, lift_cpu))  # fmt: skip
    if args.api_key:
        plan = [dataclasses.replace(phase, api_key=args.api_key) for phase in plan]
    return plan


async def run_all(plan: list[Phase], settings: Settings) -> dict[str, dict[str, Any]]:
    return {phase.key: await run_phase(phase, settings) for phase in plan}


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Start the servers, run the phases, stop the servers; return results and metadata."""
    meta = run_meta(readers=args.readers, batch_size=args.batch_size, paced_token_delay_ms=args.paced_token_delay_ms,
                    api_keys=bool(args.api_key))  # fmt: skip
    settings = Settings(args.warmup, args.duration, args.request_timeout)
    with tempfile.TemporaryDirectory(prefix="liftoff-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        liftoff, lift_port = start_liftoff(workdir, args, stack)
        minimal, peer_port = start_minimal(workdir, stack)
        results = run_async(run_all(phases(args, liftoff, lift_port["port"], minimal, peer_port), settings))
        stack.close()  # stop both now, to report how Liftoff stopped
        meta |= {
            "liftoff_exit": liftoff.exit_code,
            "liftoff_stop_s": liftoff.stop_s,
            "liftoff_leftover_pids": liftoff.leftovers,
            "liftoff_log_problems": liftoff.log_problems(),
        }
    meta["loadavg_after"] = [round(value, 2) for value in os.getloadavg()]
    return {"meta": meta, "results": results}


def peer_report(outcome: dict[str, Any]) -> list[str]:
    """The report of the default mode (Liftoff against the minimal peer); adds ``ratio`` to ``outcome``."""
    lines, outcome["ratio"] = report(outcome["results"], outcome["meta"])
    return lines + [f"  liftoff log: {line}" for line in outcome["meta"]["liftoff_log_problems"][:10]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds measured per phase (default 10).")
    parser.add_argument("--warmup", type=float, default=2.0, help="Seconds of warm-up per phase (default 2).")
    parser.add_argument("--concurrency", type=int, default=64, help="Clients of the /generate phases (64).")
    parser.add_argument("--stream-concurrency", type=int, default=16, help="Clients of the stream phases (16).")
    parser.add_argument("--stream-tokens", type=int, default=256, help="Tokens (events) per stream (256).")
    parser.add_argument("--readers", type=int, default=1, help="Echo readers of the Liftoff gateway (1).")
    parser.add_argument(
        "--batch-size", type=int, default=ECHO_BATCH_SIZE, help=f"max_batch_size of each reader ({ECHO_BATCH_SIZE})."
    )
    parser.add_argument(
        "--paced-token-delay-ms",
        type=float,
        default=0.0,
        help="Also stream from a reader that sleeps this long per token (one event per chunk); 0: skip (default).",
    )
    parser.add_argument("--paced-concurrency", type=int, default=64, help="Clients of the paced stream phase (64).")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="An answer later than this is an error.")
    parser.add_argument("--json", type=Path, help="Also write the figures to this JSON file.")
    parser.add_argument(
        "--api-key",
        default="",
        help="Give the Liftoff gateway this api_keys entry and send it with every request (to the peer too): the "
        "cost of checking a key. Default: no keys.",
    )
    parser.add_argument(
        "--broker",
        choices=("embedded", "redis"),
        default="embedded",
        help="embedded (default): Liftoff against the minimal peer; redis: embedded vs Redis broker vs two "
        "gateways on one Redis (starts its own redis-server; see above).",
    )
    parser.add_argument(
        "--latency-concurrency",
        type=int,
        default=1,
        help="--broker redis: clients of the latency phases, embedded vs Redis (default 1: sequential requests).",
    )
    parser.add_argument(
        "--reader-message-timeout-ms",
        type=int,
        help="--broker redis: server_config reader_message_timeout_ms of every gateway (default: Liftoff's).",
    )
    parser.add_argument("--keep-logs", type=Path, help="--broker redis: copy the servers' logs into this folder.")
    parser.add_argument("--minimal-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.broker == "redis" and args.paced_token_delay_ms > 0:
        parser.error("--paced-token-delay-ms is for --broker embedded (no stream phases with --broker redis)")
    if args.broker == "redis" and min(args.latency_concurrency, args.concurrency, args.readers) < 1:
        parser.error("--concurrency, --latency-concurrency and --readers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.minimal_server is not None:
        serve_minimal(args.minimal_server)
        return 0
    run, render = benchmark, peer_report
    if args.broker == "redis":
        from gateway_redis import benchmark_redis, report_redis  # imports redis, which only this mode needs

        run, render = benchmark_redis, report_redis
    with terminate_on_sigterm():
        try:
            outcome = run(args)
        except RuntimeError as exc:
            log(f"failed: {exc}")
            return 1
        except KeyboardInterrupt:
            log("interrupted; the servers were stopped")
            return 130
    print("\n".join(render(outcome)))
    if args.json:
        args.json.write_text(json.dumps(outcome, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return 1 if outcome["meta"].get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())
