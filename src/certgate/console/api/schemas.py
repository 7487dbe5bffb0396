"""Request and response bodies, with bounds on every field."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic import Strict as NoCoercion

from certgate.console.services.admins import USERNAME_RE
from certgate.console.services.ca import REVOCATION_REASONS
from certgate.console.services.checkpoints import Verdict
from certgate.console.services.devices import PLATFORMS
from certgate.console.services.rbac import ROLES
from certgate.console.services.settings import IP_FORMATS, Port, whole
from certgate.console.services.settings import SettingsIn as SettingsIn  # the API's body
from certgate.tunnel.report import MAX_REPORT_TUNNELS

Pem = Field(min_length=1, max_length=16384)


# Integers in request bodies: a JSON integer (3 or 3.0), never true, "3" or 3.5. Bounds
# go before the validator: they then apply to the integer and appear in the document.
Whole = Annotated[int, NoCoercion(), BeforeValidator(whole)]
Count = Annotated[int, Field(ge=0), NoCoercion(), BeforeValidator(whole)]
TokenTTL = Annotated[int, Field(ge=60, le=30 * 24 * 3600), NoCoercion(), BeforeValidator(whole)]
# Admin and enrollment user names, as ``admins.USERNAME_RE`` checks them.
USERNAME = Field(min_length=1, max_length=128, pattern=f"^{USERNAME_RE.pattern}$")
# What the tunnel node's name must be (``tunnels._register_node``: 1-128 printable): ASCII
# here, because the name also travels in the ``certgate-node`` header.
NODE_NAME = Field(min_length=1, max_length=128, pattern=r"^[\x20-\x7e]+$")


def one_of(values: Iterable[str], **field: Any) -> Any:
    """A string field that accepts exactly ``values``: an ``enum`` in the OpenAPI document
    and the same set enforced on input (422), so a client can tell valid values apart."""
    allowed = sorted(values)
    assert all(re.fullmatch(r"[\w-]+", v) for v in allowed), "plain words need no escaping"
    enum: list[JsonValue] = [*allowed]
    return Field(pattern=f"^({'|'.join(allowed)})$", json_schema_extra={"enum": enum}, **field)


# The project's error body and the statuses each route declares (one home for both).


class ErrorOut(BaseModel):
    """Every error answer of the console: ``{"error": code, "detail": reason}``."""

    error: str = Field(description="A stable code: unauthenticated, forbidden, not_found, ...")
    detail: str = Field(description="Why, in words; never a secret.")


ERROR_MEANINGS: dict[int, str] = {
    400: "The request is well-formed but cannot be acted on (`bad_request`, ...).",
    401: "Missing or rejected credentials (API key, client certificate, device credential).",
    403: "Authenticated but not allowed (`forbidden`, `csrf_failed`).",
    404: "No such object, or not visible to the caller.",
    409: "Conflicts with existing data or with the object's state.",
    413: "The request body is over the console's limit.",
    422: "The request does not match this operation's schema (`invalid_request`).",
    429: "Too many failed authentications from this address or for this account "
    "(`rate_limited`); retry after `Retry-After` seconds.",
    503: "The console cannot serve the request now (`unavailable`); retry later.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route or router: each status with the shared error body."""
    return {
        status: {"model": ErrorOut, "description": ERROR_MEANINGS[status]} for status in statuses
    }


# Every request can meet the body limit and a console that cannot serve it.
ANY_REQUEST = (413, 429, 503)  # 429: too many failed authentications (app.failure_gate)
# A call with a credential (admin, device, tunnel node) and validated input, acting on
# objects that may be gone, refused or in another state.
CALL_ERRORS = error_responses(*ANY_REQUEST, 400, 401, 403, 404, 409, 422)


def binary_body(media_type: str, description: str) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads a raw (non-JSON) request body."""
    body = {"type": "string", "format": "binary"}
    content = {media_type: {"schema": body}}
    return {"requestBody": {"required": True, "description": description, "content": content}}


def binary_answer(description: str, *media_types: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entry for a 200 that is not JSON (PEM, DER, PKCS#7, base64 text)."""
    content = {media_type: {"schema": {"type": "string"}} for media_type in media_types}
    return {200: {"description": description, "content": content}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GroupIn(Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    name: str = Field(default="", max_length=200)
    parent_id: str | None = Field(default=None, max_length=63)
    settings: SettingsIn | None = None


class GroupOut(BaseModel):
    id: str
    name: str
    parent_id: str | None
    feed_seq: int
    policy_version: int
    settings: dict[str, Any]


class AdminIn(Strict):
    username: str = USERNAME
    role: str = one_of(ROLES)
    group_id: str = Field(max_length=63)


class AdminCreated(BaseModel):
    id: str
    username: str
    api_key: str
    certificate: str
    private_key: str


class AdminOut(BaseModel):
    id: str
    username: str
    roles: list[str]  # "role@group"
    disabled: bool


class PasswordIn(Strict):
    """A web console password (scrypt at rest; 8-1024 characters)."""

    password: str = Field(min_length=8, max_length=1024)


class TotpOut(BaseModel):
    otpauth_uri: str  # shown once: the secret is stored sealed, never answered again


class AuditVerifyOut(BaseModel):
    """The instance's audit chain recomputed and held to the signed checkpoints."""

    ok: bool  # the chain and every checkpoint line hold
    chain_ok: bool
    entries: int
    first_bad_id: int | None
    problem: str | None
    checkpoints: int
    checkpoint_problems: list[str]

    @classmethod
    def of(cls, verdict: Verdict) -> AuditVerifyOut:
        """The answer for ``checkpoints.verify``'s verdict (the API's and the CLI's)."""
        return cls(
            ok=verdict.ok,
            chain_ok=verdict.chain.ok,
            entries=verdict.chain.entries,
            first_bad_id=verdict.chain.first_bad_id,
            problem=verdict.chain.problem,
            checkpoints=verdict.checkpoints,
            checkpoint_problems=list(verdict.checkpoint_problems),
        )


class ApiKeyCreated(BaseModel):
    id: str
    api_key: str


class EnrollmentUserIn(Strict):
    username: str = USERNAME
    password: str = Field(min_length=8, max_length=1024)


class EnrollmentTokenIn(Strict):
    owner: str = USERNAME
    ttl_s: TokenTTL | None = None


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
    reason: str = one_of(REVOCATION_REASONS, default="privilegeWithdrawn")


class SetupIn(Strict):
    node_name: str = NODE_NAME
    address: str = Field(default="", max_length=255)


class InstallIn(SetupIn):
    token: str = Field(min_length=1, max_length=200)


class EnrollIn(Strict):
    token: str | None = Field(default=None, max_length=200)
    username: str | None = Field(default=None, max_length=128)
    password: str | None = Field(default=None, max_length=1024)
    platform: str = one_of(PLATFORMS)
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
    role: str = one_of(ROLES)
    group_id: str = Field(max_length=63)


# Tunnel node reports (certgate.tunnel.report) and dry-run answers (services.dryrun).


class StrictReport(BaseModel):
    """No extra keys and no coercion: a report is machine-made, so anything odd is an error."""

    model_config = ConfigDict(extra="forbid", strict=True)


IP_ADDRESS = IP_FORMATS


class LiveTunnelIn(StrictReport):
    thumbprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    device_uid: str = Field(pattern=r"^[0-9a-f]{32}$")
    mode: Literal["proxy", "per_app"]
    app: str | None = Field(max_length=255)
    host: str | None = Field(max_length=255)
    port: Port | None
    addresses: list[Annotated[str, Field(max_length=45, json_schema_extra=IP_ADDRESS)]] = Field(
        max_length=64
    )
    since: float | None = Field(ge=0)
    transport: Literal["tcp", "udp"] = "tcp"  # sent by nodes for UDP tunnels only

    @field_validator("addresses")
    @classmethod
    def _ip_addresses(cls, addresses: list[str]) -> list[str]:
        for address in addresses:
            ipaddress.ip_address(address)  # a ValueError is a validation error
        return addresses


class NodeStatusIn(StrictReport):
    policy_version: Count
    table_seq: Count
    fresh: bool
    age_s: float | None
    restart_required: list[Annotated[str, Field(max_length=200)]] = Field(max_length=8)
    # The Device Roots the node trusts (thumbprints; a Device Root rotation's status).
    device_roots: list[Annotated[str, Field(max_length=64)]] | None = Field(None, max_length=2)
    # Likewise the Secure Channel Roots (a Secure Channel Root rotation's status).
    secure_channel_roots: list[Annotated[str, Field(max_length=64)]] | None = Field(
        None, max_length=2
    )
    # Likewise the instance Roots (a Root rotation's status).
    roots: list[Annotated[str, Field(max_length=64)]] | None = Field(None, max_length=2)


DENIAL_REASON = r"^[a-z0-9_]{1,64}$"
# A reason outside the pattern is refused: the document says so (``additionalProperties``),
# which pydantic's ``patternProperties`` alone leaves open.
DenialCounts = Annotated[
    dict[Annotated[str, Field(pattern=DENIAL_REASON)], Count],
    Field(max_length=64),
    WithJsonSchema(
        {
            "type": "object",
            "maxProperties": 64,
            "patternProperties": {DENIAL_REASON: {"type": "integer", "minimum": 0}},
            "additionalProperties": False,
        }
    ),
]


class TunnelReportIn(StrictReport):
    node: str = NODE_NAME
    at: float
    live_total: Count
    live: list[LiveTunnelIn] = Field(max_length=MAX_REPORT_TUNNELS)
    status: NodeStatusIn
    # Denied requests by reason since the node started (older nodes send none).
    denials: DenialCounts | None = None

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

    overlap_s: Whole = Field(3600, ge=0, le=400 * 24 * 3600)
