"""The peer of bench/lora.py: llama.cpp's ``llama-server`` holding the same GGUF LoRA adapters.

It starts ``llama-server -m GGUF --lora A0.gguf ... --lora-init-without-apply -np C -c C*CTX --no-kv-unified``
(adapters off unless a request names one, as Liftoff's ``lora_id``) and sends the same chat-templated prompts to
``/completion`` at once, request ``i`` with ``"lora": [{"id": i % k, "scale": 1}]``, exactly ``new_tokens``
output tokens each (``ignore_eos``, greedy, no prompt cache): output tokens per second over the whole run, as
bench/lora.py counts its own. llama-server does not batch requests of different adapters together.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from common.http_json import get_json
from common.ports import free_ports
from common.procs import Managed, wait_for
from transformers_engine import Result

HOST = "127.0.0.1"


class LlamaServerLoras:
    """A running llama-server with ``adapters`` loaded but not applied."""

    def __init__(self, binary: Path, gguf: Path, adapters: list[Path], workdir: Path, threads: int, slots: int):
        self.port = free_ports(1)[0]
        flags = ["-t", str(threads), "-np", str(slots), "-c", str(slots * 512), "--no-kv-unified",
                 "--lora-init-without-apply", "--no-cache-prompt"]  # fmt: skip
        for adapter in adapters:
            flags += ["--lora", str(adapter)]
        command = [str(binary), "-m", str(gguf), "--host", HOST, "--port", str(self.port), *flags]
        self.flags = " ".join(flags[:6])
        self.server = Managed("llama-server", command, workdir, workdir / "llama-server-lora.log")
        try:
            wait_for(self.server, lambda: get_json(f"http://{HOST}:{self.port}/health")[0] == 200, 300.0)
        except BaseException:
            self.server.stop()
            raise

    def close(self) -> None:
        self.server.stop()

    def _complete(self, prompt: str, new_tokens: int, adapter: int | None) -> int:
        lora = [] if adapter is None else [{"id": adapter, "scale": 1.0}]
        body: dict[str, Any] = {"prompt": prompt, "n_predict": new_tokens, "ignore_eos": True, "temperature": 0,
                                "cache_prompt": False, "lora": lora}  # fmt: skip
        request = urllib.request.Request(
            f"http://{HOST}:{self.port}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.loads(response.read())
        return int(answer["tokens_predicted"])

    def run(self, prompts: list[str], new_tokens: int, distinct: int) -> Result:
        """All ``prompts`` at once (one connection each), request ``i`` with adapter ``i % distinct``."""
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            futures = [
                pool.submit(self._complete, prompt, new_tokens, index % distinct if distinct else None)
                for index, prompt in enumerate(prompts)
            ]
            produced = sum(future.result() for future in futures)
        return Result(time.perf_counter() - start, float("nan"), produced)


@contextlib.contextmanager
def llama_server_loras(binary: Path, gguf: Path, adapters: list[Path], workdir: Path, threads: int, slots: int) -> Any:
    server = LlamaServerLoras(binary, gguf, adapters, workdir, threads, slots)
    try:
        yield server
    finally:
        server.close()
