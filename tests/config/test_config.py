"""Configuration: SPEC defaults, error reports, environment overrides, effective YAML, warnings."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from connwatch._types import Address
from connwatch.config import (
    HeartbeatConfig,
    HttpCheckConfig,
    KeepaliveConfig,
    ListenerConfig,
    SendExpectConfig,
    Settings,
    config_warnings,
    decode_escapes,
    effective_yaml,
    encode_escapes,
    load_settings,
    one_listener_config,
)
from connwatch.exceptions import ConfigError

REPO = Path(__file__).resolve().parents[2]

# SPEC section 3, verbatim but for the comments: every value shown is the default.
SPEC_DEFAULTS = r"""
admin:
  listen: "127.0.0.1:9464"
  token: null
  heartbeat_listen: null
log:
  level: info
  format: json
  connection_events: true
  progress_interval: 0s
shutdown:
  drain_timeout: 30s
  quiet_close: true
  quiet_period: 500ms
  close_rate: 0
workers: 1
listeners:
  - name: app
    listen: "0.0.0.0:7000"
    upstreams: ["127.0.0.1:6379"]
    balance: round_robin
    connect_timeout: 3s
    connect_attempts: 2
    max_connections: 10000
    idle_timeout: 0s
    half_close_timeout: 0s
    max_lifetime: 0s
    on_upstream_down: keep
    buffer_size: 256KiB
    proxy_protocol:
      accept: false
      send: none
    keepalive:
      client:   {enabled: true, idle: 60s, interval: 10s, count: 5, user_timeout: 0s}
      upstream: {enabled: true, idle: 60s, interval: 10s, count: 5, user_timeout: 0s}
    heartbeat:
      enabled: true
      interval: 5s
      max_interval: 30s
      failure_threshold: 3
      stall_timeout: 30s
    health_check:
      enabled: true
      type: tcp
      interval: 5s
      max_interval: 30s
      timeout: 2s
      rise: 2
      fall: 3
      port: null
      http: {path: /healthz, scheme: http, host: null, expected_status: "200-399"}
      send_expect: {send: "PING\r\n", expect: "+PONG"}
"""

MINIMAL = """\
listeners:
  - name: app
    listen: "0.0.0.0:7000"
    upstreams: ["127.0.0.1:6379"]
