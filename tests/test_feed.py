"""Tests for certgate.feed's trust operations (version 3) and their version rule: a node of
version 2 never receives one, a version 2 message cannot carry one, a malformed one
rejects its batch, and the device table never holds one."""

from __future__ import annotations

from typing import Any

import pytest

from certgate.console.services.feed import for_version
from certgate.feed import (
    FEED_VERSION,
    MAX_SNAPSHOT_TRUST,
    Delete,
    InvalidEntry,
    RotationPhase,
    TrustUpdate,
    decode_op,
    snapshot_trust,
    split_trust,
)
from certgate.tunnel.table import DeviceTable

THUMB = "ab" * 32
TRUST = TrustUpdate(
    "tunnel-identity",
    RotationPhase.SWITCH,
    7,
    "-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n",
    {"alg": "ECDH-ES+HKDF-SHA256+A256GCM", "epk": "e", "nonce": "n", "ciphertext": "c"},
    "header.payload.signature",
)
DELETE = Delete(THUMB, "0" * 32, "g1")


def test_feed_version_is_5() -> None:
    assert FEED_VERSION == 5


def test_a_trust_operation_round_trips() -> None:
    assert decode_op(TRUST.encode(), "op", 3) == TRUST


@pytest.mark.parametrize("version", [1, 2])
def test_older_versions_cannot_carry_a_trust_operation(version: int) -> None:
    with pytest.raises(InvalidEntry, match=f"version {version}"):
        decode_op(TRUST.encode(), "op", version)


@pytest.mark.parametrize(
    ("version", "ops"),
    [
        (1, ["upsert", "delete"]),
        (2, ["upsert", "delete", "policy"]),
        (3, ["upsert", "delete", "policy", "trust"]),
        (4, ["upsert", "delete", "policy", "trust"]),
    ],
)
def test_the_console_sends_a_node_only_what_its_version_reads(version: int, ops: list[str]) -> None:
    events = [
        {"op": "upsert"},
        DELETE.encode(),
        {"op": "policy"},
        TRUST.encode(),
    ]
    kept = {e["op"] for e in for_version(events, version)}
    assert kept == set(ops)


def _changed(**change: Any) -> dict[str, Any]:
    return {**TRUST.encode(), **change}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (_changed(kind="root"), "kind"),
        (_changed(phase="abort"), "phase"),
        (_changed(rotation=0), "rotation"),
        (_changed(rotation=True), "rotation"),
        (_changed(certificate=""), "must be text"),
        (_changed(trust=5), "must be text"),
        (_changed(sealed_key={"alg": "x"}), "sealed_key"),
        (_changed(sealed_key={**TRUST.sealed_key, "extra": "x"}), "sealed_key"),
        (_changed(extra=1), "unexpected keys"),
        ({k: v for k, v in TRUST.encode().items() if k != "trust"}, "missing keys"),
    ],
)
def test_a_malformed_trust_operation_is_refused(raw: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidEntry, match=reason):
        decode_op(raw, "op", 3)


def test_split_trust_takes_the_trust_operations_out_of_a_batch() -> None:
    entries: list[object] = [DELETE.encode(), TRUST.encode(), DELETE.encode()]
    trust, rest = split_trust(entries, 3)
    assert trust == [TRUST]
    assert rest == [DELETE.encode(), DELETE.encode()]


def test_split_trust_refuses_a_malformed_one_and_version_2() -> None:
    with pytest.raises(InvalidEntry):
        split_trust([_changed(phase="abort")], 3)
    with pytest.raises(InvalidEntry, match="version 2"):
        split_trust([TRUST.encode()], 2)


def test_the_device_table_never_holds_a_trust_operation() -> None:
    table = DeviceTable()
    with pytest.raises(InvalidEntry, match="trust operation reached the device table"):
        table.apply_batch(1, 1, [TRUST.encode()], 3)
    assert table.seq == 0


def test_a_console_identity_carries_no_key_and_a_tunnel_identity_always_one() -> None:
    console = _changed(kind="console-identity", sealed_key=None)
    decoded = decode_op(console, "op", 3)
    assert isinstance(decoded, TrustUpdate) and decoded.sealed_key is None
    assert decoded.encode() == console
    with pytest.raises(InvalidEntry, match="must be null for console-identity"):
        decode_op(_changed(kind="console-identity"), "op", 3)
    with pytest.raises(InvalidEntry, match="sealed_key: expected an object"):
        decode_op(_changed(sealed_key=None), "op", 3)


def test_a_snapshot_trust_list_holds_one_operation_in_use_and_one_prepared_per_kind() -> None:
    prepared = _changed(phase="prepare")
    device_root = _changed(kind="device-root", phase="prepare", sealed_key=None)
    ops = snapshot_trust([TRUST.encode(), prepared, device_root], "trust", 4)
    assert [(op.kind, op.is_next) for op in ops] == [
        ("tunnel-identity", False),
        ("tunnel-identity", True),
        ("device-root", False),  # a Device Root's prepare step is trusted at once
    ]
    assert snapshot_trust([], "trust", 4) == ()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"op": "trust"}, "expected a list"),
        ([TRUST.encode()] * (MAX_SNAPSHOT_TRUST + 1), "at most 6"),
        ([TRUST.encode(), _changed(phase="finish")], "two operations of the same kind and role"),
        ([DELETE.encode()], "expected a trust operation"),
        (["trust"], "expected a trust operation"),
        ([_changed(phase="abort")], "phase"),
    ],
)
def test_a_malformed_snapshot_trust_list_rejects_the_page(raw: object, reason: str) -> None:
    with pytest.raises(InvalidEntry, match=reason):
        snapshot_trust(raw, "trust", 4)
