"""Cert proxy port planner: the spec's Table 1 as data, and the rule that generalizes it.

The spec (003, "Cert Proxy Configuration Decision Matrix") answers one question: does the
CertProxy service need its secondary port 5263? The rule behind the six rows:

* Port 5262 is always Layer 4 SSL passthrough, so CertProxy must present the publicly
  trusted certificate there.
* With SSL **passthrough** on 443 the node itself serves that public certificate on 443 and
  shares it with CertProxy, so the two never mismatch and 5263 is never needed.
* With SSL **re-encryption** on 443 the load balancer presents the public certificate and
  the node's Access service needs one the balancer can trust for the node. If the public
  certificate also covers every node FQDN it is installed there too (no mismatch, no 5263);
  otherwise Access keeps its self-signed certificate and CertProxy needs port 5263 sharing
  that self-signed certificate.

Everything here is pure: no files, no clock, no network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from certgate.errors import BadRequest

__all__ = [
    "CERTPROXY_PORT",
    "CERTPROXY_SECONDARY_PORT",
    "HTTPS_PORT",
    "TABLE_1",
    "CertType",
    "InvalidName",
    "LBMode",
    "Namespace",
    "Plan",
    "TableRow",
    "decide",
    "explain_rule",
    "lb_requirement",
    "lookup_row",
    "name_matches",
    "normalize_domain",
    "ports_for",
]

HTTPS_PORT = 443
CERTPROXY_PORT = 5262
CERTPROXY_SECONDARY_PORT = 5263

# RFC 1123 §2.1: letters, digits and hyphens; a label may start with a digit but neither
# starts nor ends with a hyphen; 63 octets at most (RFC 1035 §2.3.4).
_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_MAX_DOMAIN_LENGTH = 253  # RFC 1035 §2.3.4, without the trailing root dot


class InvalidName(BadRequest):
    """A namespace or FQDN is not a syntactically valid DNS name."""


class CertType(Enum):
    """The three certificate shapes Table 1 distinguishes."""

    WILDCARD = "wildcard"
    SAN = "san"
    SINGLE_HOST_CN = "single-host-cn"


class LBMode(Enum):
    """How the load balancer handles HTTPS 443 (5262 is always passthrough)."""

    REENCRYPT = "reencrypt"
    PASSTHROUGH = "passthrough"


class Namespace(Enum):
    """How the public namespace relates to the DMZ namespace the nodes live in."""

    SHARED = "shared"
    DISJOINT = "disjoint"

    @classmethod
    def of(cls, public_ns: str, dmz_ns: str) -> Namespace:
        """Shared when the two domains are equal, disjoint otherwise.

        A DMZ namespace nested under the public one (``dmz.example.com``) is disjoint too:
        a wildcard for ``example.com`` does not reach one label further (RFC 6125 §6.4.3).
        """
        public = normalize_domain(public_ns, what="public namespace")
        dmz = normalize_domain(dmz_ns, what="DMZ namespace")
        return cls.SHARED if public == dmz else cls.DISJOINT


_CERT_TYPE_WORDING = {
    "Wildcard": CertType.WILDCARD,
    "SAN": CertType.SAN,
    "Single Host CN": CertType.SINGLE_HOST_CN,
}
_LB_WORDING = {
    "SSL Re-encryption required": LBMode.REENCRYPT,
    "SSL Passthrough required": LBMode.PASSTHROUGH,
}


@dataclass(frozen=True)
class TableRow:
    """One row of Table 1, kept in the spec's own words; the enums are parsed from them."""

    number: int
    public_ns: str
    dmz_ns: str
    certificate_type: str
    lb_requirement: str
    port_5263_required_text: str

    @property
    def cert_types(self) -> tuple[CertType, ...]:
        """The certificate types the row covers ("Wildcard, SAN" is two cases)."""
        return tuple(_CERT_TYPE_WORDING[part.strip()] for part in self.certificate_type.split(","))

    @property
    def lb(self) -> LBMode:
        """The load balancer mode the row is about."""
        return _LB_WORDING[self.lb_requirement]

    @property
    def namespace(self) -> Namespace:
        """Shared or disjoint, from the row's two example domains."""
        return Namespace.of(self.public_ns, self.dmz_ns)

    @property
    def port_5263_required(self) -> bool:
        """The row's answer."""
        return {"Yes": True, "No": False}[self.port_5263_required_text]


