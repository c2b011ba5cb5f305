"""Embedding and classification readers served end to end (real processes): the bundled MiniLM, the reranker
trained in tests/models/reranker.py, and an echo reader to send requests of the wrong kind to."""

from __future__ import annotations

import base64
import concurrent.futures
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from takeoff_client import TakeoffClient

from tests.helpers import LiftoffServer
from tests.models.reranker import TOPICS

pytest.importorskip("sentence_transformers")

TEXTS = ["How do I bake bread?", "The stock market fell today.", "Who won the football match?"]
BATCH = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, reranker: Path) -> Any:
    readers = {
        "minilm": {"model_name": "all-minilm-l6-v2", "device": "cpu", "consumer_group": "embed",
                   "max_batch_size": BATCH, "batch_duration_millis": 300},
        "ranker": {"model_name": str(reranker), "device": "cpu", "consumer_group": "rerank", "max_batch_size": 16,
                   "batch_duration_millis": 5},
        "echo": {"model_name": "echo", "device": "cpu", "consumer_group": "primary"},
    }  # fmt: skip
    instance = LiftoffServer(workdir=tmp_path_factory.mktemp("encoders"), readers=readers)
    instance.start(timeout=120)
    instance.wait_live(3, timeout=120)
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def reference(minilm: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm), device="cpu")


def _cosines(ours: list[list[float]], theirs: np.ndarray) -> np.ndarray:
    a = np.asarray(ours)
    return np.asarray((a * theirs).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(theirs, axis=1))


def _client(server: Any) -> TakeoffClient:
    return TakeoffClient(base_url="http://127.0.0.1", port=server.ports["port"],
                         mgmt_port=server.ports["management_port"], oai_port=server.ports["openai_port"])  # fmt: skip


def test_status_says_what_each_reader_serves(server: Any) -> None:
    readers = server.readers()
    assert readers["minilm"]["model_type"] == "EMBEDDING"
    assert readers["ranker"]["model_type"] == "CLASSIFICATION"
    assert readers["echo"]["model_type"] == "CAUSAL"


def test_embed_matches_the_model_run_in_process(server: Any, reference: Any) -> None:
    expected = reference.encode(TEXTS)
    batch = server.http.post(server.base + "/embed", json={"text": TEXTS, "consumer_group": "embed"}).json()
    assert _cosines(batch["result"], expected).min() > 0.999
    assert batch["truncated"] == []
    single = server.http.post(server.base + "/embed", json={"text": TEXTS[0], "consumer_group": "embed"}).json()
    assert len(single["result"]) == 384
    assert _cosines([single["result"]], expected[:1]).min() > 0.999


def test_concurrent_requests_share_batches(server: Any) -> None:
    def one(text: str) -> dict[str, Any]:
        body = {"text": [text], "consumer_group": "embed", "return_metadata": True}
        response = server.http.post(server.base + "/embed", json=body, timeout=30)
        assert response.status_code == 200, response.text
        return dict(response.json()["metadata"])

    with concurrent.futures.ThreadPoolExecutor(BATCH) as pool:
        metas = list(pool.map(one, [f"sentence number {i}" for i in range(BATCH)]))
    sizes = [meta["batch_sizes"][0] for meta in metas]
    assert max(sizes) > 1, f"every request ran alone: {sizes}"
    assert all(meta["prompt_tokens"] == 5 for meta in metas)


