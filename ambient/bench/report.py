"""Results of `ambient bench`: the JSON document, its summary statistics and the Markdown table. Pure.

Every scenario keeps each repetition's raw figures (`runs`) and a `Stat` per metric: the median over the
repetitions and their spread (lowest, highest). Traffic scenarios have both arms; `added` is the mesh's
median minus the baseline's. Scenarios that only exist with the mesh (ztunnel's own cost, enrolment) have
the mesh arm only and say so (`mesh_only`).

A run with upstream's ztunnel (`ambient bench --ztunnel-bin`) has a third arm, `upstream`, in every traffic
scenario and in the mesh-only ones it applies to; `added_upstream` is its median minus the baseline's, and
the table's "ours vs upstream" column compares our mesh arm with it (throughput as a share of upstream's,
latency added and CPU/memory as a multiple of upstream's), checked against the relative targets.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import msgspec

SCHEMA_VERSION = 2  # 2: the `upstream` arm and `added_upstream`

UPSTREAM = "upstream"
"""The arm name of upstream's ztunnel (ambient/bench/world.py UPSTREAM_ARM)."""

SWEEP_RATES = (250.0, 1000.0, 2500.0)
"""Request rates of the rate sweep (ambient/bench/sweep.py): well under, at and well over the fixed rate."""


class Stat(msgspec.Struct, frozen=True, kw_only=True):
    median: float
    low: float
    high: float
    n: int


class ArmResult(msgspec.Struct, kw_only=True):
    runs: list[dict[str, float]] = []
    stats: dict[str, Stat] = {}


class ScenarioResult(msgspec.Struct, kw_only=True):
    name: str
    title: str
    method: str
    mesh_only: bool = False
    arms: dict[str, ArmResult] = {}
    added: dict[str, float] = {}  # mesh median - baseline median, per metric (traffic scenarios)
    added_upstream: dict[str, float] = {}  # upstream median - baseline median (runs with upstream's arm)


class Machine(msgspec.Struct, frozen=True, kw_only=True):
    cpu_model: str
    vcpus: int
    memory_gib: float
    kernel: str
    python: str


class BenchReport(msgspec.Struct, kw_only=True):
    schema: int = SCHEMA_VERSION
    command: str
    started: str
    finished: str = ""
    git_commit: str = ""
    git_dirty: bool = False
    machine: Machine
    settings: dict[str, float | int | str | bool] = {}
    generator: dict[str, float] = {}
    scenarios: list[ScenarioResult] = []
    notes: list[str] = []

    def scenario(self, name: str) -> ScenarioResult | None:
        return next((s for s in self.scenarios if s.name == name), None)


def summarize(runs: Sequence[Mapping[str, float]]) -> dict[str, Stat]:
    """Median and spread of each metric over the runs (metrics missing from a run are skipped there)."""
    names: list[str] = []
    for run in runs:
        names += [k for k in run if k not in names]
    out = {}
    for name in names:
        values = [float(run[name]) for run in runs if name in run]
        out[name] = Stat(median=statistics.median(values), low=min(values), high=max(values), n=len(values))
    return out


def finish_scenario(scenario: ScenarioResult) -> ScenarioResult:
    """Fill `stats` of every arm, `added` (mesh - baseline medians) and `added_upstream` (upstream -
    baseline) from the recorded runs."""
    for arm in scenario.arms.values():
        arm.stats = summarize(arm.runs)
    base = scenario.arms.get("baseline")
    if base is None:
        return scenario
    for name, target in (("mesh", scenario.added), (UPSTREAM, scenario.added_upstream)):
        meshed = scenario.arms.get(name)
        if meshed is not None:
            stats = meshed.stats
            target.update({k: stats[k].median - base.stats[k].median for k in stats if k in base.stats})
    return scenario


# --- the table ------------------------------------------------------------------------------------------


class Row(msgspec.Struct, frozen=True, kw_only=True):
    scenario: str
    metric: str
    label: str
    compare: str  # "added" (mesh - baseline), "ratio" (mesh / baseline) or "" (mesh only)
    upstream: str = ""  # a published upstream figure (other hardware, other path): context only
    target: str = ""
    # a target the figure can be checked against: (what, op, value); what is "mesh" or "added"
    check: tuple[str, str, float] | None = None
    # a target for ours vs upstream's ztunnel in the same run: (op, ratio), ratio as ours_vs_upstream gives it
    versus_upstream: tuple[str, float] | None = None
    digits: int = 2
    yes_no: bool = False  # a 1/0 figure shown as yes/no
    no_mesh: bool = True  # False: the no-mesh column has no such figure ("-") although the scenario has both


