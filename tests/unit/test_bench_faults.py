"""The pure parts of the bench's load and fault scenarios: how outcomes become figures, the pcap count, the
table rows and the command-line settings."""

from __future__ import annotations

import struct

import pytest

from ambient.bench import run
from ambient.bench.faults import outage_after, pcap_packets, share_ok, transfer_failed
from ambient.bench.report import ArmResult, BenchReport, Machine, ScenarioResult, finish_scenario, markdown

MACHINE = Machine(cpu_model="Test CPU", vcpus=2, memory_gib=4.0, kernel="6.1", python="3.11.7")


def _pcap(records: list[bytes], order: str = "<") -> bytes:
    head = struct.pack(order + "IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)
    body = b"".join(struct.pack(order + "IIII", 0, 0, len(r), len(r)) + r for r in records)
    return head + body


def _row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {label}"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.mark.parametrize("order", ["<", ">"])
def test_pcap_packets_counts_records_in_either_byte_order(order: str) -> None:
    data = _pcap([b"a" * 60, b"b" * 1500, b"c"], order)
    assert pcap_packets(data) == 3
    assert pcap_packets(data[:-1]) == 2  # a record cut off by a killed tcpdump is not counted
    assert pcap_packets(b"") == 0


def test_outage_is_from_the_event_to_the_first_success_after_the_last_failure() -> None:
    attempts = [(9.0, "ok"), (10.1, "ok"), (10.2, "error"), (10.3, "ok"), (10.4, "reset"), (10.5, "ok")]
    assert outage_after(attempts, 10.0) == pytest.approx(0.5)
    assert outage_after([(9.0, "error"), (10.5, "ok")], 10.0) == 0.0  # failures before the event: none
    assert outage_after([(10.1, "ok"), (10.2, "timeout")], 10.0) is None  # never back


def test_share_ok_counts_only_results_after_the_event() -> None:
    assert share_ok([(1.0, "error"), (2.0, "ok"), (3.0, "reset"), (4.0, "ok")], 2.0) == (2, 3)


def test_only_a_reset_or_an_error_counts_as_a_failed_transfer() -> None:
    assert transfer_failed("reset") and transfer_failed("error")
    for outcome in ("complete", "eof", "timeout"):  # eof: a truncated download that looks complete
        assert not transfer_failed(outcome)


def _mesh(name: str, run_: dict[str, float]) -> ScenarioResult:
    return finish_scenario(
        ScenarioResult(
            name=name, title=name, method=f"how {name}", mesh_only=True, arms={"mesh": ArmResult(runs=[run_])}
        )
    )


def test_fault_and_load_rows_in_the_table() -> None:
    kill = finish_scenario(
        ScenarioResult(
            name="fault_kill",
            title="kill",
            method="how kill",
            arms={
                "baseline": ArmResult(runs=[{"marker_seen": 1.0, "packets": 900.0}]),
                "mesh": ArmResult(runs=[{"marker_seen": 0.0, "packets": 4000.0, "transfer_failed": 1.0,
                                         "client_reset": 0.0}]),
            },
        )
    )  # fmt: skip
    conns = _mesh(
        "conns", {"conns": 10000.0, "held": 10000.0, "all_echoed": 1.0, "client_kib_per_conn": 12.34}
    )
    churn = _mesh(
        "churn", {"conns": 50000.0, "errors": 3.0, "client_fd_growth": 2.0, "server_fd_growth": 40.0}
    )
    istiod = _mesh("fault_istiod", {"down_s": 60.2, "new_ok_pct": 100.0, "kept_ok_pct": 95.0})
    report = BenchReport(
        command="ambient bench --only conns,churn,faults", started="t0", machine=MACHINE,
        scenarios=[conns, churn, kill, istiod],
    )  # fmt: skip
    table = markdown(report)
    seen = _row(table, "kill -9: payload marker in the capture")
    assert seen[1:3] == ["yes", "no"] and seen[7] == "no (met)"  # the control shows plaintext, the mesh none
    failed = _row(table, "kill -9 of the server-side ztunnel")
    assert failed[1:3] == ["-", "yes"] and failed[7] == "yes (met)"
    reset = _row(table, "kill -9: the client got a reset")
    assert reset[2] == "no" and reset[7] == "yes (**not met**)"
    echoed = _row(table, "idle connections held at once, every one echoed [10,000 connections]")
    assert echoed[1:3] == ["-", "yes"]
    assert _row(table, "client-side ztunnel, RSS per held connection (KiB)")[2] == "12.3"
    assert _row(table, "short connections failed [50,000 connections]")[7] == "0 (**not met**)"
    assert _row(table, "server-side ztunnel, fds after - before")[7] == "<= 10 (noise) (**not met**)"
    assert _row(table, "client-side ztunnel, fds after - before")[7] == "<= 10 (noise) (met)"
    assert _row(table, "istiod down: new connections that worked (%) [60 s down]")[7] == "100% (met)"
    assert _row(table, "istiod down: echoes on an existing connection")[7] == "100% (**not met**)"
    for scenario in ("how conns", "how churn", "how kill", "how fault_istiod"):
        assert f": {scenario}" in table  # "How each figure is measured"


def test_yes_no_over_repetitions_says_how_many() -> None:
    agent = finish_scenario(
        ScenarioResult(
            name="fault_agent", title="a", method="m", mesh_only=True,
            arms={"mesh": ArmResult(runs=[{"add_failed": 1.0}, {"add_failed": 1.0}, {"add_failed": 0.0}])},
        )
    )  # fmt: skip
    table = markdown(BenchReport(command="c", started="t", machine=MACHINE, scenarios=[agent]))
    assert _row(table, "node agent down: the CNI ADD")[2] == "yes (2 of 3)"


def test_new_scenarios_run_last_in_order() -> None:
    assert run.SCENARIOS[-3:] == ("conns", "churn", "faults")
    assert run.parse_scenarios("faults,conns,churn") == ("conns", "churn", "faults")
