"""The Device Root set Access trusts: the console's answer checked, the issuer found by
signature, and the follower that keeps the set in use when the console fails."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from certgate.access.install import load_material
from certgate.access.trust import (
    DeviceRootSet,
    TrustFollower,
    TrustUnavailable,
    load_device_roots,
    parse_device_roots,
)
from certgate.errors import ChainError
from certgate.pki.authority import Names
from certgate.pki.profiles import DEVICE_CLIENT
from certgate.pki.thumbprint import thumbprint
from tests.access.harness import (
    ConsolePKI,
    ConsoleStandIn,
    PublicPKI,
    install_request,
    installed,
    issue,
    new_intermediate,
    pem,
)

T = TypeVar("T")
NEXT = "device-root@4"


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


@pytest.fixture
def console() -> ConsoleStandIn:
    stand_in = ConsoleStandIn(ConsolePKI())
    stand_in.pki.rotate(NEXT)
    stand_in.trusted.append((NEXT, "next"))
    return stand_in


def entry(label: str, status: str, cert: Any) -> dict[str, str]:
    return {"label": label, "status": status, "certificate": pem(cert).decode()}


def test_the_consoles_answer_is_the_set(console: ConsoleStandIn) -> None:
    roots = parse_device_roots(console.device_roots(), console.pki.root.cert)
    assert [(r.label, r.status) for r in roots.roots] == [
        ("device-root", "current"),
        (NEXT, "next"),
    ]
    assert roots.certs == [console.pki.device_root.cert, console.pki.rotated[NEXT].cert]
    assert roots.roots[1].crl_path == f"/pki/crl/{NEXT}.crl"


def _refusal(console: ConsoleStandIn, answer: object) -> str:
    with pytest.raises(TrustUnavailable) as raised:
        parse_device_roots(answer, console.pki.root.cert)
    return str(raised.value)


def test_a_device_root_not_signed_by_the_pinned_root_is_refused(console: ConsoleStandIn) -> None:
    stranger = ConsolePKI()  # same names, another Root
    answer = console.device_roots()
    answer["device_roots"].append(entry("device-root@9", "next", stranger.device_root.cert))
    assert "device-root@9 is not signed by the console Root" in _refusal(console, answer)


def test_only_device_root_cas_are_accepted(console: ConsoleStandIn) -> None:
    pki = console.pki
    current = entry("device-root", "current", pki.device_root.cert)
    leaf = pki.device().cert
    other_ca = new_intermediate(pki.root, "certgate Admin CA").cert
    cases = {
        "is not named 'certgate Device Root'": [current, entry(NEXT, "next", other_ca)],
        "is not named": [current, entry(NEXT, "next", leaf)],
        "has status 'retired'": [current, entry(NEXT, "retired", pki.rotated[NEXT].cert)],
        "is not a console label": [current, entry("admin-ca", "next", pki.rotated[NEXT].cert)],
        "listed once, first": [entry(NEXT, "next", pki.rotated[NEXT].cert), current],
        "listed twice": [current, entry(NEXT, "next", pki.device_root.cert)],
        "is not a PEM certificate": [current, {"label": NEXT, "status": "next", "certificate": 1}],
        "list of 1 to 3": [],
    }
    for reason, roots in cases.items():
        assert reason in _refusal(console, {"device_roots": roots}), reason
    assert "list of 1 to 3" in _refusal(console, ["not", "an", "object"])


def test_the_issuer_is_found_by_signature_among_roots_of_one_name(console: ConsoleStandIn) -> None:
    roots = parse_device_roots(console.device_roots(), console.pki.root.cert)
    old, new = console.pki.device(), console.pki.device(label=NEXT)
    assert roots.issuer_of(old.cert).label == "device-root"
    assert roots.issuer_of(new.cert).label == NEXT
    only_old = DeviceRootSet(roots.root, roots.roots[:1])
    with pytest.raises(ChainError, match="not issued by a trusted Device Root"):
        only_old.issuer_of(new.cert)


def test_a_client_certificate_of_a_sibling_ca_is_refused(console: ConsoleStandIn) -> None:
    roots = parse_device_roots(console.device_roots(), console.pki.root.cert)
    admin = issue(console.pki.admin_ca, DEVICE_CLIENT, Names("not a device")).cert
    with pytest.raises(ChainError, match="not issued by a trusted Device Root"):
        roots.issuer_of(admin)


def follower(console: ConsoleStandIn, path: Path | None) -> TrustFollower:
    initial = DeviceRootSet.initial(console.pki.root.cert, console.pki.device_root.cert)
    return TrustFollower(console.client(), initial, path, 30, clock=lambda: 1000.0)


def test_the_follower_swaps_in_a_new_set_and_saves_it(
    console: ConsoleStandIn, tmp_path: Path
) -> None:
    path = tmp_path / "device-roots.json"
    trust = follower(console, path)
    assert run(trust.refresh()) is True
    assert [r.label for r in trust.current.roots] == ["device-root", NEXT]
    saved = load_device_roots(path, console.pki.root.cert)
    assert saved is not None and saved.roots == trust.current.roots
    assert run(trust.refresh()) is False  # the same answer changes nothing
    console.trusted = [(NEXT, "current")]  # finish: the old root is retired
    assert run(trust.refresh()) is True
    assert [r.label for r in trust.current.roots] == [NEXT]
    assert trust.health() == {
        "device_roots": [
            {"label": NEXT, "status": "current", "thumbprint": thumbprint(trust.current.certs[0])}
        ],
        "refreshed_s_ago": 0,
        "error": None,
    }


def test_a_failed_refresh_keeps_the_set_in_use_and_says_why(
    console: ConsoleStandIn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trust = follower(console, tmp_path / "device-roots.json")
    run(trust.refresh())
    in_use = trust.current
    console.down = True
    with caplog.at_level(logging.WARNING, "certgate.access.trust"):
        assert run(trust.refresh()) is False
    assert trust.current is in_use
    assert "console unreachable" in (trust.health()["error"] or "")
    assert "Device Roots not refreshed (keeping device-root, device-root@4)" in caplog.text
    console.down = False
    stranger = ConsolePKI()
    console.pki.rotated["device-root@5"] = stranger.device_root  # not under the Root
    console.trusted.append(("device-root@5", "next"))
    assert run(trust.refresh()) is False and trust.current is in_use
    assert "not signed by the console Root" in (trust.health()["error"] or "")
    console.trusted.pop()
    run(trust.refresh())
    assert trust.health()["error"] is None


def test_a_restart_loads_the_set_last_saved(console: ConsoleStandIn, tmp_path: Path) -> None:
    setup = installed(tmp_path / "access", install_request(console.pki, PublicPKI.create()))
    assert [r.label for r in setup.material.device_roots.roots] == [""]  # install-time
    run(follower(console, setup.config.files.device_roots).refresh())
    again = load_material(setup.config)
    assert [r.label for r in again.device_roots.roots] == ["device-root", NEXT]


def test_a_set_that_cannot_be_saved_is_not_used(console: ConsoleStandIn, tmp_path: Path) -> None:
    """The cert proxy follows the saved file: a set Access could not save (its directory
    is gone here; a full disk alike) is not used by Access either, and says why."""
    trust = follower(console, tmp_path / "gone" / "device-roots.json")
    in_use = trust.current
    assert run(trust.refresh()) is False
    assert trust.current is in_use
    assert "cannot save device-roots.json" in (trust.health()["error"] or "")
