"""Keyset pages on the admin API's list endpoints: follow `Link: rel="next"` to the end,
in a stable order, with filters; malformed cursors are a 400 with the JSON error body;
the parameters and the header are in the OpenAPI document."""

from __future__ import annotations

import re

import httpx
import pytest

from certgate.console import paging
from certgate.console.services import devices as device_service
from certgate.console.services import groups
from certgate.console.store.models import Device, Group
from certgate.errors import BadRequest
from tests.console.conftest import add_device
from tests.support import RunningConsole

LINK_RE = re.compile(r'<([^>]+)>; rel="next"')


def _all_pages(client: httpx.Client, url: str, **params: object) -> tuple[list[dict], int]:
    items: list[dict] = []
    pages = 0
    answer = client.get(url, params=params)
    while True:
        assert answer.status_code == 200, answer.text
        items += answer.json()
        pages += 1
        link = answer.headers.get("link")
        if not link:
            return items, pages
        match = LINK_RE.fullmatch(link)
        assert match, link
        answer = client.get(match.group(1))


def test_cursors_round_trip_and_refuse_garbage() -> None:
    assert paging.decode_cursor(paging.encode_cursor(["a", "b"]), 2) == ["a", "b"]
    for bad in ("", "!!", paging.encode_cursor(["a"]), paging.encode_cursor(["a", "b", "c"])):
        with pytest.raises(BadRequest):
            paging.decode_cursor(bad, 2)


def test_devices_certificates_and_audit_come_in_keyset_pages(console: RunningConsole) -> None:
    with console.local() as (session, pki):
        if session.get(Group, "pages") is None:
            groups.create_group(session, pki, "pages", "pages", "global")
        uids = sorted(add_device(session, "pages") for _ in range(7))
        blocked = session.get(Device, uids[2])
        device_service.set_blocked(session, blocked, True)
    with console.client(console.admins["root"]) as admin:
        got, pages = _all_pages(admin, "/api/v1/groups/pages/devices", limit=3)
        assert [d["uid"] for d in got] == uids and pages == 3
        only, _ = _all_pages(admin, "/api/v1/groups/pages/devices", blocked="true")
        assert [d["uid"] for d in only] == [uids[2]]
        certs, pages = _all_pages(admin, "/api/v1/groups/pages/certificates", limit=4)
        thumbprints = [c["thumbprint"] for c in certs]
        assert thumbprints == sorted(thumbprints) and len(certs) >= 7 and pages >= 2
        entries, _ = _all_pages(admin, "/api/v1/audit", group_id="global", limit=2)
        ids = [e["id"] for e in entries]
        assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
        bad = admin.get("/api/v1/groups/pages/devices", params={"cursor": "%%%"})
        assert bad.status_code == 400 and bad.json()["error"] == "bad_request"
        too_big = admin.get("/api/v1/groups/pages/devices", params={"limit": 1001})
        assert too_big.status_code == 422 and too_big.json()["error"] == "invalid_request"


def test_paging_is_in_the_openapi_document(console: RunningConsole) -> None:
    with console.client() as anonymous:
        spec = anonymous.get("/openapi.json").json()
    for path in ("/api/v1/groups/{group_id}/devices", "/api/v1/audit"):
        operation = spec["paths"][path]["get"]
        names = {p["name"] for p in operation["parameters"]}
        assert {"limit", "cursor"} <= names
        assert "Link" in operation["responses"]["200"]["headers"]
