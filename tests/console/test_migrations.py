"""The Alembic migrations against the models, on SQLite and PostgreSQL: the schema they
build is the models' schema, and 0003 (snapshot covering indexes) goes down and up again."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from certgate.console.store.db import MIGRATIONS, Database, migrate
from certgate.console.store.models import Base
from tests.postgres import PostgresServer


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    db = Database(db_url)
    try:
        yield db.engine
    finally:
        db.dispose()


def _alembic(engine: Engine, action: str, revision: str) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, action)(cfg, revision)


def _indexes(engine: Engine, table: str) -> dict[str, list[str | None]]:
    return {
        ix["name"]: ix["column_names"] for ix in inspect(engine).get_indexes(table) if ix["name"]
    }


def test_the_migrations_build_the_models_schema(engine: Engine) -> None:
    migrate(engine)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_0003_adds_the_snapshot_indexes_and_takes_them_back(engine: Engine) -> None:
    migrate(engine)
    certificates = _indexes(engine, "certificates")
    assert certificates["ix_certificates_snapshot"][:3] == ["group_id", "device_uid", "thumbprint"]
    assert "ix_certificates_group_thumbprint" in certificates  # format 1 pages still use it
    assert "ix_devices_snapshot" in _indexes(engine, "devices")
    _alembic(engine, "downgrade", "0002")
    assert "ix_certificates_snapshot" not in _indexes(engine, "certificates")
    assert "ix_devices_snapshot" not in _indexes(engine, "devices")
    _alembic(engine, "upgrade", "head")
    assert "ix_devices_snapshot" in _indexes(engine, "devices")


def test_consoles_migrating_at_the_same_moment_all_succeed(postgres: PostgresServer) -> None:
    """Consoles started together on PostgreSQL each migrate a new database: one builds the
    schema, the others wait on the advisory lock and find it at head, instead of failing
    on tables that already exist. (Several consoles share PostgreSQL only: a SQLite file
    belongs to one console.)"""
    db_url = postgres.create_database("migrate_together")
    databases = [Database(db_url) for _ in range(3)]
    barrier = threading.Barrier(len(databases))
    failures: list[BaseException] = []

    def start(db: Database) -> None:
        barrier.wait()
        try:
            migrate(db.engine)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=start, args=(db,)) for db in databases]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        for db in databases:
            db.dispose()
    assert failures == []
    engine = Database(db_url).engine
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()
