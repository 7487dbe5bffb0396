"""The node's side of identity rotations (``console.services.rotation``).

A ``trust`` operation of the feed (``certgate.feed.TrustUpdate``) carries the group's
next tunnel identity (its certificate, its key sealed to the identity the node holds now,
and a trust config naming it) or the group's next console identity (its certificate and
a trust config it signed). ``next_identity`` opens the key and checks the whole state
exactly as ``config.load_state`` checks it at every start (chain, names, key pair, the
trust config's signature by the console identity of that state) before anything uses
it; ``store_identity`` writes it through the same function setup writes with. Both
raise, and the caller keeps the identity it has (STYLE.md habit 8). No asyncio here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from certgate.errors import CertgateError, ConfigError
from certgate.feed import (
    CA_TRUST_KINDS,
    CONSOLE_IDENTITY,
    DEVICE_ROOT,
    SECURE_CHANNEL_ROOT,
    TrustUpdate,
    tunnel_key_context,
)
from certgate.pki import keywrap
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
    "is_current",
    "next_identity",
    "store_identity",
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
        return self.state.tunnel_thumbprint


def device_root_thumbprints(state: TunnelState) -> list[str]:
    """The Device Roots the node trusts (the console's rotation status reads them)."""
    return [thumbprint(root) for root in state.device_roots]


def secure_channel_root_thumbprints(state: TunnelState) -> list[str]:
    """The Secure Channel Roots the node trusts (read likewise)."""
    return [thumbprint(root) for root in state.secure_channel_roots]


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


def next_identity(state: TunnelState, op: TrustUpdate) -> NextIdentity:
    """Open and check the identity ``op`` carries; raises ConfigError with the reason."""
    try:
        cert = _certificate(op)
        files = _current_files(state.state_dir)
        files[config.TRUST_JWS] = op.trust.encode()
        key = state.tunnel_key
        if op.kind == CONSOLE_IDENTITY:
            files[config.CONSOLE_IDENTITY_PEM] = op.certificate.encode()
        elif op.kind in CA_TRUST_KINDS:  # the trust config alone lists the CAs to trust
            pass
        else:
            files[config.TUNNEL_PEM] = op.certificate.encode()
            key = _opened_key(state, op, cert)
    except CertgateError as exc:
        raise ConfigError(f"rotation {op.rotation}: {exc}") from exc
    try:
        verified = config.state_from_files(files, state.state_dir, key)
    except ConfigError as exc:
        raise ConfigError(
            f"rotation {op.rotation}: the new identity does not verify: {exc}"
        ) from exc
    if (verified.group_id, verified.node_name) != (state.group_id, state.node_name):
        raise ConfigError(f"rotation {op.rotation}: the new state names another group or node")
    # Sent after the tunnel identity: the Secure Channel Root that issued it (a renewed
    # identity may come from a new one, and a finished rotation drops the old one).
    files[config.CHAIN_PEM] = config.chain_pem(verified)
    return NextIdentity(verified, files)


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
