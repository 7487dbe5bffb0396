"""TLS context factories: the one place for protocol versions, ciphers, groups and
verification, for Python's ``ssl`` and for pyOpenSSL (the OpenSSL of the cryptography
wheel, which the data plane can use: ``pyopenssl_server_context``).

TLS 1.2 is the floor; TLS 1.2 suites are restricted to ECDHE with AEAD ciphers (TLS 1.3
suites are AEAD by definition). Compression and renegotiation are off.
"""

from __future__ import annotations

import ctypes
import functools
import secrets
import ssl
import tempfile
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _ossl

from certgate.pki.keys import PrivateKey, private_key_pem

TLS12_AEAD_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!SHA1"


class ClientAuth(Enum):
    NONE = ssl.CERT_NONE
    OPTIONAL = ssl.CERT_OPTIONAL
    REQUIRED = ssl.CERT_REQUIRED


def pem_of(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_AEAD_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


# One curve can be pinned instead of GROUPS, e.g. prime256v1 for FIPS-style deployments.
CURVES = ("prime256v1", "secp384r1", "X25519")


def set_curve(ctx: ssl.SSLContext, curve: str) -> None:
    if curve not in CURVES:
        raise ValueError(f"unsupported curve {curve!r}; one of {', '.join(CURVES)}")
    ctx.set_ecdh_curve(curve)


# Key-exchange groups offered and accepted: X25519, P-256 and P-384 (Mozilla's
# "intermediate"); never FFDHE, X448 or P-521.
GROUPS = "X25519:P-256:P-384"


# How long a resumable session lives (TLS 1.3 ticket lifetime, OpenSSL's session timeout):
# a resumed session skips the chain check (never admission), so keep it short.
SESSION_LIFETIME_S = 2 * 3600


def pyopenssl_server_context(
    chain: Sequence[x509.Certificate],
    key: PrivateKey,
    *,
    client_cas: Sequence[x509.Certificate],
    session_id: bytes,
    alpn: bytes | None = None,
    curve: str | None = None,
) -> SSL.Context:
    """The pyOpenSSL twin of ``server_context(client_auth=REQUIRED, anchor_is_issuer=True)``:
    the same versions, suites and options; client certificates required and verified
    against ``client_cas`` alone (partial chains: only a certificate they issued verifies).
    The key is loaded from memory, never written anywhere. ``session_id`` is the
    session-id context, without which OpenSSL resumes nothing when it verifies clients.

    Resumption is by stateless tickets (OpenSSL's default two per full handshake; pyOpenSSL
    cannot set the number), not a stateful session cache: a cache was no cheaper and loses
    every session whose connection ends without our close_notify (bench/FINDINGS.md).
    """
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(TLS12_AEAD_CIPHERS.encode())
    ctx.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE
    )
    # An idle connection holds no record buffers (CPython's ssl sets this mode; pyOpenSSL
    # does not): about 34 KiB less per idle tunnel (bench/FINDINGS.md).
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    # pyOpenSSL sets partial writes, with which SSL_write returns after ONE record: 16 KiB
    # a call, and a return to the event loop for each (the relay waits for writability
    # whenever a write took less than it was given). Without, as in CPython's ssl, one
    # call writes every record it can and raises want-write only when the socket is full;
    # the retry passes the same bytes (the moving-buffer mode lets them sit elsewhere).
    _ossl.SSL_CTX_clear_mode(ctx._context, _ossl.SSL_MODE_ENABLE_PARTIAL_WRITE)
    set_groups(ctx, curve or GROUPS)
    ctx.use_certificate(chain[0])
    for cert in chain[1:]:
        ctx.add_extra_chain_cert(cert)
    ctx.use_privatekey(key)
    ctx.check_privatekey()
    store = ctx.get_cert_store()
    assert store is not None  # a new context always has one
    for ca in client_cas:
        store.add_cert(crypto.X509.from_cryptography(ca))
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    ctx.set_session_id(session_id)
    ctx.set_timeout(SESSION_LIFETIME_S)
    if alpn is not None:
        ctx.set_alpn_select_callback(lambda _conn, offered: _select(alpn, offered))
    return ctx


