"""Access renews its own certificates before they expire, without a restart.

The install root issued two leaves (``access.install``): the Access TLS certificate (443
when the load balancer offloads, and the cert proxy's 5263) and the cert proxy's client
certificate that Access pins. Within ``RENEWAL_WINDOW`` of its end (``pki.expiry``, the
rule of the console and the nodes) each is issued again by ``pki.authority``, with the
same names, a new key and ``tls_lifetime_days``; the key is sealed, the files replaced,
and the installation loaded back as a restart would load it (cross-checked), for the
caller to put to use live: Access loads the new TLS identity into its listening context
(new connections get it, open ones keep theirs), and the cert proxy, which reads the same
data directory, follows within its reload interval. Until then it presents its previous
client certificate, which Access keeps pinned beside the new one.

The publicly trusted certificate and the console's CAs are not Access's to renew: they are
reported (``/healthz`` warnings, metrics) like the others. A public certificate the
operator replaces (``certgate access public-cert``) is put to use the same way: by the
cert proxy at its next reload, by Access (which serves it on 443 under passthrough) at its
next check.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta

from cryptography import x509

from certgate.access.config import AccessConfig, pin_certproxy
from certgate.access.install import (
    ACCESS_TLS_KEY,
    CERTPROXY_KEY,
    Material,
    leaf_profiles,
    load_material,
    seal_key,
    write_public,
)
from certgate.errors import ConfigError
from certgate.pki import expiry
from certgate.pki.authority import Authority, Issuer, Names
from certgate.pki.keys import generate_key
from certgate.pki.thumbprint import thumbprint
from certgate.tlsconf import pem_of

__all__ = ["ACCESS_TLS", "CERTPROXY_CLIENT", "WARNING", "certificates", "due", "renew"]

log = logging.getLogger("certgate.access.renewal")
ACCESS_TLS, CERTPROXY_CLIENT, PUBLIC_TLS = "access-tls", "certproxy-client", "public-tls"
RENEWED_HERE = (ACCESS_TLS, CERTPROXY_CLIENT)
WARNING = (
    "renew {name} (Access renews access-tls and certproxy-client itself; public-tls:"
    " certgate access public-cert; a Device Root: certgate console rotate device-root)"
)


def certificates(material: Material) -> dict[str, x509.Certificate]:
    """What Access and its cert proxy present or trust, by name (for ``pki.expiry``)."""
    certs = {
        ACCESS_TLS: material.access_cert,
        CERTPROXY_CLIENT: material.certproxy_cert,
        PUBLIC_TLS: material.public_chain[0],
        "access-install-root": material.install_root,
    }
    for root in material.device_roots.roots:
        certs[root.label or "device-root"] = root.cert
    return certs


def due(material: Material, now: float) -> list[str]:
    """The certificates Access renews that are within their renewal window at ``now``."""
    return [
        cert.name
        for cert in expiry.in_use(certificates(material), now)
        if cert.name in RENEWED_HERE and cert.renewal_due
    ]


def renew(
    config: AccessConfig, material: Material, now: float, authority: Authority | None = None
) -> tuple[AccessConfig, Material, list[str]]:
    """Issue again what is due at ``now``, and notice a public certificate the operator
    replaced (``certgate access public-cert``); returns the configuration (its proxy pin),
    the installation as now on disk, and what changed. ConfigError when a certificate is
    due and the install root key is missing (an installation made before renewal existed:
    ``certgate access init`` a new one)."""
    names = due(material, now)
    if names:
        config = _issue_again(config, material, names, authority or Authority())
    if config.files.public_chain.read_bytes() != pem_of(list(material.public_chain)):
        names.append(PUBLIC_TLS)
    if not names:
        return config, material, []
    renewed = load_material(config)
    for name in names:
        cert = certificates(renewed)[name]
        log.info(
            "%s %s: %s, valid until %s",
            "installed the replaced" if name == PUBLIC_TLS else "renewed before expiry",
            name,
            thumbprint(cert)[:16],
            cert.not_valid_after_utc.isoformat(),
        )
    return config, renewed, names


def _issue_again(
    config: AccessConfig, material: Material, names: list[str], authority: Authority
) -> AccessConfig:
    """Issue ``names`` again from the install root, seal their keys, replace their files;
    the configuration with the proxy's new pin."""
    if material.install_root_key is None:
        raise ConfigError(
            f"{', '.join(names)} due for renewal, but this installation keeps no install root"
            " key (it predates renewal): run `certgate access init` for a new installation"
        )
    issuer = Issuer(material.install_root, material.install_root_key)
    access_profile, proxy_profile = leaf_profiles(timedelta(days=config.tls_lifetime_days))
    files = config.files
    if ACCESS_TLS in names:
        key = generate_key()
        cert = authority.issue(
            issuer, access_profile, names_of(material.access_cert), key.public_key()
        )
        seal_key(config, ACCESS_TLS_KEY, key)
        write_public(files.access_tls, pem_of([cert]))
    if CERTPROXY_CLIENT in names:
        key = generate_key()
        proxy = names_of(material.certproxy_cert)
        cert = authority.issue(issuer, proxy_profile, proxy, key.public_key())
        seal_key(config, CERTPROXY_KEY, key)
        write_public(files.certproxy_client, pem_of([cert]))
        pin_certproxy(files, thumbprint(cert))
        config = dataclasses.replace(config, certproxy_thumbprint=thumbprint(cert))
    return config


def names_of(cert: x509.Certificate) -> Names:
    """The subject CN and the DNS and IP subjectAltNames of ``cert``, to issue it again."""
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return Names(str(cn))
    return Names(
        str(cn),
        dns_names=tuple(san.get_values_for_type(x509.DNSName)),
        ip_addresses=tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
    )
