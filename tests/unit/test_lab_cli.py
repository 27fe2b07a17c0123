"""The lab's command line without a lab: help texts, refusals, piped output that never wraps, and the
demo's choice of the refused-connection lines."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from ambient.cli import build_parser
from ambient.cli import main as ambient_main
from ambient.lab import demo, lab
from ambient.lab.tables import status_tables, verify_failed, verify_table
from ambient.output import make_console, section


def subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize(
    "command", ["up", "down", "status", "exec", "delete", "world", "kubectl", "restart", "verify"]
)
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


def test_demo_shows_the_newest_denied_waypoint_line_from_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """New lines are found by content, not by counting: an old 403 and other clients' lines are skipped."""
    sleep, other_sa = "spiffe://cluster.local/ns/sleep/sa/sleep", "spiffe://cluster.local/ns/bookinfo/sa/x"
    old = [f't0 access request complete src.identity="{sleep}" response_code=403']
    other = f't1 access request complete src.identity="{other_sa}" response_code=403'
    ok = f't2 access request complete src.identity="{sleep}" response_code=200'
    denied = f't3 access request complete src.identity="{sleep}" response_code=403'

    def waypoint_logs(*, prefix: str) -> Iterator[str]:
        yield from [*old, other, ok, denied]

    monkeypatch.setattr(lab, "waypoint_logs", waypoint_logs)
    assert demo.denied_line("p", set(old), wait=0) == denied
    assert demo.denied_line("p", {*old, denied}, wait=0) is None


def verified(result: str, **extra: object) -> dict[str, object]:
    return {"namespace": "mesh", "name": "web", "uid": "u", "checks": ["rules", "listeners"],
            "drift": [], "repairs": [], "remaining": [], "result": result, **extra}  # fmt: skip


def test_lab_verify_fails_only_for_a_pod_still_broken_or_an_agent_not_answering(
    capsys: pytest.CaptureFixture[str],
) -> None:
    repaired = verified("repaired", drift=["15001/tcp: nothing listening"],
                        repairs=["pod re-sent to ztunnel: ztunnel acked"])  # fmt: skip
    assert not verify_failed([{"node": "node-a", "error": None, "pods": [verified("ok"), repaired]}])
    broken = verified("broken", drift=["x"], remaining=["x"])
    assert verify_failed([{"node": "node-a", "error": None, "pods": [verified("ok"), broken]}])
    assert verify_failed([{"node": "node-b", "error": "the node agent on node-b did not answer", "pods": []}])
    make_console().print(verify_table([{"node": "node-a", "error": None, "pods": [repaired, broken]}]))
    out = capsys.readouterr().out
    assert "pod re-sent to ztunnel: ztunnel acked" in out and "still: x" in out and "repaired" in out
