"""Ports and addresses are checked before anything starts, in all three processes: an out-of-range port or
an address in use is one line naming the setting, its value and what to do; non-zero exit, no traceback."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.istiod.app import main as istiod_main
from services.node_agent import app as node_agent_app
from services.node_agent.app import main as node_agent_main
from services.ztunnel.app import main as ztunnel_main
from shared.errors import start_failure
from shared.settings import SettingError, check_listen

ZTUNNEL_FREE = {"ADMIN_ADDR": "127.0.0.1:0", "STATS_ADDR": "127.0.0.1:0", "READINESS_ADDR": "127.0.0.1:0"}

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z\t(trace|debug|info|warn|error)\t")


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something listens on, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def run(
    main: Callable[[list[str]], object], argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert isinstance(code, int) and code != 0
    assert "Traceback" not in err, err
    # the process's own log lines (the ones it writes while starting) are not the error report
    report = [line for line in err.strip().splitlines() if not LOG_LINE.match(line)]
    assert len(report) == 1, err
    return code, report[0]


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"ADMIN_ADDR": "127.0.0.1:70000"}, "ADMIN_ADDR='127.0.0.1:70000' is not host:port: port 70000 is"),
        ({"STATS_ADDR": ":99999"}, "STATS_ADDR=':99999' is not host:port: port 99999 is out of range"),
        ({"READINESS_ADDR": "[::]:65536"}, "READINESS_ADDR='[::]:65536' is not host:port: port 65536"),
        ({"XDS_ADDRESS": "http://127.0.0.1:99999"}, "XDS_ADDRESS='http://127.0.0.1:99999' is not"),
        ({"XDS_ADDRESS": "http://127.0.0.1:0"}, "XDS_ADDRESS='http://127.0.0.1:0' has port 0"),
        (
            {"XDS_ADDRESS": "http://127.0.0.1:15012", "CA_ADDRESS": "http://127.0.0.1:99999"},
            "CA_ADDRESS='http://127.0.0.1:99999' is not [https://]HOST:PORT: port 99999 is out of range",
        ),
    ],
)
def test_ztunnel_refuses_out_of_range_ports(
    env: dict[str, str], needle: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in {**ZTUNNEL_FREE, **env}.items():
        monkeypatch.setenv(name, value)
    code, err = run(ztunnel_main, [], capsys)
    assert code == 2 and needle in err and "use" in err


@pytest.mark.parametrize("setting", ["ADMIN_ADDR", "STATS_ADDR", "READINESS_ADDR"])
def test_ztunnel_refuses_an_address_in_use(
    setting: str, taken_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in {**ZTUNNEL_FREE, setting: f"127.0.0.1:{taken_port}"}.items():
        monkeypatch.setenv(name, value)
    code, err = run(ztunnel_main, [], capsys)
    assert code == 2
    assert f"{setting}='127.0.0.1:{taken_port}': the address is already in use; stop what listens" in err


def test_node_agent_refuses_a_bad_or_taken_health_address(
    taken_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--node-name", "n1"]
    _, err = run(node_agent_main, [*argv, "--health-addr", "127.0.0.1:99999"], capsys)
    assert "--health-addr='127.0.0.1:99999' is not host:port: port 99999 is out of range; use" in err
    monkeypatch.setenv("HEALTH_ADDR", f"127.0.0.1:{taken_port}")
    _, err = run(node_agent_main, argv, capsys)
    assert f"HEALTH_ADDR='127.0.0.1:{taken_port}': the address is already in use" in err
    _, err = run(node_agent_main, [*argv, f"--health-addr=127.0.0.1:{taken_port}"], capsys)
    assert f"--health-addr='127.0.0.1:{taken_port}': the address is already in use" in err


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--control-plane", "127.0.0.1:99999"], {}, "--control-plane='127.0.0.1:99999' is not [https://]HOST:PORT"),
        ([], {"CONTROL_PLANE_ADDRESS": "http://x:0"}, "CONTROL_PLANE_ADDRESS='http://x:0' has port 0"),
    ],
)
def test_node_agent_refuses_a_bad_control_plane_port(
    argv: list[str], env: dict[str, str], needle: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _, err = run(node_agent_main, ["--node-name", "n1", "--health-addr", "", *argv], capsys)
    assert needle in err and "use" in err


def test_istiod_refuses_a_bad_or_taken_listen_address(
    taken_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, err = run(istiod_main, ["--listen", "127.0.0.1:99999"], capsys)
    assert "--listen='127.0.0.1:99999' is not host:port: port 99999 is out of range; use" in err
    _, err = run(istiod_main, ["--listen", f"127.0.0.1:{taken_port}", "--plaintext"], capsys)
    assert f"--listen='127.0.0.1:{taken_port}': the address is already in use" in err
    monkeypatch.setenv("ISTIOD_LISTEN", f"127.0.0.1:{taken_port}")
    _, err = run(istiod_main, [], capsys)
    assert f"ISTIOD_LISTEN='127.0.0.1:{taken_port}': the address is already in use" in err


def test_check_listen_names_what_is_wrong() -> None:
    with pytest.raises(SettingError, match=r"X='192\.0\.2\.1:80': not an address of this host"):
        check_listen("X", "192.0.2.1", 80)
    check_listen("X", "127.0.0.1", 0)  # a free port: fine, and nothing stays bound


def test_a_failure_while_starting_is_one_line_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the start-up checks cannot see (here: the ZDS socket path is a directory) fails inside the event
    loop, wrapped in exception groups; it is still one line, without a traceback."""
    monkeypatch.setattr(node_agent_app, "startup_check", lambda config: None)
    (tmp_path / "zds.sock").mkdir()
    argv = ["--node-name", "n1", "--health-addr", "", "--ztunnel-uds-address", str(tmp_path / "zds.sock"),
            "--cni-socket", str(tmp_path / "cni.sock")]  # fmt: skip
    code, err = run(node_agent_main, argv, capsys)
    assert code == 1 and err.startswith("node-agent: error: cannot start: ")
    assert "zds.sock exists and is a directory; remove it or choose another socket path" in err


def test_start_failure_finds_the_one_operator_error_in_nested_groups() -> None:
    bind = OSError(98, "address in use")
    assert start_failure(BaseExceptionGroup("outer", [BaseExceptionGroup("inner", [bind])])) is bind
    assert start_failure(ExceptionGroup("mixed", [bind, KeyError("bug")])) is None  # a bug: traceback
    assert start_failure(KeyError("bug")) is None
