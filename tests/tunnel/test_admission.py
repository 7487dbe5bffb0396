"""Tests for certgate.tunnel.admission: one table row per reason, both modes admitted."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, NamedTuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from certgate.errors import ChainError
from certgate.feed import ComplianceStatus, EnrollmentStatus, Entry
from certgate.pki import identity
from certgate.pki.thumbprint import thumbprint
from certgate.tunnel.admission import (
    AdmissionRequest,
    Decision,
    DenyReason,
    Mode,
    PeerIdentity,
    admit,
    peer_identity,
)

GROUP = "g"
UID = "0123456789abcdef0123456789abcdef"
OTHER_UID = "fedcba9876543210fedcba9876543210"
APP = "com.example.mail"
TP = "ab" * 32
NOW = 1_800_000_000.0
LATER = 1_900_000_000

PROXY_LEAF = PeerIdentity(TP, identity.app(UID, GROUP, APP), float(LATER))
DEVICE_LEAF = PeerIdentity(TP, identity.device(UID, GROUP), float(LATER))
PROXY_ENTRY = Entry(
    thumbprint=TP,
    device_uid=UID,
    group_id=GROUP,
    app_bundle_id=APP,
    enrollment_status=EnrollmentStatus.ENROLLED,
    compliance_status=ComplianceStatus.COMPLIANT,
    blocked=False,
    not_after=LATER,
)
DEVICE_ENTRY = dataclasses.replace(PROXY_ENTRY, app_bundle_id=None)
FRESH = AdmissionRequest(table_fresh=True)
FRESH_WITH_APP = AdmissionRequest(table_fresh=True, app_bundle_id="com.example.browser")


class Row(NamedTuple):
    name: str
    mode: Mode
    leaf: PeerIdentity
    entry: Entry | None
    request: AdmissionRequest
    expected: DenyReason | None
    now: float = NOW


def proxy_entry(**changes: Any) -> Entry:
    return dataclasses.replace(PROXY_ENTRY, **changes)


def device_entry(**changes: Any) -> Entry:
    return dataclasses.replace(DEVICE_ENTRY, **changes)


P, A = Mode.PROXY, Mode.PER_APP
ROWS = [
    # admitted
    Row("proxy-admitted", P, PROXY_LEAF, PROXY_ENTRY, FRESH, None),
    Row("proxy-admitted-same-app", P, PROXY_LEAF, PROXY_ENTRY, AdmissionRequest(True, APP), None),
    Row("per-app-admitted", A, DEVICE_LEAF, DEVICE_ENTRY, FRESH_WITH_APP, None),
    Row(
        "admitted-just-before-expiry", A, DEVICE_LEAF, DEVICE_ENTRY, FRESH_WITH_APP, None, LATER - 1
    ),
    # stale table: nothing new, whatever the entry says
    Row("proxy-stale", P, PROXY_LEAF, PROXY_ENTRY, AdmissionRequest(False), DenyReason.STALE_TABLE),
    Row(
        "per-app-stale",
        A,
        DEVICE_LEAF,
        DEVICE_ENTRY,
        AdmissionRequest(False, "com.example.browser"),
        DenyReason.STALE_TABLE,
    ),
    # unknown
    Row("unknown", P, PROXY_LEAF, None, FRESH, DenyReason.UNKNOWN_THUMBPRINT),
    Row(
        "entry-for-another-cert",
        P,
        PROXY_LEAF,
        proxy_entry(thumbprint="cd" * 32),
        FRESH,
        DenyReason.UNKNOWN_THUMBPRINT,
    ),
    # kind
    Row("proxy-device-cert", P, DEVICE_LEAF, DEVICE_ENTRY, FRESH, DenyReason.WRONG_KIND),
    Row("proxy-device-entry", P, PROXY_LEAF, DEVICE_ENTRY, FRESH, DenyReason.WRONG_KIND),
    Row("per-app-app-cert", A, PROXY_LEAF, PROXY_ENTRY, FRESH_WITH_APP, DenyReason.WRONG_KIND),
    Row("per-app-app-entry", A, DEVICE_LEAF, PROXY_ENTRY, FRESH_WITH_APP, DenyReason.WRONG_KIND),
    Row(
        "admin-cert",
        A,
        PeerIdentity(TP, identity.admin(UID), float(LATER)),
        DEVICE_ENTRY,
        FRESH_WITH_APP,
        DenyReason.WRONG_KIND,
    ),
    Row(
        "tunnel-cert",
        P,
        PeerIdentity(TP, identity.tunnel(GROUP), float(LATER)),
        PROXY_ENTRY,
        FRESH,
        DenyReason.WRONG_KIND,
    ),
    # group and identity binding
    Row(
        "other-group",
        P,
        PeerIdentity(TP, identity.app(UID, "h", APP), float(LATER)),
        proxy_entry(group_id="h"),
        FRESH,
        DenyReason.WRONG_GROUP,
    ),
    Row(
        "entry-other-device",
        P,
        PROXY_LEAF,
        proxy_entry(device_uid=OTHER_UID),
        FRESH,
        DenyReason.IDENTITY_MISMATCH,
    ),
    Row(
        "entry-other-group",
        A,
        DEVICE_LEAF,
        device_entry(group_id="h"),
        FRESH_WITH_APP,
        DenyReason.IDENTITY_MISMATCH,
    ),
    Row(
        "entry-other-app",
        P,
        PROXY_LEAF,
        proxy_entry(app_bundle_id="com.example.other"),
        FRESH,
        DenyReason.APP_MISMATCH,
    ),
    Row(
        "request-other-app",
        P,
        PROXY_LEAF,
        PROXY_ENTRY,
        AdmissionRequest(True, "com.example.other"),
        DenyReason.APP_MISMATCH,
    ),
    # lifecycle
    Row(
        "unenrolled",
        P,
        PROXY_LEAF,
        proxy_entry(enrollment_status=EnrollmentStatus.UNENROLLED),
        FRESH,
        DenyReason.UNENROLLED,
    ),
    Row(
        "wiped",
        A,
        DEVICE_LEAF,
        device_entry(enrollment_status=EnrollmentStatus.WIPED),
        FRESH_WITH_APP,
        DenyReason.WIPED,
    ),
    Row("blocked", P, PROXY_LEAF, proxy_entry(blocked=True), FRESH, DenyReason.BLOCKED),
    Row(
        "noncompliant",
        A,
        DEVICE_LEAF,
        device_entry(compliance_status=ComplianceStatus.NONCOMPLIANT),
        FRESH_WITH_APP,
        DenyReason.NONCOMPLIANT,
    ),
    Row(
        "compliance-unknown",
        P,
        PROXY_LEAF,
        proxy_entry(compliance_status=ComplianceStatus.UNKNOWN),
        FRESH,
        DenyReason.COMPLIANCE_UNKNOWN,
    ),
    Row("expired-at-not-after", P, PROXY_LEAF, PROXY_ENTRY, FRESH, DenyReason.EXPIRED, LATER),
    Row(
        "leaf-expired",
        P,
        dataclasses.replace(PROXY_LEAF, not_after=NOW - 1),
        PROXY_ENTRY,
        FRESH,
        DenyReason.EXPIRED,
    ),
    Row(
        "entry-expired",
        A,
        DEVICE_LEAF,
        device_entry(not_after=int(NOW) - 1),
        FRESH_WITH_APP,
        DenyReason.EXPIRED,
    ),
    # the app named in a per-app request
    Row("per-app-no-app", A, DEVICE_LEAF, DEVICE_ENTRY, FRESH, DenyReason.INVALID_APP),
    Row(
        "per-app-bad-app",
        A,
        DEVICE_LEAF,
        DEVICE_ENTRY,
        AdmissionRequest(True, "com.example:evil\r\nX-Injected: 1"),
        DenyReason.INVALID_APP,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_admission_table(row: Row) -> None:
    decision = admit(row.leaf, row.entry, row.mode, row.request, row.now, GROUP)
    assert decision.reason is row.expected
    assert decision.admitted is (row.expected is None)
    if row.expected is None:
        assert decision.http_status == 200
    else:
        assert decision.detail.startswith(row.expected.value + ": ")
        assert decision.app_bundle_id is None


def test_every_reason_has_a_row() -> None:
    assert {row.expected for row in ROWS} == {*DenyReason, None}


def test_http_statuses() -> None:
    statuses = {
        row.expected: admit(row.leaf, row.entry, row.mode, row.request, row.now, GROUP).http_status
        for row in ROWS
    }
    assert statuses.pop(DenyReason.STALE_TABLE) == 503
    assert statuses.pop(DenyReason.INVALID_APP) == 400
    assert statuses.pop(None) == 200
    assert set(statuses.values()) == {403}


def test_admitted_traffic_is_attributed_to_an_app() -> None:
    proxy = admit(PROXY_LEAF, PROXY_ENTRY, P, FRESH, NOW, GROUP)
    per_app = admit(DEVICE_LEAF, DEVICE_ENTRY, A, FRESH_WITH_APP, NOW, GROUP)
    assert proxy.app_bundle_id == APP
    assert per_app.app_bundle_id == "com.example.browser"


def test_first_failing_check_wins() -> None:
    everything_wrong = device_entry(
        enrollment_status=EnrollmentStatus.WIPED,
        compliance_status=ComplianceStatus.NONCOMPLIANT,
        blocked=True,
        not_after=0,
    )
    request = AdmissionRequest(True, None)
    assert admit(DEVICE_LEAF, everything_wrong, A, request, NOW, GROUP).reason is DenyReason.WIPED
    blocked_and_noncompliant = dataclasses.replace(
        everything_wrong, enrollment_status=EnrollmentStatus.ENROLLED
    )
    decision = admit(DEVICE_LEAF, blocked_and_noncompliant, A, request, NOW, GROUP)
    assert decision.reason is DenyReason.BLOCKED
    stale = AdmissionRequest(False, None)
    assert admit(DEVICE_LEAF, None, A, stale, NOW, GROUP).reason is DenyReason.STALE_TABLE


def test_detail_never_echoes_malformed_request_text() -> None:
    hostile = "com.example:evil\r\nX-Injected: 1"
    for mode, leaf, entry in ((P, PROXY_LEAF, PROXY_ENTRY), (A, DEVICE_LEAF, DEVICE_ENTRY)):
        decision = admit(leaf, entry, mode, AdmissionRequest(True, hostile), NOW, GROUP)
        assert not decision.admitted
        assert "evil" not in decision.detail and "\n" not in decision.detail


@settings(max_examples=300, deadline=None)
@given(
    mode=st.sampled_from(Mode),
    leaf=st.sampled_from([PROXY_LEAF, DEVICE_LEAF]),
    entry=st.one_of(
        st.none(),
        st.builds(
            dataclasses.replace,
            st.sampled_from([PROXY_ENTRY, DEVICE_ENTRY]),
            enrollment_status=st.sampled_from(EnrollmentStatus),
            compliance_status=st.sampled_from(ComplianceStatus),
            blocked=st.booleans(),
            not_after=st.integers(0, 2 * LATER),
        ),
    ),
    fresh=st.booleans(),
    app=st.one_of(st.none(), st.text(max_size=20), st.just(APP)),
    now=st.floats(0, 2 * LATER, allow_nan=False),
)
def test_admitted_only_when_every_condition_holds(
    mode: Mode,
    leaf: PeerIdentity,
    entry: Entry | None,
    fresh: bool,
    app: str | None,
    now: float,
) -> None:
    decision = admit(leaf, entry, mode, AdmissionRequest(fresh, app), now, GROUP)
    assert isinstance(decision, Decision)
    assert decision.admitted is (decision.reason is None)
    if decision.admitted:
        assert entry is not None and fresh
        assert entry.enrollment_status is EnrollmentStatus.ENROLLED and not entry.blocked
        assert entry.compliance_status is ComplianceStatus.COMPLIANT
        assert now < min(entry.not_after, leaf.not_after)
        wanted = identity.IdentityKind.APP if mode is P else identity.IdentityKind.DEVICE
        assert leaf.identity.kind is wanted
        if mode is A:
            assert app is not None and identity.BUNDLE_ID_RE.fullmatch(app)
        else:
            assert app in (None, APP)


# --- peer_identity ---------------------------------------------------------------------


def make_cert(*uris: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")])
    not_before = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + dt.timedelta(days=30))
    )
    if uris:
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(key, hashes.SHA256())


def test_peer_identity_extracts_thumbprint_identity_and_expiry() -> None:
    ident = identity.app(UID, GROUP, APP)
    cert = make_cert(ident.uri())
    peer = peer_identity(cert)
    assert peer == PeerIdentity(
        thumbprint(cert), ident, dt.datetime(2026, 1, 31, tzinfo=dt.UTC).timestamp()
    )


@pytest.mark.parametrize(
    "uris",
    [
        (),
        ("urn:certgate:device:" + UID.upper() + ":group:g",),
        (identity.device(UID, GROUP).uri(), identity.device(OTHER_UID, GROUP).uri()),
    ],
    ids=["no-san", "non-canonical", "two-identities"],
)
def test_peer_identity_refuses_bad_identities(uris: tuple[str, ...]) -> None:
    with pytest.raises(ChainError):
        peer_identity(make_cert(*uris))
