"""Schemathesis set-up for ``test_fuzz.py``: its configuration, the data hooks, an extra check, the run loop.

Why hooks: the OpenAPI documents say ``consumer_group``, ``model`` and ``reader_id`` are free strings, so a fuzzer
left alone sends almost every request to a group or reader that does not exist and only ever tests the 404. The
hooks below send a share of the generated requests to the real groups and readers, with every other field still
fuzzed, so the readers themselves see hostile input; and they mix the numbers known to break servers into valid
bodies, which hypothesis alone seldom draws.

Why our own run loop (``run_stateless``, on schemathesis's engine) rather than its pytest plugin: the plugin's
lazy-schema tests fail on pytest 9 (they set ``Function._nodeid``, which pytest no longer has), and the engine
runs every phase, reports every distinct failure with a curl reproducer, and can be stopped at the first hang.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import schemathesis
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig

EXAMPLES = int(os.environ.get("LIFTOFF_FUZZ_EXAMPLES", "30"))
"""Fuzzed cases per operation, valid and invalid together (``make test`` keeps it small; raise it for a long run)."""
STATEFUL_EXAMPLES = int(os.environ.get("LIFTOFF_FUZZ_STATEFUL_EXAMPLES", "4"))
"""Stateful scenarios on the management port (each may start a few echo readers)."""
SEED = int(os.environ.get("LIFTOFF_FUZZ_SEED", "14"))
"""The same seed gives the same cases; a long run may change it to explore further."""
REQUEST_TIMEOUT_S = float(os.environ.get("LIFTOFF_FUZZ_REQUEST_TIMEOUT_S", "10"))
"""Every request must be answered within this (a hang is a failure, not a slow test)."""
TEST_TIMEOUT_S = 120 + 2 * EXAMPLES
"""pytest-timeout of one port's run: the default 120 s, and more for a long run."""

# docs/api.md: the statuses a client error may have, on every port.
CLIENT_ERRORS = frozenset({400, 403, 404, 405, 413, 422, 429})
OPENAI_TITLE = "Liftoff openai API"
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
)


# Numbers that break servers (see ``hostile_numbers``): integers no 64-bit field holds (msgpack cannot encode them:
# issue 14), the edges of int64 and int32, and floats that overflow or vanish (a temperature of 1e-40 overflows the
# sampler: issue 14). Hypothesis rarely draws them on its own: an unbounded integer is small most of the time.
HOSTILE_INTEGERS = (2**64 + 5, 2**64, 2**63, 2**63 - 1, 2**31, 10**30)
HOSTILE_FLOATS = (1e-40, 5e-324, 1e-300, 1.7976931348623157e308, 1e30)
HOSTILE_SHARE = 0.1

# Stateless ``POST /reader``: invalid bodies only, and the first accepted one ends the operation's run: each accepted
# body starts a reader process (deleted at once, see ``delete_created_reader``).
NEGATIVE_READER_BODIES = {"include-name": "POST /reader", "continue-on-failure": False,
                          "generation": {"mode": "negative"}}  # fmt: skip


def config(base_url: str | None = None, *, stateful: bool = False) -> SchemathesisConfig:
    """The run's configuration, built here so that no ``schemathesis.toml`` found on the disk changes it; the
    engine's stateful phase is off (``test_management_stateful`` runs its own state machine). Stateful runs
    send valid data only: invalid ``POST /reader`` bodies are the stateless run's, and the hook that makes each
    reader an echo one would turn an invalid body valid."""
    return SchemathesisConfig.from_dict(
        {
            **({"base-url": base_url} if base_url else {}),
            "seed": SEED,
            "request-timeout": REQUEST_TIMEOUT_S,
            "max-stream-events": 64,
            "suppress-health-check": ["all"],
            "workers": 1,
            "continue-on-failure": True,  # every distinct failure of an operation, not only the first
            # No shrinking: a request that breaks the server fails every later one, so a shrunk case would blame
            # an innocent request (and each try of a hang costs the request timeout).
            "generation": {"max-examples": EXAMPLES, "database": "none", "mode": "all", "no-shrink": True},
            "output": {"sanitization": {"enabled": False}},  # the reproducers must show the real values
            # Values seen in responses are not reused as inputs: they include the server's own reader ids, which
            # DELETE /reader/{id} would then stop (only the stateful test deletes, and only what it created).
            "phases": {
                "stateful": {"enabled": stateful, "max-steps": 6, "generation": {"mode": "positive"}},
                "fuzzing": {"extra-data-sources": {"responses": False}},
                "coverage": {"extra-data-sources": {"responses": False}},
            },
            "checks": {"enabled": False, **{name: {"enabled": True} for name in (*CHECKS, "documented_client_error")}},
            # A valid body starts a reader process: stateless runs send invalid ones only (see test_fuzz.py).
            "operations": [] if stateful else [NEGATIVE_READER_BODIES],
        }
    )


