"""The admin API's OpenAPI 3.1 document, generated from its route table and pydantic models.

Each `Operation` names the models its handler validates the body with and
answers with (`admin.app` holds to them at run time), so the document is
derived from the code that runs and cannot drift from it. Schemas come from
pydantic (JSON Schema 2020-12, which OpenAPI 3.1 uses as-is).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.requests import Request
from starlette.responses import Response

from admin.schemas import MAX_ADMIN_BODY_BYTES, TENANT_ID_PATTERN, Error

Endpoint = Callable[[Request], Awaitable[Response]]

_REF = "#/components/schemas/{model}"
_PATH_PARAMETERS = {
    "tenant_id": {"type": "string", "pattern": TENANT_ID_PATTERN},
    "key_id": {"type": "string"},
}


@dataclass(frozen=True)
class Operation:
    """One method of one route: its handler, and the models and failures it documents."""

    handler: Endpoint
    summary: str
    response: type[BaseModel] | None = None  # None: no body (204)
    status: int = 200
    body: type[BaseModel] | None = None
    body_optional: bool = False
    query: type[BaseModel] | None = None
    self_route: bool = False  # a tenant's own proxy key may call it for its own id
    errors: Mapping[int, str] = field(default_factory=dict)  # beyond auth, lookup and body


def _failures(path: str, op: Operation) -> dict[int, str]:
    """Every error status the operation can answer, with what it means."""
    failures = {
        401: "Missing or invalid bearer token",
        429: "Too many failed authentications from this address",
        503: "The database is unavailable",
    }
    if not op.self_route:
        failures[403] = "A tenant's proxy key on an admin-only route"
    if "{tenant_id}" in path:
        failures[404] = "No such tenant (or not the caller's own)"
    if op.body is not None:
        failures[400] = "Body is not a JSON object"
        failures[413] = f"Body over {MAX_ADMIN_BODY_BYTES} bytes"
        failures[422] = "Body failed validation (the message names the field and the rule)"
    if op.query is not None:
        failures[422] = "A query parameter failed validation (named in `param`)"
    return {**failures, **op.errors}


def _parameters(path: str, op: Operation) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": _PATH_PARAMETERS[name]}
        for name in re.findall(r"{(\w+)}", path)
    ]
    if op.query is not None:
        schema = op.query.model_json_schema()
        for name, prop in schema["properties"].items():
            prop.pop("title", None)
            required = name in schema.get("required", ())
            params.append({"name": name, "in": "query", "required": required, "schema": prop})
    return params


def _operation(
    path: str, op: Operation, refs: Mapping[tuple[Any, JsonSchemaMode], Any]
) -> dict[str, Any]:
    def content(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return {"application/json": {"schema": refs[(model, mode)]}}

    success: dict[str, Any] = {"description": "OK" if op.response else "Done"}
    if op.response is not None:
        success["content"] = content(op.response, "serialization")
    responses = {str(op.status): success}
    for status, meaning in sorted(_failures(path, op).items()):
        responses[str(status)] = {
            "description": meaning,
            "content": content(Error, "serialization"),
        }
    doc: dict[str, Any] = {
        "operationId": op.handler.__name__,
        "summary": op.summary,
        "parameters": _parameters(path, op),
        "responses": responses,
    }
    if op.body is not None:
        doc["requestBody"] = {
            "required": not op.body_optional,
            "content": content(op.body, "validation"),
        }
    return doc


def build_document(routes: Mapping[str, Mapping[str, Operation]]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes` (path -> method -> operation)."""
    ops = [op for methods in routes.values() for op in methods.values()]
    models: set[tuple[type[BaseModel], JsonSchemaMode]] = {(Error, "serialization")}
    models |= {(op.response, "serialization") for op in ops if op.response is not None}
    models |= {(op.body, "validation") for op in ops if op.body is not None}
    refs, defs = models_json_schema(
        sorted(models, key=lambda m: (m[0].__name__, m[1])), ref_template=_REF
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "byok-proxy admin API", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": defs["$defs"],
        },
        "security": [{"bearer": []}],
        "paths": {
            path: {method.lower(): _operation(path, op, refs) for method, op in methods.items()}
            for path, methods in routes.items()
        },
    }
