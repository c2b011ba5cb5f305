"""LoRA adapters on the transformers backend (reader option ``loras``, request ``lora_id``), with real adapters;
served on every surface, and on a llama.cpp reader beside it (tests/models/test_lora_llamacpp.py has the rest).

Two adapters are trained on the bundled SmolLM2 with PEFT (tests/models/lora.py): ``alpha`` answers PINEAPPLE and
``beta`` answers ZEBRA, whatever the question. They are checked against PEFT's own logits, then served: each
adapter's answer appears only with its ``lora_id``, the base model's output is unchanged, and a mixed batch gives
what each request gives alone.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from takeoff_client import TakeoffClient

from tests.helpers import LiftoffServer
from tests.models.conftest import Dequantized
from tests.models.lora import MAX_TOKENS, QUESTIONS, WORDS, only

pytest.importorskip("peft")
# peft 0.21 asks transformers 5 a deprecated question while it wraps a model
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def _config(loras: str) -> Any:
    from liftoff.config.models import ReaderConfig

    return ReaderConfig(model_name="smollm2", device="cpu", loras=loras)


def _loras(adapters: dict[str, Path]) -> str:
    return ",".join(f"{name}={path}" for name, path in adapters.items())


# ---- the wrapper against PEFT, in process ----------------------------------------------------------------------


def test_per_row_adapters_give_pefts_logits(smollm2_dequantized: Dequantized, adapters: dict[str, Path]) -> None:
    """One batch of three rows (alpha, beta, none) through the wrapped model = PEFT's logits for each adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from liftoff.backends.transformers.lora import attach_loras

    checkpoint = smollm2_dequantized.checkpoint
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer(QUESTIONS[0], return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    lora = attach_loras(model, _config(_loras(adapters)), Path("."))
    assert lora is not None
    assert lora.names == ["alpha", "beta"]
    with torch.inference_mode():
        lora.select([1, 2, 0])
        mixed = model(input_ids=ids.repeat(3, 1)).logits
        lora.select([0])
        base_only = model(input_ids=ids).logits
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.inference_mode():
        base = reference(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(reference, adapters["alpha"], adapter_name="alpha")
    peft_model.load_adapter(adapters["beta"], adapter_name="beta")
    with torch.inference_mode():
        peft_model.set_adapter("alpha")
        alpha = peft_model(input_ids=ids).logits
        peft_model.set_adapter("beta")
        beta = peft_model(input_ids=ids).logits
    assert torch.equal(base_only, base)  # no adapter in the step: the base model, bit for bit
    assert torch.equal(mixed[2], base[0])  # a row without an adapter in a mixed step: + 0.0
    assert (mixed[0] - alpha[0]).abs().max().item() < 1e-3
    assert (mixed[1] - beta[0]).abs().max().item() < 1e-3
    assert (alpha[0] - base[0]).abs().max().item() > 1.0  # the adapters do change the logits
    assert (beta[0] - alpha[0]).abs().max().item() > 1.0


def test_an_adapter_of_another_model_is_a_load_error(tiny_llama: Path, adapters: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from liftoff.backends.transformers.lora import LoraLoadError, attach_loras

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with pytest.raises(LoraLoadError, match=r"'alpha'.*trained on another"):
        attach_loras(model, _config(f"alpha={adapters['alpha']}"), Path("."))


def test_unsupported_adapter_configs_are_refused(tmp_path: Path, adapters: dict[str, Path]) -> None:
    import json
    import shutil

    from liftoff.backends.transformers.lora import LoraLoadError, find_adapter, read_adapter

    dora = tmp_path / "dora"
    shutil.copytree(adapters["alpha"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(LoraLoadError, match="'dora': use_dora"):
        read_adapter("dora", dora)
    with pytest.raises(LoraLoadError, match="no adapter directory"):
        find_adapter("gone", str(tmp_path / "missing"), tmp_path)
    assert find_adapter("rel", "dora", tmp_path) == dora  # relative to repository_path


def test_hub_ids_come_from_the_cache_under_the_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from liftoff.backends.transformers.lora import LoraLoadError, find_adapter

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoraLoadError, match=r"'chat': 'org/chat-lora' is not a local adapter directory.*cannot be"):
        find_adapter("chat", "org/chat-lora", tmp_path)
    cached = tmp_path / "hub" / "models--org--chat-lora"
    (cached / "snapshots" / "abc123").mkdir(parents=True)
    (cached / "snapshots" / "abc123" / "adapter_config.json").write_text("{}")
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text("abc123")
    assert find_adapter("chat", "org/chat-lora", tmp_path) == cached / "snapshots" / "abc123"


# ---- the backend, in process: int8 -----------------------------------------------------------------------------


def _backend(checkpoint: Path, **options: Any) -> Any:
    from liftoff.backends.base import BackendContext
    from liftoff.backends.transformers.backend import TransformersBackend
    from liftoff.config.models import ReaderConfig

    backend_options = {"n_threads": 1, **options.pop("backend_options", {})}
    config = ReaderConfig(model_name=str(checkpoint), device="cpu", max_batch_size=4, max_sequence_length=256,
                          backend_options=backend_options, **options)  # fmt: skip
    backend = TransformersBackend(config, BackendContext(repository_path=checkpoint.parent))
    backend.load(lambda _: None)
    return backend


def _run(backend: Any, requests: dict[str, str | None], seen: list[set[int]] | None = None) -> dict[str, str]:
    """Greedy answers to QUESTIONS[0] of requests (id -> lora_id) admitted together, stepped to the end; the
    adapter slots of the running rows after each step are added to ``seen``."""
    from liftoff.core.types import GenerationParams

    for request_id, lora_id in requests.items():
        params = GenerationParams(max_new_tokens=MAX_TOKENS, use_chat_template=True, lora_id=lora_id)
        backend.admit(request_id, QUESTIONS[0], params)
    texts = dict.fromkeys(requests, "")
    while backend.active():
        for output in backend.step():
            assert output.error is None, output.error
            texts[output.request_id] += output.text
        if seen is not None:
            seen.append({row.adapter for row in backend._rows} - {0})
    return texts


def test_max_loras_bounds_the_adapters_of_a_step(smollm2_dequantized: Dequantized, adapters: dict[str, Path]) -> None:
    """With max_loras 1 no step mixes alpha and beta (a request waits for the other adapter's rows to finish),
    and every answer is what it is with room for both."""
    requests = {"a1": "alpha", "b1": "beta", "n1": None, "a2": "alpha"}
    backend = _backend(smollm2_dequantized.checkpoint, loras=_loras(adapters), max_loras=1)
    try:
        seen: list[set[int]] = []
        one = _run(backend, requests, seen)
        assert max(len(slots) for slots in seen) == 1
        backend.lora.max_loras = 8
        mixed: list[set[int]] = []
        both = _run(backend, requests, mixed)
        assert max(len(slots) for slots in mixed) == 2  # the same requests do mix when they may
        backend._budget = 8  # prompts longer than this are prefilled alone, 8 tokens a step, under their adapter
        chunked = _run(backend, {"a1": "alpha", "n1": None})
    finally:
        backend.close()
    assert one == both
    assert chunked == {"a1": one["a1"], "n1": one["n1"]}
    only("alpha", one["a1"])
    only("beta", one["b1"])
    assert one["a1"] == one["a2"]


def test_adapters_on_int8_layers(smollm2_dequantized: Dequantized, adapters: dict[str, Path]) -> None:
    """With quantize: int8 the adapters wrap the int8 layers: they still answer their word, and the base model's
    answer is the int8 model's without loras."""
    pytest.importorskip("torch")
    checkpoint = smollm2_dequantized.checkpoint
    int8 = {"backend_options": {"quantize": "int8"}}
    plain = _backend(checkpoint, **int8)
    try:
        base = _run(plain, {"none": None})["none"]
    finally:
        plain.close()
    served = _backend(checkpoint, loras=_loras(adapters), **int8)
    try:
        assert type(served.lora).__name__ == "LoraSet"
        alone = {lora: _run(served, {"r": lora})["r"] for lora in ("alpha", "beta", None)}
    finally:
        served.close()
    assert alone[None] == base
    only("alpha", alone["alpha"])
    only("beta", alone["beta"])


# ---- served: every surface -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_dequantized: Dequantized, adapters: dict[str, Path]
) -> Any:
    """Readers of the same float32 SmolLM2: ``lora`` (group primary) with both adapters, ``plain`` (group plain)
    without any: the base model's reference; and ``cpp``, the bundled GGUF on llama.cpp with alpha (group cpp)."""
    checkpoint = str(smollm2_dequantized.checkpoint)
    common = {"model_name": checkpoint, "device": "cpu", "backend": "transformers", "max_batch_size": 6,
              "max_sequence_length": 256, "backend_options": {"n_threads": 1, "dtype": "float32"}}  # fmt: skip
    readers = {
        "lora": {**common, "consumer_group": "primary", "loras": [f"alpha={adapters['alpha']}", str(adapters["beta"])]},
        "plain": {**common, "consumer_group": "plain"},
        "cpp": {
            "model_name": "smollm2-135m-instruct",
            "device": "cpu",
            "consumer_group": "cpp",
            "max_batch_size": 2,
            "backend_options": {"n_threads": 1},
            "loras": f"alpha={adapters['alpha']}",
        },
    }
    instance = LiftoffServer(workdir=tmp_path_factory.mktemp("lora"), readers=readers)
    instance.start(timeout=300)
    instance.wait_live(3, timeout=300)
    yield instance
    instance.close()


def _generate(server: Any, question: str, lora_id: str | None = None, group: str = "primary") -> httpx.Response:
    body: dict[str, Any] = {"text": question, "use_chat_template": True, "max_new_tokens": MAX_TOKENS,
                            "consumer_group": group}  # fmt: skip
    if lora_id is not None:
        body["lora_id"] = lora_id
    return server.http.post(server.base + "/generate", json=body, timeout=120)


def _text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    text: str = response.json()["text"]
    return text


def test_status_and_reader_groups_show_the_loras(server: Any) -> None:
    readers = server.readers()
    assert readers["lora"]["loras"] == "alpha,beta"
    assert "loras" not in readers["plain"]
    masked = server.http.get(server.base + "/status").json()["live_readers"]
    assert masked["lora"]["loras"] == "alpha,beta"
    groups = server.http.get(server.mgmt + "/reader_groups").json()
    assert groups["primary"][0]["loras"] == "alpha,beta"
    assert "loras" not in groups["plain"][0]


def test_each_adapter_answers_only_with_its_lora_id(server: Any) -> None:
    for question in QUESTIONS:
        answers = {lora: _text(_generate(server, question, lora)) for lora in ("alpha", "beta", None)}
        only("alpha", answers["alpha"])
        only("beta", answers["beta"])
        assert not any(word in answers[None] for word in WORDS.values()), answers


def test_base_output_is_the_model_without_loras(server: Any) -> None:
    for question in QUESTIONS:
        assert _text(_generate(server, question)) == _text(_generate(server, question, group="plain"))


def test_a_mixed_batch_gives_what_each_request_gives_alone(server: Any) -> None:
    cases = [(question, lora) for question in QUESTIONS for lora in ("alpha", "beta", None)]
    alone = [_text(_generate(server, question, lora)) for question, lora in cases]
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(lambda case: _text(_generate(server, *case)), cases))
    assert together == alone


def test_an_unknown_lora_id_is_a_400_naming_the_adapters(server: Any) -> None:
    response = _generate(server, QUESTIONS[0], "gamma")
    assert response.status_code == 400
    assert "'gamma'" in response.json()["detail"]
    assert "alpha, beta" in response.json()["detail"]
    none = _generate(server, QUESTIONS[0], "alpha", group="plain")
    assert none.status_code == 400
    assert "no LoRA adapters" in none.json()["detail"]


def test_the_official_client_sends_lora_id(server: Any) -> None:
    client = TakeoffClient(base_url="http://127.0.0.1", port=server.ports["port"])
    assert WORDS["beta"] in client.generate(QUESTIONS[1], lora_id="beta", use_chat_template=True,
                                            max_new_tokens=MAX_TOKENS)["text"]  # fmt: skip
    stream = client.generate_stream(QUESTIONS[1], lora_id="alpha", use_chat_template=True, max_new_tokens=MAX_TOKENS)
    assert WORDS["alpha"] in "".join(event.data for event in stream)
    assert (
        WORDS["alpha"] not in client.generate(QUESTIONS[1], use_chat_template=True, max_new_tokens=MAX_TOKENS)["text"]
    )


def test_openai_model_group_colon_adapter(server: Any) -> None:
    client = openai.OpenAI(base_url=server.url("openai_port") + "/v1", api_key="unused", max_retries=0)
    ids = [model.id for model in client.models.list()]
    assert {"primary", "primary:alpha", "primary:beta", "plain"} <= set(ids)
    assert client.models.retrieve("primary:beta").id == "primary:beta"
    messages: Any = [{"role": "user", "content": QUESTIONS[0]}]
    chosen = {
        model: client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        .choices[0]
        .message.content
        for model in ("primary:alpha", "beta", "primary")
    }
    assert WORDS["alpha"] in (chosen["primary:alpha"] or "")
    assert WORDS["beta"] in (chosen["beta"] or "")  # the adapter's name alone: only one group has it
    assert not any(word in (chosen["primary"] or "") for word in WORDS.values())
    with pytest.raises(openai.BadRequestError, match="alpha, beta"):
        client.chat.completions.create(model="primary:gamma", messages=messages, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="alpha, beta"):  # completions pass the adapter on too
        client.completions.create(model="primary:gamma", prompt="Hello", max_tokens=2)
    completion = client.completions.create(model="primary:beta", prompt="Hello", max_tokens=2, temperature=0)
    assert completion.model == "primary:beta"


def test_vertex_instances_and_snowflake_rows_carry_lora_id(server: Any) -> None:
    body = {"instances": [{"text": QUESTIONS[0], "lora_id": "alpha"}, {"text": QUESTIONS[0], "lora_id": "beta"}],
            "parameters": {"use_chat_template": True, "max_new_tokens": MAX_TOKENS}}  # fmt: skip
    vertex = server.http.post(server.url("vertex_port") + "/generate_vertex", json=body, timeout=120)
    assert vertex.status_code == 200, vertex.text
    predictions = [p["text"] for p in vertex.json()["predictions"]]
    only("alpha", predictions[0])
    only("beta", predictions[1])
    row = {"text": QUESTIONS[1], "lora_id": "beta", "use_chat_template": True, "max_new_tokens": MAX_TOKENS}
    snowflake = server.http.post(server.url("snowflake_port") + "/generate_snowflake", json={"data": [[0, row]]},
                                 timeout=120)  # fmt: skip
    assert snowflake.status_code == 200, snowflake.text
    assert WORDS["beta"] in str(snowflake.json()["data"][0][1])


def test_llamacpp_serves_a_converted_peft_adapter(server: Any) -> None:
    """The llama.cpp reader converted alpha from PEFT at load: lora_id picks it, an unknown one is a 400 naming
    it, and POST /reader refuses an adapter outside repository_path before anything starts."""
    only("alpha", _text(_generate(server, QUESTIONS[0], "alpha", group="cpp")))
    assert "PINEAPPLE" not in _text(_generate(server, QUESTIONS[0], group="cpp"))
    response = _generate(server, QUESTIONS[0], "beta", group="cpp")
    assert response.status_code == 400
    assert "it has: alpha" in response.json()["detail"]
    body = {"model_name": "smollm2-135m-instruct", "device": "cpu", "consumer_group": "cpp2", "loras": "x=anything"}
    created = server.http.post(server.mgmt + "/reader", json=body)
    assert created.status_code == 400  # not under repository_path: refused before anything starts
    assert "LoRA 'x'" in created.json()["detail"]
