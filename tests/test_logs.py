"""certgate.logs: the stable field set, each format's escaping, syslog targets.

What a real collector makes of the output is tests/integration/test_syslog.py (rsyslog)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest

from certgate import logs

# Every character a value could use to forge a line, a record or a structured-data field.
NASTY = 'dev"ice]\\ 1\nfake line\r\x00\x1b[31m\u2028end'


def record(message: str = "deny %s", *args: object, **fields: object) -> logging.LogRecord:
    made = logging.LogRecord("certgate.tunnel", logging.WARNING, __file__, 1, message, args, None)
    for key, value in logs.event("deny", **fields).items():
        setattr(made, key, value)
    return made


@pytest.fixture(autouse=True)
def clean_context() -> Iterator[None]:
    yield
    logs._context.clear()


def test_json_has_the_stable_field_set_even_without_an_event() -> None:
    plain = logging.LogRecord("certgate.console", logging.INFO, __file__, 1, "listening", (), None)
    line = json.loads(logs.JSONFormatter().format(plain))
    assert [k for k in line if k in logs.FIELDS] == list(logs.FIELDS)
    assert line["event"] == logs.SERVICE_EVENT
    assert line["device_uid"] is None
    assert (line["level"], line["logger"], line["message"]) == (
        "info",
        "certgate.console",
        "listening",
    )


def test_json_is_one_line_and_gives_every_value_back_intact() -> None:
    out = logs.JSONFormatter().format(record("deny %s", NASTY, device_uid=NASTY, reason="x"))
    assert out.isascii() and out.isprintable()  # no newline, CR, NUL, ESC, U+2028
    line = json.loads(out)
    assert line["device_uid"] == NASTY
    assert line["reason"] == "x"
    assert "\n" not in line["message"] and "\x1b" not in line["message"]


def test_text_escapes_control_characters_so_no_line_can_be_forged() -> None:
    out = logs.TextFormatter().format(record("deny dest=%s", NASTY))
    assert "\n" not in out and "\r" not in out and "\x1b" not in out and "\u2028" not in out
    assert out.endswith("deny dest=" + 'dev"ice]\\ 1\\nfake line\\r\\x00\\x1b[31m\\u2028end')


def test_escape_controls_leaves_printable_text_alone() -> None:
    assert logs.escape_controls("café → ok") == "café → ok"


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [('a"b', 'a\\"b'), ("a]b", "a\\]b"), ("a\\b", "a\\\\b"), ('\\"]', '\\\\\\"\\]')],
)
def test_sd_escape_follows_rfc5424_6_3_3(raw: str, escaped: str) -> None:
    assert logs.sd_escape(raw) == escaped


SD_PARAM = re.compile(r'(\w+)="((?:[^"\\\]]|\\["\\\]])*)"')


def test_rfc5424_message_structure_and_fields() -> None:
    logs.set_context(node="n1", group="g1")
    out = logs.RFC5424Formatter("host 1").format(
        record("deny %s", "x", device_uid=NASTY, thumbprint="ab", status=403)
    )
    header, sd_and_msg = out.split(" [", 1)
    pri, stamp, host, app, procid, msgid = header.split(" ")
    assert pri == f"<{16 * 8 + 4}>1"  # local0, warning
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    assert (host, app, msgid) == ("host1", "certgate", "deny")
    assert procid.isdigit()
    sd, message = sd_and_msg.split("] \ufeff", 1)
    assert sd.startswith(logs.SD_ID + " ")
    params = dict(SD_PARAM.findall(sd))
    assert " ".join(f'{k}="{v}"' for k, v in params.items()) == sd[len(logs.SD_ID) + 1 :]
    assert params["device_uid"] == logs.sd_escape(logs.escape_controls(NASTY))
    assert params["node"] == "n1" and params["group"] == "g1" and params["status"] == "403"
    assert "reason" not in params  # no value: RFC 5424 has no null
    assert message == "deny x"


def test_event_refuses_a_field_outside_the_contract() -> None:
    with pytest.raises(ValueError, match="colour"):
        logs.event("deny", colour="red")
    with pytest.raises(ValueError, match="colour"):
        logs.set_context(colour="red")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("udp://127.0.0.1:514", logs.SyslogTarget("udp", "127.0.0.1", 514)),
        ("tcp://siem.example:6514", logs.SyslogTarget("tcp", "siem.example", 6514)),
        ("tls://[::1]:6514", logs.SyslogTarget("tls", "::1", 6514)),
    ],
)
def test_syslog_target_parses(url: str, expected: logs.SyslogTarget) -> None:
    assert logs.SyslogTarget.parse(url) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://h:1", "scheme"),
        ("udp://h", "HOST:PORT"),
        ("tcp://:514", "HOST:PORT"),
        ("tcp://h:99999", "out of range"),
        ("tcp://h:1/path", "HOST:PORT"),
    ],
)
def test_syslog_target_refuses(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        logs.SyslogTarget.parse(url)


def test_configure_refuses_a_bad_target_and_keeps_the_old_handlers() -> None:
    before = list(logging.getLogger().handlers)
    with pytest.raises(ValueError, match="scheme"):
        logs.configure(logs.LogOptions(syslog="ftp://h:1"))
    assert logging.getLogger().handlers == before
