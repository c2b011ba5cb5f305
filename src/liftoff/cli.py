"""The command line, and the composition root: ``liftoff serve`` and ``liftoff reader``.

``serve`` runs a gateway with the readers of its configuration; ``status`` prints a running gateway's
readers. ``reader`` runs one reader that joins a gateway
(headless, from any host) or, with ``--supervised``, one spawned by ``serve``. Every ``server_config`` key has a
flag (``--management-port``...), and so does every simple reader option (``--model-name``, ``--device``...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from liftoff import __version__
from liftoff.config.access import SECRET_FIELDS
from liftoff.config.loader import ConfigError, LoadedConfig, load_config
from liftoff.config.models import LEGACY_SERVER_KEYS, AppConfig, ReaderConfig
from liftoff.logs import setup_logging

logger = logging.getLogger("liftoff")

_READER_FLAG_EXCLUDE = {"log_level", "backend_options", "consumer_group"}


def _scalar_type(annotation: Any) -> Any:
    if typing.get_origin(annotation) is tuple and typing.get_args(annotation) == (str, ...):
        return str  # a comma-separated list (allowed_hosts, allowed_models)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0] if len(args) == 1 else None
    if typing.get_origin(annotation) is typing.Literal:
        return str
    return annotation


def _add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], exclude: set[str], dest: str) -> None:
    group = parser.add_argument_group(dest)
    for name, field in model.model_fields.items():
        kind = _scalar_type(field.annotation)
        if name in exclude or kind not in (str, int, float, bool):
            continue
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "").replace("%", "%%")
        if kind is bool:
            group.add_argument(flag, dest=f"{dest}.{name}", action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, dest=f"{dest}.{name}", type=kind, help=help_text)


def _add_reader_flags(parser: argparse.ArgumentParser) -> None:
    _add_model_flags(parser, ReaderConfig, _READER_FLAG_EXCLUDE, "reader")
    parser.add_argument("--consumer-group", dest="reader.consumer_group", help="Consumer group(s), comma-separated.")
    parser.add_argument(
        "--backend-options", dest="reader.backend_options", type=json.loads, help="Backend options as JSON."
    )


def _flags(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    return {
        key.removeprefix(prefix + "."): value
        for key, value in vars(args).items()
        if key.startswith(prefix + ".") and value is not None
    }


def build_parser() -> argparse.ArgumentParser:
    """The ``liftoff`` argument parser."""
    parser = argparse.ArgumentParser(prog="liftoff", description="An LLM inference server that speaks Takeoff's APIs.")
    parser.add_argument("--version", action="version", version=f"liftoff {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="Run a gateway and the readers of its configuration.")
    serve.add_argument("--config", help="config.yaml with a 'takeoff:' key (or TAKEOFF_CONFIG_PATH).")
    legacy = {"max_batch_size", "batch_duration_millis", *LEGACY_SERVER_KEYS}
    _add_model_flags(serve, AppConfig, legacy | SECRET_FIELDS, "server")  # secrets: never on a command line
    _add_reader_flags(serve)

    reader = commands.add_parser("reader", help="Run one reader that joins a running gateway.")
    reader.add_argument("--gateway", help="Gateway internal address, host:port (default: internal_gateway_ip:3005).")
    reader.add_argument(
        "--broker",
        help="Redis URL redis://host:port/db of a shared broker (default TAKEOFF_BROKER, or TAKEOFF_REDIS_HOST/PORT); "
        "without it the reader connects to a gateway (--gateway).",
    )
    reader.add_argument("--reader-id", help="Reader id (default TAKEOFF_READER_ID, or a new uuid).")
    reader.add_argument(
        "--reader-secret-file",
        help="A file holding the gateway's reader_secret (default: TAKEOFF_READER_SECRET, TAKEOFF_READER_SECRET_FILE "
        "or the manifest's server_config).",
    )
    reader.add_argument("--config", help="Read this reader's options from readers_config.<reader-id> of a manifest.")
    reader.add_argument("--supervised", action="store_true", help="Spawned by a gateway: exit with it.")
    reader.add_argument("--log-level", default=os.environ.get("TAKEOFF_LOG_LEVEL", "INFO"))
    reader.add_argument("--log-format", choices=["text", "json"], default="text")
    reader.add_argument("--heartbeat-interval-ms", type=int, default=1000)
    reader.add_argument("--default-batch-size", type=int, default=8)
    reader.add_argument(
        "--repository-path",
        default=os.environ.get("TAKEOFF_REPOSITORY_PATH", str(Path.home() / "artefacts")).removeprefix("file://"),
        help="Where models and derived artefacts are stored (TAKEOFF_REPOSITORY_PATH).",
    )
    reader.add_argument("--shutdown-timeout-s", type=float, default=30.0)
    _add_reader_flags(reader)

    status = commands.add_parser("status", help="Print the readers of a running gateway as a table.")
    port = os.environ.get("TAKEOFF_MANAGEMENT_PORT", "3001")
    status.add_argument("--url", default=f"http://127.0.0.1:{port}", help="The gateway's management API.")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="Redraw every SECONDS until Ctrl-C.")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``liftoff`` command."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        sys.exit(_serve(args))
    if args.command == "status":
        sys.exit(_status(args))
    sys.exit(_reader(args))


def _status(args: argparse.Namespace) -> int:
    from liftoff.status_table import StatusError, status_text

    try:
        while True:
            text = status_text(args.url)
            if args.watch is None:
                print(text)  # noqa: T201
                return 0
            print(f"\x1b[2J\x1b[H{args.url}  (every {args.watch:g} s; Ctrl-C to stop)\n\n{text}", flush=True)  # noqa: T201
            time.sleep(args.watch)
    except StatusError as exc:
        print(f"liftoff status: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    except KeyboardInterrupt:
        return 0


def _load(args: argparse.Namespace) -> LoadedConfig:
    try:
        return load_config(
            config_path=args.config, server_flags=_flags(args, "server"), reader_flags=_flags(args, "reader")
        )
    except ConfigError as exc:
        print(f"liftoff: {exc}", file=sys.stderr)  # noqa: T201
        sys.exit(2)


def _run(coro: typing.Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    except ImportError:
        return asyncio.run(coro)


def _serve(args: argparse.Namespace) -> int:
    loaded = _load(args)
    setup_logging(loaded.server.log_level, loaded.server.log_format, role="gateway")
    from liftoff.gateway.server import Gateway, GatewayStartError

    try:
        return _run(Gateway(loaded).run())
    except GatewayStartError as exc:
        logger.error("%s", exc)
        return 1


class ReaderSetup(typing.NamedTuple):
    """What a reader process needs to know before it starts."""

    reader_id: str
    config: ReaderConfig
    gateway_ip: str | None  # the gateway host it joins (embedded broker), from its configuration
    broker: str  # the broker of the configuration: "embedded" or a Redis URL
    secret: str | None  # the gateway's reader_secret


def _reader_config(args: argparse.Namespace) -> ReaderSetup:
    """The reader's id and configuration, the gateway host it joins, the broker and the reader secret."""
    from liftoff.management.supervisor import READER_CONFIG_ENV

    raw = os.environ.get(READER_CONFIG_ENV)
    if raw:  # spawned by a gateway: everything is in the environment it was given
        config = ReaderConfig.model_validate(json.loads(raw))
        broker = os.environ.get("TAKEOFF_BROKER") or "embedded"
        return ReaderSetup(args.reader_id, config, None, broker, os.environ.get("TAKEOFF_READER_SECRET") or None)
    loaded = _load(args)
    broker = loaded.server.broker  # server_config.broker, TAKEOFF_BROKER or TAKEOFF_REDIS_HOST/PORT
    secret = loaded.server.reader_secret  # reader_secret(_file) of the manifest, or TAKEOFF_READER_SECRET(_FILE)
    if args.reader_id and args.reader_id in loaded.readers:
        config = loaded.readers[args.reader_id]
        return ReaderSetup(args.reader_id, config, config.internal_gateway_ip, broker, secret)
    if len(loaded.readers) != 1:
        known = ", ".join(loaded.readers) or "none"
        print(  # noqa: T201
            f"liftoff reader: choose one reader with --reader-id (readers in the configuration: {known}), "
            "or define it with --model-name/--device or TAKEOFF_MODEL_NAME/TAKEOFF_DEVICE",
            file=sys.stderr,
        )
        sys.exit(2)
    reader_id, config = next(iter(loaded.readers.items()))
    return ReaderSetup(args.reader_id or reader_id, config, config.internal_gateway_ip, broker, secret)


