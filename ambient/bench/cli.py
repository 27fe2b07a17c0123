"""`ambient bench`: measure the mesh against no mesh in one run (root; builds and removes its own lab).

    ambient bench [--quick] [--out DIR] [--update-docs] [--reps N] [--seconds S] [--enrol-pods N]
                  [--only bulk,rr,sweep,crr,enrol,conns,churn,faults] [--idle-conns N] [--churn-conns N]
                  [--istiod-down S] [--restart-conns N] [--ztunnel-bin PATH]

With --ztunnel-bin (a ztunnel you built from the istio/ztunnel repository) upstream's ztunnel is a third arm
of every traffic scenario, on two more nodes of the same lab, and the table compares ours with it.

Writes DIR/bench.json and DIR/benchmarks.md (DIR defaults to /var/tmp/ambient-bench/<UTC time>);
--update-docs also copies the Markdown to docs/benchmarks.md. The lab is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.table import Table

from ambient.lab.upstream import UPSTREAM_ENV
from ambient.output import make_console

# Piped output (a log, CI) is never wrapped (ambient.output).
console = make_console()
err_console = make_console(stderr=True)
DOCS_FILE = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
DEFAULT_OUT_ROOT = Path("/var/tmp/ambient-bench")


def _progress(message: str) -> None:
    err_console.print(f"[bold cyan]•[/] {message}")


def register(subparsers: Any) -> None:
    """Add `bench` to the `ambient` command."""
    p = subparsers.add_parser(
        "bench",
        help="measure the mesh against no mesh in one run (root)",
        description="Build a lab with a meshed and an unmeshed client/server pair across two nodes, run "
        "each scenario for both arms alternately, print the table, write JSON and Markdown, remove the lab.",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny durations (CI smoke use): 1 s runs, 2 reps, 5 pods"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="run directory (default /var/tmp/ambient-bench/<time>)"
    )
    p.add_argument("--update-docs", action="store_true", help="also write docs/benchmarks.md")
    p.add_argument("--reps", type=int, default=None, help="repetitions per arm (default 3; --quick 2)")
    p.add_argument("--seconds", type=float, default=None, help="length of each run (default 10; --quick 1)")
    p.add_argument("--rate", type=float, default=1000.0, help="fixed request rate (default 1000)")
    p.add_argument("--conns", type=int, default=4, help="kept-alive connections of the fixed-rate run")
    p.add_argument("--crr-conc", type=int, default=4, help="connections in flight, new-connection rate run")
    p.add_argument(
        "--enrol-pods",
        type=int,
        default=None,
        help="pods to enrol on one node (default 100, e.g. 500; --quick 5)",
    )
    p.add_argument(
        "--only",
        default=None,
        metavar="NAMES",
        help="run only these scenarios, comma-separated, from bulk, rr (also gives the ztunnel CPU/RSS "
        "figures), sweep (ztunnel CPU per request at 250/1000/2500 rps), crr, enrol, conns (idle connections "
        "held), churn (short connections), faults (kill -9, istiod down, node agent down, ztunnel restart) "
        "(default all; e.g. --only enrol for ztunnel's memory with --enrol-pods pods)",
    )
    p.add_argument(
        "--ztunnel-bin",
        default=None,
        metavar="PATH",
        help="a ztunnel built from istio/ztunnel: measured as a third arm (upstream's ztunnel on node-c and "
        "node-d) in every traffic scenario, with 'upstream ztunnel' and 'ours vs upstream' columns "
        f"(default: ${UPSTREAM_ENV} if set, else no third arm)",
    )
    p.add_argument("--idle-conns", type=int, default=None,
                   help="conns: idle connections held at once (default 10000; --quick 200)")
    p.add_argument("--churn-conns", type=int, default=None,
                   help="churn: short connections (default 50000; --quick 500)")
    p.add_argument("--istiod-down", type=float, default=None,
                   help="faults: seconds istiod is down (default 60; --quick 5)")
    p.add_argument("--restart-conns", type=int, default=None,
                   help="faults: live connections during the ztunnel restart (default 1000; --quick 50)")
    p.add_argument("--prefix", default=None, help="lab prefix (default bench<pid>)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each component")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from ambient.bench.report import HEADERS, table_rows
    from ambient.bench.run import SCENARIOS, BenchConfig, parse_scenarios, run_bench

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    quick = bool(args.quick)
    reps = args.reps if args.reps is not None else (2 if quick else 3)
    seconds = args.seconds if args.seconds is not None else (1.0 if quick else 10.0)
    enrol = args.enrol_pods if args.enrol_pods is not None else (5 if quick else 100)
    if reps < 1 or seconds <= 0 or enrol < 1 or args.rate <= 0 or args.conns < 1 or args.crr_conc < 1:
        err_console.print(
            "ambient bench: --reps, --seconds, --rate, --conns, --crr-conc, --enrol-pods must be > 0"
        )
        return 2
    loads = {
        "--idle-conns": args.idle_conns if args.idle_conns is not None else (200 if quick else 10000),
        "--churn-conns": args.churn_conns if args.churn_conns is not None else (500 if quick else 50000),
        "--restart-conns": args.restart_conns if args.restart_conns is not None else (50 if quick else 1000),
    }
    istiod_down = args.istiod_down if args.istiod_down is not None else (5.0 if quick else 60.0)
    if min(loads.values()) < 1 or istiod_down <= 0:
        err_console.print(f"ambient bench: {', '.join(loads)}, --istiod-down must be > 0")
        return 2
    if loads["--idle-conns"] > 15000 or loads["--restart-conns"] > 15000:
        err_console.print("ambient bench: --idle-conns and --restart-conns are limited to 15000 (one client "
                          "pod's ports and ztunnel's fds)")
        return 2
    if enrol > 2000:
        err_console.print("ambient bench: --enrol-pods is limited to 2000")
        return 2
    try:
        scenarios = parse_scenarios(args.only) if args.only is not None else SCENARIOS
    except ValueError as exc:
        err_console.print(f"ambient bench: --only: {exc}")
        return 2
    ztunnel_bin = args.ztunnel_bin or os.environ.get(UPSTREAM_ENV) or None
    if ztunnel_bin is not None:
        from ambient.lab.errors import PrerequisiteError
        from ambient.lab.upstream import check_ztunnel_bin

        try:
            ztunnel_bin = check_ztunnel_bin(ztunnel_bin)
        except PrerequisiteError as exc:
            err_console.print(f"ambient bench: {exc}")
            return 2
    out = args.out or DEFAULT_OUT_ROOT / stamp
    cfg = BenchConfig(
        prefix=args.prefix or f"bench{os.getpid() % 100000}",
        out_dir=str(out),
        command="ambient " + shlex.join(sys.argv[1:] if sys.argv[1:2] == ["bench"] else ["bench"]),
        seconds=seconds,
        reps=reps,
        rate=args.rate,
        conns=args.conns,
        crr_conc=args.crr_conc,
        enrol_pods=enrol,
        timeout=args.timeout,
        quick=quick,
        scenarios=scenarios,
        ztunnel_bin=ztunnel_bin,
        idle_conns=loads["--idle-conns"],
        churn_conns=loads["--churn-conns"],
        istiod_down=istiod_down,
        restart_conns=loads["--restart-conns"],
    )
    report, out_dir = run_bench(cfg, progress=_progress)
    table = Table(title=f"ambient bench ({report.machine.cpu_model}, {report.machine.vcpus} vCPU)")
    for col in HEADERS:
        table.add_column(col)
    for cells in table_rows(report):
        table.add_row(*cells)
    console.print(table)
    console.print(f"results: {out_dir / 'bench.json'}, {out_dir / 'benchmarks.md'}")
    if args.update_docs:
        DOCS_FILE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out_dir / "benchmarks.md", DOCS_FILE)
        console.print(f"wrote {DOCS_FILE}")
    return 0
