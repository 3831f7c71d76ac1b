"""One table of endpoints, from which both the Starlette routes and the OpenAPI document are made,
so a route cannot exist without being described."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.errors import ServiceError

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    """One route. Path parameters come from the ``{name}`` templates in ``path``, and the errors
    that follow from the route's shape (its gate, its body, Redis) are added by ``openapi``:
    ``errors`` lists only the errors particular to the route."""

    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    # The JSON body; with ``upload`` set, the document each uploaded part carries instead.
    request: type[Any] | None = None
    response: type[Any] | None = None
    status: int = 200
    # "session": a full dashboard session; "none": public; "pending": a password-only session;
    # "api_key": the proxy's API-key gate.
    auth: str = "session"
    errors: tuple[type[ServiceError], ...] = ()
    query: tuple[tuple[str, str], ...] = ()
    headers: dict[str, str] = field(default_factory=dict)
    # Multipart part name: the body is one or more such parts, each a ``request`` document, or
    # one ``request`` document sent as JSON.
    upload: str | None = None
    # The handler reads or writes Redis, so an outage answers 503 ``store_unavailable``.
    store: bool = True
    # Answers with a body of their own rather than an error envelope (/health/ready's 503).
    other_responses: dict[int, type[Any]] = field(default_factory=dict)


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
