"""The device agent: the listeners, the tunnel client and renewal, run together.

``Agent`` loads the stored profile and device identity, routes local traffic through
:class:`~certgate.device.listeners.ProxyServer`, and runs a maintenance pass at start and
every ``check_interval_s``: it asks the console about the device, renews the device
certificate through profile re-delivery when it is due (or was superseded), swaps the new
tunnel client in, warns about app certificates that need their app to authenticate
again, and checks in with the device's posture (``certgate.device.posture``) over mTLS
with the device certificate. If the console says the device is unenrolled, the agent
stops with exit code 3.

Beside it, unless ``policy_wait_s`` is None, the agent follows the group policy: it
long-polls the console for a policy newer than the one in its profile, stores the new
rules and tunnel endpoints (``apply_policy``; the certificate stays) and swaps them into
the router; listeners and open connections carry on. Errors back off with jitter and the
rules in use stay in force.

``device exec`` runs a command whose traffic is attributed to one app: through a running
agent if ``agent.json`` names a live one, otherwise through an in-process agent that lives
as long as the command (:class:`AgentThread`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from certgate.device import posture
from certgate.device.enroll import ConsoleAPI, DeviceUnenrolled, reenroll_guidance
from certgate.device.listeners import ListenAddress, ProxyServer, Router, Timeouts
from certgate.device.profile import (
    DEFAULT_RENEW_FRACTION,
    Maintenance,
    Profile,
    apply_policy,
    check_fraction,
    load_profile,
    maintain,
)
from certgate.device.state import CertifiedKey, StateDir
from certgate.device.tunnel_client import TunnelClient, TunnelTimeouts
from certgate.device.udp import UDPForwardSpec
from certgate.errors import CertgateError, ConfigError
from certgate.pki.identity import BUNDLE_ID_RE

__all__ = [
    "DEFAULT_APP",
    "DEFAULT_POLICY_WAIT_S",
    "EXIT_UNENROLLED",
    "PROXY_VARIABLES",
    "Agent",
    "AgentConfig",
    "AgentThread",
    "exec_command",
    "proxy_environment",
    "running_agent_proxy",
]

log = logging.getLogger("certgate.device")
DEFAULT_APP = "certgate.unattributed"
EXIT_UNENROLLED = 3
PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)
MAINTENANCE_TIMEOUT_S = 120.0
DEFAULT_POLICY_WAIT_S = 25.0  # under the console's default long-poll maximum (30 s)
MAX_POLICY_WAIT_S = 60.0  # the console's bound on a policy long-poll
POLICY_RETRY_S = (1.0, 120.0)  # first and longest delay after a failed policy poll
T = TypeVar("T")
# The proxy URL's password when the user name names the app: ignored by the agent, but
# some clients (requests) send Proxy-Authorization only when a password is present.
ATTRIBUTION_PASSWORD = "app"
DEFAULT_SOCKS = ListenAddress("127.0.0.1", 1080)
DEFAULT_HTTP = ListenAddress("127.0.0.1", 3128)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Validated once, at construction. Listeners stay on loopback unless ``unsafe``."""

    socks: ListenAddress | None = DEFAULT_SOCKS
    http: ListenAddress | None = DEFAULT_HTTP
    app_ports: tuple[tuple[str, ListenAddress], ...] = ()
    udp_forwards: tuple[UDPForwardSpec, ...] = ()
    default_app: str = DEFAULT_APP
    unsafe_listen_any: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    tunnel_timeouts: TunnelTimeouts = field(default_factory=TunnelTimeouts)
    renew_fraction: float = DEFAULT_RENEW_FRACTION
    check_interval_s: float | None = 300.0  # None: no maintenance (short-lived agents)
    policy_wait_s: float | None = DEFAULT_POLICY_WAIT_S  # None: do not follow the policy
    max_connections: int = 1024
    publish_runtime: bool = False  # write agent.json so that `device exec` finds us

    def __post_init__(self) -> None:
        addresses = [a for a in (self.socks, self.http) if a] + [a for _, a in self.app_ports]
        addresses += [forward.listen for forward in self.udp_forwards]
        if not addresses:
            raise ConfigError("the agent needs at least one listener")
        for address in addresses:
            if not address.is_loopback and not self.unsafe_listen_any:
                raise ConfigError(
                    f"refusing to listen on {address}: not loopback, so any host on the "
                    "network could use this device's tunnel (--unsafe-listen-any allows it)"
                )
        for forward in self.udp_forwards:
            if not BUNDLE_ID_RE.fullmatch(forward.app):
                raise ConfigError(f"invalid application bundle id {forward.app!r}")
        apps = [app for app, _ in self.app_ports] + [self.default_app]
        for app in apps:
            if not BUNDLE_ID_RE.fullmatch(app):
                raise ConfigError(f"invalid application bundle id {app!r}")
        if len(set(apps[:-1])) != len(apps) - 1:
            raise ConfigError("an app can have only one dedicated port")
        check_fraction(self.renew_fraction)
        if self.check_interval_s is not None and self.check_interval_s <= 0:
            raise ConfigError("the check interval must be positive")
        if self.policy_wait_s is not None and not 0 < self.policy_wait_s <= MAX_POLICY_WAIT_S:
            raise ConfigError(f"the policy wait must be in (0, {MAX_POLICY_WAIT_S:.0f}] seconds")


