"""Request and response bodies, with bounds on every field."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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
