"""The load and fault scenarios of `ambient bench`: conns, churn and faults (mesh arm; faults also use the
baseline pair as the capture's positive control).

conns   N idle connections held through the ztunnel pair (client pod on node-a to the server pod on node-b),
        each proved end to end when opened, then all echo at the end; both ztunnels' RSS and fds per
        connection, and their RSS once the connections closed
churn   M short connections (loadgen's crr load, a fixed count); both ztunnels' fds and RSS before and after
faults  (a) kill -9 of the server-side ztunnel mid-download: how the client saw the end, and whether the
        payload marker shows up in a packet capture on the pods' veths (tcpdump in the node netns); the same
        capture of the baseline pair must show it (plaintext is visible there)
        (b) istiod stopped for S s: a new connection every second and one kept connection echo throughout
        (c) node agent on node-a killed (-9), then a pod created there: the CNI ADD must fail, not answer
        success for a pod without redirection; after the agent is back the pod enrols
        (d) client-side ztunnel restarted with K live connections: how many still echo afterwards, and how
        long new connections failed (a new one every 50 ms)

Every fault is undone before the next (the component started again from its recorded spec, the lab's state
updated) so the lab stays usable. The loads run inside the pods (ambient/bench/connload.py, loadgen.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from ambient.bench import world as bw
from ambient.bench.connload import ECHO_PORT, STREAM_PORT
from ambient.bench.errors import BenchError
from ambient.bench.report import ArmResult, ScenarioResult, finish_scenario
from ambient.lab import components, lab
from ambient.lab.components import PYTHON, LabPaths
from ambient.lab.errors import EnrolmentError
from ambient.lab.probe import tcp_probe
from ambient.lab.state import ComponentSpec, LabState, ProcessRecord, TcpCheck, save_state, stop_process
from ambient.lab.topology import PodPlan, Step, run_step
from shared.netns import NetnsError

ROLES = {"client": bw.CLIENT_NODE, "server": bw.SERVER_NODE}
FAULT_POD_INDEX = 63990  # the node-agent fault's pod (enrolment pods count up from 0)
TRIM_WAIT = 6.0  # ztunnel gives freed memory back every 5 s: wait one round before "after" figures
PROBE_INTERVAL = 0.05  # new connections during a ztunnel restart


class FaultSettings(Protocol):
    @property
    def timeout(self) -> float: ...
    @property
    def idle_conns(self) -> int: ...
    @property
    def churn_conns(self) -> int: ...
    @property
    def istiod_down(self) -> float: ...
    @property
    def restart_conns(self) -> int: ...


class FaultBench(Protocol):
    """What these scenarios need of the bench (run.Bench)."""

    progress: Callable[[str], None]
    state: LabState
    paths: LabPaths
    ztunnels: dict[str, int]

    @property
    def cfg(self) -> FaultSettings: ...

    def pod(self, key: str) -> PodPlan: ...

    def launch(self, spec: ComponentSpec) -> None: ...

    def enrol_pod(self, i: int) -> PodPlan: ...


# --- pure parts ------------------------------------------------------------------------------------------


def pcap_packets(data: bytes) -> int:
    """Records in a classic pcap file (either byte order); a cut-off last record is not counted."""
    if len(data) < 24:
        return 0
    magic = data[:4]
    order = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    n, off = 0, 24
    while off + 16 <= len(data):
        (incl,) = struct.unpack_from(order + "I", data, off + 8)
        off += 16 + incl
        if off > len(data):
            break
        n += 1
    return n


def outage_after(attempts: Sequence[tuple[float, str]], since: float) -> float | None:
    """Seconds from `since` until new connections worked again for good: the first success after the last
    failure (0 when none failed after `since`); None when none succeeded after the last failure."""
    after = [(t, outcome) for t, outcome in attempts if t >= since]
    failures = [t for t, outcome in after if outcome != "ok"]
    if not failures:
        return 0.0
    last = failures[-1]
    back = [t for t, outcome in after if outcome == "ok" and t > last]
    return back[0] - since if back else None


def share_ok(results: Sequence[tuple[float, str]], since: float) -> tuple[int, int]:
    """(successes, attempts) among the results at or after `since`."""
    chosen = [outcome for t, outcome in results if t >= since]
    return sum(1 for o in chosen if o == "ok"), len(chosen)


def transfer_failed(outcome: str) -> bool:
    """A broken transfer must reach the app as a failure: a reset or an error, never a complete or clean
    end (`eof` before the size it asked for is a truncation that looks complete)."""
    return outcome in ("reset", "error")


# --- processes in pods and nodes -------------------------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sample(bench: FaultBench) -> dict[str, tuple[int, int]]:
    """role -> (VmRSS KiB, open fds) of both ztunnels."""
    return {role: (vm_rss_kib(pid), fd_count(pid)) for role, pid in bench.ztunnels.items()}


def _spawn(netns: str, argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=components.tool_env(),
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    """End a process this module started (by its PID) and collect it."""
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def read_event(proc: subprocess.Popen[str], event: str, timeout: float, what: str) -> dict[str, object]:
    """The next JSON line of `proc` whose "event" is `event`.

    Raises:
        BenchError: the process ended or said nothing within `timeout` s (with its stderr).
    """
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, left))
        line = proc.stdout.readline() if ready else ""
        if line:
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and doc.get("event") == event:
                    return doc
            continue
        if ready or left <= 0:  # end of output, or nothing in time
            code = proc.poll()
            _stop(proc)
            err = proc.stderr.read() if proc.stderr is not None and not proc.stderr.closed else ""
            state = f"exited with {code}" if code is not None else f"said nothing for {timeout:g} s"
            raise BenchError(f"{what} {state} before {event!r}: {(err or '').strip()[-800:]}")


def _num(doc: dict[str, object], key: str) -> float:
    """A number of a load process's JSON line (BenchError when it is missing or not a number)."""
    value = doc.get(key)
    if not isinstance(value, (int, float)):
        raise BenchError(f"the load process reported no number {key!r}: {doc}")
    return float(value)