# The run's size, appended to the labels of these scenarios: scenario -> (metric, unit).
LABEL_COUNTS = {
    "enrol": ("pods", "pods"),
    "conns": ("conns", "connections"),
    "churn": ("conns", "connections"),
    "fault_istiod": ("down_s", "s down"),
    "fault_restart": ("conns", "live connections"),
}


ROWS: tuple[Row, ...] = (
    Row(scenario="bulk_1", metric="mb_s", label="bulk throughput, 1 stream (MB/s)", compare="ratio",
        target=">= 300 MB/s", check=("mesh", ">=", 300.0), versus_upstream=(">=", 0.6), digits=0),
    Row(scenario="bulk_4", metric="mb_s", label="bulk throughput, 4 streams (MB/s)", compare="ratio",
        versus_upstream=(">=", 0.6), digits=0),
    Row(scenario="rr", metric="p50_ms", label="1 KB req/resp at 1000 rps, p50 (ms)", compare="added",
        target="added <= 0.5 ms", check=("added", "<=", 0.5), versus_upstream=("<=", 2.0), digits=3),
    Row(scenario="rr", metric="p90_ms", label="1 KB req/resp at 1000 rps, p90 (ms)", compare="added",
        upstream="+0.17 ms (Istio 1.22, two ztunnels)", digits=3),
    Row(scenario="rr", metric="p99_ms", label="1 KB req/resp at 1000 rps, p99 (ms)", compare="added",
        upstream="+0.20 ms (Istio 1.22, two ztunnels)", target="added <= 2 ms", check=("added", "<=", 2.0),
        digits=3),
    Row(scenario="rr", metric="rps", label="achieved rate (req/s)", compare="ratio", digits=0),
    Row(scenario="ztunnel", metric="client_vcpu_per_1k", label="client-side ztunnel, vCPU per 1000 rps",
        compare="", upstream="~0.06 (Istio 1.24, one ztunnel)", target="<= 0.15",
        check=("mesh", "<=", 0.15), versus_upstream=("<=", 2.0), digits=3),
    Row(scenario="ztunnel", metric="server_vcpu_per_1k", label="server-side ztunnel, vCPU per 1000 rps",
        compare="", upstream="~0.06 (Istio 1.24, one ztunnel)", target="<= 0.15",
        check=("mesh", "<=", 0.15), versus_upstream=("<=", 2.0), digits=3),
    Row(scenario="ztunnel", metric="client_rss_mib", label="client-side ztunnel, peak RSS (MiB)", compare="",
        upstream="~12 MB per 1000 rps (Istio 1.24)", digits=1),
    Row(scenario="ztunnel", metric="server_rss_mib", label="server-side ztunnel, peak RSS (MiB)", compare="",
        upstream="~12 MB per 1000 rps (Istio 1.24)", digits=1),
    Row(scenario="ztunnel", metric="client_anon_mib", label="client-side ztunnel, peak RssAnon (MiB)",
        compare="", digits=1),
    Row(scenario="ztunnel", metric="server_anon_mib", label="server-side ztunnel, peak RssAnon (MiB)",
        compare="", digits=1),
    Row(scenario="ztunnel", metric="client_runq_ms_per_req",
        label="client-side ztunnel, waiting for a CPU, per request (ms)", compare="", digits=3),
    Row(scenario="ztunnel", metric="server_runq_ms_per_req",
        label="server-side ztunnel, waiting for a CPU, per request (ms)", compare="", digits=3),
    Row(scenario="rr", metric="host_busy_vcpu", label="whole host busy during the fixed-rate run (vCPU)",
        compare="added", digits=2),
    *(Row(scenario="sweep", metric=f"{role}_{part}us_per_req_at_{rate:g}",
          label=f"{role}-side ztunnel, {what} per request at {rate:g} rps (us)", compare="", digits=0)
      for role in ("client", "server") for rate in SWEEP_RATES
      for part, what in (("", "CPU"), ("kernel_", "of which kernel"))
      if part == "" or rate >= 1000),  # the user/kernel split is tick-sampled: too coarse at 250 rps
    Row(scenario="crr", metric="cps", label="new connections per second (100 B each way)", compare="ratio",
        target=">= 800", check=("mesh", ">=", 800.0), versus_upstream=(">=", 0.5), digits=0),
    Row(scenario="enrol", metric="p50_ms", label="pod enrolment, CNI ADD to listeners accepting, p50 (ms)",
        compare="", digits=1),
    Row(scenario="enrol", metric="p99_ms", label="pod enrolment, p99 (ms)", compare="", target="<= 100 ms",
        check=("mesh", "<=", 100.0), digits=1),
    Row(scenario="enrol", metric="total_s", label="pod enrolment, all pods one after another (s)", compare="",
        target="500 pods <= 60 s", digits=1),
    Row(scenario="enrol", metric="rss_at_100_mib", label="ztunnel RSS with 100 pods enrolled (MiB)",
        compare="", target="<= 60 MB (57.2 MiB)", check=("mesh", "<=", 57.2), digits=1),
    Row(scenario="enrol", metric="rss_after_mib", label="ztunnel RSS with the pods enrolled (MiB)",
        compare="", digits=1),
    Row(scenario="enrol", metric="anon_after_mib", label="ztunnel RssAnon with the pods enrolled (MiB)",
        compare="", digits=1),
    Row(scenario="enrol", metric="kib_per_pod", label="ztunnel RSS per enrolled pod (KiB)", compare="",
        target="<= 40 KiB", check=("mesh", "<=", 40.0), digits=1),
    # load (ambient/bench/faults.py)
    Row(scenario="conns", metric="all_echoed", label="idle connections held at once, every one echoed",
        compare="", target="yes", check=("mesh", ">=", 1.0), yes_no=True),
    Row(scenario="conns", metric="held", label="idle connections held (proved end to end)", compare="",
        digits=0),
    *(Row(scenario="conns", metric=f"{role}_{what}_per_conn",
          label=f"{role}-side ztunnel, {name} per held connection ({unit})", compare="", digits=digits)
      for what, name, unit, digits in (("kib", "RSS", "KiB", 1), ("fds", "fds", "count", 2))
      for role in ("client", "server")),
    *(Row(scenario="conns", metric=f"{role}_rss_{when}_mib",
          label=f"{role}-side ztunnel RSS {what} (MiB)", compare="", digits=1)
      for role in ("client", "server")
      for when, what in (("before", "before the connections"), ("held", "with them held"),
                         ("after", "after they closed"))),
    Row(scenario="churn", metric="completed", label="short connections completed", compare="", digits=0),
    Row(scenario="churn", metric="errors", label="short connections failed", compare="", target="0",
        check=("mesh", "<=", 0.0), digits=0),
    *(Row(scenario="churn", metric=f"{role}_fd_growth", label=f"{role}-side ztunnel, fds after - before",
          compare="", target="<= 10 (noise)", check=("mesh", "<=", 10.0), digits=0)
      for role in ("client", "server")),
    *(Row(scenario="churn", metric=f"{role}_rss_growth_mib",
          label=f"{role}-side ztunnel, RSS after - before (MiB)", compare="", target="<= 5 MiB (noise)",
          check=("mesh", "<=", 5.0), digits=1)
      for role in ("client", "server")),
    # faults (ambient/bench/faults.py)
    Row(scenario="fault_kill", metric="transfer_failed",
        label="kill -9 of the server-side ztunnel mid-transfer: the transfer failed (no clean end)",
        compare="", target="yes", check=("mesh", ">=", 1.0), yes_no=True, no_mesh=False),
    Row(scenario="fault_kill", metric="client_reset", label="kill -9: the client got a reset (RST)",
        compare="", upstream="reset", target="yes", check=("mesh", ">=", 1.0), yes_no=True, no_mesh=False),
    Row(scenario="fault_kill", metric="marker_seen",
        label="kill -9: payload marker in the capture on the pods' veths (no mesh: the control)",
        compare="", target="no", check=("mesh", "<=", 0.0), yes_no=True),
    Row(scenario="fault_kill", metric="packets", label="kill -9: packets captured on the pods' veths",
        compare="", digits=0),
    Row(scenario="fault_istiod", metric="new_ok_pct",
        label="istiod down: new connections that worked (%)", compare="", target="100%",
        check=("mesh", ">=", 100.0), digits=0),
    Row(scenario="fault_istiod", metric="kept_ok_pct",
        label="istiod down: echoes on an existing connection that worked (%)", compare="", target="100%",
        check=("mesh", ">=", 100.0), digits=0),
    Row(scenario="fault_istiod", metric="after_ok_pct",
        label="istiod back: new connections that worked (%)", compare="", target="100%",
        check=("mesh", ">=", 100.0), digits=0),
    Row(scenario="fault_agent", metric="add_failed",
        label="node agent down: the CNI ADD of a new pod failed (not started unprotected)", compare="",
        upstream="the ADD fails", target="yes", check=("mesh", ">=", 1.0), yes_no=True),
    Row(scenario="fault_agent", metric="add_answer_s", label="node agent down: time until the ADD failed (s)",
        compare="", digits=2),
    Row(scenario="fault_agent", metric="enrolled_after",
        label="node agent back: the pod enrolled on the retried ADD", compare="", target="yes",
        check=("mesh", ">=", 1.0), yes_no=True),
    Row(scenario="fault_restart", metric="survived", label="ztunnel restart: live connections that survived",
        compare="", digits=0),
    Row(scenario="fault_restart", metric="new_back_s",
        label="ztunnel restart: new connections failing for (s)", compare="", digits=2),
    Row(scenario="fault_restart", metric="ready_s",
        label="ztunnel restart: until the new ztunnel is ready (s)",
        compare="", digits=2),
)  # fmt: skip


