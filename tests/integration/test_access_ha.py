"""Two Access nodes behind real HAProxy round-robin share their sign-ins through the console.

Each node is Access plus its cert proxy, both installed once (``certgate access init``) and
the data directory copied to the second node, as an operator replicates an installation:
the nodes share the ID token key, the cert proxy credential and the console credential
(role ``access``), and keep sign-ins in the console's database (``--signins console``, the
default). HAProxy's configuration is the planner's, with its defaults (round-robin, PROXY
v2, health checks); Figure 1 (passthrough), so each new client connection is one
balancing decision and consecutive ones alternate between the nodes. The client opens a
new connection for every request (``Connection: close``), and the nodes' logs say which one
served each step.

Proven here: a sign-in started on one node (``/authorize``) is finished on the other
(``/token``), and its ID token verifies; a spent code is refused on both nodes; an expired
code is refused; the console stores only hashes of handles and codes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from sqlalchemy import select

from certgate.console.store.models import AccessSignIn
from certgate.planner.haproxy import HAProxyOptions, NodeAddress, emit
from certgate.planner.matrix import CertType, LBMode, decide
from tests.access.harness import PublicPKI
from tests.integration.test_access_haproxy import (
    CERTGATE,
    CLIENT_ID,
    LB_SOURCE,
    REDIRECT_URI,
    VIP,
    Org,
    SignIn,
    Topology,
    _access_init,
    _assert_valid_id_token,
    _start,
    _wait_for,
    _wait_listening,
    _write,
    running_org,
    sign_in,
)
from tests.support import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed"),
]

PLAN = decide("example.com", "example.dmz", CertType.SAN, LBMode.PASSTHROUGH)
NODES = ("a", "b")
CODE_TTL_S = 10  # the shortest Access accepts: the expiry test waits it out
STARTED, ISSUED = "started sign-in for client", "issued ID token for device"


@pytest.fixture(scope="module")
def org(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Org]:
    with running_org(tmp_path_factory.mktemp("access-ha-org")) as running:
        yield running


def _install_twice(topo: Topology, org: Org) -> None:
    """One installation with a short code lifetime, copied to the second node."""
    _access_init(topo, org, "passthrough")
    settings = topo.work / "access" / "access.json"
    data = json.loads(settings.read_text())
    data["code_ttl_s"] = CODE_TTL_S
    settings.write_text(json.dumps(data))
    shutil.copytree(topo.work / "access", topo.work / "access-b", symlinks=True)


def _start_node(topo: Topology, node: str) -> None:
    p, data_dir = topo.ports, topo.work / ("access" if node == "a" else "access-b")
    common = ["-d", str(data_dir), "--load-balancer", LB_SOURCE]
    serve = [*CERTGATE, "access", "serve", *common, "--port", str(p[f"access-{node}"])]
    _start(topo, f"access-{node}", serve, p[f"access-{node}"])
    proxy = [*CERTGATE, "certproxy", "serve", *common, "--port", str(p[f"proxy-{node}"])]
    proxy += ["--access-port", str(p[f"access-{node}"])]
    _start(topo, f"certproxy-{node}", proxy, p[f"proxy-{node}"])


def _haproxy(topo: Topology) -> None:
    p = topo.ports
    nodes = [
        NodeAddress(f"node{i}.example.dmz", "127.0.0.1", p[f"access-{n}"], p[f"proxy-{n}"], None)
        for i, n in enumerate(NODES, 1)
    ]
    options = HAProxyOptions(
        https_port=p["lb443"],
        certproxy_port=p["lb5262"],
        check_interval_s=1,
        source_address=LB_SOURCE,
    )
    config = _write(
        topo.work / "haproxy.cfg", emit(PLAN, VIP, nodes, None, options=options).encode()
    )
    _start(topo, "haproxy", ["haproxy", "-f", str(config)], p["lb443"])
    _wait_listening(p["lb5262"], topo.procs[-1], "haproxy", topo.logs["haproxy"])
    checked = [f"{b}/node{i}.example.dmz succeeded" for b in ("access_443_nodes",
               "certproxy_5262_nodes") for i in (1, 2)]  # fmt: skip
    _wait_for(lambda: all(line in topo.log("haproxy") for line in checked), 60)


@pytest.fixture(scope="module")
def topo(org: Org, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    names = ["lb443", "lb5262", *(f"{s}-{n}" for n in NODES for s in ("access", "proxy"))]
    ports = {name: free_port() for name in names}
    ports["access"] = ports["access-a"]  # what `access init` stores
    work = tmp_path_factory.mktemp("access-ha")
    built = Topology("two-nodes", PLAN, work, PublicPKI.create((VIP,)), ports)
    _install_twice(built, org)
    try:
        for node in NODES:
            _start_node(built, node)
        _haproxy(built)
    except Exception:
        built.stop()
        raise
    try:
        yield built
    finally:
        built.stop()


def _counts(topo: Topology, text: str) -> dict[str, int]:
    return {n: topo.log(f"access-{n}").count(text) for n in NODES}


def _grew(topo: Topology, text: str, before: dict[str, int]) -> str:
    """The one node that logged ``text`` once more than ``before``."""
    _wait_for(lambda: sum(_counts(topo, text).values()) == sum(before.values()) + 1)
    after = _counts(topo, text)
    (node,) = [n for n in NODES if after[n] == before[n] + 1]
    return node


def _sign_in(topo: Topology, org: Org) -> SignIn:
    return sign_in(topo, org.compliant.leaf, fresh=True)


def _redeem(topo: Topology, signin: SignIn) -> requests.Response:
    code = parse_qs(urlsplit(signin.callback).query)["code"][0]
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "client_id": CLIENT_ID,
        "code_verifier": signin.verifier,
    }
    response: requests.Response = signin.session.post(
        signin.metadata["token_endpoint"], data=form, withhold_token=True, timeout=30
    )
    return response


def test_a_sign_in_started_on_one_node_is_finished_on_the_other(topo: Topology, org: Org) -> None:
    crossed = 0
    for _ in range(3):
        started, issued = _counts(topo, STARTED), _counts(topo, ISSUED)
        signin = _sign_in(topo, org)
        start_node = _grew(topo, STARTED, started)
        _assert_valid_id_token(topo, signin, org.compliant)
        crossed += _grew(topo, ISSUED, issued) != start_node
    assert crossed >= 1, "round-robin never sent /token to another node than /authorize"


def test_a_spent_code_is_refused_on_every_node(topo: Topology, org: Org) -> None:
    signin = _sign_in(topo, org)
    assert _redeem(topo, signin).status_code == 200
    refused = _counts(topo, "authorization code already used")
    for _ in NODES:  # consecutive connections: one replay reaches each node
        replay = _redeem(topo, signin)
        assert replay.status_code == 400, replay.text
        body = replay.json()
        assert (body["error"], body["error_description"]) == (
            "invalid_grant",
            "authorization code already used",
        )
    _wait_for(lambda: all(c > refused[n] for n, c in _counts(
        topo, "authorization code already used").items()))  # fmt: skip


def test_an_expired_code_is_refused(topo: Topology, org: Org) -> None:
    signin = _sign_in(topo, org)
    time.sleep(CODE_TTL_S + 1.5)
    response = _redeem(topo, signin)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_grant"
    assert response.json()["error_description"] == "unknown or expired authorization code"


def test_the_console_holds_only_hashes_of_handles_and_codes(topo: Topology, org: Org) -> None:
    signin = _sign_in(topo, org)
    code = parse_qs(urlsplit(signin.callback).query)["code"][0]
    with org.console.local() as (session, _):
        row = session.scalars(
            select(AccessSignIn).where(
                AccessSignIn.code_hash == hashlib.sha256(code.encode()).hexdigest()
            )
        ).one()
        dumped = json.dumps([row.handle_hash, row.code_hash, row.request, row.grant])
    assert row.state == "code-issued" and code not in dumped
    assert row.grant is not None and row.grant["device_uid"] == org.compliant.uid
