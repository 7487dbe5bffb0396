"""The OpenID Connect core without I/O: request validation, PKCE, transactions, ID tokens."""

from __future__ import annotations

import base64
from urllib.parse import parse_qs, quote_plus, urlsplit

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jwt
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry

from certgate.access.config import ClientRegistration
from certgate.access.oidc import (
    AuthorizationRequest,
    AuthorizeError,
    ClientCredentials,
    DeviceGrant,
    IdTokenSigner,
    OAuthError,
    TokenRequest,
    Transaction,
    TransactionStore,
    TxState,
    authenticate_client,
    basic_credentials,
    code_redirect,
    discovery_document,
    error_redirect,
    id_token_claims,
    parse_authorization_request,
    parse_token_request,
    s256,
    secret_hash,
)

ISSUER = "https://access.example.com"
CLIENT = ClientRegistration("com.example.mail", ("com.example.mail:/cb", "https://app.example/cb"))
CLIENTS = {CLIENT.client_id: CLIENT}
# RFC 7636 Appendix B.
VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
GRANT = DeviceGrant("a" * 32, "android", "android", "alice", "compliant", "ab" * 32, 1_700_000_000)


def params(**changes: str | None) -> list[tuple[str, str]]:
    base: dict[str, str | None] = {
        "response_type": "code",
        "client_id": CLIENT.client_id,
        "redirect_uri": "com.example.mail:/cb",
        "scope": "openid profile",
        "state": "st-1",
        "nonce": "n-1",
        "code_challenge": CHALLENGE,
        "code_challenge_method": "S256",
    }
    base.update(changes)
    return [(k, v) for k, v in base.items() if v is not None]


def test_s256_matches_rfc7636_appendix_b() -> None:
    assert s256(VERIFIER) == CHALLENGE


def test_valid_request_parses() -> None:
    request = parse_authorization_request(params(), CLIENTS)
    assert request == AuthorizationRequest(
        CLIENT.client_id, "com.example.mail:/cb", ("openid", "profile"), "st-1", "n-1", CHALLENGE
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"client_id": "evil"}, "unknown client_id"),
        ({"client_id": None}, "unknown client_id"),
        ({"redirect_uri": "https://evil.example/cb"}, "not registered"),
        ({"redirect_uri": "com.example.mail:/cb/"}, "not registered"),  # exact match only
        ({"redirect_uri": None}, "not registered"),
    ],
)
def test_untrusted_client_or_redirect_is_never_redirected(
    changes: dict[str, str | None], message: str
) -> None:
    with pytest.raises(AuthorizeError, match=message) as caught:
        parse_authorization_request(params(**changes), CLIENTS)
    assert caught.value.redirect_uri is None


def test_duplicate_parameter_is_refused_before_anything_else() -> None:
    with pytest.raises(AuthorizeError, match="more than once") as caught:
        parse_authorization_request([*params(), ("state", "other")], CLIENTS)
    assert caught.value.redirect_uri is None


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"response_type": "token"}, "unsupported_response_type", "response_type=code"),
        ({"scope": "profile"}, "invalid_scope", "openid"),
        ({"code_challenge_method": "plain"}, "invalid_request", "S256"),
        ({"code_challenge_method": None}, "invalid_request", "PKCE is required"),
        ({"code_challenge": None}, "invalid_request", "code_challenge"),
        ({"code_challenge": CHALLENGE[:-1]}, "invalid_request", "43 characters"),
        ({"code_challenge": CHALLENGE[:-1] + "="}, "invalid_request", "43 characters"),
        ({"nonce": None}, "invalid_request", "nonce is required"),
        ({"nonce": "x" * 513}, "invalid_request", "nonce must be"),
        ({"state": None}, "invalid_request", "state is required"),
        ({"state": "tab\there"}, "invalid_request", "state must be"),
    ],
)
def test_bad_requests_from_a_trusted_client_are_redirected(
    changes: dict[str, str | None], error: str, message: str
) -> None:
    with pytest.raises(AuthorizeError, match=message) as caught:
        parse_authorization_request(params(**changes), CLIENTS)
    assert caught.value.error == error
    assert caught.value.redirect_uri == "com.example.mail:/cb"


