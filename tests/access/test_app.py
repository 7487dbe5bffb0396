"""Access over real TLS, with its real cert proxy, in process; the console is a stand-in.

The end-to-end runs against a real console and real HAProxy are in
``tests/integration/test_access_haproxy.py``; these cover each refusal in detail.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from joserfc import jwt
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry

from certgate.access.config import TLSMode
from certgate.access.oidc import s256
from certgate.pki.identity import identity_of
from certgate.pki.thumbprint import thumbprint
from tests.access.harness import (
    CLIENT_ID,
    REDIRECT_URI,
    ConsolePKI,
    ConsoleStandIn,
    Installed,
    Leaf,
    PublicPKI,
    access_server,
    device_context,
    device_record,
    install_request,
    installed,
    proxy_server,
    wait_for_log,
)
from tests.support import free_port

VERIFIER = "v3r1f13r-" * 6


@dataclass
class Env:
    setup: Installed
    console: ConsoleStandIn
    public: PublicPKI
    issuer: str
    proxy_url: str

    @property
    def pki(self) -> ConsolePKI:
        return self.console.pki

    def access(self) -> httpx.Client:
        """A browser-like client of Access (no client certificate)."""
        trust = self.setup.material.install_root
        if self.setup.config.tls_mode is TLSMode.PASSTHROUGH:
            trust = self.public.root.cert
        return httpx.Client(base_url=self.issuer, verify=device_context(trust), timeout=30)

    def device(self, leaf: Leaf | None) -> httpx.Client:
        """The device's client for the cert proxy, presenting ``leaf``."""
        return httpx.Client(verify=device_context(self.public.root.cert, leaf), timeout=30)

    def enrolled(self, **changes: Any) -> Leaf:
        leaf = self.pki.device()
        uid = identity_of(leaf.cert).device_uid
        assert uid is not None
        self.console.devices[uid] = device_record(uid, **changes)
        return leaf


def make_env(tmp: Path, mode: TLSMode) -> tuple[Env, int, int]:
    access_port, proxy_port = free_port(), free_port()
    issuer = f"https://127.0.0.1:{access_port}"
    proxy_url = f"https://127.0.0.1:{proxy_port}"
    public = PublicPKI.create()
    pki = ConsolePKI()
    request = install_request(
        pki, public, mode=mode, issuer=issuer, certproxy_url=proxy_url, port=access_port
    )
    setup = installed(tmp, request)
    # Ask the (stand-in) console every time, so each test sees the state it set up.
    setup = Installed(dataclasses.replace(setup.config, status_ttl_s=0.0), setup.material)
    return Env(setup, ConsoleStandIn(pki), public, issuer, proxy_url), access_port, proxy_port


@pytest.fixture(scope="module", params=[TLSMode.OFFLOAD, TLSMode.PASSTHROUGH], ids=str)
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    built, access_port, proxy_port = make_env(tmp_path_factory.mktemp("access"), request.param)
    with (
        access_server(built.setup, built.console, access_port),
        proxy_server(built.setup, access_port, port=proxy_port, offload_port=None),
    ):
        yield built


def authorize(env: Env, **changes: str) -> httpx.Response:
    params = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "scope": "openid",
        "state": "state-1",
        "nonce": "nonce-1",
        "code_challenge": s256(VERIFIER),
        "code_challenge_method": "S256",
        **changes,
    }
    with env.access() as client:
        return client.get("/authorize", params=params)


def cert_step(env: Env, leaf: Leaf | None) -> dict[str, list[str]]:
    """Follow /authorize to the cert proxy; return the query Access redirected back with."""
    location = authorize(env).headers["location"]
    assert location.startswith(f"{env.proxy_url}/authorize/cert?req=")
    with env.device(leaf) as device:
        response = device.get(location)
    assert response.status_code == 302, response.text
    back = response.headers["location"]
    assert back.startswith(REDIRECT_URI + "?")
    return parse_qs(urlsplit(back).query)


