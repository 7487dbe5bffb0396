"""Compliance from posture, end to end with real processes: a console, a tunnel node behind
HAProxy, devices that check in over mTLS with their device certificates (posture read
from this host by ``certgate.device.posture``), and live tunnels of their app certs.

1. A "minimum OS version" policy raised through the API makes the device on the older OS
   non-compliant and closes its live tunnel; the other device's tunnel stays open.
2. A device whose agent stops checking in turns non-compliant by the console's timer
   (0.5 s sweep, a 3 s check-in rule) and compliant again when it checks in and passes.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from certgate.device.posture import collect
from certgate.pki.keys import private_key_pem
from tests.integration.cluster import (
    APP,
    Cluster,
    closed_within,
    curl,
    start_cluster,
)
from tests.support import CERTGATE, make_csr
from tests.tunnel.dataplane import PAGE

pytestmark = pytest.mark.integration
SWEEP_S = 0.5


@dataclass
class Dev:
    uid: str
    credential: str
    app_cert: Path
    app_key: Path
    device_pem: Path  # device cert + key: what the agent checks in with


def enroll(cluster: Cluster, name: str) -> Dev:
    console, work = cluster.console, cluster.work
    with console.client() as anon:
        device = anon.post(
            "/api/v1/enroll",
            json={"username": "dora", "password": "dora-password", "platform": "linux"},
        ).json()
    app_csr, app_key = make_csr()
    dev_csr, dev_key = make_csr()
    with console.client(api_key=device["credential"]) as dev:
        issued = dev.post(
            f"/api/v1/device/apps/{APP}/certificate",
            json={"username": "dora", "password": "dora-password", "csr": app_csr.decode()},
        ).json()
        profile = dev.post("/api/v1/device/profile", json={"csr": dev_csr.decode()}).json()
    paths = [work / f"{name}-{suffix}.pem" for suffix in ("app", "app-key", "device")]
    paths[0].write_text(issued["certificate"])
    paths[1].write_bytes(private_key_pem(app_key))
    paths[2].write_bytes(profile["certificate"].encode() + private_key_pem(dev_key))
    return Dev(device["device_uid"], device["credential"], *paths)


def check_in(cluster: Cluster, dev: Dev, os_version: str) -> dict[str, Any]:
    """One check-in as the agent makes it: this host's posture, the device cert (mTLS)."""
    report = collect().to_dict()
    report["facts"]["os_version"] = os_version  # the one fact the scenario varies
    ctx = cluster.console.ssl_context(dev.device_pem)
    with httpx.Client(base_url=cluster.console.url, verify=ctx, timeout=30) as client:
        response = client.post("/api/v1/device/checkin", json=report)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def open_tunnel(cluster: Cluster, dev: Dev) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(cluster.work / "chain.pem"))
    ctx.load_cert_chain(dev.app_cert, dev.app_key)
    raw = socket.create_connection(("127.0.0.1", cluster.nodes[0].proxy_port), timeout=15)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    tls.sendall(f"CONNECT 127.0.0.1:{cluster.origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert tls.recv(4096).startswith(b"HTTP/1.1 200")
    return tls


def fetch(cluster: Cluster, dev: Dev) -> subprocess.CompletedProcess[str]:
    """curl through the node with the device's app cert."""
    cluster_as_dev = Cluster(
        cluster.work,
        cluster.console,
        cluster.nodes,
        cluster.haproxy_port,
        cluster.origin,
        dev.uid,
        dev.app_cert,
        dev.app_key,
    )
    return curl(cluster_as_dev, port=cluster.nodes[0].proxy_port)


def admitted(cluster: Cluster, dev: Dev) -> bool:
    return fetch(cluster, dev).stdout.encode() == PAGE


def wait_for(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"never: {what}")


def admin(cluster: Cluster) -> httpx.Client:
    return cluster.console.client(cluster.console.admins["root"])


def status_of(cluster: Cluster, dev: Dev) -> dict[str, Any]:
    with admin(cluster) as client:
        answer: dict[str, Any] = client.get(f"/api/v1/devices/{dev.uid}/compliance").json()
    return answer


def put_policy(cluster: Cluster, rules: list[dict[str, Any]]) -> None:
    with admin(cluster) as client:
        response = client.put("/api/v1/groups/ha/compliance-policy", json={"rules": rules})
    assert response.status_code == 200, response.text


MIN_OS = {"id": "min-os", "fact": "os_version", "op": "version_at_least", "value": "12"}
SEEN = {"id": "seen", "fact": "checkin_age_s", "op": "at_most", "value": 3}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("posture")
    with start_cluster(work, node_names=("node-1",)) as started:
        config = started.console.data_dir / "console.json"
        config.write_text(
            json.dumps({**json.loads(config.read_text()), "compliance_sweep_s": SWEEP_S})
        )
        started.console.stop()
        started.restart_console()
        yield started


def test_a_raised_minimum_os_version_closes_the_old_devices_tunnel(cluster: Cluster) -> None:
    new, old = enroll(cluster, "new"), enroll(cluster, "old")
    # Without a policy, check-ins change nothing: the group's initial compliance stands.
    assert check_in(cluster, new, "12")["compliance_status"] == "compliant"
    assert check_in(cluster, old, "11")["compliance_status"] == "compliant"
    wait_for(lambda: admitted(cluster, new) and admitted(cluster, old), "both admitted")
    with open_tunnel(cluster, new) as new_tunnel, open_tunnel(cluster, old) as old_tunnel:
        put_policy(cluster, [MIN_OS])

        assert closed_within(old_tunnel, 30) is not None  # the node reset the old OS's tunnel
        assert closed_within(new_tunnel, 2) is None  # the passing device's stays open
    assert fetch(cluster, old).stdout == "certgate: noncompliant\n"  # the node's refusal
    assert admitted(cluster, new)
    shown = status_of(cluster, old)
    assert shown["compliance_status"] == "noncompliant"
    assert shown["failures"] == [{"rule": "min-os", "reason": "os_version 11 is below 12"}]
    latest = shown["history"][0]
    assert (latest["cause"], latest["facts"]["os_version"]) == ("policy", "11")
    # The device updates its OS: its next check-in passes and the node admits it again.
    assert check_in(cluster, old, "12.1")["compliance_status"] == "compliant"
    wait_for(lambda: admitted(cluster, old), "the updated device admitted again")


def test_a_silent_device_turns_noncompliant_and_back_when_it_returns(cluster: Cluster) -> None:
    quiet = enroll(cluster, "quiet")
    check_in(cluster, quiet, "12")
    put_policy(cluster, [MIN_OS, SEEN])

    def present_and_admitted() -> bool:
        """The agent's loop: keep checking in while the node learns the device (a slow
        machine must not let the 3 s rule lapse before the node has been asked)."""
        return check_in(cluster, quiet, "12")["compliance_status"] == "compliant" and admitted(
            cluster, quiet
        )

    wait_for(present_and_admitted, "the checked-in device admitted")

    # No more check-ins: the console's timer judges the device on its own.
    wait_for(lambda: status_of(cluster, quiet)["compliance_status"] == "noncompliant", "silent")
    shown = status_of(cluster, quiet)
    assert [f["rule"] for f in shown["failures"]] == ["seen"]
    assert shown["history"][0]["cause"] == "timer"
    assert shown["history"][0]["failures"][0]["reason"].startswith("checkin_age_s is ")
    wait_for(lambda: "noncompliant" in fetch(cluster, quiet).stdout, "the silent device refused")

    wait_for(present_and_admitted, "the returning device admitted")
    history = status_of(cluster, quiet)["history"]
    returned = next(i for i, e in enumerate(history) if e["cause"] == "timer")  # newest first
    assert returned > 0
    assert history[returned - 1]["status"] == "compliant"  # the return, after the lapse
    assert history[returned - 1]["cause"] == "checkin"


def test_a_check_in_needs_the_current_device_certificate(cluster: Cluster) -> None:
    dev = enroll(cluster, "auth")
    report = collect().to_dict()
    with httpx.Client(
        base_url=cluster.console.url, verify=cluster.console.ssl_context(), timeout=30
    ) as anon:
        response = anon.post("/api/v1/device/checkin", json=report)
    assert (response.status_code, response.json()["error"]) == (401, "unauthenticated")
    app_only = cluster.console.ssl_context(dev.app_cert, dev.app_key)
    with httpx.Client(base_url=cluster.console.url, verify=app_only, timeout=30) as client:
        response = client.post("/api/v1/device/checkin", json=report)
        assert response.status_code == 401
        assert "not a device certificate" in response.json()["detail"]
    device_ctx = cluster.console.ssl_context(dev.device_pem)
    with httpx.Client(base_url=cluster.console.url, verify=device_ctx, timeout=30) as client:
        response = client.post("/api/v1/device/checkin", json={"facts": {}, "unavailable": {}})
    assert (response.status_code, response.json()["error"]) == (400, "bad_request")
    assert "invalid posture report" in response.json()["detail"]


def test_the_cli_shows_a_devices_compliance_history(cluster: Cluster) -> None:
    dev = enroll(cluster, "cli")
    put_policy(cluster, [MIN_OS])
    check_in(cluster, dev, "11")
    command = [*CERTGATE, "console", "device", "compliance", "-d", str(cluster.console.data_dir)]
    shown = subprocess.run(
        [*command, "--json", dev.uid], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    history = json.loads(shown)["history"]
    assert (history[0]["status"], history[0]["cause"]) == ("noncompliant", "checkin")
    assert history[0]["failures"] == [{"rule": "min-os", "reason": "os_version 11 is below 12"}]
    assert history[0]["facts"]["os_version"] == "11"
    table = subprocess.run(
        [*command, dev.uid], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "noncompliant" in table and "checkin" in table