def _fmt(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def _cell(stat: Stat | None, digits: int) -> str:
    if stat is None:
        return "n/a"
    if stat.n <= 1 or stat.low == stat.high:
        return _fmt(stat.median, digits)
    return f"{_fmt(stat.median, digits)} ({_fmt(stat.low, digits)}-{_fmt(stat.high, digits)})"


def _arm_cell(row: Row, arm: ArmResult | None, stat: Stat | None) -> str:
    """One arm's cell: the figure, or for a yes/no row "yes", "no", or "yes (2 of 3)" over repetitions."""
    if not row.yes_no or arm is None or stat is None:
        return _cell(stat, row.digits)
    values = [run[row.metric] >= 0.5 for run in arm.runs if row.metric in run]
    word = "yes" if stat.median >= 0.5 else "no"
    if all(values) or not any(values):
        return word
    return f"{word} ({sum(values)} of {len(values)})"


def target_met(row: Row, scenario: ScenarioResult) -> bool | None:
    """Whether the row's target is met by the medians (None when it has no check or no figure)."""
    if row.check is None:
        return None
    what, op, limit = row.check
    mesh = scenario.arms.get("mesh")
    if what == "added":
        if row.metric not in scenario.added:
            return None
        value = scenario.added[row.metric]
    else:
        if mesh is None or row.metric not in mesh.stats:
            return None
        value = mesh.stats[row.metric].median
    return value >= limit if op == ">=" else value <= limit


def ours_vs_upstream(row: Row, scenario: ScenarioResult) -> float | None:
    """Our mesh arm against upstream's in the same run, for `row`: throughput-like figures ("ratio" rows) as
    ours / upstream's (0.6 = 60 % of upstream's); latency ("added" rows) as our added latency / upstream's
    added latency; mesh-only figures (CPU, memory) as ours / upstream's. None without both figures, or when
    upstream's is not positive (a ratio to zero or to a negative added latency means nothing)."""
    mesh, upstream = scenario.arms.get("mesh"), scenario.arms.get(UPSTREAM)
    if mesh is None or upstream is None:
        return None
    if row.compare == "added":
        ours, theirs = scenario.added.get(row.metric), scenario.added_upstream.get(row.metric)
    else:
        ours_stat, theirs_stat = mesh.stats.get(row.metric), upstream.stats.get(row.metric)
        ours = ours_stat.median if ours_stat else None
        theirs = theirs_stat.median if theirs_stat else None
    if ours is None or theirs is None or theirs <= 0:
        return None
    return ours / theirs


def _versus_upstream_cell(row: Row, scenario: ScenarioResult) -> str:
    ratio = ours_vs_upstream(row, scenario)
    if ratio is None:
        return ""
    text = f"{ratio:.0%} of upstream" if row.compare == "ratio" else f"{ratio:.1f}x upstream"
    if row.versus_upstream is None:
        return text
    op, limit = row.versus_upstream
    met = ratio >= limit if op == ">=" else ratio <= limit
    goal = f"{limit:.0%}" if row.compare == "ratio" else f"{limit:g}x"
    return f"{text} (target {op} {goal}: {'met' if met else '**not met**'})"


def table_rows(report: BenchReport) -> list[list[str]]:
    """The table as strings, one list per row in HEADERS' order: what, no mesh, mesh (ours), mesh vs no
    mesh, upstream ztunnel and ours vs upstream (empty without upstream's arm), published upstream figures,
    target (met?)."""
    rows = []
    for row in ROWS:
        scenario = report.scenario(row.scenario)
        if scenario is None:
            continue
        base = scenario.arms.get("baseline")
        mesh = scenario.arms.get("mesh")
        upstream = scenario.arms.get(UPSTREAM)
        base_stat = base.stats.get(row.metric) if base else None
        mesh_stat = mesh.stats.get(row.metric) if mesh else None
        versus = ""
        if row.compare == "added" and row.metric in scenario.added:
            versus = f"{scenario.added[row.metric]:+.{row.digits}f}"
        elif row.compare == "ratio" and base_stat and mesh_stat and base_stat.median:
            versus = f"{mesh_stat.median / base_stat.median:.0%} of no mesh"
        upstream_cell = ""
        if upstream is not None:
            upstream_cell = _cell(upstream.stats.get(row.metric), row.digits)
            if row.compare == "added" and row.metric in scenario.added_upstream:
                upstream_cell += f" ({scenario.added_upstream[row.metric]:+.{row.digits}f})"
        met = target_met(row, scenario)
        target = row.target + ("" if met is None else (" (met)" if met else " (**not met**)"))
        label = row.label
        count, unit = LABEL_COUNTS.get(scenario.name, ("", ""))
        if mesh_stat is not None and mesh and count in mesh.stats:
            label += f" [{mesh.stats[count].median:,.0f} {unit}]"
        rows.append(
            [
                label,
                "-" if scenario.mesh_only or not row.no_mesh else _arm_cell(row, base, base_stat),
                _arm_cell(row, mesh, mesh_stat),
                versus,
                upstream_cell,
                _versus_upstream_cell(row, scenario),
                row.upstream,
                target,
            ]
        )
    return rows


HEADERS = ("what", "no mesh", "mesh", "mesh vs no mesh", "upstream ztunnel", "ours vs upstream",
           "published upstream", "target")  # fmt: skip


def markdown_table(report: BenchReport) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(report)]
    return "\n".join(lines) + "\n"


