"""The console app's routing: routers are matched busiest first, which is only sound while
no path of one router can be matched by a route of another."""

from __future__ import annotations

import importlib
import pkgutil

from fastapi.routing import APIRoute

from certgate.console import api
from certgate.console.api import device as device_api
from certgate.console.app import ROUTERS


def _routes() -> list[tuple[str, APIRoute]]:
    return [
        (module.__name__, route)
        for module in ROUTERS
        for route in module.router.routes
        if isinstance(route, APIRoute)
    ]


def _could_match_the_same_path(a: APIRoute, b: APIRoute) -> bool:
    """Same number of segments, each equal or a path parameter in one of the two."""
    left, right = a.path.strip("/").split("/"), b.path.strip("/").split("/")
    return len(left) == len(right) and all(
        x == y or x.startswith("{") or y.startswith("{") for x, y in zip(left, right, strict=True)
    )


def test_every_router_is_included() -> None:
    """Every module of ``console.api`` that defines a router is served (a new one cannot be
    forgotten)."""
    modules = [
        importlib.import_module(f"{api.__name__}.{m.name}")
        for m in pkgutil.iter_modules(api.__path__)
    ]
    with_router = {module for module in modules if hasattr(module, "router")}
    assert set(ROUTERS) == with_router and len(with_router) >= 9
    assert ROUTERS[0] is device_api  # the busiest first


def test_no_route_overlaps_a_route_of_another_router() -> None:
    routes = _routes()
    assert all(":" not in route.path for _, route in routes)  # no converters spanning "/"
    overlaps = [
        (a.path, b.path)
        for i, (mod_a, a) in enumerate(routes)
        for mod_b, b in routes[i + 1 :]
        if mod_a != mod_b and a.methods & b.methods and _could_match_the_same_path(a, b)
    ]
    assert overlaps == []
