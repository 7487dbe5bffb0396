"""Tests for certgate.tunnel.workers: what the supervisor's hello tells a worker. (Real
worker processes are exercised in tests/integration/test_workers.py.)"""

from __future__ import annotations

import json
from dataclasses import asdict

from certgate.tunnel.server import Limits
from certgate.tunnel.udp import UDPLimits
from certgate.tunnel.workers import limits_of


def test_the_limits_reach_a_worker_whole_udp_bounds_included() -> None:
    limits = Limits(connect_timeout_s=3.0, udp=UDPLimits(max_flows=7, flow_idle_s=2.0))
    received = limits_of(json.loads(json.dumps(asdict(limits))))  # as over the socketpair
    assert received == limits
    assert isinstance(received.udp, UDPLimits)  # a worker's UDP relay reads its fields