def _tell(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()


def _connload(*args: str) -> list[str]:
    return [PYTHON, "-m", "ambient.bench.connload", *args]


def ensure_server(bench: FaultBench, arm: str, what: str, argv: list[str], ports: Sequence[int]) -> None:
    """Start a server in the arm's server pod unless it runs already (recorded: teardown stops it)."""
    name = f"bench/{arm}/{what}"
    if bench.state.process(name) is not None:
        return
    server = bench.pod(bw.arm_pods(arm).server)
    bench.launch(
        ComponentSpec(
            name=name,
            component="app",
            netns=server.netns,
            argv=argv,
            log=str(bench.paths.log(name)),
            checks=[TcpCheck(netns=server.netns, host="127.0.0.1", port=p) for p in ports],
            node=server.node,
            pod=server.key,
        )
    )


def loadgen_server(bench: FaultBench, arm: str) -> str:
    """loadgen's servers in the arm's server pod (rr, crr, and the echo and stream ports of connload);
    the pod's IP."""
    argv = [PYTHON, "-m", "ambient.bench.loadgen", "serve", "--rr-port", str(bw.RR_PORT),
            "--crr-port", str(bw.CRR_PORT), "--echo-port", str(ECHO_PORT),
            "--stream-port", str(STREAM_PORT)]  # fmt: skip
    ensure_server(bench, arm, "loadgen-serve", argv, (bw.RR_PORT, bw.CRR_PORT, ECHO_PORT, STREAM_PORT))
    return bench.pod(bw.arm_pods(arm).server).ip


def restart_component(bench: FaultBench, name: str) -> ProcessRecord:
    """Start a stopped (or killed) component again from its recorded spec; wait until it is ready."""
    record = bench.state.process(name)
    if record is None:
        raise BenchError(f"the bench lab runs no {name}")
    stop_process(record)  # collects a killed child; stops it when it still runs
    fresh = components.start(record.spec)
    bench.state.processes = [fresh if p.name == name else p for p in bench.state.processes]
    save_state(bench.state)
    components.wait_ready(fresh, timeout=bench.cfg.timeout)
    for role, node in ROLES.items():
        if name == f"ztunnel/{node}":
            bench.ztunnels[role] = fresh.pid
    return fresh


def _record(bench: FaultBench, name: str) -> ProcessRecord:
    record = bench.state.process(name)
    if record is None:
        raise BenchError(f"the bench lab runs no {name}")
    return record


def _mesh_only(name: str, title: str, method: str) -> ScenarioResult:
    return ScenarioResult(name=name, title=title, method=method, mesh_only=True, arms={"mesh": ArmResult()})


# --- conns -----------------------------------------------------------------------------------------------


def conns(bench: FaultBench) -> ScenarioResult:
    n = bench.cfg.idle_conns
    scenario = _mesh_only(
        "conns",
        f"{n:,} idle connections through one ztunnel pair",
        f"{n:,} connections from the mesh client pod (node-a) to an echo server in the mesh server pod "
        "(node-b), opened 200 at a time, each proved with one byte each way, then idle; both ztunnels' VmRSS "
        "and open fds (/proc/<pid>/fd) before, while all are held (per connection = difference / held) and "
        f"{TRIM_WAIT:g} s after they closed; at the end every connection sends 4 bytes and must read them "
        "back",
    )
    client = bench.pod(bw.arm_pods("mesh").client)
    server_ip = loadgen_server(bench, "mesh")
    time.sleep(0.5)
    before = sample(bench)
    proc = _spawn(
        client.netns,
        _connload(
            "hold", server_ip, str(ECHO_PORT), "--conns", str(n), "--timeout", f"{bench.cfg.timeout * 5:g}"
        ),
    )
    try:
        held_doc = read_event(proc, "held", bench.cfg.timeout * 5 + 30, "connload hold")
        held = int(_num(held_doc, "held"))
        bench.progress(f"conns: {held:,} of {n:,} held after {_num(held_doc, 'seconds'):.1f} s")
        time.sleep(1.0)
        peak = sample(bench)
        _tell(proc)
        echoed = read_event(proc, "echoed", bench.cfg.timeout * 5 + 30, "connload hold")
    finally:
        _stop(proc)
    time.sleep(TRIM_WAIT)
    after = sample(bench)
    ok = int(_num(echoed, "ok"))
    run: dict[str, float] = {
        "conns": float(n),
        "held": float(held),
        "echoed": float(ok),
        "all_echoed": 1.0 if ok == n else 0.0,
        "open_s": _num(held_doc, "seconds"),
    }
    per = max(1, held)
    for role in ROLES:
        run[f"{role}_rss_before_mib"] = before[role][0] / 1024
        run[f"{role}_rss_held_mib"] = peak[role][0] / 1024
        run[f"{role}_rss_after_mib"] = after[role][0] / 1024
        run[f"{role}_kib_per_conn"] = (peak[role][0] - before[role][0]) / per
        run[f"{role}_fds_per_conn"] = (peak[role][1] - before[role][1]) / per
        run[f"{role}_fds_after_growth"] = float(after[role][1] - before[role][1])
    scenario.arms["mesh"].runs.append(run)
    bench.progress(
        f"conns: {ok:,} of {n:,} echoed; KiB per connection client {run['client_kib_per_conn']:.1f} / server "
        f"{run['server_kib_per_conn']:.1f}; fds per connection {run['client_fds_per_conn']:.2f} / "
        f"{run['server_fds_per_conn']:.2f}; RSS after close {run['client_rss_after_mib']:.1f} / "
        f"{run['server_rss_after_mib']:.1f} MiB (before {run['client_rss_before_mib']:.1f} / "
        f"{run['server_rss_before_mib']:.1f})"
    )
    return finish_scenario(scenario)


# --- churn -----------------------------------------------------------------------------------------------


def churn(bench: FaultBench) -> ScenarioResult:
    n = bench.cfg.churn_conns
    scenario = _mesh_only(
        "churn",
        f"{n:,} short connections",
        f"{n:,} connections from the mesh client pod to the mesh server pod, 4 in flight, each: connect, 100 "
        "bytes each way, the server's close (loadgen crr with a count); both ztunnels' open fds and VmRSS "
        "after "
        f"200 warm-up connections and {TRIM_WAIT:g} s after the last one",
    )
    mesh = bw.arm_pods("mesh")
    loadgen_server(bench, "mesh")
    client = bench.pod(mesh.client)
    for setting in ("net.ipv4.ip_local_port_range=1024 65000", "net.ipv4.tcp_tw_reuse=1"):
        run_step(Step(argv=["sysctl", "-q", "-w", setting], netns=client.netns))
    server_ip = bench.pod(mesh.server).ip

    def crr(count: int) -> dict[str, float]:
        argv = [
            PYTHON,
            "-m",
            "ambient.bench.loadgen",
            "crr",
            server_ip,
            str(bw.CRR_PORT),
            "--conc",
            "4",
            "--count",
            str(count),
            "--seconds",
            f"{count / 50 + 60:g}",
        ]
        proc = subprocess.run(
            ["ip", "netns", "exec", client.netns, *argv],
            env=components.tool_env(),
            capture_output=True,
            text=True,
            timeout=count / 50 + 120,
            check=False,
        )
        if proc.returncode != 0:
            raise BenchError(f"loadgen crr in {mesh.client} failed: {proc.stderr.strip()[-800:]}")
        return {k: float(v) for k, v in json.loads(proc.stdout).items()}

    crr(200)
    time.sleep(TRIM_WAIT)
    before = sample(bench)
    out = crr(n)
    time.sleep(TRIM_WAIT)
    after = sample(bench)
    run: dict[str, float] = {
        "conns": float(n),
        "completed": out["connections"],
        "errors": out["errors"],
        "cps": out["cps"],
    }
    for role in ROLES:
        run[f"{role}_fds_before"] = float(before[role][1])
        run[f"{role}_fds_after"] = float(after[role][1])
        run[f"{role}_fd_growth"] = float(after[role][1] - before[role][1])
        run[f"{role}_rss_before_mib"] = before[role][0] / 1024
        run[f"{role}_rss_after_mib"] = after[role][0] / 1024
        run[f"{role}_rss_growth_mib"] = (after[role][0] - before[role][0]) / 1024
    scenario.arms["mesh"].runs.append(run)
    bench.progress(
        f"churn: {out['connections']:,.0f} of {n:,} completed ({out['errors']:.0f} errors, "
        f"{out['cps']:,.0f}/s); "
        + "; ".join(
            f"{role} ztunnel fds {before[role][1]} -> {after[role][1]}, RSS "
            f"{before[role][0] / 1024:.1f} -> {after[role][0] / 1024:.1f} MiB"
            for role in ROLES
        )
    )
    return finish_scenario(scenario)


# --- faults ----------------------------------------------------------------------------------------------


class Capture:
    """tcpdump on one pod's veth, inside its node's netns, into a file of the run directory."""

    def __init__(self, bench: FaultBench, pod: PodPlan, label: str) -> None:
        node = lab.plan_of(bench.state).node(pod.node)
        self.path = bench.paths.run_dir / f"capture-{label}.pcap"
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                node.netns,
                "tcpdump",
                "-i",
                pod.host_veth,
                "-s",
                "0",
                "-U",
                "-n",
                "-w",
                str(self.path),
                "tcp",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        ready, _, _ = select.select([self.proc.stderr], [], [], 10.0)
        line = self.proc.stderr.readline() if ready else ""
        if "listening on" not in line:
            _stop_capture(self.proc)
            raise BenchError(f"tcpdump on {pod.host_veth} in {node.netns} did not start: {line.strip()}")

    def finish(self, marker: bytes) -> tuple[int, bool]:
        """Stop the capture; (packets captured, whether `marker` is in any of them)."""
        _stop_capture(self.proc)
        data = self.path.read_bytes() if self.path.exists() else b""
        return pcap_packets(data), marker in data


def _stop_capture(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # tcpdump flushes and writes its counts
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    if proc.stderr is not None:
        proc.stderr.close()


def fault_kill(bench: FaultBench) -> ScenarioResult:
    """(a) kill -9 of the server-side ztunnel during a download."""
    scenario = ScenarioResult(
        name="fault_kill",
        title="kill -9 of the server-side ztunnel mid-transfer",
        method="the mesh client downloads from the mesh server pod (both directions carry a random marker); "
        "after the first MiB the server-side ztunnel (node-b) gets SIGKILL; the client's outcome must be a "
        "reset or an error, never a clean end; for 3 s more it opens new connections that send the marker; "
        "tcpdump in each node netns on the client's and the server's veth (host end) captures every TCP "
        "packet leaving or entering the pods, and the files are searched for the marker. The no-mesh column "
        "is "
        "the capture's positive control: the baseline pair's 4 MiB download, where the marker must be found",
        arms={"baseline": ArmResult(), "mesh": ArmResult()},
    )
    marker = f"AMBIENT-BENCH-MARKER-{secrets.token_hex(8)}"
    for arm in bw.ARMS:
        a = bw.arm_pods(arm)
        server_ip = loadgen_server(bench, arm)
        client = bench.pod(a.client)
        caps = [
            Capture(bench, bench.pod(key), f"{arm}-{side}")
            for side, key in (("client", a.client), ("server", a.server))
        ]
        run: dict[str, float] = {}
        try:
            if arm == "baseline":
                argv = _connload(
                    "stream",
                    server_ip,
                    str(STREAM_PORT),
                    "--marker",
                    marker,
                    "--bytes",
                    str(4 << 20),
                    "--seconds",
                    "30",
                )
                proc = _spawn(client.netns, argv)
                try:
                    ended = read_event(proc, "ended", 60, "connload stream (baseline)")
                finally:
                    _stop(proc)
            else:
                ended = _kill_mid_transfer(bench, client, server_ip, marker)
                outcome = str(ended["outcome"])
                run["transfer_failed"] = 1.0 if transfer_failed(outcome) else 0.0
                run["client_reset"] = 1.0 if outcome == "reset" else 0.0
                run["received_mib"] = _num(ended, "received") / 2**20
                retries = ended.get("retries")
                retried = retries if isinstance(retries, dict) else {}
                run["retries"] = float(sum(retried.values()))
                run["retries_ok"] = float(retried.get("ok", 0))
                bench.progress(
                    f"fault kill: the client's download ended with {outcome!r} after "
                    f"{run['received_mib']:.1f} MiB; new connections meanwhile: {retried}"
                )
        finally:
            seen = [cap.finish(marker.encode()) for cap in caps]
        run["packets"] = float(sum(n for n, _ in seen))
        run["marker_seen"] = 1.0 if any(found for _, found in seen) else 0.0
        scenario.arms[arm].runs.append(run)
        bench.progress(
            f"fault kill, {arm}: {int(run['packets']):,} packets captured on the pods' veths, "
            f"marker {'found' if run['marker_seen'] else 'not found'}"
        )
    restart_component(bench, f"ztunnel/{bw.SERVER_NODE}")
    lab.wait_node_pods_held(bench.state, bw.SERVER_NODE, timeout=bench.cfg.timeout)
    bench.progress(f"fault kill: ztunnel on {bw.SERVER_NODE} started again and holds its pods")
    return finish_scenario(scenario)


def _kill_mid_transfer(bench: FaultBench, client: PodPlan, server_ip: str, marker: str) -> dict[str, object]:
    argv = _connload(
        "stream", server_ip, str(STREAM_PORT), "--marker", marker, "--seconds", "30", "--retry-seconds", "3"
    )
    proc = _spawn(client.netns, argv)
    try:
        read_event(proc, "started", 30, "connload stream (mesh)")
        time.sleep(0.3)
        record = _record(bench, f"ztunnel/{bw.SERVER_NODE}")
        os.kill(record.pid, signal.SIGKILL)
        return read_event(proc, "ended", 60, "connload stream (mesh)")
    finally:
        _stop(proc)


def fault_istiod(bench: FaultBench) -> ScenarioResult:
    """(b) istiod stopped for a while: connections between enrolled pods go on."""
    down = bench.cfg.istiod_down
    scenario = _mesh_only(
        "fault_istiod",
        f"istiod down for {down:g} s",
        f"istiod stopped (SIGTERM) for {down:g} s; meanwhile the mesh client opens a new connection to the "
        "mesh server every second (one byte echoed) and echoes one byte every second on a connection opened "
        "before the stop; then istiod is started again and 3 s of new connections check the way back",
    )
    client = bench.pod(bw.arm_pods("mesh").client)
    server_ip = loadgen_server(bench, "mesh")
    proc = _spawn(
        client.netns,
        _connload("probe", server_ip, str(ECHO_PORT), "--seconds", f"{down:g}", "--interval", "1", "--keep"),
    )
    try:
        time.sleep(0.5)
        t_down = time.monotonic()
        stop_process(_record(bench, "istiod"), grace=2.0)
        bench.progress(f"fault istiod: istiod stopped for {down:g} s")
        probed = read_event(proc, "probed", down + 60, "connload probe")
    finally:
        _stop(proc)
    restart_component(bench, "istiod")
    t_up = time.monotonic()
    after = _spawn(
        client.netns, _connload("probe", server_ip, str(ECHO_PORT), "--seconds", "3", "--interval", "0.5")
    )
    try:
        back = read_event(after, "probed", 60, "connload probe")
    finally:
        _stop(after)
    new_ok, new_n = share_ok(_pairs(probed["attempts"]), t_down)
    kept_ok, kept_n = share_ok(_pairs(probed["kept"]), t_down)
    back_ok, back_n = share_ok(_pairs(back["attempts"]), 0.0)
    run = {
        "down_s": t_up - t_down,
        "new_ok": float(new_ok),
        "new_total": float(new_n),
        "new_ok_pct": 100.0 * new_ok / max(1, new_n),
        "kept_ok": float(kept_ok),
        "kept_total": float(kept_n),
        "kept_ok_pct": 100.0 * kept_ok / max(1, kept_n),
        "after_ok_pct": 100.0 * back_ok / max(1, back_n),
    }
    scenario.arms["mesh"].runs.append(run)
    bench.progress(
        f"fault istiod: {new_ok}/{new_n} new connections and {kept_ok}/{kept_n} echoes on the "
        f"kept one worked while istiod was down; after it came back {back_ok}/{back_n}"
    )
    return finish_scenario(scenario)


def _pairs(value: object) -> list[tuple[float, str]]:
    if not isinstance(value, list):
        return []
    return [(float(t), str(o)) for t, o in value]


def fault_agent(bench: FaultBench) -> ScenarioResult:
    """(c) node agent down while a pod is created."""
    node = bw.CLIENT_NODE
    scenario = _mesh_only(
        "fault_agent",
        "node agent down while a pod is created",
        f"the node agent on {node} gets SIGKILL; a new ambient pod's netns is created there and the lab (as "
        "kubelet running the CNI plugin) POSTs its CNI ADD: it must fail (the runtime then does not start "
        "the pod), not answer success for a pod without redirection; the agent is started again, the ADD "
        "retried, "
        "and the pod must enrol (ztunnel's 15008 accepting inside it)",
    )
    name = f"node-agent/{node}"
    plan = lab.plan_of(bench.state)
    before = lab.zds_connections(plan, node)
    os.kill(_record(bench, name).pid, signal.SIGKILL)
    time.sleep(0.2)
    pod = bench.enrol_pod(FAULT_POD_INDEX)
    t0 = time.monotonic()
    why = ""
    try:
        status = lab.cni_add(bench.paths, pod, timeout=bench.cfg.timeout)
    except EnrolmentError as exc:
        status, why = "failed", str(exc)
    failed_s = time.monotonic() - t0
    bench.progress(f"fault agent: CNI ADD with the node agent down: {status} after {failed_s:.2f} s ({why})")
    restart_component(bench, name)
    t_up = time.monotonic()
    if before >= 0:
        lab.wait_zds_resync(
            plan, node, before, timeout=bench.cfg.timeout, log=str(bench.paths.log(f"ztunnel/{node}"))
        )
    retry = lab.cni_add(bench.paths, pod, timeout=bench.cfg.timeout)
    enrolled = _wait_listener(pod, bench.cfg.timeout)
    run = {
        "add_failed": 1.0 if status == "failed" else 0.0,
        "add_answer_s": failed_s,
        "enrolled_after": 1.0 if enrolled and retry in ("enabled", "pending") else 0.0,
        "enrol_after_restart_s": time.monotonic() - t_up,
    }
    scenario.arms["mesh"].runs.append(run)
    bench.progress(
        f"fault agent: after the agent came back the ADD answered {retry!r}; pod "
        f"{'enrolled' if enrolled else 'NOT enrolled'} {run['enrol_after_restart_s']:.1f} s "
        "after the restart"
    )
    return finish_scenario(scenario)


def _wait_listener(pod: PodPlan, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            tcp_probe(pod.netns, "127.0.0.1", 15008, timeout=1.0)
            return True
        except (OSError, NetnsError):
            time.sleep(0.05)
    return False


def fault_restart(bench: FaultBench) -> ScenarioResult:
    """(d) client-side ztunnel restarted with live connections."""
    n = bench.cfg.restart_conns
    node = bw.CLIENT_NODE
    scenario = _mesh_only(
        "fault_restart",
        f"ztunnel restart with {n:,} live connections",
        f"{n:,} idle connections held from the mesh client to the mesh server; the client-side ztunnel "
        f"({node}) is restarted as `ambient lab restart ztunnel {node}` does (SIGTERM: drain, exit; the new "
        "process takes the pods over ZDS); afterwards each held connection sends 4 bytes and must read them "
        f"back (survived); a new connection every {PROBE_INTERVAL * 1000:g} ms from the same pod gives the "
        "time from the SIGTERM until new connections worked again for good",
    )
    client = bench.pod(bw.arm_pods("mesh").client)
    server_ip = loadgen_server(bench, "mesh")
    hold = _spawn(
        client.netns,
        _connload(
            "hold", server_ip, str(ECHO_PORT), "--conns", str(n), "--timeout", f"{bench.cfg.timeout * 2:g}"
        ),
    )
    probe = None
    try:
        held = int(_num(read_event(hold, "held", bench.cfg.timeout * 2 + 30, "connload hold"), "held"))
        probe = _spawn(
            client.netns,
            _connload(
                "probe",
                server_ip,
                str(ECHO_PORT),
                "--seconds",
                f"{bench.cfg.timeout * 3:g}",
                "--interval",
                f"{PROBE_INTERVAL:g}",
                "--until-stdin",
            ),
        )
        time.sleep(1.0)
        t_stop = time.monotonic()
        fresh = restart_component(bench, f"ztunnel/{node}")
        ready_s = time.monotonic() - t_stop
        lab.wait_node_pods_held(bench.state, node, timeout=bench.cfg.timeout)
        held_s = time.monotonic() - t_stop
        time.sleep(2.0)
        _tell(hold)
        echoed = read_event(hold, "echoed", bench.cfg.timeout * 2 + 30, "connload hold")
        _tell(probe)
        probed = read_event(probe, "probed", 30, "connload probe")
    finally:
        _stop(hold)
        if probe is not None:
            _stop(probe)
    back = outage_after(_pairs(probed["attempts"]), t_stop)
    if back is None:
        raise BenchError(
            f"new connections through the restarted ztunnel (pid {fresh.pid}) never worked again"
        )
    survived = int(_num(echoed, "ok"))
    run = {
        "conns": float(n),
        "held": float(held),
        "survived": float(survived),
        "survived_pct": 100.0 * survived / max(1, held),
        "new_back_s": back,
        "ready_s": ready_s,
        "pods_held_s": held_s,
    }
    scenario.arms["mesh"].runs.append(run)
    bench.progress(
        f"fault restart: {survived:,} of {held:,} connections survived; new connections worked "
        f"again {back:.2f} s after the SIGTERM (new ztunnel ready after {ready_s:.2f} s); outcomes "
        f"of the held ones: { {k: v for k, v in echoed.items() if k not in ('event', 'seconds')} }"
    )
    return finish_scenario(scenario)


def faults(bench: FaultBench) -> list[ScenarioResult]:
    """The four fault cases, in order; each one undone before the next."""
    return [fault_kill(bench), fault_istiod(bench), fault_agent(bench), fault_restart(bench)]
