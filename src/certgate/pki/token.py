"""CA keys in a PKCS#11 token: generated inside it, never extractable, used inside it.

The binding is python-pkcs11 (PyPI ``python-pkcs11``): a typed, Pythonic API over the
whole of PKCS#11 (sessions, key generation with templates, signing mechanisms), maintained
by the pyauth organisation with releases through 2025, wheels for current CPython, and
``py.typed``; PyKCS11 mirrors the C API call for call and leaves the typing to us.

A :class:`TokenKey` is a key's handle for ``pki/authority.py``, the only signer: its
public half (from the CA certificate) and a way to sign bytes inside the token. Nothing
here builds or signs a certificate. Every failure of the token (module missing, token
absent or removed, PIN missing or wrong, key gone) raises :class:`Unavailable` naming what
failed; nothing falls back to a key on disk, because no disk key exists for it.

Keys are found by label and by ID, the ID being the key's SubjectKeyIdentifier (RFC 5280
§4.2.1.2 method 1), so a second initialisation on the same token can never pick the older
key of the same label.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from certgate.errors import ConfigError, Unavailable
from certgate.pki.keys import KeyAlgorithm, PublicKey, check_public_key

__all__ = ["Token", "TokenConfig", "TokenKey", "open_token"]

# The private half: usable for signing only, never readable, never exportable.
_PRIVATE_TEMPLATE = {
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
_RSA_MECHANISMS = {
    hashes.SHA256.name: Mechanism.SHA256_RSA_PKCS,
    hashes.SHA384.name: Mechanism.SHA384_RSA_PKCS,
}
_LIBRARIES: dict[str, Any] = {}  # one loaded module per path and process (C_Initialize once)
_TOKENS: dict[TokenConfig, Token] = {}
_LIBRARIES_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class TokenConfig:
    """Where the CA keys live: a PKCS#11 module, a token label, and the variable that
    holds the user PIN (the PIN itself is never in a file)."""

    module: str
    token_label: str
    pin_env: str

    def __post_init__(self) -> None:
        if not (self.module and self.token_label and self.pin_env):
            raise ConfigError("a PKCS#11 token needs a module, a token label and a PIN variable")

    def describe(self) -> str:
        return f"PKCS#11 token {self.token_label!r} (module {self.module})"


@dataclass(eq=False)
class Token:
    """One token, opened on first use. A logged-in session is kept while it works and
    dropped on the first failure, so a token put back is used again without a restart."""

    config: TokenConfig
    _session: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def generate(self, label: str, algorithm: KeyAlgorithm) -> TokenKey:
        """A new key pair inside the token, its private half sensitive and non-extractable."""
        with self._lock, self._failures("generate a key in"):
            public = _generate(self._open(), label, algorithm)
        return TokenKey(self, label, public)

    def key(self, label: str, public: object) -> TokenKey:
        """The handle of an existing key; the token is first used when it signs."""
        return TokenKey(self, label, check_public_key(public))

    def sign(self, key: TokenKey, data: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
        """``data`` signed inside the token, encoded as X.509 carries it (ECDSA: DER)."""
        with self._lock, self._failures(f"sign with key {key.label!r} in"):
            private = self._open().get_key(
                object_class=ObjectClass.PRIVATE_KEY, label=key.label, id=_key_id(key.public)
            )
            if isinstance(key.public, ec.EllipticCurvePublicKey):
                digest = hashes.Hash(algorithm)
                digest.update(data)
                raw = private.sign(digest.finalize(), mechanism=Mechanism.ECDSA)
                half = len(raw) // 2  # CKM_ECDSA answers r || s (PKCS#11 v2.40 §2.3.1)
                return encode_dss_signature(
                    int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
                )
            return bytes(private.sign(data, mechanism=_RSA_MECHANISMS[algorithm.name]))

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _open(self) -> Any:
        if self._session is None:
            pin = os.environ.get(self.config.pin_env)
            if not pin:
                raise Unavailable(
                    f"{self.config.describe()}: the PIN variable ${self.config.pin_env} is not set"
                )
            token = _find(_library(self.config.module), self.config.token_label)
            self._session = token.open(rw=True, user_pin=pin)
        return self._session

    def _drop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            try:
                session.close()
            except (pkcs11.PKCS11Error, RuntimeError):
                pass  # the token may be gone already; the session is forgotten either way

    @contextmanager
    def _failures(self, action: str) -> Iterator[None]:
        """Any token failure becomes ``Unavailable`` naming it, and drops the session."""
        try:
            yield
        except Unavailable:
            self._drop()
            raise
        except (pkcs11.PKCS11Error, RuntimeError) as exc:  # python-pkcs11's error family
            self._drop()
            where = self.config.describe()
            raise Unavailable(f"cannot {action} {where}: {_reason(exc, self)}") from exc


def _reason(exc: BaseException, token: Token) -> str:
    if isinstance(exc, pkcs11.PinIncorrect | pkcs11.PinLenRange | pkcs11.PinInvalid):
        return f"the PIN in ${token.config.pin_env} is wrong"
    if isinstance(exc, pkcs11.PinLocked):
        return "the PIN is locked"
    if isinstance(exc, pkcs11.NoSuchToken | pkcs11.TokenNotPresent):
        return "the token is not present"
    if isinstance(exc, pkcs11.NoSuchKey):
        return "the key is not in the token"
    detail = f": {exc}" if str(exc) else ""
    return f"the token failed ({type(exc).__name__}{detail})"


@dataclass(frozen=True, slots=True)
class TokenKey:
    """A private key that lives in a token: its label, its public half, and signing.
    ``repr`` and every attribute are public information."""

    token: Token
    label: str
    public: PublicKey

    def public_key(self) -> PublicKey:
        return self.public

    def sign(self, data: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
        return self.token.sign(self, data, algorithm)


def open_token(config: TokenConfig) -> Token:
    """The process's one :class:`Token` for ``config``. PKCS#11 logs a user in per process
    and token (v2.40 §5.6): a second handle's login would fail with USER_ALREADY_LOGGED_IN."""
    with _LIBRARIES_LOCK:
        return _TOKENS.setdefault(config, Token(config))


