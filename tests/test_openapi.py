"""/openapi.json describes every route, from the msgspec structs."""

from __future__ import annotations

import httpx
from starlette.routing import Route

from tests.conftest import AppHarness


async def test_every_route_is_in_the_document(
    harness: AppHarness, client: httpx.AsyncClient
) -> None:
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    routes = [route for route in harness.app.routes if isinstance(route, Route)]
    assert routes
    for route in routes:
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
