"""Device admission (pure, by table) and the console lookups behind it (cache, fail closed)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from certgate.access.devicestatus import (
    ConsoleStatus,
    ConsoleUnavailable,
    DeviceDenied,
    DeviceRecord,
    admit,
    device_identity,
)
from certgate.access.trust import DeviceRoot
from certgate.pki import identity
from certgate.pki.authority import Authority, Names
from certgate.pki.identity import identity_of
from certgate.pki.profiles import APP_CLIENT
from certgate.pki.thumbprint import thumbprint
from tests.access.harness import (
    GROUP,
    ConsolePKI,
    ConsoleStandIn,
    Leaf,
    device_record,
    issue,
)

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


@pytest.fixture(scope="module")
def pki() -> ConsolePKI:
    return ConsolePKI()


@pytest.fixture(scope="module")
def device(pki: ConsolePKI) -> Leaf:
    return pki.device()


def current(pki: ConsolePKI) -> DeviceRoot:
    return DeviceRoot("device-root", "current", pki.device_root.cert)


def uid_of(leaf: Leaf) -> str:
    uid = identity_of(leaf.cert).device_uid
    assert uid is not None
    return uid


def record(leaf: Leaf, **changes: Any) -> DeviceRecord:
    return DeviceRecord.from_json(device_record(uid_of(leaf), **changes))


def test_an_enrolled_compliant_device_is_admitted(device: Leaf) -> None:
    grant = admit(device.cert, identity_of(device.cert), record(device), False, 1234)
    assert grant.device_uid == uid_of(device) and grant.group_id == GROUP
    assert (grant.owner, grant.platform, grant.compliance) == ("alice", "android", "compliant")
    assert grant.cert_thumbprint == thumbprint(device.cert) and grant.auth_time == 1234


@pytest.mark.parametrize(
    ("changes", "revoked", "reason"),
    [
        ({"compliance_status": "noncompliant"}, False, "not compliant (status: noncompliant)"),
        ({"compliance_status": "unknown"}, False, "not compliant (status: unknown)"),
        ({"enrollment_status": "unenrolled"}, False, "device is unenrolled"),
        ({"enrollment_status": "wiped"}, False, "device is wiped"),
        ({"blocked": True}, False, "device is blocked"),
        ({"group_id": "other"}, False, "device is in 'other'"),
        ({}, True, "certificate is revoked"),
    ],
)
def test_refusals_say_why(
    device: Leaf, changes: dict[str, Any], revoked: bool, reason: str
) -> None:
    with pytest.raises(DeviceDenied, match=re.escape(reason)):
        admit(device.cert, identity_of(device.cert), record(device, **changes), revoked, 0)


def test_only_device_identities_sign_in(pki: ConsolePKI, device: Leaf) -> None:
    assert device_identity(device.cert) == identity_of(device.cert)
    app_cert = issue(
        pki.device_root,
        APP_CLIENT,
        Names("app", identity.app(uid_of(device), GROUP, "com.example.mail")),
    )
    with pytest.raises(DeviceDenied, match="not a app one"):
        device_identity(app_cert.cert)
    with pytest.raises(DeviceDenied, match="not a admin one"):
        device_identity(pki.admin().cert)


def test_record_must_be_complete() -> None:
    with pytest.raises(ConsoleUnavailable, match="lacks"):
        DeviceRecord.from_json({"uid": "x"})
    with pytest.raises(ConsoleUnavailable, match="not a JSON object"):
        DeviceRecord.from_json([])


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def status(console: ConsoleStandIn, clock: Clock) -> ConsoleStatus:
    return ConsoleStatus(console.client(), 10, 30, clock)


def test_answers_are_cached_for_the_ttl(pki: ConsolePKI, device: Leaf) -> None:
    console, clock = ConsoleStandIn(pki), Clock()
    console.devices[uid_of(device)] = device_record(uid_of(device))
    lookups = status(console, clock)

    async def three_lookups() -> list[str]:
        first = await lookups.device(uid_of(device))
        console.devices[uid_of(device)]["compliance_status"] = "noncompliant"
        cached = await lookups.device(uid_of(device))
        clock.now += 11
        fresh = await lookups.device(uid_of(device))
        return [first.compliance_status, cached.compliance_status, fresh.compliance_status]

    assert run(three_lookups()) == ["compliant", "compliant", "noncompliant"]
    assert console.requests.count(f"/api/v1/devices/{uid_of(device)}") == 2


def test_console_outage_uses_the_last_answer_within_the_budget_then_fails_closed(
    pki: ConsolePKI, device: Leaf
) -> None:
    console, clock = ConsoleStandIn(pki), Clock()
    console.devices[uid_of(device)] = device_record(uid_of(device))
    lookups = status(console, clock)

    async def scenario() -> None:
        await lookups.device(uid_of(device))
        console.down = True
        clock.now += 39  # past the TTL (10 s), within TTL + budget (40 s)
        assert (await lookups.device(uid_of(device))).compliance_status == "compliant"
        clock.now += 2
        with pytest.raises(ConsoleUnavailable, match=r"console unreachable.*failing closed"):
            await lookups.device(uid_of(device))

    run(scenario())


def test_nothing_cached_and_console_down_fails_closed(pki: ConsolePKI, device: Leaf) -> None:
    console = ConsoleStandIn(pki, down=True)
    with pytest.raises(ConsoleUnavailable, match="failing closed"):
        run(status(console, Clock()).device(uid_of(device)))


def test_unknown_device_is_denied(pki: ConsolePKI, device: Leaf) -> None:
    with pytest.raises(DeviceDenied, match="not known to the console"):
        run(status(ConsoleStandIn(pki), Clock()).device(uid_of(device)))


def test_refused_credentials_fail_closed(pki: ConsolePKI, device: Leaf) -> None:
    console = ConsoleStandIn(pki)
    client = console.client()
    client.headers["authorization"] = "Bearer wrong"
    lookups = ConsoleStatus(client, 10, 30, Clock())
    with pytest.raises(ConsoleUnavailable, match="HTTP 401"):
        run(lookups.device(uid_of(device)))


def test_revocation_comes_from_the_signed_crl(pki: ConsolePKI, device: Leaf) -> None:
    console = ConsoleStandIn(pki)
    other = pki.device()
    console.revoked.add(other.cert.serial_number)
    lookups = status(console, Clock())
    assert run(lookups.is_revoked(other.cert, current(pki))) is True
    assert run(lookups.is_revoked(device.cert, current(pki))) is False


def test_a_crl_from_another_issuer_is_refused(pki: ConsolePKI, device: Leaf) -> None:
    console = ConsoleStandIn(ConsolePKI())  # signs with a different Device Root
    lookups = ConsoleStatus(console.client(), 10, 30, Clock())
    with pytest.raises(ConsoleUnavailable, match="not signed by the Device Root"):
        run(lookups.is_revoked(device.cert, current(pki)))


def test_a_stale_crl_is_refused(pki: ConsolePKI, device: Leaf) -> None:
    class StaleConsole(ConsoleStandIn):
        def crl(self, label: str = "device-root") -> bytes:
            past = datetime.now(UTC) - timedelta(days=2)
            authority = Authority(clock=lambda: past)
            crl = authority.sign_crl(self.pki.device_root, [], 1, past + timedelta(days=1))
            return crl.public_bytes(Encoding.DER)

    lookups = status(StaleConsole(pki), Clock())
    with pytest.raises(ConsoleUnavailable, match="stale"):
        run(lookups.is_revoked(device.cert, current(pki)))


def test_revocation_is_read_from_the_crl_of_the_certificates_issuer(pki: ConsolePKI) -> None:
    """During a Device Root rotation each root has its CRL (``/pki/crl/<label>.crl``): a
    serial revoked under one root says nothing of the other's certificates."""
    console = ConsoleStandIn(ConsolePKI())
    nxt = console.pki.rotate("device-root@3")
    console.trusted.append(("device-root@3", "next"))
    old, new = console.pki.device(), console.pki.device(label="device-root@3")
    console.revoked.add(new.cert.serial_number)
    lookups = status(console, Clock())
    new_root = DeviceRoot("device-root@3", "next", nxt.cert)
    assert run(lookups.is_revoked(new.cert, new_root)) is True
    assert "/pki/crl/device-root@3.crl" in console.requests
    wrong = DeviceRoot("device-root@3", "next", console.pki.device_root.cert)
    with pytest.raises(ConsoleUnavailable, match="not signed by the Device Root"):
        run(status(console, Clock()).is_revoked(old.cert, wrong))  # signed by another key
