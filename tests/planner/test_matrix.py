"""Table 1 reproduced row by row, the derived cases, name syntax and RFC 6125 matching."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from certgate.errors import BadRequest
from certgate.planner.matrix import (
    TABLE_1,
    CertType,
    InvalidName,
    LBMode,
    Namespace,
    TableRow,
    decide,
    lookup_row,
    name_matches,
    normalize_domain,
)

# The table's data lines exactly as spec 003 prints them.
SPEC_TABLE_1_LINES = (
    "example.com example.com Wildcard, SAN SSL Re-encryption required No",
    "example.com example.com Single Host CN SSL Re-encryption required Yes",
    "example.com example.com Wildcard, SAN SSL Passthrough required No",
    "example.com example.dmz Wildcard, Single Host CN SSL Re-encryption required Yes",
    "example.com example.dmz SAN SSL Re-encryption required No",
    "example.com example.dmz SAN SSL Passthrough required No",
)

TABLE_PAIRS = [(row, cert_type) for row in TABLE_1 for cert_type in row.cert_types]
TABLE_CASES = [
    pytest.param(row, cert_type, id=f"row{row.number}-{cert_type.value}")
    for row, cert_type in TABLE_PAIRS
]

# Combinations Table 1 does not list; under passthrough the answer is always "no 5263".
DERIVED_CASES = [
    ("example.com", "example.com", CertType.SINGLE_HOST_CN, LBMode.PASSTHROUGH),
    ("example.com", "example.dmz", CertType.WILDCARD, LBMode.PASSTHROUGH),
    ("example.com", "example.dmz", CertType.SINGLE_HOST_CN, LBMode.PASSTHROUGH),
]


def _spec_line(row: TableRow) -> str:
    return " ".join(
        [
            row.public_ns,
            row.dmz_ns,
            row.certificate_type,
            row.lb_requirement,
            row.port_5263_required_text,
        ]
    )


def test_table_1_is_the_spec_verbatim() -> None:
    assert [row.number for row in TABLE_1] == [1, 2, 3, 4, 5, 6]
    assert tuple(_spec_line(row) for row in TABLE_1) == SPEC_TABLE_1_LINES


def test_table_1_rows_parse_into_nine_cases() -> None:
    assert [row.namespace for row in TABLE_1] == [Namespace.SHARED] * 3 + [Namespace.DISJOINT] * 3
    assert len(TABLE_CASES) == 9
    assert TABLE_1[3].cert_types == (CertType.WILDCARD, CertType.SINGLE_HOST_CN)


@pytest.mark.parametrize(("row", "cert_type"), TABLE_CASES)
def test_decide_reproduces_table_1(row: TableRow, cert_type: CertType) -> None:
    plan = decide(row.public_ns, row.dmz_ns, cert_type, row.lb)
    assert plan.port_5263_required is row.port_5263_required
    assert plan.from_table is True
    assert plan.table_row == row.number
    assert plan.lb_requirement == row.lb_requirement
    assert plan.reason.startswith(f"Table 1 row {row.number}.")
    assert plan.ports == ((443, 5262, 5263) if row.port_5263_required else (443, 5262))
    assert plan.warnings == ()


@pytest.mark.parametrize(("public_ns", "dmz_ns", "cert_type", "lb"), DERIVED_CASES)
def test_unlisted_combinations_are_derived(
    public_ns: str, dmz_ns: str, cert_type: CertType, lb: LBMode
) -> None:
    plan = decide(public_ns, dmz_ns, cert_type, lb)
    assert plan.port_5263_required is False
    assert plan.from_table is False
    assert plan.table_row is None
    assert plan.reason.startswith("Derived, not from Table 1")
    assert plan.ports == (443, 5262)
    assert plan.lb_requirement == "SSL Passthrough required"


def test_table_and_derived_cases_cover_every_combination_once() -> None:
    listed = {(row.namespace, cert_type, row.lb) for row, cert_type in TABLE_PAIRS}
    derived = {(Namespace.of(p, d), ct, lb) for p, d, ct, lb in DERIVED_CASES}
    everything = set(itertools.product(Namespace, CertType, LBMode))
    assert listed | derived == everything
    assert not listed & derived
    assert len(listed) == 9


def test_lookup_row_is_none_for_unlisted() -> None:
    assert lookup_row(Namespace.DISJOINT, CertType.WILDCARD, LBMode.PASSTHROUGH) is None
    row = lookup_row(Namespace.DISJOINT, CertType.WILDCARD, LBMode.REENCRYPT)
    assert row is not None and row.number == 4


def test_reasons_explain_the_rule() -> None:
    single = decide("example.com", "example.com", CertType.SINGLE_HOST_CN, LBMode.REENCRYPT)
    assert "self-signed" in single.reason and "5263" in single.reason
    wildcard = decide("example.com", "example.dmz", CertType.WILDCARD, LBMode.REENCRYPT)
    assert "*.example.com does not cover node FQDNs in the disjoint example.dmz" in wildcard.reason
    passthrough = decide("example.com", "example.dmz", CertType.SAN, LBMode.PASSTHROUGH)
    assert "must still cover the VIP FQDN" in passthrough.reason


def test_plan_to_dict_is_json_ready() -> None:
    plan = decide("example.com", "example.com", CertType.SINGLE_HOST_CN, LBMode.REENCRYPT)
    assert plan.to_dict() == {
        "port_5263_required": True,
        "reason": plan.reason,
        "from_table": True,
        "table_row": 2,
        "ports": [443, 5262, 5263],
        "lb": "reencrypt",
        "lb_requirement": "SSL Re-encryption required",
        "cert_type": "single-host-cn",
        "namespace": "shared",
        "warnings": [],
        "uncovered_names": [],
    }


@pytest.mark.parametrize(
    ("public_ns", "dmz_ns", "expected"),
    [
        ("example.com", "example.com", Namespace.SHARED),
        ("Example.COM", "example.com.", Namespace.SHARED),
        ("example.com", "example.dmz", Namespace.DISJOINT),
        ("example.com", "dmz.example.com", Namespace.DISJOINT),
    ],
)
def test_namespace_relation(public_ns: str, dmz_ns: str, expected: Namespace) -> None:
    assert Namespace.of(public_ns, dmz_ns) is expected


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("example.com", "example.com"),
        ("EXAMPLE.com.", "example.com"),
        ("1a.example.com", "1a.example.com"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a-b.example.dmz", "a-b.example.dmz"),
    ],
)
def test_normalize_domain_accepts(name: str, canonical: str) -> None:
    assert normalize_domain(name) == canonical


@pytest.mark.parametrize(
    "name",
    [
        "",
        "com",
        ".example.com",
        "example..com",
        "example.com..",
        "-a.example.com",
        "a-.example.com",
        "exa_mple.com",
        "a b.example.com",
        " example.com",
        "*.example.com",
        "bücher.example",
        "10.0.0.1",
        "a" * 64 + ".example.com",
        ".".join(["a" * 60] * 5),
    ],
)
def test_normalize_domain_rejects(name: str) -> None:
    with pytest.raises(InvalidName):
        normalize_domain(name)


def test_decide_validates_namespaces() -> None:
    with pytest.raises(BadRequest, match="DMZ namespace"):
        decide("example.com", "example_dmz", CertType.SAN, LBMode.REENCRYPT)


# RFC 6125 §6.4.1 and §6.4.3 (strict reading), §7.2 for wildcards under a TLD.
RFC6125_CASES = [
    ("a.example.com", "a.example.com", True),
    ("A.Example.COM", "a.example.com", True),
    ("a.example.com.", "a.example.com", True),
    ("a.example.com", "a.example.com.", True),
    ("a.example.com", "b.example.com", False),
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "A.EXAMPLE.COM", True),
    ("*.example.dmz", "node1.example.dmz", True),
    ("*.xn--bcher-kva.example", "a.xn--bcher-kva.example", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", "a.example.org", False),
    ("*.example.com", ".example.com", False),
    ("*.example.com", "*.example.com", False),
    ("f*.example.com", "foo.example.com", False),
    ("*oo.example.com", "foo.example.com", False),
    ("xn--*.example.com", "xn--a.example.com", False),
    ("a.*.example.com", "a.b.example.com", False),
    ("*.*.example.com", "a.b.example.com", False),
    ("*.com", "example.com", False),
    ("*", "com", False),
    ("*.ëxample.com", "a.ëxample.com", False),
    ("", "example.com", False),
]


@pytest.mark.parametrize(("presented", "reference", "expected"), RFC6125_CASES)
def test_rfc6125_matching(presented: str, reference: str, expected: bool) -> None:
    assert name_matches(presented, reference) is expected


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
DOMAIN = st.lists(LABEL, min_size=2, max_size=4).map(".".join)


@settings(max_examples=200)
@given(label=LABEL, domain=DOMAIN)
def test_wildcard_matches_exactly_one_label(label: str, domain: str) -> None:
    assert name_matches(f"*.{domain}", f"{label}.{domain}")
    assert name_matches(f"{label}.{domain}", f"{label.upper()}.{domain}")
    assert not name_matches(f"*.{domain}", domain)
    assert not name_matches(f"*.{domain}", f"{label}.{label}.{domain}")
