"""Access configuration: validated at construction, round-trips through access.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from certgate.access.config import (
    AccessConfig,
    AccessFiles,
    ClientRegistration,
    SignInStoreKind,
    TLSMode,
    check_redirect_uri,
    load_config,
    pin_certproxy,
    save_config,
)
from certgate.errors import ConfigError

CLIENTS = (ClientRegistration("com.example.mail", ("com.example.mail:/cb",)),)


def config(tmp_path: Path, **changes: Any) -> AccessConfig:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "issuer": "https://access.example.com",
        "console_url": "https://console.example.com:7443",
        "certproxy_url": "https://access.example.com:5262",
        "certproxy_thumbprint": "0" * 64,
        "clients": CLIENTS,
    }
    values.update(changes)
    return AccessConfig(**values)


def test_defaults_are_safe(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert cfg.host == "127.0.0.1" and cfg.port == 443
    assert cfg.tls_mode is TLSMode.OFFLOAD
    assert cfg.code_ttl_s <= 600 and cfg.console_budget_s <= 60


def test_round_trip(tmp_path: Path) -> None:
    cfg = config(tmp_path, tls_mode=TLSMode.PASSTHROUGH, port=8443, status_ttl_s=2.5)
    save_config(cfg)
    assert load_config(tmp_path) == cfg
    assert load_config(tmp_path, port=9443).port == 9443
    assert load_config(tmp_path, port=None).port == 8443


def test_load_balancers_round_trip_and_override(tmp_path: Path) -> None:
    cfg = config(tmp_path, load_balancers=("10.0.0.2", "2001:db8::/64"))
    save_config(cfg)
    assert load_config(tmp_path) == cfg
    assert load_config(tmp_path, load_balancers=("10.0.0.3",)).load_balancers == ("10.0.0.3",)
    (tmp_path / "access.json").write_text(
        (tmp_path / "access.json").read_text().replace('"10.0.0.2"', '"lb.example.com"')
    )
    with pytest.raises(ConfigError, match=r"'lb\.example\.com' is not an IP address or network"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"issuer": "http://access.example.com"}, "issuer must be an https"),
        ({"issuer": "https://access.example.com?x=1"}, "query or fragment"),
        ({"issuer": "https://access.example.com#f"}, "query or fragment"),
        ({"issuer": "https://access.example.com/"}, "must not end with '/'"),
        ({"console_url": "https://console.example.com/api"}, "scheme://host"),
        ({"certproxy_url": "ftp://x"}, "cert proxy URL"),
        ({"certproxy_thumbprint": "AB" * 32}, "thumbprint"),
        ({"clients": ()}, "at least one client"),
        ({"clients": CLIENTS * 2}, "unique"),
        ({"port": 0}, "port"),
        ({"code_ttl_s": 601}, "code lifetime"),
        ({"status_ttl_s": True}, "status cache"),
        ({"console_timeout_s": 0}, "console request timeout"),
        ({"load_balancers": ("10.0.0.1/8",)}, "has host bits set"),
    ],
)
def test_invalid_settings_raise(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, **changes)


@pytest.mark.parametrize(
    "uri",
    [
        "https://app.example.com/cb",
        "https://app.example.com/cb?tenant=1",
        "http://127.0.0.1:8123/cb",
        "http://[::1]/cb",
        "com.example.mail:/oauth2redirect",
    ],
)
def test_redirect_uris_that_can_receive_a_code(uri: str) -> None:
    check_redirect_uri(uri)


@pytest.mark.parametrize(
    "uri",
    [
        "https://app.example.com/cb#frag",
        "http://app.example.com/cb",
        "http://localhost/cb",
        "myapp:/cb",
        "com.example.mail:",
        "https://app.example.com/a b",
        "/relative/cb",
        "https://" + "a" * 2050,
    ],
)
def test_redirect_uris_that_cannot(uri: str) -> None:
    with pytest.raises(ConfigError, match="redirect URI"):
        check_redirect_uri(uri)


def test_client_needs_a_redirect_uri_and_a_sane_id() -> None:
    with pytest.raises(ConfigError, match="at least one redirect URI"):
        ClientRegistration("app", ())
    with pytest.raises(ConfigError, match="client id"):
        ClientRegistration("bad id", ("https://a.example/cb",))


def test_a_confidential_client_round_trips_with_its_secret_hash_only(tmp_path: Path) -> None:
    confidential = ClientRegistration("console", ("https://console.example/cb",), "ab" * 32)
    cfg = config(tmp_path, clients=(*CLIENTS, confidential))
    save_config(cfg)
    assert load_config(tmp_path) == cfg
    stored = json.loads(AccessFiles(tmp_path).settings.read_text())["clients"]
    assert "secret_sha256" not in stored[0] and stored[1]["secret_sha256"] == "ab" * 32
    with pytest.raises(ConfigError, match="secret_sha256 must be 64 hex digits"):
        ClientRegistration("console", ("https://console.example/cb",), "not-a-hash")


def test_sign_ins_are_kept_in_the_console_unless_told(tmp_path: Path) -> None:
    """Shared by default (any node behind a round-robin balancer finishes any sign-in); an
    access.json written before the setting existed means the same; a bad value is refused."""
    assert config(tmp_path).signins is SignInStoreKind.CONSOLE
    save_config(config(tmp_path, signins=SignInStoreKind.MEMORY))
    assert load_config(tmp_path).signins is SignInStoreKind.MEMORY
    assert load_config(tmp_path, signins=SignInStoreKind.CONSOLE).signins is SignInStoreKind.CONSOLE
    settings = tmp_path / "access.json"
    stored = json.loads(settings.read_text())
    del stored["signins"]
    settings.write_text(json.dumps(stored))
    assert load_config(tmp_path).signins is SignInStoreKind.CONSOLE
    settings.write_text(json.dumps({**stored, "signins": "disk"}))
    with pytest.raises(ConfigError, match="'disk' is not a valid SignInStoreKind"):
        load_config(tmp_path)


def test_load_refuses_a_missing_or_broken_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an Access data directory"):
        load_config(tmp_path)
    (tmp_path / "access.json").write_text('{"issuer": 1}')
    with pytest.raises(ConfigError, match="not a valid Access configuration"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"tls_lifetime_days": 399},
            "TLS certificate lifetime \\(days\\) must be between 31 and 398",
        ),
        ({"tls_lifetime_days": 30}, "between 31 and 398"),  # not longer than the renewal window
        ({"trust_refresh_s": 0}, "Device Root refresh interval"),
        ({"renew_check_s": 0}, "renewal check interval"),
    ],
)
def test_renewal_and_trust_settings_are_bounded(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, **changes)
    assert config(tmp_path).tls_lifetime_days == 397  # Mozilla's 398 days, with a day spare
    assert config(tmp_path, tls_lifetime_days=398).tls_lifetime_days == 398


def test_pinning_a_renewed_proxy_certificate_rewrites_only_the_pin(tmp_path: Path) -> None:
    save_config(config(tmp_path, port=8443))
    before = json.loads((tmp_path / "access.json").read_text())
    pin_certproxy(AccessFiles(tmp_path), "a" * 64)
    after = json.loads((tmp_path / "access.json").read_text())
    assert after == {**before, "certproxy_thumbprint": "a" * 64}
    with pytest.raises(ConfigError, match="64 lower-case hex"):
        pin_certproxy(AccessFiles(tmp_path), "not a thumbprint")
