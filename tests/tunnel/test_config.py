"""Tests for certgate.tunnel.config: a state directory is verified again at every load."""

from __future__ import annotations

import base64
import copy
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from certgate import jws
from certgate.errors import ConfigError
from certgate.pki import identity
from certgate.pki.keys import generate_key, private_key_pem
from certgate.pki.keystore import MasterKey
from certgate.tlsconf import pem_of
from certgate.tunnel import config
from certgate.tunnel.config import TunnelState, load_state
from tests.support import RunningConsole
from tests.tunnel.conftest import create_group, foreign_root_pem, setup_node


@pytest.fixture(scope="module")
def nodes(
    sqlite_console: RunningConsole, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TunnelState, TunnelState]:
    """Two set-up nodes of different groups (the second supplies foreign files)."""
    base = tmp_path_factory.mktemp("states")
    settings = {"server_rules": {"default": "deny", "rules": [{"action": "allow", "hosts": ["*"]}]}}
    ours = setup_node(sqlite_console, create_group(sqlite_console, settings), base / "ours")
    theirs = setup_node(sqlite_console, create_group(sqlite_console), base / "theirs")
    return ours, theirs


@pytest.fixture
def state_dir(nodes: tuple[TunnelState, TunnelState], tmp_path: Path) -> Path:
    copy_dir = tmp_path / "state"
    shutil.copytree(nodes[0].state_dir, copy_dir)
    return copy_dir


def test_load_state_returns_the_verified_setup(
    sqlite_console: RunningConsole, nodes: tuple[TunnelState, TunnelState], state_dir: Path
) -> None:
    state = load_state(state_dir)
    assert (state.group_id, state.node_name, state.console_url) == (
        nodes[0].group_id,
        "node-a",
        sqlite_console.url,
    )
    assert state.tunnel_chain == (state.secure_channel_root, state.root)
    assert state.trust.tunnel == config.TunnelSettings(("localhost",), ("127.0.0.1",), 2020, 8443)
    assert state.trust.feed.max_staleness_s == 300 and state.trust.feed.long_poll_s == 25
    assert state.trust.policy.server_rules.to_dict()["rules"] == [
        {"action": "allow", "hosts": ["*"], "ports": "any", "cidrs": []}
    ]
    assert state.trust.policy.version == 1
    assert state.device_root.issuer == state.root.subject
    assert "tunnel_key" not in repr(state)


def replace_with(name: str) -> Callable[[Path, Path], None]:
    def action(ours: Path, theirs: Path) -> None:
        shutil.copy(theirs / name, ours / name)

    return action


def flip_signature(ours: Path, _: Path) -> None:
    token = (ours / "trust.jws").read_bytes()
    at = len(token) - 20  # inside the signature
    (ours / "trust.jws").write_bytes(
        token[:at] + (b"A" if token[at] != ord("A") else b"B") + token[at + 1 :]
    )


def foreign_key(ours: Path, _: Path) -> None:
    config.store_identity(ours, generate_key())


def swapped_chain(ours: Path, _: Path) -> None:
    scr, root = x509.load_pem_x509_certificates((ours / "chain.pem").read_bytes())
    (ours / "chain.pem").write_bytes(pem_of([root, scr]))


def old_format(ours: Path, _: Path) -> None:
    text = (ours / "state.json").read_text()
    (ours / "state.json").write_text(text.replace("certgate-tunnel-state/1", "v0"))


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (flip_signature, "trust.jws: signature does not verify"),
        (replace_with("trust.jws"), "trust.jws: signature does not verify"),
        (replace_with("console-identity.pem"), "expected urn:certgate:console:group:"),
        (replace_with("tunnel.pem"), "expected urn:certgate:tunnel:group:"),
        (foreign_key, "does not belong to the tunnel identity"),
        (swapped_chain, "Secure Channel Root then the instance root"),
        (old_format, "unknown format"),
    ],
)
def test_tampered_state_is_refused(
    nodes: tuple[TunnelState, TunnelState],
    state_dir: Path,
    tamper: Callable[[Path, Path], None],
    reason: str,
) -> None:
    tamper(state_dir, nodes[1].state_dir)
    os.chmod(state_dir / "tunnel.key", 0o600)
    with pytest.raises(ConfigError, match=reason):
        load_state(state_dir)


