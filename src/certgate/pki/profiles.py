"""Issuance profiles: *what* a certificate of each kind looks like, as values.

Provisioners decide *whether* to issue; these values decide *what*; only
``certgate.pki.authority`` turns a profile into a signed certificate.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

DAY = timedelta(days=1)
# A certificate the system issues to itself is renewed (rotated) this long before it
# expires, and nodes warn about one in use that is this close: time for a rotation's
# prepare, switch and an overlap before finish.
RENEWAL_WINDOW = 30 * DAY
# The longest a TLS server certificate may live, notBefore to notAfter (the CA/Browser
# Forum's and Mozilla's 398 days): what sslyze's Mozilla check expects of every listener.
MAX_SERVER_TLS_LIFETIME = 398 * DAY


@dataclass(frozen=True, slots=True)
class KeyUsageFlags:
    """Every KeyUsage bit spelled out (RFC 5280 §4.2.1.3); nothing is implied."""

    digital_signature: bool = False
    content_commitment: bool = False
    key_encipherment: bool = False
    data_encipherment: bool = False
    key_agreement: bool = False
    key_cert_sign: bool = False
    crl_sign: bool = False
    encipher_only: bool = False
    decipher_only: bool = False

    def extension(self) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=self.digital_signature,
            content_commitment=self.content_commitment,
            key_encipherment=self.key_encipherment,
            data_encipherment=self.data_encipherment,
            key_agreement=self.key_agreement,
            key_cert_sign=self.key_cert_sign,
            crl_sign=self.crl_sign,
            encipher_only=self.encipher_only,
            decipher_only=self.decipher_only,
        )


CA_USAGE = KeyUsageFlags(digital_signature=True, key_cert_sign=True, crl_sign=True)
LEAF_USAGE = KeyUsageFlags(digital_signature=True)


@dataclass(frozen=True, slots=True)
class Profile:
    """One kind of certificate. ``path_length`` only matters for CAs."""

    name: str
    validity: timedelta
    is_ca: bool
    key_usage: KeyUsageFlags
    extended_key_usage: tuple[x509.ObjectIdentifier, ...] = ()
    path_length: int | None = None
    # Leaves start slightly in the past so that small clock skew does not reject them.
    backdate: timedelta = timedelta(minutes=5)

    def __post_init__(self) -> None:
        if self.is_ca and self.extended_key_usage:
            raise ValueError(f"profile {self.name}: CA profiles carry no EKU")
        if not self.is_ca and (self.path_length is not None or self.key_usage.key_cert_sign):
            raise ValueError(f"profile {self.name}: a leaf cannot sign certificates")
        if not self.is_ca and not self.extended_key_usage:
            raise ValueError(f"profile {self.name}: a leaf needs an EKU")


SERVER = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT = ExtendedKeyUsageOID.CLIENT_AUTH

ROOT_CA = Profile("root-ca", 20 * 365 * DAY, True, CA_USAGE, path_length=1)
# A Root's subject and key certified by another Root (a Root rotation's cross
# certificates): it stands where that Root stands in a chain, so its pathLen is the Root's.
CROSS_CA = Profile("cross-ca", 10 * 365 * DAY, True, CA_USAGE, path_length=1)
# Secure Channel Root, Device Root and Admin CA: issue leaves only.
INTERMEDIATE_CA = Profile("intermediate-ca", 10 * 365 * DAY, True, CA_USAGE, path_length=0)

CONSOLE_IDENTITY = Profile("console-identity", 3 * 365 * DAY, False, LEAF_USAGE, (CLIENT,))
# Server certificates: renewed by rotation (RENEWAL_WINDOW) well within their lifetime.
TUNNEL_IDENTITY = Profile("tunnel-identity", 397 * DAY, False, LEAF_USAGE, (SERVER, CLIENT))
CONSOLE_TLS = Profile("console-tls", 365 * DAY, False, LEAF_USAGE, (SERVER,))
# A loopback endpoint's own anchor, made anew at every start (device/kdcproxy.py).
LOOPBACK_TLS = Profile("loopback-tls", 30 * DAY, False, LEAF_USAGE, (SERVER,))
SERVICE_TLS = Profile("service-tls", 365 * DAY, False, LEAF_USAGE, (SERVER, CLIENT))
ADMIN_CLIENT = Profile("admin-client", 365 * DAY, False, LEAF_USAGE, (CLIENT,))
DEVICE_CLIENT = Profile("device-client", 365 * DAY, False, LEAF_USAGE, (CLIENT,))
APP_CLIENT = Profile("app-client", 365 * DAY, False, LEAF_USAGE, (CLIENT,))
# The SCEP RA (RFC 8894 §2.1): requests are encrypted to its RSA key and answers signed
# with it, so it signs and deciphers keys; id-kp-cmcRA (RFC 6402) names the role. It
# signs no certificates: issuance stays with the Device Root.
CMC_RA = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.28")
SCEP_RA = Profile(
    "scep-ra",
    365 * DAY,
    False,
    KeyUsageFlags(digital_signature=True, key_encipherment=True),
    (CMC_RA,),
)

# Access's install root (the spec's "self-signed certificate generated during installation"):
# it signs only the Access TLS certificate and the cert proxy's client certificate, at
# `certgate access init` and again when Access renews them (access/renewal.py; their
# lifetime is access.json's tls_lifetime_days, this validity by default).
ACCESS_INSTALL_ROOT = Profile("access-install-root", 10 * 365 * DAY, True, CA_USAGE, path_length=0)
ACCESS_TLS = Profile("access-tls", 397 * DAY, False, LEAF_USAGE, (SERVER,))
CERTPROXY_CLIENT = Profile("certproxy-client", 397 * DAY, False, LEAF_USAGE, (CLIENT,))
