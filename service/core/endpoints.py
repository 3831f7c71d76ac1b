"""One table of endpoints, from which both the Starlette routes and the OpenAPI document are made,
so a route cannot exist without being described.

A feature's routes are methods of one object that receives what they use when the app is wired
(its store, its live copy, ...): no handler reaches into a global for anything. The table names
those methods unbound, so it exists without a running process (the OpenAPI document, the tests
that compare the gates with it); ``build_routes`` binds each to the object that owns it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.core.errors import ServiceError

Handler = Callable[[Request], Awaitable[Response]]
# A routes object's method, unbound: called with the object, then the request.
Method = Callable[[Any, Request], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    """One route. Path parameters come from the ``{name}`` templates in ``path``, and the errors
    that follow from the route's shape (its gate, its body, Redis) are added by ``openapi``:
    ``errors`` lists only the errors particular to the route."""

    method: str
    path: str
    handler: Method
    summary: str
    tag: str
    # The JSON body; with ``upload`` set, the document each uploaded part carries instead.
    request: type[Any] | None = None
    response: type[Any] | None = None
    # A text answer of this media type instead of a JSON document (``/metrics``).
    text: str | None = None
    status: int = 200
    # "session": a full dashboard session; "none": public; "pending": a password-only session;
    # "api_key": the proxy's API-key gate.
    auth: str = "session"
    errors: tuple[type[ServiceError], ...] = ()
    query: tuple[tuple[str, str], ...] = ()
    # JSON schemas of query parameters the handler checks more strictly than "a string" (the
    # document says what is accepted, so a valid-looking value is never refused).
    query_schema: dict[str, dict[str, Any]] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    # Multipart part name: the body is one or more such parts, each a ``request`` document, or
    # one ``request`` document sent as JSON.
    upload: str | None = None
    # A body forwarded to the upstream as the client sent it, of this media type: documented as
    # an open document (the upstream judges it), capped in size; ``request`` stays None.
    passthrough: str | None = None
    # Served on the proxy's fast lane (``proxy.lane``): straight from the outermost middleware
    # to the handler, past the router and the dashboard's middleware (the streaming routes).
    lane: bool = False
    # The handler reads or writes Redis, so an outage answers 503 ``store_unavailable``.
    store: bool = True
    # Answers with a body of their own rather than an error envelope (/health/ready's 503).
    other_responses: dict[int, type[Any]] = field(default_factory=dict)


def bind(ep: Endpoint, owners: Iterable[object]) -> Handler:
    """``ep``'s handler bound to the routes object whose class defines it."""
    for owner in owners:
        if vars(type(owner)).get(ep.handler.__name__) is ep.handler:
            return partial(ep.handler, owner)
    raise LookupError(f"no routes object serves {ep.method} {ep.path}")


def lane_handlers(
    endpoints: Iterable[Endpoint], owners: Iterable[object]
) -> dict[tuple[str, str], Handler]:
    """The fast-lane routes, by (method, path): exact paths only, no parameters."""
    owners = list(owners)
    return {(ep.method, ep.path): bind(ep, owners) for ep in endpoints if ep.lane}


def build_routes(endpoints: Iterable[Endpoint], owners: Iterable[object]) -> list[Route]:
    owners = list(owners)
    by_path: dict[str, dict[str, Handler]] = {}
    for ep in endpoints:
        by_path.setdefault(ep.path, {})[ep.method] = bind(ep, owners)
    routes = []
    for path, handlers in by_path.items():

        def dispatch(handlers: dict[str, Handler]) -> Handler:
            async def endpoint(request: Request) -> Response:
                method = "GET" if request.method == "HEAD" else request.method
                return await handlers[method](request)

            return endpoint

        routes.append(Route(path, dispatch(handlers), methods=list(handlers)))
    return routes
