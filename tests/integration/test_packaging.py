"""Packaging (issue #15): ``python -m build`` makes a wheel that installs into a fresh venv
and runs ``certgate``, the whole demo included; the systemd units pass
``systemd-analyze verify`` and carry the sandboxing directives.

The wheel is built from a copy of the source tree (the build writes egg-info and build/
beside the sources). The fresh venv takes certgate from the wheel only; its third-party
dependencies come from the project's venv through a ``.pth`` line, so the test needs no
network to resolve them (the build itself fetches its backend from the package index).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "packaging" / "systemd"
SERVICES = {
    "certgate-console.service": ["console", "serve"],
    "certgate-tunnel@.service": ["tunnel", "run"],
    "certgate-access.service": ["access", "serve"],
    "certgate-certproxy.service": ["certproxy", "serve"],
}
SANDBOX = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "CapabilityBoundingSet=",
    "RestrictAddressFamilies=",
    "SystemCallFilter=@system-service",
)


def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        args, capture_output=True, text=True, timeout=600, check=False, **kwargs
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    built = run([sys.executable, "-m", "build", "--outdir", str(out), str(tree)])
    assert built.returncode == 0, built.stdout + built.stderr
    (found,) = out.glob("certgate-*.whl")
    return found


def test_the_wheel_carries_every_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    src = ROOT / "src"
    expected = {
        str(path.relative_to(src))
        for path in src.joinpath("certgate").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    assert expected - names == set()
    assert "certgate/console/store/migrations/versions/0001_initial_schema.py" in names


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    assert run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    python = venv / "bin" / "python"
    site = Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
        ).stdout.strip()
    )
    # Dependencies only: a plain path line does not run the project venv's own .pth files,
    # so its editable certgate stays out of sight.
    (site / "zz-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    done = run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)])
    assert done.returncode == 0, done.stderr
    return venv


def clean_env() -> dict[str, str]:
    """No PYTHONPATH: the worktree's sources must not stand in for the wheel."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"COLUMNS": "200"}


def test_certgate_runs_from_the_wheel(installed: Path) -> None:
    where = run(
        [str(installed / "bin" / "python"), "-c", "import certgate; print(certgate.__file__)"],
        env=clean_env(),
    )
    assert where.stdout.startswith(str(installed)), where.stdout + where.stderr
    helped = run([str(installed / "bin" / "certgate"), "--help"], env=clean_env())
    assert helped.returncode == 0, helped.stderr
    assert all(word in helped.stdout for word in ("console", "tunnel", "access", "certproxy"))


def test_the_demo_passes_from_the_wheel(installed: Path) -> None:
    """Every piece the demo starts (console with its migrations, tunnel, device agent,
    audit verify) runs from the installed wheel."""
    demo = run([str(installed / "bin" / "certgate"), "demo"], env=clean_env())
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "demo passed" in demo.stdout


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze missing: make sysdeps installs the Debian package systemd")
    return found


@pytest.mark.parametrize("unit", sorted(SERVICES))
def test_unit_runs_its_service_with_one_config_file_and_a_sandbox(unit: str) -> None:
    text = (UNITS / unit).read_text()
    exec_start = next(x for x in text.splitlines() if x.startswith("ExecStart="))
    assert " ".join(SERVICES[unit]) in exec_start
    assert "--config /etc/certgate/" in exec_start
    for directive in SANDBOX:
        assert f"\n{directive}" in text, directive
    # Writable: its own state directory only (the cert proxy only reads Access's).
    writable = "ReadOnlyPaths=" if unit == "certgate-certproxy.service" else "ReadWritePaths="
    assert f"\n{writable}/var/lib/certgate/" in text


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at a real certgate.
    certgate = tmp_path / "certgate"
    certgate.write_text(f'#!/bin/sh\nexec {sys.executable} -m certgate "$@"\n')
    certgate.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for unit in SERVICES:
        text = (UNITS / unit).read_text().replace("/usr/bin/certgate", str(certgate))
        name = unit.replace("@.service", "@node1.service")
        (units / name).write_text(text)
    checked = run(
        [systemd_analyze(), "verify", *sorted(str(p) for p in units.iterdir())],
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
    )
    problems = [
        line
        for line in (checked.stdout + checked.stderr).splitlines()
        if line.strip() and not _environmental(line)
    ]
    assert checked.returncode == 0 and problems == [], checked.stdout + checked.stderr


def _environmental(line: str) -> bool:
    """Lines about the test machine, not the units: no running systemd (a container)."""
    return "Failed to connect to bus" in line or "System has not been booted with systemd" in line
