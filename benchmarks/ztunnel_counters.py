"""Load-independent costs of running ztunnels: system calls, wake-ups and CPU split per request (or per MB).

Wall-clock throughput moves with whatever else the host runs; these counters do not (much): how many system
calls of which kind each ztunnel makes, how often it is woken from sleep (voluntary context switches: it
blocked in epoll_wait and was woken by a packet), and its user vs kernel CPU time, all divided by the work
the load command reports. Run as root next to a lab that is up, e.g. one built from the bench world:

    .venv/bin/python benchmarks/ztunnel_counters.py --pid 1234 --pid 1240 --per requests -- \\
        ip netns exec pf-bench-mesh-client .venv/bin/python -m ambient.bench.loadgen rr 10.244.175.11 8080 \\
        --rate 1000 --conns 4 --seconds 5

`--per requests` reads the load's JSON `requests` count, `--per connections` its `connections` count (the
loadgen's `crr` mode: one new connection each); `--per mb` takes `--bytes` (what the load moved)
or iperf3's JSON (`-J`) `end.sum_received.bytes`. With `--strace` each ztunnel runs under `strace -c -f`
for the load's duration (ptrace slows it, so its CPU figures are then taken in a second pass without it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_split(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def ctx_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) over all threads of `pid`."""
    vol = invol = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "status").read_text()
        vol += int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
        invol += int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    return vol, invol


def parse_strace_c(text: str) -> dict[str, int]:
    calls: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            try:
                calls[parts[-1]] = int(parts[3])
            except ValueError:
                continue
    return calls


def run_load(cmd: list[str]) -> dict[str, object]:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out) if out.strip().startswith("{") else {}


def units(load: dict[str, object], per: str, given_bytes: int | None) -> float:
    if per in ("requests", "connections"):
        return float(load[per])  # type: ignore[arg-type]
    if given_bytes is not None:
        return given_bytes / 1e6
    end = load["end"]
    return float(end["sum_received"]["bytes"]) / 1e6  # type: ignore[index]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pid", type=int, action="append", required=True, help="a ztunnel's PID (repeatable)")
    p.add_argument("--per", choices=("requests", "connections", "mb"), default="requests")
    p.add_argument("--bytes", type=int, default=None)
    p.add_argument("--strace", action="store_true", help="also count system calls (a second pass)")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    result: dict[str, dict[str, object]] = {str(pid): {} for pid in args.pid}

    before = {pid: (cpu_split(pid), ctx_switches(pid)) for pid in args.pid}
    load = run_load(cmd)
    n = units(load, args.per, args.bytes)
    for pid in args.pid:
        (u0, s0), (v0, i0) = before[pid]
        (u1, s1), (v1, i1) = cpu_split(pid), ctx_switches(pid)
        result[str(pid)].update({
            f"user_us_per_{args.per}": round((u1 - u0) / n * 1e6, 1),
            f"kernel_us_per_{args.per}": round((s1 - s0) / n * 1e6, 1),
            f"wakeups_per_{args.per}": round((v1 - v0) / n, 3),
            f"preempted_per_{args.per}": round((i1 - i0) / n, 3),
        })
    result["load"] = {"units": n}

    if args.strace:
        tracers = []
        outs = []
        for pid in args.pid:
            out = Path(f"/tmp/ztunnel-counters-{pid}.strace")
            tracers.append(subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(pid)],
                                            stderr=subprocess.DEVNULL))
            outs.append(out)
        time.sleep(0.5)
        load2 = run_load(cmd)
        n2 = units(load2, args.per, args.bytes)
        for tracer in tracers:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)
        for pid, out in zip(args.pid, outs, strict=True):
            calls = parse_strace_c(out.read_text())
            result[str(pid)][f"syscalls_per_{args.per}"] = {k: round(v / n2, 3) for k, v in
                                                            sorted(calls.items(), key=lambda kv: -kv[1])}
            result[str(pid)][f"syscalls_total_per_{args.per}"] = round(sum(calls.values()) / n2, 2)
        result["load"]["units_traced"] = n2
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
