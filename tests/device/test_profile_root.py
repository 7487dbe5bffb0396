"""A device through a Root rotation, against a real console (SQLite; its own console: the
rotation is instance-wide). The device pinned the old Root alone at enrollment (what a
user passes as --ca-file). After the switch its new certificate chains to the new Root
through the cross certificate the old Root signed, and the profile's Roots make it pin
the new Root beside the old one (vouched for by that cross certificate), so that it still
reaches the console once the rotation finished. The console's chain then still ends at
that cross certificate (offered after finish), so a device that pins the old Root alone
reaches it too, and takes the new Root from its profile."""

from __future__ import annotations

from pathlib import Path

import pytest

from certgate.device.enroll import ConsoleAPI, enroll
from certgate.device.profile import fetch_profile
from certgate.device.state import StateDir
from certgate.pki.thumbprint import thumbprint
from tests.device.console_side import (
    add_enrollment_user,
    admin_call,
    configure_group,
    enrollment_token,
    root_pem,
)
from tests.device.harness import RULES
from tests.support import RunningConsole

pytestmark = pytest.mark.integration
ROTATION = "/api/v1/groups/global/rotations/root"


@pytest.mark.parametrize("console", ["sqlite"], indirect=True)
def test_a_device_pins_the_new_root_and_reaches_the_console_after_finish(
    console: RunningConsole, tmp_path: Path
) -> None:
    add_enrollment_user(console)
    configure_group(console, RULES)
    state = StateDir(tmp_path / "device")
    enroll(state, console.url, root_pem(console), token=enrollment_token(console))
    (old_root,) = state.console_ca()

    started = admin_call(console, "POST", ROTATION, {"overlap_s": 0})
    admin_call(console, "POST", ROTATION + "/switch")
    with ConsoleAPI.for_state(state) as api:
        delivered = fetch_profile(state, api)  # its chain ends with the cross certificate
    cross = delivered.identity.chain[-1]
    assert cross.issuer == cross.subject and cross.public_key() != old_root.public_key()
    pinned = state.console_ca()
    assert [thumbprint(c) for c in pinned] == [thumbprint(old_root), started["new"]["thumbprint"]]
    new_root = pinned[1]
    assert new_root.public_key() == cross.public_key()

    admin_call(console, "POST", ROTATION + "/finish?force=true")
    with ConsoleAPI.for_state(state) as api:
        again = fetch_profile(state, api)  # the chain ends at the offered cross certificate
    again.identity.cert.verify_directly_issued_by(again.identity.chain[0])
    assert again.identity.chain[-1] == cross
    with ConsoleAPI(console.url, [old_root], state.credential()) as behind:
        fetch_profile(state, behind)  # a device that pins the old Root alone still verifies
