"""Signed audit checkpoints: a deleted tail, a database put back from an older copy, and a
forged, altered or wrongly signed checkpoint line are all detected."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from sqlalchemy import delete, select, update

from certgate import jws
from certgate.console import local
from certgate.console.services import audit, ca, checkpoints, groups
from certgate.console.store.models import AuditEntry, CACert, Instance
from certgate.errors import CertgateError, ChainError, SignatureError
from tests.console.conftest import append_audit, cli_audit_verify, tamper
from tests.support import init_console


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Init's checkpoint (count 0), five entries, and a checkpoint of them (count 5)."""
    directory, _ = init_console(tmp_path)
    append_audit(directory, 5)
    checkpoint(directory)
    return directory


def checkpoint(data_dir: Path) -> audit.Checkpoint | None:
    config = local.load_config(data_dir)
    db, pki = local.open_db(config)
    try:
        return local.checkpointer(config, db, pki).checkpoint()
    finally:
        db.dispose()


def sink_of(data_dir: Path) -> Path:
    return local.load_config(data_dir).audit_sink


def read(data_dir: Path) -> checkpoints.SinkReport:
    db, pki = local.open_db(local.load_config(data_dir))
    db.dispose()
    return checkpoints.read_sink(sink_of(data_dir), checkpoints.anchors(pki, local.TOP_GROUP))


def verify_with_sink(data_dir: Path) -> audit.ChainReport:
    report = read(data_dir)
    db, _ = local.open_db(local.load_config(data_dir))
    with db.transaction() as session:
        chain = audit.verify_chain(session, report.checkpoints)
    db.dispose()
    return chain


def delete_tail(data_dir: Path, keep: int) -> None:
    """Delete entries after ``keep`` and rewind the instance's head and count to match:
    the keyed chain alone verifies afterwards."""
    db, _ = local.open_db(local.load_config(data_dir))
    with db.transaction() as session:
        head = session.execute(select(AuditEntry.hash).where(AuditEntry.id == keep)).scalar_one()
        session.execute(delete(AuditEntry).where(AuditEntry.id > keep))
        session.execute(update(Instance).values(audit_head=head, audit_count=keep))
    db.dispose()


def test_sink_lines_verify_and_name_the_chain(data_dir: Path) -> None:
    report = read(data_dir)
    assert report.problems == ()
    assert [(c.count, c.last_id, c.keyed_from) for c in report.checkpoints] == [
        (0, None, 0),
        (5, 5, 0),
    ]
    assert report.checkpoints[0].head == audit.GENESIS
    assert verify_with_sink(data_dir).ok
    result = cli_audit_verify(data_dir)
    assert result.returncode == 0 and "5 entries, 2 signed checkpoints hold" in result.stdout


def test_deleted_tail_is_detected_by_the_checkpoint(data_dir: Path) -> None:
    delete_tail(data_dir, keep=3)
    db, _ = local.open_db(local.load_config(data_dir))
    with db.transaction() as session:
        assert audit.verify_chain(session).ok  # what the database alone can tell
    db.dispose()
    report = verify_with_sink(data_dir)
    assert not report.ok and report.first_bad_id == 5 and "tail" in (report.problem or "")
    assert "entries after 3 were deleted" in (report.problem or "")
    result = cli_audit_verify(data_dir)
    assert result.returncode == 1 and "BROKEN at entry 5" in result.stderr


def test_deleted_tail_refilled_by_new_entries_is_detected(data_dir: Path) -> None:
    delete_tail(data_dir, keep=3)
    append_audit(data_dir, 2)  # the count is 5 again, with other entries 4 and 5
    report = verify_with_sink(data_dir)
    assert not report.ok and "differs from the checkpoint of count 5" in (report.problem or "")


def test_a_database_put_back_from_an_older_copy_is_detected(data_dir: Path) -> None:
    database = Path(local.load_config(data_dir).db_url.removeprefix("sqlite:///"))
    old = database.read_bytes()  # checkpointed state: 5 entries
    append_audit(data_dir, 3)
    checkpoint(data_dir)
    database.write_bytes(old)
    for wal in database.parent.glob(database.name + "-*"):
        wal.unlink()
    report = verify_with_sink(data_dir)
    assert not report.ok and "of count 8" in (report.problem or "")


def test_checkpoint_is_written_only_when_the_head_moved(data_dir: Path) -> None:
    config = local.load_config(data_dir)
    db, pki = local.open_db(config)
    writer = local.checkpointer(config, db, pki)
    try:
        assert writer.checkpoint() is not None  # a new checkpointer writes its first one
        assert writer.checkpoint() is None
        append_audit(data_dir, 1)
        written = writer.checkpoint()
        assert written is not None and written.count == 6 and written.last_id == 6
    finally:
        writer.stop()
        db.dispose()
    assert len(sink_of(data_dir).read_text().splitlines()) == 4


def test_sink_file_is_owner_only_and_holds_no_key(data_dir: Path) -> None:
    sink = sink_of(data_dir)
    assert sink.stat().st_mode & 0o077 == 0
    assert "PRIVATE" not in sink.read_text()
    assert (data_dir / "master.key").read_text().strip() not in sink.read_text()


def rewrite_line(data_dir: Path, number: int, change: dict[str, object]) -> None:
    sink = sink_of(data_dir)
    lines = sink.read_text().splitlines()
    lines[number - 1] = json.dumps({**json.loads(lines[number - 1]), **change})
    sink.write_text("\n".join(lines) + "\n")


