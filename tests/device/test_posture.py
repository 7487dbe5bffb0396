"""The device's posture collector: os-release(5) parsing and dm-crypt detection from
``lsblk --json --inverse`` output (byte vectors), and the report of this very host
against what the host says about itself (``/etc/os-release``, ``uname -r``)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from certgate import __version__
from certgate.device.posture import (
    NO_ROOTED,
    NO_SCREEN_LOCK,
    collect,
    is_on_crypt,
    read_os_release,
)

OS_RELEASE = b"""# a comment
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
ID=debian
QUOTED='single quoted'
BROKEN="unterminated
EMPTY=
"""

# lsblk --json --inverse --output NAME,TYPE /dev/mapper/root on a LUKS laptop: the
# inverse tree lists the mapping first, its parents (partition, disk) as children.
LUKS = b"""{"blockdevices": [{"name": "root", "type": "crypt", "children": [
  {"name": "nvme0n1p3", "type": "part", "children": [{"name": "nvme0n1", "type": "disk"}]}]}]}"""
# The same for LVM on LUKS: the crypt device is an ancestor of the logical volume.
LVM_ON_LUKS = b"""{"blockdevices": [{"name": "vg-root", "type": "lvm", "children": [
  {"name": "luks-1", "type": "crypt", "children": [{"name": "sda2", "type": "part"}]}]}]}"""
PLAIN = b"""{"blockdevices": [{"name": "sda1", "type": "part", "children": [
  {"name": "sda", "type": "disk"}]}]}"""


def test_os_release_is_read_as_os_release_5_says(tmp_path: Path) -> None:
    path = tmp_path / "os-release"
    path.write_bytes(OS_RELEASE)
    assert read_os_release(path) == {
        "PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)",
        "NAME": "Debian GNU/Linux",
        "VERSION_ID": "12",
        "ID": "debian",
        "QUOTED": "single quoted",
    }
    assert read_os_release(tmp_path / "missing") == {}


def test_crypt_is_found_at_the_root_device_or_among_its_ancestors() -> None:
    assert is_on_crypt(json.loads(LUKS))
    assert is_on_crypt(json.loads(LVM_ON_LUKS))
    assert not is_on_crypt(json.loads(PLAIN))
    assert not is_on_crypt({})


def test_a_rolling_release_reports_its_version_as_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "os-release"
    path.write_text("ID=arch\nNAME='Arch Linux'\n")
    report = collect(path)
    assert report.facts["os_name"] == "arch" and report.facts["os_version"] is None
    assert report.unavailable["os_version"] == f"no VERSION_ID in {path}"


def test_this_hosts_report_is_what_the_host_says() -> None:
    report = collect()
    release = read_os_release(Path("/etc/os-release"))
    uname = subprocess.run(["uname", "-r"], capture_output=True, text=True, check=True)
    assert report.facts["os_name"] == release["ID"]
    assert report.facts["os_version"] == release.get("VERSION_ID")
    assert report.facts["kernel"] == uname.stdout.strip()
    assert report.facts["agent_version"] == __version__
    assert report.facts["screen_lock"] is None and report.facts["rooted"] is None
    assert report.unavailable["screen_lock"] == NO_SCREEN_LOCK
    assert report.unavailable["rooted"] == NO_ROOTED
    # Disk encryption: a real answer on a block device, an explained null otherwise.
    root = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "/"], capture_output=True, text=True)
    if root.stdout.startswith("/dev/"):
        assert isinstance(report.facts["disk_encrypted"], bool)
    else:
        assert "not on a block device" in report.unavailable["disk_encrypted"]


@settings(deadline=None)  # no timing assertions: the machine is shared
@given(st.binary(max_size=400))
def test_any_os_release_file_parses_or_reads_empty(data: bytes) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile() as handle:
        handle.write(data)
        handle.flush()
        values = read_os_release(Path(handle.name))
    assert all(isinstance(v, str) and 0 < len(v) <= 200 for v in values.values())
