"""The OpenAPI 3.1 document, generated from the endpoint table and its msgspec structs.

An endpoint declares its bodies, its success answer and the errors particular to it. What
follows from its shape is derived here, so no endpoint can forget it:

- its path parameters, from the ``{name}`` templates of its path;
- the errors of the gate in front of it (``auth.guard``, ``proxy.gate``, asked through the
  same functions the gates use), of its body (``http``: 415, 413, 400, 422; a route without a
  body still caps what it reads: 413), of Redis (503) and of the unexpected (500);
- the envelope they come in: the OpenAI one on proxy paths, the dashboard one elsewhere;
- the 405, with ``Allow``, that every other method on its path answers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

import service
from service.auth import guard
from service.core.endpoints import Endpoint
from service.core.errors import (
    CsrfRejected,
    DashboardErrorEnvelope,
    InvalidApiKey,
    InvalidJSON,
    MethodNotAllowed,
    NotReady,
    OpenAIErrorEnvelope,
    PayloadTooLarge,
    RateLimited,
    ServiceError,
    StoreUnavailable,
    TotpRequired,
    Unauthorized,
    UnsupportedMediaType,
    ValidationFailed,
    is_proxy_path,
)
from service.proxy import gate

_REASONS = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Validation error",
    429: "Too many requests",
    500: "Internal error",
    502: "Bad gateway",
    503: "Unavailable",
}

# Errors that always travel with a header (see their classes in ``errors``).
_HEADERS: dict[type[ServiceError], tuple[str, str]] = {
    RateLimited: ("Retry-After", "Seconds to wait before trying again"),
    InvalidApiKey: ("WWW-Authenticate", "`Bearer`"),
    MethodNotAllowed: ("Allow", "The methods this path supports"),
}

# ``{name}`` or Starlette's ``{name:convertor}``.
_PATH_PARAM = re.compile(r"{([^}:]+)(?::[^}]*)?}")


def path_parameters(path: str) -> list[str]:
    return _PATH_PARAM.findall(path)


def derived_errors(ep: Endpoint) -> list[type[ServiceError]]:
    """The errors ``ep`` can answer with because of its shape, besides its own ``errors``."""
    found: list[type[ServiceError]] = []
    if guard.checks_origin(ep.method, ep.path):
        found.append(CsrfRejected)
    if guard.requires_session(ep.path):
        # The guard looks the session up in Redis.
        found += [Unauthorized, TotpRequired, StoreUnavailable]
    elif ep.auth in ("session", "pending"):
        found.append(Unauthorized)  # the handler checks the session itself
    if gate.gated(ep.path):
        found += [InvalidApiKey, NotReady]
    if ep.passthrough is not None:
        found.append(PayloadTooLarge)
        if ep.passthrough == "application/json":
            found.append(InvalidJSON)  # the proxy reads a few fields, leniently
    elif ep.upload is not None:
        found += [UnsupportedMediaType, PayloadTooLarge]
    elif ep.request is not None:
        # ``http.read_json``, in the order it checks.
        found += [UnsupportedMediaType, PayloadTooLarge, InvalidJSON, ValidationFailed]
    elif ep.method not in ("GET", "HEAD"):
        found.append(PayloadTooLarge)  # ``http.drain_empty_body`` caps an unwanted body
    if ep.store:
        found.append(StoreUnavailable)
    found.append(ServiceError)  # 500 internal_error, possible anywhere
    return list(dict.fromkeys(found))


def _headers(errors: list[type[ServiceError]]) -> dict[str, Any]:
    """The headers of a status's errors: required when every one of them sends it."""
    headers = {}
    for error, (name, text) in _HEADERS.items():
        carried = [issubclass(e, error) for e in errors]
        if any(carried):
            headers[name] = {
                "description": text,
                "required": all(carried),
                "schema": {"type": "string"},
            }
    return headers


def _error_response(errors: list[type[ServiceError]], envelope: dict[str, Any]) -> dict[str, Any]:
    status = errors[0].status
    codes = ", ".join(dict.fromkeys(f"`{e.code}`" for e in errors))
    response: dict[str, Any] = {
        "description": f"{_REASONS.get(status, 'Error')}: {codes}",
        "content": {"application/json": {"schema": envelope}},
    }
    headers = _headers(errors)
    if headers:
        response["headers"] = headers
    return response


def _request_body(ep: Endpoint, refs: dict[Any, Any]) -> dict[str, Any] | None:
    if ep.passthrough is not None:
        return {
            "required": True,
            "description": "Forwarded to the upstream byte for byte (up to 16 MiB)",
            "content": {ep.passthrough: {"schema": {"type": "object"}}},
        }
    if ep.request is None:
        return None
    document = refs[ep.request]
    content: dict[str, Any] = {}
    if ep.upload is not None:
        content["multipart/form-data"] = {
            "schema": {
                "type": "object",
                "properties": {ep.upload: {"type": "array", "minItems": 1, "items": document}},
                "required": [ep.upload],
                "additionalProperties": False,
            },
            "encoding": {ep.upload: {"contentType": "application/json"}},
        }
    content["application/json"] = {"schema": document}
    return {"required": True, "content": content}