def _known(value: Any, choices: Iterable[str]) -> st.SearchStrategy[Any]:
    """``value`` as generated, or one of ``choices``, with equal chances."""
    return st.sampled_from([value, *choices])


def route_body(fields: dict[str, list[str]]) -> Callable[[Any, Any], st.SearchStrategy[Any]]:
    """A ``flatmap_body`` hook: each of ``fields`` of a JSON object body is either fuzzed or one of its choices."""

    def hook(context: Any, body: Any) -> st.SearchStrategy[Any]:
        if not isinstance(body, dict):
            return st.just(body)
        # A field the fuzzer made the wrong type is a negative case's point: left as it is.
        present = {name: choices for name, choices in fields.items() if isinstance(body.get(name), str)}
        if not present:
            return st.just(body)
        return st.fixed_dictionaries({name: _known(body[name], choices) for name, choices in present.items()}).map(
            lambda chosen: {**body, **chosen}
        )

    return hook


def _hostile(value: Any) -> st.SearchStrategy[Any]:
    """``value``, or (one time in ten) a hostile number of its type; anything else as it is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return st.just(value)
    hostile = HOSTILE_INTEGERS if isinstance(value, int) else HOSTILE_FLOATS
    share = int(len(hostile) / HOSTILE_SHARE)
    return st.sampled_from([*hostile, *[value] * (share - len(hostile))])


def hostile_numbers(context: Any, case: Any) -> st.SearchStrategy[Any]:
    """A ``flatmap_case`` hook: the numbers of a valid JSON body (top-level fields, and the items of top-level
    lists such as ``tokens``) are sometimes replaced by ``HOSTILE_INTEGERS`` / ``HOSTILE_FLOATS`` (all of them
    valid where the schema has no maximum, which is the point). Invalid cases are left as they are, so that the
    ``negative_data_rejection`` check still judges what the fuzzer meant to send."""
    body = case.body
    if case.meta is None or case.meta.generation.mode.name != "POSITIVE" or not isinstance(body, dict):
        return st.just(case)

    def field(value: Any) -> st.SearchStrategy[Any]:
        if isinstance(value, list):
            return st.tuples(*map(_hostile, value)).map(list)
        return _hostile(value)

    def apply(new: dict[str, Any]) -> Any:
        case.body = new
        return case

    return st.fixed_dictionaries({key: field(value) for key, value in body.items()}).map(apply)


def route_reader_id(readers: list[str]) -> Callable[[Any, Any], st.SearchStrategy[Any]]:
    """A ``flatmap_path_parameters`` hook: ``reader_id`` is fuzzed or one of the server's readers; never for
    ``DELETE /reader/{id}``, which would stop them (the stateful test deletes the readers it creates)."""

    def hook(context: Any, parameters: Any) -> st.SearchStrategy[Any]:
        if context.operation.method.upper() == "DELETE":
            return st.just(parameters)
        if not isinstance(parameters, dict) or "reader_id" not in parameters:
            return st.just(parameters)
        return _known(parameters["reader_id"], readers).map(lambda rid: {**parameters, "reader_id": rid})

    return hook


def spare_readers(readers: list[str]) -> Callable[[Any, Any], bool]:
    """A ``filter_path_parameters`` hook: no stateless ``DELETE /reader/{id}`` names one of ``readers``."""

    def hook(context: Any, parameters: Any) -> bool:
        if context.operation.method.upper() != "DELETE" or not isinstance(parameters, dict):
            return True
        return parameters.get("reader_id") not in readers

    return hook


def install_hooks(schema: Any, groups: list[str], readers: list[str]) -> None:
    """Route a share of the requests of ``schema`` to the server's real groups and readers, and mix in hostile
    numbers."""
    schema.hook("flatmap_body")(route_body({"consumer_group": groups, "model": groups}))
    schema.hook("flatmap_path_parameters")(route_reader_id(readers))
    schema.hook("filter_path_parameters")(spare_readers(readers))
    schema.hook("flatmap_case")(hostile_numbers)


def _error_shape(body: Any, openai: bool) -> str | None:
    """What is wrong with an error body, or None (docs/api.md: native ``detail`` + ``error_type``; OpenAI
    ``{"error": {"message", "type", "param", "code"}}``)."""
    if openai:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or not isinstance(error.get("message"), str):
            return 'not OpenAI\'s {"error": {"message", "type", "param", "code"}}'
        return None
    if not isinstance(body, dict) or not isinstance(body.get("detail"), str):
        return 'no string "detail"'
    if not isinstance(body.get("error_type"), str):
        return 'no string "error_type"'
    return None


@schemathesis.check
def documented_client_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 4xx has a status docs/api.md lists and a JSON error body of the port's shape, also where the OpenAPI
    document describes no body (405s of the router, 404s of unknown routes)."""
    status = response.status_code
    if status < 400 or status >= 500:
        return None
    if status not in CLIENT_ERRORS:
        raise AssertionError(f"status {status} is not one docs/api.md lists for client errors")
    try:
        body = json.loads(response.content or b"null")
    except ValueError:
        raise AssertionError(f"the {status} body is not JSON: {response.content[:200]!r}") from None
    openai = case.operation.schema.raw_schema.get("info", {}).get("title") == OPENAI_TITLE  # every route of that port
    problem = _error_shape(body, openai)
    if problem:
        raise AssertionError(f"the {status} body has {problem}: {response.content[:300]!r}")
    return None


