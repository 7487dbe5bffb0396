"""Throwaway PostgreSQL servers for tests, from Debian's binaries (``make test`` installs
them). Each server lives in a temporary directory, listens on loopback only, and is
stopped when its fixture ends."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support import free_port

PG_USER = "postgres"  # initdb refuses to run as root; Debian's package creates this user


def pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _as_pg_user(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    return ["runuser", "-u", PG_USER, "--", *args]


@dataclass
class PostgresServer:
    directory: Path
    port: int

    @classmethod
    def start(cls) -> PostgresServer:
        initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise RuntimeError("PostgreSQL binaries missing: run `make test` (installs them)")
        # Not under pytest's tmp dir: that is 0700 root, and the server runs as `postgres`.
        base = Path(tempfile.mkdtemp(prefix="certgate-pg-"))
        directory = base / "pgdata"
        directory.mkdir(parents=True)
        if os.geteuid() == 0:
            entry = pwd.getpwnam(PG_USER)
            for path in (base, directory):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            _as_pg_user(
                [initdb, "-D", str(directory), "-A", "trust", "-U", "certgate", "--no-instructions"]
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        server = cls(directory, free_port())
        server.resume()
        return server

    def resume(self) -> None:
        """Start the server (again, after ``pause``) on its directory and port."""
        pg_ctl = pg_bin("pg_ctl")
        assert pg_ctl is not None
        directory, port = self.directory, self.port
        options = f"-h 127.0.0.1 -p {port} -k {directory} -c fsync=on"
        subprocess.run(
            _as_pg_user(
                [
                    pg_ctl,
                    "-D",
                    str(directory),
                    "-o",
                    options,
                    "-l",
                    str(directory / "server.log"),
                    "-w",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )

    def create_database(self, name: str) -> str:
        createdb = pg_bin("createdb")
        assert createdb is not None
        subprocess.run(
            _as_pg_user(
                [createdb, "-h", "127.0.0.1", "-p", str(self.port), "-U", "certgate", name]
            ),
            check=True,
            capture_output=True,
            timeout=60,
        )
        return f"postgresql+psycopg://certgate@127.0.0.1:{self.port}/{name}"

    def pause(self) -> None:
        """Stop the server, keeping its data for ``resume``."""
        pg_ctl = pg_bin("pg_ctl")
        assert pg_ctl is not None
        subprocess.run(
            _as_pg_user([pg_ctl, "-D", str(self.directory), "-m", "fast", "-w", "stop"]),
            check=False,
            capture_output=True,
            timeout=120,
        )

    def stop(self) -> None:
        self.pause()
        shutil.rmtree(self.directory.parent, ignore_errors=True)
