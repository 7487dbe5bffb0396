"""The Alembic migrations against the models, on SQLite and PostgreSQL: the schema they
build is the models' schema, and 0003 (snapshot covering indexes) goes down and up again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from certgate.console.store.db import MIGRATIONS, Database, migrate
from certgate.console.store.models import Base


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
