"""Servers of ``bench/generation.py``: start each on free loopback ports in its own process group, wait until it
answers, and hand back how to talk to it; the caller's ``ExitStack`` stops it (``common.procs.Managed``)."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.gateways import liftoff_ports
from common.http_json import get_json
from common.ports import free_ports
from common.procs import Managed, wait_for
from genbench_load import HOST, Api

MODEL_ALIAS = "smollm2-135m-instruct"
LOAD_TIMEOUT_S = 600.0  # a first transformers load dequantizes the GGUF


@dataclass
class Running:
    """A server that answers: its process and how to send it one stream."""

    key: str
    label: str
    server: Managed
    api: Api
    notes: str
    upstream: Managed | None = None  # the server an API reader forwards to (its CPU counts as the server's)

    def pids(self) -> list[int]:
        """The server's processes (readers and upstream included)."""
        servers = [self.server] + ([self.upstream] if self.upstream is not None else [])
        return [pid for server in servers for pid in (server.pid, *server.track_children())]


def _fixed_length(new_tokens: int) -> dict[str, Any]:
    return {"use_chat_template": True, "min_new_tokens": new_tokens, "max_new_tokens": new_tokens,
            "return_metadata": True}  # fmt: skip


def liftoff_config(
    ports: dict[str, int], backend: str, repository: Path, batch: int, options: dict[str, str] | None = None
) -> dict[str, Any]:
    """One reader: the bundled SmolLM2 on the given backend (or the echo double, for plumbing)."""
    reader: dict[str, Any] = {"model_name": MODEL_ALIAS, "device": "cpu", "max_batch_size": batch, "backend": backend}
    if options:
        reader["backend_options"] = dict(options)
    if backend == "echo":
        reader = {"model_name": "echo", "device": "cpu", "max_batch_size": batch}
    server = {**ports, "host": HOST, "repository_path": str(repository), "shutdown_timeout_s": 10}
    return {"takeoff": {"server_config": server, "readers_config": {"r1": reader}}}


