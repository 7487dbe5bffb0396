"""Plan from a real certificate: read it, classify it, check which FQDNs it covers, decide.

Where :func:`certgate.planner.matrix.decide` trusts the operator's description of the
certificate, this module looks at the certificate itself. The decision follows the same
rule (see ``matrix``), but node coverage is measured, not assumed: a "SAN" certificate
missing one node needs 5263 under re-encryption even though Table 1 row 5 says No, and the
reason says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from certgate.errors import BadRequest
from certgate.planner.matrix import (
    CertType,
    LBMode,
    Namespace,
    Plan,
    explain_rule,
    lb_requirement,
    lookup_row,
    name_matches,
    normalize_domain,
    ports_for,
)

__all__ = [
    "CertificateMismatch",
    "CertificateNames",
    "UnreadableCertificate",
    "certificate_names",
    "classify",
    "covering_name",
    "decide_from_cert",
    "load_certificate",
    "parse_certificate",
    "validity_warnings",
]


class UnreadableCertificate(BadRequest):
    """The certificate file cannot be read, or holds no parseable X.509 certificate."""


class CertificateMismatch(BadRequest):
    """The certificate cannot serve the deployment at all (it does not name the VIP FQDN)."""


@dataclass(frozen=True)
class CertificateNames:
    """The DNS names a certificate presents, and whether they came from the subject CN."""

    dns_names: tuple[str, ...]
    from_common_name: bool


def load_certificate(path: str | Path) -> x509.Certificate:
    """Read a PEM or DER certificate file; of a PEM chain, the first certificate is taken."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UnreadableCertificate(
            f"cannot read certificate file {str(path)!r}: {exc.strerror or exc}"
        ) from exc
    return parse_certificate(data, source=str(path))


def parse_certificate(data: bytes, *, source: str = "<bytes>") -> x509.Certificate:
    """Parse PEM (first CERTIFICATE block, other blocks skipped) or DER certificate bytes."""
    if b"-----BEGIN" in data:
        try:
            return x509.load_pem_x509_certificate(data)
        except ValueError as exc:
            raise UnreadableCertificate(
                f"{source!r} is PEM but holds no readable CERTIFICATE block: {exc}"
            ) from exc
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise UnreadableCertificate(
            f"{source!r} is neither a PEM nor a DER X.509 certificate: {exc}"
        ) from exc


