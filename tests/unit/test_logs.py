"""Every process logs in one dialect: the node agent's and istiod's `main()` install the shared formatter, so
a log call with structured fields comes out as upstream's plain line, or as JSON with LOG_FORMAT=json."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from services.istiod import app as istiod_app
from services.istiod.store import WorldStore
from services.istiod.world import World
from services.node_agent import app as node_agent_app
from services.node_agent.lifecycle import LogStatusReporter
from services.node_agent.model import Pod
from shared.zds.types import PodUid
from tests.access_logs import parse_plain

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
REAL_RUN = trio.run


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """`main()` replaces the root logger's handlers and level: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    saved = (logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing = saved


def _run_instead(monkeypatch: pytest.MonkeyPatch, body: Callable[[], Any]) -> None:
    """Make the process's `trio.run(...)` run `body` (a real code path that logs) instead of the process."""

    def fake_run(*_args: object) -> None:
        REAL_RUN(body)

    monkeypatch.setattr(trio, "run", fake_run)


def _the_line(stderr: str, *, json_format: bool) -> dict[str, Any]:
    """The one line the test logged; the process's start-up line about its open-files limit comes first."""
    first, line = stderr.splitlines()
    assert "open files limit" in first, first
    if json_format:
        obj: dict[str, Any] = json.loads(line)
        assert TS.match(obj.pop("time")), line
        return obj
    parsed = parse_plain(line)
    assert TS.match(parsed.timestamp), line
    assert line.count("\t") == 4, line  # timestamp, level, target, message, fields
    return {"level": parsed.level, "scope": parsed.target, "message": parsed.message, **parsed.fields}


@pytest.mark.parametrize(
    ("env", "argv", "json_format"),
    [("plain", [], False), ("json", [], True), ("plain", ["--log-format", "json"], True)],
)
def test_node_agent_main_logs_structured_fields(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: str, argv: list[str],
    json_format: bool,
) -> None:
    monkeypatch.setenv("LOG_FORMAT", env)
    monkeypatch.setattr(node_agent_app, "startup_check", lambda config: None)
    pod = Pod(uid=PodUid("uid-1"), name="web", namespace="shop")
    _run_instead(monkeypatch, lambda: LogStatusReporter().report(pod, "enabled"))
    assert node_agent_app.main(["--node-name", "n1", *argv]) == 0
    line = capsys.readouterr().err
    assert _the_line(line, json_format=json_format) == {
        "level": "info", "scope": "node_agent::lifecycle", "message": "pod redirection status",
        "namespace": "shop", "name": "web", "status": "enabled",
    }, line
    if not json_format:
        assert line.endswith('\tpod redirection status\tnamespace="shop" name="web" status="enabled"\n'), line


def test_node_agent_rejects_an_unknown_log_format(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LOG_FORMAT", "yaml")
    assert node_agent_app.main(["--node-name", "n1"]) == 2
    assert "LOG_FORMAT='yaml' must be plain or json" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "argv", "json_format"),
    [("plain", [], False), ("json", [], True), ("plain", ["--log-format", "json"], True)],
)
def test_istiod_main_logs_structured_fields(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, env: str,
    argv: list[str], json_format: bool,
) -> None:
    monkeypatch.setenv("LOG_FORMAT", env)

    async def change_world() -> None:
        WorldStore(World()).apply(World(), "test.yaml")

    _run_instead(monkeypatch, change_world)
    istiod_app.main(["--state-dir", str(tmp_path), *argv])
    line = capsys.readouterr().err
    assert _the_line(line, json_format=json_format) == {
        "level": "info", "scope": "services::istiod::store", "message": "world changed",
        "generation": 2, "change": "applied", "source": "test.yaml",
    }, line
    if not json_format:
        assert line.endswith("\tworld changed\tgeneration=2 change=applied source=\"test.yaml\"\n"), line