def _reader_error(mgmt: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        status, body = get_json(f"http://{HOST}:{mgmt}/reader/r1")
        if status == 200:
            return str(body.get("error") or body.get("state"))
    return "unknown"


def start_liftoff(
    backend: str,
    workdir: Path,
    repository: Path,
    batch: int,
    new_tokens: int,
    stack: contextlib.ExitStack,
    options: dict[str, str] | None = None,
) -> Running:
    """``python -m liftoff serve --config cfg.yaml`` with one reader; live, or an error naming the reader's."""
    ports = liftoff_ports()
    folder = workdir / f"liftoff-{backend}"
    folder.mkdir(parents=True, exist_ok=True)
    repository.mkdir(parents=True, exist_ok=True)
    config = liftoff_config(ports, backend, repository, batch, options)
    (folder / "cfg.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    command = [sys.executable, "-m", "liftoff", "serve", "--config", str(folder / "cfg.yaml")]
    server = Managed(f"liftoff-{backend}", command, folder, folder / "liftoff.log")
    stack.callback(server.stop)
    health = f"http://{HOST}:{ports['management_port']}/healthz?state=loading"

    def live() -> bool:
        status, body = get_json(health)
        if int(body.get("dead_readers") or 0):
            raise RuntimeError(f"liftoff-{backend}: the reader died: {_reader_error(ports['management_port'])}")
        return status == 200 and int(body.get("live_readers") or 0) >= 1

    wait_for(server, live, LOAD_TIMEOUT_S)
    server.track_children()
    api = Api("liftoff", ports["port"], "/generate_stream", lambda text: {"text": text, **_fixed_length(new_tokens)})
    notes = f"reader model_name {config['takeoff']['readers_config']['r1']['model_name']}, max_batch_size {batch}"
    if options:
        notes += ", backend_options " + ", ".join(f"{key}: {value}" for key, value in options.items())
    shown = " (" + ", ".join(f"{key}: {value}" for key, value in options.items()) + ")" if options else ""
    return Running(f"liftoff-{backend}", f"Liftoff {backend}{shown}", server, api, notes)


def liftoff_api_config(ports: dict[str, int], upstream_port: int, batch: int) -> dict[str, Any]:
    """One API reader in front of llama-server (``max_concurrency`` = its slots)."""
    reader = {"model_name": MODEL_ALIAS, "device": "api", "api_base": f"http://{HOST}:{upstream_port}/v1",
              "max_concurrency": batch}  # fmt: skip
    server = {**ports, "host": HOST, "shutdown_timeout_s": 10}
    return {"takeoff": {"server_config": server, "readers_config": {"r1": reader}}}


def start_liftoff_api(upstream: Running, workdir: Path, batch: int, stack: contextlib.ExitStack) -> Running:
    """Liftoff with an API reader in front of a running llama-server (``upstream``, started as the llama-server
    peer is), asked exactly what the llama-server peer is asked, on Liftoff's OpenAI port."""
    ports = liftoff_ports()
    folder = workdir / "liftoff-api"
    folder.mkdir(parents=True, exist_ok=True)
    config = liftoff_api_config(ports, upstream.api.port, batch)
    (folder / "cfg.yaml").write_text(json.dumps(config, indent=2))
    command = [sys.executable, "-m", "liftoff", "serve", "--config", str(folder / "cfg.yaml")]
    server = Managed("liftoff-api", command, folder, folder / "liftoff.log")
    stack.callback(server.stop)
    health = f"http://{HOST}:{ports['management_port']}/healthz"
    wait_for(server, lambda: get_json(health)[0] == 200, LOAD_TIMEOUT_S)
    server.track_children()
    make_upstream_body = upstream.api.make_body

    def body(text: str) -> dict[str, Any]:
        return {**make_upstream_body(text), "model": "primary"}

    api = Api("openai", ports["openai_port"], "/v1/chat/completions", body)
    notes = f"API reader (max_concurrency {batch}) in front of llama-server {upstream.notes}"
    return Running("liftoff-api", "Liftoff API reader → llama-server", server, api, notes, upstream.server)


def start_llama_server(
    binary: Path, gguf: Path, workdir: Path, new_tokens: int, stack: contextlib.ExitStack, threads: int = 2
) -> Running:
    """llama.cpp's ``llama-server`` with the same GGUF: ``-t THREADS -np 32 -c 8192 --no-kv-unified`` (2 threads)."""
    port = free_ports(1)[0]
    flags = ["-t", str(threads), "-np", "32", "-c", "8192", "--no-kv-unified"]
    command = [str(binary), "-m", str(gguf), "--host", HOST, "--port", str(port), *flags]
    server = Managed("llama-server", command, workdir, workdir / "llama-server.log")
    stack.callback(server.stop)
    wait_for(server, lambda: get_json(f"http://{HOST}:{port}/health")[0] == 200, LOAD_TIMEOUT_S)

    def body(text: str) -> dict[str, Any]:
        return {"model": MODEL_ALIAS, "messages": [{"role": "user", "content": text}], "stream": True,
                "max_tokens": new_tokens, "ignore_eos": True, "temperature": 0,
                "stream_options": {"include_usage": True}}  # fmt: skip

    # llama-server leaves a keep-alive connection unusable after a stream (a request sent on it waits for the
    # keep-alive timeout, then the connection closes): one connection per request, as curl ends up doing.
    api = Api("openai", port, "/v1/chat/completions", body, keep_alive=False)
    return Running("llama-server", "llama-server", server, api, " ".join(flags))


def start_transformers_serve(
    cli: Path, checkpoint: Path, workdir: Path, new_tokens: int, extra: list[str], stack: contextlib.ExitStack
) -> Running:
    """``transformers serve --continuous-batching --dtype bfloat16`` pinned to the dequantized checkpoint."""
    port = free_ports(1)[0]
    flags = ["--continuous-batching", "--dtype", "bfloat16", "--device", "cpu", *extra]
    command = [str(cli), "serve", str(checkpoint), "--host", HOST, "--port", str(port), *flags]
    server = Managed("transformers-serve", command, workdir, workdir / "transformers-serve.log")
    stack.callback(server.stop)
    wait_for(server, lambda: get_json(f"http://{HOST}:{port}/health")[0] == 200, LOAD_TIMEOUT_S)
    config = json.dumps({"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
                         "eos_token_id": 2, "pad_token_id": 2})  # fmt: skip

    def body(text: str) -> dict[str, Any]:  # it rejects unknown fields (ignore_eos, stream_options): 422
        return {"model": str(checkpoint), "messages": [{"role": "user", "content": text}], "stream": True,
                "max_tokens": new_tokens, "generation_config": config}  # fmt: skip

    api = Api("openai", port, "/v1/chat/completions", body)
    return Running("transformers-serve", "transformers serve", server, api, " ".join(flags))
