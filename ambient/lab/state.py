"""The lab's state file: everything `up` made, recorded before it is made, so `down` removes exactly that.

    /run/ambient-lab/<prefix>/state.json     this file (msgspec JSON, rewritten atomically on every change)
    /run/ambient-lab/<prefix>/logs/*.log     one log file per component and app
    /run/ambient-lab/<prefix>/<node>/        per-node sockets (ZDS, CNI events) and ztunnel's secrets

Processes are recorded with their start time (field 22 of /proc/PID/stat), so a PID that the kernel reused
for some other process is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import msgspec

from ambient.lab.errors import LabError

RUN_ROOT = Path(os.environ.get("AMBIENT_LAB_RUN_DIR", "/run/ambient-lab"))


class TcpCheck(msgspec.Struct, frozen=True, kw_only=True, tag="tcp"):
    """Ready when host:port accepts a connection from inside `netns`."""

    netns: str
    host: str
    port: int


class HttpCheck(msgspec.Struct, frozen=True, kw_only=True, tag="http"):
    """Ready when GET http://host:port/path from inside `netns` answers `status` (0: any status)."""

    netns: str
    host: str
    port: int
    path: str
    status: int = 200


class UnixHttpCheck(msgspec.Struct, frozen=True, kw_only=True, tag="unix-http"):
    """Ready when GET `path` on the Unix socket `socket` answers 200."""

    socket: str
    path: str


Check = TcpCheck | HttpCheck | UnixHttpCheck


class ComponentSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How to start one process of the lab; kept in the state file so `lab restart` starts it the same way.

    `component` is istiod, node-agent, ztunnel or app; `name` is unique in the lab ("ztunnel/node-a");
    `implementation` says whose program it is (a ztunnel may be upstream's, ambient/lab/upstream.py).
    """

    name: str
    component: str
    implementation: str = "ambient"
    netns: str
    argv: list[str]  # run inside `netns` (the lab prepends `ip netns exec <netns>`; "": in its own)
    env: dict[str, str] = {}
    cwd: str | None = None
    log: str
    checks: list[Check] = []
    node: str | None = None
    pod: str | None = None


class ProcessRecord(msgspec.Struct, kw_only=True):
    """A running process the lab started, identified by PID and start time."""

    spec: ComponentSpec
    pid: int
    start_time: int

    @property
    def name(self) -> str:
        return self.spec.name


class PodRecord(msgspec.Struct, kw_only=True):
    key: str
    node: str
    netns: str
    ip: str
    ambient: bool
    status: str  # created | enabled | pending | skipped | not-ambient | failed: ...


class LabState(msgspec.Struct, kw_only=True):
    prefix: str
    run_dir: str
    world_file: str
    phase: str = "building"  # building | up | failed
    netns: list[str] = []
    files: list[str] = []
    processes: list[ProcessRecord] = []
    pods: list[PodRecord] = []
    plan: bytes = b""  # the LabPlan as JSON (the lab status reads it back)
    kube_bin_dir: str | None = None  # `up --kubernetes`: where kubectl & co are (None: no API server)

    def process(self, name: str) -> ProcessRecord | None:
        return next((p for p in self.processes if p.name == name), None)

    def pod(self, key: str) -> PodRecord | None:
        return next((p for p in self.pods if p.key == key), None)


def run_dir(prefix: str, root: Path | None = None) -> Path:
    return (root or RUN_ROOT) / prefix


def state_path(prefix: str, root: Path | None = None) -> Path:
    return run_dir(prefix, root) / "state.json"


def load_state(prefix: str, root: Path | None = None) -> LabState | None:
    """The recorded state of lab `prefix`, or None when there is none."""
    path = state_path(prefix, root)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return msgspec.json.decode(data, type=LabState)
    except msgspec.DecodeError as exc:
        raise LabError(
            f"the lab state file {path} is damaged ({exc}); remove the lab's namespaces "
            f"(ip netns list | grep '^{prefix}-') and the file by hand"
        ) from None


def save_state(state: LabState) -> None:
    """Write the state atomically (temp file + rename), so a crash never leaves half a file.

    Mode 0600 whatever the umask: it holds the istiod admin token and every node's token.
    """
    path = Path(state.run_dir) / "state.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a leftover of a crash may have another mode: O_CREAT would keep it
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(state)))
    os.replace(tmp, path)


# --- processes -------------------------------------------------------------------------------------------


def process_start_time(pid: int) -> int | None:
    """Start time (clock ticks after boot) of `pid`, None when there is no such process or it is a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def is_running(record: ProcessRecord) -> bool:
    return process_start_time(record.pid) == record.start_time


def _reap(pid: int) -> None:
    """Collect the exit status when the process is our own child (tests run `up` in-process)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop_process(record: ProcessRecord, *, grace: float = 5.0) -> None:
    """SIGTERM the recorded process (only if it is still the one we started), SIGKILL after `grace` s."""
    if not is_running(record):
        _reap(record.pid)
        return
    try:
        os.kill(record.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(record.pid)
        if not is_running(record):
            return
        time.sleep(0.05)
    try:
        os.kill(record.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(100):
        _reap(record.pid)
        if not is_running(record):
            return
        time.sleep(0.02)
