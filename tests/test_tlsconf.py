"""SSLContext factories, exercised by real TLS handshakes over loopback.

Each handshake runs the server in a thread and the client in the test, both with bounded
socket timeouts, and reports what each side saw (version, cipher, peer, or the error).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import stat
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from certgate import tlsconf
from certgate.pki.keys import PrivateKey
from certgate.tlsconf import ClientAuth, client_context, server_context
from tests.pki.conftest import TUNNEL_DNS, Hierarchy, build_hierarchy, shared_hierarchy

TIMEOUT_S = 10.0
PAYLOAD = b"hello over mTLS"


@dataclass
class Side:
    """What one end of a handshake saw."""

    version: str | None = None
    cipher: str | None = None
    peer: x509.Certificate | None = None
    alpn: str | None = None
    received: bytes = b""
    error: Exception | None = None


def observe(side: Side, tls: ssl.SSLSocket) -> None:
    side.version = tls.version()
    cipher = tls.cipher()
    side.cipher = cipher[0] if cipher else None
    der = tls.getpeercert(binary_form=True)
    side.peer = x509.load_der_x509_certificate(der) if der else None
    side.alpn = tls.selected_alpn_protocol()


def serve_once(listener: socket.socket, ctx: ssl.SSLContext, side: Side) -> None:
    try:
        conn, _ = listener.accept()
        conn.settimeout(TIMEOUT_S)
        with ctx.wrap_socket(conn, server_side=True) as tls:
            observe(side, tls)
            tls.sendall(PAYLOAD)
    except Exception as exc:  # recorded for the test to assert on
        side.error = exc


def connect(port: int, ctx: ssl.SSLContext, side: Side, server_hostname: str) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw:
            with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                observe(side, tls)
                side.received = tls.recv(len(PAYLOAD))
    except Exception as exc:
        side.error = exc


def handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    server_hostname: str = TUNNEL_DNS[0],
) -> tuple[Side, Side]:
    """One connection between the two contexts; returns (server side, client side)."""
    server, client = Side(), Side()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT_S)
        thread = threading.Thread(target=serve_once, args=(listener, server_ctx, server))
        thread.start()
        connect(listener.getsockname()[1], client_ctx, client, server_hostname)
        thread.join(2 * TIMEOUT_S)
    assert not thread.is_alive(), "server thread did not finish"
    return server, client


@pytest.fixture(scope="module")
def pki() -> Hierarchy:
    return shared_hierarchy()


@pytest.fixture(scope="module")
def stranger() -> Hierarchy:
    """An unrelated hierarchy: same shape and names, different keys."""
    return build_hierarchy()


@pytest.fixture(scope="module")
def tunnel_server(pki: Hierarchy) -> ssl.SSLContext:
    tunnel = pki.leaves["tunnel"]
    return server_context(
        tunnel.chain, tunnel.key, client_cas=[pki.root.cert], client_auth=ClientAuth.REQUIRED
    )


def device_client(pki: Hierarchy, trust: Hierarchy | None = None) -> ssl.SSLContext:
    device = pki.leaves["device"]
    return client_context([(trust or pki).root.cert], chain=device.chain, key=device.key)


def assert_succeeded(server: Side, client: Side) -> None:
    assert server.error is None, server.error
    assert client.error is None, client.error
    assert client.received == PAYLOAD


# --- successful handshakes -----------------------------------------------------------


@pytest.mark.parametrize(
    ("maximum", "expected"),
    [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")],
)
def test_mutual_tls_handshake(
    pki: Hierarchy, tunnel_server: ssl.SSLContext, maximum: ssl.TLSVersion, expected: str
) -> None:
    client_ctx = device_client(pki)
    client_ctx.maximum_version = maximum
    server, client = handshake(tunnel_server, client_ctx)
    assert_succeeded(server, client)
    assert server.version == client.version == expected
    assert server.peer == pki.leaves["device"].cert
    assert client.peer == pki.leaves["tunnel"].cert
    for side in (server, client):
        assert side.cipher is not None
        assert "GCM" in side.cipher or "CHACHA20" in side.cipher, side.cipher


def test_handshake_by_ip_address(pki: Hierarchy, tunnel_server: ssl.SSLContext) -> None:
    server, client = handshake(tunnel_server, device_client(pki), server_hostname="127.0.0.1")
    assert_succeeded(server, client)


def test_alpn_is_negotiated(pki: Hierarchy) -> None:
    tunnel = pki.leaves["tunnel"]
    server_ctx = server_context(tunnel.chain, tunnel.key, alpn=["h2", "http/1.1"])
    client_ctx = client_context([pki.root.cert], alpn=["http/1.1"])
    server, client = handshake(server_ctx, client_ctx)
    assert_succeeded(server, client)
    assert server.alpn == client.alpn == "http/1.1"
    assert server.peer is None  # no client auth asked for


# --- refused handshakes --------------------------------------------------------------


def tls11_client(pki: Hierarchy) -> ssl.SSLContext:
    """A client that offers TLS 1.1 only (it needs SECLEVEL 0 and non-AEAD suites)."""
    ctx = device_client(pki)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl deprecates TLSv1_1 itself
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def test_tls11_is_refused_by_the_server(pki: Hierarchy, tunnel_server: ssl.SSLContext) -> None:
    server, client = handshake(tunnel_server, tls11_client(pki))
    assert isinstance(server.error, ssl.SSLError), server.error
    assert "UNSUPPORTED_PROTOCOL" in str(server.error).upper(), server.error
    assert isinstance(client.error, ssl.SSLError)
    assert server.version is None


@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_cert_from_unknown_ca_is_refused(
    pki: Hierarchy,
    stranger: Hierarchy,
    tunnel_server: ssl.SSLContext,
    maximum: ssl.TLSVersion,
) -> None:
    client_ctx = device_client(stranger, trust=pki)
    client_ctx.maximum_version = maximum
    server, client = handshake(tunnel_server, client_ctx)
    assert isinstance(server.error, ssl.SSLError), server.error
    assert "certificate verify failed" in str(server.error)
    # In TLS 1.3 the client finishes first and learns of the refusal on its first read.
    assert client.received == b""


def test_missing_client_cert_is_refused(pki: Hierarchy, tunnel_server: ssl.SSLContext) -> None:
    server, client = handshake(tunnel_server, client_context([pki.root.cert]))
    assert isinstance(server.error, ssl.SSLError), server.error
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(server.error).upper()
    assert client.received == b""


def test_client_refuses_server_from_unknown_ca(pki: Hierarchy, stranger: Hierarchy) -> None:
    server, client = handshake(tunnel_server_of(stranger), device_client(pki))
    assert isinstance(client.error, ssl.SSLCertVerificationError), client.error
    assert "unable to get local issuer certificate" in str(client.error)
    assert isinstance(server.error, ssl.SSLError), server.error
    assert client.version is None


def test_client_refuses_wrong_hostname(pki: Hierarchy, tunnel_server: ssl.SSLContext) -> None:
    _, client = handshake(tunnel_server, device_client(pki), server_hostname="other.test")
    assert isinstance(client.error, ssl.SSLCertVerificationError), client.error
    assert "Hostname mismatch" in str(client.error)


def tunnel_server_of(hierarchy: Hierarchy) -> ssl.SSLContext:
    tunnel = hierarchy.leaves["tunnel"]
    return server_context(tunnel.chain, tunnel.key)


def device_root_server(pki: Hierarchy, anchor_is_issuer: bool) -> ssl.SSLContext:
    tunnel = pki.leaves["tunnel"]
    return server_context(
        tunnel.chain,
        tunnel.key,
        client_cas=[pki.device_root.cert],
        client_auth=ClientAuth.REQUIRED,
        anchor_is_issuer=anchor_is_issuer,
    )


def client_presenting(pki: Hierarchy, name: str) -> ssl.SSLContext:
    leaf = pki.leaves[name]
    return client_context([pki.root.cert], chain=leaf.chain, key=leaf.key)


def test_anchor_is_issuer_accepts_the_issuers_leaf(pki: Hierarchy) -> None:
    server, client = handshake(device_root_server(pki, True), client_presenting(pki, "device"))
    assert_succeeded(server, client)
    assert server.peer == pki.leaves["device"].cert


@pytest.mark.parametrize("sibling", ["admin", "console"])
def test_anchor_is_issuer_refuses_sibling_intermediates_leaf(pki: Hierarchy, sibling: str) -> None:
    # Same root, other intermediate: only the Device Root is an anchor, so it is refused.
    server, client = handshake(device_root_server(pki, True), client_presenting(pki, sibling))
    assert isinstance(server.error, ssl.SSLError), server.error
    assert "certificate verify failed" in str(server.error)
    assert client.received == b""


def test_intermediate_alone_is_no_anchor_without_the_flag(pki: Hierarchy) -> None:
    server, _ = handshake(device_root_server(pki, False), client_presenting(pki, "device"))
    assert isinstance(server.error, ssl.SSLError), server.error
    assert "certificate verify failed" in str(server.error)


# --- context settings ----------------------------------------------------------------


def test_client_auth_needs_client_cas(pki: Hierarchy) -> None:
    tunnel = pki.leaves["tunnel"]
    with pytest.raises(ValueError, match="client authentication needs at least one client CA"):
        server_context(tunnel.chain, tunnel.key, client_auth=ClientAuth.REQUIRED)


def test_contexts_are_hardened(pki: Hierarchy, tunnel_server: ssl.SSLContext) -> None:
    for ctx in (tunnel_server, device_client(pki)):
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
        assert ctx.options & ssl.OP_NO_COMPRESSION
        assert ctx.options & ssl.OP_NO_RENEGOTIATION
        tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert tls12, "no TLS 1.2 suites left"
        for cipher in tls12:
            assert cipher["aead"] is True, cipher["name"]
            assert cipher["kea"] == "kx-ecdhe", cipher["name"]
    assert tunnel_server.verify_mode is ssl.CERT_REQUIRED
    assert tunnel_server.options & ssl.OP_CIPHER_SERVER_PREFERENCE


# --- the private key on disk ---------------------------------------------------------


class SpyContext(ssl.SSLContext):
    """Records what ``load_cert_chain`` found on disk while the files still existed."""

    seen: dict[str, Any]

    def load_cert_chain(self, certfile: Any, keyfile: Any = None, password: Any = None) -> None:
        key_path = Path(keyfile)
        self.seen = {
            "dir": key_path.parent,
            "dir_mode": stat.S_IMODE(key_path.parent.stat().st_mode),
            "key": key_path.read_bytes(),
        }
        super().load_cert_chain(certfile, keyfile, password)


def test_key_is_written_encrypted_and_removed(
    pki: Hierarchy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    device = pki.leaves["device"]
    ctx = SpyContext(ssl.PROTOCOL_TLS_CLIENT)
    tlsconf.load_identity(ctx, device.chain, device.key)
    key_pem: bytes = ctx.seen["key"]
    assert key_pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert b"-----BEGIN PRIVATE KEY" not in key_pem
    assert b"-----BEGIN EC PRIVATE KEY" not in key_pem
    assert ctx.seen["dir"].parent == tmp_path
    assert ctx.seen["dir_mode"] == 0o700
    assert not ctx.seen["dir"].exists()
    assert list(tmp_path.iterdir()) == []


def test_loaded_key_is_usable(pki: Hierarchy) -> None:
    device: PrivateKey = pki.leaves["device"].key
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tlsconf.load_identity(ctx, pki.leaves["device"].chain, device)
    with pytest.raises(ssl.SSLError):
        tlsconf.load_identity(ctx, pki.leaves["device"].chain, pki.leaves["app"].key)


def _server_temp_key(ctx: ssl.SSLContext, version: str) -> str:
    """The key exchange group `openssl s_client` reports against a server using ``ctx``."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with contextlib.suppress(OSError), ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)

    thread = threading.Thread(target=serve)
    thread.start()
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", version, "-brief"],
        input=b"",
        capture_output=True,
        timeout=20,
        check=False,
    )
    thread.join(timeout=10)
    server.close()
    lines = [line for line in result.stderr.decode().splitlines() if "Temp Key" in line]
    return lines[0] if lines else result.stderr.decode()


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_curve_can_be_pinned(version: str) -> None:
    leaf = shared_hierarchy().leaves["tunnel"]
    default = tlsconf.server_context(leaf.chain, leaf.key)
    pinned = tlsconf.server_context(leaf.chain, leaf.key, curve="prime256v1")
    assert "X25519" in _server_temp_key(default, version)
    assert "prime256v1" in _server_temp_key(pinned, version)


def test_unknown_curve_is_refused() -> None:
    leaf = shared_hierarchy().leaves["tunnel"]
    with pytest.raises(ValueError, match="unsupported curve"):
        tlsconf.server_context(leaf.chain, leaf.key, curve="secp112r1")
