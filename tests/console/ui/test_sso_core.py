"""Single sign-on pieces without a provider: settings, the sealed flow cookie, ID token
verification (real ES256 signatures by joserfc) and the claim -> admin decision. The whole
flow against a real provider in a real browser: tests/integration/test_web_sso.py."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey

from certgate.console.config import SSOConfig
from certgate.console.services import sso
from certgate.console.sso_secret import SealedSecret
from certgate.errors import AuthError, ConfigError
from certgate.pki.keystore import MasterKey

ISSUER = "https://idp.example.com"
SETTINGS: dict[str, Any] = {"issuer": ISSUER, "client_id": "console", "admins": {"a@x": "ops"}}
MASTER = MasterKey(os.urandom(32))


def test_the_client_secret_is_refused_in_console_json() -> None:
    with pytest.raises(ConfigError, match="must not be in console"):
        SSOConfig.parse({**SETTINGS, "client_secret": "s3cret"})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"issuer": "http://idp.example.com"}, "https://"),
        ({"admins": {}}, "admins"),
        ({"scope": "email"}, "openid"),
        ({"admin_claim": "a b"}, "claim name"),
        (
            {"client_secret_env": "X", "client_secret_file": "/f"},
            "one source, not client_secret_env and client_secret_file",
        ),
        (
            {"client_secret_sealed": True, "client_secret_env": "X"},
            "one source, not client_secret_sealed and client_secret_env",
        ),
        (
            {"client_secret_sealed": True, "client_secret_file": "/f"},
            "one source, not client_secret_sealed and client_secret_file",
        ),
        (
            {"client_secret_sealed": True, "client_secret_env": "X", "client_secret_file": "/f"},
            "one source, not client_secret_sealed and client_secret_env and client_secret_file",
        ),
        ({"client_secret_sealed": "yes"}, "client_secret_sealed must be true or false"),
        ({"unknown": 1}, "unexpected keyword"),
    ],
)
def test_invalid_settings_are_refused_at_startup(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SSOConfig.parse({**SETTINGS, **change})


def test_the_secret_comes_from_its_one_source_or_none_for_a_public_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sealed = SealedSecret(tmp_path / "sso-client-secret.sealed", MASTER)
    sealed.write("from-sealed")  # there, but only the sealed source reads it
    assert SSOConfig.parse(SETTINGS).client_secret(sealed) is None  # a public client
    from_env = SSOConfig.parse({**SETTINGS, "client_secret_env": "CG_TEST_SSO_SECRET"})
    with pytest.raises(ConfigError, match="unset"):
        from_env.client_secret(sealed)
    monkeypatch.setenv("CG_TEST_SSO_SECRET", "from-env")
    assert from_env.client_secret(sealed) == "from-env"
    path = tmp_path / "secret"
    path.write_text("from-file\n")
    path.chmod(0o644)
    from_file = SSOConfig.parse({**SETTINGS, "client_secret_file": str(path)})
    with pytest.raises(ConfigError, match="0600"):
        from_file.client_secret(sealed)
    path.chmod(0o600)
    assert from_file.client_secret(sealed) == "from-file"
    from_sealed = SSOConfig.parse({**SETTINGS, "client_secret_sealed": True})
    assert from_sealed.client_secret(sealed) == "from-sealed"
    sealed.remove()
    with pytest.raises(ConfigError, match="missing"):
        from_sealed.client_secret(sealed)


def test_a_sealed_flow_opens_only_for_its_purpose_unexpired_and_untouched() -> None:
    now = time.time()
    flow = sso.new_flow(now)
    payload = {"state": flow.state, "nonce": flow.nonce, "verifier": flow.verifier}
    value = sso.seal(MASTER, "flow", {**payload, "expires": flow.expires})
    assert flow.verifier not in value and flow.state not in value
    assert sso.flow_of(sso.open_sealed(MASTER, "flow", value, now)) == flow
    for purpose, cookie, at, message in (
        ("totp", value, now, "does not open"),
        ("flow", value[:-2] + ("00" if value[-2:] != "00" else "11"), now, "does not open"),
        ("flow", value, flow.expires + 1, "expired"),
        ("flow", None, now, "no single sign-on"),
        ("flow", "zz", now, "does not open"),
    ):
        with pytest.raises(AuthError, match=message):
            sso.open_sealed(MASTER, purpose, cookie, at)
    with pytest.raises(AuthError, match="does not open"):
        sso.open_sealed(MasterKey(os.urandom(32)), "flow", value, now)


def _claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "console", "sub": "1", "nonce": "n1", "iat": now}
    return {**claims, "exp": now + 60, **changes}


KEY = ECKey.generate_key("P-256", private=True)
JWKS = {"keys": [{**KEY.as_dict(private=False), "kid": "k1"}]}


def _signed(claims: dict[str, Any]) -> str:
    return jwt.encode({"alg": "ES256", "kid": "k1"}, claims, KEY, algorithms=["ES256"])


def test_an_id_token_verifies_with_the_providers_key_issuer_audience_and_nonce() -> None:
    config = SSOConfig.parse(SETTINGS)
    claims = sso.verify_id_token(config, ISSUER, _signed(_claims()), JWKS, "n1")
    assert claims["sub"] == "1"
    for token, message in (
        (_signed(_claims(nonce="n2")), "nonce"),
        (_signed(_claims(aud="another")), "aud"),
        (_signed(_claims(iss="https://evil.example")), "iss"),
        (_signed(_claims(exp=int(time.time()) - 600)), "expired"),
        (_signed(_claims(aud=["console", "other"], azp="other")), "azp"),
    ):
        with pytest.raises(AuthError, match=message):
            sso.verify_id_token(config, ISSUER, token, JWKS, "n1")


def test_an_id_token_signed_with_another_key_or_a_symmetric_algorithm_is_refused() -> None:
    config = SSOConfig.parse(SETTINGS)
    other = ECKey.generate_key("P-256", private=True)
    forged = jwt.encode({"alg": "ES256", "kid": "k1"}, _claims(), other, algorithms=["ES256"])
    secret = OctKey.import_key(b"k" * 32)
    symmetric = jwt.encode({"alg": "HS256"}, _claims(), secret, algorithms=["HS256"])
    for token in (forged, symmetric):
        with pytest.raises(AuthError, match="ID token refused"):
            sso.verify_id_token(config, ISSUER, token, JWKS, "n1")
