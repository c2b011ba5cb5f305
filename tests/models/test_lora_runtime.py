"""LoRA adapters added to and removed from a running transformers reader (``POST`` and ``DELETE
/reader/{id}/loras``), with the real adapters of tests/models/lora.py on the bundled SmolLM2.

The reader starts without ``loras``; an adapter added at runtime answers its word only with its ``lora_id`` while
the base model's answer stays what it was; removing an adapter lets a stream running under it finish exactly as it
would have, while new requests naming it get a 400 at once; the change is in ``/status``, ``/v1/models`` and
``config.yaml``, so a restart of the reader (by the healer) or of the gateway keeps it; the same works through
Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from liftoff.config.manifest import read_manifest
from tests.helpers import LiftoffServer, sse_events, wait_until
from tests.models.conftest import Dequantized
from tests.models.lora import MAX_TOKENS, QUESTIONS, WORDS
from tests.redis_server import RedisServer

pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

QUESTION = QUESTIONS[0]
LONG = 48  # tokens of the stream that runs while its adapter is removed


def reader_config(checkpoint: Path, group: str) -> dict[str, Any]:
    return {"model_name": str(checkpoint), "device": "cpu", "backend": "transformers", "consumer_group": group,
            "max_batch_size": 4, "max_sequence_length": 256,
            "backend_options": {"n_threads": 1, "dtype": "float32"}}  # fmt: skip


def into_repository(server: LiftoffServer, adapters: dict[str, Path]) -> None:
    """Copy the adapters under the gateway's repository_path, where the management API may load them from."""
    for name, path in adapters.items():
        shutil.copytree(path, server.workdir / "artefacts" / "adapters" / name)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_dequantized: Dequantized, adapters: dict[str, Path]
) -> Any:
    """One transformers reader ``grow`` (group grow) started without adapters, behind a management key."""
    instance = LiftoffServer(workdir=tmp_path_factory.mktemp("lora-runtime"),
                             readers={"grow": reader_config(smollm2_dequantized.checkpoint, "grow")},
                             server={"management_api_keys": "management-key-for-lora-runtime"})  # fmt: skip
    into_repository(instance, adapters)
    instance.start(timeout=300)
    yield instance
    instance.close()


def generate(server: LiftoffServer, lora_id: str | None = None, group: str = "grow", **fields: Any) -> httpx.Response:
    body: dict[str, Any] = {"text": QUESTION, "use_chat_template": True, "max_new_tokens": MAX_TOKENS,
                            "consumer_group": group, **fields}  # fmt: skip
    if lora_id is not None:
        body["lora_id"] = lora_id
    return server.http.post(server.base + "/generate", json=body, timeout=120)


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    answer: str = response.json()["text"]
    return answer


def add(server: LiftoffServer, reader_id: str, name: str, path: str) -> httpx.Response:
    return server.http.post(server.mgmt + f"/reader/{reader_id}/loras", json={"name": name, "path": path}, timeout=150)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_install_and_remove_between_steps(
    smollm2_dequantized: Dequantized, adapters: dict[str, Path], quantize: str
) -> None:
    """In process: an adapter installed while a base sequence decodes leaves that sequence's output bit for bit
    what it is without adapters (int8 layers too); removed while its own sequence runs, that sequence finishes
    under it, and the layers are unwrapped when it ends."""
    from liftoff.backends.transformers.lora import LoraLinear
    from liftoff.core.errors import LiftoffError
    from liftoff.core.types import GenerationParams
    from tests.models.test_lora import QUESTIONS, _backend, _run

    backend = _backend(smollm2_dequantized.checkpoint, backend_options={"quantize": quantize})
    try:
        alone = _run(backend, {"base": None})["base"]
        params = GenerationParams(max_new_tokens=MAX_TOKENS, use_chat_template=True)
        backend.admit("base", QUESTIONS[0], params)
        texts = {"base": "", "a": ""}
        for _ in range(3):
            texts["base"] += "".join(out.text for out in backend.step())
        backend.install_lora(backend.load_lora("alpha", str(adapters["alpha"])))
        assert backend.lora_names() == ["alpha"]
        backend.admit("a", QUESTIONS[0], GenerationParams(max_new_tokens=MAX_TOKENS, use_chat_template=True,
                                                          lora_id="alpha"))  # fmt: skip
        for output in backend.step():
            texts[output.request_id] += output.text
        backend.remove_lora("alpha")
        assert backend.lora_names() == []
        assert backend.lora.retiring  # its sequence still runs under it
        with pytest.raises(LiftoffError, match="no LoRA adapters now"):
            backend.admit("late", QUESTIONS[0], GenerationParams(lora_id="alpha"))
        while backend.active():
            for output in backend.step():
                assert output.error is None, output.error
                texts[output.request_id] += output.text
        assert texts["base"] == alone
        assert WORDS["alpha"] in texts["a"]
        assert backend.lora.wrapped == 0
        assert not backend.lora.retiring
        assert not any(isinstance(module, LoraLinear) for module in backend._model().model.modules())
        assert _run(backend, {"again": None})["again"] == alone
    finally:
        backend.close()