def markdown(report: BenchReport) -> str:
    """The whole results page (docs/benchmarks.md with --update-docs): written by the command only."""
    m = report.machine
    s = report.settings
    gen = report.generator
    with_upstream = bool(s.get("upstream_ztunnel"))
    arm_order = "no mesh, ours" + (", upstream's" if with_upstream else "") + " on even repetitions"
    upstream_lines = []
    if with_upstream:
        upstream_lines = [
            f"- upstream ztunnel: `{s.get('upstream_ztunnel')}` on node-c and node-d (the third arm's "
            "pods), over the same kind of veth/bridge path as ours on node-a and node-b; in the same run",
            '- "ours vs upstream": throughput as a share of upstream\'s, added latency and CPU/memory as a '
            "multiple of upstream's; the relative targets are checked there",
            '- "published upstream": figures Istio published for other hardware and another path, context '
            "only",
        ]
    out = [
        "# Benchmarks",
        "",
        "<!-- Written by `ambient bench --update-docs`; do not edit by hand: run the command again. -->",
        "",
        f"Run {report.started} to {report.finished} on commit `{report.git_commit or 'unknown'}`"
        + (" (with uncommitted changes in the work tree)" if report.git_dirty else "")
        + ".",
        "",
        f"- machine: {m.cpu_model}, {m.vcpus} vCPU, {m.memory_gib:.0f} GiB, Linux {m.kernel}, "
        f"Python {m.python}",
        f"- command: `{report.command}`",
        f"- each traffic scenario: {s.get('reps')} repetitions per arm, arms alternating "
        f"({arm_order}, reversed on odd ones); figures are medians, "
        "(lowest-highest) the spread over the repetitions",
        *upstream_lines,
        "",
        markdown_table(report),
    ]
    out += [
        "## How each figure is measured",
        "",
    ]
    for scenario in report.scenarios:
        out.append(f"- **{scenario.title}**: {scenario.method}")
    out += ["", "## The load generator's own ceiling", ""]
    if gen:
        out.append(
            f"- request/response, closed loop (no pacing) over {s.get('conns')} connections against the "
            f"no-mesh server: {gen.get('rr_closed_rps', 0):,.0f} req/s (the fixed-rate runs ask for "
            f"{float(s.get('rate', 0)):g}); through the mesh, closed loop: "
            f"{gen.get('rr_closed_rps_mesh', 0):,.0f} req/s"
            + (
                f"; through upstream's ztunnel: {gen['rr_closed_rps_upstream']:,.0f} req/s"
                if "rr_closed_rps_upstream" in gen
                else ""
            )
        )
        out.append(
            "- bulk throughput: iperf3 (C); its no-mesh figure is the ceiling of the lab's veth/bridge path"
        )
        out.append(
            "- new connections: our epoll generator and server; the no-mesh figure is their joint ceiling"
        )
    out += ["", "## Notes", ""]
    out += [f"- {note}" for note in report.notes]
    return "\n".join(out) + "\n"