# Table 1. Cert Proxy Configuration Decision Matrix (spec 003), verbatim.
TABLE_1: tuple[TableRow, ...] = (
    TableRow(1, "example.com", "example.com", "Wildcard, SAN", "SSL Re-encryption required", "No"),
    TableRow(
        2, "example.com", "example.com", "Single Host CN", "SSL Re-encryption required", "Yes"
    ),
    TableRow(3, "example.com", "example.com", "Wildcard, SAN", "SSL Passthrough required", "No"),
    TableRow(
        4,
        "example.com",
        "example.dmz",
        "Wildcard, Single Host CN",
        "SSL Re-encryption required",
        "Yes",
    ),
    TableRow(5, "example.com", "example.dmz", "SAN", "SSL Re-encryption required", "No"),
    TableRow(6, "example.com", "example.dmz", "SAN", "SSL Passthrough required", "No"),
)


@dataclass(frozen=True)
class Plan:
    """The planner's answer: whether 5263 is needed, why, and where the answer came from."""

    port_5263_required: bool
    reason: str
    from_table: bool
    table_row: int | None
    ports: tuple[int, ...]
    lb_requirement: str
    lb: LBMode
    cert_type: CertType
    namespace: Namespace
    warnings: tuple[str, ...] = ()
    uncovered_names: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready view (enums as their values)."""
        return {
            "port_5263_required": self.port_5263_required,
            "reason": self.reason,
            "from_table": self.from_table,
            "table_row": self.table_row,
            "ports": list(self.ports),
            "lb": self.lb.value,
            "lb_requirement": self.lb_requirement,
            "cert_type": self.cert_type.value,
            "namespace": self.namespace.value,
            "warnings": list(self.warnings),
            "uncovered_names": list(self.uncovered_names),
        }


def normalize_domain(name: str, *, what: str = "domain") -> str:
    """Lower-case ``name`` and check it is a DNS name of at least two labels; raise if not.

    One trailing root dot is accepted and dropped. Only A-labels are accepted (IDNs must be
    given in their ``xn--`` form, RFC 5890 §2.3.2.1); a numeric last label is refused so an
    IPv4 address is never mistaken for a domain (RFC 3696 §2).
    """
    if not isinstance(name, str) or not name.isascii():
        raise InvalidName(f"{what} {name!r} must be an ASCII DNS name (use xn-- A-labels)")
    canonical = name.lower().removesuffix(".")
    if len(canonical) > _MAX_DOMAIN_LENGTH:
        raise InvalidName(f"{what} {name!r} is longer than {_MAX_DOMAIN_LENGTH} characters")
    labels = canonical.split(".")
    if len(labels) < 2:
        raise InvalidName(f"{what} {name!r} needs at least two labels (host.domain)")
    for label in labels:
        if not _LABEL_RE.fullmatch(label):
            raise InvalidName(f"{what} {name!r} has an invalid label {label!r} (RFC 1123 §2.1)")
    if labels[-1].isdigit():
        raise InvalidName(f"{what} {name!r} has an all-numeric top-level label (RFC 3696 §2)")
    return canonical


def _canonical_identifier(name: str) -> list[str] | None:
    """Labels of a presented or reference identifier, or None when it cannot match anything."""
    if not name.isascii():
        return None  # RFC 6125 §6.4.2: compare A-labels; a U-label here is a malformed name
    labels = name.lower().removesuffix(".").split(".")
    if any(label == "" for label in labels):
        return None
    return labels


def name_matches(presented: str, reference: str) -> bool:
    """True when a certificate's DNS name ``presented`` covers host ``reference``.

    RFC 6125 §6.4.1: ASCII case-insensitive comparison. §6.4.3, in its strict reading: a
    wildcard is only the whole left-most label (``f*.example.com`` never matches), matches
    exactly one label (``*.example.com`` matches neither ``example.com`` nor
    ``a.b.example.com``), and the reference identifier itself never holds a wildcard.
    §7.2: a wildcard directly under a top-level domain (``*.com``) is refused.
    """
    presented_labels = _canonical_identifier(presented)
    reference_labels = _canonical_identifier(reference)
    if presented_labels is None or reference_labels is None:
        return False
    if any("*" in label for label in reference_labels):
        return False
    first, rest = presented_labels[0], presented_labels[1:]
    if any("*" in label for label in rest):
        return False
    if "*" not in first:
        return presented_labels == reference_labels
    if first != "*" or len(rest) < 2:
        return False
    return len(reference_labels) == len(presented_labels) and reference_labels[1:] == rest


def lb_requirement(lb: LBMode) -> str:
    """Table 1's "Load Balancer Requirement" wording for ``lb``."""
    return {v: k for k, v in _LB_WORDING.items()}[lb]


