"""Prometheus metrics of an HTTP service (console, Access): one registry per app, so tests
run several in a process. The tunnel keeps its own (``tunnel/metrics.py``).

Names follow the Prometheus conventions: a ``certgate_`` prefix, the unit in the name
(``_seconds``), ``_total`` on counters (prometheus-client appends it). Every labelled
counter has its known label values at 0 from the start, so a rate() over the first event is
right and an alert on absence is possible: requests by each status their route declares
(its OpenAPI ``responses``), failures by kind, sign-in failures by method. Requests are
labelled by route *template* (``/api/v1/devices/{uid}``), never by raw path: a scanner
cannot grow the series count.

``/metrics`` answers only on loopback (scrape from the host, or through a local agent): the
console's is on its API port, and route counts and sign-in failures are for operators.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from certgate import __version__
from certgate.httperrors import FAILURE_KINDS, Failure
from certgate.pki.expiry import CertificateInUse

__all__ = [
    "UNMATCHED",
    "CertificateCollector",
    "HttpMetrics",
    "MetricsMiddleware",
    "RouteSeries",
    "loopback",
    "metrics_endpoint",
    "route_templates",
    "service_registry",
]

UNMATCHED = "unmatched"  # the route label of a request no route matched (404s, scans)
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
UNMATCHED_STATUSES = (404, 405)  # no such path; a path without that method


class RouteSeries(NamedTuple):
    """The request series of one route: its template, methods and the statuses it declares."""

    route: str
    methods: Iterable[str]
    statuses: Iterable[int] = (200,)


SIGNIN_FAILURES = ("web", "api")  # the console's: its sign-in form; an API credential (401)


def service_registry(service: str) -> CollectorRegistry:
    """A registry with what every certgate process exports: process metrics (open fds,
    memory, CPU: file descriptors are the tunnel's known limit) and the build."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    build = Gauge(
        "certgate_build_info", "The running build", ["service", "version"], registry=registry
    )
    build.labels(service, __version__).set(1)
    return registry


class HttpMetrics:
    """The metrics of one service: requests by route and status, latency, failures by kind,
    sign-in failures, process metrics and the build."""

    def __init__(
        self,
        service: str,
        routes: Iterable[RouteSeries],
        signin_methods: Iterable[str] = SIGNIN_FAILURES,
    ) -> None:
        self.registry = service_registry(service)
        self.requests = Counter(
            "certgate_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "certgate_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template",
            ["route", "method"],
            registry=self.registry,
        )
        self.failures = Counter(
            "certgate_server_failures",
            "Requests no handler mapped: storage (database, disk) or unexpected",
            ["kind"],
            registry=self.registry,
        )
        self.signin_failures = Counter(
            "certgate_signin_failures",
            "Failed authentications (console: web, api; Access: device refused, oidc error)",
            ["method"],
            registry=self.registry,
        )
        for kind in FAILURE_KINDS:
            self.failures.labels(kind)
        for method in signin_methods:
            self.signin_failures.labels(method)
        self.seed([*routes, RouteSeries(UNMATCHED, METHODS, UNMATCHED_STATUSES)])

    def seed(self, routes: Iterable[RouteSeries]) -> None:
        """Series at 0 for each route, method and status the route declares."""
        for route, methods, statuses in routes:
            for method in set(methods) & set(METHODS):  # HEAD follows GET; not counted apart
                self.latency.labels(route, method)
                for status in statuses:
                    self.requests.labels(route, method, str(status))

    def failed(self, failure: Failure) -> None:
        """For :class:`~certgate.httperrors.ErrorShield`'s ``on_failure``."""
        self.failures.labels(failure.kind).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class CertificateCollector(Collector):
    """The certificates a service presents or trusts (``pki.expiry``), read at scrape time:
    seconds to expiry, and 1 while one is within its renewal window."""

    def __init__(self, certificates: Callable[[], Iterable[CertificateInUse]]) -> None:
        self._certificates = certificates

    def collect(self) -> Iterator[Metric]:
        expires = GaugeMetricFamily(
            "certgate_certificate_expires_seconds",
            "Seconds until a certificate the service presents or trusts expires",
            labels=["certificate"],
        )
        due = GaugeMetricFamily(
            "certgate_certificate_renewal_due",
            "1 while a certificate in use is within its renewal window",
            labels=["certificate"],
        )
        for cert in self._certificates():
            expires.add_metric([cert.name], cert.expires_in_s)
            due.add_metric([cert.name], 1 if cert.renewal_due else 0)
        yield expires
        yield due


class MetricsMiddleware:
    """ASGI: count and time every HTTP request by the route that served it."""

    def __init__(self, app: Any, metrics: HttpMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def watched(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            route = getattr(scope.get("route"), "path", UNMATCHED)
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - start)
            self.metrics.requests.labels(route, method, str(status)).inc()


def route_templates(*routers: Any) -> list[RouteSeries]:
    """The series of the plain routes of apps or routers: path template, methods, and the
    statuses a route declares (FastAPI's ``status_code`` and ``responses``, what its OpenAPI
    operation lists; 200 for a route that declares none). A router included in an app is
    listed by passing it too (FastAPI wraps included routers); routes not listed get their
    series at their first request."""
    return [
        RouteSeries(route.path, route.methods, _declared_statuses(route))
        for router in routers
        for route in router.routes
        if isinstance(getattr(route, "path", None), str) and getattr(route, "methods", None)
    ]


def _declared_statuses(route: Any) -> list[int]:
    declared = {int(getattr(route, "status_code", None) or 200)}
    for status in getattr(route, "responses", None) or {}:
        if str(status).isdigit():  # not "default" nor a range such as "4XX"
            declared.add(int(status))
    return sorted(declared)


def metrics_endpoint(metrics: HttpMetrics) -> Any:
    """The ``/metrics`` handler: the exposition to a loopback client, 403 to anyone else."""

    def handler(request: Request) -> Response:
        host = request.client.host if request.client else ""
        if not loopback(host):
            detail = "/metrics answers on loopback only; scrape from the service's host"
            return JSONResponse({"error": "forbidden", "detail": detail}, status_code=403)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return handler


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
