"""Scenario: Kerberos through the tunnel's KDC proxy (MS-KKDCP), with real processes.

A real MIT KDC (``krb5kdc``, a throwaway realm on loopback, TCP and UDP), a console, two tunnel
nodes behind HAProxy's Per-App Tunnel front, a device enrolled with the device CLI running
``certgate device run --kdc-proxy``, and real MIT ``kinit`` whose krb5.conf names the
agent's HTTPS endpoint as the realm's only KDC. Shows: kinit obtains a TGT through agent
and node (the node logs the admission as ``dest=kdc:REALM``); the device made
non-compliant is refused (kinit fails, the node logs the denial), and admitted again once
compliant; a realm the group's policy does not name, and a KDC address the server
traffic rules deny, are refused; a ``udp/`` KDC is asked over UDP once a rule names
``udp`` (refused before).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from certgate.device.kdcproxy import ANCHOR_FILE
from certgate.device.state import StateDir
from tests.integration.cluster import (
    DEFAULT_SETTINGS,
    GROUP,
    Cluster,
    start_cluster,
    start_haproxy,
    stop_process,
)
from tests.integration.test_live_policy import enroll_device
from tests.support import CERTGATE, free_port, free_tcp_and_udp_port, wait_for_tls_port

NEEDS_KRB5 = pytest.mark.skipif(
    shutil.which("kinit") is None
    or not all(Path("/usr/sbin", tool).exists() for tool in ("krb5kdc", "kadmin.local"))
    or not list(Path("/usr/lib").glob("*/krb5/plugins/tls/k5tls.so")),
    reason="needs MIT krb5-kdc, krb5-admin-server (kadmin.local), krb5-user and krb5-k5tls "
    "(kinit's HTTPS for MS-KKDCP): make sysdeps",
)
pytestmark = [pytest.mark.integration, NEEDS_KRB5]

REALM = "CERTGATE.TEST"
OTHER_REALM = "ELSEWHERE.TEST"
USER, PASSWORD = "alice", "alice-kerberos-password"
WAIT_S = 30.0
KDC_START_ATTEMPTS = 5


@dataclass
class KDC:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class World:
    cluster: Cluster
    kdc: KDC
    device: StateDir
    agent: subprocess.Popen[bytes]
    agent_log: Path
    kdc_proxy_port: int
    work: Path


def write_kdc_config(work: Path, port: int) -> dict[str, str]:
    """A realm in ``work``; the environment that makes MIT's tools use it."""
    (work / "kdc.conf").write_text(
        f"""[kdcdefaults]
 kdc_ports = {port}
 kdc_tcp_ports = {port}
[realms]
 {REALM} = {{
  database_name = {work}/principal
  key_stash_file = {work}/stash
  kdc_listen = 127.0.0.1:{port}
  kdc_tcp_listen = 127.0.0.1:{port}
  acl_file = {work}/kadm5.acl
 }}
[logging]
 kdc = FILE:{work}/krb5kdc.log
"""
    )
    (work / "krb5-kdc-side.conf").write_text(
        f"[libdefaults]\n default_realm = {REALM}\n"
        f"[realms]\n {REALM} = {{\n  kdc = tcp/127.0.0.1:{port}\n }}\n"
    )
    return {
        **os.environ,
        "KRB5_CONFIG": str(work / "krb5-kdc-side.conf"),
        "KRB5_KDC_PROFILE": str(work / "kdc.conf"),
    }


