"""``certgate access init|serve`` through the real command line (typer, in process)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from certgate.access.cli import parse_clients
from certgate.access.config import ClientRegistration, TLSMode, load_config
from certgate.access.install import load_material
from certgate.access.oidc import secret_hash
from certgate.cli import app
from certgate.errors import ConfigError
from certgate.pki.keys import private_key_pem
from certgate.pki.thumbprint import thumbprint
from certgate.tlsconf import pem_of
from tests.access.harness import ConsolePKI, PublicPKI

runner = CliRunner()


def init_args(tmp_path: Path, *extra: str) -> list[str]:
    pki, public = ConsolePKI(), PublicPKI.create()
    admin = pki.admin()
    files = {
        "chain.pem": pki.chain_pem(),
        "admin.pem": pem_of([admin.cert]),
        "admin.key": private_key_pem(admin.key),
        "api-key": b"cgk_abc_def\n",
        "public.pem": pem_of([public.leaf.cert, public.root.cert]),
        "public.key": private_key_pem(public.leaf.key),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return [
        "access",
        "init",
        "-d",
        str(tmp_path / "access"),
        "--issuer",
        "https://access.example.com",
        "--console-url",
        "https://console.example.com:7443",
        "--console-chain",
        str(tmp_path / "chain.pem"),
        "--console-cert",
        str(tmp_path / "admin.pem"),
        "--console-key",
        str(tmp_path / "admin.key"),
        "--console-api-key-file",
        str(tmp_path / "api-key"),
        "--public-cert",
        str(tmp_path / "public.pem"),
        "--public-key",
        str(tmp_path / "public.key"),
        "--client",
        "com.example.mail=com.example.mail:/cb",
        "--client",
        "com.example.mail=https://mail.example.com/cb",
        *extra,
    ]


def test_init_installs_and_reports_the_thumbprints(tmp_path: Path) -> None:
    args = init_args(tmp_path, "--mode", "passthrough", "--dns-name", "node1.example.dmz")
    result = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    config = load_config(tmp_path / "access")
    assert config.tls_mode is TLSMode.PASSTHROUGH
    assert config.certproxy_url == "https://access.example.com:5262"
    assert config.clients == (
        ClientRegistration(
            "com.example.mail", ("com.example.mail:/cb", "https://mail.example.com/cb")
        ),
    )
    assert config.certproxy_thumbprint in result.output
    assert "cgk_abc_def" not in result.output


def test_init_twice_fails_without_touching_the_first(tmp_path: Path) -> None:
    assert runner.invoke(app, init_args(tmp_path)).exit_code == 0
    before = (tmp_path / "access" / "access.json").read_bytes()
    again = runner.invoke(app, init_args(tmp_path), env={"COLUMNS": "250"})
    assert again.exit_code == 1 and "already holds" in again.output
    assert (tmp_path / "access" / "access.json").read_bytes() == before


def test_init_reports_unreadable_inputs(tmp_path: Path) -> None:
    args = init_args(tmp_path)
    args[args.index("--public-key") + 1] = str(tmp_path / "missing.key")
    result = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 1 and "cannot read the public key" in result.output


@pytest.mark.parametrize("value", ["no-equals", "=https://a.example/cb", "app="])
def test_client_option_needs_id_and_uri(value: str) -> None:
    with pytest.raises(ConfigError, match="CLIENT_ID=REDIRECT_URI"):
        parse_clients([value])


def test_serve_needs_an_installation(tmp_path: Path) -> None:
    result = runner.invoke(app, ["access", "serve", "-d", str(tmp_path)], env={"COLUMNS": "250"})
    assert result.exit_code == 1
    assert "not an Access data directory" in result.output


def test_public_cert_installs_a_renewed_certificate_and_refuses_a_wrong_key(
    tmp_path: Path,
) -> None:
    assert runner.invoke(app, init_args(tmp_path)).exit_code == 0
    data_dir = tmp_path / "access"
    before = load_material(load_config(data_dir))
    renewed = PublicPKI.create()  # another public CA's certificate for the same VIP
    (tmp_path / "new.pem").write_bytes(pem_of([renewed.leaf.cert, renewed.root.cert]))
    (tmp_path / "new.key").write_bytes(private_key_pem(renewed.leaf.key))
    args = ["access", "public-cert", "-d", str(data_dir), "--cert", str(tmp_path / "new.pem")]
    wrong = runner.invoke(app, [*args, "--key", str(tmp_path / "public.key")])
    assert wrong.exit_code == 1
    assert "the private key does not match the certificate" in " ".join(wrong.output.split())
    assert load_material(load_config(data_dir)).public_chain == before.public_chain  # untouched
    result = runner.invoke(app, [*args, "--key", str(tmp_path / "new.key")], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert thumbprint(renewed.leaf.cert) in result.output
    after = load_material(load_config(data_dir))
    assert after.public_chain[0] == renewed.leaf.cert
    everything = b"".join(p.read_bytes() for p in data_dir.rglob("*") if p.is_file())
    assert b"PRIVATE KEY" not in everything  # its key is sealed


def test_client_secret_makes_a_client_confidential_keeping_only_its_hash(tmp_path: Path) -> None:
    assert runner.invoke(app, init_args(tmp_path)).exit_code == 0
    data_dir = str(tmp_path / "access")
    result = runner.invoke(app, ["access", "client-secret", "-d", data_dir, "com.example.mail"])
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert len(secret) == 43  # token_urlsafe(32): 256 bits
    assert "restart Access" in result.stderr
    [client] = load_config(tmp_path / "access").clients
    assert client.secret_sha256 == secret_hash(secret)
    assert len(client.redirect_uris) == 2  # the rest of the registration untouched
    assert secret not in (tmp_path / "access" / "access.json").read_text()
    again = runner.invoke(app, ["access", "client-secret", "-d", data_dir, "com.example.mail"])
    assert again.exit_code == 0 and again.stdout.strip() != secret  # a new one replaces it
    unknown = runner.invoke(app, ["access", "client-secret", "-d", data_dir, "other"])
    assert unknown.exit_code == 1 and "no client 'other'" in unknown.output
