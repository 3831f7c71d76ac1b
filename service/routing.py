"""One table of endpoints, from which both the Starlette routes and the OpenAPI document are made,
so a route cannot exist without being described."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    request: type[Any] | None = None
    response: type[Any] | None = None
    status: int = 200
    # "session": a full dashboard session; "none": public; "pending": a password-only session.
    auth: str = "session"
    errors: tuple[int, ...] = ()
    query: tuple[tuple[str, str], ...] = ()
    headers: dict[str, str] = field(default_factory=dict)


def build_routes(endpoints: Iterable[Endpoint]) -> list[Route]:
    by_path: dict[str, dict[str, Handler]] = {}
    for ep in endpoints:
        by_path.setdefault(ep.path, {})[ep.method] = ep.handler
    routes = []
    for path, handlers in by_path.items():

        def dispatch(handlers: dict[str, Handler]) -> Handler:
            async def endpoint(request: Request) -> Response:
                method = "GET" if request.method == "HEAD" else request.method
                return await handlers[method](request)

            return endpoint

        routes.append(Route(path, dispatch(handlers), methods=list(handlers)))
    return routes
