"""Enrollment and Proxy-mode app authentication against a real console.

The console runs on SQLite only: the storage backends are covered by tests/console, and
nothing the device does depends on them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, pkcs12

from certgate.device.enroll import (
    DeviceUnenrolled,
    authenticate_app,
    check_issued,
    enroll,
    reenroll_guidance,
)
from certgate.device.state import StateDir
from certgate.errors import AuthError, ChainError, ConfigError, PKIError
from certgate.pki import identity
from certgate.pki.authority import Authority, Names
from certgate.pki.identity import identity_of
from certgate.pki.keys import generate_key
from tests.device.console_side import (
    PASSWORD,
    USER,
    add_enrollment_user,
    admin_call,
    enrollment_token,
    root_pem,
    unenroll,
)
from tests.support import RunningConsole

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("console", ["sqlite"], indirect=True),
]
APP = "com.example.browser"


@pytest.fixture(scope="module")
def user(console: RunningConsole) -> str:
    add_enrollment_user(console)
    return USER


def enrolled(console: RunningConsole, directory: Path) -> StateDir:
    state = StateDir(directory)
    enroll(state, console.url, root_pem(console), token=enrollment_token(console))
    return state


def test_enroll_with_a_token_stores_the_device(
    console: RunningConsole, user: str, tmp_path: Path
) -> None:
    state = StateDir(tmp_path / "state")
    enrollment, compliance = enroll(
        state, console.url, root_pem(console), token=enrollment_token(console), name="laptop"
    )
    assert identity.DEVICE_UID_RE.fullmatch(enrollment.device_uid)
    assert (enrollment.group_id, compliance) == ("global", "unknown")
    assert state.enrollment() == enrollment
    assert state.credential().startswith("cgd")
    device = admin_call(console, "GET", f"/api/v1/devices/{enrollment.device_uid}")
    assert (device["owner"], device["name"], device["platform"]) == (USER, "laptop", "linux")


def test_enroll_with_the_enrollment_user(
    console: RunningConsole, user: str, tmp_path: Path
) -> None:
    state = StateDir(tmp_path / "state")
    enrollment, _ = enroll(state, console.url, root_pem(console), username=USER, password=PASSWORD)
    assert state.enrollment().device_uid == enrollment.device_uid


def test_enrollment_needs_exactly_one_kind_of_credential(
    console: RunningConsole, tmp_path: Path
) -> None:
    state = StateDir(tmp_path / "state")
    with pytest.raises(ConfigError, match="either a token"):
        enroll(state, console.url, root_pem(console))
    with pytest.raises(ConfigError, match="either a token"):
        enroll(state, console.url, root_pem(console), token="t", username="u", password="p")
    with pytest.raises(AuthError):
        enroll(state, console.url, root_pem(console), token="cge_nope.nope")
    plain = console.url.replace("https://", "http://")
    with pytest.raises(ConfigError, match="must be https"):
        enroll(state, plain, root_pem(console), token="cge_nope.nope")
    assert not state.is_enrolled()


def test_enrolling_again_needs_force_and_forgets_the_old_device(
    console: RunningConsole, user: str, tmp_path: Path
) -> None:
    state = enrolled(console, tmp_path / "state")
    authenticate_app(state, APP, USER, PASSWORD)
    with pytest.raises(ConfigError, match="--force"):
        enroll(state, console.url, root_pem(console), token=enrollment_token(console))
    again, _ = enroll(
        state, console.url, root_pem(console), token=enrollment_token(console), force=True
    )
    assert state.enrollment() == again
    assert state.apps() == []


def test_app_auth_issues_a_certificate_for_this_app_and_device(
    console: RunningConsole, user: str, tmp_path: Path
) -> None:
    state = enrolled(console, tmp_path / "state")
    issued = authenticate_app(state, APP, USER, PASSWORD, b"export-pw")
    enrollment = state.enrollment()
    expected = identity.app(enrollment.device_uid, enrollment.group_id, APP)
    assert identity_of(issued.identity.cert) == expected
    _, cert, _ = pkcs12.load_key_and_certificates(issued.files.pkcs12.read_bytes(), b"export-pw")
    assert cert == issued.identity.cert


def test_private_keys_never_reach_the_console(
    console: RunningConsole, user: str, tmp_path: Path
) -> None:
    state = enrolled(console, tmp_path / "state")
    key = authenticate_app(state, APP, USER, PASSWORD).identity.key
    private = key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
    console_files = [p for p in console.data_dir.rglob("*") if p.is_file()]
    console_files.append(console.log_path)
    assert console_files
    for path in console_files:
        data = path.read_bytes()
        assert private not in data and private.hex().encode() not in data, path


def test_wrong_enrollment_password_stores_nothing(
    console: RunningConsole, user: str, tmp_path: Path
) -> None:
    state = enrolled(console, tmp_path / "state")
    with pytest.raises(AuthError, match="401"):
        authenticate_app(state, APP, USER, "not-the-password")
    assert state.apps() == []


def test_issued_certificates_are_checked(
    console: RunningConsole, user: str, tmp_path: Path
) -> None:
    state = enrolled(console, tmp_path / "state")
    issued = authenticate_app(state, APP, USER, PASSWORD).identity
    answer = {
        "certificate": issued.cert_pem().decode().split("-----END CERTIFICATE-----")[0]
        + "-----END CERTIFICATE-----\n",
        "chain": [issued.chain[0].public_bytes(Encoding.PEM).decode()],
    }
    enrollment = state.enrollment()
    mine = identity.app(enrollment.device_uid, enrollment.group_id, APP)
    roots = state.console_ca()
    assert check_issued(answer, issued.key, mine, roots).thumbprint == issued.thumbprint
    with pytest.raises(PKIError, match="does not certify"):
        check_issued(answer, generate_key(), mine, roots)
    other = identity.app(enrollment.device_uid, enrollment.group_id, "com.example.mail")
    with pytest.raises(ChainError, match="not us"):
        check_issued(answer, issued.key, other, roots)
    foreign_root = Authority().create_root(generate_key(), Names("foreign root"))
    with pytest.raises(ChainError, match="rejected"):
        check_issued(answer, issued.key, mine, [foreign_root])
    with pytest.raises(ChainError, match="no usable certificate"):
        check_issued({"certificate": "x"}, issued.key, mine, roots)


def test_an_unenrolled_device_is_told_to_enroll_again(
    console: RunningConsole, user: str, tmp_path: Path
) -> None:
    state = enrolled(console, tmp_path / "state")
    unenroll(console, state.enrollment().device_uid)
    with pytest.raises(DeviceUnenrolled, match="enroll it again"):
        authenticate_app(state, APP, USER, PASSWORD)
    guidance = reenroll_guidance(state, console.url)
    assert f"certgate device enroll --force --state-dir {state.path}" in guidance
    assert f"--console {console.url}" in guidance
