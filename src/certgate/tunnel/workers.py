"""``certgate tunnel run --workers N``: one feed follower, N data-plane processes.

The supervisor (the process started by ``tunnel run``) follows the feed, serves ``/healthz``
and ``/metrics`` and owns the shared device table (``tunnel.shared_table``): the follower's
table keeps its slots in a file under ``/dev/shm`` that every worker maps read-only, so the
table is in memory once (the supervisor's included). Each worker is
a ``python -m certgate.tunnel.workers`` process serving both data listeners; every worker
binds them with ``SO_REUSEPORT``, so the kernel spreads new connections over the workers
(the supervisor holds a bound, not listening, socket per port so nothing else takes it
while a worker restarts).

The channel: a Unix socketpair per worker carrying length-prefixed JSON messages, in order.
Supervisor to worker: ``hello`` (options, the table's file, the policy in force), ``table``
(a new generation to map: after a snapshot, or a batch that overfilled the current one),
``change`` (a ``FeedChange``, with the policy when it changed; the follower has written the
table before it is sent) and ``identity`` (a rotated tunnel identity). Worker
to supervisor: ``ready`` and, every ``REPORT_INTERVAL_S``, a ``report`` (its metrics and its
live tunnels) that ``/metrics`` sums and the node's report to the console lists. Every
worker judges every change against its own live tunnels (``TunnelService.on_change``, then
``admission.admit`` on entries read from the shared table: one home).

A worker that dies is started again (its tunnels are the ones lost); a worker that stops
reading its channel is killed and restarted rather than serve an old table. SIGTERM drains
every worker (each ``TunnelService.stop``), then the supervisor exits. A worker whose
supervisor is gone (channel closed) drains and exits too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from certgate import feed, logs
from certgate.feed import PolicyUpdate
from certgate.heap import freeze_startup_heap
from certgate.pki.keys import load_private_key_pem, private_key_pem
from certgate.tunnel.cascade import Role
from certgate.tunnel.config import TunnelState, load_state
from certgate.tunnel.metrics import denial_totals
from certgate.tunnel.report import Reporter
from certgate.tunnel.runner import RunOptions, cascade_of, listener_tls
from certgate.tunnel.server import Gate, Limits
from certgate.tunnel.service import Endpoint, TunnelService
from certgate.tunnel.shared_table import MappedFiles, SharedTable
from certgate.tunnel.sync import FeedChange, FeedFollower, is_fresh_age
from certgate.tunnel.udp import UDPLimits

log = logging.getLogger("certgate.tunnel")

REPORT_INTERVAL_S = 0.5
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# A worker with this much unread from its channel is not keeping up with the feed.
MAX_BACKLOG_BYTES = 64 * 1024 * 1024
META_INTERVAL_S = 0.5
RESTART_DELAY_S = (0.2, 5.0)  # first, cap (doubling while a worker keeps dying young)
READY_TIMEOUT_S = 60.0


def usable_cpus() -> int:
    """The default number of workers: the CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


# The channel