def test_an_adapter_added_at_runtime_answers_only_with_its_lora_id(server: LiftoffServer) -> None:
    base = text(generate(server))
    refused = generate(server, "alpha")
    assert refused.status_code == 400
    assert "no LoRA adapters" in refused.json()["detail"]
    added = add(server, "grow", "alpha", "adapters/alpha")  # relative to repository_path
    assert added.status_code == 200, added.text
    assert added.json() == {"reader_id": "grow", "loras": ["alpha"]}
    absolute = str(server.workdir / "artefacts" / "adapters" / "beta")
    assert add(server, "grow", "beta", absolute).json()["loras"] == ["alpha", "beta"]
    assert WORDS["alpha"] in text(generate(server, "alpha"))
    assert WORDS["beta"] in text(generate(server, "beta"))
    assert text(generate(server)) == base  # the base model's answer, unchanged by the adapters now wrapped in
    assert server.readers()["grow"]["loras"] == "alpha,beta"
    assert server.http.get(server.mgmt + "/reader_groups").json()["grow"][0]["loras"] == "alpha,beta"
    detail = server.http.get(server.mgmt + "/reader/grow").json()
    assert detail["loras"] == "alpha,beta"
    assert detail["config"]["loras"] == f"alpha=adapters/alpha,beta={absolute}"
    models = server.http.get(server.url("openai_port") + "/v1/models").json()["data"]
    assert {"grow:alpha", "grow:beta"} <= {model["id"] for model in models}
    manifest = read_manifest(server.config_path)["readers_config"]["grow"]
    assert manifest["loras"] == ["alpha=adapters/alpha", f"beta={absolute}"]


def test_refusals_load_nothing(server: LiftoffServer, adapters: dict[str, Path]) -> None:
    before = server.readers()["grow"].get("loras")
    outside = add(server, "grow", "gamma", str(adapters["alpha"]))  # the trained copy, outside repository_path
    assert outside.status_code == 400
    assert "is not an adapter POST /reader/{reader_id}/loras may load" in outside.text
    duplicate = add(server, "grow", "alpha", "adapters/beta")
    assert duplicate.status_code == 400
    assert "'alpha' is already an adapter" in duplicate.text
    (server.workdir / "artefacts" / "adapters" / "empty").mkdir(exist_ok=True)
    empty = add(server, "grow", "empty", "adapters/empty")
    assert empty.status_code == 400
    assert "LoRA 'empty'" in empty.text
    assert "adapter_config.json" in empty.text
    missing = server.http.delete(server.mgmt + "/reader/grow/loras/gamma")
    assert missing.status_code == 404
    assert "it has: alpha, beta" in missing.json()["detail"]
    assert add(server, "nope", "gamma", "adapters/alpha").status_code == 404
    assert (
        httpx.post(server.mgmt + "/reader/grow/loras", json={"name": "g", "path": "adapters/alpha"}).status_code == 401
    )
    assert server.readers()["grow"].get("loras") == before


