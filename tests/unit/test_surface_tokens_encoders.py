"""The tokenizer services and the encoder routes of the inference port in process
(``liftoff.gateway.surfaces.tokens`` and ``.encoders``): ``/tokenize``, ``/detokenize``, ``/chat_template``,
``/embed``, ``/classify``, ``/rerank`` (and ``/v1/rerank`` on the OpenAI port), as docs/api.md specifies them."""

from __future__ import annotations

import math
from typing import Any

import pytest

from liftoff.protocol.native import (
    ChatTemplateResponse,
    ClassifyResponse,
    DetokenizeResponse,
    EmbedResponse,
    RerankResponse,
    TokenizeResponse,
)
from tests.unit.conftest import GatewayFactory
from tests.unit.fake_reader import DIMENSIONS, embedding
from tests.unit.inprocess import InProcessGateway
from tests.unit.test_surface_native import check_error, post


@pytest.fixture
async def encoders(gateway: InProcessGateway) -> InProcessGateway:
    """The gateway with an embedding reader (group ``embed``) and a classifier (group ``rank``) beside reader-a."""
    gateway.broker.connect("embedder", ("embed",), model_type="EMBEDDING")
    gateway.broker.connect("ranker", ("rank",), model_type="CLASSIFICATION")
    return gateway


# ---- tokenizer services -----------------------------------------------------------------------------------------


async def test_tokenize(gateway: InProcessGateway) -> None:
    response = await post(gateway, "/tokenize/reader-a", {"text": "Hello big world"})
    assert response.status_code == 200
    assert response.json() == {"tokens": ["Hello", " big", " world"], "tokens_count": 3}
    TokenizeResponse.model_validate(response.json())
    [frame] = gateway.broker.submitted
    assert (frame.reader_id, frame.kind, frame.payload) == ("reader-a", "tokenize", {"text": "Hello big world"})


async def test_detokenize(gateway: InProcessGateway) -> None:
    response = await post(gateway, "/detokenize/reader-a", {"tokens": ["Hello", " world"]})
    assert response.json() == {"text": "Hello world"}
    DetokenizeResponse.model_validate(response.json())


async def test_the_readers_refusal_is_the_answer(gateway: InProcessGateway) -> None:
    body = check_error(await post(gateway, "/detokenize/reader-a", {"tokens": [1, 2]}), 400, "invalid_request")
    assert "token strings" in body["detail"]


