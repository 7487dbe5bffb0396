"""The console's OpenAPI document is exact: schemathesis (every check) against a real
console process, as a superadmin proven by API key AND client certificate over mTLS.

Every operation of the document is generated for, valid and invalid inputs alike: what
the schema allows the console must accept, every answer must be a declared status with
its declared body and content type, a 405 must carry ``Allow``. Creating routes (groups,
admins, tokens, enrollment users, rotations...) are exercised by the same generation and
answer 201 with what they declare. Bounded by examples per operation, not by time.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import requests.adapters
import schemathesis
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from certgate.console import paging
from certgate.tunnel import rules
from tests.support import RunningConsole, init_console, make_csr, start_console

pytestmark = pytest.mark.integration

# What a schema cannot say, generated here as the console reads it: a page cursor is an
# opaque token the console wrote (any id-like key is one), an EST body a base64 DER CSR.
schemathesis.openapi.format(
    "page-cursor", st.from_regex(r"\A[0-9]{1,12}\Z").map(lambda key: paging.encode_cursor([key]))
)
_CSR_DER = x509.load_pem_x509_csr(make_csr()[0]).public_bytes(Encoding.DER)
schemathesis.openapi.media_type("application/pkcs10", st.just(base64.b64encode(_CSR_DER)))
schemathesis.openapi.media_type("application/x-pki-message", st.binary(max_size=64))

# The settings formats a regular expression cannot state (console.services.settings
# FORMATS: each is a parser's own function), generated here as those parsers accept them.
_LABEL = st.from_regex(r"\A[a-z](?:[a-z0-9-]{0,8}[a-z0-9])?\Z")
_DNS_NAMES = (
    st.lists(_LABEL, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda name: rules.canonical_name(name) is not None)
)
schemathesis.openapi.format("dns-name", _DNS_NAMES)
schemathesis.openapi.format(
    "host-pattern", st.one_of(st.just("*"), _DNS_NAMES, _DNS_NAMES.map("*.".__add__))
)
schemathesis.openapi.format(
    "ip-network",
    st.ip_addresses().flatmap(
        lambda ip: st.integers(0, ip.max_prefixlen).map(
            lambda bits: str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))
        )
    ),
)
schemathesis.openapi.format(
    "port-range",
    st.lists(st.integers(1, 65535), min_size=2, max_size=2).map(sorted).map("{0[0]}-{0[1]}".format),
)

# What no JSON Schema of one request can state, checked by the console as a declared 400
# (or 422) and kept out of the valid cases here (``_within_cross_field_rules``), so that
# every other rule of these bodies is held to positive acceptance like any operation:
# - group settings, merged with the stored ones (they change as this test runs): the
#   feed's long_poll_s at most half its max_staleness_s; a tunnel keeps a host name or an
#   IP address;
# - a compliance policy's rule ids are unique (an array of objects has no unique-by-key);
# - a node report's ``live_total`` is not smaller than its ``live`` list (a number against
#   an array's length).
# SCEP's PKIOperation takes a PKCS#7 message signed by the requester and enveloped for
# this console's RA: its validity is a signature and a decryption, which no schema can
# state, so only there a schema-valid message may be refused (400, declared). The SCEP
# refusals themselves are tested with Debian's scepclient (tests/integration).
# The snapshot cursor's length depends on ``format`` (64 or 96 hex digits), a dependency
# between two parameters that OpenAPI 3.1 cannot state either.
EXAMPLES = 12  # per operation and mode: ~1,200 requests, about a minute on a loaded machine
OPAQUE_INPUT = {"/scep", "/api/v1/tunnel/feed/snapshot"}


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningConsole]:
    """One SQLite console (the document does not depend on the store; schemathesis' lazy
    schema cannot sit under a parametrized fixture) with a superadmin ``root``."""
    work = tmp_path_factory.mktemp("openapi")
    data_dir, port = init_console(work)
    # schemathesis sends hundreds of refused credentials from one address: a budget that
    # lets it finish (the limit itself is tested in test_ratelimit.py).
    config = data_dir / "console.json"
    config.write_text(
        json.dumps({**json.loads(config.read_text()), "api_failures_per_address": 1_000_000})
    )
    running = start_console(work, data_dir, port)
    running.make_admin("root", "superadmin", "global")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def session(console: RunningConsole) -> Iterator[requests.Session]:
    creds = console.admins["root"]
    with requests.Session() as http:
        http.mount(console.url, _MTLSAdapter(console.ssl_context(creds.cert_path, creds.key_path)))
        http.headers["authorization"] = f"Bearer {creds.api_key}"
        yield http


class _MTLSAdapter(requests.adapters.HTTPAdapter):
    """The test client's TLS context (the console's chain, the admin's certificate)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs, ssl_context=self._context)


@pytest.fixture(scope="module")
def api(console: RunningConsole, session: requests.Session) -> Any:
    document = session.get(f"{console.url}/openapi.json", timeout=30).json()
    return schemathesis.openapi.from_dict(document)