def certificate_names(cert: x509.Certificate) -> CertificateNames:
    """SAN dNSNames; the subject CN only when the certificate has no SAN extension at all.

    RFC 6125 §6.4.4: a client looks at the CN only when the certificate carries no
    subjectAltName identifiers of the DNS-ID, SRV-ID or URI-ID kinds.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return CertificateNames(_common_names(cert), from_common_name=True)
    except ValueError as exc:
        raise UnreadableCertificate(f"certificate extensions are malformed: {exc}") from exc
    return CertificateNames(tuple(san.get_values_for_type(x509.DNSName)), from_common_name=False)


def _common_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The subject's CN attribute values, as text."""
    values = (attr.value for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    return tuple(v if isinstance(v, str) else v.decode("ascii", "replace") for v in values)


def classify(names: CertificateNames) -> CertType:
    """Wildcard when any name is a wildcard; SAN when it lists several; otherwise single host."""
    if any(name.startswith("*") for name in names.dns_names):
        return CertType.WILDCARD
    if len(names.dns_names) > 1:
        return CertType.SAN
    return CertType.SINGLE_HOST_CN


def covering_name(names: CertificateNames, fqdn: str) -> str | None:
    """The first presented name covering ``fqdn`` (RFC 6125 §6.4), or None."""
    return next((name for name in names.dns_names if name_matches(name, fqdn)), None)


def validity_warnings(cert: x509.Certificate, now: datetime) -> tuple[str, ...]:
    """Warnings for a certificate outside its validity period (RFC 5280 §4.1.2.5, inclusive)."""
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < not_before:
        return (f"certificate is not yet valid: notBefore is {not_before.isoformat()}",)
    if now > not_after:
        return (f"certificate has expired: notAfter was {not_after.isoformat()}",)
    return ()


def _source_sentence(names: CertificateNames, cert_type: CertType) -> str:
    """Which names the classification used."""
    listed = ", ".join(names.dns_names)
    if names.from_common_name:
        return (
            f"The certificate has no subjectAltName extension, so its subject CN ({listed}) "
            f"was used instead (RFC 6125 §6.4.4); classified as {cert_type.value}."
        )
    return f"Classified as {cert_type.value} from its SAN dNSNames ({listed})."


def _coverage_sentence(names: CertificateNames, vip: str, nodes: Sequence[str]) -> str:
    """Which of the VIP and node FQDNs the certificate covers, and by which name."""
    parts = []
    for role, fqdn in [("VIP", vip), *(("node", node) for node in nodes)]:
        match = covering_name(names, fqdn)
        parts.append(f"{role} {fqdn} covered by {match}" if match else f"{role} {fqdn} NOT covered")
    return "Coverage: " + "; ".join(parts) + "."


def _namespace(vip: str, nodes: Sequence[str]) -> Namespace:
    """Shared when every node sits in the VIP's parent domain, disjoint otherwise."""
    public = vip.split(".", 1)[1]
    if all(node.split(".", 1)[1] == public for node in nodes):
        return Namespace.SHARED
    return Namespace.DISJOINT


def _table_sentence(
    namespace: Namespace, cert_type: CertType, lb: LBMode, required: bool
) -> tuple[str, int | None]:
    """How the measured answer relates to Table 1, and the row number when it agrees."""
    row = lookup_row(namespace, cert_type, lb)
    case = f"a {cert_type.value} certificate in a {namespace.value} namespace with {lb.value}"
    if row is None:
        return f"Derived, not from Table 1 (the table does not list {case}).", None
    if row.port_5263_required == required:
        return f"Agrees with Table 1 row {row.number} ({case}).", row.number
    return (
        f"Derived from the certificate, not from Table 1: row {row.number} ({case}) says "
        f"{row.port_5263_required_text} because it assumes the usual node coverage for that "
        "type, but this certificate's node coverage differs.",
        None,
    )


def _fit_sentence(uncovered: Sequence[str]) -> str:
    """Whether the certificate could also be installed on the nodes for 443."""
    if not uncovered:
        return "the certificate covers the VIP FQDN and every node FQDN"
    return f"the certificate does not cover node FQDN(s) {', '.join(uncovered)}"


def _normalized_inputs(vip_fqdn: str, node_fqdns: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """Validated VIP and node FQDNs (duplicates dropped, order kept)."""
    vip = normalize_domain(vip_fqdn, what="VIP FQDN")
    nodes = tuple(dict.fromkeys(normalize_domain(n, what="node FQDN") for n in node_fqdns))
    if not nodes:
        raise BadRequest("at least one node FQDN is required to check node coverage")
    return vip, nodes


def _require_vip(names: CertificateNames, vip: str) -> None:
    """Refuse a certificate that does not name the VIP: no port layout can fix that."""
    if covering_name(names, vip) is None:
        presented = ", ".join(names.dns_names) or "no DNS names"
        raise CertificateMismatch(
            f"the certificate ({presented}) does not cover the VIP FQDN {vip}: clients reaching "
            "the VIP on 443 and 5262 would reject it whatever the load balancer mode; "
            "this is a certificate error, not a port 5263 question"
        )


def decide_from_cert(
    cert: x509.Certificate,
    vip_fqdn: str,
    node_fqdns: Sequence[str],
    lb: LBMode,
    *,
    now: datetime | None = None,
) -> Plan:
    """Plan from the certificate's real names; raise when it does not cover the VIP FQDN."""
    vip, nodes = _normalized_inputs(vip_fqdn, node_fqdns)
    names = certificate_names(cert)
    _require_vip(names, vip)
    cert_type = classify(names)
    uncovered = tuple(node for node in nodes if covering_name(names, node) is None)
    required = lb is LBMode.REENCRYPT and bool(uncovered)
    namespace = _namespace(vip, nodes)
    table_text, table_row = _table_sentence(namespace, cert_type, lb, required)
    reason = " ".join(
        [
            _source_sentence(names, cert_type),
            _coverage_sentence(names, vip, nodes),
            table_text,
            explain_rule(lb, not uncovered, _fit_sentence(uncovered)),
        ]
    )
    return Plan(
        port_5263_required=required,
        reason=reason,
        from_table=table_row is not None,
        table_row=table_row,
        ports=ports_for(required),
        lb_requirement=lb_requirement(lb),
        lb=lb,
        cert_type=cert_type,
        namespace=namespace,
        warnings=_warnings(cert, names, now),
        uncovered_names=uncovered,
    )


def _warnings(
    cert: x509.Certificate, names: CertificateNames, now: datetime | None
) -> tuple[str, ...]:
    """Validity problems, and the CN fallback (many clients ignore the CN entirely)."""
    found = validity_warnings(cert, now if now is not None else datetime.now(UTC))
    if names.from_common_name:
        found += (
            "certificate has no subjectAltName: names were taken from the subject CN, which "
            "modern clients ignore; reissue it with SAN dNSNames",
        )
    return found