def test_error_redirect_keeps_the_redirect_query_and_adds_state_and_issuer() -> None:
    error = AuthorizeError("access_denied", "device is blocked", "https://app.example/cb?x=1", "s")
    query = parse_qs(urlsplit(error_redirect(error, ISSUER)).query)
    assert query == {
        "x": ["1"],
        "error": ["access_denied"],
        "error_description": ["device is blocked"],
        "state": ["s"],
        "iss": [ISSUER],
    }


def test_error_without_trusted_redirect_cannot_be_redirected() -> None:
    with pytest.raises(ValueError, match="must not be redirected"):
        error_redirect(AuthorizeError("invalid_request", "unknown client_id"), ISSUER)


def test_code_redirect_carries_code_state_and_issuer() -> None:
    request = parse_authorization_request(params(), CLIENTS)
    location = code_redirect(request, "the-code", ISSUER)
    assert location.startswith("com.example.mail:/cb?")
    assert parse_qs(urlsplit(location).query) == {
        "code": ["the-code"],
        "state": ["st-1"],
        "iss": [ISSUER],
    }


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def store(clock: Clock | None = None, max_entries: int = 100) -> TransactionStore:
    return TransactionStore(120, 60, max_entries, clock or Clock())


def token_request(code: str, **changes: str) -> TokenRequest:
    values = {
        "code": code,
        "redirect_uri": "com.example.mail:/cb",
        "client_id": CLIENT.client_id,
        "code_verifier": VERIFIER,
    }
    values.update(changes)
    return TokenRequest(**values)


def issued(transactions: TransactionStore) -> tuple[str, str]:
    handle = transactions.begin(parse_authorization_request(params(), CLIENTS))
    _, code = transactions.issue_code(handle, GRANT)
    return handle, code


def test_code_is_redeemed_once() -> None:
    transactions = store()
    _, code = issued(transactions)
    tx = transactions.redeem(token_request(code))
    assert tx.state is TxState.REDEEMED and tx.grant == GRANT
    with pytest.raises(OAuthError, match="already used") as caught:
        transactions.redeem(token_request(code))
    assert caught.value.error == "invalid_grant"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"code_verifier": "x" * 43}, "does not match the code_challenge"),
        ({"code_verifier": "short"}, "43-128 unreserved"),
        ({"code_verifier": VERIFIER + "!"}, "43-128 unreserved"),
        ({"client_id": "other"}, "another client"),
        ({"redirect_uri": "https://app.example/cb"}, "redirect_uri differs"),
    ],
)
def test_a_failed_redemption_burns_the_code(changes: dict[str, str], message: str) -> None:
    transactions = store()
    _, code = issued(transactions)
    with pytest.raises(OAuthError, match=message):
        transactions.redeem(token_request(code, **changes))
    with pytest.raises(OAuthError, match="already used"):
        transactions.redeem(token_request(code))


def test_unknown_code_is_invalid_grant() -> None:
    with pytest.raises(OAuthError, match="unknown or expired") as caught:
        store().redeem(token_request("nope"))
    assert caught.value.error == "invalid_grant"


def test_codes_expire() -> None:
    clock = Clock()
    transactions = store(clock)
    _, code = issued(transactions)
    clock.now += 61
    with pytest.raises(OAuthError, match="unknown or expired"):
        transactions.redeem(token_request(code))


def test_pending_sign_ins_expire() -> None:
    clock = Clock()
    transactions = store(clock)
    handle = transactions.begin(parse_authorization_request(params(), CLIENTS))
    clock.now += 121
    with pytest.raises(OAuthError, match="unknown or expired sign-in"):
        transactions.pending(handle)
    assert len(transactions) == 0


def test_a_denied_sign_in_cannot_get_a_code() -> None:
    transactions = store()
    handle = transactions.begin(parse_authorization_request(params(), CLIENTS))
    assert transactions.deny(handle).state is TxState.DENIED
    with pytest.raises(OAuthError, match="already denied"):
        transactions.issue_code(handle, GRANT)


def test_the_certificate_step_happens_once() -> None:
    transactions = store()
    handle, _ = issued(transactions)
    with pytest.raises(OAuthError, match="already code-issued"):
        transactions.issue_code(handle, GRANT)