def _secret_from_file(path: str) -> str:
    """The reader secret in ``path`` (its first non-empty line)."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        print(f"liftoff reader: cannot read --reader-secret-file {path}: {exc.strerror}", file=sys.stderr)  # noqa: T201
        sys.exit(2)
    if not lines:
        print(f"liftoff reader: --reader-secret-file {path} is empty", file=sys.stderr)  # noqa: T201
        sys.exit(2)
    return lines[0]


def _gateway_address(args: argparse.Namespace, gateway_ip: str | None) -> str:
    if args.gateway:
        return str(args.gateway)
    host = gateway_ip or os.environ.get("TAKEOFF_INTERNAL_GATEWAY_IP") or "127.0.0.1"
    return f"{host}:{os.environ.get('TAKEOFF_INTERNAL_PORT', '3005')}"


def _reader_log_format(config: ReaderConfig, default: str) -> str:
    """``reader_log_as_json``: true is JSON, false is text, unset is the default (a supervised reader's: its
    gateway's ``log_format``)."""
    if config.reader_log_as_json is None:
        return default
    return "json" if config.reader_log_as_json else "text"


def apply_cuda_visible_devices(config: ReaderConfig, reader_id: str) -> None:
    """``cuda_visible_devices`` becomes this process's ``CUDA_VISIBLE_DEVICES`` (a spawned reader has it from its
    gateway already; a headless one gets it here), before anything can load a CUDA library: backends are imported
    only when the model loads."""
    if config.cuda_visible_devices is None:
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = config.cuda_visible_devices
    logger.info("reader %s: CUDA_VISIBLE_DEVICES=%s (cuda_visible_devices)", reader_id, config.cuda_visible_devices)


def _reader(args: argparse.Namespace) -> int:
    reader_id, config, gateway_ip, configured_broker, secret = _reader_config(args)
    if args.reader_secret_file:
        secret = _secret_from_file(args.reader_secret_file)
    setup_logging(config.log_level or args.log_level, _reader_log_format(config, args.log_format),
                  role=f"reader {reader_id}")  # fmt: skip
    apply_cuda_visible_devices(config, reader_id)
    if args.supervised:
        _die_with_parent()
    elif "restart_policy" in config.model_fields_set:
        logger.warning("restart_policy applies to readers a gateway starts; restart a headless reader with what "
                       "runs it (systemd, Kubernetes...)")  # fmt: skip
    from liftoff.broker.factory import reader_broker, reader_link_factory
    from liftoff.reader.process import ReaderOptions, ReaderProcess

    address = _gateway_address(args, gateway_ip)
    options = ReaderOptions(
        reader_id=reader_id,
        config=config,
        supervised=args.supervised,
        default_batch_size=args.default_batch_size,
        repository_path=Path(args.repository_path).expanduser(),
        heartbeat_interval_ms=args.heartbeat_interval_ms,
        shutdown_timeout_s=args.shutdown_timeout_s,
    )
    try:
        # A supervised reader joins what its gateway says (--gateway or --broker), whatever its redis_host says.
        redis_host = None if args.supervised else config.redis_host
        broker = reader_broker(args.broker, configured_broker, redis_host)
    except ValueError as exc:
        print(f"liftoff reader: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    code = _run(ReaderProcess(options, reader_link_factory(broker, address, secret)).run())
    logging.shutdown()
    # A model load still running on a worker thread must not keep the process alive.
    os._exit(code)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent (the gateway) dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before prctl
        sys.exit(1)