def test_key_readable_by_others_is_refused(state_dir: Path) -> None:
    os.chmod(state_dir / "tunnel.key", 0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_state(state_dir)


def test_group_writable_directory_is_refused(state_dir: Path) -> None:
    os.chmod(state_dir, 0o770)
    with pytest.raises(ConfigError, match="writable by group/others"):
        load_state(state_dir)


def test_missing_files_are_named(state_dir: Path, tmp_path: Path) -> None:
    (state_dir / "trust.jws").unlink()
    with pytest.raises(ConfigError, match=r"trust.jws is missing: run 'certgate tunnel setup'"):
        load_state(state_dir)
    with pytest.raises(ConfigError, match="does not exist"):
        load_state(tmp_path / "nowhere")


def test_another_instance_root_is_refused(state_dir: Path) -> None:
    (state_dir / "root.pem").write_bytes(foreign_root_pem())
    with pytest.raises(ConfigError, match="instance root"):
        load_state(state_dir)


def trust_payload(state: TunnelState) -> dict[str, Any]:
    token = (state.state_dir / "trust.jws").read_bytes()
    return jws.verify(token, state.console_identity, jws.TYP_TRUST, state.group_id)


def test_feed_defaults_apply_when_the_trust_omits_them(
    nodes: tuple[TunnelState, TunnelState],
) -> None:
    payload = copy.deepcopy(trust_payload(nodes[0]))
    del payload["feed"]["max_staleness_s"], payload["feed"]["long_poll_s"]
    feed = config.parse_trust(payload).feed
    assert (feed.max_staleness_s, feed.long_poll_s) == (
        config.DEFAULT_MAX_STALENESS_S,
        config.DEFAULT_LONG_POLL_S,
    )


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        (("tunnel", "proxy_port"), "2020", "tunnel.proxy_port"),
        (("tunnel", "hostnames"), [1], "tunnel names"),
        (("feed", "feed_path"), "https://evil.test/feed", "absolute path"),
        (("feed", "max_staleness_s"), 0, "positive"),
        (("feed", "long_poll_s"), True, "feed.long_poll_s"),
        (("server_rules", "default"), "maybe", "invalid policy: trust config.server_rules"),
    ],
)
def test_malformed_trust_settings_are_refused(
    nodes: tuple[TunnelState, TunnelState], path: tuple[str, str], value: object, reason: str
) -> None:
    payload = copy.deepcopy(trust_payload(nodes[0]))
    payload[path[0]][path[1]] = value
    with pytest.raises(ConfigError, match=reason):
        config.parse_trust(payload)


@pytest.mark.parametrize("name", ["", "-lead", "a b", "n\r\nX-Evil: 1", "x" * 129, "ünïcode"])
def test_bad_node_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid node name"):
        config.check_node_name(name)


def test_good_node_names_pass() -> None:
    for name in ("node-a", "tunnel01.dc2", "A_b-c.d", "x" * 128):
        assert config.check_node_name(name) == name


# --- the private key at rest: sealed under the node key ------------------------------


def test_the_key_on_disk_is_sealed_under_the_node_key(state_dir: Path) -> None:
    blob = (state_dir / "tunnel.key").read_bytes()
    assert blob.startswith(b"CGK1") and b"PRIVATE KEY" not in blob
    assert (state_dir / "node.key").stat().st_mode & 0o777 == 0o600
    key = config.load_identity(state_dir)
    assert key.public_key() == load_state(state_dir).tunnel_cert.public_key()


def test_ha_nodes_seal_the_same_key_under_different_node_keys(
    sqlite_console: RunningConsole, nodes: tuple[TunnelState, TunnelState], tmp_path: Path
) -> None:
    second = setup_node(sqlite_console, nodes[0].group_id, tmp_path / "b", "node-b")
    ours, theirs = nodes[0].state_dir, second.state_dir
    assert (ours / "node.key").read_bytes() != (theirs / "node.key").read_bytes()
    assert (ours / "tunnel.key").read_bytes() != (theirs / "tunnel.key").read_bytes()
    assert second.tunnel_cert == nodes[0].tunnel_cert


def test_missing_node_key_is_named(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.NODE_KEY_ENV, raising=False)
    (state_dir / "node.key").unlink()
    reason = r"node.key does not exist and \$CERTGATE_TUNNEL_NODE_KEY is not set"
    with pytest.raises(ConfigError, match=reason):
        load_state(state_dir)


def test_wrong_node_key_is_named(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.NODE_KEY_ENV, base64.urlsafe_b64encode(os.urandom(32)).decode())
    with pytest.raises(ConfigError, match=r"tunnel.key: .*key from \$CERTGATE_TUNNEL_NODE_KEY"):
        load_state(state_dir)


def test_node_key_readable_by_others_is_refused(state_dir: Path) -> None:
    os.chmod(state_dir / "node.key", 0o644)
    with pytest.raises(ConfigError, match=r"node key file .* has mode 0644"):
        load_state(state_dir)


def test_a_key_in_clear_is_refused(state_dir: Path) -> None:
    (state_dir / "tunnel.key").write_bytes(private_key_pem(config.load_identity(state_dir)))
    with pytest.raises(ConfigError, match="is not sealed"):
        load_state(state_dir)


def test_node_key_from_the_environment_writes_no_key_file(
    sqlite_console: RunningConsole,
    nodes: tuple[TunnelState, TunnelState],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = os.urandom(32)
    monkeypatch.setenv(config.NODE_KEY_ENV, base64.urlsafe_b64encode(secret).decode())
    state = setup_node(sqlite_console, nodes[0].group_id, tmp_path / "env", "node-env")
    assert not (state.state_dir / "node.key").exists()
    blob = (state.state_dir / "tunnel.key").read_bytes()
    opened = MasterKey(secret).unseal(blob, config.TUNNEL_KEY_LABEL)
    assert opened.public_key() == state.tunnel_cert.public_key()
    with pytest.raises(ValueError):
        load_pem_private_key(blob, None)


def test_an_identity_is_accepted_only_from_a_listed_secure_channel_root(
    nodes: tuple[TunnelState, TunnelState],
) -> None:
    ours = nodes[0]
    console_id = identity.console(ours.group_id)
    scr = ours.secure_channel_root
    assert config.verify_identity(ours.console_identity, [scr], [ours.root], console_id) == scr
    # A sibling intermediate of the same Root (the Device Root) is not a Secure Channel Root.
    with pytest.raises(ConfigError, match="client certificate rejected"):
        config.verify_identity(ours.console_identity, [ours.device_root], [ours.root], console_id)
    with pytest.raises(ConfigError, match="expected urn:certgate:tunnel:group:"):
        config.verify_identity(ours.console_identity, [scr], [ours.root], identity.tunnel("x"))
