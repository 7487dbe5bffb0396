"""Tests for certgate.device.kdcproxy, the agent's local HTTPS KDC proxy endpoint, over
real TLS on loopback: the anchor it writes verifies it for its IP, only ``POST /KdcProxy``
is served, bodies over the bound are refused before the tunnel is used, an unreachable
tunnel is a 502 with the JSON error body, and it listens on loopback only (also with
``--unsafe-listen-any``). kinit through a real tunnel: tests/integration/test_kdc_proxy.py."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from certgate.device.agent import AgentConfig
from certgate.device.kdcproxy import ANCHOR_FILE, KDCProxyEndpoint
from certgate.device.listeners import ListenAddress
from certgate.device.tunnel_client import TunnelClient
from certgate.errors import ConfigError
from certgate.tunnel.kdcproxy import KDC_LIMITS
from tests.support import free_port


def unreachable_tunnel() -> TunnelClient:
    closed = free_port()  # nothing listens there
    return TunnelClient([("127.0.0.1", closed)], ssl.create_default_context(), "g1", "ab" * 32)


def exchange(tmp_path: Path, send: Callable[[httpx.AsyncClient, str], Any]) -> httpx.Response:
    """Start the endpoint, send one request verified against its anchor file, stop."""

    async def scenario() -> httpx.Response:
        endpoint = KDCProxyEndpoint(unreachable_tunnel, "com.example.kinit", tmp_path / ANCHOR_FILE)
        bound = await endpoint.listen(ListenAddress("127.0.0.1", 0))
        verify = ssl.create_default_context(cafile=str(tmp_path / ANCHOR_FILE))
        try:
            async with httpx.AsyncClient(verify=verify, timeout=30) as client:
                response: httpx.Response = await send(client, f"https://{bound}")
                return response
        finally:
            endpoint.close()

    return asyncio.run(scenario())


def test_only_post_kdcproxy_is_served(tmp_path: Path) -> None:
    answer = exchange(tmp_path, lambda client, base: client.get(f"{base}/"))
    assert answer.status_code == 404
    assert answer.json()["error"] == "not_found"


def test_a_body_over_the_bound_is_refused_before_the_tunnel(tmp_path: Path) -> None:
    body = b"\x00" * (KDC_LIMITS.max_message + 1)
    answer = exchange(tmp_path, lambda client, base: client.post(f"{base}/KdcProxy", content=body))
    assert answer.status_code == 413
    assert answer.json()["error"] == "too_large"


def test_an_unreachable_tunnel_is_a_bad_gateway(tmp_path: Path) -> None:
    answer = exchange(
        tmp_path, lambda client, base: client.post(f"{base}/KdcProxy", content=b"\x30\x00")
    )
    assert answer.status_code == 502
    assert answer.json()["error"] == "tunnel_failed"
    assert "no tunnel endpoint reachable" in answer.json()["detail"]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1"])
def test_the_kdc_proxy_listens_on_loopback_only_even_when_unsafe(host: str) -> None:
    with pytest.raises(ConfigError, match="KDC proxy listens on loopback only"):
        AgentConfig(kdc_proxy=ListenAddress(host, 8888), unsafe_listen_any=True)