def encode_message(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return len(body).to_bytes(4, "big") + body


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, None at the end of the channel."""
    try:
        size = int.from_bytes(await reader.readexactly(4), "big")
        if size > MAX_MESSAGE_BYTES:
            raise ValueError(f"channel message of {size} bytes")
        message = json.loads(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        return None
    if not isinstance(message, dict):
        raise ValueError("channel message is not an object")
    return message


def _read_hello(sock: socket.socket) -> dict[str, Any]:
    """The first message, read before the worker's event loop exists."""

    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("supervisor closed the channel before hello")
            data += chunk
        return data

    message = json.loads(exactly(int.from_bytes(exactly(4), "big")))
    if not isinstance(message, dict) or message.get("type") != "hello":
        raise ValueError("the first channel message must be hello")
    return message


def _endpoint(value: list[Any] | None) -> Endpoint | None:
    return None if value is None else Endpoint(str(value[0]), int(value[1]))


def limits_of(raw: dict[str, Any]) -> Limits:
    """The hello's limits: ``asdict`` made the nested UDP bounds a dict as well."""
    return Limits(**{**raw, "udp": UDPLimits(**raw["udp"])})


def _worker_options(hello: dict[str, Any]) -> RunOptions:
    """What a worker's TLS and cascade are built from (``runner.listener_tls`` and
    ``runner.cascade_of``, as a single-process node builds them)."""
    return RunOptions(
        state_dir=Path(hello["state_dir"]),
        tls_curve=hello["tls_curve"],
        tls_backend=hello["tls_backend"],
        role=Role(hello["role"]),
        back_ends=tuple(Endpoint(str(host), int(port)) for host, port in hello["back_ends"]),
    )


def _policy(raw: object) -> PolicyUpdate:
    policy = feed.decode_op(raw, "policy", feed.FEED_VERSION)
    if not isinstance(policy, PolicyUpdate):
        raise ValueError("channel policy is not a policy operation")
    return policy


def _identity_message(state: TunnelState) -> dict[str, Any]:
    """A rotated identity for the workers: PEMs over the socketpair (memory, never disk)."""
    return {
        "type": "identity",
        "chain": [
            c.public_bytes(Encoding.PEM).decode() for c in (state.tunnel_cert, *state.tunnel_chain)
        ],
        "key": private_key_pem(state.tunnel_key).decode(),
        "device_roots": [root.public_bytes(Encoding.PEM).decode() for root in state.device_roots],
    }


# The worker


class MappedSource:
    """The data plane's ``TableSource`` in a worker: the shared table, the policy the
    supervisor sent, and freshness from the exchange time the supervisor writes."""

    def __init__(self, table: SharedTable, policy: PolicyUpdate) -> None:
        self.table = table
        self.policy = policy

    def is_fresh(self, now: float | None = None) -> bool:
        last = self.table.last_exchange
        age = None if last is None else (time.time() if now is None else now) - last
        return is_fresh_age(age, self.policy.max_staleness_s)

    def swap(self, table: SharedTable) -> None:
        old, self.table = self.table, table
        old.close()


class Worker:
    """One data-plane process: serves the listeners, follows its channel."""

    def __init__(
        self,
        hello: dict[str, Any],
        table: SharedTable,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.hello, self.reader, self.writer = hello, reader, writer
        self.state = load_state(Path(hello["state_dir"]))
        self.options = _worker_options(hello)
        self.source = MappedSource(table, _policy(hello["policy"]))
        self.service = TunnelService(
            Gate(self.state.group_id, self.source, cascade=cascade_of(self.state, self.options)),
            listener_tls(self.state, self.options),
            _endpoint(hello["proxy"]),
            _endpoint(hello["per_app"]),
            None,
            limits_of(hello["limits"]),
            reuse_port=True,
        )

    async def serve(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.service.start()
        self.writer.write(encode_message({"type": "ready", "pid": os.getpid()}))
        freeze_startup_heap()
        follow = loop.create_task(self._follow(stop))
        report = loop.create_task(self._report())
        await stop.wait()
        await self.service.stop(float(self.hello["drain_s"]))
        for task in (follow, report):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(self, stop: asyncio.Event) -> None:
        try:
            while (message := await read_message(self.reader)) is not None:
                self.apply(message)
        finally:
            stop.set()  # no supervisor: drain and exit

    def apply(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "table":
            try:
                table = SharedTable(Path(message["path"]))
            except (OSError, ValueError) as exc:  # already replaced: its successor follows
                log.warning("shared table %s not mapped (%s)", message["path"], exc)
                return
            self.source.swap(table)
        elif kind == "change":
            if message["policy"] is not None:
                self.source.policy = _policy(message["policy"])
            thumbprints = message["thumbprints"]
            self.service.on_change(
                FeedChange(
                    None if thumbprints is None else tuple(thumbprints),
                    message["signed_at"],
                    message["cause"],
                )
            )
        elif kind == "identity":
            self.use_identity(message)

    def use_identity(self, message: dict[str, Any]) -> None:
        """A rotated identity: the listener's TLS and, on a front end, the hops' client
        side (the same swap as ``runner.build``'s ``use_identity``)."""
        chain = [x509.load_pem_x509_certificate(pem.encode()) for pem in message["chain"]]
        roots = [x509.load_pem_x509_certificate(p.encode()) for p in message["device_roots"]]
        rotated = replace(
            self.state,
            tunnel_cert=chain[0],
            tunnel_chain=tuple(chain[1:]),
            tunnel_key=load_private_key_pem(message["key"].encode()),
            device_roots=tuple(roots),
        )
        tls, cascade = listener_tls(rotated, self.options), cascade_of(rotated, self.options)
        self.service.swap_tls(tls)
        self.service.gate.cascade = cascade
        self.state = rotated

    async def _report(self) -> None:
        from prometheus_client import generate_latest

        while True:
            body = {
                "type": "report",
                "metrics": generate_latest(self.service.metrics.registry).decode(),
                "tunnels": self.service.live_tunnels(),
                "connections": len(self.service.shared.registry.all),
            }
            self.writer.write(encode_message(body))
            await self.writer.drain()
            await asyncio.sleep(REPORT_INTERVAL_S)


async def _worker(sock: socket.socket, hello: dict[str, Any]) -> None:
    sock.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    table, held = await _first_table(hello, reader)
    worker = Worker(hello, table, reader, writer)
    for message in held:
        worker.apply(message)
    await worker.serve()
    writer.close()


async def _first_table(
    hello: dict[str, Any], reader: asyncio.StreamReader
) -> tuple[SharedTable, list[dict[str, Any]]]:
    """The table to serve from, and the messages read before it. The generation the hello
    names may be gone already (the follower swapped while this worker started): its
    successor's path follows on the channel, so the worker waits for it rather than exit."""
    path: str = hello["table"]
    held: list[dict[str, Any]] = []
    while True:
        try:
            return SharedTable(Path(path)), held
        except (OSError, ValueError) as exc:
            log.info("shared table %s already replaced (%s); taking its successor", path, exc)
        while (message := await read_message(reader)) is not None and message["type"] != "table":
            held.append(message)
        if message is None:
            raise ConnectionError("the supervisor closed the channel before a table was mapped")
        path = message["path"]


def worker_main(fd: int) -> None:
    """Entry point of a worker process (``python -m certgate.tunnel.workers FD``)."""
    from certgate.tunnel.runner import loop_factory

    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    sock = socket.socket(fileno=fd)
    hello = _read_hello(sock)
    # The node's own format, level, syslog target and fields: a worker's admissions and
    # denials are the node's (an imported library's basicConfig must not decide).
    logs.from_inherited(hello["logs"])
    with asyncio.Runner(loop_factory=loop_factory(hello["loop"])) as runner:
        runner.run(_worker(sock, hello))


# The supervisor


@dataclass
class WorkerHandle:
    index: int
    proc: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    report: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0

    def send(self, message: bytes) -> None:
        if self.writer is None or self.writer.is_closing():
            return
        transport = self.writer.transport
        if transport.get_write_buffer_size() > MAX_BACKLOG_BYTES and self.proc is not None:
            log.error("worker %d does not keep up with the feed; restarting it", self.index)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            return
        self.writer.write(message)


class SupervisorService(TunnelService):
    """The supervisor's admin side: health and live tunnels are the workers' sum."""

    workers: list[WorkerHandle]

    def live_tunnels(self) -> list[dict[str, Any]]:
        return [tunnel for w in self.workers for tunnel in w.report.get("tunnels", [])]

    def health(self) -> tuple[int, dict[str, Any]]:
        status, body = super().health()
        body["connections"] = sum(w.report.get("connections", 0) for w in self.workers)
        body["workers"] = [
            {
                "index": w.index,
                "pid": w.proc.pid if w.proc else None,
                "ready": w.ready.is_set(),
                "connections": w.report.get("connections", 0),
            }
            for w in self.workers
        ]
        return status, body


class Supervisor:
    """Starts, feeds and restarts the workers; tells them which table file to map."""

    def __init__(
        self,
        follower: FeedFollower,
        options: RunOptions,
        service: SupervisorService,
        listeners: dict[str, Endpoint],
    ) -> None:
        self.follower, self.options, self.service = follower, options, service
        self.listeners = listeners
        self.workers = [WorkerHandle(i) for i in range(options.workers)]
        service.workers = self.workers
        self.restarts = 0
        self.stopping = False
        self._mapped = self._table_path()  # the generation the workers were told of
        self._identity: dict[str, Any] | None = None
        self._reserved: list[socket.socket] = []
        self._listen: dict[str, list[Any] | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # The table

    def _last_exchange(self) -> float | None:
        age = self.follower.age_s()
        return None if age is None else time.time() - age

    def _table_path(self) -> Path:
        path = self.follower.table.path
        assert path is not None  # the follower's home is MappedFiles (supervise)
        return path

    def _follow_table(self) -> None:
        """The exchange time into the table's header, and the workers told of a new
        generation (the table may also have moved while a batch was then refused)."""
        self.follower.table.set_last_exchange(self._last_exchange())
        if self.follower.table.path != self._mapped:
            self._mapped = self._table_path()
            self._broadcast({"type": "table", "path": str(self._mapped)})

    def on_change(self, change: FeedChange) -> None:
        """Follower callback (the table already written): a new generation to map, if the
        table moved to one, then the change, to every worker."""
        self._follow_table()
        # A snapshot carries the policy at its seq too: send it with every full change.
        policy = self.follower.policy.encode() if change.thumbprints is None else None
        self._broadcast(
            {
                "type": "change",
                "thumbprints": None if change.thumbprints is None else list(change.thumbprints),
                "signed_at": change.signed_at,
                "cause": change.cause,
                "policy": policy,
            }
        )
        self.service.on_change(change)  # the supervisor's own duties (restart required)

    def use_identity(self, rotated: TunnelState) -> None:
        """A rotated tunnel identity: checked here (a bad one raises and is refused), then
        sent to every worker, and to every worker started later."""
        # checked by building it; swapped for the node's identity_swaps metric
        self.service.swap_tls(listener_tls(rotated, self.options))
        self._identity = _identity_message(rotated)
        self._broadcast(self._identity)

    def _broadcast(self, message: dict[str, Any]) -> None:
        data = encode_message(message)
        for worker in self.workers:
            worker.send(data)

    async def keep_meta(self) -> None:
        """The exchange time (freshness) reaches the workers within META_INTERVAL_S."""
        while True:
            self._follow_table()
            await asyncio.sleep(META_INTERVAL_S)

    # The workers

    def reserve_ports(self) -> dict[str, int]:
        """Bind (not listen) each data port with SO_REUSEPORT: the port is the node's while
        workers come and go, and a port 0 is resolved once for all of them."""
        bound: dict[str, int] = {}
        for name, endpoint in self.listeners.items():
            family, kind, proto, _, address = socket.getaddrinfo(
                endpoint.host, endpoint.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind(address)
            except OSError:
                sock.close()
                raise
            self._reserved.append(sock)
            bound[name] = sock.getsockname()[1]
            self._listen[name] = [endpoint.host, bound[name]]
        return bound

    def _hello(self, index: int) -> dict[str, Any]:
        options = self.options
        return {
            "type": "hello",
            "index": index,
            "state_dir": str(options.state_dir),
            "table": str(self._mapped),
            "policy": self.follower.policy.encode(),
            "proxy": self._listen.get("proxy"),
            "per_app": self._listen.get("per_app"),
            "loop": options.loop,
            "drain_s": options.drain_s,
            "tls_curve": options.tls_curve,
            "tls_backend": options.tls_backend,
            "role": options.role.value,
            "back_ends": [[e.host, e.port] for e in options.back_ends],
            "limits": asdict(options.limits),
            "logs": logs.inherited(),
        }

    async def spawn(self, worker: WorkerHandle) -> None:
        ours, theirs = socket.socketpair()
        try:
            worker.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "certgate.tunnel.workers",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        worker.ready.clear()
        worker.report = {}
        worker.started = time.monotonic()
        ours.setblocking(False)
        reader, worker.writer = await asyncio.open_unix_connection(sock=ours)
        worker.send(encode_message(self._hello(worker.index)))
        if self._identity is not None:
            worker.send(encode_message(self._identity))
        self._keep(self._listen_to(worker, reader))
        log.info("worker %d started (pid %d)", worker.index, worker.proc.pid)

    def _keep(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen_to(self, worker: WorkerHandle, reader: asyncio.StreamReader) -> None:
        try:
            while (message := await read_message(reader)) is not None:
                if message["type"] == "ready":
                    worker.ready.set()
                elif message["type"] == "report":
                    worker.report = message
        except (ValueError, KeyError, ConnectionError) as exc:
            log.error("worker %d sent a bad message (%s); restarting it", worker.index, exc)
            if worker.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.kill()

    async def watch(self, worker: WorkerHandle) -> None:
        """Restart ``worker`` whenever it exits, until the node stops."""
        delay = RESTART_DELAY_S[0]
        while True:
            assert worker.proc is not None
            code = await worker.proc.wait()
            if worker.writer is not None:
                worker.writer.close()
            worker.report = {}
            if self.stopping:
                return
            self.restarts += 1
            lived = time.monotonic() - worker.started
            delay = (
                RESTART_DELAY_S[0]
                if lived > 10 * RESTART_DELAY_S[1]
                else min(delay * 2, RESTART_DELAY_S[1])
            )
            log.error(
                "worker %d (pid %d) exited with %s after %.1f s; starting it again in %.1f s",
                worker.index,
                worker.proc.pid,
                code,
                lived,
                delay,
            )
            await asyncio.sleep(delay)
            if self.stopping:
                return
            await self.spawn(worker)

    async def start(self) -> None:
        for worker in self.workers:
            await self.spawn(worker)
            self._keep(self.watch(worker))
        self._keep(self.keep_meta())
        try:
            await asyncio.wait_for(
                asyncio.gather(*(w.ready.wait() for w in self.workers)), READY_TIMEOUT_S
            )
        except TimeoutError:
            log.error("not every worker was ready within %.0f s", READY_TIMEOUT_S)

    async def stop(self, drain_s: float) -> None:
        """SIGTERM every worker (each drains up to ``drain_s``), then wait for them."""
        self.stopping = True
        procs = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), drain_s + 10)
        except TimeoutError:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for task in list(self._tasks):
            task.cancel()
        for sock in self._reserved:
            sock.close()


def _table_directory() -> Path:
    """Memory-backed when the system has /dev/shm; mode 0700 either way."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="certgate-table-", dir=shm if shm.is_dir() else None))


async def supervise(state: TunnelState, options: RunOptions) -> None:
    """``serve`` for ``options.workers`` > 1 (the runner's options)."""
    directory = _table_directory()
    follower = FeedFollower(state, state_dir=options.state_dir, table_home=MappedFiles(directory))
    policy = follower.policy
    proxy = options.proxy or Endpoint(options.listen_host, policy.proxy_port)
    per_app = options.per_app or Endpoint(options.listen_host, policy.per_app_port)
    service = SupervisorService(
        Gate(state.group_id, follower),
        listener_tls(state, options),
        None,
        None,
        options.admin,
        options.limits,
        status=follower.status,
        ports_from_policy={
            name: f"{name}_port"
            for name, pinned in (("proxy", options.proxy), ("per_app", options.per_app))
            if pinned is None
        },
    )
    supervisor = Supervisor(follower, options, service, {"proxy": proxy, "per_app": per_app})
    service.metrics.aggregate_workers(
        lambda: {w.index: w.report.get("metrics", "") for w in supervisor.workers},
        lambda: supervisor.restarts,
    )
    follower.subscribe(supervisor.on_change, supervisor.use_identity)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        service.bound.update(supervisor.reserve_ports())
        sync_task = loop.create_task(follower.run())
        await service.start()
        await supervisor.start()
        service.record_listeners(options.state_dir)
        reporter = Reporter(
            state.node_name,
            service,
            follower,
            denials=lambda: denial_totals(service.metrics.registry),
        )
        report_task = loop.create_task(reporter.run())
        freeze_startup_heap()
        log.info(
            "tunnel node %s of group %s serving with %d workers (loop=%s, role=%s)",
            state.node_name,
            state.group_id,
            options.workers,
            options.loop,
            options.role.value,
        )
        await stop.wait()
        log.info(
            "draining connections of %d workers (up to %.0f s)", options.workers, options.drain_s
        )
        await supervisor.stop(options.drain_s)
        await service.stop(0)
        for task in (report_task, sync_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        if not supervisor.stopping:  # start-up failed: no worker outlives the node
            await supervisor.stop(0)
        with contextlib.suppress(OSError):
            for path in directory.iterdir():
                path.unlink()
            directory.rmdir()


if __name__ == "__main__":
    worker_main(int(sys.argv[1]))
