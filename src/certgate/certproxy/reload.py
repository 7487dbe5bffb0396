"""The cert proxy follows its data directory live: renewed certificates, new Device Roots.

Access renews its certificates (``certgate.access.renewal``) and saves the console's
Device Roots (``certgate.access.trust``) in the data directory the cert proxy shares. Every
``interval_s`` the proxy compares the files' sizes and modification times with what it
loaded; on a change it loads the installation again as a start would (``load_material``,
cross-checked), builds every context aside and swaps them in (``CertProxy.swap``). A
reload that fails (a file caught half way through a renewal, a bad set) keeps what is in
use, is logged, and shows in ``/healthz``; it is tried again at the next change or tick.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from certgate.access import renewal
from certgate.access.install import Material
from certgate.certproxy.server import CertProxy, Upstream
from certgate.errors import CertgateError
from certgate.pki import expiry

__all__ = ["Built", "Reloader"]

log = logging.getLogger("certgate.certproxy.reload")
Stamp = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True, slots=True)
class Built:
    """What the proxy is made of, built from one load of the data directory."""

    material: Material
    contexts: dict[str, ssl.SSLContext]  # by listener name
    upstream: Upstream


def stamp(data_dir: Path) -> Stamp:
    """Size and modification time of every file the installation is loaded from."""
    files = [*data_dir.glob("*.json"), *data_dir.glob("*.pem"), *data_dir.glob("keys/*.sealed")]
    found = []
    for path in sorted(files):
        try:
            stat = path.stat()
        except FileNotFoundError:  # replaced between the listing and now: seen next tick
            continue
        found.append((str(path.relative_to(data_dir)), stat.st_mtime_ns, stat.st_size))
    return tuple(found)


class Reloader:
    def __init__(
        self,
        proxy: CertProxy,
        data_dir: Path,
        build: Callable[[], Built],
        material: Material,
        interval_s: float,
    ) -> None:
        self._proxy, self._data_dir, self._build = proxy, data_dir, build
        self.material, self._interval_s = material, interval_s
        self._stamp = stamp(data_dir)
        self.error: str | None = None
        self.reloaded_at: float | None = None

    def check(self) -> bool:
        """Reload if a file changed since the last good load; True when it did."""
        now = stamp(self._data_dir)
        if now == self._stamp:
            return False
        try:
            built = self._build()
        except (CertgateError, OSError, ValueError) as exc:
            if str(exc) != self.error:
                log.warning("data directory changed but not reloaded (keeping the last): %s", exc)
            self.error = str(exc)
            return False
        self._proxy.swap(built.contexts, built.upstream, built.material.device_roots)
        self.material, self._stamp, self.error = built.material, now, None
        self.reloaded_at = time.time()
        labels = ", ".join(r.label or "install-time" for r in built.material.device_roots.roots)
        log.info("reloaded the data directory: Device Roots %s", labels)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                self.check()
            except Exception:  # the loop must outlive a bug: what is in use stays
                self.error = "unexpected error, logged"
                log.exception("data directory not reloaded (keeping the last)")

    def certificates_in_use(self, now: float) -> list[expiry.CertificateInUse]:
        return expiry.in_use(renewal.certificates(self.material), now)

    def health(self) -> dict[str, object]:
        certs = [c.to_dict() for c in self.certificates_in_use(time.time())]
        warnings = expiry.warnings(certs, renewal.WARNING)
        if self.error:
            warnings.append(f"data directory not reloaded: {self.error}")
        return {
            "status": "ok",
            "device_roots": [r.to_dict() for r in self._proxy.trust.roots],
            "certificates": certs,
            "reload_error": self.error,
            "warnings": warnings,
        }