@contextlib.contextmanager
def start_kdc(work: Path) -> Iterator[KDC]:
    """A throwaway MIT KDC with one user, listening on a free loopback port (TCP and UDP).

    When another process takes the port between its choice and the KDC's bind (a parallel
    worker's client connection), the KDC starts again on another port, a bounded number
    of times."""
    work.mkdir()
    env = write_kdc_config(work, free_tcp_and_udp_port())
    run = {"env": env, "check": True, "capture_output": True, "timeout": 120}
    # The master password only protects this throwaway database (deleted with tmp_path).
    subprocess.run(
        ["/usr/sbin/kdb5_util", "create", "-s", "-r", REALM, "-P", "master-for-tests"], **run
    )
    subprocess.run(
        ["/usr/sbin/kadmin.local", "-r", REALM, "-q", f"addprinc -pw {PASSWORD} {USER}"], **run
    )
    log = work / "krb5kdc.log"
    for attempt in range(1, KDC_START_ATTEMPTS + 1):
        port = free_tcp_and_udp_port()
        env = write_kdc_config(work, port)
        proc = subprocess.Popen(
            ["/usr/sbin/krb5kdc", "-n", "-r", REALM, "-P", str(work / "kdc.pid")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_tls_port(port, proc, 30)  # a TCP accept is all it checks
        except RuntimeError:  # it exited: the port was taken
            text = log.read_text() if log.exists() else ""
            assert "Address already in use" in text and attempt < KDC_START_ATTEMPTS, text
            continue
        try:
            yield KDC(port, proc, log)
            return
        finally:
            stop_process(proc)


def kerberos_settings(kdc_port: int, per_app_port: int) -> dict[str, Any]:
    return {
        **DEFAULT_SETTINGS,
        "feed": {"long_poll_s": 5, "max_staleness_s": 60},
        "kerberos": {REALM: [f"tcp/127.0.0.1:{kdc_port}"]},
        "tunnel": {
            "hostnames": ["localhost"],
            "ip_addresses": ["127.0.0.1"],
            "proxy_port": 2020,
            "per_app_port": per_app_port,
        },
    }


def start_agent(
    state: StateDir, work: Path, kdc_proxy_port: int, *extra: str
) -> subprocess.Popen[bytes]:
    """``certgate device run --kdc-proxy``; ``extra``: more of its options."""
    log_path = work / "agent.log"
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [*CERTGATE, "device", "run", "-s", str(state.path),
             "--socks", f"127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{free_port()}",
             "--kdc-proxy", f"127.0.0.1:{kdc_proxy_port}", "--check-interval", "60", *extra],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        wait_for_tls_port(kdc_proxy_port, proc, 30)
    except (RuntimeError, TimeoutError) as exc:
        proc.kill()
        raise RuntimeError(f"the agent did not start ({exc}):\n{log_path.read_text()}") from None
    return proc


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("kdc-proxy")
    per_app_port, kdc_proxy_port = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        kdc = stack.enter_context(start_kdc(work / "kdc"))
        cluster = stack.enter_context(
            start_cluster(work, kerberos_settings(kdc.port, per_app_port))
        )
        haproxy, _ = start_haproxy(work, cluster.nodes, "per_app", per_app_port)
        stack.callback(stop_process, haproxy)
        device = enroll_device(cluster, work / "device")
        agent = start_agent(device, work, kdc_proxy_port)
        stack.callback(stop_process, agent)
        yield World(cluster, kdc, device, agent, work / "agent.log", kdc_proxy_port, work)


def kinit(world: World, realm: str = REALM) -> subprocess.CompletedProcess[str]:
    """Real MIT kinit, its realm's only KDC being the agent's HTTPS KDC proxy."""
    conf = world.work / f"krb5-{realm}.conf"
    anchor = world.device.path / ANCHOR_FILE
    conf.write_text(
        f"[libdefaults]\n default_realm = {realm}\n dns_lookup_kdc = false\n"
        f"[realms]\n {realm} = {{\n"
        f"  kdc = https://127.0.0.1:{world.kdc_proxy_port}/KdcProxy\n"
        f"  http_anchors = FILE:{anchor}\n }}\n"
    )
    cache = world.work / f"ccache-{time.monotonic_ns()}"
    env = {**os.environ, "KRB5_CONFIG": str(conf), "KRB5CCNAME": f"FILE:{cache}"}
    env["KRB5_TRACE"] = "/dev/stderr"  # kinit's own account of each step, for failures
    env.pop("KRB5_KDC_PROFILE", None)
    done = subprocess.run(
        ["kinit", f"{USER}@{realm}"],
        input=PASSWORD + "\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode == 0:
        listed = subprocess.run(["klist", "-c", f"FILE:{cache}"], env=env, capture_output=True)
        done.stdout += listed.stdout.decode()
    return done


def node_logs(world: World) -> str:
    return "".join((world.work / f"{node.name}.log").read_text() for node in world.cluster.nodes)


def set_compliance(world: World, status: str) -> None:
    uid = world.device.enrollment().device_uid
    with world.cluster.console.client(world.cluster.console.admins["root"]) as admin:
        admin.put(f"/api/v1/devices/{uid}/compliance", json={"status": status}).raise_for_status()


def patch_settings(world: World, changes: dict[str, Any]) -> None:
    with world.cluster.console.client(world.cluster.console.admins["root"]) as admin:
        admin.patch(f"/api/v1/groups/{GROUP}/settings", json=changes).raise_for_status()


def kinit_until(world: World, ok: bool, realm: str = REALM) -> subprocess.CompletedProcess[str]:
    """kinit again until it succeeds (``ok``) or fails: the nodes follow a change within
    a second or so; WAIT_S bounds it."""
    deadline = time.monotonic() + WAIT_S
    while True:
        done = kinit(world, realm)
        if (done.returncode == 0) == ok or time.monotonic() > deadline:
            return done
        time.sleep(0.5)


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def wait_for_agent_403(world: Any) -> None:
    """The agent reports the tunnel's 403 for a noncompliant device. The first failed kinit
    may be an exchange cut by the live close (a bare close to the agent); the next ones are
    refused with the 403, and each must fail."""

    def refused_with_403() -> bool:
        assert kinit(world).returncode != 0, "kinit got a ticket for a non-compliant device"
        return "refused by the tunnel (403 noncompliant)" in world.agent_log.read_text()

    wait_for(refused_with_403, "the agent's account of the tunnel's 403")


def test_kinit_obtains_a_ticket_through_the_agent_and_the_tunnel(world: World) -> None:
    done = kinit(world)
    assert done.returncode == 0, done.stderr + world.agent_log.read_text()
    assert f"krbtgt/{REALM}@{REALM}" in done.stdout
    wait_for(lambda: f"dest=kdc:{REALM}" in node_logs(world), "the node's admission line")
    assert "AS_REQ" in world.kdc.log.read_text()  # the real KDC answered it
    # The agent's local TLS key never reaches the disk: the anchor is a certificate only.
    anchor = (world.device.path / ANCHOR_FILE).read_text()
    assert "CERTIFICATE" in anchor and "PRIVATE" not in anchor
    clear = (b"-----BEGIN PRIVATE KEY", b"-----BEGIN EC PRIVATE KEY")
    for path in world.device.path.rglob("*"):
        assert not path.is_file() or not any(m in path.read_bytes() for m in clear), path


def test_a_noncompliant_device_is_refused(world: World) -> None:
    set_compliance(world, "noncompliant")
    try:
        refused = kinit_until(world, ok=False)
        assert refused.returncode != 0, "kinit got a ticket for a non-compliant device"
        assert "reason=noncompliant" in node_logs(world)
        wait_for_agent_403(world)
    finally:
        set_compliance(world, "compliant")
    again = kinit_until(world, ok=True)
    assert again.returncode == 0, again.stderr


def test_a_realm_the_policy_does_not_name_is_refused(world: World) -> None:
    refused = kinit(world, OTHER_REALM)
    assert refused.returncode != 0
    wait_for(lambda: "reason=realm_not_served" in node_logs(world), "the node's denial")


def test_server_rules_denying_the_kdc_address_refuse_it(world: World) -> None:
    deny_kdc = {
        "default": "deny",
        "rules": [
            {"action": "deny", "cidrs": ["127.0.0.1/32"], "ports": [world.kdc.port]},
            {"action": "allow", "cidrs": ["127.0.0.0/8"]},
        ],
    }
    patch_settings(world, {"server_rules": deny_kdc})
    try:
        refused = kinit_until(world, ok=False)
        assert refused.returncode != 0
        assert "reason=destination_denied" in node_logs(world)
    finally:
        patch_settings(world, {"server_rules": DEFAULT_SETTINGS["server_rules"]})
    assert kinit_until(world, ok=True).returncode == 0


def test_a_udp_kdc_is_asked_over_udp_only_where_a_rule_names_udp(world: World) -> None:
    loopback_tcp_and_udp = {
        "default": "deny",
        "rules": [{"action": "allow", "cidrs": ["127.0.0.0/8"], "protocols": ["tcp", "udp"]}],
    }
    patch_settings(world, {"kerberos": {REALM: [f"udp/127.0.0.1:{world.kdc.port}"]}})
    try:
        # The default rules allow loopback for TCP only: the UDP KDC is refused.
        assert kinit_until(world, ok=False).returncode != 0
        wait_for(
            lambda: f"refuse udp to 127.0.0.1:{world.kdc.port}" in node_logs(world),
            "the rules' refusal of the UDP KDC",
        )
        patch_settings(world, {"server_rules": loopback_tcp_and_udp})
        done = kinit_until(world, ok=True)
        assert done.returncode == 0, done.stderr
    finally:
        patch_settings(
            world,
            {
                "kerberos": {REALM: [f"tcp/127.0.0.1:{world.kdc.port}"]},
                "server_rules": DEFAULT_SETTINGS["server_rules"],
            },
        )
    assert kinit_until(world, ok=True).returncode == 0