"""


def write(tmp_path: Path, text: str, name: str = "connwatch.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Settings:
    return load_settings(write(tmp_path, text), env=env or {})


def issues_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, env)
    assert info.value.issues, "a ConfigError must list at least one issue"
    return info.value.issues


# --- defaults -----------------------------------------------------------------------------------


def test_defaults_equal_spec(tmp_path: Path) -> None:
    assert load_text(tmp_path, SPEC_DEFAULTS) == load_text(tmp_path, MINIMAL)


def test_minimal_config_gets_the_spec_defaults_as_typed_values(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, MINIMAL)
    assert cfg.admin.listen == Address("127.0.0.1", 9464)
    assert cfg.admin.token is None
    assert cfg.workers == 1
    assert cfg.shutdown.quiet_period == 0.5
    assert cfg.shutdown.close_rate == 0
    listener = cfg.listeners[0]
    assert listener.listen == Address("0.0.0.0", 7000)
    assert listener.upstreams == (Address("127.0.0.1", 6379),)
    assert listener.buffer_size == 256 * 1024
    assert listener.keepalive.client == KeepaliveConfig()
    assert listener.keepalive.upstream.idle == 60.0
    assert listener.keepalive.upstream.path_idle_limit is None
    assert listener.heartbeat == HeartbeatConfig()
    assert listener.health_check.send_expect.send_bytes == b"PING\r\n"
    assert listener.health_check.http.expected_status == "200-399"


def test_models_are_frozen(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, MINIMAL)
    with pytest.raises(ValidationError):
        cfg.listeners[0].heartbeat.interval = 1.0  # type: ignore[misc]


def test_settings_ignore_the_environment_of_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKERS", "7")
    cfg = Settings(
        listeners=(ListenerConfig.model_validate(yaml.safe_load(MINIMAL)["listeners"][0]),)
    )
    assert cfg.workers == 1


def test_example_config_loads_with_defaults() -> None:
    example = load_settings(REPO / "config" / "connwatch.yaml", env={})
    data = yaml.safe_load(MINIMAL)
    data["listeners"][0].update(name=example.listeners[0].name)
    data["listeners"][0].update(listen=str(example.listeners[0].listen))
    data["listeners"][0].update(upstreams=[str(u) for u in example.listeners[0].upstreams])
    assert example == load_settings(None, env={}, base=data)


# --- bad files ----------------------------------------------------------------------------------


def test_unknown_key_names_path_line_and_allowed_keys(tmp_path: Path) -> None:
    (issue,) = issues_of(tmp_path, MINIMAL + "    heartbeat:\n      intervall: 5s\n")
    assert str(tmp_path / "connwatch.yaml") + ":6:" in issue
    assert "listeners[0].heartbeat.intervall" in issue
    assert "unknown key" in issue
    assert "interval, max_interval, failure_threshold, stall_timeout" in issue


def test_negative_duration_is_reported_with_line_and_allowed_units(tmp_path: Path) -> None:
    (issue,) = issues_of(tmp_path, MINIMAL + "    heartbeat:\n      interval: -5s\n")
    assert ":6: listeners[0].heartbeat.interval = '-5s':" in issue
    assert "negative" in issue
    assert "250ms, 5s, 2m, 1h" in issue


def test_unparsable_address_is_reported_with_the_allowed_forms(tmp_path: Path) -> None:
    text = MINIMAL.replace('"0.0.0.0:7000"', "localhost")
    (issue,) = issues_of(tmp_path, text)
    assert ":3: listeners[0].listen = 'localhost':" in issue
    assert "HOST:PORT, [IPv6]:PORT, :PORT or unix:/path" in issue


def test_duplicate_listener_name_is_reported_naming_the_first_use(tmp_path: Path) -> None:
    second = '  - name: app\n    listen: ":7001"\n    upstreams: ["127.0.0.1:6380"]\n'
    (issue,) = issues_of(tmp_path, MINIMAL + second)
    assert ":5: listeners[1].name = 'app': duplicate listener name" in issue
    assert "listeners[0]" in issue


def test_duplicate_name_is_reported_with_other_errors(tmp_path: Path) -> None:
    second = '  - name: app\n    listen: ":7001"\n    upstreams: ["127.0.0.1:6380"]\n    rise: 2\n'
    issues = issues_of(tmp_path, MINIMAL + second)
    assert len(issues) == 2
    assert "duplicate listener name" in issues[0]
    assert "listeners[1].rise: unknown key" in issues[1]


def test_duplicate_listener_name_in_python_objects_fails_validation() -> None:
    listener = ListenerConfig.model_validate(yaml.safe_load(MINIMAL)["listeners"][0])
    with pytest.raises(ValidationError, match="duplicate listener name"):
        Settings(listeners=(listener, listener.model_copy(update={"listen": Address("", 1)})))


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    (issue,) = issues_of(tmp_path, "admin:\n  listen: [oops\nlog: {}\n")
    assert re.search(r"connwatch\.yaml:\d+:\d+: YAML syntax error", issue)


def test_yaml_syntax_error_shows_where_the_construct_starts(tmp_path: Path) -> None:
    (issue,) = issues_of(tmp_path, MINIMAL + "    balance: [round_robin\n")
    assert ":6:1: YAML syntax error at line 6, column 1: expected ',' or ']'" in issue
    assert "(while parsing a flow sequence that starts at line 5, column 14)" in issue


def test_yaml_syntax_error_points_at_the_offending_line(tmp_path: Path) -> None:
    (issue,) = issues_of(tmp_path, "admin:\n  listen: a: b\n")
    assert "connwatch.yaml:2:" in issue


def test_missing_file_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found") as info:
        load_settings(tmp_path / "absent.yaml", env={})
    assert info.value.source == str(tmp_path / "absent.yaml")


def test_directory_instead_of_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path, env={})


@pytest.mark.parametrize(("text", "given"), [("- a\n- b\n", "a list"), ("42\n", "42")])
def test_top_level_that_is_not_a_mapping_is_reported_with_what_was_given(
    tmp_path: Path, text: str, given: str
) -> None:
    (issue,) = issues_of(tmp_path, text)
    assert "top level must be a mapping" in issue
    assert given in issue


def test_empty_file_says_listeners_are_required(tmp_path: Path) -> None:
    (issue,) = issues_of(tmp_path, "")
    assert "listeners: required" in issue


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("    connect_attempts: true", "connect_attempts = true: expected a whole number"),
        ("    connect_attempts: 0", "connect_attempts = 0: must be at least 1"),
        ("    connect_attempts: 1.5", "connect_attempts = 1.5: expected a whole number"),
        ("    balance: random", "expected one of 'round_robin', 'least_connections' or 'first'"),
        ("    heartbeat: 5", "heartbeat = 5: expected a mapping with keys from: enabled"),
        ("    upstreams: 127.0.0.1:1", "upstreams = '127.0.0.1:1': expected a list"),
        ("    upstreams: []", "upstreams = []: needs at least 1 item"),
        ("    upstreams: [':6379']", "an upstream needs a host and a port"),
        ("    buffer_size: 1KiB", "buffer_size = '1KiB': must be at least 4KiB"),
        ("    buffer_size: 64k", "one-letter units are ambiguous"),
        ("    connect_timeout: 0s", "connect_timeout = '0s': must be more than 0s"),
        ("    idle_timeout: soon", "idle_timeout = 'soon': not a duration"),
        ("    keepalive: {client: {idle: 500ms}}", "whole seconds from 1s to 32767s"),
        ("    keepalive: {upstream: {count: 128}}", "count = 128: must be at most 127"),
        ("    health_check: {port: 70000}", "port = 70000: must be at most 65535"),
        ("    proxy_protocol: {send: v3}", "expected one of 'none', 'v1' or 'v2'"),
    ],
)
def test_each_wrong_value_gives_one_issue_saying_what_is_allowed(
    tmp_path: Path, line: str, expected: str
) -> None:
    key = line.split(":")[0]
    text = "\n".join(x for x in MINIMAL.splitlines() if not x.startswith(key + ":")) + "\n" + line
    issues = issues_of(tmp_path, text + "\n")
    assert len(issues) == 1, issues
    assert expected in issues[0]


def test_listener_name_with_uppercase_is_rejected(tmp_path: Path) -> None:
    (issue,) = issues_of(tmp_path, MINIMAL.replace("name: app", "name: App"))
    assert "listeners[0].name = 'App': use only lowercase letters" in issue


def test_every_problem_is_listed_in_line_order(tmp_path: Path) -> None:
    text = (
        "admin: {listen: nowhere}\n"
        "log: {level: loud}\n"
        "workers: 0\n" + MINIMAL + "    heartbeat: {interval: 10s, max_interval: 5s}\n"
    )
    issues = issues_of(tmp_path, text)
    assert [i.split(": ")[1].split(" ")[0] for i in issues] == [
        "admin.listen",
        "log.level",
        "workers",
        "listeners[0].heartbeat.max_interval",
    ]
    assert "must be at least interval (10s)" in issues[3]
    assert [int(i.split(":")[1]) for i in issues] == [1, 2, 3, 8]


def test_missing_required_fields_are_each_reported_at_their_parent_line(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, "listeners:\n  - name: a\n")
    assert {i.split(": ", 1)[1] for i in issues} == {
        "listeners[0].listen: required, but missing",
        "listeners[0].upstreams: required, but missing",
    }
    assert all(":2:" in i for i in issues)


def test_non_text_key_is_reported_as_must_be_text(tmp_path: Path) -> None:
    (issue,) = issues_of(tmp_path, MINIMAL + "    3: x\n")
    assert ":2: listeners[0]: the key 3 must be text" in issue


def test_duplicate_yaml_key_is_reported_with_the_first_line(tmp_path: Path) -> None:
    (issue,) = issues_of(tmp_path, "workers: 2\nworkers: 3\n" + MINIMAL)
    assert ":2: workers: duplicate key (first at line 1)" in issue


def test_duplicate_listen_address_is_reported_naming_the_other_use(tmp_path: Path) -> None:
    second = '  - name: two\n    listen: "0.0.0.0:7000"\n    upstreams: ["127.0.0.1:6380"]\n'
    (issue,) = issues_of(tmp_path, MINIMAL + second)
    assert (
        "listeners[1].listen = '0.0.0.0:7000': address already used by listeners.0.listen"
        in (issue)
        or "already used by listeners[0].listen" in issue
    )


def test_port_zero_may_repeat(tmp_path: Path) -> None:
    text = MINIMAL.replace('"0.0.0.0:7000"', '"127.0.0.1:0"')
    second = '  - name: two\n    listen: "127.0.0.1:0"\n    upstreams: ["127.0.0.1:6380"]\n'
    assert len(load_text(tmp_path, text + second).listeners) == 2


def test_admin_token_is_not_echoed_in_errors(tmp_path: Path) -> None:
    (issue,) = issues_of(tmp_path, "admin: {token: ''}\n" + MINIMAL)
    assert "admin.token = ***: must not be empty" in issue


# --- environment overrides ----------------------------------------------------------------------


def test_env_overrides_set_nested_fields_and_skip_non_override_vars(tmp_path: Path) -> None:
    env = {
        "CONNWATCH_LISTENERS__0__HEARTBEAT__INTERVAL": "1s",
        "CONNWATCH_ADMIN__LISTEN": "0.0.0.0:9464",
        "connwatch_log__level": "debug",
        "CONNWATCH_LISTENERS__0__KEEPALIVE__CLIENT__ENABLED": "false",
        "CONNWATCH_LISTENERS__0__UPSTREAMS": "[a:1, b:2]",
        "CONNWATCH_CONFIG": "/etc/elsewhere.yaml",
        "UNRELATED": "x",
    }
    cfg = load_text(tmp_path, MINIMAL, env)
    assert cfg.listeners[0].heartbeat.interval == 1.0
    assert cfg.admin.listen == Address("0.0.0.0", 9464)
    assert cfg.log.level == "debug"
    assert cfg.listeners[0].keepalive.client.enabled is False
    assert cfg.listeners[0].upstreams == (Address("a", 1), Address("b", 2))


def test_env_list_may_be_comma_separated(tmp_path: Path) -> None:
    env = {"CONNWATCH_LISTENERS__0__UPSTREAMS": "a:1, b:2"}
    assert load_text(tmp_path, MINIMAL, env).listeners[0].upstreams == (
        Address("a", 1),
        Address("b", 2),
    )


def test_env_applies_to_a_base_with_tuples() -> None:
    base = {"listeners": ({"name": "a", "listen": ":1", "upstreams": ("h:1",)},)}
    env = {"CONNWATCH_LISTENERS__0__UPSTREAMS__0": "h:2"}
    cfg = load_settings(None, env=env, base=base)
    assert cfg.listeners[0].upstreams == (Address("h", 2),)
    assert base["listeners"][0]["upstreams"] == ("h:1",)


def test_env_defaults_to_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONNWATCH_WORKERS", "3")
    assert load_settings(write(tmp_path, MINIMAL)).workers == 3


def test_env_text_fields_keep_the_raw_text(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path, MINIMAL, {"CONNWATCH_ADMIN__TOKEN": "0123", "CONNWATCH_LISTENERS__0__NAME": "007"}
    )
    assert cfg.admin.token == SecretStr("0123")
    assert cfg.listeners[0].name == "007"


def test_env_does_not_change_the_base(tmp_path: Path) -> None:
    base = one_listener_config(":7000", ["127.0.0.1:6379"])
    before = repr(base)
    cfg = load_settings(None, env={"CONNWATCH_LISTENERS__0__HEARTBEAT__INTERVAL": "2s"}, base=base)
    assert cfg.listeners[0].heartbeat.interval == 2.0
    assert repr(base) == before


def test_env_error_names_the_variable(tmp_path: Path) -> None:
    (issue,) = issues_of(tmp_path, MINIMAL, {"CONNWATCH_LISTENERS__0__HEARTBEAT__INTERVAL": "-1s"})
    assert issue.startswith("environment variable CONNWATCH_LISTENERS__0__HEARTBEAT__INTERVAL: ")
    assert "listeners[0].heartbeat.interval = '-1s'" in issue


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("CONNWATCH_LISTENERS__3__NAME", "listeners[3] does not exist: 1 configured"),
        ("CONNWATCH_LOG__LEVLE", "log has no key 'levle'; allowed: level, format"),
        ("CONNWATCH_LISTENERS__NAME", "the next part must be an index"),
        ("CONNWATCH_ADMIN__LISTEN__PORT", "admin.listen has no key 'port'"),
        ("CONNWATCH_NOPE", "the top level has no key 'nope'"),
    ],
)
def test_env_override_of_a_missing_path(tmp_path: Path, name: str, expected: str) -> None:
    (issue,) = issues_of(tmp_path, MINIMAL, {name: "1"})
    assert issue.startswith(f"environment variable {name}: no such setting: ")
    assert expected in issue


# --- workers, escapes, expected_status ----------------------------------------------------------


def test_workers_auto_means_one_per_cpu_and_other_text_is_rejected(tmp_path: Path) -> None:
    assert load_text(tmp_path, "workers: auto\n" + MINIMAL).workers == (os.cpu_count() or 1)
    cfg = load_text(tmp_path, MINIMAL, {"CONNWATCH_WORKERS": "auto"})
    assert cfg.workers == (os.cpu_count() or 1)
    (issue,) = issues_of(tmp_path, "workers: many\n" + MINIMAL)
    assert "workers = 'many'" in issue


@pytest.mark.parametrize(
    ("yaml_value", "wire"),
    [
        (r"'PING\r\n'", b"PING\r\n"),
        (r'"PING\r\n"', b"PING\r\n"),
        (r"PING\r\n", b"PING\r\n"),
        (r"'\x00\xffA\tB\\'", b"\x00\xffA\tB\\"),
        (r"'*1\r\n$4\r\nPING\r\n'", b"*1\r\n$4\r\nPING\r\n"),
        ("'héllo'", "héllo".encode()),
        ("''", b""),
    ],
)
def test_send_escapes_decode_to_the_wire_bytes(
    tmp_path: Path, yaml_value: str, wire: bytes
) -> None:
    text = MINIMAL + f"    health_check: {{send_expect: {{send: {yaml_value}}}}}\n"
    check = load_text(tmp_path, text).listeners[0].health_check.send_expect
    assert check.send_bytes == wire
    assert decode_escapes(check.send) == wire


def test_both_yaml_spellings_of_send_are_equal() -> None:
    assert SendExpectConfig(send="PING\r\n") == SendExpectConfig(send="PING\\r\\n")


@given(st.binary(max_size=64))
def test_encoded_escapes_decode_back_to_the_same_bytes(data: bytes) -> None:
    assert decode_escapes(encode_escapes(data)) == data


@pytest.mark.parametrize("bad", [r"\q", "\\", r"\x4", r"a\xZZ"])
def test_unknown_escapes_are_rejected(bad: str) -> None:
    with pytest.raises(ValidationError, match="unknown escape"):
        SendExpectConfig(send=bad)


def test_expect_matches_a_prefix_or_a_regex() -> None:
    prefix = SendExpectConfig()
    assert prefix.matches(b"+PONG\r\n")
    assert not prefix.matches(b"-ERR\r\n")
    assert not prefix.matches(b"+PON")
    assert prefix.expect_bytes == b"+PONG"
    assert prefix.expect_regex is None
    regex = SendExpectConfig(expect=r"re:^\+(PONG|OK)\r\n")
    assert regex.matches(b"+OK\r\n")
    assert not regex.matches(b"-ERR\r\n")
    assert regex.expect_bytes is None
    assert SendExpectConfig(expect="re:role:master").matches(b"# Replication\r\nrole:master\r\n")
    assert SendExpectConfig(expect=r"\x00\x01").matches(b"\x00\x01\x02")


def test_uncompilable_expect_regex_is_reported_at_its_field(tmp_path: Path) -> None:
    text = MINIMAL + "    health_check: {send_expect: {expect: 're:(unclosed'}}\n"
    (issue,) = issues_of(tmp_path, text)
    assert "listeners[0].health_check.send_expect.expect" in issue
    assert "does not compile" in issue


@pytest.mark.parametrize(
    ("spec", "ok", "not_ok"),
    [
        ("200-399", [200, 301, 399], [199, 400, 500]),
        ("200-399,404", [204, 404], [403, 405]),
        (" 200 , 500-599 ", [200, 503], [201, 404]),
        (200, [200], [201]),
    ],
)
def test_expected_status_accepts_codes_in_its_ranges_only(
    spec: str | int, ok: list[int], not_ok: list[int]
) -> None:
    check = HttpCheckConfig.model_validate({"expected_status": spec})
    assert all(check.status_ok(code) for code in ok)
    assert not any(check.status_ok(code) for code in not_ok)


@pytest.mark.parametrize("bad", ["", "2xx", "399-200", "200-", "99", "600", "200,,300", True])
def test_malformed_expected_status_is_rejected(bad: object) -> None:
    with pytest.raises(ValidationError, match="expected_status"):
        HttpCheckConfig.model_validate({"expected_status": bad})


def test_http_path_must_be_absolute() -> None:
    with pytest.raises(ValidationError, match="must start with '/'"):
        HttpCheckConfig(path="healthz")


# --- effective YAML -----------------------------------------------------------------------------

FULL = """\
admin: {listen: "[::1]:9464", token: s3cret, heartbeat_listen: "unix:/run/cw.sock"}
log: {level: warning, format: console, connection_events: false, progress_interval: 1m}
shutdown: {drain_timeout: 90s, quiet_close: false, quiet_period: 1.5s, close_rate: 12.5}
workers: 4
listeners:
  - name: redis-main
    listen: ":7000"
    upstreams: ["10.0.0.1:6379", "[fd00::2]:6379", "unix:/run/redis.sock"]
    balance: least_connections
    connect_timeout: 250ms
    connect_attempts: 4
    max_connections: 50
    idle_timeout: 1h
    half_close_timeout: 30s
    max_lifetime: 2h
    on_upstream_down: close
    buffer_size: 64KB
    proxy_protocol: {accept: true, send: v2}
    keepalive:
      client: {enabled: false, idle: 30s, interval: 5s, count: 3, user_timeout: 45s,
               path_idle_limit: 350s}
      upstream: {user_timeout: 0.25s}
    heartbeat: {enabled: false, interval: 2s, max_interval: 2s, failure_threshold: 1,
                stall_timeout: 1.5ms}
    health_check:
      type: send_expect
      port: 6380
      http: {path: /ready, scheme: https, host: example.internal, expected_status: "200,204"}
      send_expect: {send: "\\x01PING\\r\\n", expect: 're:^\\+PONG'}
  - name: second
    listen: "127.0.0.1:0"
    upstreams: ["127.0.0.1:1"]