def _parameters(ep: Endpoint) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            # Starlette's default convertor: one or more characters, never a slash.
            "schema": {"type": "string", "minLength": 1, "pattern": "^[^/]+$"},
        }
        for name in path_parameters(ep.path)
    ]
    params += [
        {
            "name": n,
            "in": "query",
            "required": False,
            "description": d,
            "schema": ep.query_schema.get(n, {"type": "string"}),
        }
        for n, d in ep.query
    ]
    return params


def _security(ep: Endpoint) -> list[dict[str, list[str]]] | None:
    if ep.auth in ("session", "pending"):
        return [{"dashboardSession": []}]
    if ep.auth == "api_key":
        # Optional: with api_key_auth_enabled off, loopback and the configured client ranges
        # may call without a key (CONTRACT §7).
        return [{"apiKey": []}, {}]
    return None


def _operation(ep: Endpoint, refs: dict[Any, Any], envelope: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": ep.summary,
        "tags": [ep.tag],
        "operationId": ep.handler.__name__,
    }
    security = _security(ep)
    if security is not None:
        op["security"] = security
    params = _parameters(ep)
    if params:
        op["parameters"] = params
    body = _request_body(ep, refs)
    if body is not None:
        op["requestBody"] = body

    ok: dict[str, Any] = {"description": {201: "Created", 204: "No content"}.get(ep.status, "OK")}
    if ep.response is not None:
        ok["content"] = {"application/json": {"schema": refs[ep.response]}}
    elif ep.text is not None:
        ok["content"] = {ep.text: {"schema": {"type": "string"}}}
    if ep.headers:
        ok["headers"] = {
            h: {"description": d, "schema": {"type": "string"}} for h, d in ep.headers.items()
        }
    responses: dict[str, Any] = {str(ep.status): ok}
    for status, body_type in ep.other_responses.items():
        responses[str(status)] = {
            "description": _REASONS.get(status, "Other"),
            "content": {"application/json": {"schema": refs[body_type]}},
        }
    by_status: dict[int, list[type[ServiceError]]] = {}
    for error in (*ep.errors, *derived_errors(ep)):
        by_status.setdefault(error.status, []).append(error)
    for status in sorted(by_status):
        if str(status) not in responses:
            responses[str(status)] = _error_response(by_status[status], envelope)
    op["responses"] = responses
    return op


def build(endpoints: Iterable[Endpoint]) -> dict[str, Any]:
    endpoints = list(endpoints)
    types: list[Any] = [DashboardErrorEnvelope, OpenAIErrorEnvelope]
    for ep in endpoints:
        types += [t for t in (ep.request, ep.response, *ep.other_responses.values()) if t]
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    refs = dict(zip(types, schemas, strict=True))

    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        envelope = refs[OpenAIErrorEnvelope if is_proxy_path(ep.path) else DashboardErrorEnvelope]
        paths.setdefault(ep.path, {})[ep.method.lower()] = _operation(ep, refs, envelope)

    # The 405 of a method a path does not list is no answer of any of its operations: it is a
    # shared component, and each path item says which methods its Allow names.
    for path, item in paths.items():
        methods = {m.upper() for m in item}
        if "GET" in methods:
            methods.add("HEAD")  # Starlette serves HEAD wherever there is a GET
        envelope = "OpenAI" if is_proxy_path(path) else "dashboard"
        item["description"] = (
            f"Errors come in the {envelope} envelope. Any other method answers 405 "
            f"`method_not_allowed` with `Allow: {', '.join(sorted(methods))}`."
        )

    method_not_allowed = {
        name: _error_response([MethodNotAllowed], refs[envelope])
        for name, envelope in (
            ("MethodNotAllowed", DashboardErrorEnvelope),
            ("MethodNotAllowedOpenAI", OpenAIErrorEnvelope),
        )
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "codex-lb",
            "version": service.__version__,
            "description": (
                "Proxy routes (`/v1/*`, `/backend-api/*`) answer errors in the OpenAI envelope "
                "(`OpenAIErrorEnvelope`), every other route in the dashboard one "
                "(`DashboardErrorEnvelope`). A method a path does not list answers 405 with "
                "`Allow` (`components.responses.MethodNotAllowed`, or `MethodNotAllowedOpenAI` "
                "on proxy paths)."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "responses": method_not_allowed,
            "securitySchemes": {
                "dashboardSession": {"type": "apiKey", "in": "cookie", "name": "dashboard_session"},
                "apiKey": {"type": "http", "scheme": "bearer"},
            },
        },
    }


class OpenApiRoutes:
    """The ``/openapi.json`` route, describing itself along with everything else."""

    def __init__(self, endpoints: list[Endpoint]):
        self.endpoints = endpoints
        self._document = b""

    async def openapi_json(self, request: Request) -> Response:
        if not self._document:
            self._document = msgspec.json.encode(build(self.endpoints))
        return Response(self._document, media_type="application/json")


ENDPOINTS = [
    Endpoint(
        "GET",
        "/openapi.json",
        OpenApiRoutes.openapi_json,
        "This document",
        "operations",
        auth="none",
        store=False,
    ),
]
