"""The lab's command line without a lab: help texts, refusals, piped output that never wraps, and the
demo's choice of the refused-connection lines."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from ambient.cli import build_parser
from ambient.cli import main as ambient_main
from ambient.lab import demo, lab
from ambient.lab.tables import status_tables
from ambient.output import make_console, section


def subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("command", ["up", "down", "status", "exec", "delete", "world", "kubectl", "restart"])
def test_every_lab_command_describes_itself_and_its_arguments(command: str) -> None:
    parser = subparser(build_parser(), "lab", command)
    assert parser.description and len(parser.description) > 40
    for action in parser._actions:
        if action.dest not in ("help", "prefix"):
            assert action.help, f"lab {command}: {action.dest} has no help"


def test_lab_help_stands_alone() -> None:
    text = subparser(build_parser(), "lab").format_help()
    assert "§" not in text and "DESIGN" not in text and "ambient/lab/README.md" in text


def test_lab_world_pod_add_is_refused_with_how_to_start_a_pod(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        ambient_main(["lab", "world", "--prefix", "nolab", "--", "pod", "add", "sleep/extra", "--node", "b"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "`lab world -- pod add` is refused" in err and "ambient lab up --world FILE" in err


def test_piped_output_keeps_every_line_whole(capsys: pytest.CaptureFixture[str]) -> None:
    console = make_console()  # capsys: stdout is not a terminal
    rule = "-A ISTIO_PRERT -p tcp -m mark ! --mark 0x539/0xfff -m tcp --dport 15008 -j TPROXY " * 3
    console.print(rule)
    log = "/run/ambient-lab/amb/logs/" + "x" * 120 + ".log"
    data = {
        "prefix": "amb", "phase": "up", "nodes": [], "services": [],
        "pods": [{"namespace": "bookinfo", "name": "productpage-v1-6f9c7d" * 3, "node": "node-a",
                  "ip": "10.244.1.10", "app": "productpage", "enrolment": "enabled"}],
        "components": [{"name": "ztunnel/node-a", "component": "ztunnel", "pid": 1, "running": True,
                        "log": log}],
    }  # fmt: skip
    for table in status_tables(data):
        console.print(table)
    section(console, "4. the in-pod rules")
    out = capsys.readouterr().out
    assert sum(rule.strip() in line for line in out.splitlines()) == 1
    assert any(log in line for line in out.splitlines())
    assert any("productpage-v1-6f9c7d" * 3 in line for line in out.splitlines())
    assert max(len(line) for line in out.splitlines() if "in-pod rules" in line) == 80


def test_demo_shows_the_newest_refused_line_of_each_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two nodes' logs interleave (node-a's lines come first): new lines are found by content, not by
    counting, and both directions' lines are shown."""
    old = ['t0 access connection complete src.workload="sleep" direction="outbound"']
    out_line = 't2 access connection complete src.workload="sleep" direction="outbound" error="status: 401"'
    in_line = 't3 access connection complete src.workload="sleep" direction="inbound" error="rejection"'
    logs = {"node-a": [*old, out_line], "node-b": [in_line]}

    def access_logs(*, prefix: str, direction: str | None = None, node: str | None = None) -> Iterator[str]:
        for lines in logs.values():
            yield from (line for line in lines if direction is None or f'direction="{direction}"' in line)

    monkeypatch.setattr(lab, "access_logs", access_logs)
    assert demo.refused_lines("p", set(old), wait=0) == [out_line, in_line]
