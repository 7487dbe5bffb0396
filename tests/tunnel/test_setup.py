"""Tests for certgate.tunnel.setup: setup and install against a real console over mTLS."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12
from typer.testing import CliRunner

from certgate.errors import ConfigError
from certgate.pki.keys import load_private_key_pem
from certgate.pki.thumbprint import thumbprint
from certgate.tunnel import setup
from certgate.tunnel.cli import app
from certgate.tunnel.config import load_state
from tests.support import RunningConsole
from tests.tunnel.conftest import (
    admin_credential,
    create_group,
    root_file,
    root_of,
    setup_admin,
    setup_node,
)

runner = CliRunner()


def installer(console: RunningConsole, group_id: str) -> bytes:
    with console.client(console.admins["root"]) as client:
        response = client.get(f"/api/v1/groups/{group_id}/tunnel/installer")
    assert response.status_code == 200, response.text
    return response.content


def repack(files: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return buffer.getvalue()


def flip(data: bytes) -> bytes:
    """``data`` with one bit changed in the middle."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_two_nodes_get_the_same_tunnel_identity(console: RunningConsole, tmp_path: Path) -> None:
    group = create_group(console)
    first = setup_node(console, group, tmp_path / "a", "node-a")
    second = setup_node(console, group, tmp_path / "b", "node-b")
    assert first.tunnel_cert == second.tunnel_cert
    assert first.console_identity == second.console_identity
    assert load_state(tmp_path / "b").tunnel_thumbprint == first.tunnel_thumbprint
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "tunnel.key").stat().st_mode) == 0o600
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]
    with console.client(console.admins["root"]) as client:
        nodes = client.get(f"/api/v1/groups/{group}/tunnel/nodes").json()
    assert sorted(n["name"] for n in nodes) == ["node-a", "node-b"]


def test_cli_setup_with_pkcs12_and_pin(console: RunningConsole, tmp_path: Path) -> None:
    group = create_group(console)
    creds = setup_admin(console, group)
    cred = admin_credential(creds)
    p12 = pkcs12.serialize_key_and_certificates(
        b"admin", cred.key, cred.chain[0], None, BestAvailableEncryption(b"s3cret")
    )
    args = ["setup", "--console", console.url, "--group", group, "--api-key", creds.api_key]
    args += ["--admin-cert", str(write(tmp_path / "admin.p12", p12)), "--p12-password", "s3cret"]
    args += ["--pin-sha256", thumbprint(root_of(console)).upper(), "--node-name", "n1"]
    result = runner.invoke(app, [*args, "--state-dir", str(tmp_path / "state")])
    assert result.exit_code == 0, result.output
    assert load_state(tmp_path / "state").group_id == group
    status = runner.invoke(app, ["status", "--state-dir", str(tmp_path / "state")])
    assert status.exit_code == 0, status.output
    assert group in status.output and "never" in status.output


def test_cli_setup_without_admin_cert_is_refused(console: RunningConsole, tmp_path: Path) -> None:
    group = create_group(console)
    creds = setup_admin(console, group)
    args = ["setup", "--console", console.url, "--group", group, "--api-key", creds.api_key]
    args += ["--ca-file", str(root_file(console)), "--node-name", "n1"]
    result = runner.invoke(app, [*args, "--state-dir", str(tmp_path / "state")])
    assert result.exit_code == 2
    assert "--admin-cert" in result.output
    assert not (tmp_path / "state").exists()


def test_api_key_and_certificate_of_different_admins_are_refused(
    console: RunningConsole, tmp_path: Path
) -> None:
    group = create_group(console)
    key_owner, cert_owner = setup_admin(console, group), setup_admin(console, group)
    mixed = setup.AdminCredential(
        key_owner.api_key,
        admin_credential(cert_owner).chain,
        load_private_key_pem(cert_owner.key_path.read_bytes()),
    )
    with pytest.raises(setup.SetupError, match="401 API key and client certificate belong"):
        setup.setup(console.url, group, mixed, root_of(console), tmp_path / "s", "n1")
    assert not (tmp_path / "s").exists()


def test_wrong_pin_is_refused_before_any_credential_is_sent(
    console: RunningConsole, tmp_path: Path
) -> None:
    with pytest.raises(setup.SetupError, match="does not match the pin"):
        setup.resolve_root(console.url, pin_sha256="ab" * 32)
    with pytest.raises(setup.SetupError, match="does not match --pin-sha256"):
        setup.resolve_root(console.url, ca_file=root_file(console), pin_sha256="ab" * 32)
    with pytest.raises(ConfigError, match="--ca-file"):
        setup.resolve_root(console.url)


def test_state_dir_of_another_group_is_refused(console: RunningConsole, tmp_path: Path) -> None:
    setup_node(console, create_group(console), tmp_path)
    with pytest.raises(setup.SetupError, match="is set up for group"):
        setup_node(console, create_group(console), tmp_path)


