"""Request and response bodies, with bounds on every field."""

from __future__ import annotations

import ipaddress
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from certgate.tunnel.report import MAX_REPORT_TUNNELS

Pem = Field(min_length=1, max_length=16384)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GroupIn(Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    name: str = Field(default="", max_length=200)
    parent_id: str | None = Field(default=None, max_length=63)
    settings: dict[str, Any] | None = None


class GroupOut(BaseModel):
    id: str
    name: str
    parent_id: str | None
    feed_seq: int
    policy_version: int
    settings: dict[str, Any]


class AdminIn(Strict):
    username: str = Field(min_length=1, max_length=128)
    role: str = Field(max_length=32)
    group_id: str = Field(max_length=63)


class AdminCreated(BaseModel):
    id: str
    username: str
    api_key: str
    certificate: str
    private_key: str


class ApiKeyCreated(BaseModel):
    id: str
    api_key: str


class EnrollmentUserIn(Strict):
    username: str = Field(min_length=1, max_length=128)
    password: str = Field(min_length=8, max_length=1024)


class EnrollmentTokenIn(Strict):
    owner: str = Field(min_length=1, max_length=128)
    ttl_s: int | None = Field(default=None, ge=60, le=30 * 24 * 3600)


class TokenOut(BaseModel):
    id: str
    token: str
    expires_in_s: int


class ComplianceIn(Strict):
    status: Literal["compliant", "noncompliant", "unknown"]


class DeviceOut(BaseModel):
    uid: str
    group_id: str
    platform: str
    owner: str
    name: str
    enrollment_status: str
    compliance_status: str
    blocked: bool
    profile_version: int
    enrolled_at: datetime
    updated_at: datetime


class CertOut(BaseModel):
    serial: str
    thumbprint: str
    kind: str
    group_id: str | None
    device_uid: str | None
    bundle_id: str | None
    subject: str
    not_before: datetime
    not_after: datetime
    revoked_at: datetime | None
    revocation_reason: str | None


class RevokeIn(Strict):
    reason: str = Field(default="privilegeWithdrawn", max_length=32)


class SettingsIn(Strict):
    tunnel: dict[str, Any] | None = None
    feed: dict[str, Any] | None = None
    device_rules: dict[str, Any] | None = None
    server_rules: dict[str, Any] | None = None
    initial_compliance: Literal["compliant", "noncompliant", "unknown"] | None = None
    enrollment: dict[str, bool] | None = None  # {"est": true, "scep": false}


class SetupIn(Strict):
    node_name: str = Field(min_length=1, max_length=128)
    address: str = Field(default="", max_length=255)


class InstallIn(SetupIn):
    token: str = Field(min_length=1, max_length=200)


class EnrollIn(Strict):
    token: str | None = Field(default=None, max_length=200)
    username: str | None = Field(default=None, max_length=128)
    password: str | None = Field(default=None, max_length=1024)
    platform: str = Field(max_length=32)
    name: str = Field(default="", max_length=128)


class EnrollOut(BaseModel):
    device_uid: str
    group_id: str
    credential: str
    compliance_status: str


class AppCertIn(Strict):
    username: str = Field(min_length=1, max_length=128)
    password: str = Field(min_length=1, max_length=1024)
    csr: str = Pem


class ProfileIn(Strict):
    csr: str = Pem


class IssuedCert(BaseModel):
    certificate: str
    chain: list[str]
    thumbprint: str


class TunnelEndpointsOut(BaseModel):
    hosts: list[str]
    per_app_port: int
    proxy_port: int


class DevicePolicyOut(BaseModel):
    """The group policy a device applies: its traffic rules and where the tunnel is."""

    version: int
    group_id: str
    rules: dict[str, Any]
    tunnel: TunnelEndpointsOut


class AuditOut(BaseModel):
    id: int
    ts: datetime
    actor: str
    group_id: str | None
    action: str
    outcome: str
    detail: dict[str, Any]


class ApiKeyOut(BaseModel):
    id: str
    label: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class GrantIn(Strict):
    role: str = Field(max_length=32)
    group_id: str = Field(max_length=63)


# Tunnel node reports (certgate.tunnel.report) and dry-run answers (services.dryrun).


class StrictReport(BaseModel):
    """No extra keys and no coercion: a report is machine-made, so anything odd is an error."""

    model_config = ConfigDict(extra="forbid", strict=True)


class LiveTunnelIn(StrictReport):
    thumbprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    device_uid: str = Field(pattern=r"^[0-9a-f]{32}$")
    mode: Literal["proxy", "per_app"]
    app: str | None = Field(max_length=255)
    host: str | None = Field(max_length=255)
    port: int | None = Field(ge=1, le=65535)
    addresses: list[Annotated[str, Field(max_length=45)]] = Field(max_length=64)
    since: float | None = Field(ge=0)
    transport: Literal["tcp", "udp"] = "tcp"  # sent by nodes for UDP tunnels only

    @field_validator("addresses")
    @classmethod
    def _ip_addresses(cls, addresses: list[str]) -> list[str]:
        for address in addresses:
            ipaddress.ip_address(address)  # a ValueError is a validation error
        return addresses


class NodeStatusIn(StrictReport):
    policy_version: int = Field(ge=0)
    table_seq: int = Field(ge=0)
    fresh: bool
    age_s: float | None
    restart_required: list[Annotated[str, Field(max_length=200)]] = Field(max_length=8)
    # The Device Roots the node trusts (thumbprints; a Device Root rotation's status).
    device_roots: list[Annotated[str, Field(max_length=64)]] | None = Field(None, max_length=2)


class TunnelReportIn(StrictReport):
    node: str = Field(min_length=1, max_length=128)
    at: float
    live_total: int = Field(ge=0)
    live: list[LiveTunnelIn] = Field(max_length=MAX_REPORT_TUNNELS)
    status: NodeStatusIn

    @model_validator(mode="after")
    def _total_counts_the_list(self) -> TunnelReportIn:
        if self.live_total < len(self.live):
            raise ValueError("live_total is smaller than the list of live tunnels")
        return self


class RefusedCertOut(BaseModel):
    device_uid: str
    thumbprint: str
    app: str | None
    reason: str


class ClosedTunnelOut(BaseModel):
    node: str
    thumbprint: str
    device_uid: str
    app: str | None
    destination: str
    since: float | None
    reason: str
    detail: str


class NodeReportOut(BaseModel):
    node: str
    reported_at: datetime | None
    age_s: float | None
    live: int
    live_total: int
    table_seq: int | None
    policy_version: int | None
    fresh: bool | None


class DryRunOut(BaseModel):
    dry_run: Literal[True] = True
    devices: list[RefusedCertOut]
    live_tunnels: list[ClosedTunnelOut]
    nodes_reporting: list[NodeReportOut]
    stale_reports: list[NodeReportOut]


class RotateIn(Strict):
    """Start a rotation (prepare); ``overlap_s``: the least time between switch and
    finish, during which old and new are both trusted."""

    overlap_s: int = Field(3600, ge=0, le=400 * 24 * 3600)
