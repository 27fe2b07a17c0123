"""`ambient bench`: build a lab, measure the mesh against no mesh in one run, tear the lab down.

Theory of operation
-------------------
    1. write the bench world (ambient.bench.world) into the run directory and `lab.up` it under a prefix
       of its own: a mesh pair and a baseline pair of client/server pods across node-a and node-b
    2. start the servers in both server pods (iperf3 -s, `loadgen serve`), recorded in the lab's state so
       `lab.teardown` stops them by PID even if this process dies half-way
    3. warm up both arms, then measure the generator's ceiling (closed loop against the baseline server)
    4. each traffic scenario: `reps` repetitions, the two arms alternating (baseline first on even
       repetitions, mesh first on odd ones), every client a process inside the client pod's netns
    5. during every fixed-rate run, both ztunnels' CPU ticks (/proc/<pid>/stat) and RSS (/proc/<pid>/status,
       sampled every 50 ms) are read: the `ztunnel` scenario
    6. enrolment: N extra pods on node-a, each a fresh netns: CNI ADD to the node agent, then connect to
       127.0.0.1:15008 inside the pod until the listener accepts; ztunnel's RSS before and after
    7. load and faults (ambient/bench/faults.py): idle connections held, connection churn, and the fault
       cases (kill -9 of a ztunnel, istiod down, node agent down, ztunnel restart), each one undone
       before the next
    8. `finally`: `lab.teardown` (processes by PID, namespaces, files); the JSON and Markdown are written

With `ztunnel_bin` (a build of istio/ztunnel, `ambient bench --ztunnel-bin PATH`) the world gets node-c and
node-d, which run that binary, and a third arm, `upstream`, whose pods sit on them: every traffic scenario
alternates all three arms, and the ztunnel CPU/memory figures and the rate sweep are taken for both meshes.

The rate sweep (ambient/bench/sweep.py) runs the fixed-rate load through the mesh at a low, the reference
and a high rate: ztunnel's CPU per request at each shows how much of it is paid per wake-up.

`--only` (BenchConfig.scenarios) runs a subset of bulk, rr, sweep, crr, enrol, conns, churn, faults, always
in that order; steps
2-3 only when a traffic scenario is among them (so `--only enrol` measures a ztunnel that has carried no
traffic).

All traffic stays inside the lab's namespaces; the host namespace only runs `ip netns exec`.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from ambient.bench import faults as bf
from ambient.bench import world as bw
from ambient.bench.errors import BenchError
from ambient.bench.loadgen import percentiles
from ambient.bench.report import (
    ArmResult,
    BenchReport,
    Machine,
    ScenarioResult,
    finish_scenario,
    markdown,
)
from ambient.bench.sweep import rate_sweep
from ambient.lab import components, lab
from ambient.lab.components import PYTHON, LabPaths
from ambient.lab.errors import PrerequisiteError
from ambient.lab.probe import tcp_probe
from ambient.lab.state import RUN_ROOT, ComponentSpec, LabState, save_state
from ambient.lab.topology import AppPlan, LabPlan, PodPlan, Step, create_netns, run_step
from services.istiod.world import world_to_json
from shared.netns import NetnsError

Progress = Callable[[str], None]
REPO_ROOT = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")
HBONE_PORT = 15008
RSS_CHECKPOINTS = (100, 500)  # ztunnel's RSS is also recorded when this many pods are enrolled
# What `--only` chooses from, in run order; rr also yields the ztunnel figures.
SCENARIOS = ("bulk", "rr", "sweep", "crr", "enrol", "conns", "churn", "faults")
TRAFFIC_SCENARIOS = frozenset({"bulk", "rr", "sweep", "crr"})  # these need the servers and a warmed-up path


def parse_scenarios(text: str) -> tuple[str, ...]:
    """`--only`'s value: comma-separated scenario names, in run order, without duplicates.

    Raises:
        ValueError: empty, or a name that is not in SCENARIOS.
    """
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(SCENARIOS))
    if unknown:
        raise ValueError(f"unknown scenario {', '.join(unknown)} (choose from {', '.join(SCENARIOS)})")
    if not names:
        raise ValueError(f"no scenario named (choose from {', '.join(SCENARIOS)})")
    return tuple(name for name in SCENARIOS if name in names)


class BenchConfig(msgspec.Struct, frozen=True, kw_only=True):
    prefix: str
    out_dir: str
    command: str
    seconds: float = 10.0  # each bulk / rr / crr run
    reps: int = 3
    rate: float = 1000.0
    conns: int = 4
    crr_conc: int = 4
    enrol_pods: int = 100
    timeout: float = 60.0
    quick: bool = False
    scenarios: tuple[str, ...] = SCENARIOS  # which to run (always in SCENARIOS order)
    ztunnel_bin: str | None = None  # a build of istio/ztunnel: the third arm (node-c, node-d)
    idle_conns: int = 10000  # conns: idle connections held at once
    churn_conns: int = 50000  # churn: short connections
    istiod_down: float = 60.0  # faults: seconds istiod stays down
    restart_conns: int = 1000  # faults: live connections during the ztunnel restart


# --- the machine and /proc -------------------------------------------------------------------------------


def machine() -> Machine:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return Machine(
        cpu_model=model,
        vcpus=os.cpu_count() or 0,
        memory_gib=mem,
        kernel=platform.release(),
        python=platform.python_version(),
    )


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid`, in seconds."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of every thread of `pid`, in seconds: its own code, and the kernel working for it."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of /proc/<pid>/status in KiB: VmRSS (all resident pages, shared libraries
    included) or RssAnon (the process's own heap and stacks)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def runqueue_wait_seconds(pid: int) -> float:
    """Seconds the threads of `pid` spent runnable but waiting for a CPU (/proc/<pid>/task/*/schedstat,
    second field): how much of a latency is CPU contention rather than the process's own work."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def host_busy_seconds() -> float:
    """CPU-seconds all vCPUs of the host spent busy (not idle or iowait) since boot, from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(f) for f in fields[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


class ProcSampler:
    """CPU seconds of some processes between start() and stop(), and their peak RSS sampled meanwhile."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.peak: dict[str, int] = dict.fromkeys(pids, 0)
        self.peak_anon: dict[str, int] = dict.fromkeys(pids, 0)
        self.cpu0: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.split0: dict[str, tuple[float, float]] = {}
        self.kernel: dict[str, float] = {}  # of `cpu`, the part the kernel spent (stime)
        self.wait0: dict[str, float] = {}
        self.wait: dict[str, float] = {}  # runqueue wait between start() and stop()
        self.host0 = 0.0
        self.host_busy = 0.0  # CPU-seconds of the whole host between start() and stop()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for name, pid in self.pids.items():
            self.peak[name] = max(self.peak[name], rss_kib(pid))
            self.peak_anon[name] = max(self.peak_anon[name], rss_kib(pid, "RssAnon"))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> None:
        self.split0 = {name: cpu_split(pid) for name, pid in self.pids.items()}
        self.cpu0 = {name: sum(split) for name, split in self.split0.items()}
        self.wait0 = {name: runqueue_wait_seconds(pid) for name, pid in self.pids.items()}
        self.host0 = host_busy_seconds()
        self._sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.cpu = {name: cpu_seconds(pid) - self.cpu0[name] for name, pid in self.pids.items()}
        self.kernel = {name: cpu_split(pid)[1] - self.split0[name][1] for name, pid in self.pids.items()}
        self.host_busy = host_busy_seconds() - self.host0
        self.wait = {name: runqueue_wait_seconds(pid) - self.wait0[name] for name, pid in self.pids.items()}


def git_state() -> tuple[str, bool]:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=False, timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=False, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "", False
    return head, bool(dirty)


def other_labs(prefix: str) -> list[str]:
    """Prefixes of the other labs on this host (their processes compete for the same vCPUs)."""
    try:
        return sorted(p.name for p in RUN_ROOT.iterdir() if p.is_dir() and p.name != prefix)
    except OSError:
        return []


def check_tools() -> None:
    lab.check_prerequisites()
    if shutil.which("iperf3") is None:
        raise PrerequisiteError(
            "`ambient bench` measures bulk throughput with iperf3; install it with: apt-get install iperf3"
        )


# --- the run ---------------------------------------------------------------------------------------------


class Bench:
    """One `ambient bench` run against a lab that is up (`state`)."""

    def __init__(self, cfg: BenchConfig, state: LabState, progress: Progress) -> None:
        self.cfg = cfg
        self.state = state
        self.progress = progress
        self.plan: LabPlan = lab.plan_of(state)
        self.paths = LabPaths(state.run_dir)
        self.pods = {p.key: p for p in self.plan.pods}
        self.arm_names = bw.arms(cfg.ztunnel_bin is not None)
        self.mesh_arms = tuple(arm for arm in self.arm_names if arm in bw.MESH_ARMS)
        self.arms = {name: bw.arm_pods(name) for name in self.arm_names}
        # arm -> role (client, server) -> pid of the ztunnel on that node
        self.ztunnels_of: dict[str, dict[str, int]] = {}
        for arm in self.mesh_arms:
            self.ztunnels_of[arm] = {}
            for role, node in bw.ARM_NODES[arm].items():
                record = state.process(f"ztunnel/{node}")
                if record is None:
                    raise BenchError(
                        f"the bench lab runs no ztunnel on {node}: is services.ztunnel installed?"
                    )
                self.ztunnels_of[arm][role] = record.pid
        self.ztunnels = self.ztunnels_of["mesh"]  # ours

    # helpers

    def pod(self, key: str) -> PodPlan:
        return self.pods[key]

    def launch(self, spec: ComponentSpec) -> None:
        record = components.start(spec)
        self.state.processes.append(record)
        save_state(self.state)
        components.wait_ready(record, timeout=self.cfg.timeout)

    def in_pod(self, key: str, argv: list[str], *, timeout: float) -> str:
        """Run argv inside the pod's netns; its stdout. Raises BenchError naming the command on failure."""
        netns = self.pod(key).netns
        try:
            proc = subprocess.run(
                ["ip", "netns", "exec", netns, *argv],
                env=components.tool_env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"`{' '.join(argv)}` in {key} did not finish within {timeout:g} s") from None
        if proc.returncode != 0:
            raise BenchError(
                f"`{' '.join(argv)}` in {key} failed ({proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-800:]}"
            )
        return proc.stdout

    def loadgen(self, arm: str, *args: str) -> dict[str, float]:
        a = self.arms[arm]
        server_ip = self.pod(a.server).ip
        argv = [PYTHON, "-m", "ambient.bench.loadgen", args[0], server_ip, *args[1:]]
        out = self.in_pod(a.client, argv, timeout=self.cfg.seconds * 3 + 30)
        data = json.loads(out)
        return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}

    def sampled_rr(self, arm: str, rate: float, seconds: float) -> tuple[dict[str, float], ProcSampler]:
        """One fixed-rate request/response run of `arm`, both ztunnels' CPU and memory sampled meanwhile
        (the arm's own pair; ours during a baseline run)."""
        sampler = ProcSampler(self.ztunnels_of.get(arm, self.ztunnels))
        sampler.start()
        try:
            out = self.loadgen(
                arm, "rr", str(bw.RR_PORT), "--rate", f"{rate:g}",
                "--conns", str(self.cfg.conns), "--seconds", f"{seconds:g}",
            )  # fmt: skip
        finally:
            sampler.stop()
        return out, sampler

    def order(self, rep: int) -> tuple[str, ...]:
        return self.arm_names if rep % 2 == 0 else tuple(reversed(self.arm_names))

    # set-up

    def start_servers(self) -> None:
        for arm in self.arm_names:
            server = self.pod(self.arms[arm].server)
            bf.loadgen_server(self, arm)
            bf.ensure_server(self, arm, "iperf3-server", ["iperf3", "-s", "-p", str(bw.IPERF_PORT)],
                             (bw.IPERF_PORT,))  # fmt: skip
            self.progress(f"{arm}: servers up in {server.key} ({server.ip})")
        time.sleep(0.5)  # iperf3 logs and recovers from the readiness probe's bare connection
        for arm in self.arm_names:
            # Many short connections per run: a wide port range and TIME_WAIT reuse inside the client pod.
            netns = self.pod(self.arms[arm].client).netns
            for setting in ("net.ipv4.ip_local_port_range=1024 65000", "net.ipv4.tcp_tw_reuse=1"):
                run_step(Step(argv=["sysctl", "-q", "-w", setting], netns=netns))

    def check_baseline_clean(self) -> None:
        """The baseline pods must carry no redirection rules (someone else's node agent could add them)."""
        for key in (self.arms["baseline"].client, self.arms["baseline"].server):
            rules = self.in_pod(key, ["iptables-save", "-t", "nat"], timeout=30)
            if "ISTIO_" in rules:
                raise BenchError(
                    f"the baseline pod {key} has in-pod redirection rules although it is not in the mesh: "
                    "a node agent (of this lab or another one on this host) enrolled it; the baseline would "
                    "be meaningless"
                )

    def warm_up(self, report: BenchReport) -> None:
        secs = "1" if self.cfg.quick else "2"
        for arm in self.arm_names:
            self.loadgen(arm, "rr", str(bw.RR_PORT), "--seconds", "1", "--rate", "200")
        base = self.loadgen("baseline", "rr", str(bw.RR_PORT), "--closed", "--seconds", secs,
                            "--conns", str(self.cfg.conns))  # fmt: skip
        mesh = self.loadgen("mesh", "rr", str(bw.RR_PORT), "--closed", "--seconds", secs,
                            "--conns", str(self.cfg.conns))  # fmt: skip
        report.generator = {"rr_closed_rps": base["rps"], "rr_closed_rps_mesh": mesh["rps"]}
        if bw.UPSTREAM_ARM in self.arms:
            theirs = self.loadgen(bw.UPSTREAM_ARM, "rr", str(bw.RR_PORT), "--closed", "--seconds", secs,
                                  "--conns", str(self.cfg.conns))  # fmt: skip
            report.generator["rr_closed_rps_upstream"] = theirs["rps"]
        self.progress(
            f"generator ceiling: {base['rps']:,.0f} req/s closed loop over {self.cfg.conns} connections "
            f"without the mesh ({mesh['rps']:,.0f} through it); the fixed-rate runs ask for {self.cfg.rate:g}"
        )
        if base["rps"] < 2 * self.cfg.rate:
            report.notes.append(
                f"the generator's closed-loop ceiling ({base['rps']:,.0f} req/s) is under twice the fixed "
                "rate: latency figures include generator queueing"
            )

    # scenarios

    def bulk(self, streams: int) -> ScenarioResult:
        scenario = ScenarioResult(
            name=f"bulk_{streams}",
            title=f"bulk throughput, {streams} stream{'s' if streams > 1 else ''}",
            method=f"iperf3 -c SERVER -P {streams} -t {self.iperf_seconds} from the client pod to the server "
            "pod (pod IP); MB/s = received bytes / seconds / 10^6",
            arms={arm: ArmResult() for arm in self.arm_names},
        )
        omit = 0 if self.cfg.seconds < 3 else 1
        for rep in range(self.cfg.reps):
            for arm in self.order(rep):
                a = self.arms[arm]
                mb_s = self.iperf(a, streams, omit)
                scenario.arms[arm].runs.append({"mb_s": mb_s})
                self.progress(f"{scenario.name} rep {rep + 1} {arm}: {mb_s:,.0f} MB/s")
        return finish_scenario(scenario)

    @property
    def iperf_seconds(self) -> int:
        return max(1, round(self.cfg.seconds))  # iperf3 takes whole seconds

    def iperf(self, a: bw.Arm, streams: int, omit: int) -> float:
        """One iperf3 run; MB/s received. The server takes one test at a time and needs a moment after
        one ends ("the server is busy"), so a refused start is retried."""
        argv = ["iperf3", "-c", self.pod(a.server).ip, "-p", str(bw.IPERF_PORT), "-J",
                "-t", str(self.iperf_seconds), "-O", str(omit), "-P", str(streams)]  # fmt: skip
        why = ""
        for _ in range(5):
            netns = self.pod(a.client).netns
            proc = subprocess.run(
                ["ip", "netns", "exec", netns, *argv],
                capture_output=True,
                text=True,
                timeout=self.cfg.seconds * 3 + 30,
                check=False,
            )
            try:
                doc = json.loads(proc.stdout)
            except ValueError:
                doc = {"error": (proc.stderr or proc.stdout).strip()[-300:] or f"exit {proc.returncode}"}
            if "error" not in doc:
                end = doc["end"]["sum_received"]
                return float(end["bytes"]) / float(end["seconds"]) / 1e6
            why = str(doc["error"])
            time.sleep(0.5)
        raise BenchError(f"iperf3 from {a.client} to {a.server} failed: {why}")

    def rr(self) -> tuple[ScenarioResult, ScenarioResult]:
        cfg = self.cfg
        rr = ScenarioResult(
            name="rr",
            title="1 KB request/response latency at a fixed rate",
            method=f"HTTP/1.1 POST of 1024 bytes answered with 1024 bytes, {cfg.rate:g} req/s over "
            f"{cfg.conns} kept-alive connections for {cfg.seconds:g} s (fortio's method); latency from "
            "the send to the response's last byte; 'mesh vs no mesh' is the difference of the medians",
            arms={arm: ArmResult() for arm in self.arm_names},
        )
        zt = ScenarioResult(
            name="ztunnel",
            title="ztunnel CPU and memory during the fixed-rate run",
            method="utime+stime from /proc/<pid>/stat of each ztunnel over the mesh arm's fixed-rate run, "
            "divided by its duration (vCPU) and by the achieved rate / 1000; peak VmRSS and RssAnon (its own "
            "heap, without shared library pages) sampled every 50 ms; the time its threads were runnable but "
            "waited for a CPU (schedstat), per request",
            mesh_only=True,
            arms={arm: ArmResult() for arm in self.mesh_arms},
        )
        for rep in range(cfg.reps):
            for arm in self.order(rep):
                out, sampler = self.sampled_rr(arm, cfg.rate, cfg.seconds)
                figures = {
                    k: out[k]
                    for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "rps", "late_sends")
                }
                figures["host_busy_vcpu"] = sampler.host_busy / out["seconds"]
                rr.arms[arm].runs.append(figures)
                self.progress(
                    f"rr rep {rep + 1} {arm}: p50 {out['p50_ms']:.3f} p90 {out['p90_ms']:.3f} "
                    f"p99 {out['p99_ms']:.3f} ms at {out['rps']:,.0f} req/s"
                )
                if arm not in self.mesh_arms:
                    continue
                if sampler.cpu["client"] <= 0 and sampler.cpu["server"] <= 0:
                    raise BenchError(
                        f"the {arm} arm's traffic did not use ztunnel (no CPU time on either): "
                        f"is the mesh pair enrolled? see `ambient lab status --prefix {cfg.prefix}`"
                    )
                kilo = out["rps"] / 1000.0
                run: dict[str, float] = {"rps": out["rps"]}
                for role in ("client", "server"):
                    vcpu = sampler.cpu[role] / out["seconds"]
                    run[f"{role}_cpu_s"] = sampler.cpu[role]
                    run[f"{role}_vcpu"] = vcpu
                    run[f"{role}_vcpu_per_1k"] = vcpu / kilo
                    run[f"{role}_rss_mib"] = sampler.peak[role] / 1024
                    run[f"{role}_mib_per_1k"] = sampler.peak[role] / 1024 / kilo
                    run[f"{role}_anon_mib"] = sampler.peak_anon[role] / 1024
                    run[f"{role}_runq_ms_per_req"] = sampler.wait[role] * 1e3 / max(1.0, out["requests"])
                zt.arms[arm].runs.append(run)
                self.progress(
                    f"{arm} ztunnel rep {rep + 1}: client {run['client_vcpu_per_1k']:.3f} / server "
                    f"{run['server_vcpu_per_1k']:.3f} vCPU per 1000 rps; RSS {run['client_rss_mib']:.1f} / "
                    f"{run['server_rss_mib']:.1f} MiB"
                )
        return finish_scenario(rr), finish_scenario(zt)

    def crr(self) -> ScenarioResult:
        cfg = self.cfg
        scenario = ScenarioResult(
            name="crr",
            title="new connections per second",
            method=f"{cfg.crr_conc} connections in flight, each: connect, send 100 bytes, read 100 bytes "
            f"and the server's close, close (netperf TCP_CRR's pattern), for {cfg.seconds:g} s",
            arms={arm: ArmResult() for arm in self.arm_names},
        )
        for rep in range(cfg.reps):
            for arm in self.order(rep):
                out = self.loadgen(arm, "crr", str(bw.CRR_PORT), "--conc", str(cfg.crr_conc),
                                   "--seconds", f"{cfg.seconds:g}")  # fmt: skip
                if out["connections"] <= 0:
                    raise BenchError(f"crr {arm}: no connection completed ({int(out['errors'])} errors)")
                scenario.arms[arm].runs.append({k: out[k] for k in ("cps", "p50_ms", "p99_ms", "errors")})
                self.progress(
                    f"crr rep {rep + 1} {arm}: {out['cps']:,.0f} conn/s ({int(out['errors'])} errors)"
                )
        return finish_scenario(scenario)

    def enrol(self) -> ScenarioResult:
        cfg = self.cfg
        n = cfg.enrol_pods
        node = bw.CLIENT_NODE
        scenario = ScenarioResult(
            name="enrol",
            title=f"pod enrolment ({n} pods on one node)",
            method=f"{n} new pods on {node}, one after another: the lab (as kubelet/CNI) POSTs the CNI ADD "
            "to the node agent, then connects to 127.0.0.1:15008 inside the pod until ztunnel's listener "
            "accepts; ztunnel's RSS before and after (per pod = difference / pods)",
            mesh_only=True,
            arms={"mesh": ArmResult()},
        )
        pid = self.ztunnels["client"]
        pods = [self.enrol_pod(i) for i in range(n)]
        self.progress(f"enrolment: {n} pod namespaces created on {node}")
        time.sleep(0.5)
        rss0, anon0 = rss_kib(pid), rss_kib(pid, "RssAnon")
        times: list[float] = []
        checkpoints: dict[str, float] = {}
        t_all = time.perf_counter()
        for pod in pods:
            t0 = time.perf_counter()
            status = lab.cni_add(self.paths, pod, timeout=cfg.timeout)
            if status not in ("enabled", "pending"):
                raise BenchError(f"CNI ADD of {pod.key} answered status {status!r}")
            deadline = t0 + cfg.timeout
            while True:
                try:
                    tcp_probe(pod.netns, "127.0.0.1", HBONE_PORT, timeout=1.0)
                    break
                except (OSError, NetnsError):
                    if time.perf_counter() > deadline:
                        raise BenchError(
                            f"ztunnel's listeners in {pod.key} did not accept within {cfg.timeout:g} s; see "
                            f"{self.paths.log(f'ztunnel/{node}')}"
                        ) from None
                    time.sleep(0.001)
            times.append(time.perf_counter() - t0)
            if len(times) in RSS_CHECKPOINTS and len(times) < n:
                checkpoints[f"rss_at_{len(times)}_mib"] = rss_kib(pid) / 1024
        total = time.perf_counter() - t_all
        time.sleep(1.0)
        rss1, anon1 = rss_kib(pid), rss_kib(pid, "RssAnon")
        p50, p99 = percentiles(times, (50, 99))
        scenario.arms["mesh"].runs.append(
            {
                "pods": float(n),
                "p50_ms": p50 * 1e3,
                "p99_ms": p99 * 1e3,
                "max_ms": max(times) * 1e3,
                "total_s": total,
                "rss_before_mib": rss0 / 1024,
                "rss_after_mib": rss1 / 1024,
                "kib_per_pod": (rss1 - rss0) / n,
                "anon_before_mib": anon0 / 1024,
                "anon_after_mib": anon1 / 1024,
                **checkpoints,
                f"rss_at_{n}_mib": rss1 / 1024,
            }
        )
        self.progress(
            f"enrolment of {n} pods: p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, all in {total:.1f} s; "
            f"ztunnel RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB ({(rss1 - rss0) / n:.1f} KiB per pod)"
        )
        return finish_scenario(scenario)

    def enrol_pod(self, i: int) -> PodPlan:
        """A bare pod netns (lo up, its address on lo): enough for the node agent's rules and ztunnel."""
        name = f"enrol-{i}"
        netns = f"{self.cfg.prefix}-e{i}"
        ip = bw.enrol_pod_ip(i)
        self.state.netns.append(netns)  # recorded before it exists: teardown removes it
        save_state(self.state)
        create_netns(netns)
        run_step(Step(argv=["ip", "-n", netns, "link", "set", "lo", "up"]))
        run_step(Step(argv=["ip", "-n", netns, "addr", "add", f"{ip}/32", "dev", "lo"]))
        return PodPlan(
            name=name, namespace=bw.NAMESPACES["mesh"], uid=f"bench-enrol-{self.cfg.prefix}-{i}",
            node=bw.CLIENT_NODE, netns=netns, host_veth="", address=f"{ip}/32", gateway=ip,
            service_account="bench-enrol", labels={"app": "enrol"}, annotations={}, ambient=True,
            ambient_reason="bench", resolv_conf="", app=AppPlan(kind="sleep"),
        )  # fmt: skip


def upstream_version(binary: str) -> str:
    """What `ztunnel version` says of itself (upstream's build info: its git revision, Rust version,
    profile), or the path when it says nothing."""
    try:
        out = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return binary
    text = out.stdout.strip()
    revision = re.search(r'GitRevision:"([^"]+)"', text)
    profile = re.search(r'BuildProfile:"([^"]+)"', text)
    if revision is None:
        return binary
    return f"istio/ztunnel {revision.group(1)}" + (f" ({profile.group(1)} build)" if profile else "")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def write_outputs(report: BenchReport, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "bench.json"
    md = out_dir / "benchmarks.md"
    js.write_bytes(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
    md.write_text(markdown(report))
    return js, md


def run_bench(cfg: BenchConfig, *, progress: Progress) -> tuple[BenchReport, Path]:
    """Build the bench lab, run every scenario for both arms, tear the lab down; the report and the
    directory its JSON and Markdown were written to.

    Raises:
        PrerequisiteError, LabError (the lab could not be built), BenchError (a measurement failed).
    """
    check_tools()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world_file = out_dir / "world.json"
    upstream = cfg.ztunnel_bin is not None
    world_file.write_bytes(world_to_json(bw.bench_world(seed=os.getpid(), upstream=upstream)))
    commit, dirty = git_state()
    report = BenchReport(
        command=cfg.command,
        started=_now(),
        git_commit=commit,
        git_dirty=dirty,
        machine=machine(),
        settings={
            "seconds": cfg.seconds,
            "reps": cfg.reps,
            "rate": cfg.rate,
            "conns": cfg.conns,
            "crr_conc": cfg.crr_conc,
            "enrol_pods": cfg.enrol_pods,
            "quick": cfg.quick,
            "scenarios": ",".join(cfg.scenarios),
            "idle_conns": cfg.idle_conns,
            "churn_conns": cfg.churn_conns,
            "istiod_down": cfg.istiod_down,
            "restart_conns": cfg.restart_conns,
        },
    )
    if cfg.ztunnel_bin is not None:
        report.settings["upstream_ztunnel"] = upstream_version(cfg.ztunnel_bin)
    others_before = other_labs(cfg.prefix)
    progress(f"building the bench lab {cfg.prefix!r}")
    state = lab.up(
        prefix=cfg.prefix, world_file=world_file, timeout=cfg.timeout, progress=progress,
        ztunnel_bin=cfg.ztunnel_bin, upstream_on=list(bw.UPSTREAM_NODES.values()) if upstream else None,
    )  # fmt: skip
    try:
        bench = Bench(cfg, state, progress)
        run = set(cfg.scenarios)
        if run & TRAFFIC_SCENARIOS:
            bench.start_servers()
            bench.check_baseline_clean()
            bench.warm_up(report)
        if "bulk" in run:
            report.scenarios.append(bench.bulk(1))
            report.scenarios.append(bench.bulk(4))
        if "rr" in run:
            report.scenarios.extend(bench.rr())
        if "sweep" in run:
            report.scenarios.append(rate_sweep(bench, arms=bench.mesh_arms))
        if "crr" in run:
            report.scenarios.append(bench.crr())
        if "enrol" in run:
            bench.check_baseline_clean()
            report.scenarios.append(bench.enrol())
        if "conns" in run:
            report.scenarios.append(bf.conns(bench))
        if "churn" in run:
            report.scenarios.append(bf.churn(bench))
        if "faults" in run:
            report.scenarios.extend(bf.faults(bench))
    finally:
        shutil.copytree(LabPaths(state.run_dir).logs, out_dir / "logs", dirs_exist_ok=True)
        progress(f"removing the bench lab {cfg.prefix!r} (its logs: {out_dir / 'logs'})")
        lab.teardown(state, progress=progress)
    report.finished = _now()
    others = sorted(set(others_before) | set(other_labs(cfg.prefix)))
    if others:
        report.notes.append(
            f"other labs were up on this host during the run ({', '.join(others)}): they share its vCPUs"
        )
    if upstream:
        report.notes.append(
            "upstream's ztunnel runs with its defaults (ZTUNNEL_WORKER_THREADS unset: 2 worker threads); "
            "ours is one process with one thread; CPU figures add up every thread of each process"
        )
    report.notes += [
        "clients reach servers by pod IP in every arm; mesh traffic is captured in the client pod "
        "(ztunnel outbound on node-a, or node-c for upstream's) and delivered by the server node's ztunnel",
        "the load generator, both servers and both ztunnels share the machine's vCPUs",
        "memory figures are MiB/KiB (2^20 / 2^10 bytes)",
    ]
    write_outputs(report, out_dir)
    return report, out_dir