def _library(module: str) -> Any:
    with _LIBRARIES_LOCK:
        if module not in _LIBRARIES:
            if not os.path.isfile(module):
                raise Unavailable(f"PKCS#11 module {module} does not exist")
            _LIBRARIES[module] = pkcs11.lib(module)
        return _LIBRARIES[module]


def _find(library: Any, label: str) -> Any:
    """The token labelled ``label``. A slot whose token fails to answer (one removed under
    a running process, with SoftHSM) is passed over: it must not hide the others."""
    for slot in library.get_slots(token_present=True):
        try:
            token = slot.get_token()
        except (pkcs11.PKCS11Error, RuntimeError):
            continue
        if token.label == label:
            return token
    raise pkcs11.NoSuchToken(f"no token labelled {label!r}")


def _key_id(public: PublicKey) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(public).digest


def _generate(session: Any, label: str, algorithm: KeyAlgorithm) -> PublicKey:
    if algorithm is KeyAlgorithm.EC_P256:
        params = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )
        pub, priv = params.generate_keypair(
            store=True, label=label, private_template=_PRIVATE_TEMPLATE
        )
        public: PublicKey = check_public_key(load_der_public_key(encode_ec_public_key(pub)))
    else:
        bits = 2048 if algorithm is KeyAlgorithm.RSA_2048 else 3072
        pub, priv = session.generate_keypair(
            KeyType.RSA, bits, store=True, label=label, private_template=_PRIVATE_TEMPLATE
        )
        numbers = rsa.RSAPublicNumbers(
            int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big"),
            int.from_bytes(pub[Attribute.MODULUS], "big"),
        )
        public = check_public_key(numbers.public_key())
    # The ID is known only once the public key is: set it on both halves now.
    key_id = _key_id(public)
    pub[Attribute.ID] = key_id
    priv[Attribute.ID] = key_id
    return public
