"""The forwarding policy as transcripts: what passes, what is dropped, what is added; then fuzz."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from certgate.certproxy.forwarding import (
    Refusal,
    check_request,
    downstream_headers,
    forwarded_element,
    upstream_headers,
)
from certgate.protocol.client_cert_header import (
    decode_client_cert,
    decode_client_cert_chain,
    encode_client_cert,
)
from tests.access.harness import ConsolePKI

PKI = ConsolePKI()
DEVICE = PKI.device()
CLIENT = ("192.0.2.7", 51234)
AUTHORITY = b"127.0.0.1:443"


def test_the_certificate_step_passes() -> None:
    check_request(b"GET", b"/authorize/cert?req=abc")


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        (b"GET", b"https://evil.example/authorize/cert", 400),  # absolute-form
        (b"CONNECT", b"evil.example:443", 400),  # authority-form
        (b"OPTIONS", b"*", 400),  # asterisk-form
        (b"POST", b"/authorize/cert", 405),
        (b"HEAD", b"/authorize/cert", 405),
        (b"GET", b"/token", 404),
        (b"GET", b"/authorize", 404),
        (b"GET", b"/authorize/cert/../../token", 404),
        (b"GET", b"/authorize%2Fcert", 404),
        (b"GET", b"/Authorize/cert", 404),
    ],
)
def test_everything_else_is_refused(method: bytes, target: bytes, status: int) -> None:
    with pytest.raises(Refusal) as caught:
        check_request(method, target)
    assert caught.value.status == status


def test_upstream_transcript() -> None:
    forged = encode_client_cert(PKI.device().cert).encode()
    client_headers = [
        (b"Host", b"access.example.com:5262"),
        (b"User-Agent", b"okhttp/4"),
        (b"Client-Cert", forged),
        (b"client_cert_chain", forged),
        (b"CLIENT-CERT", forged),
        (b"X-Forwarded-For", b"10.9.9.9"),
        (b"x_forwarded_proto", b"http"),
        (b"Forwarded", b"for=10.9.9.9"),
        (b"X-Real-IP", b"10.9.9.9"),
        (b"Connection", b"keep-alive, X-Secret-Hop"),
        (b"X-Secret-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Authorization", b"Basic eDp5"),
        (b"Content-Length", b"0"),
        (b"Accept", b"text/html"),
    ]
    out = upstream_headers(
        client_headers, authority=AUTHORITY, client=CLIENT, leaf=DEVICE.cert, chain=DEVICE.chain
    )
    names = [n for n, _ in out]
    assert names == [
        b"host",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"connection",
        b"client-cert",
        b"client-cert-chain",
        b"User-Agent",
        b"Accept",
    ]
    values = dict(out)
    assert values[b"host"] == AUTHORITY
    assert (
        values[b"forwarded"] == b'for="192.0.2.7:51234";proto=https;host="access.example.com:5262"'
    )
    assert values[b"x-forwarded-for"] == b"192.0.2.7"
    assert values[b"connection"] == b"close"
    assert decode_client_cert(values[b"client-cert"]) == DEVICE.cert.public_bytes(Encoding.DER)
    assert decode_client_cert_chain(values[b"client-cert-chain"]) == [
        PKI.device_root.cert.public_bytes(Encoding.DER)
    ]


def test_without_a_verified_certificate_no_client_cert_field_is_sent() -> None:
    forged = encode_client_cert(DEVICE.cert).encode()
    out = upstream_headers(
        [(b"Client-Cert", forged), (b"Host", b"x")],
        authority=AUTHORITY,
        client=CLIENT,
        leaf=None,
        chain=[],
    )
    assert all(not n.lower().startswith(b"client-cert") for n, _ in out)


@pytest.mark.parametrize(
    ("client", "host", "expected"),
    [
        (("192.0.2.7", 1), None, 'for="192.0.2.7:1";proto=https'),
        (("2001:db8::7", 2), None, 'for="[2001:db8::7]:2";proto=https'),
        (("192.0.2.7", 1), b"[2001:db8::1]:5", 'for="192.0.2.7:1";proto=https;host="[2001:db8::1]:5"'),  # noqa: E501
        (("192.0.2.7", 1), b'evil";for="10.0.0.1', 'for="192.0.2.7:1";proto=https'),
        (("192.0.2.7", 1), b"a b", 'for="192.0.2.7:1";proto=https'),
    ],
)  # fmt: skip
def test_forwarded_element(client: tuple[str, int], host: bytes | None, expected: str) -> None:
    assert forwarded_element(client, host) == expected


def test_downstream_drops_hop_by_hop_and_framing() -> None:
    headers = [
        (b"Location", b"com.example.mail:/cb?code=x"),
        (b"Connection", b"close, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"10"),
        (b"Cache-Control", b"no-store"),
    ]
    assert downstream_headers(headers) == [
        (b"Location", b"com.example.mail:/cb?code=x"),
        (b"Cache-Control", b"no-store"),
    ]


_SPOOFABLE = (
    "client-cert",
    "client-cert-chain",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
)
_NAMES = st.one_of(
    st.sampled_from(_SPOOFABLE).flatmap(
        lambda name: st.sampled_from(
            [name, name.upper(), name.title(), name.replace("-", "_"), f" {name}\t"]
        )
    ),
    st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}", fullmatch=True),
)
_HEADERS = st.lists(st.tuples(_NAMES, st.binary(max_size=40)), max_size=20)


@settings(max_examples=300, deadline=None)
@given(_HEADERS, st.booleans())
def test_no_client_value_survives_for_a_field_the_proxy_owns(
    headers: list[tuple[str, bytes]], with_leaf: bool
) -> None:
    raw = [(name.encode(), value) for name, value in headers]
    out = upstream_headers(
        raw,
        authority=AUTHORITY,
        client=CLIENT,
        leaf=DEVICE.cert if with_leaf else None,
        chain=DEVICE.chain if with_leaf else [],
    )
    owned = [n.strip(b" \t").lower().replace(b"_", b"-") for n, _ in out]
    for name in (b"host", b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"connection"):
        assert owned.count(name) == 1  # ours, never the client's
    assert owned.count(b"client-cert") == (1 if with_leaf else 0)
    assert owned.count(b"client-cert-chain") == (1 if with_leaf else 0)
    assert owned.count(b"x-real-ip") == owned.count(b"x-forwarded-host") == 0