def delete_created_reader(management_url: str) -> Callable[[Any, Any, Any], None]:
    """An ``after_call`` hook for the stateless runs: a reader that a ``POST /reader`` started is deleted at once,
    so that accepted bodies never pile up reader processes."""
    import httpx

    def hook(context: Any, case: Any, response: Any) -> None:
        if case.operation.path == "/reader" and case.method.upper() == "POST" and response.status_code == 201:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                reader_id = response.json()["reader_id"]
                httpx.delete(f"{management_url}/reader/{reader_id}", timeout=REQUEST_TIMEOUT_S)

    return hook


def echo_reader_body(group: str) -> Callable[[Any, Any], Any]:
    """A ``map_body`` hook for ``POST /reader``: a valid body starts an echo reader in ``group`` (every other
    option stays fuzzed), so that a fuzzed reader neither loads a real model nor joins a group others use."""

    def hook(context: Any, body: Any) -> Any:
        if context.operation.path != "/reader" or not isinstance(body, dict):
            return body
        return {**body, "model_name": "echo", "device": "cpu", "consumer_group": [group]}

    return hook


def cleaning_state_machine(schema: Any, management_url: str) -> type[Any]:
    """``schema``'s state machine, which deletes the readers each scenario created when the scenario ends."""
    import httpx

    base = schema.as_state_machine()

    class Cleaning(base):  # type: ignore[misc, valid-type]
        created_total: ClassVar[list[str]] = []  # every reader any scenario created

        def setup(self) -> None:
            self.created: list[str] = []

        def after_call(self, response: Any, case: Any) -> None:
            super().after_call(response, case)
            if case.operation.path == "/reader" and case.method.upper() == "POST" and response.status_code == 201:
                self.created.append(response.json()["reader_id"])
                self.created_total.append(self.created[-1])

        def teardown(self) -> None:
            with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
                for reader_id in self.created:
                    client.delete(f"{management_url}/reader/{reader_id}")
            super().teardown()

    return Cleaning


@dataclass(frozen=True)
class Finding:
    """One distinct problem: the operation, what went wrong, and a request that shows it."""

    operation: str
    kind: str
    detail: str
    reproduce: str

    def __str__(self) -> str:
        return f"{self.operation}: {self.kind}\n    {self.detail}\n    reproduce: {self.reproduce}"


def _one_line(text: object, limit: int = 400) -> str:
    return " ".join(str(text or "").split())[:limit]


def _check_failures(event: Any) -> Iterator[tuple[object, Finding]]:
    """The failed checks of a finished scenario, keyed by the failure (equal failures are one finding)."""
    for nodes in event.recorder.checks.values():
        for info in (node.failure_info for node in nodes if node.failure_info is not None):
            failure = info.failure
            finding = Finding(event.recorder.label, f"{failure.code} {failure.title}", _one_line(failure.message),
                              info.code_sample)  # fmt: skip
            yield failure, finding


def _is_hang(event: Any) -> bool:
    import requests

    return isinstance(event.value, requests.Timeout)


STOPPED = (
    "no answer: the rest was not run. The request that broke the server may be an earlier one that was "
    "answered: the server log says when a reader died"
)


def run_stateless(schema: Any) -> list[Finding]:
    """Run the examples, coverage and fuzzing phases on every operation of ``schema``; the distinct findings
    (schemathesis's own notion of distinct failures: same operation, same kind, same key facts). The run stops
    at the first request left unanswered: the server is then broken, and every later case would wait as long."""
    from schemathesis.engine import events, from_schema

    found: dict[object, Finding] = {}
    called: set[str] = set()
    stream = from_schema(schema).execute()
    for event in stream:
        if isinstance(event, events.ScenarioFinished):
            called.update([event.recorder.label] if event.recorder.interactions else [])
            for key, finding in _check_failures(event):
                found.setdefault(key, finding)
        elif isinstance(event, events.NonFatalError):
            info = event.info
            found.setdefault(event, Finding(event.label, f"error: {info.title}", _one_line(info),
                                            info.code_sample or ""))  # fmt: skip
            if _is_hang(event):
                stream.finish()
                return [*found.values(), Finding(event.label, "run stopped", STOPPED, "")]
        elif isinstance(event, events.FatalError):
            raise event.exception
    never = [label for label in _labels(schema) if label not in called]
    return list(found.values()) + [Finding(label, "never called", "no case could be generated", "") for label in never]


def _labels(schema: Any) -> list[str]:
    from schemathesis.core.result import Ok

    return [result.ok().label for result in schema.get_all_operations() if isinstance(result, Ok)]