def test_pending_sign_ins_are_bounded() -> None:
    transactions = store(max_entries=2)
    request = parse_authorization_request(params(), CLIENTS)
    transactions.begin(request)
    transactions.begin(request)
    with pytest.raises(OAuthError, match="too many") as caught:
        transactions.begin(request)
    assert caught.value.status == 503


@pytest.mark.parametrize(
    ("start", "target"),
    [
        (TxState.AWAITING_CERT, TxState.REDEEMED),
        (TxState.DENIED, TxState.CODE_ISSUED),
        (TxState.REDEEMED, TxState.CODE_ISSUED),
        (TxState.CODE_ISSUED, TxState.DENIED),
    ],
)
def test_unexpected_transitions_raise(start: TxState, target: TxState) -> None:
    tx = Transaction(parse_authorization_request(params(), CLIENTS), 0.0, start)
    with pytest.raises(OAuthError, match="cannot become"):
        tx.move(target)
    assert tx.state is start


@pytest.mark.parametrize(
    ("pairs", "error"),
    [
        ([("grant_type", "password")], "unsupported_grant_type"),
        ([("grant_type", "authorization_code")], "invalid_request"),
        ([("grant_type", "authorization_code"), ("grant_type", "x")], "invalid_request"),
    ],
)
def test_bad_token_requests(pairs: list[tuple[str, str]], error: str) -> None:
    with pytest.raises(OAuthError) as caught:
        parse_token_request(pairs)
    assert caught.value.error == error


def test_id_token_verifies_against_the_published_jwks() -> None:
    signer = IdTokenSigner(ec.generate_private_key(ec.SECP256R1()))
    transactions = store()
    _, code = issued(transactions)
    tx = transactions.redeem(token_request(code))
    token = signer.sign(id_token_claims(ISSUER, tx, 1_700_000_100, 600))
    decoded = jwt.decode(token, KeySet.import_key_set(signer.jwks()), algorithms=["ES256"])
    assert decoded.header == {"alg": "ES256", "typ": "JWT", "kid": signer.kid}
    JWTClaimsRegistry(
        now=1_700_000_200,
        iss={"essential": True, "value": ISSUER},
        aud={"essential": True, "value": CLIENT.client_id},
        sub={"essential": True, "value": "a" * 32},
        nonce={"essential": True, "value": "n-1"},
    ).validate(decoded.claims)
    claims = decoded.claims
    assert claims["exp"] == 1_700_000_700 and claims["auth_time"] == 1_700_000_000
    assert (claims["group"], claims["platform"], claims["compliance"]) == (
        "android",
        "android",
        "compliant",
    )
    assert claims["owner"] == "alice" and claims["cert_thumbprint"] == "ab" * 32
    assert claims["cnf"] == {"x5t#S256": "q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s"}


def test_id_tokens_are_only_for_redeemed_transactions() -> None:
    tx = Transaction(parse_authorization_request(params(), CLIENTS), 0.0, TxState.CODE_ISSUED)
    tx.grant = GRANT
    with pytest.raises(ValueError, match="redeemed"):
        id_token_claims(ISSUER, tx, 0, 600)


def test_signer_refuses_other_curves() -> None:
    with pytest.raises(ValueError, match="P-256"):
        IdTokenSigner(ec.generate_private_key(ec.SECP384R1()))


def test_discovery_document_points_at_the_endpoints() -> None:
    doc = discovery_document(ISSUER)
    assert doc["issuer"] == ISSUER
    assert doc["authorization_endpoint"] == f"{ISSUER}/authorize"
    assert doc["token_endpoint"] == f"{ISSUER}/token"
    assert doc["jwks_uri"] == f"{ISSUER}/jwks.json"
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["id_token_signing_alg_values_supported"] == ["ES256"]
    assert doc["token_endpoint_auth_methods_supported"] == ["none", "client_secret_basic"]


