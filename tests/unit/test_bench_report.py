"""ambient bench's pure parts: statistics, targets, the Markdown table, the world, percentiles."""

from __future__ import annotations

import argparse

import msgspec
import pytest

from ambient.bench import cli as bench_cli
from ambient.bench import run
from ambient.bench.loadgen import percentiles
from ambient.bench.report import (
    ArmResult,
    BenchReport,
    Machine,
    ScenarioResult,
    finish_scenario,
    markdown,
    markdown_table,
    summarize,
)
from ambient.bench.run import SCENARIOS, parse_scenarios
from ambient.bench.world import ARMS, NAMESPACES, arm_pods, arms, bench_world, enrol_pod_ip, pod_blocks
from ambient.lab.topology import plan_lab
from services.istiod.world import validate

MACHINE = Machine(cpu_model="Test CPU", vcpus=2, memory_gib=4.0, kernel="6.1", python="3.11.7")


def _report(*scenarios: ScenarioResult) -> BenchReport:
    return BenchReport(command="ambient bench", started="t0", machine=MACHINE, scenarios=list(scenarios))


def test_summarize_median_and_spread_per_metric() -> None:
    stats = summarize([{"a": 3.0, "b": 1.0}, {"a": 1.0}, {"a": 2.0, "b": 5.0}])
    assert (stats["a"].median, stats["a"].low, stats["a"].high, stats["a"].n) == (2.0, 1.0, 3.0, 3)
    assert (stats["b"].median, stats["b"].n) == (3.0, 2)


def test_finish_scenario_adds_mesh_minus_baseline_medians() -> None:
    scenario = ScenarioResult(
        name="rr",
        title="rr",
        method="m",
        arms={
            "baseline": ArmResult(runs=[{"p50_ms": 0.1}, {"p50_ms": 0.3}]),
            "mesh": ArmResult(runs=[{"p50_ms": 0.5}, {"p50_ms": 0.7}]),
        },
    )
    finish_scenario(scenario)
    assert scenario.added["p50_ms"] == pytest.approx(0.4)


def test_mesh_only_scenario_has_no_added_and_a_dash_for_no_mesh() -> None:
    zt = finish_scenario(
        ScenarioResult(
            name="ztunnel",
            title="zt",
            method="m",
            mesh_only=True,
            arms={"mesh": ArmResult(runs=[{"client_vcpu_per_1k": 0.1}])},
        )
    )
    assert zt.added == {}
    row = next(
        line for line in markdown_table(_report(zt)).splitlines() if "client-side ztunnel, vCPU" in line
    )
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "-"
    assert cells[2] == "0.100"
    assert cells[4] == cells[5] == ""  # no upstream arm in this run
    assert cells[7] == "<= 0.15 (met)"


def test_table_marks_targets_not_met_and_shows_ratio() -> None:
    bulk = finish_scenario(
        ScenarioResult(
            name="bulk_1",
            title="bulk",
            method="m",
            arms={"baseline": ArmResult(runs=[{"mb_s": 1000.0}]), "mesh": ArmResult(runs=[{"mb_s": 250.0}])},
        )
    )
    table = markdown_table(_report(bulk))
    assert _cells(table, "bulk throughput, 1 stream") == [
        "bulk throughput, 1 stream (MB/s)", "1,000", "250", "25% of no mesh", "", "", "",
        ">= 300 MB/s (**not met**)"]  # fmt: skip


