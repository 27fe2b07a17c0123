"""The rate sweep's figures reach the table under the names the report expects."""

from __future__ import annotations

from ambient.bench.report import (
    SWEEP_RATES,
    ArmResult,
    BenchReport,
    Machine,
    ScenarioResult,
    finish_scenario,
    table_rows,
)
from ambient.bench.sweep import kernel_metric, metric


def test_every_swept_rate_has_a_row_per_ztunnel() -> None:
    run = {metric(role, rate): 100.0 + rate / 10 for role in ("client", "server") for rate in SWEEP_RATES}
    run |= {kernel_metric(role, rate): 40.0 for role in ("client", "server") for rate in SWEEP_RATES}
    sweep = finish_scenario(ScenarioResult(name="sweep", title="t", method="m", mesh_only=True,
                                           arms={"mesh": ArmResult(runs=[run])}))
    report = BenchReport(command="ambient bench", started="t0", scenarios=[sweep],
                         machine=Machine(cpu_model="c", vcpus=2, memory_gib=1.0, kernel="k", python="p"))
    rows = {cells[0]: cells for cells in table_rows(report)}
    for rate in SWEEP_RATES:
        cells = rows[f"client-side ztunnel, CPU per request at {rate:g} rps (us)"]
        assert cells[1] == "-"  # mesh only
        assert cells[2] == f"{100.0 + rate / 10:,.0f}"
        assert f"server-side ztunnel, CPU per request at {rate:g} rps (us)" in rows
        kernel = f"client-side ztunnel, of which kernel per request at {rate:g} rps (us)"
        if rate >= 1000:
            assert rows[kernel][2] == "40"
        else:  # too few clock ticks at a low rate to split CPU time between user and kernel
            assert kernel not in rows
