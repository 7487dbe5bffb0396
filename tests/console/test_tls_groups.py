"""The console's HTTPS listener (uvicorn with tlsconf's context) accepts X25519, P-256 and
P-384 key exchange only (Mozilla "intermediate": no X448, P-521 or FFDHE)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import RunningConsole, init_console, start_console
from tests.tlsgroups import REFUSED, SERVED, negotiated_group

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sqlite_console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningConsole]:
    """A real console process (the storage backend is irrelevant to TLS)."""
    work = tmp_path_factory.mktemp("console-tls")
    data_dir, port = init_console(work)
    running = start_console(work, data_dir, port)
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.parametrize("group", [*SERVED, *REFUSED])
def test_key_exchange_groups(sqlite_console: RunningConsole, group: str) -> None:
    used = negotiated_group(sqlite_console.port, group)
    if group in SERVED:
        assert used is not None and SERVED[group] in used, used
    else:
        assert used is None, used
