"""The relays under test: ``certgate tunnel run`` and its anchors, started with the same
certificates, TLS version, cipher suite and key-exchange group.

* ``certgate``: the real tunnel node (Proxy mode: mTLS, then ``CONNECT`` to the origin).
* ``haproxy``: HAProxy in TCP mode terminating TLS (``verify required``), one thread.
* ``stunnel``: stunnel4 terminating TLS (``verify = 2``).
* ``plain``: HAProxy in TCP mode without TLS: the ceiling of a relay on this machine.

The anchors forward straight to the origin: they do no ``CONNECT`` (one round trip and one
request parse fewer than certgate), and they verify a full chain (Device Root then Root)
because neither offers OpenSSL's partial-chain anchoring, one ECDSA verification more than
certgate per full handshake.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench import env, procs
from bench.fixture import RelayCerts
from bench.procs import Proc, Supervisor

START_S = 60.0


@dataclass
class Relay:
    name: str
    port: int
    proc: Proc
    tls: bool
    connect: bool  # the client must send CONNECT first (certgate's Proxy mode)
    admin_port: int | None = None

    def metrics(self) -> str:
        assert self.admin_port is not None
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        return httpx.get(url, timeout=30).text

    def health(self) -> dict[str, object]:
        assert self.admin_port is not None
        url = f"http://127.0.0.1:{self.admin_port}/healthz"
        body: dict[str, object] = httpx.get(url, timeout=30).json()
        return body


def start_certgate(
    sup: Supervisor,
    state_dir: Path,
    name: str,
    *,
    loop: str = "asyncio",
    tls_backend: str = "pyopenssl",
    cores: set[int] | None = None,
    workers: int = 1,
) -> Relay:
    port, per_app, admin = procs.free_port(), procs.free_port(), procs.free_port()
    argv = [
        *procs.CERTGATE,
        "tunnel",
        "run",
        "--state-dir",
        str(state_dir),
        "--proxy-listen",
        f"127.0.0.1:{port}",
        "--per-app-listen",
        f"127.0.0.1:{per_app}",
        "--admin-listen",
        f"127.0.0.1:{admin}",
        "--loop",
        loop,
        "--tls-backend",
        tls_backend,
        "--drain-s",
        "1",
        "--workers",
        str(workers),
    ]
    pinned = {"OPENSSL_CONF": str(env.PIN_FILE)}
    proc = sup.start(name, argv, cores=cores, env_extra=pinned)
    procs.wait_for_port(admin, proc, START_S)
    procs.wait_for_port(port, proc, START_S)
    return Relay(name, port, proc, tls=True, connect=True, admin_port=admin)


def wait_fresh(relay: Relay, entries: int, timeout: float) -> float:
    """Wait (bounded) until the node's table is fresh with >= ``entries``; return seconds."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        relay.proc.check()
        try:
            health = relay.health()
        except httpx.HTTPError:
            health = {}
        table_entries = health.get("table_entries", 0)
        if health.get("status") == "ok" and isinstance(table_entries, int):
            if table_entries >= entries:
                return time.monotonic() - started
        time.sleep(0.05)
    raise TimeoutError(f"{relay.name}: table not fresh with {entries} entries in {timeout:g}s")


def _haproxy_config(port: int, origin: int, bind_tls: str) -> str:
    # Two descriptors per relayed connection, within the inherited RLIMIT_NOFILE.
    maxconn = (env.open_files_limit() - 100) // 2
    return f"""global
  nbthread 1
  maxconn {maxconn}
defaults
  mode tcp
  timeout connect 5s
  timeout client 120s
  timeout server 120s
frontend relay
  bind 127.0.0.1:{port}{bind_tls}
  default_backend origin
backend origin
  server origin 127.0.0.1:{origin}
"""


def start_haproxy(
    sup: Supervisor,
    work: Path,
    certs: RelayCerts | None,
    origin_port: int,
    *,
    cores: set[int] | None = None,
) -> Relay:
    """HAProxy terminating mTLS (``certs`` given) or a plain TCP relay (``certs`` None)."""
    port = procs.free_port()
    bind_tls = ""
    if certs is not None:
        bind_tls = (
            f" ssl crt {certs.combined} verify required ca-file {certs.client_ca}"
            f" ssl-min-ver TLSv1.3 ciphersuites {env.CIPHER} curves {env.GROUP}"
        )
    name = "haproxy" if certs else "plain"
    config = work / f"{name}.cfg"
    config.write_text(_haproxy_config(port, origin_port, bind_tls))
    pinned = {"OPENSSL_CONF": str(env.PIN_FILE)}
    proc = sup.start(name, ["haproxy", "-db", "-f", str(config)], cores=cores, env_extra=pinned)
    procs.wait_for_port(port, proc, START_S)
    return Relay(name, port, proc, tls=certs is not None, connect=False)


def start_stunnel(
    sup: Supervisor,
    work: Path,
    certs: RelayCerts,
    origin_port: int,
    *,
    cores: set[int] | None = None,
) -> Relay:
    port = procs.free_port()
    config = work / "stunnel.conf"
    config.write_text(f"""foreground = yes
syslog = no
pid =
[relay]
accept = 127.0.0.1:{port}
connect = 127.0.0.1:{origin_port}
cert = {certs.chain}
key = {certs.key}
CAfile = {certs.client_ca}
verify = 2
sslVersionMin = TLSv1.3
ciphersuites = {env.CIPHER}
curves = {env.GROUP}
""")
    pinned = {"OPENSSL_CONF": str(env.PIN_FILE)}
    proc = sup.start("stunnel", ["stunnel4", str(config)], cores=cores, env_extra=pinned)
    procs.wait_for_port(port, proc, START_S)
    return Relay("stunnel", port, proc, tls=True, connect=False)


@contextmanager
def origin(sup: Supervisor, cores: set[int] | None = None) -> Iterator[int]:
    """A running ``bench.origin`` for the duration of the block; yields its port."""
    port = procs.free_port()
    argv = [procs.CERTGATE[0], "-m", "bench.origin", "--port", str(port)]
    proc = sup.start("origin", argv, cores=cores, env_extra={"PYTHONPATH": str(env.ROOT)})
    try:
        procs.wait_for_port(port, proc, START_S)
        yield port
    finally:
        sup.stop(proc)
