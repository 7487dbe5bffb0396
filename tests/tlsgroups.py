"""Key-exchange groups a TLS listener accepts, asked with a real ``openssl s_client``
offering one group alone (tlsconf.GROUPS is what every listener must accept).

TLS 1.3: there the offered groups are only about key exchange. In TLS 1.2 they also say
which curves the client accepts for the server's ECDSA certificate (RFC 8422), so a
client offering X25519 alone refuses a P-256 certificate whatever the server allows.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

# Offered group -> how s_client names it in "Peer Temp Key".
SERVED = {"X25519": "X25519", "P-256": "prime256v1", "P-384": "secp384r1"}
REFUSED = ("X448", "secp521r1", "ffdhe2048")
_PEER_TEMP_KEY = re.compile(r"^(?:Server|Peer) Temp Key: (.+)$", re.MULTILINE)


def negotiated_group(
    port: int,
    group: str,
    cert: Path | None = None,
    key: Path | None = None,
) -> str | None:
    """How s_client describes the key exchange of the listener on ``port`` when offered
    ``group`` alone (e.g. "ECDH, prime256v1, 256 bits"); None if no key was exchanged."""
    identity = [] if cert is None or key is None else ["-cert", str(cert), "-key", str(key)]
    done = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-groups",
            group,
            "-tls1_3",
            "-brief",
            *identity,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    found = _PEER_TEMP_KEY.search(done.stdout + done.stderr)
    # s_client prints the key exchange once its side of the handshake is done; a listener
    # that then refuses the missing client certificate still chose the group.
    return None if found is None else found.group(1)