def redeem(env: Env, code: str, verifier: str = VERIFIER) -> httpx.Response:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "client_id": CLIENT_ID,
        "code_verifier": verifier,
    }
    with env.access() as client:
        return client.post("/token", data=form)


def test_discovery_and_jwks(env: Env) -> None:
    with env.access() as client:
        doc = client.get("/.well-known/openid-configuration").json()
        jwks = client.get("/jwks.json").json()
    assert doc["issuer"] == env.issuer and doc["jwks_uri"] == f"{env.issuer}/jwks.json"
    assert [k["alg"] for k in jwks["keys"]] == ["ES256"]
    assert "d" not in jwks["keys"][0]


def test_health_liveness_and_unknown_paths_answer_json(env: Env) -> None:
    with env.access() as client:
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["warnings"] == []
        names = [c["name"] for c in health["certificates"]]
        assert names[:4] == ["access-tls", "certproxy-client", "public-tls", "access-install-root"]
        assert client.get("/livez").json() == {"status": "alive"}
        missing = client.get("/no-such-path")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/json"


def _signin_failures(env: Env, method: str) -> float:
    with env.access() as client:
        response = client.get("/metrics")
    assert response.status_code == 200, response.text
    text = response.text
    assert 'certgate_build_info{service="access",version=' in text
    assert "process_open_fds " in text
    assert 'route="/token"' in text  # seeded before the first token request of a module
    match = re.search(rf'certgate_signin_failures_total\{{method="{method}"\}} (\S+)', text)
    assert match is not None
    return float(match.group(1))


def test_metrics_count_sign_in_failures(env: Env) -> None:
    device, oidc_ = _signin_failures(env, "device"), _signin_failures(env, "oidc")
    assert cert_step(env, None)["error"] == ["access_denied"]
    assert redeem(env, "not-a-code").status_code == 400
    assert _signin_failures(env, "device") == device + 1
    assert _signin_failures(env, "oidc") == oidc_ + 1


def test_an_enrolled_compliant_device_gets_an_id_token(env: Env) -> None:
    leaf = env.enrolled()
    query = cert_step(env, leaf)
    assert query["state"] == ["state-1"] and query["iss"] == [env.issuer]
    response = redeem(env, query["code"][0])
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    with env.access() as client:
        keys = KeySet.import_key_set(client.get("/jwks.json").json())
    token = jwt.decode(body["id_token"], keys, algorithms=["ES256"])
    JWTClaimsRegistry(
        iss={"essential": True, "value": env.issuer},
        aud={"essential": True, "value": CLIENT_ID},
        nonce={"essential": True, "value": "nonce-1"},
    ).validate(token.claims)
    assert token.claims["sub"] == identity_of(leaf.cert).device_uid
    assert token.claims["cert_thumbprint"] == thumbprint(leaf.cert)
    assert token.claims["owner"] == "alice" and token.claims["compliance"] == "compliant"
    again = redeem(env, query["code"][0])
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


@pytest.mark.parametrize("name", ["Client-Cert", "client_cert", "Client-Cert-Chain"])
def test_client_cert_header_straight_to_access_is_refused_and_logged(
    env: Env, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    leaf = env.enrolled()
    forged = ":" + base64.b64encode(leaf.cert.public_bytes(Encoding.DER)).decode() + ":"
    with caplog.at_level(logging.WARNING, "certgate.access"), env.access() as client:
        response = client.get("/authorize/cert", params={"req": "x"}, headers={name: forged})
    assert response.status_code == 403
    assert response.json()["error"] == "client_cert_not_accepted"
    assert "accepted only from the cert proxy" in response.json()["error_description"]
    wait_for_log(lambda: caplog.records, "not the cert proxy")


def test_the_certificate_step_is_only_reachable_through_the_proxy(env: Env) -> None:
    with env.access() as client:
        response = client.get("/authorize/cert", params={"req": "x"})
    assert response.status_code == 403
    assert env.proxy_url in response.json()["error_description"]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"compliance_status": "noncompliant"}, "device is not compliant (status: noncompliant)"),
        ({"blocked": True}, "device is blocked"),
        ({"enrollment_status": "unenrolled"}, "device is unenrolled, not enrolled"),
    ],
)
def test_a_device_the_console_does_not_vouch_for_is_denied(
    env: Env, changes: dict[str, Any], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "certgate.access"):
        query = cert_step(env, env.enrolled(**changes))
    assert query["error"] == ["access_denied"] and query["error_description"] == [reason]
    assert query["state"] == ["state-1"] and "code" not in query
    wait_for_log(lambda: caplog.records, reason)