async def test_chat_template(gateway: InProcessGateway) -> None:
    chats = [
        [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Yo"}],
    ]
    response = await post(gateway, "/chat_template/reader-a", {"inputs": chats, "add_generation_prompt": True})
    assert response.json() == {"messages": ["<|system|>Be brief<|user|>Hi<|assistant|>", "<|user|>Yo<|assistant|>"]}
    ChatTemplateResponse.model_validate(response.json())


@pytest.mark.parametrize(
    ("path", "body", "status", "error_type"),
    [
        ("/tokenize/ghost", {"text": "hi"}, 404, "not_found"),
        ("/tokenize/reader-a", {"text": ["a", "b"]}, 422, "validation_error"),
        ("/tokenize/reader-a", {"text": "hi", "extra": 1}, 400, "invalid_request"),
        ("/detokenize/reader-a", {"tokens": [-1]}, 400, "invalid_request"),
        ("/chat_template/reader-a", {"inputs": []}, 422, "validation_error"),
        ("/chat_template/reader-a", {"inputs": [[{"role": "user"}]]}, 422, "validation_error"),
    ],
)
async def test_bad_tokenizer_requests(
    gateway: InProcessGateway, path: str, body: dict[str, Any], status: int, error_type: str
) -> None:
    check_error(await post(gateway, path, body), status, error_type)
    assert gateway.broker.submitted == []


async def test_tokenize_limits_are_those_of_prompts(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(max_prompt_string_bytes=4)
    gateway.broker.connect("reader-a")
    check_error(await post(gateway, "/tokenize/reader-a", {"text": "too long"}), 400, "invalid_request")
    chat = [[{"role": "user", "content": "too long"}]]
    check_error(await post(gateway, "/chat_template/reader-a", {"inputs": chat}), 400, "invalid_request")


async def test_a_reader_that_is_not_live_is_503(gateway: InProcessGateway) -> None:
    gateway.broker.connect("loading", loaded=False)
    check_error(await post(gateway, "/tokenize/loading", {"text": "hi"}), 503, "unavailable")


async def test_chat_template_of_an_encoder_is_a_400(encoders: InProcessGateway) -> None:
    chat = [[{"role": "user", "content": "hi"}]]
    body = check_error(await post(encoders, "/chat_template/embedder", {"inputs": chat}), 400, "invalid_request")
    assert "CAUSAL" in body["detail"]


# ---- /embed -----------------------------------------------------------------------------------------------------


async def test_embed_one_text(encoders: InProcessGateway) -> None:
    response = await post(encoders, "/embed", {"text": "How to bake", "consumer_group": "embed"})
    assert response.status_code == 200
    assert response.json() == {"result": embedding("How to bake", 0), "truncated": []}
    EmbedResponse.model_validate(response.json())


async def test_embed_a_list_with_metadata(encoders: InProcessGateway) -> None:
    texts = ["one", "two words", "three more words"]
    response = await post(encoders, "/embed", {"text": texts, "consumer_group": "embed", "return_metadata": True})
    body = response.json()
    assert body["result"] == [embedding(text, index) for index, text in enumerate(texts)]
    assert all(len(row) == DIMENSIONS for row in body["result"])
    assert body["metadata"] == {"prompt_tokens": 6, "tokens": [1, 2, 3], "batch_sizes": [3, 3, 3]}
    [frame] = encoders.broker.submitted  # the whole request is one broker request
    assert frame.payload == {"inputs": texts}


async def test_embed_sent_to_a_generation_group_is_a_400(encoders: InProcessGateway) -> None:
    body = check_error(await post(encoders, "/embed", {"text": "hi"}), 400, "invalid_request")
    assert "EMBEDDING" in body["detail"]


async def test_embed_bad_bodies(encoders: InProcessGateway) -> None:
    check_error(await post(encoders, "/embed", {"text": [], "consumer_group": "embed"}), 400, "invalid_request")
    check_error(await post(encoders, "/embed", {"text": {"a": 1}, "consumer_group": "embed"}), 422, "validation_error")
    check_error(await post(encoders, "/embed", {"text": "x", "consumer_group": "nope"}), 404, "not_found")


# ---- /classify and /rerank --------------------------------------------------------------------------------------


async def test_classify_pairs(encoders: InProcessGateway) -> None:
    pairs = [["query", "a short doc"], ["query", "alone"]]
    response = await post(encoders, "/classify", {"text": pairs, "consumer_group": "rank", "truncate": True})
    assert response.json() == {"result": [[0.0, 3.0], [0.0, 1.0]], "truncated": []}
    ClassifyResponse.model_validate(response.json())
    assert encoders.broker.submitted[0].payload == {"inputs": pairs, "truncate": True}


async def test_classify_one_text_with_metadata(encoders: InProcessGateway) -> None:
    body = {"text": "just one text", "consumer_group": "rank", "return_metadata": True}
    assert (await post(encoders, "/classify", body)).json() == {
        "result": [[0.0, 3.0]],
        "truncated": [],
        "metadata": {"prompt_tokens": 3, "tokens": [3], "batch_sizes": [1]},
    }


async def test_classify_a_list_of_three_texts_is_a_400(encoders: InProcessGateway) -> None:
    body = check_error(
        await post(encoders, "/classify", {"text": [["a", "b", "c"]], "consumer_group": "rank"}), 400, "invalid_request"
    )
    assert "text[0]" in body["detail"]


def sigmoid_of_last(logits: list[float]) -> float:
    weights = [math.exp(value - max(logits)) for value in logits]
    return weights[-1] / sum(weights)


async def test_rerank_orders_documents_best_first(encoders: InProcessGateway) -> None:
    documents = ["one", "one two three", {"text": "one two"}]
    response = await post(encoders, "/rerank", {"query": "q", "documents": documents, "consumer_group": "rank"})
    body = response.json()
    RerankResponse.model_validate(body)
    assert [result["index"] for result in body["results"]] == [1, 2, 0]
    assert body["results"][0]["document"] == {"text": "one two three"}
    assert body["results"][0]["relevance_score"] == pytest.approx(sigmoid_of_last([0.0, 3.0]))
    assert body["model"] == "rank"
    assert body["usage"] == {"prompt_tokens": 9, "total_tokens": 9}
    assert body["meta"] == {"billed_units": {"search_units": 1}}


async def test_rerank_on_the_openai_port_with_top_n(encoders: InProcessGateway) -> None:
    body = {"query": "q", "documents": ["a", "a b"], "model": "rank", "top_n": 1, "return_documents": False}
    async with encoders.client("openai_port") as http:
        response = await http.post("/v1/rerank", json=body)
        unsupported = await http.post("/v2/rerank", json={**body, "rank_fields": ["title"]})
    assert response.json()["results"] == [{"index": 1, "relevance_score": pytest.approx(sigmoid_of_last([0.0, 2.0]))}]
    assert unsupported.status_code == 400
    assert unsupported.json()["error"]["code"] == "not_supported"
    assert unsupported.json()["error"]["param"] == "rank_fields"