def _select(ours: bytes, offered: list[bytes]) -> bytes | SSL._NoOverlappingProtocols:
    return ours if ours in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def set_groups(ctx: SSL.Context, groups: str) -> None:
    """Restrict key exchange to ``groups`` (colon-separated OpenSSL group names)."""
    if _ossl.SSL_CTX_set1_curves_list(ctx._context, groups.encode()) != 1:
        raise ValueError(f"unsupported key-exchange groups {groups!r}")


_SSL_CTRL_SET_GROUPS_LIST = 92  # OpenSSL ssl.h; SSL_CTX_set1_groups_list is a macro over it


@functools.cache
def _libssl() -> ctypes.CDLL:
    """The OpenSSL that Python's ``ssl`` is linked to (found through ``_ssl``'s own
    dependencies, so never a different copy)."""
    lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    return lib


def set_stdlib_groups(ctx: ssl.SSLContext, groups: str = GROUPS) -> None:
    """Restrict an ``ssl.SSLContext``'s key exchange to ``groups``.

    Python 3.11's ``ssl`` can pin one curve, not set a list, and an OpenSSL config file
    (OPENSSL_CONF) is read when ``ssl`` is first imported, before any of our code runs.
    So the list is set on the context's SSL_CTX (the pointer that follows the object
    header of CPython's PySSLContext) through the same libssl. The pointer is checked
    first, by reading the options back: a different layout refuses to start rather than
    serve with OpenSSL's default groups.
    """
    lib = _libssl()
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer or lib.SSL_CTX_get_options(pointer) != ctx.options:
        raise RuntimeError("cannot reach this Python's SSL_CTX to restrict key exchange")
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode()) != 1:
        raise ValueError(f"unsupported key-exchange groups {groups!r}")


def load_identity(ctx: ssl.SSLContext, chain: Sequence[x509.Certificate], key: PrivateKey) -> None:
    """Load a certificate chain and key without ever writing the key in clear to disk.

    ``ssl`` only reads files, so the key goes into a private temporary directory encrypted
    under a one-time password that never leaves this process.
    """
    password = secrets.token_bytes(32).hex().encode()
    with tempfile.TemporaryDirectory(prefix="certgate-tls-") as tmp:
        cert_path, key_path = Path(tmp, "chain.pem"), Path(tmp, "key.pem")
        cert_path.write_bytes(pem_of(chain))
        key_path.write_bytes(private_key_pem(key, password))
        ctx.load_cert_chain(cert_path, key_path, password=password)


def server_context(
    chain: Sequence[x509.Certificate],
    key: PrivateKey,
    *,
    client_cas: Sequence[x509.Certificate] = (),
    client_auth: ClientAuth = ClientAuth.NONE,
    alpn: Sequence[str] = (),
    anchor_is_issuer: bool = False,
    curve: str | None = None,
) -> ssl.SSLContext:
    """A server context presenting ``chain``; verifies client certs against ``client_cas``.

    ``anchor_is_issuer`` makes the given CAs trust anchors in their own right (OpenSSL
    partial chains): with only the Device Root loaded, a client certificate verifies only
    if the Device Root issued it, never a sibling intermediate under the same root.
    """
    if client_auth is not ClientAuth.NONE and not client_cas:
        raise ValueError("client authentication needs at least one client CA")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    set_stdlib_groups(ctx)
    load_identity(ctx, chain, key)
    ctx.verify_mode = client_auth.value
    if client_cas:
        ctx.load_verify_locations(cadata=pem_of(client_cas).decode())
    if anchor_is_issuer:
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if curve is not None:
        set_curve(ctx, curve)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def client_context(
    trust: Sequence[x509.Certificate],
    *,
    chain: Sequence[x509.Certificate] = (),
    key: PrivateKey | None = None,
    alpn: Sequence[str] = (),
) -> ssl.SSLContext:
    """A client context trusting only ``trust``; presents ``chain``/``key`` when given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.load_verify_locations(cadata=pem_of(trust).decode())
    if key is not None:
        load_identity(ctx, chain, key)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx
