"""The node's side of identity rotations (``console.services.rotation``).

A ``trust`` operation of the feed (``certgate.feed.TrustUpdate``) carries the group's
next tunnel identity (its certificate, its key sealed to the identity the node holds now,
and a trust config naming it) or the group's next console identity (its certificate and
a trust config it signed). ``next_identity`` opens the key and checks the whole state
exactly as ``config.load_state`` checks it at every start (chain, names, key pair, the
trust config's signature by the console identity of that state) before anything uses
it; ``store_identity`` writes it through the same function setup writes with. Both
raise, and the caller keeps the identity it has (STYLE.md habit 8). ``next_state`` checks
several operations together (a snapshot's, in use at its seq), and
``successor_console_identity`` says whether a console identity the node does not pin may
succeed the pinned one (docs/CONVENTIONS.md, "Rotation"). No asyncio here.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from certgate import jws
from certgate.errors import CertgateError, ConfigError
from certgate.feed import (
    CA_TRUST_KINDS,
    CONSOLE_IDENTITY,
    DEVICE_ROOT,
    ROOT,
    SECURE_CHANNEL_ROOT,
    TrustUpdate,
    tunnel_key_context,
)
from certgate.pki import identity, keywrap
from certgate.pki.expiry import RENEWAL_WINDOW_S, CertificateInUse, in_use
from certgate.pki.keys import PrivateKey
from certgate.pki.thumbprint import thumbprint
from certgate.tunnel import config
from certgate.tunnel.config import TunnelState
from certgate.tunnel.setup import write_state

__all__ = [
    "RENEWAL_WINDOW_S",
    "CertificateInUse",
    "NextIdentity",
    "certificates_in_use",
    "changes_anything",
    "changes_data_plane",
    "is_current",
    "next_identity",
    "next_state",
    "pins",
    "store_identity",
    "successor_console_identity",
]


def certificates_in_use(state: TunnelState, now: float) -> list[CertificateInUse]:
    """Every certificate the node presents or trusts, with its time to expiry."""
    return in_use(
        {
            "tunnel-identity": state.tunnel_cert,
            "console-identity": state.console_identity,
            "device-root": state.device_root,
            "secure-channel-root": state.secure_channel_root,
            "root": state.root,
        },
        now,
    )


@dataclass(frozen=True, slots=True)
class NextIdentity:
    """A verified next identity: the state it makes, and the files that hold it."""

    state: TunnelState
    files: dict[str, bytes]  # certificates and trust config (public)

    @property
    def key(self) -> PrivateKey:
        return self.state.tunnel_key

    def thumbprint(self, kind: str) -> str:
        """The new identity's: the console identity's or the tunnel identity's."""
        if kind == CONSOLE_IDENTITY:
            return thumbprint(self.state.console_identity)
        if kind == DEVICE_ROOT:
            return ",".join(device_root_thumbprints(self.state))
        if kind == SECURE_CHANNEL_ROOT:
            return ",".join(secure_channel_root_thumbprints(self.state))
        if kind == ROOT:
            return ",".join(root_thumbprints(self.state))
        return self.state.tunnel_thumbprint


def device_root_thumbprints(state: TunnelState) -> list[str]:
    """The Device Roots the node trusts (the console's rotation status reads them)."""
    return [thumbprint(root) for root in state.device_roots]


def secure_channel_root_thumbprints(state: TunnelState) -> list[str]:
    """The Secure Channel Roots the node trusts (read likewise)."""
    return [thumbprint(root) for root in state.secure_channel_roots]


def root_thumbprints(state: TunnelState) -> list[str]:
    """The instance Roots the node trusts (read likewise)."""
    return [thumbprint(root) for root in state.roots]


def _certificate(op: TrustUpdate) -> x509.Certificate:
    return config.load_single_cert(op.certificate.encode(), f"rotated {op.kind}")


def is_current(state: TunnelState, op: TrustUpdate) -> bool:
    """The operation names the identity the node uses already (nothing to do)."""
    try:
        cert = _certificate(op)
    except ConfigError:
        return False
    if op.kind == CONSOLE_IDENTITY:
        return cert == state.console_identity
    if op.kind in CA_TRUST_KINDS:  # the trust config decides; applying it again is harmless
        return False
    return thumbprint(cert) == state.tunnel_thumbprint


def pins(op: TrustUpdate, console_identity: x509.Certificate) -> bool:
    """``op`` puts ``console_identity`` in use (a console-identity step past prepare)."""
    if op.kind != CONSOLE_IDENTITY or op.is_next:
        return False
    try:
        return _certificate(op) == console_identity
    except ConfigError:
        return False


def next_identity(state: TunnelState, op: TrustUpdate) -> NextIdentity:
    """Open and check the identity ``op`` carries; raises ConfigError with the reason."""
    return next_state(state, [op])


def next_state(state: TunnelState, ops: Sequence[TrustUpdate]) -> NextIdentity:
    """The state ``ops`` make together, checked as at setup; raises ConfigError with the
    reason. One operation is a batch's step; several are a snapshot's operations in use,
    whose trust configs name the identities they bring together (applied one at a time,
    a new console identity would be checked against a tunnel identity not yet taken)."""
    where = "rotation " + ", ".join(str(op.rotation) for op in ops)
    files = _current_files(state.state_dir)
    key = state.tunnel_key
    try:
        for op in ops:
            cert = _certificate(op)
            files[config.TRUST_JWS] = op.trust.encode()
            if op.kind == CONSOLE_IDENTITY:
                files[config.CONSOLE_IDENTITY_PEM] = op.certificate.encode()
            elif op.kind in CA_TRUST_KINDS:  # the trust config alone lists the CAs to trust
                pass
            else:
                files[config.TUNNEL_PEM] = op.certificate.encode()
                key = _opened_key(state, op, cert)
    except CertgateError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    try:
        verified = config.state_from_files(files, state.state_dir, key)
    except ConfigError as exc:
        raise ConfigError(f"{where}: the new identity does not verify: {exc}") from exc
    if (verified.group_id, verified.node_name) != (state.group_id, state.node_name):
        raise ConfigError(f"{where}: the new state names another group or node")
    # Sent after the tunnel identity: the Secure Channel Root that issued it (a renewed
    # identity may come from a new one, and a finished rotation drops the old one).
    files[config.CHAIN_PEM] = config.chain_pem(verified)
    # The Roots the trust config lists (a Root rotation adds the new one, vouched for by
    # its cross certificate, and finish drops the old one).
    files[config.ROOT_PEM] = config.roots_pem(verified)
    return NextIdentity(verified, files)


def changes_data_plane(state: TunnelState, new: TunnelState) -> bool:
    """The listeners must take ``new``: another tunnel identity, its chain, or another
    set of Device Roots, Secure Channel Roots or Roots (a cascade's trust)."""

    def seen(s: TunnelState) -> tuple[object, ...]:
        return (
            s.tunnel_thumbprint,
            s.tunnel_chain,
            s.device_roots,
            s.secure_channel_roots,
            s.roots,
        )

    return seen(new) != seen(state)


def changes_anything(state: TunnelState, new: TunnelState) -> bool:
    return changes_data_plane(state, new) or new.console_identity != state.console_identity


def successor_console_identity(
    state: TunnelState, token: bytes | str, accepted: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    """The console identity that signed ``token`` (its ``x5c`` header) when it may succeed
    the one the node pins: it chains to the node's instance Root through its Secure
    Channel Root, names this group's console, is valid now, and was issued no earlier
    than the pinned one (an older, retired identity never comes back). None when the
    signer is one of ``accepted`` (the message itself is at fault). Nothing is trusted
    here: the caller verifies the token with it, and pins it only through a trust
    operation that names it. Raises ConfigError with the reason it cannot be one."""
    head = token if isinstance(token, str) else token.partition(b".")[0].decode("ascii", "replace")
    try:
        chain = jws.unverified_header(head)["x5c"]
        signer = x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
    except (CertgateError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise ConfigError("the message names no signer certificate") from exc
    if signer in accepted:
        return None
    named = thumbprint(signer)
    try:
        config.verify_identity(
            signer, state.secure_channel_roots, state.roots, identity.console(state.group_id)
        )
    except ConfigError as exc:
        raise ConfigError(f"console identity {named} cannot be trusted here: {exc}") from exc
    if signer.not_valid_before_utc < state.console_identity.not_valid_before_utc:
        raise ConfigError(f"console identity {named} is older than the pinned one")
    return signer


def _opened_key(state: TunnelState, op: TrustUpdate, cert: x509.Certificate) -> PrivateKey:
    if op.sealed_key is None:
        raise ConfigError("a tunnel identity comes with its sealed key")
    context = tunnel_key_context(state.group_id, thumbprint(cert))
    return keywrap.unseal_key(op.sealed_key, state.tunnel_key, context)


def _current_files(state_dir: Path) -> dict[str, bytes]:
    return {
        name: (state_dir / name).read_bytes() for name in (*config.STATE_FILES, config.STATE_JSON)
    }


def store_identity(identity: NextIdentity) -> None:
    """Persist the identity (its key sealed under the node key), so that a restart serves
    it (``setup.write_state``)."""
    write_state(identity.state.state_dir, identity.files, identity.key)
