"""The OpenAPI 3.1 document, generated from the endpoint table and its msgspec structs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

import service
from service.errors import DashboardErrorEnvelope
from service.routing import Endpoint

_REASONS = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Validation error",
    429: "Too many requests",
    503: "Unavailable",
}


def build(endpoints: Iterable[Endpoint]) -> dict[str, Any]:
    endpoints = list(endpoints)
    types: list[Any] = [DashboardErrorEnvelope]
    for ep in endpoints:
        types += [t for t in (ep.request, ep.response) if t is not None]
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    refs = dict(zip(types, schemas, strict=True))
    error = {"content": {"application/json": {"schema": refs[DashboardErrorEnvelope]}}}

    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        op: dict[str, Any] = {
            "summary": ep.summary,
            "tags": [ep.tag],
            "operationId": ep.handler.__name__,
        }
        if ep.auth == "session":
            op["security"] = [{"dashboardSession": []}]
        elif ep.auth == "api_key":
            op["security"] = [{"apiKey": []}]
        if ep.query:
            op["parameters"] = [
                {
                    "name": n,
                    "in": "query",
                    "required": False,
                    "description": d,
                    "schema": {"type": "string"},
                }
                for n, d in ep.query
            ]
        if ep.request is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[ep.request]}},
            }
        ok: dict[str, Any] = {"description": "OK"}
        if ep.response is not None:
            ok["content"] = {"application/json": {"schema": refs[ep.response]}}
        if ep.headers:
            ok["headers"] = {
                h: {"description": d, "schema": {"type": "string"}} for h, d in ep.headers.items()
            }
        responses: dict[str, Any] = {str(ep.status): ok}
        errors = set(ep.errors) | ({401} if ep.auth != "none" else set())
        for status in sorted(errors):
            responses[str(status)] = {"description": _REASONS.get(status, "Error"), **error}
        op["responses"] = responses
        paths.setdefault(ep.path, {})[ep.method.lower()] = op

    return {
        "openapi": "3.1.0",
        "info": {"title": "codex-lb", "version": service.__version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "dashboardSession": {"type": "apiKey", "in": "cookie", "name": "dashboard_session"},
                "apiKey": {"type": "http", "scheme": "bearer"},
            },
        },
    }


def endpoint(endpoints: list[Endpoint]) -> Endpoint:
    """The ``/openapi.json`` route, describing itself along with everything else."""
    document: dict[str, Any] = {}

    async def openapi_json(request: Request) -> Response:
        if not document:
            document.update(build(endpoints))
        return Response(msgspec.json.encode(document), media_type="application/json")

    ep = Endpoint("GET", "/openapi.json", openapi_json, "This document", "operations", auth="none")
    endpoints.append(ep)
    return ep