def test_openai_sdk_embeddings_float_and_base64(server: Any, reference: Any) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url("openai_port") + "/v1", api_key="unused")
    expected = reference.encode(TEXTS)
    default = client.embeddings.create(model="embed", input=TEXTS)  # the SDK asks for base64 and decodes it
    as_floats = client.embeddings.create(model="embed", input=TEXTS, encoding_format="float")
    assert _cosines([item.embedding for item in default.data], expected).min() > 0.999
    assert np.allclose([item.embedding for item in default.data], [item.embedding for item in as_floats.data])
    assert [item.index for item in as_floats.data] == [0, 1, 2]
    tokens = server.http.post(server.base + "/embed", json={"text": TEXTS, "consumer_group": "embed",
                                                            "return_metadata": True}).json()["metadata"]  # fmt: skip
    assert default.usage.prompt_tokens == tokens["prompt_tokens"] == default.usage.total_tokens
    raw = server.http.post(server.url("openai_port") + "/v1/embeddings",
                           json={"model": "embed", "input": "hi", "encoding_format": "base64"}).json()  # fmt: skip
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert decoded.shape == (384,)
    assert "result" not in raw


@pytest.mark.filterwarnings("ignore:`langchain-community` is being sunset:DeprecationWarning")
def test_official_client_and_langchain_embed(server: Any, reference: Any) -> None:
    from langchain_community.embeddings import TitanTakeoffEmbed

    expected = reference.encode(TEXTS)
    client = _client(server)
    answer = client.embed(TEXTS, consumer_group="embed")
    assert _cosines(answer["result"], expected).min() > 0.999
    embedder = TitanTakeoffEmbed(base_url="http://127.0.0.1", port=server.ports["port"],
                                 mgmt_port=server.ports["management_port"])  # fmt: skip
    embedder.client = client  # the integration builds its client without the OpenAI port; ours points at it
    documents = embedder.embed_documents(TEXTS, consumer_group="embed")
    query = embedder.embed_query(TEXTS[0], consumer_group="embed")
    assert _cosines(documents, expected).min() > 0.999
    assert _cosines([query], expected[:1]).min() > 0.999


def test_long_inputs_are_truncated_or_refused(server: Any) -> None:
    long = "word " * 400
    cut = server.http.post(server.base + "/embed", json={"text": ["short", long], "consumer_group": "embed",
                                                         "return_metadata": True}).json()  # fmt: skip
    assert cut["truncated"] == [1]
    assert cut["metadata"]["tokens"][1] == 256
    refused = server.http.post(server.base + "/embed", json={"text": long, "consumer_group": "embed",
                                                             "truncate": False})  # fmt: skip
    assert refused.status_code == 400
    assert refused.json()["error_type"] == "context_length_exceeded"
    assert "402 tokens" in refused.json()["detail"]


def _trained_scores(reranker: Path, query: str, documents: list[str]) -> list[float]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(reranker)
    tokenizer = AutoTokenizer.from_pretrained(reranker)
    batch = tokenizer([query] * len(documents), documents, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return [float(value) for value in model(**batch).logits[:, 0]]


DOCUMENTS = [document for _, documents in TOPICS.values() for document in documents]


def test_classify_pairs_gives_the_trained_models_logits(server: Any, reranker: Path) -> None:
    query = "Why did the stock market fall today?"
    expected = _trained_scores(reranker, query, DOCUMENTS)
    body = {"text": [[query, document] for document in DOCUMENTS], "consumer_group": "rerank"}
    served = server.http.post(server.base + "/classify", json=body).json()["result"]
    assert [len(row) for row in served] == [1] * len(DOCUMENTS)
    assert np.allclose([row[0] for row in served], expected, atol=1e-3)
    via_client = _client(server).classify([[query, DOCUMENTS[0]]], consumer_group="rerank")
    assert np.allclose(via_client["result"][0], served[0], atol=1e-4)


@pytest.mark.parametrize("topic", list(TOPICS))
def test_rerank_orders_documents_as_the_trained_model_does(server: Any, reranker: Path, topic: str) -> None:
    query = TOPICS[topic][0][0]
    expected = _trained_scores(reranker, query, DOCUMENTS)
    order = sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])
    answer = server.http.post(server.base + "/rerank", json={"query": query, "documents": DOCUMENTS,
                                                             "consumer_group": "rerank"}).json()  # fmt: skip
    assert [result["index"] for result in answer["results"]] == order
    scores = [result["relevance_score"] for result in answer["results"]]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= score <= 1.0 for score in scores)
    best = answer["results"][0]
    assert best["document"]["text"] in TOPICS[topic][1], "the trained reranker ranks an on-topic document first"


