"""What this host really is, as a posture report (``certgate.posture``) for check-ins.

Linux facts and where they come from:
- ``os_name``, ``os_version``: ``ID`` and ``VERSION_ID`` of ``/etc/os-release``
  (os-release(5)); a rolling distribution without ``VERSION_ID`` reports null.
- ``kernel``: the running kernel's release (uname -r).
- ``disk_encrypted``: whether the block device under ``/`` sits on a dm-crypt mapping
  (``lsblk --inverse``: a ``crypt`` device among its ancestors). A root that is not a
  block device (a container's overlay, tmpfs) reports null with the reason.
- ``screen_lock``: null: Linux has no platform screen lock to ask (each desktop has its
  own, and servers none).
- ``rooted``: null: "rooted" describes a phone whose owner escaped the vendor's lock;
  on Linux the device's owner is root by design.
- ``agent_version``: this certgate.
The certificate's age and the time since the last check-in are derived by the console.
"""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
from pathlib import Path
from typing import Any

from certgate import __version__
from certgate.device.enroll import ConsoleAPI
from certgate.device.state import StateDir
from certgate.posture import FactValue, PostureReport

OS_RELEASE = Path("/etc/os-release")
LSBLK_TIMEOUT_S = 10.0
NO_SCREEN_LOCK = "Linux has no platform screen lock (each desktop has its own)"
NO_ROOTED = "not applicable on Linux (the device owner is root by design)"


def check_in(state: StateDir) -> dict[str, Any]:
    """Report this host's posture to the console with the device certificate (mTLS);
    returns the console's verdict (``compliance_status``, ``failures``)."""
    report = collect()
    with ConsoleAPI.with_device_cert(state) as api:
        return api.check_in(report.to_dict())


def collect(os_release: Path = OS_RELEASE) -> PostureReport:
    facts: dict[str, FactValue] = {}
    unavailable: dict[str, str] = {}

    def put(name: str, value: FactValue, reason: str) -> None:
        facts[name] = value
        if value is None:
            unavailable[name] = reason

    release = read_os_release(os_release)
    put("os_name", release.get("ID"), f"no ID in {os_release}")
    put("os_version", release.get("VERSION_ID"), f"no VERSION_ID in {os_release}")
    put("kernel", platform.release() or None, "uname gave no kernel release")
    encrypted, why = root_encrypted()
    put("disk_encrypted", encrypted, why)
    put("screen_lock", None, NO_SCREEN_LOCK)
    put("rooted", None, NO_ROOTED)
    put("agent_version", __version__, "")
    return PostureReport.from_dict({"facts": facts, "unavailable": unavailable})


def read_os_release(path: Path) -> dict[str, str]:
    """os-release(5): KEY=value lines, values shell-quoted; a missing file is empty."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, sep, raw = line.partition("=")
        if not sep or key.strip().startswith("#"):
            continue
        try:
            words = shlex.split(raw)
        except ValueError:
            continue
        values[key.strip()] = words[0][:200] if words else ""
    return {k: v for k, v in values.items() if v}


def root_encrypted() -> tuple[bool | None, str]:
    """(whether ``/`` is on dm-crypt, why not known)."""
    source = _findmnt_source("/")
    if source is None or not source.startswith("/dev/"):
        return None, f"the root file system is not on a block device ({source or 'unknown'})"
    try:
        listing = _run(["lsblk", "--json", "--inverse", "--output", "NAME,TYPE", source])
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"lsblk failed: {exc}"[:200]
    return is_on_crypt(json.loads(listing)), ""


def is_on_crypt(lsblk: dict[str, Any]) -> bool:
    """Whether a ``crypt`` device is the root device or among its ancestors in
    ``lsblk --json --inverse`` output (children there are the parents on disk)."""
    stack = list(lsblk.get("blockdevices", []))
    while stack:
        device = stack.pop()
        if device.get("type") == "crypt":
            return True
        stack.extend(device.get("children", []))
    return False


def _findmnt_source(target: str) -> str | None:
    try:
        return _run(["findmnt", "--noheadings", "--output", "SOURCE", target]).strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=LSBLK_TIMEOUT_S, check=True)
    return done.stdout
