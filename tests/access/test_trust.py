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
    save_device_roots,
)
from certgate.errors import ChainError
from certgate.pki.authority import Authority, Issuer, Names
from certgate.pki.keys import generate_key
from certgate.pki.profiles import CROSS_CA, DEVICE_CLIENT, INTERMEDIATE_CA
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
    only_old = DeviceRootSet(roots.anchors, roots.roots[:1])
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


# A Root rotation (console/services/rotation.py, "Root"): the console lists its Roots and
# the cross certificates; Access takes a new Root only when a Root it trusts vouches for it.


def root_rotation() -> dict[str, Any]:
    """An old Root with its Device Root, a new Root of the same name, the cross
    certificates both ways, and the Device Root issued again under the new Root with the
    same key (what ``ca.new_root_version`` makes), with a leaf of the Device Root."""
    authority = Authority()
    old_key, new_key, device_key = generate_key(), generate_key(), generate_key()
    old = authority.create_root(old_key, Names("certgate Root CA"))
    new = authority.create_root(new_key, Names("certgate Root CA"))
    device = authority.issue(
        Issuer(old, old_key),
        INTERMEDIATE_CA,
        Names("certgate Device Root"),
        device_key.public_key(),
    )
    again = authority.issue(
        Issuer(new, new_key),
        INTERMEDIATE_CA,
        Names("certgate Device Root"),
        device_key.public_key(),
    )
    leaf = authority.issue(
        Issuer(device, device_key),
        DEVICE_CLIENT,
        Names("device", dns_names=("d.example",)),
        generate_key().public_key(),
    )
    return {
        "old": old,
        "new": new,
        "cross": authority.issue(
            Issuer(old, old_key), CROSS_CA, Names("certgate Root CA"), new_key.public_key()
        ),
        "back": authority.issue(
            Issuer(new, new_key), CROSS_CA, Names("certgate Root CA"), old_key.public_key()
        ),
        "device": device,
        "again": again,
        "leaf": leaf,
    }


def answer(
    device_roots: list[dict[str, str]], roots: list[Any], crosses: list[Any]
) -> dict[str, Any]:
    return {
        "device_roots": device_roots,
        "roots": [pem(c).decode() for c in roots],
        "root_cross": [pem(c).decode() for c in crosses],
    }


def test_a_new_root_vouched_for_by_the_pinned_one_is_taken_and_kept_after_finish(
    tmp_path: Path,
) -> None:
    pki = root_rotation()
    switched = answer(
        [
            entry("device-root@5", "current", pki["again"]),
            entry("device-root", "retiring", pki["device"]),
        ],
        [pki["new"], pki["old"]],
        [pki["cross"], pki["back"]],
    )
    during = parse_device_roots(switched, pki["old"])
    assert during.anchors == (pki["new"], pki["old"])
    # A leaf issued before the rotation verifies under the new Root (the same key).
    assert during.issuer_of(pki["leaf"]).label == "device-root@5"
    finished = answer([entry("device-root@5", "current", pki["again"])], [pki["new"]], [])
    after = parse_device_roots(finished, during.anchors, during.proofs)
    assert after.anchors == (pki["new"],)
    assert pki["cross"] in after.proofs  # kept: it ties the new Root to the install-time one
    # A restart: the saved set, checked from the Root pinned at install.
    path = tmp_path / "device-roots.json"
    save_device_roots(path, after)
    reloaded = load_device_roots(path, pki["old"])
    assert reloaded is not None and reloaded.anchors == (pki["new"],)
    assert reloaded.issuer_of(pki["leaf"]).label == "device-root@5"


def test_a_root_no_pinned_root_vouches_for_is_refused() -> None:
    pki, stranger = root_rotation(), root_rotation()
    # The stranger's Root with a cross certificate the stranger itself signed.
    forged = answer(
        [entry("device-root@5", "current", stranger["again"])],
        [stranger["new"], pki["old"]],
        [stranger["cross"]],
    )
    with pytest.raises(TrustUnavailable, match="neither pinned nor vouched for"):
        parse_device_roots(forged, pki["old"])
    # Without any cross certificate, a new Root is not taken either.
    bare = answer([entry("device-root@5", "current", pki["again"])], [pki["new"]], [])
    with pytest.raises(TrustUnavailable, match="neither pinned nor vouched for"):
        parse_device_roots(bare, pki["old"])