def _cells(table: str, label: str) -> list[str]:
    row = next(line for line in table.splitlines() if line.startswith(f"| {label}"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_upstream_arm_gets_its_column_and_the_relative_targets() -> None:
    bulk = finish_scenario(ScenarioResult(name="bulk_1", title="bulk", method="m", arms={
        "baseline": ArmResult(runs=[{"mb_s": 2000.0}]), "mesh": ArmResult(runs=[{"mb_s": 400.0}]),
        "upstream": ArmResult(runs=[{"mb_s": 1000.0}, {"mb_s": 800.0}])}))  # fmt: skip
    rr = finish_scenario(ScenarioResult(name="rr", title="rr", method="m", arms={
        "baseline": ArmResult(runs=[{"p50_ms": 0.1}]), "mesh": ArmResult(runs=[{"p50_ms": 0.4}]),
        "upstream": ArmResult(runs=[{"p50_ms": 0.3}])}))  # fmt: skip
    zt = finish_scenario(ScenarioResult(name="ztunnel", title="z", method="m", mesh_only=True, arms={
        "mesh": ArmResult(runs=[{"client_vcpu_per_1k": 0.24}]),
        "upstream": ArmResult(runs=[{"client_vcpu_per_1k": 0.06}])}))  # fmt: skip
    assert rr.added_upstream["p50_ms"] == pytest.approx(0.2)
    table = markdown_table(_report(bulk, rr, zt))
    cells = _cells(table, "bulk throughput, 1 stream")
    assert cells[4] == "900 (800-1,000)"
    assert cells[5] == "44% of upstream (target >= 60%: **not met**)"
    cells = _cells(table, "1 KB req/resp at 1000 rps, p50")
    assert cells[4] == "0.300 (+0.200)"
    assert cells[5] == "1.5x upstream (target <= 2x: met)"  # added 0.3 ms against upstream's added 0.2 ms
    cells = _cells(table, "client-side ztunnel, vCPU per 1000 rps")
    assert cells[5] == "4.0x upstream (target <= 2x: **not met**)"


def test_no_ratio_against_an_upstream_figure_that_is_not_positive() -> None:
    rr = finish_scenario(ScenarioResult(name="rr", title="rr", method="m", arms={
        "baseline": ArmResult(runs=[{"p50_ms": 0.3}]), "mesh": ArmResult(runs=[{"p50_ms": 0.5}]),
        "upstream": ArmResult(runs=[{"p50_ms": 0.25}])}))  # fmt: skip
    cells = _cells(markdown_table(_report(rr)), "1 KB req/resp at 1000 rps, p50")
    assert cells[4] == "0.250 (-0.050)"
    assert cells[5] == ""


def test_markdown_names_the_upstream_build_when_it_ran() -> None:
    report = _report()
    report.settings = {"reps": 3, "upstream_ztunnel": "istio/ztunnel 62d8265 (release build)"}
    text = markdown(report)
    assert "`istio/ztunnel 62d8265 (release build)` on node-c and node-d" in text
    assert "no mesh, ours, upstream's on even repetitions" in text
    assert "on node-c and node-d" not in markdown(_report())


def test_markdown_names_machine_command_and_methods() -> None:
    report = _report(
        finish_scenario(ScenarioResult(name="crr", title="new connections", method="connect, close"))
    )
    report.settings = {"reps": 3, "conns": 4, "rate": 1000.0}
    report.generator = {"rr_closed_rps": 20000.0, "rr_closed_rps_mesh": 2000.0}
    text = markdown(report)
    assert "Test CPU, 2 vCPU" in text
    assert "`ambient bench`" in text
    assert "**new connections**: connect, close" in text
    assert "20,000 req/s" in text


def test_report_round_trips_through_json() -> None:
    report = _report(
        finish_scenario(
            ScenarioResult(name="x", title="x", method="m", arms={"mesh": ArmResult(runs=[{"v": 1.0}])})
        )
    )
    again = msgspec.json.decode(msgspec.json.encode(report), type=BenchReport)
    assert again.scenarios[0].arms["mesh"].stats["v"].median == 1.0


def test_percentiles_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values, (50, 90, 99, 100)) == [50.0, 90.0, 99.0, 100.0]
    assert percentiles([], (50,)) == [0.0]
    assert percentiles([7.0], (1, 99)) == [7.0, 7.0]


def test_bench_world_is_valid_and_plans_one_ambient_pair() -> None:
    world = bench_world()
    validate(world, "<bench>")
    plan = plan_lab(world, prefix="benchtest")
    ambient = {p.key: p.ambient for p in plan.pods}
    for arm in ARMS:
        pair = arm_pods(arm)
        assert ambient[pair.client] == ambient[pair.server] == (arm == "mesh")
        assert pair.client.startswith(NAMESPACES[arm] + "/")
    nodes = {p.key: p.node for p in plan.pods}
    assert nodes[arm_pods("mesh").client] != nodes[arm_pods("mesh").server]


def test_enrol_pod_ips_are_distinct_and_outside_the_pod_blocks() -> None:
    ips = {enrol_pod_ip(i) for i in range(2000)}
    assert len(ips) == 2000
    assert all(ip.startswith("10.250.") and not ip.endswith((".0", ".1", ".255")) for ip in ips)
    with pytest.raises(ValueError):
        enrol_pod_ip(64000)


def test_pod_blocks_stay_inside_the_bench_range_for_any_seed() -> None:
    for seed in range(0, 1000, 7):
        a, b, c, d = pod_blocks(seed)
        assert 100 <= a < b < c < d <= 239
        validate(bench_world(seed), "<bench>")
        validate(bench_world(seed, upstream=True), "<bench>")


def test_bench_world_with_upstream_puts_its_meshed_pair_on_node_c_and_node_d() -> None:
    plan = plan_lab(bench_world(upstream=True), prefix="benchtest")
    pods = {p.key: p for p in plan.pods}
    pair = arm_pods("upstream")
    assert (pods[pair.client].node, pods[pair.server].node) == ("node-c", "node-d")
    assert pods[pair.client].ambient and pods[pair.server].ambient
    assert {n.name for n in plan.nodes} == {"node-a", "node-b", "node-c", "node-d"}
    assert arms(True) == ("baseline", "mesh", "upstream") and arms(False) == ARMS


def test_only_option_picks_scenarios_in_run_order_without_duplicates() -> None:
    assert parse_scenarios("enrol") == ("enrol",)
    assert parse_scenarios(" enrol, bulk ,enrol") == ("bulk", "enrol")
    assert parse_scenarios("faults,churn,conns,crr,sweep,rr,bulk,enrol") == SCENARIOS


@pytest.mark.parametrize(("text", "message"), [("", "no scenario"), (",", "no scenario"),
                                               ("enrol,ztunnel", "unknown scenario ztunnel")])  # fmt: skip
def test_only_option_rejects_empty_and_unknown_names(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_scenarios(text)


def test_bench_cli_only_option_reaches_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    bench_cli.register(subparsers)
    assert "--only" in subparsers.choices["bench"].format_help()
    cfg = _config(monkeypatch, "--only", "enrol")
    assert isinstance(cfg, run.BenchConfig) and cfg.scenarios == ("enrol",)
    assert _config(monkeypatch, "--only", "nope") == 2


def _config(monkeypatch: pytest.MonkeyPatch, *argv: str) -> run.BenchConfig | int:
    seen: list[run.BenchConfig] = []

    def fake_run_bench(cfg: run.BenchConfig, *, progress: object) -> object:
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(run, "run_bench", fake_run_bench)
    parser = argparse.ArgumentParser()
    bench_cli.register(parser.add_subparsers())
    args = parser.parse_args(["bench", "--prefix", "t", *argv])
    try:
        code = args.func(args)
    except SystemExit:
        return seen[0]
    assert isinstance(code, int)
    return code


def test_load_and_fault_settings_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(monkeypatch, "--only", "faults")
    assert isinstance(cfg, run.BenchConfig)
    assert (cfg.idle_conns, cfg.churn_conns, cfg.istiod_down, cfg.restart_conns) == (10000, 50000, 60.0, 1000)
    cfg = _config(monkeypatch, "--idle-conns", "300", "--churn-conns", "700", "--istiod-down", "2.5",
                  "--restart-conns", "20")  # fmt: skip
    assert isinstance(cfg, run.BenchConfig)
    assert (cfg.idle_conns, cfg.churn_conns, cfg.istiod_down, cfg.restart_conns) == (300, 700, 2.5, 20)
    quick = _config(monkeypatch, "--quick")
    assert isinstance(quick, run.BenchConfig) and quick.idle_conns < 1000 and quick.istiod_down < 60


@pytest.mark.parametrize(
    "argv", [["--idle-conns", "0"], ["--istiod-down", "0"], ["--restart-conns", "20000"]]
)
def test_bad_load_settings_are_refused(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    assert _config(monkeypatch, *argv) == 2
