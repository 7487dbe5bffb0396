"""Access limits failed app sign-ins per device address (``certgate.ratelimit``): after
ADDRESS_BURST devices denied at the certificate step, the next attempt from that address is
429 with Retry-After and logged, before the device or the console is asked. A separate
module: it spends 127.0.0.1's budget on its own Access."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from certgate.access.config import TLSMode
from certgate.ratelimit import ADDRESS_BURST
from tests.access.harness import access_server, proxy_server
from tests.access.test_app import Env, authorize, cert_step, make_env


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    built, access_port, proxy_port = make_env(tmp_path, TLSMode.OFFLOAD)
    with (
        access_server(built.setup, built.console, access_port),
        proxy_server(built.setup, access_port, port=proxy_port, offload_port=None),
    ):
        yield built


def test_denied_devices_spend_the_address_budget(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(ADDRESS_BURST):
        assert cert_step(env, None)["error"] == ["access_denied"]
    location = authorize(env).headers["location"]
    with caplog.at_level(logging.WARNING, "certgate.access"), env.device(env.enrolled()) as device:
        refused = device.get(location)  # an enrolled device: refused by address alone
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) > 0
    assert refused.json()["error"] == "rate_limited"
    assert "rate_limited" in caplog.text