def test_rerank_on_the_openai_port_cohere_shape(server: Any) -> None:
    body = {"model": "rerank", "query": "How do I bake bread at home?", "top_n": 2, "return_documents": False,
            "documents": [{"text": document} for document in DOCUMENTS]}  # fmt: skip
    for path in ("/v1/rerank", "/v2/rerank"):
        answer = server.http.post(server.url("openai_port") + path, json=body).json()
        assert len(answer["results"]) == 2
        assert "document" not in answer["results"][0]
        assert answer["usage"]["total_tokens"] > 0


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/generate", {"text": "hi", "consumer_group": "embed"}, "generation needs a CAUSAL"),
        ("/embed", {"text": "hi"}, "embeddings need an EMBEDDING reader"),
        ("/classify", {"text": "hi", "consumer_group": "embed"}, "classification and reranking need"),
        ("/rerank", {"query": "q", "documents": ["d"], "consumer_group": "embed"}, "need a CLASSIFICATION"),
        ("/embed", {"text": "hi", "consumer_group": "rerank"}, "serves CLASSIFICATION models"),
    ],
)
def test_requests_to_a_group_of_the_wrong_kind_are_400(server: Any, path: str, body: dict[str, Any],
                                                       words: str) -> None:  # fmt: skip
    response = server.http.post(server.base + path, json=body, timeout=10)
    assert response.status_code == 400
    assert words in response.json()["detail"]


def test_tokenizer_services_of_an_encoder_reader(server: Any) -> None:
    client = _client(server)
    assert client.tokenize("Hello world", reader_id="minilm") == ["[CLS]", "hello", "world", "[SEP]"]
    conversation = [{"role": "user", "content": "hi"}]
    response = server.http.post(server.base + "/chat_template/minilm", json={"inputs": [conversation]})
    assert response.status_code == 400
    assert "CAUSAL" in response.json()["detail"]


def test_vertex_instances_to_an_embedding_group(server: Any, reference: Any) -> None:
    body = {"instances": [{"content": text} for text in TEXTS], "parameters": {"consumer_group": "embed"}}
    answer = server.http.post(server.url("vertex_port") + "/generate_vertex", json=body).json()
    values = [prediction["embeddings"]["values"] for prediction in answer["predictions"]]
    assert _cosines(values, reference.encode(TEXTS)).min() > 0.999
    statistics = answer["predictions"][0]["embeddings"]["statistics"]
    assert statistics == {"token_count": 9, "truncated": False}  # [CLS] how do i ba ##ke bread ? [SEP]


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/classify", {"text": [["a", "b", "c"]], "consumer_group": "rerank"}, 400),
        ("/embed", {"text": [], "consumer_group": "embed"}, 400),
        ("/embed", {"text": 3, "consumer_group": "embed"}, 422),
        ("/rerank", {"query": "q", "documents": [], "consumer_group": "rerank"}, 422),
    ],
)
def test_bad_encoder_bodies(server: Any, path: str, body: dict[str, Any], status: int) -> None:
    response = server.http.post(server.base + path, json=body, timeout=10)
    assert response.status_code == status
    assert response.json()["detail"]


def test_an_idle_encoder_reader_stops_at_once_when_the_gateway_does(liftoff: Any) -> None:
    reader = {"model_name": "all-minilm-l6-v2", "device": "cpu", "consumer_group": "embed"}
    server = liftoff(readers={"m": reader}, server={"shutdown_timeout_s": 20}).start(timeout=120)
    assert server.http.post(server.base + "/embed", json={"text": "hi", "consumer_group": "embed"}).status_code == 200
    assert server.stop() == 0
    assert "did not stop" not in server.log()  # it waited for nothing until shutdown_timeout_s, then was killed
