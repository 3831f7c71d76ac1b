"""/openapi.json describes every route, from the msgspec structs."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema_rs
from schemathesis.specs.openapi.definitions import OPENAPI_31
from starlette.routing import Route

from service.app import endpoints
from service.auth import guard
from service.proxy import gate
from service.ui.routes import UiRoutes
from tests.conftest import AppHarness

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
JSON = {"content-type": "application/json"}
TEXT = {"content-type": "text/plain"}


async def test_every_route_is_in_the_document(
    harness: AppHarness, client: httpx.AsyncClient
) -> None:
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    routes = [route for route in harness.app.routes if isinstance(route, Route)]
    assert routes
    # The one exception: the dashboard's page and files (service/ui) are not API routes, so
    # they are not in the document, and nothing else may be missing from it.
    ui_paths = set(UiRoutes().assets)
    assert "/" in ui_paths
    assert not ui_paths & set(doc["paths"])
    for route in routes:
        if route.path in ui_paths:
            continue
        assert route.path in doc["paths"], route.path
        for method in route.methods or ():
            if method != "HEAD":
                assert method.lower() in doc["paths"][route.path], (route.path, method)


async def test_schemas_come_from_the_structs(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    put = doc["paths"]["/api/settings"]["put"]
    ref = put["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert schema["required"] == ["sticky_threads_enabled", "prefer_earlier_reset_accounts"]
    assert set(schema["properties"]) >= {"routing_strategy", "api_key_auth_enabled"}
    strategy = doc["components"]["schemas"]["RoutingStrategy"]
    assert sorted(strategy["enum"]) == ["round_robin", "usage_weighted"]
    assert {"409", "422", "401"} <= set(put["responses"])
    assert "ETag" in put["responses"]["200"]["headers"]


# --- the document is valid OpenAPI 3.1 ----------------------------------------------------------


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in HTTP_METHODS:
                yield path, method, op


async def test_document_is_valid_openapi_3_1(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    # The OpenAPI Initiative's 3.1 schema, as schemathesis (a dev dependency) bundles it.
    validator = jsonschema_rs.Draft202012Validator(OPENAPI_31)
    assert [e.message for e in validator.iter_errors(doc)] == []
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name  # JSON Schema 2020-12


async def test_every_path_parameter_is_declared(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    templated_paths = 0
    for path, method, op in _operations(doc):
        templated = re.findall(r"{([^}:]+)", path)
        declared = [p for p in op.get("parameters", []) if p["in"] == "path"]
        assert sorted(p["name"] for p in declared) == sorted(templated), (method, path)
        assert all(p["required"] is True for p in declared), (method, path)
        templated_paths += bool(templated)
    assert templated_paths >= 5


async def test_json_body_routes_document_what_reading_the_body_answers(
    client: httpx.AsyncClient,
) -> None:
    doc = (await client.get("/openapi.json")).json()
    post = doc["paths"]["/api/api-keys"]["post"]
    responses = post["responses"]
    assert {"201", "400", "401", "403", "413", "415", "422", "500", "503"} <= set(responses)
    assert "invalid_json" in responses["400"]["description"]
    assert "csrf_rejected" in responses["403"]["description"]
    assert "store_unavailable" in responses["503"]["description"]
    for path, method, op in _operations(doc):
        body = op.get("requestBody", {})
        if "Forwarded to the upstream" in body.get("description", ""):
            # A forwarded body is the upstream's to judge: size (and JSON syntax) only.
            json_body = "application/json" in body["content"]
            assert {"413", *(["400"] if json_body else [])} <= set(op["responses"]), path
        elif "application/json" in body.get("content", {}):
            assert {"413", "415"} <= set(op["responses"]), (method, path)


async def test_import_documents_multipart_and_json(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    body = doc["paths"]["/api/accounts/import"]["post"]["requestBody"]
    assert body["required"] is True
    assert set(body["content"]) == {"multipart/form-data", "application/json"}
    form = body["content"]["multipart/form-data"]
    assert form["schema"]["required"] == ["auth_json"]
    parts = form["schema"]["properties"]["auth_json"]
    assert parts["type"] == "array"
    assert parts["minItems"] == 1
    # Each part is one auth.json, the same document the JSON variant sends.
    assert parts["items"] == body["content"]["application/json"]["schema"]
    assert form["encoding"]["auth_json"]["contentType"] == "application/json"


async def test_errors_are_documented_in_the_envelope_they_come_in(
    client: httpx.AsyncClient,
) -> None:
    doc = (await client.get("/openapi.json")).json()
    for path, method, op in _operations(doc):
        proxy = path.startswith(("/v1/", "/backend-api/"))
        envelope = "OpenAIErrorEnvelope" if proxy else "DashboardErrorEnvelope"
        assert "500" in op["responses"], (method, path)
        for status, response in op["responses"].items():
            if int(status) < 400 or (path, status) == ("/health/ready", "503"):
                continue
            schema = response["content"]["application/json"]["schema"]
            assert schema["$ref"].endswith(f"/{envelope}"), (method, path, status)
    # /health/ready answers "not ready" with its own body, not an error.
    ready = doc["paths"]["/health/ready"]["get"]["responses"]["503"]
    assert ready["content"]["application/json"]["schema"]["$ref"].endswith("/ReadyView")
    unauthorized = doc["paths"]["/v1/models"]["get"]["responses"]["401"]
    assert unauthorized["headers"]["WWW-Authenticate"]["required"] is True
    login = doc["paths"]["/api/dashboard-auth/password/login"]["post"]["responses"]["429"]
    assert login["headers"]["Retry-After"]["required"] is True


# --- what the document derives is what the service does ---------------------------------------


def test_each_endpoints_auth_is_the_one_its_gate_enforces() -> None:
    for ep in endpoints():
        if guard.requires_session(ep.path):
            assert ep.auth == "session", ep.path
        assert (ep.auth == "api_key") == gate.gated(ep.path), ep.path
        if ep.auth in ("session", "pending") and not guard.requires_session(ep.path):
            # Outside the guard's reach, the handler checks the session itself.
            assert ep.path.startswith("/api/dashboard-auth/"), ep.path


def _concrete(path: str) -> str:
    return re.sub(r"{[^}]+}", "x", path)


async def test_body_errors_the_document_derives_are_answered(admin: httpx.AsyncClient) -> None:
    doc = (await admin.get("/openapi.json")).json()
    checked = 0
    for ep in endpoints():
        documented = doc["paths"][ep.path][ep.method.lower()]["responses"]
        url = _concrete(ep.path)
        if ep.passthrough is not None:
            # Forwarded bodies are capped at 16 MiB; a JSON one must at least be JSON.
            r = await admin.request(ep.method, url, content=b"x" * (16 * 1024 * 1024 + 1))
            assert r.status_code == 413, (ep.path, r.status_code)
            if ep.passthrough == "application/json":
                r = await admin.request(ep.method, url, content=b"{", headers=JSON)
                assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_json")
        elif ep.request is not None and ep.upload is None and ep.auth != "pending":
            r = await admin.request(ep.method, url, content=b"{", headers=JSON)
            assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_json"), ep.path
            r = await admin.request(ep.method, url, content=b"{}", headers=TEXT)
            assert r.status_code == 415, ep.path
        elif ep.request is None and ep.method != "GET":
            # A route without a body still caps what it reads.
            r = await admin.request(ep.method, url, content=b"x" * (70 * 1024))
            assert r.status_code == 413, (ep.path, r.status_code)
        else:
            continue
        checked += 1
        assert str(r.status_code) in documented, (ep.method, ep.path, r.status_code)
    assert checked >= 10


async def test_method_not_allowed_carries_allow(admin: httpx.AsyncClient) -> None:
    """RFC 9110: a 405 names the methods the resource does support (HEAD wherever GET is)."""
    doc = (await admin.get("/openapi.json")).json()
    for path, item in doc["paths"].items():
        methods = {m.upper() for m in item if m in HTTP_METHODS}
        if "GET" in methods:
            methods.add("HEAD")
        r = await admin.request("TRACE", _concrete(path))
        assert r.status_code == 405, (path, r.status_code)
        assert set(r.headers["allow"].split(", ")) == methods, (path, r.headers["allow"])
        assert r.json()["error"]["code"] == "method_not_allowed"
        assert f"`Allow: {', '.join(sorted(methods))}`" in item["description"], path

    r = await admin.delete("/api/settings")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD, PUT"
    r = await admin.post("/v1/models")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"
    assert r.json()["error"]["type"] == "invalid_request_error"  # the OpenAI envelope