def test_install_from_bundle_matches_setup(console: RunningConsole, tmp_path: Path) -> None:
    group = create_group(console)
    via_setup = setup_node(console, group, tmp_path / "a")
    bundle = write(tmp_path / "bundle.tar.gz", installer(console, group))
    pin = thumbprint(root_of(console))
    args = ["install", str(bundle), "--state-dir", str(tmp_path / "b"), "--node-name", "node-b"]
    result = runner.invoke(app, [*args, "--pin-sha256", pin])
    assert result.exit_code == 0, result.output
    installed = load_state(tmp_path / "b")
    assert installed.tunnel_cert == via_setup.tunnel_cert
    assert installed.console_identity == via_setup.console_identity
    assert stat.S_IMODE((tmp_path / "b" / "tunnel.key").stat().st_mode) == 0o600


def test_install_token_is_single_use(console: RunningConsole, tmp_path: Path) -> None:
    bundle = write(tmp_path / "bundle.tar.gz", installer(console, create_group(console)))
    setup.install(bundle, tmp_path / "a", "node-a")
    with pytest.raises(setup.SetupError, match=r"console refused .* 401"):
        setup.install(bundle, tmp_path / "b", "node-b")
    assert not (tmp_path / "b").exists()


def test_tampered_bundle_file_is_refused(console: RunningConsole, tmp_path: Path) -> None:
    files = setup.read_bundle(installer(console, create_group(console)))
    files["trust.jws"] = flip(files["trust.jws"])
    with pytest.raises(setup.BundleError, match=r"trust.jws does not match its SHA-256"):
        setup.verify_bundle(files)
    bundle = write(tmp_path / "b.tar.gz", repack(files))
    with pytest.raises(setup.BundleError):
        setup.install(bundle, tmp_path / "state", "n1")
    assert not (tmp_path / "state").exists()


def test_extra_file_in_bundle_is_refused(console: RunningConsole) -> None:
    files = setup.read_bundle(installer(console, create_group(console)))
    files["tunnel.key"] = b"planted"
    with pytest.raises(setup.BundleError, match=r"extra \['tunnel.key'\]"):
        setup.verify_bundle(files)


def test_manifest_of_another_group_is_refused(console: RunningConsole) -> None:
    ours = setup.read_bundle(installer(console, create_group(console)))
    theirs = setup.read_bundle(installer(console, create_group(console)))
    forged = {**ours, "manifest.jws": theirs["manifest.jws"]}
    with pytest.raises(setup.BundleError, match="does not verify with the pinned console"):
        setup.verify_bundle(forged)
    # Swapping in the other group's identity too: the manifest verifies, the files do not.
    forged["console-identity.pem"] = theirs["console-identity.pem"]
    with pytest.raises(setup.BundleError, match="does not match its SHA-256"):
        setup.verify_bundle(forged)


def test_bundle_with_wrong_pin_is_refused(console: RunningConsole) -> None:
    files = setup.read_bundle(installer(console, create_group(console)))
    with pytest.raises(setup.BundleError, match="does not match the pin"):
        setup.verify_bundle(files, pin_sha256="00" * 32)


def member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 1) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size if kind == tarfile.REGTYPE else 0
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "/etc/passwd"
    return info


@pytest.mark.parametrize(
    ("info", "reason"),
    [
        (member("../evil"), "unsafe member name"),
        (member("/etc/cron.d/evil"), "unsafe member name"),
        (member("sub/../../evil"), "unsafe member name"),
        (member("link", tarfile.SYMTYPE), "not a regular file"),
        (member("hard", tarfile.LNKTYPE), "not a regular file"),
        (member("dir", tarfile.DIRTYPE), "not a regular file"),
        (member("fifo", tarfile.FIFOTYPE), "not a regular file"),
        (member("big", size=setup.MAX_MEMBER_BYTES + 1), "larger than"),
        (member("chain.pem"), "twice"),
    ],
)
def test_unsafe_tar_members_are_refused(
    console: RunningConsole, tmp_path: Path, info: tarfile.TarInfo, reason: str
) -> None:
    files = setup.read_bundle(installer(console, create_group(console)))
    bundle = write(tmp_path / "bundle.tar.gz", repack(files, [info]))
    with pytest.raises(setup.BundleError, match=reason):
        setup.install(bundle, tmp_path / "state", "n1")
    assert not (tmp_path / "state").exists()
    assert not (tmp_path.parent / "evil").exists()


def test_compression_bomb_and_garbage_are_refused() -> None:
    bomb = gzip.compress(b"\0" * (setup.MAX_TAR_BYTES + 1024))
    with pytest.raises(setup.BundleError, match="inflates beyond"):
        setup.read_bundle(bomb)
    with pytest.raises(setup.BundleError, match="not gzip"):
        setup.read_bundle(b"not a bundle")
    with pytest.raises(setup.BundleError, match="larger than"):
        setup.read_bundle(os.urandom(setup.MAX_BUNDLE_BYTES + 1))


@pytest.mark.parametrize("pin", ["ab" * 31, "zz" * 32, ""])
def test_malformed_pins_are_refused(pin: str) -> None:
    with pytest.raises(ConfigError, match="64 hex digits"):
        setup.normalize_pin(pin)


def test_pin_accepts_colons_and_upper_case() -> None:
    assert setup.normalize_pin(":".join(["AB"] * 32)) == "ab" * 32