def ports_for(port_5263_required: bool) -> tuple[int, ...]:
    """The ports the load balancer forwards to every node."""
    if port_5263_required:
        return (HTTPS_PORT, CERTPROXY_PORT, CERTPROXY_SECONDARY_PORT)
    return (HTTPS_PORT, CERTPROXY_PORT)


def lookup_row(namespace: Namespace, cert_type: CertType, lb: LBMode) -> TableRow | None:
    """The Table 1 row listing this combination, or None when the table is silent."""
    for row in TABLE_1:
        if row.namespace is namespace and cert_type in row.cert_types and row.lb is lb:
            return row
    return None


def _public_cert_fits_nodes(namespace: Namespace, cert_type: CertType) -> bool:
    """Whether a certificate of this type, issued for the public namespace, covers the nodes.

    The spec defines a SAN certificate as listing the VIP FQDN and every node FQDN; a
    wildcard covers nodes one label under the same domain (shared namespace only); a single
    host certificate names the VIP alone.
    """
    if cert_type is CertType.SAN:
        return True
    if cert_type is CertType.WILDCARD:
        return namespace is Namespace.SHARED
    return False


def _fit_explanation(cert_type: CertType, public: str, dmz: str) -> str:
    """Why a public certificate of ``cert_type`` does or does not cover the node FQDNs."""
    if cert_type is CertType.SAN:
        return "the SAN certificate lists the VIP FQDN and every node FQDN"
    if cert_type is CertType.WILDCARD and public == dmz:
        return f"the wildcard *.{public} covers node FQDNs one label under {dmz}"
    if cert_type is CertType.WILDCARD:
        return f"the wildcard *.{public} does not cover node FQDNs in the disjoint {dmz}"
    return "a single host CN certificate names only the VIP FQDN, not the nodes"


def explain_rule(lb: LBMode, fits_nodes: bool, fit_explanation: str) -> str:
    """The general rule, in words, for one load balancer mode and node coverage."""
    if lb is LBMode.PASSTHROUGH:
        return (
            "SSL passthrough on 443: each node serves the publicly trusted certificate on 443 "
            "and CertProxy shares it on 5262, so the two services never mismatch and port "
            "5263 is not required (the certificate must still cover the VIP FQDN)."
        )
    if fits_nodes:
        return (
            f"SSL re-encryption on 443: {fit_explanation}, so the public certificate is also "
            "installed on the nodes for 443; Access and CertProxy (5262) share it and port "
            "5263 is not required."
        )
    return (
        f"SSL re-encryption on 443: {fit_explanation}, so Access on 443 keeps its self-signed "
        "certificate while 5262 (always Layer 4 passthrough) needs the public one; CertProxy "
        "requires secondary port 5263 sharing the self-signed certificate."
    )


def decide(public_ns: str, dmz_ns: str, cert_type: CertType, lb: LBMode) -> Plan:
    """Plan from namespaces and certificate type: Table 1 when it lists the case, else derived."""
    public = normalize_domain(public_ns, what="public namespace")
    dmz = normalize_domain(dmz_ns, what="DMZ namespace")
    namespace = Namespace.of(public, dmz)
    fits_nodes = _public_cert_fits_nodes(namespace, cert_type)
    required = lb is LBMode.REENCRYPT and not fits_nodes
    rule = explain_rule(lb, fits_nodes, _fit_explanation(cert_type, public, dmz))
    row = lookup_row(namespace, cert_type, lb)
    if row is not None and row.port_5263_required != required:
        # The rule was chosen to reproduce the table; disagreement is a bug, not user input.
        raise AssertionError(f"rule contradicts Table 1 row {row.number}")
    if row is not None:
        reason = f"Table 1 row {row.number}. {rule}"
    else:
        reason = (
            f"Derived, not from Table 1 (the table does not list a {cert_type.value} "
            f"certificate in a {namespace.value} namespace with {lb.value}). {rule}"
        )
    return Plan(
        port_5263_required=required,
        reason=reason,
        from_table=row is not None,
        table_row=row.number if row is not None else None,
        ports=ports_for(required),
        lb_requirement=lb_requirement(lb),
        lb=lb,
        cert_type=cert_type,
        namespace=namespace,
    )
