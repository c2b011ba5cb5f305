"""The OpenAPI documents as ``test_fuzz.py`` checks and uses them: unresolvable references, the repairs that let
the fuzzer reach every operation anyway, and the links the management document lacks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


def references(node: Any) -> Iterator[str]:
    """Every ``$ref`` in a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


def unresolvable(document: dict[str, Any]) -> list[str]:
    """The local ``$ref``s that do not point into ``document`` (a ``#/...`` pointer is read from its root)."""
    missing = []
    for ref in sorted(set(references(document))):
        node: Any = document
        for part in ref.removeprefix("#/").split("/") if ref.startswith("#/") else ():
            node = node.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(node, dict) else None
        if node is None:
            missing.append(ref)
    return missing


def _hoist_defs(node: Any, schemas: dict[str, Any]) -> Any:
    """``node`` with its ``$defs`` moved into ``schemas`` and ``#/$defs/X`` references pointed there."""
    if isinstance(node, list):
        return [_hoist_defs(item, schemas) for item in node]
    if not isinstance(node, dict):
        return node
    schemas.update({name: _hoist_defs(value, schemas) for name, value in node.pop("$defs", {}).items()})
    return {key: (value.replace("#/$defs/", "#/components/schemas/") if key == "$ref" and isinstance(value, str)
                  else _hoist_defs(value, schemas)) for key, value in node.items()}  # fmt: skip


def _without_prefix_items(node: Any) -> Any:
    """``node`` with every ``prefixItems`` dropped (the array keeps its other constraints)."""
    if isinstance(node, list):
        return [_without_prefix_items(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {key: _without_prefix_items(value) for key, value in node.items() if key != "prefixItems"}


def repaired(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` put right where it stops the fuzzer, so that every operation is fuzzed anyway:

    - the ``$defs`` that pydantic leaves inside request bodies move to ``components/schemas`` (a Liftoff bug that
      ``test_references_resolve`` reports: their ``#/$defs/X`` references do not resolve);
    - response schemas lose their ``prefixItems`` (Snowflake's ``[row, result]`` pairs): schemathesis 4.32 turns
      them into draft-4 ``items`` lists and then rejects its own result as an invalid schema (its bug, not ours).
    """
    document = json.loads(json.dumps(document))
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    document["paths"] = _hoist_defs(document["paths"], schemas)
    for operations in document["paths"].values():
        for operation in operations.values():
            operation["responses"] = _without_prefix_items(operation.get("responses", {}))
    for name in {ref.rsplit("/", 1)[-1] for ref in _response_refs(document)}:
        schemas[name] = _without_prefix_items(schemas[name])
    return document


def _response_refs(document: dict[str, Any]) -> Iterator[str]:
    for operations in document["paths"].values():
        for operation in operations.values():
            yield from (ref for ref in references(operation.get("responses", {})) if ref.startswith("#/components/"))


READER_LINKS = {
    "GetReader": "reader_detail_reader__reader_id__get",
    "GetConfig": "reader_config_config__reader_id__get",
    "DeleteReader": "delete_reader_reader__reader_id__delete",
}


def with_reader_links(document: dict[str, Any]) -> dict[str, Any]:
    """The management OpenAPI document with the links it lacks: the ``reader_id`` that ``POST /reader`` answers
    is the one ``GET /reader/{id}``, ``GET /config/{id}`` and ``DELETE /reader/{id}`` take."""
    created = document["paths"]["/reader"]["post"]["responses"]["201"]
    parameters = {"reader_id": "$response.body#/reader_id"}
    created["links"] = {
        name: {"operationId": target, "parameters": parameters} for name, target in READER_LINKS.items()
    }
    return document
