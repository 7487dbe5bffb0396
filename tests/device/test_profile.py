"""Per-App Tunnel profiles: strict parsing, renewal arithmetic, and delivery, re-delivery
and maintenance against a real console (SQLite; see test_enroll.py for why)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from certgate.device.enroll import ConsoleAPI, DeviceUnenrolled, authenticate_app, enroll
from certgate.device.profile import (
    Profile,
    fetch_profile,
    load_profile,
    maintain,
    renewal_due,
)
from certgate.device.rules import Action
from certgate.device.state import StateDir
from certgate.errors import ConfigError
from certgate.pki.authority import Authority, Names
from certgate.pki.csr import build_csr
from certgate.pki.keys import generate_key
from certgate.pki.profiles import CA_USAGE
from certgate.pki.profiles import Profile as CertProfile
from tests.device.console_side import (
    PASSWORD,
    USER,
    add_enrollment_user,
    admin_call,
    configure_group,
    enrollment_token,
    root_pem,
    unenroll,
)
from tests.device.harness import RULES
from tests.support import RunningConsole

pytestmark = pytest.mark.integration
on_sqlite = pytest.mark.parametrize("console", ["sqlite"], indirect=True)
NOW = datetime(2030, 1, 1, tzinfo=UTC)


# -- pure ----------------------------------------------------------------------------------


def cert_valid(start: datetime, days: int) -> x509.Certificate:
    """A certificate valid exactly from ``start`` for ``days`` (no backdating)."""
    lifetime = CertProfile("test", timedelta(days=days), True, CA_USAGE, backdate=timedelta(0))
    authority = Authority(clock=lambda: start)
    return authority.create_root(generate_key(), Names("t"), profile=lifetime)


@pytest.mark.parametrize(
    ("elapsed_days", "fraction", "due"),
    [
        (0, 1 / 3, False),
        (60, 1 / 3, False),  # 30 of 90 days left: exactly a third is not "less than"
        (61, 1 / 3, True),
        (10, 0.9, True),
        (89, 0.01, False),
        (90, 0.01, True),
        (120, 0.5, True),  # expired
    ],
)
def test_renewal_is_due_when_less_than_the_fraction_remains(
    elapsed_days: int, fraction: float, due: bool
) -> None:
    cert = cert_valid(NOW, 90)
    assert renewal_due(cert, fraction, NOW + timedelta(days=elapsed_days)) is due


@pytest.mark.parametrize("fraction", [0, 1, -0.5, 2])
def test_renewal_fraction_must_be_inside_zero_and_one(fraction: float) -> None:
    with pytest.raises(ConfigError, match="between 0 and 1"):
        renewal_due(cert_valid(NOW, 10), fraction, NOW)


def profile_dict(trust_pem: str) -> dict[str, Any]:
    return {
        "version": 3,
        "device_uid": "ab" * 16,
        "group_id": "g1",
        "tunnel": {"hosts": ["localhost", "127.0.0.1"], "per_app_port": 8443, "proxy_port": 2020},
        "tunnel_trust": [trust_pem],
        "rules": RULES,
        "thumbprint": "0" * 64,
        "tunnel_identity_thumbprint": "1" * 64,  # extra keys are tolerated
    }


@pytest.fixture(scope="module")
def trust_pem() -> str:
    return cert_valid(NOW, 10).public_bytes(Encoding.PEM).decode()


def test_a_valid_profile_parses(trust_pem: str) -> None:
    profile = Profile.from_dict(profile_dict(trust_pem))
    assert profile.version == 3
    assert profile.tunnel.per_app() == [("localhost", 8443), ("127.0.0.1", 8443)]
    assert profile.rules.evaluate("com.example.mail", "localhost").action is Action.BLOCK


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.pop("rules"),
        lambda p: p.update(version=0),
        lambda p: p.update(version=True),
        lambda p: p.update(device_uid="AB" * 16),
        lambda p: p.update(group_id="Bad Group"),
        lambda p: p["tunnel"].update(hosts=[]),
        lambda p: p["tunnel"].update(per_app_port=70000),
        lambda p: p["tunnel"].update(hosts=["bad host!"]),
        lambda p: p.update(tunnel_trust=["not a pem"]),
        lambda p: p.update(rules={"default": "teleport", "rules": []}),
        lambda p: p.update(thumbprint="xyz"),
    ],
)
def test_a_damaged_profile_is_refused(trust_pem: str, damage: Any) -> None:
    data = copy.deepcopy(profile_dict(trust_pem))
    damage(data)
    with pytest.raises(ConfigError, match="profile"):
        Profile.from_dict(data)


# -- against the console ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(console: RunningConsole) -> RunningConsole:
    add_enrollment_user(console)
    configure_group(console, RULES)
    return console


def enrolled(console: RunningConsole, directory: Path) -> tuple[StateDir, ConsoleAPI]:
    state = StateDir(directory)
    enroll(state, console.url, root_pem(console), token=enrollment_token(console))
    return state, ConsoleAPI.for_state(state)


def certificates(console: RunningConsole) -> dict[str, dict[str, Any]]:
    rows = admin_call(console, "GET", "/api/v1/groups/global/certificates")
    return {row["thumbprint"]: row for row in rows}


@on_sqlite
def test_a_newer_profile_replaces_the_device_certificate(
    prepared: RunningConsole, tmp_path: Path
) -> None:
    state, api = enrolled(prepared, tmp_path / "state")
    with api:
        first = fetch_profile(state, api)
        second = fetch_profile(state, api)
    assert (first.profile.version, second.profile.version) == (1, 2)
    assert first.previous_thumbprint is None
    assert second.previous_thumbprint == first.identity.thumbprint
    current = state.device_identity()
    assert current is not None and current.thumbprint == second.identity.thumbprint
    assert load_profile(state) == second.profile
    on_disk = b"".join(p.read_bytes() for p in state.path.rglob("*") if p.is_file())
    assert first.identity.cert_pem()[:300] not in on_disk  # the old cert and key are gone
    issued = certificates(prepared)
    assert issued[first.identity.thumbprint]["revoked_at"] is not None
    assert issued[second.identity.thumbprint]["revoked_at"] is None


@on_sqlite
def test_maintenance_renews_only_when_due(prepared: RunningConsole, tmp_path: Path) -> None:
    state, api = enrolled(prepared, tmp_path / "state")
    with api:
        fetch_profile(state, api)
        authenticate_app(state, "com.example.browser", USER, PASSWORD)
        quiet = maintain(state, api, 1 / 3)
        # A year-long cert a few seconds old has more than 0.99999 of its life left.
        due = maintain(state, api, 0.99999999)
    assert quiet.delivery is None and quiet.apps_due == ()
    assert due.delivery is not None and due.delivery.profile.version == 2
    assert due.reason is not None and due.reason.startswith("device certificate expires")
    assert [a.bundle_id for a in due.apps_due] == ["com.example.browser"]


@on_sqlite
def test_maintenance_notices_a_profile_delivered_elsewhere(
    prepared: RunningConsole, tmp_path: Path
) -> None:
    state, api = enrolled(prepared, tmp_path / "state")
    with api:
        fetch_profile(state, api)
        # Same credential, another copy of the agent: the console now has v2, we have v1.
        api.call("POST", "/api/v1/device/profile", {"csr": build_csr(generate_key(), "x").decode()})
        report = maintain(state, api, 1 / 3)
    assert report.reason == "the console delivered profile v2; this device has v1"
    assert report.delivery is not None and report.delivery.profile.version == 3


@on_sqlite
def test_maintenance_of_an_unenrolled_device_says_so(
    prepared: RunningConsole, tmp_path: Path
) -> None:
    state, api = enrolled(prepared, tmp_path / "state")
    with api:
        fetch_profile(state, api)
        unenroll(prepared, state.enrollment().device_uid)
        with pytest.raises(DeviceUnenrolled, match="unenrolled; enroll it again"):
            maintain(state, api, 1 / 3)
        with pytest.raises(DeviceUnenrolled):
            fetch_profile(state, api)
