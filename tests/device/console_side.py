"""What the device tests need from the rest of the system, done the real way: admin calls to
a real console (enrollment users and tokens, group settings, unenroll), and the group's
tunnel set up through the console API and following its signed feed, in-process on its
own event-loop thread (``certgate.tunnel.setup`` + ``certgate.tunnel.runner.build``)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from certgate.pki.keys import load_private_key_pem
from certgate.tunnel.runner import RunOptions, build
from certgate.tunnel.service import Endpoint
from certgate.tunnel.setup import AdminCredential, setup
from certgate.tunnel.table import DeviceTable
from tests.support import RunningConsole, free_port

GROUP = "global"
USER, PASSWORD = "alice", "alice-password"


def root_pem(console: RunningConsole) -> bytes:
    """The console's root alone (what a user passes as --ca-file)."""
    chain = console.chain_path.read_bytes()
    return chain[: chain.index(b"-----END CERTIFICATE-----") + 26]


def admin_call(console: RunningConsole, method: str, path: str, body: Any = None) -> Any:
    with console.client(console.admins["root"]) as admin:
        response = admin.request(method, path, json=body)
    assert response.is_success, response.text
    return response.json() if response.content else None


def add_enrollment_user(console: RunningConsole, user: str = USER, pw: str = PASSWORD) -> None:
    admin_call(
        console,
        "POST",
        f"/api/v1/groups/{GROUP}/enrollment-users",
        {"username": user, "password": pw},
    )


def enrollment_token(console: RunningConsole, owner: str = USER) -> str:
    answer = admin_call(
        console, "POST", f"/api/v1/groups/{GROUP}/enrollment-tokens", {"owner": owner}
    )
    return str(answer["token"])


def configure_group(
    console: RunningConsole, rules: dict[str, Any], per_app_port: int = 8443, proxy_port: int = 2020
) -> None:
    """Tunnel ports, device rules, and devices compliant from enrollment on."""
    settings = {
        "tunnel": {
            "hostnames": ["localhost"],
            "ip_addresses": ["127.0.0.1"],
            "per_app_port": per_app_port,
            "proxy_port": proxy_port,
        },
        "device_rules": rules,
        "server_rules": {
            "default": "deny",
            "rules": [{"action": "allow", "cidrs": ["127.0.0.0/8"]}],
        },
        "initial_compliance": "compliant",
    }
    admin_call(console, "PATCH", f"/api/v1/groups/{GROUP}/settings", settings)


def unenroll(console: RunningConsole, device_uid: str) -> None:
    admin_call(console, "POST", f"/api/v1/devices/{device_uid}/unenroll")


class ConsoleTunnel:
    """The group's tunnel node: set up with the root admin's API key + certificate, then
    serving Per-App Tunnel and Proxy listeners while it follows the console's feed."""

    def __init__(self, console: RunningConsole, work: Path) -> None:
        self.console, self.work = console, work
        self.per_app_port, self.proxy_port = free_port(), free_port()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._sync: asyncio.Task[None] | None = None

    def __enter__(self) -> ConsoleTunnel:
        creds = self.console.admins["root"]
        admin = AdminCredential(
            creds.api_key,
            (x509.load_pem_x509_certificate(creds.cert_path.read_bytes()),),
            load_private_key_pem(creds.key_path.read_bytes()),
        )
        root = x509.load_pem_x509_certificate(root_pem(self.console))
        state_dir = self.work / "tunnel-node"
        state = setup(self.console.url, GROUP, admin, root, state_dir, "node-1")
        options = RunOptions(
            state_dir,
            proxy=Endpoint("127.0.0.1", self.proxy_port),
            per_app=Endpoint("127.0.0.1", self.per_app_port),
            admin=None,
        )
        self.service, self.follower = build(state, options)
        self._thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        await self.follower.bootstrap()
        await self.service.start()
        self._sync = asyncio.get_running_loop().create_task(self.follower.run())

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def wait_for_table(self, predicate: Callable[[DeviceTable], bool], timeout: float = 20) -> None:
        """Until the feed has brought the table into the state ``predicate`` expects."""
        deadline = time.monotonic() + timeout
        while not predicate(self.follower.table):
            if time.monotonic() > deadline:
                raise TimeoutError("the tunnel's device table did not catch up with the feed")
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            await self.service.stop(drain_s=1)
            if self._sync is not None:
                self._sync.cancel()
                await asyncio.gather(self._sync, return_exceptions=True)

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