def _operations(api: Any) -> list[Any]:
    return [result.ok() for result in api.get_all_operations()]


def _aim(case: Any, aimed: bool) -> Any:
    """Half the valid cases name the group that exists, so that they reach the handler's
    own checks instead of a 404 for a random group."""
    if aimed:
        for parameters in (case.path_parameters, case.query):
            if parameters and "group_id" in parameters:
                parameters["group_id"] = "global"
    return _within_cross_field_rules(case)


def _within_cross_field_rules(case: Any) -> Any:
    """A valid case kept within the rules listed above OPAQUE_INPUT (and only those)."""
    body, path = case.body, case.operation.path
    if not isinstance(body, dict):
        return case
    if path == "/api/v1/groups/{group_id}/settings":
        _settings_within(body)
    elif path == "/api/v1/groups" and isinstance(body.get("settings"), dict):
        _settings_within(body["settings"])
    elif path == "/api/v1/groups/{group_id}/compliance-policy":
        for index, rule in enumerate(body.get("rules") or []):
            rule["id"] = f"{rule['id'][:50]}-{index}"
    elif path == "/api/v1/tunnel/report":
        body["live_total"] = max(body["live_total"], len(body["live"]))
    return case


def _settings_within(settings: dict[str, Any]) -> None:
    feed = settings.get("feed")
    if isinstance(feed, dict):
        poll = feed.get("long_poll_s") or 25
        feed["long_poll_s"] = poll
        feed["max_staleness_s"] = max(feed.get("max_staleness_s") or 300, 2 * poll)
    tunnel = settings.get("tunnel")
    if isinstance(tunnel, dict) and not (tunnel.get("hostnames") or tunnel.get("ip_addresses")):
        if tunnel.get("hostnames") is not None or tunnel.get("ip_addresses") is not None:
            tunnel["hostnames"] = ["localhost"]


def _failure_of(operation: Any, mode: GenerationMode, url: str, http: requests.Session) -> str:
    """The first failure schemathesis finds on ``operation`` ("" if none), every check on."""
    excluded = [positive_data_acceptance] if operation.path in OPAQUE_INPUT else []

    cases = operation.as_strategy(mode)
    if mode is GenerationMode.POSITIVE:
        cases = st.tuples(cases, st.booleans()).map(lambda aimed: _aim(*aimed))

    @given(cases)
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    def exercise(case: Any) -> None:
        case.call_and_validate(url, http, excluded_checks=excluded, timeout=30)

    try:
        exercise()
    except Unsatisfiable:  # no input at all, so no invalid input to send
        assert mode is GenerationMode.NEGATIVE, operation.path
    except Exception as exc:
        return f"{operation.method.upper()} {operation.path}: {exc}"
    return ""


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_answers_as_documented(
    api: Any, console: RunningConsole, session: requests.Session, mode: GenerationMode
) -> None:
    operations = _operations(api)
    assert len(operations) >= 51  # the whole API: rotation, compliance, EST and SCEP too
    failures = [_failure_of(op, mode, console.url, session) for op in operations]
    assert not any(failures), "\n\n".join(f for f in failures if f)


def test_every_error_status_carries_the_shared_error_body(api: Any) -> None:
    document = api.raw_schema
    assert not [path for path in document["paths"] if path.startswith("/ui")]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, answer in operation["responses"].items():
                if int(status) < 400:
                    continue
                body = answer["content"]["application/json"]["schema"]
                assert body == {"$ref": "#/components/schemas/ErrorOut"}, (method, path, status)
    error = document["components"]["schemas"]["ErrorOut"]
    assert error["required"] == ["error", "detail"]
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_a_405_names_every_method_of_the_path(
    console: RunningConsole, session: requests.Session
) -> None:
    answer = session.request("OPTIONS", f"{console.url}/api/v1/groups", timeout=30)
    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET, POST"  # two routes, one path
    assert answer.json() == {"error": "method_not_allowed", "detail": "Method Not Allowed"}
    scep = session.request("PUT", f"{console.url}/scep", timeout=30)
    assert (scep.status_code, scep.headers["allow"]) == (405, "GET, POST")


def test_a_422_is_the_declared_error_body(
    console: RunningConsole, session: requests.Session
) -> None:
    answer = session.post(f"{console.url}/api/v1/admins", json={"role": ""}, timeout=30)
    assert answer.status_code == 422
    body = answer.json()
    assert body["error"] == "invalid_request"
    assert isinstance(body["detail"], str) and "body.role" in body["detail"]


def test_a_created_top_level_group_is_found_by_its_creator(
    console: RunningConsole, session: requests.Session
) -> None:
    """The link schemathesis follows: POST /groups, then GET /groups/{id} (was 201, 404)."""
    created = session.post(f"{console.url}/api/v1/groups", json={"id": "top-made"}, timeout=30)
    assert created.status_code == 201
    found = session.get(f"{console.url}/api/v1/groups/top-made", timeout=30)
    assert (found.status_code, found.json()["id"]) == (200, "top-made")
