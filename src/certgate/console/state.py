"""The running console's shared state: config, storage, loaded PKI, feed notifier and the
watcher of other processes' commits that feeds it, writer, signed snapshot pages, audit
checkpointer."""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from sqlalchemy import select
from sqlalchemy.orm import Session

from certgate.console import local
from certgate.console.checkpointer import Checkpointer
from certgate.console.config import ConsoleConfig
from certgate.console.notify import ChangeWatcher, change_watcher
from certgate.console.presenter import Presenter
from certgate.console.renewer import Renewer
from certgate.console.services import audit, ca
from certgate.console.services.feed import FEED_GROUPS_KEY, FeedNotifier
from certgate.console.services.snapshots import SnapshotPages
from certgate.console.store.db import Database
from certgate.console.store.models import Certificate, Instance
from certgate.console.writer import Writer
from certgate.pki import expiry
from certgate.pki.authority import Names
from certgate.pki.keys import PrivateKey, generate_key
from certgate.pki.keystore import MasterKey, load_master_key
from certgate.pki.profiles import CONSOLE_TLS, RENEWAL_WINDOW
from certgate.tlsconf import ClientAuth, load_identity, server_context

CONSOLE_TLS_KEY = "console-tls"
# OpenSSL X509_V_FLAG_NO_CHECK_TIME: the handshake still proves key possession and the
# chain, while validity dates are judged by the app so an expired admin cert gets a 401
# with an audit entry instead of an anonymous TLS alert.
X509_V_FLAG_NO_CHECK_TIME = 0x200000


@dataclass
class ConsoleState:
    config: ConsoleConfig
    db: Database
    pki: ca.InstancePKI
    notifier: FeedNotifier
    writer: Writer
    snapshot_pages: SnapshotPages
    crl_cache: dict[str, ca.CachedCRL] = field(default_factory=dict)  # by Device Root label
    crl_lock: threading.Lock = field(default_factory=threading.Lock)
    change_watcher: ChangeWatcher | None = None  # started and stopped by the app's lifespan
    checkpointer: Checkpointer | None = None  # likewise
    renewer: Renewer | None = None  # likewise (renewal before expiry)
    live_tls: ssl.SSLContext | None = None  # the listener's, once built (renewed in place)
    tls_cert: x509.Certificate | None = None  # the console TLS certificate it presents
    tls_chain: list[x509.Certificate] = field(default_factory=list)  # what follows it
    # ``pki.rows`` when the listener last took what they call for (``console.presenter``).
    presented_rows: tuple[tuple[str, str], ...] = ()
    presenter: Presenter | None = None  # started and stopped by the app's lifespan

    @classmethod
    def open(cls, config: ConsoleConfig, master: MasterKey | None = None) -> ConsoleState:
        master = master or load_master_key(config.master_key_file)
        db = Database(config.db_url, session_info=audit.session_info(master))
        with db.transaction() as session:
            pki = ca.InstancePKI.load(session, master, config.pkcs11)
        notifier = FeedNotifier()
        db.on_commit(lambda info: notifier.notify(info.get(FEED_GROUPS_KEY, ())))
        state = cls(
            config,
            db,
            pki,
            notifier,
            Writer(db),
            SnapshotPages(db, pki),
            change_watcher=change_watcher(config.db_url, notifier),
            checkpointer=local.checkpointer(config, db, pki),
        )
        if config.renew_interval_s > 0:
            state.renewer = Renewer(state, config.renew_interval_s)
        state.presenter = Presenter(state)
        return state

    def tls_context(self) -> ssl.SSLContext:
        with self.db.transaction() as session:
            cert, key = self._console_tls(session)
        self.tls_cert, self.tls_chain = cert, self.pki.chain_of(cert)
        self.presented_rows = self.pki.rows
        ctx = server_context(
            [cert, *self.tls_chain],
            key,
            client_cas=[self.pki.certs[ca.ROOT], *(self.pki.certs[c] for c in ca.INTERMEDIATES)],
            client_auth=ClientAuth.OPTIONAL,
            alpn=["http/1.1"],
        )
        ctx.verify_flags |= X509_V_FLAG_NO_CHECK_TIME
        self.live_tls = ctx
        return ctx

    def renew_tls(self, session: Session, now: datetime | None = None) -> bool:
        """Renewal before expiry: when the console TLS certificate in use is within
        ``RENEWAL_WINDOW`` of its end at ``now``, issue the next one and load it into the
        live context (new connections get it; open ones keep theirs). True if renewed."""
        if self.live_tls is None or self.tls_cert is None:
            return False
        cert, key = self._console_tls(session, now)
        chain = self.pki.chain_of(cert)  # a Root rotation step changes it (cross certificate)
        self.presented_rows = self.pki.rows  # what ``_console_tls`` refreshed them to
        if cert == self.tls_cert and chain == self.tls_chain:
            return False
        load_identity(self.live_tls, [cert, *chain], key)
        self.tls_cert, self.tls_chain = cert, chain
        return True

    def certificates_in_use(self, now: float) -> list[expiry.CertificateInUse]:
        """What the console presents (its TLS certificate) and the CAs it issues with."""
        certs = {"console-tls": self.tls_cert} if self.tls_cert is not None else {}
        return expiry.in_use({**certs, **self.pki.certs}, now)

    def _console_tls(
        self, session: Session, now: datetime | None = None
    ) -> tuple[x509.Certificate, PrivateKey]:
        """Reuse the console TLS cert while it covers our names, is not within its
        renewal window (``RENEWAL_WINDOW`` at ``now``) and was issued by the current Secure
        Channel Root (after that root's rotation switch it is issued again under the new one).

        Consoles sharing a database start at the same moment: the instance row is locked
        first, so one of them issues the certificate and the others, once it commits,
        find and reuse it (without the lock both sealed ``console-tls``, and one died on
        the duplicate key). SQLite serialises writers at BEGIN IMMEDIATE anyway."""
        session.execute(select(Instance.id).with_for_update())
        self.pki.refresh(session, 0)  # a rotation switch another process made
        now = now or ca.now()
        dns, ips = self.config.tls_names()
        row = (
            session.execute(
                select(Certificate)
                .where(Certificate.kind == "console-tls", Certificate.revoked_at.is_(None))
                .order_by(Certificate.issued_at.desc())
            )
            .scalars()
            .first()
        )
        # A Root rotation issues the Secure Channel Root again with its key: what either
        # certificate of that key issued is the current root's.
        current_issuer = row is not None and row.issuer_label in self.pki.family(
            self.pki.label(ca.SECURE_CHANNEL_ROOT)
        )
        if row is not None and current_issuer and row.not_after - now > RENEWAL_WINDOW:
            cert = x509.load_pem_x509_certificate(row.cert_pem.encode())
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            if set(dns) <= set(san.get_values_for_type(x509.DNSName)):
                return cert, self.pki.unseal(session, CONSOLE_TLS_KEY)
            ca.revoke(session, row.serial, "superseded")
        key = generate_key()
        ca.seal_key(session, self.pki.master, CONSOLE_TLS_KEY, key)
        cert, _ = self.pki.issue(
            session,
            ca.SECURE_CHANNEL_ROOT,
            CONSOLE_TLS,
            Names("certgate console", dns_names=dns, ip_addresses=ips),
            key.public_key(),
            ca.Record(kind="console-tls"),
        )
        return cert, key