def test_removing_an_adapter_lets_its_running_stream_finish(server: LiftoffServer) -> None:
    long: dict[str, Any] = {"max_new_tokens": LONG, "min_new_tokens": LONG}
    reference = text(generate(server, "beta", **long))
    pieces: list[str] = []
    started = threading.Event()
    ended: list[str] = []

    def stream() -> None:
        body = {"text": QUESTION, "use_chat_template": True, "consumer_group": "grow", "lora_id": "beta", **long}
        with server.http.stream("POST", server.base + "/generate_stream", json=body, timeout=120) as response:
            for event, data in sse_events(response.iter_lines()):
                if event == "error":
                    ended.append(f"error: {data}")
                    return
                pieces.append(data)
                started.set()
        ended.append("done")

    runner = threading.Thread(target=stream)
    runner.start()
    try:
        assert started.wait(60)
        removed = server.http.delete(server.mgmt + "/reader/grow/loras/beta")
        assert removed.status_code == 200, removed.text
        assert removed.json() == {"reader_id": "grow", "loras": ["alpha"]}
        assert len(pieces) < LONG  # the stream was still running when its adapter went
        refused = generate(server, "beta")
        assert refused.status_code == 400
        assert "it has: alpha" in refused.json()["detail"]
    finally:
        runner.join(120)
    assert ended == ["done"]
    joined = reference.replace("\r", "").replace("\n", "")  # a piece's line breaks part its data: lines
    assert "".join(pieces) == joined  # it finished under its adapter, exactly as it would have
    assert server.readers()["grow"]["loras"] == "alpha"
    manifest = read_manifest(server.config_path)["readers_config"]["grow"]
    assert manifest["loras"] == ["alpha=adapters/alpha"]


def test_restarts_keep_the_adapters(server: LiftoffServer) -> None:
    """The healer restarts a killed reader with the adapters it had; a restarted gateway reads them back from
    config.yaml."""
    expected = text(generate(server, "alpha"))
    (pid,) = server.readers()["grow"]["pids"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: server.readers().get("grow", {}).get("pids", [pid]) not in ([pid], []), 300,
               what="the reader to be restarted")  # fmt: skip
    assert server.readers()["grow"]["loras"] == "alpha"
    assert text(generate(server, "alpha")) == expected
    assert server.stop() == 0
    server.start(timeout=300)
    assert server.readers()["grow"]["loras"] == "alpha"
    assert text(generate(server, "alpha")) == expected


def test_adapters_change_through_redis(
    tmp_path_factory: pytest.TempPathFactory, smollm2_dequantized: Dequantized, adapters: dict[str, Path]
) -> None:
    workdir = tmp_path_factory.mktemp("lora-redis")
    redis = RedisServer(workdir / "redis").start()
    instance = LiftoffServer(workdir=workdir / "gateway", server={"broker": redis.url},
                             readers={"r1": reader_config(smollm2_dequantized.checkpoint, "primary")})  # fmt: skip
    try:
        into_repository(instance, adapters)
        instance.start(timeout=300)
        assert add(instance, "r1", "alpha", "adapters/alpha").json() == {"reader_id": "r1", "loras": ["alpha"]}
        assert WORDS["alpha"] in text(generate(instance, "alpha", group="primary"))
        assert instance.readers()["r1"]["loras"] == "alpha"
        removed = instance.http.delete(instance.mgmt + "/reader/r1/loras/alpha")
        assert removed.json() == {"reader_id": "r1", "loras": []}
        assert generate(instance, "alpha", group="primary").status_code == 400
        assert "loras" not in instance.readers()["r1"]
    finally:
        instance.close()
        redis.stop()


def test_a_llamacpp_reader_takes_adapters_at_runtime(
    tmp_path_factory: pytest.TempPathFactory, adapters: dict[str, Path]
) -> None:
    """The same routes on a llama.cpp reader (the bundled model, no loras at start): the PEFT adapter is converted
    off the engine thread, then answers with its lora_id only, and is refused once removed."""
    pytest.importorskip("llama_cpp")
    reader = {"model_name": "smollm2-135m-instruct", "device": "cpu", "consumer_group": "cpp", "max_batch_size": 2,
              "backend_options": {"n_threads": 1}}  # fmt: skip
    instance = LiftoffServer(workdir=tmp_path_factory.mktemp("lora-cpp"), readers={"cpp": reader})
    try:
        into_repository(instance, {"alpha": adapters["alpha"]})
        instance.start(timeout=300)
        base = text(generate(instance, group="cpp"))
        assert add(instance, "cpp", "alpha", "adapters/alpha").json() == {"reader_id": "cpp", "loras": ["alpha"]}
        assert WORDS["alpha"] in text(generate(instance, "alpha", group="cpp"))
        assert text(generate(instance, group="cpp")) == base
        assert instance.readers()["cpp"]["loras"] == "alpha"
        assert instance.http.delete(instance.mgmt + "/reader/cpp/loras/alpha").json()["loras"] == []
        assert generate(instance, "alpha", group="cpp").status_code == 400
    finally:
        instance.close()
