"""Configuration: precedence of file, environment and flags; precise errors; no half start."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from mailgate.core.config import ListenAddress, load_config, parse_listen
from mailgate.core.errors import ConfigError

from conftest import MAILGATE, Gateway, free_port

BAD_CONFIG = """\
hostname: mx.example.test
smtp_listen:
  - 127.0.0.1:2525
  - "localhost"
max_message_size: 10Q
max_recipients: -4
local_domains: [example.test, "bad domain"]
tls_cert: /nonexistent.crt
colour: blue
"""


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.yaml"
    path.write_text("max_recipients: 10\nmax_connections: 7\nhostname: file.example\n")
    config = load_config(
        path,
        environ={"MAILGATE_MAX_RECIPIENTS": "20", "MAILGATE_HOSTNAME": "env.example"},
        overrides={"hostname": "flag.example"},
    )
    assert config.max_connections == 7
    assert config.max_recipients == 20
    assert config.hostname == "flag.example"


def test_defaults() -> None:
    config = load_config(None, environ={})
    assert config.data_dir == Path("var")
    assert config.smtp_listen == [ListenAddress("127.0.0.1", 2525)]
    assert config.submission_listen == [ListenAddress("127.0.0.1", 2587)]
    assert config.smtps_listen == [ListenAddress("127.0.0.1", 2465)]
    assert not config.open_relay and not config.vrfy


def test_listen_forms() -> None:
    assert parse_listen("[::1]:25") == ListenAddress("::1", 25)
    assert parse_listen("0.0.0.0:25") == ListenAddress("0.0.0.0", 25)
    assert parse_listen("unix:/run/mailgate/smtp.sock") == ListenAddress(
        path="/run/mailgate/smtp.sock"
    )
    config = load_config(None, environ={"MAILGATE_SMTP_LISTEN": "127.0.0.1:25, [::1]:25"})
    assert [str(a) for a in config.smtp_listen] == ["127.0.0.1:25", "[::1]:25"]
    for bad in ("::1:25", "host", "host:99999", "unix:relative", "[nothing]:25"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_every_error_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_CONFIG)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    problems = "\n".join(info.value.problems)
    assert f"{path}:4: smtp_listen[1]: expected host:port" in problems
    assert f"{path}:5: max_message_size:" in problems
    assert f"{path}:6: max_recipients:" in problems
    assert f"{path}:7: local_domains[1]:" in problems and "'bad domain'" in problems
    assert f"{path}:9: colour: unknown setting" in problems


def test_environment_and_flag_errors_name_their_source() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            environ={"MAILGATE_MAX_RECIPIENTS": "lots", "MAILGATE_NO_SUCH": "1"},
            overrides={"smtp_listen": "nowhere"},
        )
    problems = info.value.problems
    assert any(p.startswith("$MAILGATE_MAX_RECIPIENTS:") for p in problems)
    assert "$MAILGATE_NO_SUCH: unknown setting (see docs/configuration.md)" in problems
    assert any(p.startswith("--smtp-listen:") for p in problems)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("hostname: a\nsmtp_listen: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.problems[0].startswith(f"{path}:3: invalid YAML")


def test_config_check_command(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_CONFIG)
    result = subprocess.run([MAILGATE, "config", "check", str(bad)], capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{bad}:6: max_recipients:" in result.stderr
    assert "problems found" in result.stderr
    assert "Traceback" not in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text(
        "hostname: mx.example.test\nlocal_domains: [example.test]\nmax_message_size: 10M\n"
    )
    result = subprocess.run(
        [MAILGATE, "config", "check", "-v", str(good)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "max_message_size: 10485760" in result.stdout


def test_bad_config_never_starts_a_server(fresh_gateway: Gateway, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_CONFIG)
    result = subprocess.run(
        [MAILGATE, "serve", "--config", str(bad)],
        env=fresh_gateway.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"{bad}:6: max_recipients:" in result.stderr
    with (
        pytest.raises(OSError),
        socket.create_connection(("127.0.0.1", fresh_gateway.smtp_port), 1),
    ):
        pass


def test_port_in_use_stops_the_start_and_releases_other_ports(fresh_gateway: Gateway) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", fresh_gateway.smtps_port))
        blocker.listen()
        result = subprocess.run(
            [MAILGATE, "serve"], env=fresh_gateway.env, capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 1
    assert f"smtps_listen: cannot listen on 127.0.0.1:{fresh_gateway.smtps_port}" in result.stderr
    # Nothing stays half-bound: the MX port is free again.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", fresh_gateway.smtp_port))


def test_self_signed_certificate_created_and_logged(fresh_gateway: Gateway) -> None:
    fresh_gateway.start()
    assert (fresh_gateway.data_dir / "tls" / "selfsigned.crt").is_file()
    assert "created a self-signed certificate" in fresh_gateway.log()
    fresh_gateway.stop()
    fresh_gateway.start()
    assert fresh_gateway.log().count("created a self-signed certificate") == 1


def test_unix_and_ipv6_listeners(fresh_gateway: Gateway, tmp_path: Path) -> None:
    sock_path = tmp_path / "smtp.sock"
    port = free_port()
    fresh_gateway.env["MAILGATE_SMTP_LISTEN"] = f"unix:{sock_path}, [::1]:{port}"
    fresh_gateway.start()
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(sock_path))
        assert client.recv(100).startswith(b"220 ")
    with socket.create_connection(("::1", port), 5) as client:
        assert client.recv(100).startswith(b"220 ")


def test_relay_networks_cannot_open_the_relay_by_accident() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"MAILGATE_RELAY_NETWORKS": "192.0.2.0/24, 0.0.0.0/0"})
    assert "open relay" in info.value.problems[0]
    config = load_config(
        None, environ={"MAILGATE_RELAY_NETWORKS": "::/0", "MAILGATE_OPEN_RELAY": "true"}
    )
    assert config.open_relay


def test_a_daemon_socket_path_too_long_for_unix_sockets_is_a_config_error(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 40)
    env = {"MAILGATE_DATA_DIR": str(deep), "MAILGATE_MILTERS": "spamassassin=daemon"}
    with pytest.raises(ConfigError) as caught:
        load_config(environ=env)
    assert any(
        "milters: spamassassin: its socket" in problem and "longer than a Unix socket" in problem
        for problem in caught.value.problems
    ), caught.value.problems
    # A milter with its own socket, or a short data directory, is fine.
    env["MAILGATE_MILTERS"] = "spamassassin=inet:127.0.0.1:10030"
    assert load_config(environ=env).milters[0].socket == "inet:127.0.0.1:10030"
    env.update(MAILGATE_DATA_DIR=str(tmp_path / "v"), MAILGATE_MILTERS="spamassassin=daemon")
    assert load_config(environ=env).milters[0].daemon == "spamassassin"