def tunnel_client_for(profile: Profile, device: CertifiedKey, config: AgentConfig) -> TunnelClient:
    return TunnelClient.for_identity(
        profile.tunnel.per_app(),
        profile.tunnel_trust,
        device,
        profile.group_id,
        config.tunnel_timeouts,
    )


class Agent:
    """One running agent (asyncio); see the module docstring."""

    def __init__(self, state: StateDir, config: AgentConfig) -> None:
        self.state, self.config = state, config
        self.exit_code = 0
        self.server: ProxyServer | None = None
        self.router: Router | None = None
        self._stopped = asyncio.Event()
        self._maintenance: asyncio.Task[None] | None = None
        self._policy: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.state.enrollment()
        profile, device = load_profile(self.state), self.state.device_identity()
        if profile is None or device is None:
            raise ConfigError("no Per-App Tunnel profile yet: run `certgate device profile`")
        router = Router(
            profile.rules, tunnel_client_for(profile, device, self.config), self.config.timeouts
        )
        self.router = router
        self.server = ProxyServer(
            router, default_app=self.config.default_app, max_connections=self.config.max_connections
        )
        await self._listen(self.server)
        log.info(
            "agent up: profile v%d, policy v%d, device cert %s",
            profile.version,
            profile.policy_version,
            device.thumbprint,
        )
        if self.config.publish_runtime:
            self._publish_runtime()
        loop = asyncio.get_running_loop()
        if self.config.check_interval_s is not None:
            self._maintenance = loop.create_task(self._maintain_loop())
        if self.config.policy_wait_s is not None:
            self._policy = loop.create_task(self._policy_loop(self.config.policy_wait_s))

    async def _listen(self, server: ProxyServer) -> None:
        if self.config.socks is not None:
            await server.listen_socks(self.config.socks)
        if self.config.http is not None:
            await server.listen_http(self.config.http)
        for app, address in self.config.app_ports:
            await server.listen_http(address, app)
        for forward in self.config.udp_forwards:
            await server.listen_udp(forward)

    @property
    def bound(self) -> dict[str, ListenAddress]:
        return dict(self.server.bound) if self.server else {}

    async def stop(self) -> None:
        # stop() may run inside the maintenance task itself (unenrolled): not cancel that.
        tasks = [t for t in (self._maintenance, self._policy) if t is not None]
        tasks = [t for t in tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.close()
        if self.config.publish_runtime:
            self.state.clear_runtime(os.getpid())
        self._stopped.set()

    async def wait(self) -> int:
        await self._stopped.wait()
        return self.exit_code

    # -- maintenance ------------------------------------------------------------------------

    async def _maintain_loop(self) -> None:
        assert self.config.check_interval_s is not None
        while True:
            self._reload_quietly()
            try:
                await self.maintain_now()
            except DeviceUnenrolled as exc:
                log.error("%s\n%s", exc, reenroll_guidance(self.state, self._console_url()))
                self.exit_code = EXIT_UNENROLLED
                await self.stop()
                return
            except (CertgateError, TimeoutError, OSError) as exc:
                log.warning("maintenance failed, will retry: %s", exc)
            except Exception:  # a bug must not end renewal for the agent's lifetime
                log.exception("maintenance failed unexpectedly, will retry")
            # An identity replaced on disk (device profile/renew) needs no console: pick it
            # up even when this pass could not reach the console.
            self._reload_quietly()
            await asyncio.sleep(self.config.check_interval_s)

    def _reload_quietly(self) -> None:
        try:
            self.reload_if_changed()
        except (CertgateError, OSError, ValueError) as exc:
            log.warning("could not load the device identity from disk: %s", exc)

    async def maintain_now(self) -> Maintenance:
        """One maintenance pass (in a thread: the console client is synchronous)."""
        report = await asyncio.wait_for(
            asyncio.to_thread(self._maintain_sync), MAINTENANCE_TIMEOUT_S
        )
        self._apply(report)
        await self.check_in_now()
        return report

    async def check_in_now(self) -> dict[str, Any] | None:
        """Report posture with the device certificate in use (after any renewal). A failed
        check-in is logged and does not fail the pass: the console's timer judges a
        device that stays silent."""
        try:
            verdict = await asyncio.wait_for(
                asyncio.to_thread(posture.check_in, self.state), MAINTENANCE_TIMEOUT_S
            )
        except (CertgateError, TimeoutError, OSError) as exc:
            log.warning("posture check-in failed, will retry: %s", exc)
            return None
        failing = "; ".join(f"{f['rule']}: {f['reason']}" for f in verdict.get("failures", []))
        if failing:
            log.warning(
                "the console judges this device %s: %s", verdict.get("compliance_status"), failing
            )
        return verdict

    def _maintain_sync(self) -> Maintenance:
        with ConsoleAPI.for_state(self.state) as api:
            return maintain(self.state, api, self.config.renew_fraction)

    def _apply(self, report: Maintenance) -> None:
        if report.delivery is not None:
            log.info(
                "renewed the device certificate (%s): profile v%d, %s replaces %s",
                report.reason,
                report.delivery.profile.version,
                report.delivery.identity.thumbprint,
                report.delivery.previous_thumbprint,
            )
        for due in report.apps_due:
            log.warning(
                "app certificate of %s expires %s: renewing it needs the enrollment "
                "credentials; run `certgate device app-auth --app %s`",
                due.bundle_id,
                due.not_after.isoformat(timespec="seconds"),
                due.bundle_id,
            )
        if report.status.get("blocked"):
            log.warning("the console reports this device as blocked; tunnels refuse it")
        self.reload_if_changed()

    def reload_if_changed(self) -> bool:
        """Swap in the identity on disk if it is not the one in use: this pass renewed it,
        or another command (``device profile``, ``device renew``) replaced it."""
        if self.router is None:
            return False
        profile, device = load_profile(self.state), self.state.device_identity()
        if profile is None or device is None:
            return False
        if device.thumbprint == self.router.tunnel.device_thumbprint:
            return False
        self.router.swap(profile.rules, tunnel_client_for(profile, device, self.config))
        log.info(
            "now using device certificate %s (profile v%d)", device.thumbprint, profile.version
        )
        return True

    # -- policy -----------------------------------------------------------------------------

    async def _policy_loop(self, wait_s: float) -> None:
        failures = 0
        while True:
            failures = 0 if await self._policy_pass(wait_s) else failures + 1
            if failures:
                await asyncio.sleep(retry_delay(failures))

    async def _policy_pass(self, wait_s: float) -> bool:
        """One long-poll; False when it failed (said in the log; the rules in use stay)."""
        try:
            await self.poll_policy(wait_s)
        except (CertgateError, TimeoutError, OSError) as exc:
            log.warning("policy update failed, will retry: %s", exc)
            return False
        except Exception:  # a bug must not end policy updates for the agent's lifetime
            log.exception("policy update failed unexpectedly, will retry")
            return False
        return True

    async def poll_policy(self, wait_s: float = DEFAULT_POLICY_WAIT_S) -> Profile | None:
        """Ask the console for a policy newer than the profile's, waiting up to ``wait_s``;
        a newer one is stored and swapped in. Returns the updated profile, or None."""
        profile = await in_daemon_thread(lambda: self._poll_policy_sync(wait_s))
        if profile is not None:
            self._use_policy(profile)
        return profile

    def _poll_policy_sync(self, wait_s: float) -> Profile | None:
        current = load_profile(self.state)
        if current is None:
            raise ConfigError("no Per-App Tunnel profile: run `certgate device profile`")
        with ConsoleAPI.for_state(self.state) as api:
            answer = api.device_policy(current.policy_version, wait_s)
        return None if answer is None else apply_policy(self.state, answer)

    def _use_policy(self, profile: Profile) -> None:
        """Swap the policy's rules in; a tunnel client for new endpoints, the same one
        (and the same device certificate) otherwise."""
        if self.router is None:
            return
        tunnel = self.router.tunnel
        if tuple(profile.tunnel.per_app()) != tunnel.endpoints:
            device = self.state.device_identity()
            if device is None:
                raise ConfigError("the device identity is gone from the state directory")
            tunnel = tunnel_client_for(profile, device, self.config)
        self.router.swap(profile.rules, tunnel)
        log.info(
            "applied policy v%d: %d device rules, default %s; tunnel %s",
            profile.policy_version,
            len(profile.rules.rules),
            profile.rules.default.value,
            ", ".join(f"{host}:{port}" for host, port in tunnel.endpoints),
        )

    def _console_url(self) -> str | None:
        try:
            return self.state.enrollment().console_url
        except CertgateError:
            return None

    def _publish_runtime(self) -> None:
        bound = self.bound
        self.state.save_runtime(
            {
                "pid": os.getpid(),
                "http": _address(bound.get("http")),
                "socks": _address(bound.get("socks")),
                "app_ports": {
                    name.removeprefix("app:"): _address(addr)
                    for name, addr in bound.items()
                    if name.startswith("app:")
                },
            }
        )


def _address(address: ListenAddress | None) -> list[Any] | None:
    return None if address is None else [address.host, address.port]


def retry_delay(failures: int, jitter: Callable[[], float] = random.random) -> float:
    """Seconds to wait after ``failures`` failed policy polls in a row: doubling from the
    first delay up to the longest, then a random point in its upper half (so that agents
    that lost the console together do not all come back at once)."""
    first, longest = POLICY_RETRY_S
    ceiling = min(longest, first * 2.0 ** min(failures - 1, 32))
    return ceiling * (0.5 + jitter() / 2)


async def in_daemon_thread(call: Callable[[], T]) -> T:
    """``call()`` on a daemon thread of its own. ``asyncio.to_thread`` uses the default
    executor, which ``asyncio.run`` joins at shutdown: stopping the agent would wait for a
    long-poll to end. Cancelling the await abandons the thread; its outcome is dropped."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return  # cancelled: nobody waits for this outcome any more
        if error is None:
            future.set_result(cast(T, result))
        else:
            future.set_exception(error)

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = call()
        except BaseException as exc:  # the awaiting task decides what it means
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits either
            loop.call_soon_threadsafe(deliver, result, error)

    threading.Thread(target=run, name="certgate-policy-poll", daemon=True).start()
    return await future


class AgentThread:
    """An agent on its own event loop in a daemon thread (``device exec``, tests, demos)."""

    def __init__(self, state: StateDir, config: AgentConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.agent: Agent | None = None
        self._state, self._config = state, config
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> AgentThread:
        self._thread.start()
        try:
            self.call(self._start())
        except BaseException:
            self._shutdown()
            raise
        return self

    async def _start(self) -> None:
        self.agent = Agent(self._state, self._config)
        await self.agent.start()

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def bound(self) -> dict[str, ListenAddress]:
        return self.agent.bound if self.agent else {}

    def __exit__(self, *exc: object) -> None:
        if self.agent is not None:
            self.call(self.agent.stop())
        self._shutdown()

    def _shutdown(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


# -- device exec --------------------------------------------------------------------------


def proxy_environment(proxy_url: str, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with every proxy variable pointing at ``proxy_url`` and NO_PROXY removed:
    the agent, not the command, decides what bypasses the tunnel."""
    env = {k: v for k, v in base.items() if k not in ("NO_PROXY", "no_proxy")}
    env.update(dict.fromkeys(PROXY_VARIABLES, proxy_url))
    return env


def running_agent_proxy(state: StateDir, app: str) -> str | None:
    """A proxy URL attributed to ``app`` on a live agent of this state dir, if any."""
    runtime = state.runtime()
    if runtime is None or not _alive(runtime.get("pid")):
        return None
    port_of = runtime.get("app_ports") or {}
    if app in port_of and _listening(port_of[app]):
        host, port = port_of[app]
        return f"http://{ListenAddress(host, port)}"
    http = runtime.get("http")
    if http and _listening(http):
        # No port of its own: name the app as the proxy user (Proxy-Authorization).
        return f"http://{app}:{ATTRIBUTION_PASSWORD}@{ListenAddress(http[0], http[1])}"
    return None


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _listening(address: Any) -> bool:
    try:
        with socket.create_connection((address[0], address[1]), timeout=1):
            return True
    except (OSError, TypeError, IndexError):
        return False


def exec_command(
    state: StateDir, app: str, argv: Sequence[str], config: AgentConfig | None = None
) -> int:
    """Run ``argv`` with its traffic attributed to ``app``; returns its exit status."""
    if not BUNDLE_ID_RE.fullmatch(app):
        raise ConfigError(f"invalid application bundle id {app!r}")
    if not argv:
        raise ConfigError("no command to run")
    proxy = running_agent_proxy(state, app)
    if proxy is not None:
        log.info("using the running agent: %s", proxy)
        return _run(argv, proxy)
    config = config or AgentConfig(
        socks=None,
        http=None,
        app_ports=((app, ListenAddress("127.0.0.1", 0)),),
        check_interval_s=None,
        policy_wait_s=None,
    )
    with AgentThread(state, config) as running:
        return _run(argv, f"http://{running.bound[f'app:{app}']}")


def _run(argv: Sequence[str], proxy: str) -> int:
    env = proxy_environment(proxy, os.environ)
    try:
        return subprocess.run(list(argv), env=env, check=False).returncode
    except FileNotFoundError as exc:
        raise ConfigError(f"command not found: {argv[0]}") from exc