def test_a_revoked_certificate_is_denied(env: Env) -> None:
    leaf = env.enrolled()
    env.console.revoked.add(leaf.cert.serial_number)
    query = cert_step(env, leaf)
    assert query["error"] == ["access_denied"]
    assert "certificate is revoked" in query["error_description"][0]


def test_no_certificate_at_all_is_denied(env: Env) -> None:
    query = cert_step(env, None)
    assert query["error"] == ["access_denied"]
    assert query["error_description"] == ["no device certificate was presented to the cert proxy"]


def test_unknown_device_is_denied(env: Env) -> None:
    query = cert_step(env, env.pki.device())
    assert query["error"] == ["access_denied"]
    assert "not known to the console" in query["error_description"][0]


def test_a_certificate_from_another_ca_fails_the_handshake(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = ConsolePKI().device()
    location = authorize(env).headers["location"]
    with (
        caplog.at_level(logging.WARNING, "certgate.certproxy"),
        env.device(stranger) as device,
        pytest.raises(httpx.TransportError, match="unknown ca"),
    ):
        device.get(location)
    wait_for_log(lambda: caplog.records, "client certificate rejected")


def test_console_unreachable_fails_closed(env: Env) -> None:
    leaf = env.enrolled()
    env.console.down = True
    try:
        query = cert_step(env, leaf)
    finally:
        env.console.down = False
    assert query["error"] == ["access_denied"]
    assert "device status is unavailable" in query["error_description"][0]
    assert "failing closed" in query["error_description"][0]


def test_authorize_accepts_a_form_post(env: Env) -> None:
    form = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "scope": "openid",
        "state": "s",
        "nonce": "n",
        "code_challenge": s256(VERIFIER),
        "code_challenge_method": "S256",
    }
    with env.access() as client:
        response = client.post("/authorize", data=form)
    assert response.status_code == 302
    assert response.headers["location"].startswith(f"{env.proxy_url}/authorize/cert?req=")


def test_unknown_client_is_shown_not_redirected(env: Env) -> None:
    response = authorize(env, client_id="evil")
    assert response.status_code == 400 and "location" not in response.headers
    assert response.json() == {"error": "invalid_request", "error_description": "unknown client_id"}


def test_missing_pkce_is_redirected_as_an_error(env: Env) -> None:
    response = authorize(env, code_challenge_method="plain")
    assert response.status_code == 302
    query = parse_qs(urlsplit(response.headers["location"]).query)
    assert query["error"] == ["invalid_request"] and query["state"] == ["state-1"]


def test_wrong_verifier_is_invalid_grant(env: Env) -> None:
    query = cert_step(env, env.enrolled())
    response = redeem(env, query["code"][0], verifier="x" * 43)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def test_token_endpoint_takes_only_form_bodies(env: Env) -> None:
    with env.access() as client:
        response = client.post("/token", json={"grant_type": "authorization_code"})
        huge = client.post(
            "/token",
            content=urlencode({"code": "x" * 9000}),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    assert response.status_code == 400 and "x-www-form-urlencoded" in response.text
    assert huge.status_code == 413


def test_access_presents_the_certificate_of_its_mode(env: Env) -> None:
    der = ssl.get_server_certificate(("127.0.0.1", int(env.issuer.rsplit(":", 1)[1])))
    presented = ssl.PEM_cert_to_DER_cert(der)
    expected = (
        env.public.leaf.cert
        if env.setup.config.tls_mode is TLSMode.PASSTHROUGH
        else env.setup.material.access_cert
    )
    assert presented == expected.public_bytes(Encoding.DER)
