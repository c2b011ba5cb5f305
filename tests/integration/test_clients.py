"""Real clients against Liftoff, unchanged: the ``openai`` SDK, ``takeoff-client`` (async methods and the methods
that reach other ports) and LangChain's ``TitanTakeoff``.

``tests/integration/test_official_client.py`` covers takeoff-client's synchronous generation and management
methods, and ``test_tokenizer_services.py`` its synchronous tokenizer methods.
"""

from __future__ import annotations

import gc
import json
from typing import Any

import openai
import pytest
from takeoff_client import TakeoffClient
from takeoff_client.exceptions import TakeoffException

from tests.helpers import LiftoffServer, echo_reader, wait_until

PROMPT = "the quick brown fox"
CHAT_TEXT = f"user: {PROMPT}\nassistant:"  # what the echo model answers to PROMPT as a user message


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    instance = LiftoffServer(workdir=tmp_path_factory.mktemp("clients"), readers={"r1": echo_reader(delay_ms=1)})
    instance.start()
    yield instance
    instance.close()


def takeoff(server: Any) -> TakeoffClient:
    return TakeoffClient(base_url="http://127.0.0.1", port=server.ports["port"],
                         mgmt_port=server.ports["management_port"], oai_port=server.ports["openai_port"])  # fmt: skip


def messages(text: str = PROMPT) -> list[Any]:
    return [{"role": "user", "content": text}]


# ---- openai SDK -----------------------------------------------------------------------------------------------


def test_openai_sync_chat_completion_and_stream(server: Any) -> None:
    client = openai.OpenAI(base_url=server.url("openai_port") + "/v1", api_key="anything", max_retries=0)
    result = client.chat.completions.create(model="primary", messages=messages(), max_tokens=100)
    assert result.choices[0].message.content == CHAT_TEXT
    assert result.choices[0].finish_reason == "stop"
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (6, 6)
    stream = client.chat.completions.create(
        model="primary", messages=messages(), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == CHAT_TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 12
    assert [model.id for model in client.models.list()] == ["primary"]
    assert client.models.retrieve("primary").owned_by == "liftoff"


def test_openai_sync_completions(server: Any) -> None:
    client = openai.OpenAI(base_url=server.url("openai_port") + "/v1", api_key="anything", max_retries=0)
    result = client.completions.create(model="primary", prompt=["a b c", "d"], max_tokens=2, n=2)
    assert [choice.text for choice in result.choices] == ["a b", "a b", "d", "d"]
    stream = client.completions.create(model="primary", prompt=PROMPT, max_tokens=3, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == "the quick brown"


def test_openai_errors_are_sdk_exceptions(server: Any) -> None:
    client = openai.OpenAI(base_url=server.url("openai_port") + "/v1", api_key="anything", max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=messages())
    assert missing.value.body == {"message": missing.value.body["message"], "type": "not_found_error",  # type: ignore[index]
                                  "param": "model", "code": "not_found"}  # fmt: skip
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.chat.completions.create(model="primary", messages=messages(), logprobs=True)
    assert unsupported.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as embeddings:
        client.embeddings.create(model="primary", input="x")
    assert "embeddings need an EMBEDDING reader" in embeddings.value.message
    assert embeddings.value.param == "model"


async def test_openai_async_chat_completion_and_stream(server: Any) -> None:
    client = openai.AsyncOpenAI(base_url=server.url("openai_port") + "/v1", api_key="anything", max_retries=0)
    async with client:
        result = await client.chat.completions.create(model="primary", messages=messages(), stop=[" brown"])
        assert result.choices[0].message.content == "user: the quick"
        assert result.choices[0].finish_reason == "stop"
        stream = await client.chat.completions.create(model="primary", messages=messages(), stream=True, n=2)
        texts = ["", ""]
        async for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
        assert texts == [CHAT_TEXT, CHAT_TEXT]


# ---- takeoff-client -------------------------------------------------------------------------------------------


# takeoff-client 0.7.0's generate_stream_async never closes the httpx.AsyncClient it opens: its sockets are
# collected here, inside the test, where the warnings that leak causes are expected.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
async def test_takeoff_client_async_generation(server: Any) -> None:
    client = takeoff(server)
    assert (await client.generate_async(PROMPT))["text"] == PROMPT
    chat = await client.generate_async(PROMPT, use_chat_template=True, max_new_tokens=2)
    assert chat["text"] == "user: the"
    events = [event async for event in client.generate_stream_async(PROMPT)]
    assert "".join(event.data for event in events) == PROMPT
    batch = [json.loads(event.data) async for event in client.generate_stream_async(["a b", "c"])]
    assert "".join(piece["text"] for piece in batch if piece["batch_id"] == 0) == "a b"
    gc.collect()


async def test_takeoff_client_async_tokenizer_methods(server: Any) -> None:
    client = takeoff(server)
    reader_id = "r1"
    assert await client.tokens_count_async("a b c", reader_id) == 3
    assert await client.tokenize_async("a b", reader_id, use_chat_template=False) == ["a", " b"]
    assert await client.detokenize_async(["a", " b"], reader_id) == "a b"
    rendered = await client.chat_template_async([{"role": "user", "content": "hi"}], reader_id)
    assert rendered == ["user: hi\n"]


async def test_takeoff_client_async_management(server: Any) -> None:
    client = takeoff(server)
    assert "r1" in (await client.get_status_async())["status"]["live_readers"]
    created = await client.create_reader_async({"model_name": "echo", "device": "cpu", "consumer_group": "async"})
    reader_id = created["reader_id"]
    wait_until(lambda: reader_id in server.readers(), what="the new reader to be live")
    assert [r["reader_id"] for r in (await client.get_readers_async())["async"]] == [reader_id]
    assert reader_id in [r["reader_id"] for r in (await client.list_all_readers_async())["async"]]
    assert (await client.get_reader_config_async(reader_id))["consumer_group"] == "async"
    await client.delete_reader_async(reader_id)
    assert "async" not in await client.get_readers_async()


@pytest.mark.parametrize("method", ["embed", "classify"])
def test_takeoff_client_embed_and_classify_get_a_clear_error(server: Any, method: str) -> None:
    """Sent to a group of generation readers, they are 400s naming the kind of reader they need."""
    client = takeoff(server)
    with pytest.raises(TakeoffException) as info:
        getattr(client, method)("some text", consumer_group="primary")
    assert info.value.status_code == 400
    assert "serves CAUSAL models" in str(info.value)
    assert "EMBEDDING reader" in str(info.value) or "CLASSIFICATION reader" in str(info.value)


# ---- LangChain ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`langchain-community` is being sunset:DeprecationWarning")
def test_langchain_titan_takeoff_invoke_and_stream(server: Any) -> None:
    from langchain_community.llms import TitanTakeoff

    llm = TitanTakeoff(base_url="http://127.0.0.1", port=server.ports["port"],
                       mgmt_port=server.ports["management_port"])  # fmt: skip
    assert llm.invoke(PROMPT) == PROMPT
    assert llm.invoke(PROMPT, stop=[" brown"]) == "the quick"
    assert "".join(llm.stream(PROMPT)) == PROMPT
    streaming = TitanTakeoff(base_url="http://127.0.0.1", port=server.ports["port"],
                             mgmt_port=server.ports["management_port"], streaming=True)  # fmt: skip
    assert streaming.invoke("one two") == "one two"