def test_readable_fields_that_differ_from_the_signed_ones_are_rejected(data_dir: Path) -> None:
    rewrite_line(data_dir, 2, {"count": 3})
    report = read(data_dir)
    assert len(report.checkpoints) == 1
    assert report.problems == (
        "audit-checkpoints.jsonl line 2: readable fields differ from the signed ones",
    )
    result = cli_audit_verify(data_dir)
    assert result.returncode == 1 and "line 2" in result.stderr and "REJECTED" in result.stderr


def test_an_altered_signed_payload_is_rejected(data_dir: Path) -> None:
    line = json.loads(sink_of(data_dir).read_text().splitlines()[1])
    header, payload, signature = line["jws"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = base64.urlsafe_b64encode(json.dumps({**claims, "count": 3}).encode()).rstrip(b"=")
    rewrite_line(data_dir, 2, {"count": 3, "jws": f"{header}.{forged.decode()}.{signature}"})
    [problem] = read(data_dir).problems
    assert "line 2" in problem and "signature does not verify" in problem


def sign_with(data_dir: Path, group: str, tunnel_key: bool) -> str:
    """A checkpoint line for count 99 signed by ``group``'s console or tunnel identity."""
    db, pki = local.open_db(local.load_config(data_dir))
    with db.transaction() as session:
        pair = groups.identity_pair(session, pki, group)
        cert, key = pair[2:] if tunnel_key else pair[:2]
        fields = {"count": 99, "head": "a" * 64, "last_id": 99, "keyed_from": 0}
        payload = {**fields, "group_id": local.TOP_GROUP}
        chain = [cert, pki.certs[ca.SECURE_CHANNEL_ROOT]]
        token = jws.sign(payload, key, chain, jws.TYP_AUDIT_CHECKPOINT, 60)
    db.dispose()
    return json.dumps({**fields, "jws": token})


def append_line(data_dir: Path, line: str) -> None:
    with sink_of(data_dir).open("a") as sink:
        sink.write(line + "\n")


def test_a_line_signed_by_the_tunnel_identity_is_rejected(data_dir: Path) -> None:
    """Tunnel identity keys leave the console (installers); they must not vouch for the log."""
    append_line(data_dir, sign_with(data_dir, local.TOP_GROUP, tunnel_key=True))
    [problem] = read(data_dir).problems
    assert "line 3" in problem and "not the console identity" in problem


def test_a_line_signed_by_another_instance_is_rejected(data_dir: Path, tmp_path: Path) -> None:
    other, _ = init_console(tmp_path / "other")
    append_line(data_dir, sign_with(other, local.TOP_GROUP, tunnel_key=False))
    [problem] = read(data_dir).problems
    assert "line 3" in problem and "client certificate rejected" in problem


def test_garbage_lines_are_rejected_by_number(data_dir: Path) -> None:
    append_line(data_dir, "not json")
    append_line(data_dir, '{"count": 5}')
    append_line(data_dir, '{"jws": "x.y.z"}')
    problems = read(data_dir).problems
    assert [p.split(":")[0] for p in problems] == [
        f"audit-checkpoints.jsonl line {n}" for n in (3, 4, 5)
    ]


def test_a_swapped_ca_certificate_is_refused(data_dir: Path, tmp_path: Path) -> None:
    """A writer who puts their own Secure Channel Root in the database cannot anchor
    checkpoints of their own: the CA certificates are held to the master-key-sealed keys."""
    other, _ = init_console(tmp_path / "other")
    db, pki = local.open_db(local.load_config(other))
    foreign = ca.pem(pki.certs[ca.SECURE_CHANNEL_ROOT])
    db.dispose()
    swap = update(CACert).where(CACert.label == ca.SECURE_CHANNEL_ROOT).values(cert_pem=foreign)
    tamper(data_dir, swap)
    db, pki = local.open_db(local.load_config(data_dir))
    db.dispose()
    with pytest.raises(SignatureError, match="does not match its sealed key"):
        checkpoints.anchors(pki, local.TOP_GROUP)
    result = cli_audit_verify(data_dir)
    assert result.returncode == 1 and "does not match its sealed key" in result.stderr


def test_verify_line_raises_for_each_kind_of_failure(data_dir: Path) -> None:
    db, pki = local.open_db(local.load_config(data_dir))
    db.dispose()
    trusted = checkpoints.anchors(pki, local.TOP_GROUP)
    good = sink_of(data_dir).read_text().splitlines()[1]
    assert checkpoints.verify_line(good, trusted).count == 5
    for bad in ("[]", '{"jws": 5}', json.dumps({"jws": "e30.e30.AA"})):
        with pytest.raises(CertgateError):
            checkpoints.verify_line(bad, trusted)
    with pytest.raises((SignatureError, ChainError)):
        checkpoints.verify_line(good, checkpoints.Anchors(trusted.roots, trusted.issuers, "other"))


def test_deleted_tail_is_detected_on_each_backend(tmp_path: Path, db_url: str) -> None:
    directory, _ = init_console(tmp_path, db_url=db_url)
    append_audit(directory, 5)
    checkpoint(directory)
    assert verify_with_sink(directory).ok
    delete_tail(directory, keep=3)
    report = verify_with_sink(directory)
    assert not report.ok and report.first_bad_id == 5 and "tail" in (report.problem or "")


def test_a_renumbered_entry_is_detected(data_dir: Path) -> None:
    tamper(data_dir, update(AuditEntry).where(AuditEntry.id == 5).values(id=50))
    report = verify_with_sink(data_dir)
    assert not report.ok and report.first_bad_id == 50 and "renumbered" in (report.problem or "")
