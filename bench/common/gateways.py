"""Starting ``liftoff serve`` for a bench, and the echo gateway the gateway benches measure.

Every bench that measures a Liftoff gateway starts it the same way: a config file (JSON, which is YAML) in a
temporary folder, free loopback ports for all seven of its ports, its own session (``procs.Managed``), and a wait
until every reader is live, so that no measurement window includes a model load. The echo gateway (readers of
the ``echo`` model, no token delay) makes the gateway itself the work: bench/gateway.py, bench/gateway_redis.py
and bench/gateway_keys.py send it the same short ``POST /generate``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from common.http_json import get_json
from common.log import log
from common.ports import HOST, free_ports
from common.procs import Managed, wait_for

LIFTOFF_PORT_KEYS = (
    "port",
    "management_port",
    "vertex_port",
    "openai_port",
    "snowflake_port",
    "internal_port",
    "sagemaker_port",
)
PROMPT = "hello world"
SHORT_TOKENS = 2
SHORT_GENERATE = {"text": PROMPT, "max_new_tokens": SHORT_TOKENS, "min_new_tokens": SHORT_TOKENS}
ECHO_BATCH_SIZE = 128  # max_batch_size of each echo reader unless a bench says otherwise (bench/gateway.py's 128)
PACED_GROUP = "paced"


def liftoff_ports() -> dict[str, int]:
    """A free loopback port for each of the gateway's ports, by ``server_config`` key."""
    return dict(zip(LIFTOFF_PORT_KEYS, free_ports(len(LIFTOFF_PORT_KEYS)), strict=True))


def launch_liftoff(
    workdir: Path,
    config: dict[str, Any],
    ports: dict[str, int],
    stack: contextlib.ExitStack,
    timeout: float = 60.0,
    *,
    name: str = "liftoff",
    live_readers: int | None = None,
) -> Managed:
    """``liftoff serve`` with ``config`` (a ``{"takeoff": ...}`` document), every reader live; ``stack`` stops it.

    ``live_readers``: the live readers to wait for, if not those of the config (a gateway of a shared broker sees
    other gateways' readers). The log is ``<name>.log`` in ``workdir``."""
    readers = len(config["takeoff"]["readers_config"]) if live_readers is None else live_readers
    (workdir / "config.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    command = [sys.executable, "-m", "liftoff", "serve", "--config", str(workdir / "config.yaml")]
    server = Managed(name, command, workdir, workdir / f"{name}.log")
    stack.callback(server.stop)
    health = f"http://{HOST}:{ports['management_port']}/healthz"

    def all_live() -> bool:
        status, body = get_json(health)
        return status == 200 and int(body["live_readers"]) >= readers

    wait_for(server, all_live, timeout)
    log(f"{name} is live with {readers} reader(s): pids {server.track_children()}")
    return server


# ---- the echo gateway --------------------------------------------------------------------------------------------


def echo_config(
    ports: dict[str, int],
    workdir: Path,
    *,
    readers: int,
    batch_size: int = ECHO_BATCH_SIZE,
    paced_token_delay_ms: float = 0.0,
    api_key: str = "",
) -> dict[str, Any]:
    """``readers`` echo readers in the default group, and one paced reader (group ``PACED_GROUP``, that sleeps
    ``paced_token_delay_ms`` per token) if that is above 0; ``api_key``: the gateway's ``api_keys`` if given."""

    def echo(delay_ms: float, **extra: Any) -> dict[str, Any]:
        return {"model_name": "echo", "device": "cpu", "max_batch_size": batch_size,
                "backend_options": {"token_delay_ms": delay_ms}, **extra}  # fmt: skip

    readers_config = {f"r{i + 1}": echo(0) for i in range(readers)}
    if paced_token_delay_ms > 0:
        readers_config[PACED_GROUP] = echo(paced_token_delay_ms, consumer_group=PACED_GROUP)
    server_config = {**ports, "host": HOST, "repository_path": str(workdir / "artefacts"), "shutdown_timeout_s": 10}
    if api_key:
        server_config["api_keys"] = api_key  # the inference ports check it on every request
    return {"takeoff": {"server_config": server_config, "readers_config": readers_config}}


def start_echo_liftoff(
    workdir: Path,
    stack: contextlib.ExitStack,
    *,
    readers: int,
    batch_size: int = ECHO_BATCH_SIZE,
    paced_token_delay_ms: float = 0.0,
    api_key: str = "",
) -> tuple[Managed, dict[str, int]]:
    """A Liftoff gateway with echo readers (the options of :func:`echo_config`), live; ``stack`` stops it.
    Returns it and its ports."""
    ports = liftoff_ports()
    config = echo_config(ports, workdir, readers=readers, batch_size=batch_size,
                         paced_token_delay_ms=paced_token_delay_ms, api_key=api_key)  # fmt: skip
    return launch_liftoff(workdir, config, ports, stack), ports
