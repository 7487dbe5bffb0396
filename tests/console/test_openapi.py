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
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import requests.adapters
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from certgate.console import paging
from tests.support import RunningConsole, init_console, make_csr, start_console

pytestmark = pytest.mark.integration

# What a schema cannot say, generated here as the console reads it: a page cursor is an
# opaque token the console wrote (any id-like key is one), an EST body a base64 DER CSR.
schemathesis.openapi.format(
    "page-cursor", st.from_regex(r"\A[0-9]{1,12}\Z").map(lambda key: paging.encode_cursor([key]))
)
_CSR = base64.b64encode(make_csr()[0].replace(b"\n", b"")).decode()
schemathesis.openapi.media_type("application/pkcs10", st.just(_CSR.encode()))
schemathesis.openapi.media_type("application/x-pki-message", st.binary(max_size=64))

# SCEP's PKIOperation takes a PKCS#7 message signed by the requester and enveloped for
# this console's RA: its validity is a signature and a decryption, which no schema can
# state, so only there a schema-valid message may be refused (400, declared). The SCEP
# refusals themselves are tested with Debian's scepclient (tests/integration).
OPAQUE_INPUT = {"/scep"}


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningConsole]:
    """One SQLite console (the document does not depend on the store; schemathesis' lazy
    schema cannot sit under a parametrized fixture) with a superadmin ``root``."""
    work = tmp_path_factory.mktemp("openapi")
    running = start_console(work, *init_console(work))
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


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_answers_as_documented(
    api: Any, console: RunningConsole, session: requests.Session, mode: GenerationMode
) -> None:
    failures: list[str] = []
    operations = _operations(api)
    assert len(operations) > 40  # the whole API, EST and SCEP included
    for operation in operations:
        excluded = [positive_data_acceptance] if operation.path in OPAQUE_INPUT else []

        @given(operation.as_strategy(mode))
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
        def exercise(case: Any) -> None:
            case.call_and_validate(
                console.url, session, excluded_checks=excluded, timeout=30  # noqa: B023
            )

        try:
            exercise()
        except Unsatisfiable:  # an operation with no input has no invalid input to send
            assert mode is GenerationMode.NEGATIVE, operation.path
        except Exception as exc:  # every operation's first failure, reported together
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)