"""


def test_effective_yaml_loads_back_to_equal_settings(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, FULL)
    text = effective_yaml(cfg, show_secrets=True)
    assert load_settings(write(tmp_path, text, "effective.yaml"), env={}) == cfg


def test_effective_yaml_masks_the_token(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, FULL)
    text = effective_yaml(cfg)
    assert "s3cret" not in text
    assert yaml.safe_load(text)["admin"]["token"] == "***"
    again = load_settings(write(tmp_path, text, "effective.yaml"), env={})
    assert again.model_copy(update={"admin": cfg.admin}) == cfg


def test_effective_yaml_fills_in_defaults_as_text(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, MINIMAL)
    data = yaml.safe_load(effective_yaml(cfg))
    assert data["admin"] == {"listen": "127.0.0.1:9464", "token": None, "heartbeat_listen": None}
    assert data["shutdown"]["quiet_period"] == "500ms"
    listener = data["listeners"][0]
    assert listener["buffer_size"] == "256KiB"
    assert listener["keepalive"]["client"]["idle"] == "1m"
    assert listener["health_check"]["send_expect"]["send"] == "PING\\r\\n"
    assert load_settings(None, env={}, base=data) == cfg


def test_one_listener_config_loads_as_listener_default_and_reports_bad_input() -> None:
    base = one_listener_config(":7000", ["127.0.0.1:6379", "127.0.0.1:6380"])
    cfg = load_settings(None, env={}, base=base)
    assert cfg.listeners[0].name == "default"
    assert cfg.listeners[0].listen == Address("", 7000)
    assert len(cfg.listeners[0].upstreams) == 2
    with pytest.raises(ConfigError, match=r"<command line>: listeners\[0\]\.listen = 'bad'"):
        load_settings(None, env={}, base=one_listener_config("bad", ["127.0.0.1:1"]))


# --- warnings -----------------------------------------------------------------------------------


def with_keepalive(tmp_path: Path, client: str) -> Settings:
    return load_text(tmp_path, MINIMAL + f"    keepalive: {{client: {client}}}\n")


def test_no_warnings_by_default(tmp_path: Path) -> None:
    assert config_warnings(load_text(tmp_path, MINIMAL)) == []


def test_path_idle_limit_not_above_idle_warns_when_keepalive_is_enabled(tmp_path: Path) -> None:
    (warning,) = config_warnings(with_keepalive(tmp_path, "{path_idle_limit: 60s}"))
    assert warning.startswith("listeners[0].keepalive.client: path_idle_limit 1m <= idle 1m")
    assert "before the first keep-alive probe" in warning
    assert config_warnings(with_keepalive(tmp_path, "{path_idle_limit: 350s}")) == []
    disabled = with_keepalive(tmp_path, "{enabled: false, path_idle_limit: 30s}")
    assert config_warnings(disabled) == []


def test_user_timeout_shorter_than_the_probes_warns_of_fewer_probes(tmp_path: Path) -> None:
    (warning,) = config_warnings(with_keepalive(tmp_path, "{user_timeout: 80s}"))
    assert "user_timeout 80s < idle + interval x count (110s)" in warning
    assert "after 2 of 5 probes (80s)" in warning


def test_user_timeout_longer_than_the_probes_warns_it_replaces_count(tmp_path: Path) -> None:
    (warning,) = config_warnings(with_keepalive(tmp_path, "{user_timeout: 10m}"))
    assert "replaces count" in warning
    assert "after 54 probes (10m)" in warning


def test_user_timeout_matching_the_probes_is_fine(tmp_path: Path) -> None:
    # Linux gives up at the first probe time >= user_timeout: 101s..110s all mean 5 probes.
    for value in ("101s", "110s"):
        assert config_warnings(with_keepalive(tmp_path, f"{{user_timeout: {value}}}")) == []


# --- nothing but ConfigError, whatever the input ------------------------------------------------

KEYS = st.sampled_from(
    [
        "admin",
        "log",
        "shutdown",
        "workers",
        "listeners",
        "name",
        "listen",
        "upstreams",
        "heartbeat",
        "health_check",
        "keepalive",
        "client",
        "interval",
        "max_interval",
        "token",
        "send_expect",
        "send",
        "expect",
        "expected_status",
        "http",
        "buffer_size",
        "port",
        "x",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["5s", "-1s", "1k", "auto", ":7000", "127.0.0.1:1", "re:(", "\\q", "app"])
)
DATA = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=25,
)


def check_outcome(load: Any) -> None:
    """Loading gives a Settings or a ConfigError with issues, never the catch-all report."""
    issues = ["(loaded)"]
    try:
        load()
    except ConfigError as exc:
        issues = exc.issues
    assert issues
    assert not any("cannot load the configuration" in issue for issue in issues), issues


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.dictionaries(KEYS, DATA, max_size=6) | DATA)
def test_random_structures_give_config_error_or_settings(tmp_path: Path, data: Any) -> None:
    path = write(tmp_path, yaml.safe_dump(data))
    check_outcome(lambda: load_settings(path, env={}))
    if isinstance(data, dict):
        check_outcome(lambda: load_settings(None, env={}, base=data))


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_random_text_gives_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "random.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    check_outcome(lambda: load_settings(path, env={}))


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    names=st.lists(
        st.lists(KEYS | st.sampled_from(["0", "1", "", "LISTENERS"]), min_size=1, max_size=5),
        max_size=3,
    ),
    value=st.text(max_size=10),
)
def test_random_env_gives_config_error_or_settings(
    tmp_path: Path, names: list[list[str]], value: str
) -> None:
    path = write(tmp_path, MINIMAL)
    env = {"CONNWATCH_" + "__".join(parts).upper(): value for parts in names}
    check_outcome(lambda: load_settings(path, env=env))


ODD_YAML = {
    "recursive alias": "a: &a [*a]\n",
    "recursive listeners": "listeners: &a [*a]\n",
    "bad date": "x: 2024-02-30\n",
    "huge int": "workers: 99999999999999999999999999999999999999999999999\n",
    "int beyond str limit": "workers: " + "9" * 5000 + "\n",
    "bad binary": "a: !!binary '???'\n",
    "unhashable key": "? [a]\n: b\n",
    "two documents": "---\na: 1\n---\nb: 2\n",
    "merge key": "<<: {workers: 2}\n" + MINIMAL,
    "deep nesting": "[" * 5000,
    "control characters": "\x00\x01",
    "int key": "listeners: [{name: a, listen: ':1', upstreams: ['h:1'], 3: x}]\n",
    "alias bomb": "a0: &a0 [1, 2]\n"
    + "".join(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, 30)),
}


@pytest.mark.parametrize("text", list(ODD_YAML.values()), ids=list(ODD_YAML))
def test_odd_yaml_gives_config_error_or_settings(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    check_outcome(lambda: load_settings(path, env={}))