NAMES = st.sampled_from(
    [
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "nonce",
        "code_challenge",
        "code_challenge_method",
        "grant_type",
        "code",
        "code_verifier",
        "x",
    ]
)
PAIRS = st.lists(st.tuples(NAMES, st.text(max_size=80)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(PAIRS)
def test_any_authorization_request_parses_or_fails_cleanly(pairs: list[tuple[str, str]]) -> None:
    try:
        request = parse_authorization_request(pairs, CLIENTS)
    except AuthorizeError as exc:
        assert exc.redirect_uri in (None, *CLIENT.redirect_uris)
    else:
        assert request.redirect_uri in CLIENT.redirect_uris and "openid" in request.scope


@settings(max_examples=300, deadline=None)
@given(PAIRS)
def test_any_token_request_parses_or_fails_cleanly(pairs: list[tuple[str, str]]) -> None:
    transactions = store()
    try:
        transactions.redeem(parse_token_request(pairs))
    except OAuthError as exc:
        assert exc.error in {"invalid_request", "unsupported_grant_type", "invalid_grant"}
    else:  # pragma: no cover - no code was ever issued
        raise AssertionError("redeemed a code that was never issued")


# Confidential clients (client_secret_basic, RFC 6749 §2.3.1).
SECRET = "kq3-Secret_of.the~relying party"
CONFIDENTIAL = ClientRegistration("console", ("https://console.example/cb",), secret_hash(SECRET))
BOTH = {**CLIENTS, CONFIDENTIAL.client_id: CONFIDENTIAL}


def basic(client_id: str, secret: str) -> str:
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}"  # form-urlencoded, then base64
    return "Basic " + base64.b64encode(pair.encode()).decode()


def test_basic_credentials_are_form_urlencoded_then_base64() -> None:
    assert basic_credentials(None) is None
    credentials = basic_credentials(basic("console", SECRET))
    assert credentials == ClientCredentials("console", SECRET)
    assert SECRET not in repr(credentials)
    assert basic_credentials("basic " + basic("a:b", "c d")[6:]) == ClientCredentials("a:b", "c d")


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("Bearer abc", "only client_secret_basic"),
        ("Basic", "malformed"),
        ("Basic not*base64", "malformed"),
        ("Basic " + base64.b64encode(b"no-colon").decode(), "malformed"),
        ("Basic " + base64.b64encode(b":secret").decode(), "malformed"),
        ("Basic " + base64.b64encode(b"id:").decode(), "malformed"),
        ("Basic " + base64.b64encode(b"id:\xff").decode(), "malformed"),
        ("Basic " + "A" * 4000, "only client_secret_basic"),
    ],
)
def test_malformed_client_authentication_is_invalid_client(header: str, message: str) -> None:
    with pytest.raises(OAuthError, match=message) as caught:
        basic_credentials(header)
    assert (caught.value.error, caught.value.status) == ("invalid_client", 401)


def test_the_client_id_comes_from_the_body_or_the_credentials_and_they_agree() -> None:
    form = [("grant_type", "authorization_code"), ("code", "c"), ("redirect_uri", "u"),
            ("code_verifier", VERIFIER)]  # fmt: skip
    credentials = ClientCredentials("console", SECRET)
    assert parse_token_request(form, credentials).client_id == "console"
    same = parse_token_request([*form, ("client_id", "console")], credentials)
    assert same.client_id == "console"
    with pytest.raises(OAuthError, match="differs from the authenticated"):
        parse_token_request([*form, ("client_id", "other")], credentials)
    with pytest.raises(OAuthError, match="client_id is required"):
        parse_token_request(form)


@pytest.mark.parametrize(
    ("client_id", "credentials", "message"),
    [
        ("console", None, "must authenticate"),
        ("console", ClientCredentials("console", SECRET + "x"), "wrong client secret"),
        ("console", ClientCredentials("console", ""), "wrong client secret"),
        (CLIENT.client_id, ClientCredentials(CLIENT.client_id, "x"), "public client sends no"),
        ("unknown", None, "unknown client_id"),
        ("unknown", ClientCredentials("unknown", SECRET), "unknown client_id"),
    ],
)
def test_client_authentication_refusals(
    client_id: str, credentials: ClientCredentials | None, message: str
) -> None:
    with pytest.raises(OAuthError, match=message) as caught:
        authenticate_client(client_id, credentials, BOTH)
    assert (caught.value.error, caught.value.status) == ("invalid_client", 401)


def test_a_confidential_client_with_its_secret_and_a_public_one_without_pass() -> None:
    authenticate_client("console", ClientCredentials("console", SECRET), BOTH)
    authenticate_client(CLIENT.client_id, None, BOTH)
