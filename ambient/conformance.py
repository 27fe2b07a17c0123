"""ZDS conformance kit: 19 numbered cases (docs/zds-conformance.md) against any implementation of either role.

Theory of operation
-------------------
The kit talks to the implementation under test on the wire only: SOCK_SEQPACKET datagrams built and parsed
by a minimal protobuf encoder in this module (independent of shared/zds/codec.py, so our own codec cannot
hide its own mistakes), with fds attached through `shared.zds.transport`.

*Server role* (`--server PATH` or `--server-cmd 'CMD {socket}'`): the kit is a scripted ztunnel. It says
hello, receives the snapshot one datagram at a time, waits a little before each answer to check that nothing
else arrives while a request is in flight, and then misbehaves on purpose (an unsolicited datagram, an
oversized answer, EOF). When the kit starts the server itself (`--server-cmd`) it can also drive it through
its stdin with the `ambient zds serve` control lines::

    add UID=NETNS[:name[:namespace[:service_account]]]
    del UID

and so check where adds and dels go with two connections open (case 18).

*Client role* (`--client-cmd 'CMD {socket} {state}'`): the kit is a scripted node agent. It listens on a
fresh socket, starts the client command and plays each case against it, observing the client through two
things only: the wire, and a JSON *state file* the client rewrites whenever its state changes.

State-file interface (what a client must implement to be checked)
-----------------------------------------------------------------
The client writes the file atomically (write a temporary file, rename it over) as a JSON object::

    {
      "connected": true,              # a ZDS connection is up (hello sent)
      "connections": 3,               # connections established since the process started
      "snapshot_received": true,      # this connection's snapshot_sent was processed
      "ready": false,                 # readiness: connected and snapshot_received and no pending pod
      "workloads": {                  # pods whose proxies run
        "UID": {"name": "...", "namespace": "...", "service_account": "...",
                "netns": [st_ino, st_dev],   # fstat() of the received netns fd
                "generation": 7}             # grows on every (re)start of that pod's proxies
      },
      "pending": {"UID": "error text"} # pods whose proxies failed to start (retried)
    }

The effect of a request must be in the file before its answer is sent; connection changes (connected,
connections, ready after a disconnect) may lag a little, the kit polls for them. `ambient zds watch
--state-file F` and our ztunnel (env ZTUNNEL_ZDS_STATE_FILE) implement it.

Placeholders in `--client-cmd` and `--client-env` values: `{socket}` (the kit's ZDS socket), `{state}` (the
state file), `{fail_file}` (a file listing, one per line, uids whose proxies must fail to start while listed;
the kit empties it to let a retry succeed) and `{fail_uid}` (a uid that must always fail to start). Without
either failure hook the kit makes a start fail the upstream way, by holding port 15008 inside the pod's
namespace (root only). Netns fds are real namespaces (`ip netns add`, removed afterwards) when the kit runs as
root, os.pipe() fds otherwise (enough for `ambient zds watch`, not for a real ztunnel).

Verdicts: "pass", "FAIL", or "n/a" with the reason when the target lacks what a case needs. Cases 9 and 10
accept either upstream's behaviour (the process exits with code 1) or ours (NACK, close, reconnect) and say
which one was seen; the kit restarts an exited client and goes on.
"""

from __future__ import annotations

import contextlib
import enum
import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ambient.lab.probe import http_get
from services.node_agent.verify import listeners_here, socket_inodes
from shared import netns as netns_mod
from shared.errors import AmbientError
from shared.zds import transport

# --- verdicts ----------------------------------------------------------------------------------------------

TITLES: dict[int, str] = {
    1: "hello first, bytes 08 01",
    2: "snapshot: add (1 fd) / keep (no fd) ..., snapshot_sent 1a 00, one in flight",
    3: "ACK is 0a 00, NACK carries Ack.error",
    4: "DelWorkload.uid is field 2",
    5: "add without fd: NACK 'failure to read message', reconnect",
    6: "del/keep/snapshot_sent with an fd: NACK, reconnect, fd closed",
    7: "add with two fds: NACK, reconnect, no fd leak",
    8: "datagram > 1024 bytes: truncated message",
    9: "add without workload_info: NACK, then exit 1 or reconnect",
    10: "keep after snapshot, second snapshot_sent: NACK, then exit 1 or reconnect",
    11: "duplicate add: same netns no-op, other netns replaced",
    12: "del unknown uid ACKed; del inside snapshot drops the uid",
    13: "reconnect: snapshot without B drains B, A untouched",
    14: "keep{B} in the snapshot preserves running B",
    15: "proxy start failure: NACK, connection up, retried, not ready meanwhile",
    16: "readiness: false before snapshot_sent ACK and after disconnect",
    17: "unsolicited datagram closes the connection; EOF dropped quietly",
    18: "add goes to the newest connection only, del to all",
    19: "zero-length datagram is EOF for the client",
}

SERVER_CASES = (1, 2, 3, 4, 8, 17, 18)
CLIENT_CASES = (1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 19)


class Status(enum.Enum):
    PASS = "pass"
    FAIL = "FAIL"
    NA = "n/a"


@dataclass
class CaseResult:
    role: str
    number: int
    title: str
    status: Status
    details: list[str] = field(default_factory=list)


@dataclass
class KitRun:
    results: list[CaseResult]
    log_tail: str  # the last lines the process under test printed (when the kit started it)


class KitError(AmbientError):
    """The kit itself cannot run (command not found, server never listened...)."""


class CheckFailed(Exception):
    """One check of the current case failed; the message says what was expected and what was seen."""


class KitAbort(Exception):
    """The implementation under test is unusable (e.g. never connects): stop, report what is known."""


class NotApplicable(Exception):
    """The target does not offer what the current case needs; the message says what."""


class Report:
    """Collects checks per case; a case fails if any of its checks failed."""

    def __init__(self, role: str, cases: Sequence[int]) -> None:
        self.role = role
        self._cases = list(cases)
        self._ok: dict[int, list[str]] = {n: [] for n in cases}
        self._bad: dict[int, list[str]] = {n: [] for n in cases}
        self._na: dict[int, list[str]] = {n: [] for n in cases}

    def ok(self, number: int, text: str) -> None:
        self._ok[number].append(text)

    def fail(self, number: int, text: str) -> None:
        self._bad[number].append(text)

    def na(self, number: int, text: str) -> None:
        self._na[number].append(text)

    def check(self, number: int, condition: bool, good: str, bad: str) -> None:
        (self.ok if condition else self.fail)(number, good if condition else bad)

    @contextlib.contextmanager
    def case(self, number: int) -> Iterator[None]:
        """Run part of a case: CheckFailed/NotApplicable/timeouts/OSError become its verdict."""
        try:
            yield
        except CheckFailed as exc:
            self.fail(number, str(exc))
        except NotApplicable as exc:
            self.na(number, str(exc))
        except trio.TooSlowError:
            self.fail(number, "timed out")
        except OSError as exc:
            self.fail(number, f"socket error: {exc}")

    def results(self) -> list[CaseResult]:
        out = []
        for n in self._cases:
            if self._bad[n]:
                status, details = Status.FAIL, self._bad[n] + self._ok[n]
            elif self._ok[n]:
                status, details = Status.PASS, self._ok[n] + [f"n/a: {t}" for t in self._na[n]]
            else:
                status = Status.NA
                details = self._na[n] or ["not run (an earlier step failed)"]
                if not self._na[n]:
                    status = Status.FAIL
            unique = list(dict.fromkeys(d for d in details if d))
            out.append(CaseResult(self.role, n, TITLES[n], status, unique))
        return out


# --- a minimal protobuf wire encoder/parser (independent of the codec under test) -------------------------

HELLO_V1 = b"\x08\x01"
ACK = b"\x0a\x00"
SNAPSHOT_SENT = b"\x1a\x00"
MAX_DATAGRAM = 1024


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _ld(number: int, payload: bytes | str) -> bytes:
    """A length-delimited field."""
    raw = payload.encode() if isinstance(payload, str) else payload
    return _varint((number << 3) | 2) + _varint(len(raw)) + raw


def wire_add(uid: str, info: tuple[str, str, str] | None) -> bytes:
    """WorkloadRequest{add{uid, workload_info{name, namespace, service_account}}}."""
    body = _ld(1, uid)
    if info is not None:
        body += _ld(2, b"".join(_ld(i + 1, v) for i, v in enumerate(info) if v))
    return _ld(1, body)


def wire_keep(uid: str) -> bytes:
    return _ld(5, _ld(1, uid))


def wire_del(uid: str, uid_field: int = 2) -> bytes:
    return _ld(2, _ld(uid_field, uid))


def wire_nack(error: str) -> bytes:
    return _ld(1, _ld(1, error))


def parse_fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of every field; ValueError on malformed input."""
    fields: list[tuple[int, int, int | bytes]] = []
    i = 0

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            if i >= len(data) or shift > 63:
                raise ValueError("truncated varint")
            b = data[i]
            i += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    while i < len(data):
        key = varint()
        number, wtype = key >> 3, key & 7
        value: int | bytes
        if wtype == 0:
            value = varint()
        elif wtype == 2:
            length = varint()
            if i + length > len(data):
                raise ValueError("truncated length-delimited field")
            value, i = data[i : i + length], i + length
        elif wtype in (1, 5):
            size = 8 if wtype == 1 else 4
            if i + size > len(data):
                raise ValueError("truncated fixed field")
            value, i = int.from_bytes(data[i : i + size], "little"), i + size
        else:
            raise ValueError(f"unsupported wire type {wtype}")
        if number == 0:
            raise ValueError("field number 0")
        fields.append((number, wtype, value))
    return fields


def _string(fields: list[tuple[int, int, int | bytes]], number: int) -> str | None:
    value = None
    for n, wtype, v in fields:
        if n == number and wtype == 2 and isinstance(v, bytes):
            value = v.decode(errors="replace")
    return value


def parse_answer(data: bytes) -> str:
    """The Ack.error of a WorkloadResponse ("" for an ACK); ValueError if it is not one."""
    fields = parse_fields(data)
    acks = [v for n, t, v in fields if n == 1 and t == 2 and isinstance(v, bytes)]
    if not acks:
        raise ValueError(f"not a WorkloadResponse{{ack}}: {data[:32].hex(' ')}")
    return _string(parse_fields(acks[-1]), 1) or ""


@dataclass
class WireRequest:
    kind: str  # add | keep | del | snapshot_sent | ?
    uid: str = ""
    info: tuple[str, str, str] | None = None
    problems: list[str] = field(default_factory=list)


_REQUEST_KINDS = {1: "add", 5: "keep", 2: "del", 3: "snapshot_sent"}


def parse_request(data: bytes) -> WireRequest:
    """Classify a WorkloadRequest; `problems` lists wire-level deviations (e.g. del uid in field 1)."""
    try:
        fields = parse_fields(data)
    except ValueError as exc:
        return WireRequest("?", problems=[f"undecodable WorkloadRequest ({exc}): {data[:32].hex(' ')}"])
    payloads = [(n, v) for n, t, v in fields if n in _REQUEST_KINDS and t == 2 and isinstance(v, bytes)]
    if len(payloads) != 1:
        found = f"expected one payload field, got {len(payloads)}: {data[:32].hex(' ')}"
        return WireRequest("?", problems=[found])
    number, body = payloads[0]
    kind = _REQUEST_KINDS[number]
    assert isinstance(body, bytes)
    try:
        inner = parse_fields(body)
    except ValueError as exc:
        return WireRequest(kind, problems=[f"undecodable {kind} body: {exc}"])
    if kind == "add":
        info_raw = [v for n, t, v in inner if n == 2 and t == 2 and isinstance(v, bytes)]
        info = None
        if info_raw:
            wi = parse_fields(info_raw[-1])
            info = (_string(wi, 1) or "", _string(wi, 2) or "", _string(wi, 3) or "")
        return WireRequest(kind, uid=_string(inner, 1) or "", info=info)
    if kind == "keep":
        return WireRequest(kind, uid=_string(inner, 1) or "")
    if kind == "del":
        req = WireRequest(kind, uid=_string(inner, 2) or "")
        if _string(inner, 1) is not None:
            req.problems.append("DelWorkload carries a uid in field 1 (must be field 2)")
        return req
    return WireRequest(kind, problems=[] if body == b"" else ["snapshot_sent with a non-empty body"])


# --- sockets and processes ---------------------------------------------------------------------------------

Datagram = tuple[bytes, list[int], int]


class Peer:
    """One SEQPACKET connection seen from the kit; fds received are closed unless the caller keeps them."""

    def __init__(self, sock: trio.socket.SocketType, name: str) -> None:
        self.sock = sock
        self.name = name
        self.closed = False
        self.snapshot_acked = False  # our snapshot_sent on this connection was ACKed

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        try:
            await transport.send_datagram(self.sock, (data, list(fds)))
        except OSError as exc:
            raise CheckFailed(f"{self.name}: send failed: {exc.strerror or exc} (peer gone?)") from None

    async def recv(self, within: float) -> Datagram | None:
        """The next datagram, b"" for EOF (or a reset), None if nothing came within `within` seconds."""
        with trio.move_on_after(within):
            try:
                return await transport.recv_datagram(self.sock)
            except (ConnectionResetError, BrokenPipeError):
                return b"", [], 0
        return None

    async def answer(self, within: float, what: str) -> tuple[bytes, str]:
        """Wait for the answer to `what`: (raw bytes, Ack.error)."""
        got = await self.recv(within)
        if got is None:
            raise CheckFailed(f"no answer to {what} within {within:.0f} s")
        data, fds, _flags = got
        transport.close_fds(fds)
        if data == b"":
            raise CheckFailed(f"connection closed instead of an answer to {what}")
        if fds:
            raise CheckFailed(f"answer to {what} carried {len(fds)} fd(s)")
        try:
            return data, parse_answer(data)
        except ValueError as exc:
            raise CheckFailed(f"answer to {what}: {exc}") from None

    async def request(self, data: bytes, fds: Sequence[int], what: str, within: float) -> tuple[bytes, str]:
        await self.send(data, fds)
        raw, error = await self.answer(within, what)
        if data == SNAPSHOT_SENT and not fds and not error:
            self.snapshot_acked = True
        return raw, error

    async def ack(self, data: bytes, fds: Sequence[int], what: str, within: float) -> bytes:
        raw, error = await self.request(data, fds, what, within)
        if error:
            raise CheckFailed(f"{what} was NACKed: {error!r}")
        return raw

    async def expect_close(self, within: float, what: str) -> None:
        got = await self.recv(within)
        if got is None:
            raise CheckFailed(f"connection still open {within:.0f} s after {what}")
        data, fds, _ = got
        transport.close_fds(fds)
        if data:
            raise CheckFailed(f"got a datagram ({data[:16].hex(' ')}) instead of the close after {what}")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


def substitute(template: str, values: Mapping[str, str]) -> str:
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def command_argv(template: str, values: Mapping[str, str]) -> list[str]:
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise KitError(f"cannot parse command {template!r}: {exc}") from None
    if not words:
        raise KitError("empty command")
    return [substitute(w, values) for w in words]


def parse_env(items: Sequence[str], values: Mapping[str, str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KitError(f"environment option {item!r} is not KEY=VALUE")
        env[key] = substitute(value, values)
    return env


class Child:
    """A process the kit started, in its own process group; output goes to a log file."""

    def __init__(self, proc: trio.Process, log_path: Path, argv: list[str]) -> None:
        self.proc = proc
        self.log_path = log_path
        self.argv = argv

    @classmethod
    async def start(
        cls, argv: list[str], env: Mapping[str, str], log_path: Path, *, stdin: bool = False
    ) -> Child:
        full_env = dict(os.environ)
        full_env.update(env)
        with open(log_path, "ab") as log:  # noqa: ASYNC230 - a local file, opened once per process
            try:
                proc = await trio.lowlevel.open_process(
                    argv,
                    env=full_env,
                    stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise KitError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
        return cls(proc, log_path, argv)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def exited(self) -> bool:
        return self.proc.poll() is not None

    async def write_line(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            await self.proc.stdin.send_all(line.encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise CheckFailed(f"cannot write to the stdin of {self.argv[0]} (exited?)") from None

    async def stop(self) -> None:
        """End the process group we created (SIGTERM, then SIGKILL after 3 s)."""
        with trio.CancelScope(shield=True):
            if self.proc.stdin is not None:
                with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                    await self.proc.stdin.aclose()
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if self.exited:
                    break
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, sig)
                with trio.move_on_after(3):
                    await self.proc.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group, if any
            await self.proc.wait()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def held_fds(pid: int) -> list[tuple[int, int]] | None:
    """(st_ino, st_dev) of every fd of process `pid`, or None when /proc/PID/fd is not readable."""
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return None
    out = []
    for name in names:
        try:
            st = os.stat(f"{base}/{name}")
        except OSError:
            continue
        out.append((st.st_ino, st.st_dev))
    return out


def identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_ino, st.st_dev


# --- client role -------------------------------------------------------------------------------------------

FAIL_UID = "conformance-fail-pod"
HBONE_PORT = 15008


class Namespaces:
    """Pod stand-ins: real namespaces (root) or pipes; `fd(label)` is the kit's handle."""

    def __init__(self, real: bool) -> None:
        self.real = real
        self.names: list[str] = []
        self._fds: dict[str, int] = {}
        self._pipes: list[int] = []
        self.tag = f"zc{os.getpid()}{uuid.uuid4().hex[:4]}"

    def open(self, labels: Sequence[str]) -> None:
        for label in labels:
            if self.real:
                name = f"{self.tag}-{label}"
                _run_ip("netns", "add", name)
                self.names.append(name)
                _run_ip("-n", name, "link", "set", "lo", "up")
                self._fds[label] = netns_mod.open_netns(name)
            else:
                r, w = os.pipe()
                self._pipes.append(w)
                self._fds[label] = r

    def fd(self, label: str) -> int:
        return self._fds[label]

    def name(self, label: str) -> str:
        """The name under /run/netns of a real namespace."""
        return f"{self.tag}-{label}"

    def ident(self, label: str) -> list[int]:
        return list(identity(self._fds[label]))

    def close(self) -> None:
        transport.close_fds([*self._fds.values(), *self._pipes])
        self._fds.clear()
        for name in self.names:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
        self.names.clear()


def _run_ip(*args: str) -> None:
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        raise KitError(f"cannot run ip {' '.join(args)}: {exc.strerror}") from None
    if proc.returncode != 0:
        raise KitError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")


class Probe:
    """A pipe whose read end is sent where the client must close it; `held_by(pid)` finds leaks."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.ident = identity(self.r)

    def close(self) -> None:
        transport.close_fds([self.r, self.w])


@dataclass
class ClientOptions:
    command: str
    env: Sequence[str] = ()
    netns: str = "auto"  # auto | real | pipe
    timeout: float = 10.0
    retry_timeout: float = 15.0
    observe: str = "state-file"  # state-file | admin (OBSERVE_ADMIN)


OBSERVE_STATE_FILE = "state-file"
OBSERVE_ADMIN = "admin"
ADMIN_PORT = 15000  # upstream ztunnel's admin (127.0.0.1): /config_dump
READINESS_PORT = 15021  # its readiness: /healthz/ready
CLIENT_NETNS = "client"  # the kit's namespace the client runs in when observed through its admin ports


class ClientHarness:
    """The kit's scripted node agent plus the client process under test."""

    def __init__(self, opts: ClientOptions, workdir: Path, report: Report) -> None:
        self.opts = opts
        self.workdir = workdir
        self.report = report
        self.socket_path = workdir / "zds.sock"
        self.state_path = workdir / "state.json"
        self.fail_file = workdir / "fail-uids"
        self.fail_file.write_text("")
        self.values = {
            "socket": str(self.socket_path),
            "state": str(self.state_path),
            "fail_file": str(self.fail_file),
            "fail_uid": FAIL_UID,
        }
        self.argv = command_argv(opts.command, self.values)
        self.env = parse_env(opts.env, self.values)
        joined = opts.command + " " + " ".join(opts.env)
        self.fail_hook = "file" if "{fail_file}" in joined else "uid" if "{fail_uid}" in joined else None
        real = opts.netns == "real" or (opts.netns == "auto" and os.geteuid() == 0)
        self.admin = opts.observe == OBSERVE_ADMIN
        if self.admin and not real:
            raise KitError("--observe admin needs real namespaces (run as root, without --netns pipe): the "
                           "client runs in a namespace of the kit's and binds its listeners in the pods'")
        self.ns = Namespaces(real)
        if self.admin:
            self.argv = ["ip", "netns", "exec", self.ns.name(CLIENT_NETNS), *self.argv]
        self.sent: dict[str, str] = {}  # uid -> label of the netns last sent with an add of it
        self.listener = transport.bind_server_socket(self.socket_path)
        self.child: Child | None = None
        self.peer: Peer | None = None
        self.connections = 0  # hellos received from the current process
        self.accept_failures = 0
        self.starts = 0
        self.probes: list[Probe] = []

    @property
    def timeout(self) -> float:
        return self.opts.timeout

    # process ---------------------------------------------------------------------------------------------

    async def start_client(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        self.child = await Child.start(self.argv, self.env, self.workdir / "client.log")
        self.connections = 0
        self.starts += 1

    async def stop(self) -> None:
        if self.peer is not None:
            self.peer.close()
        if self.child is not None:
            await self.child.stop()
        self.listener.close()
        self.ns.close()
        for p in self.probes:
            p.close()

    def probe(self) -> Probe:
        p = Probe()
        self.probes.append(p)
        return p

    # connections -----------------------------------------------------------------------------------------

    async def accept(self) -> Peer:
        """The next connection and its hello (case 1 is checked on every hello). Fails if the client exits."""
        assert self.child is not None
        child = self.child
        result: list[trio.socket.SocketType] = []

        async def do_accept(cancel: trio.CancelScope) -> None:
            sock, _ = await self.listener.accept()
            result.append(sock)
            cancel.cancel()

        async def watch_exit(cancel: trio.CancelScope) -> None:
            await child.proc.wait()
            cancel.cancel()

        with trio.move_on_after(self.timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(do_accept, nursery.cancel_scope)
                nursery.start_soon(watch_exit, nursery.cancel_scope)
        if not result:
            self.accept_failures += 1
            if child.exited:
                message = f"client exited with code {child.proc.returncode} instead of connecting"
            else:
                message = f"client did not connect within {self.timeout:.0f} s"
            if self.accept_failures >= 3:
                raise KitAbort(f"giving up: {message} ({self.accept_failures} times in a row)")
            raise CheckFailed(message)
        self.accept_failures = 0
        peer = Peer(result[0], f"client connection #{self.connections + 1}")
        got = await peer.recv(self.timeout)
        if got is None or got[0] == b"":
            peer.close()
            raise CheckFailed("client connected but sent no hello")
        data, fds, _ = got
        transport.close_fds(fds)
        self.connections += 1
        self.report.check(
            1, data == HELLO_V1 and not fds,
            f"hello {data.hex(' ')}",
            f"connection #{self.connections}: first datagram {data[:16].hex(' ')} with {len(fds)} fd(s), "
            "expected 08 01",
        )
        self.peer = peer
        return peer

    async def fresh(self, *snapshot: tuple[bytes, list[int]], finish: bool = True) -> Peer:
        """Drop the current connection (EOF), take the next, send `snapshot` and snapshot_sent, all ACKed."""
        await self.ensure_running()
        if self.peer is not None:
            self.peer.close()
            self.peer = None
        peer = await self.accept()
        for data, fds in snapshot:
            await peer.ack(data, fds, f"snapshot entry {parse_request(data).kind}", self.timeout)
        if finish:
            await peer.ack(SNAPSHOT_SENT, [], "snapshot_sent", self.timeout)
        return peer

    async def ensure_running(self) -> None:
        if self.child is None or self.child.exited:
            if self.child is not None:
                await self.child.stop()
            await self.start_client()

    def add(self, uid: str, label: str) -> tuple[bytes, list[int]]:
        self.sent[uid] = label
        return wire_add(uid, (uid, "conformance", "sa-" + uid)), [self.ns.fd(label)]

    # the client's state: its state file, or its admin surfaces --------------------------------------------

    async def read_state(self) -> dict[str, Any] | None:
        if self.admin:
            return await trio.to_thread.run_sync(self.admin_state)
        try:
            data = json.loads(self.state_path.read_bytes())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def admin_state(self) -> dict[str, Any] | None:
        """The state-file object as far as a client's admin surfaces show it (see `state_from_admin`)."""
        where = self.ns.name(CLIENT_NETNS)
        try:
            status, body = http_get(where, "127.0.0.1", ADMIN_PORT, "/config_dump", timeout=1.0)
            dump = json.loads(body) if status == 200 else None
        except (OSError, ValueError, http.client.HTTPException, netns_mod.NetnsError):
            return None
        if not isinstance(dump, dict):
            return None
        try:
            ready = http_get(where, "127.0.0.1", READINESS_PORT, "/healthz/ready", timeout=1.0)[0] == 200
        except (OSError, http.client.HTTPException, netns_mod.NetnsError):
            ready = False
        child = self.child
        held = socket_inodes([child.pid]) if child is not None and not child.exited else set()
        listeners = {}
        for uid, label in self.sent.items():
            with contextlib.suppress(OSError, netns_mod.NetnsError), netns_mod.entered(self.ns.fd(label)):
                found = listeners_here().get(f"{HBONE_PORT}/tcp", set()) & held
                if found:
                    listeners[uid] = (self.ns.ident(label), min(found))
        peer = self.peer
        return state_from_admin(dump, ready, listeners, connected=peer is not None and not peer.closed,
                                connections=self.connections,
                                snapshot_received=peer is not None and peer.snapshot_acked)  # fmt: skip

    async def state(self) -> dict[str, Any]:
        state = await self.read_state()
        if state is None:
            where = "answer on its admin port" if self.admin else f"readable state file at {self.state_path}"
            raise CheckFailed(f"no {where}")
        return state

    async def settled(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The state right after an answer, for a check that the request took effect. A state file must
        show it at once (the timing contract); admin surfaces are updated after the answer (upstream drops
        a pod's entry once its proxies have drained), so they get up to --timeout to show it."""
        if not self.admin:
            return await self.state()
        with contextlib.suppress(CheckFailed):
            return await self.wait_state(predicate, "the request's effect")
        return await self.state()

    async def wait_state(
        self, predicate: Callable[[dict[str, Any]], bool], what: str, within: float | None = None
    ) -> dict[str, Any]:
        limit = self.timeout if within is None else within
        last: dict[str, Any] | None = None
        with trio.move_on_after(limit):
            while True:
                last = await self.read_state()
                if last is not None:
                    try:
                        if predicate(last):
                            return last
                    except (KeyError, TypeError, AttributeError):
                        pass
                await trio.sleep(0.02)
        raise CheckFailed(f"state never showed {what} within {limit:.0f} s; last state: {_brief(last)}")

    async def wait_connected(self) -> dict[str, Any]:
        n = self.connections
        return await self.wait_state(
            lambda s: s["connected"] is True and s["connections"] >= n, f"connection #{n}"
        )

    # failure checks ----------------------------------------------------------------------------------------

    async def expect_reconnect(self, number: int, answer_error: str, prefix: str, what: str,
                               *, allow_exit: bool = False) -> None:
        """After a bad request: NACK `prefix...`, the connection closed, then a new hello (or exit 1)."""
        assert self.peer is not None and self.child is not None
        self.report.check(
            number, answer_error.startswith(prefix), f"{what}: NACK {answer_error[:60]!r}",
            f"{what}: expected a NACK starting {prefix!r}, got {answer_error[:80]!r}" if answer_error
            else f"{what}: expected a NACK, got an ACK",
        )
        await self.peer.expect_close(self.timeout, f"the NACK for {what}")
        self.peer.close()
        self.peer = None
        child = self.child
        try:
            await self.accept()
        except CheckFailed:
            if not child.exited:
                raise
        if not child.exited:
            self.report.ok(number, f"{what}: connection closed, client reconnected with a new hello")
            return
        code = child.proc.returncode
        if allow_exit and code == 1:
            self.report.ok(number, f"{what}: process exited with code 1 (upstream behaviour); restarted it")
        else:
            self.report.fail(number, f"{what}: process exited with code {code}; expected a reconnect"
                             + (" or exit 1" if allow_exit else ""))
        await self.ensure_running()
        await self.accept()

    async def expect_probes_closed(self, number: int, probes: Sequence[Probe], what: str) -> None:
        assert self.child is not None
        if self.child.exited:
            return
        pid = self.child.pid
        held = held_fds(pid)
        if held is None:
            self.report.na(number, f"fd leak check: /proc/{pid}/fd is not readable")
            return
        with trio.move_on_after(2):
            while True:
                held = held_fds(pid) or []
                leaked = [p for p in probes if p.ident in held]
                if not leaked:
                    self.report.ok(number, f"{what}: received fd(s) closed")
                    return
                await trio.sleep(0.02)
        self.report.fail(number, f"{what}: the client still holds {len(leaked)} of the fds it was sent")


def state_from_admin(
    dump: Mapping[str, Any],
    ready: bool,
    listeners: Mapping[str, tuple[list[int], int]],
    *,
    connected: bool,
    connections: int,
    snapshot_received: bool,
) -> dict[str, Any]:
    """The state-file object built from what upstream's ztunnel shows: `workloads` are the uids its
    /config_dump `workloadState` lists as `Up` (with their `info`), `pending` those it lists as `Pending`, and
    `ready` is its /healthz/ready answering 200. It has no netns identities nor generations: for a running pod
    `listeners` (uid -> (netns [ino, dev], socket inode)) says in which of the kit's namespaces the client
    holds the pod's 15008 listener; that socket's inode stands in for the generation (a rebind changes it).
    The connection keys come from the wire (the kit's own view of the hello and the snapshot_sent ACK)."""
    workloads: dict[str, Any] = {}
    pending: dict[str, str] = {}
    entries = dump.get("workloadState")
    for uid, entry in (entries if isinstance(entries, dict) else {}).items():
        if not isinstance(entry, dict):
            continue
        raw_info = entry.get("info")
        info: dict[str, Any] = raw_info if isinstance(raw_info, dict) else {}
        if entry.get("state") == "Pending":
            pending[str(uid)] = "workloadState: Pending"
        elif entry.get("state") == "Up":
            netns, inode = listeners.get(str(uid), (None, 0))
            workloads[str(uid)] = {
                "name": info.get("name", ""),
                "namespace": info.get("namespace", ""),
                "service_account": info.get("serviceAccount", info.get("service_account", "")),
                "netns": netns,
                "generation": inode,
            }
    return {"connected": connected, "connections": connections, "snapshot_received": snapshot_received,
            "ready": ready, "workloads": workloads, "pending": pending}  # fmt: skip


def _brief(state: dict[str, Any] | None) -> str:
    if state is None:
        return "none"
    text = json.dumps(state, sort_keys=True)
    return text if len(text) < 400 else text[:400] + "..."


def _gen(state: dict[str, Any], uid: str) -> int:
    return int(state["workloads"][uid]["generation"])


async def run_client_kit(opts: ClientOptions, workdir: Path) -> KitRun:
    """Play client-role cases (1, 3-16, 19) against `opts.command`; see the module docstring."""
    report = Report("client", CLIENT_CASES)
    h = ClientHarness(opts, workdir, report)
    try:
        h.ns.open(["a", "b", "b2", "c", "x", *([CLIENT_NETNS] if h.admin else [])])
        await h.start_client()
        try:
            await _client_cases(h, report)
        except KitAbort as exc:
            report.fail(1, str(exc))
    finally:
        await h.stop()
    return KitRun(report.results(), h.child.log_tail() if h.child is not None else "")
    return report.results()


async def _client_cases(h: ClientHarness, report: Report) -> None:
    t = h.timeout
    pid_fd_baseline: int | None = None

    # 1, 16a, 3: first connection, readiness before the snapshot, ACK bytes
    with report.case(16):
        peer = await h.fresh(finish=False)
        state = await h.wait_connected()
        report.check(16, state["ready"] is False, "not ready before snapshot_sent",
                     f"ready before snapshot_sent: {_brief(state)}")
    with report.case(3):
        peer = h.peer or await h.fresh(finish=False)
        data, fds = h.add("pod-a", "a")
        raw, error = await peer.request(data, fds, "add pod-a", t)
        report.check(3, raw == ACK, "ACK for add is 0a 00", f"answer to a good add: {raw.hex(' ')} {error!r}")
        raw, error = await peer.request(SNAPSHOT_SENT, [], "snapshot_sent", t)
        report.check(3, raw == ACK, "ACK for snapshot_sent is 0a 00", f"snapshot_sent answer: {raw.hex(' ')}")
    with report.case(16):
        state = await h.wait_state(lambda s: s["ready"] is True, "ready after the snapshot_sent ACK")
        report.ok(16, "ready after snapshot_sent ACK")
    with report.case(11):
        peer = h.peer or await h.fresh(h.add("pod-a", "a"))
        state = await h.wait_state(lambda s: "pod-a" in s["workloads"], "pod-a running")
        gen0 = _gen(state, "pod-a")
        data, fds = h.add("pod-a", "a")
        await peer.ack(data, fds, "duplicate add pod-a (same netns)", t)
        state = await h.state()
        report.check(11, _gen(state, "pod-a") == gen0, "same netns: no restart",
                     f"same netns restarted pod-a (generation {gen0} -> {_gen(state, 'pod-a')})")
        data, fds = h.add("pod-a", "b2")
        await peer.ack(data, fds, "add pod-a (other netns)", t)
        state = await h.wait_state(lambda s: s["workloads"]["pod-a"]["netns"] == h.ns.ident("b2"),
                                   "pod-a in the new netns")
        report.check(11, _gen(state, "pod-a") != gen0, "other netns: proxies replaced",
                     "other netns: generation did not change")
    with report.case(4):
        peer = h.peer or await h.fresh()
        data, fds = h.add("abc", "b")
        await peer.ack(data, fds, "add abc", t)
        await h.wait_state(lambda s: "abc" in s["workloads"], "abc running")
        await peer.ack(wire_del("abc", uid_field=1), [], "del with the uid in field 1", t)
        state = await h.state()
        report.check(4, "abc" in state["workloads"], "del with uid in field 1 is not a del of abc",
                     "a del carrying the uid in field 1 removed abc (uid must be field 2)")
        raw_del = bytes.fromhex("12 05 12 03 61 62 63")
        await peer.ack(raw_del, [], "del 12 05 12 03 'abc'", t)
        state = await h.settled(lambda s: "abc" not in s["workloads"])
        report.check(4, "abc" not in state["workloads"], "12 05 12 03 'abc' deletes abc",
                     f"abc still running after 12 05 12 03 'abc': {_brief(state)}")
    with report.case(12):
        peer = h.peer or await h.fresh()
        await peer.ack(wire_del("no-such-pod"), [], "del of an unknown uid", t)
        report.ok(12, "del of unknown uid ACKed")

    # 15: proxy start failure
    with report.case(15):
        await _case_proxy_failure(h, report)

    # 13 and 16b: reconnect reconciliation, readiness after disconnect
    with report.case(13):
        await h.fresh(h.add("pod-a", "a"), h.add("pod-b", "b"))
        state = await h.wait_state(lambda s: {"pod-a", "pod-b"} <= set(s["workloads"]), "pod-a and pod-b")
        gen_a = _gen(state, "pod-a")
        assert h.peer is not None
        h.peer.close()
        h.peer = None
        with report.case(16):
            await h.wait_state(lambda s: s["ready"] is False, "not ready after the disconnect")
            report.ok(16, "not ready after disconnect")
        peer = await h.accept()
        state = await h.wait_connected()
        report.check(13, {"pod-a", "pod-b"} <= set(state["workloads"]), "running pods kept across reconnect",
                     f"running pods lost at reconnect: {_brief(state)}")
        report.check(16, state["ready"] is False, "not ready on a new connection before its snapshot",
                     "ready on a new connection before its snapshot")
        data, fds = h.add("pod-a", "a")
        await peer.ack(data, fds, "snapshot add pod-a", t)
        await peer.ack(SNAPSHOT_SENT, [], "snapshot_sent", t)
        state = await h.wait_state(lambda s: "pod-b" not in s["workloads"], "pod-b drained at reconcile")
        report.check(13, "pod-a" in state["workloads"] and _gen(state, "pod-a") == gen_a,
                     "pod-b drained, pod-a untouched", f"pod-a was restarted or lost: {_brief(state)}")
        pid_fd_baseline = _fd_count(h)

    # 14: keep preserves B
    with report.case(14):
        peer = h.peer or await h.fresh(h.add("pod-a", "a"))
        data, fds = h.add("pod-b", "b")
        await peer.ack(data, fds, "add pod-b", t)
        state = await h.wait_state(lambda s: "pod-b" in s["workloads"], "pod-b running")
        gen_b = _gen(state, "pod-b")
        await h.fresh((wire_keep("pod-b"), []))
        state = await h.wait_state(lambda s: "pod-a" not in s["workloads"], "pod-a drained at reconcile")
        report.check(14, "pod-b" in state["workloads"] and _gen(state, "pod-b") == gen_b,
                     "keep{pod-b} kept it running untouched", f"pod-b lost or restarted: {_brief(state)}")

    # 12b: del inside the snapshot
    with report.case(12):
        await h.fresh(h.add("pod-x", "x"), (wire_del("pod-x"), []))
        await h.wait_state(lambda s: s["snapshot_received"] is True, "snapshot received")
        state = await h.settled(lambda s: "pod-x" not in s["workloads"])
        report.check(12, "pod-x" not in state["workloads"], "del before snapshot_sent dropped pod-x",
                     f"pod-x still running after reconcile: {_brief(state)}")

    # 19: zero-length datagram
    with report.case(19):
        peer = await h.fresh(h.add("pod-a", "a"))
        await peer.send(b"")
        await peer.expect_close(t, "a zero-length datagram")
        peer.close()
        h.peer = None
        await h.accept()
        report.ok(19, "treated as EOF: no answer, connection closed, reconnected")
        report.check(19, h.child is not None and not h.child.exited, "process alive", "process exited")

    # 5-8: unreadable datagrams
    with report.case(5):
        peer = await h.fresh(h.add("pod-a", "a"))
        nofd = wire_add("pod-nofd", ("nofd", "conformance", "sa"))
        _, error = await peer.request(nofd, [], "add without fd", t)
        await h.expect_reconnect(5, error, "failure to read message", "add without fd")
    cases_6: list[tuple[str, bytes, bool]] = [
        ("del with an fd", wire_del("pod-a"), True),
        ("keep with an fd", wire_keep("pod-a"), False),
        ("snapshot_sent with an fd", SNAPSHOT_SENT, False),
    ]
    for label, request, finish in cases_6:
        with report.case(6):
            peer = await h.fresh(h.add("pod-a", "a"), finish=finish)
            probe = h.probe()
            _, error = await peer.request(request, [probe.r], label, t)
            await h.expect_reconnect(6, error, "failure to read message", label)
            await h.expect_probes_closed(6, [probe], label)
    with report.case(7):
        peer = await h.fresh(h.add("pod-a", "a"))
        p1, p2 = h.probe(), h.probe()
        _, error = await peer.request(wire_add("pod-2fd", ("two", "conformance", "sa")), [p1.r, p2.r],
                                      "add with two fds", t)
        await h.expect_reconnect(7, error, "failure to read message", "add with two fds")
        await h.expect_probes_closed(7, [p1, p2], "add with two fds")
    with report.case(8):
        peer = await h.fresh(h.add("pod-a", "a"))
        probe = h.probe()
        big = wire_add("pod-big", ("n" * 1100, "conformance", "sa"))
        _, error = await peer.request(big, [probe.r], f"add of {len(big)} bytes", t)
        await h.expect_reconnect(8, error, "failure to read message", f"{len(big)}-byte add")
        report.check(8, "trunc" in error.lower(), "error names truncation",
                     f"error does not mention truncation: {error[:80]!r}")
        await h.expect_probes_closed(8, [probe], "oversized add")

    # overall fd count, same state as the baseline (pod-a running alone, steady)
    with report.case(7):
        await h.fresh(h.add("pod-a", "a"))
        await h.wait_state(lambda s: set(s["workloads"]) == {"pod-a"} and s["ready"] is True, "pod-a alone")
        after = _fd_count(h)
        if pid_fd_baseline is None or after is None:
            report.na(7, "overall fd count not available")
        else:
            report.check(7, after <= pid_fd_baseline,
                         f"client fd count {after} (was {pid_fd_baseline} in the same state)",
                         f"client fd count grew from {pid_fd_baseline} to {after} in the same state")

    # 9, 10: protocol errors (fatal upstream)
    with report.case(9):
        peer = await h.fresh(h.add("pod-a", "a"))
        probe = h.probe()
        _, error = await peer.request(wire_add("pod-noinfo", None), [probe.r], "add without workload_info", t)
        await h.expect_reconnect(9, error, "failure to process message", "add without workload_info",
                                 allow_exit=True)
        await h.expect_probes_closed(9, [probe], "add without workload_info")
    with report.case(10):
        peer = await h.fresh(h.add("pod-a", "a"))
        _, error = await peer.request(wire_keep("pod-a"), [], "keep after snapshot_sent", t)
        await h.expect_reconnect(10, error, "failure to process message", "keep after snapshot_sent",
                                 allow_exit=True)
    with report.case(10):
        peer = await h.fresh(h.add("pod-a", "a"))
        _, error = await peer.request(SNAPSHOT_SENT, [], "second snapshot_sent", t)
        await h.expect_reconnect(10, error, "failure to process message", "second snapshot_sent",
                                 allow_exit=True)
    with report.case(3):
        # a NACK decodes as Ack.error (seen above); make sure one was checked
        report.ok(3, "NACKs carry a non-empty Ack.error")


def _fd_count(h: ClientHarness) -> int | None:
    if h.child is None or h.child.exited:
        return None
    held = held_fds(h.child.pid)
    return None if held is None else len(held)


async def _case_proxy_failure(h: ClientHarness, report: Report) -> None:
    t = h.timeout
    blocker: socket.socket | None = None
    if h.fail_hook is None and not h.ns.real:
        raise NotApplicable("needs a failure hook ({fail_file} or {fail_uid} in the command) or root "
                            "(real namespaces, port 15008 held inside one)")
    peer = await h.fresh(h.add("pod-a", "a"))
    await h.wait_state(lambda s: s["ready"] is True, "ready")
    try:
        if h.fail_hook == "file":
            h.fail_file.write_text(FAIL_UID + "\n")
        elif h.fail_hook is None:
            with netns_mod.entered(h.ns.fd("c")):
                blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                blocker.bind(("0.0.0.0", HBONE_PORT))
                blocker.listen(1)
        data, fds = h.add(FAIL_UID, "c")
        _, error = await peer.request(data, fds, "add of a pod whose proxy cannot start", t)
        report.check(15, error.startswith("failure to start proxy"), f"NACK {error[:60]!r}",
                     f"expected NACK 'failure to start proxy...', got {error[:80]!r}")
        state = await h.settled(lambda s: FAIL_UID in s["pending"] and s["ready"] is False)
        report.check(15, FAIL_UID in state["pending"] and state["ready"] is False,
                     "pod pending, not ready", f"expected pending pod and ready=false: {_brief(state)}")
        await peer.ack(wire_del("no-such-pod"), [], "del after the failed add", t)
        report.ok(15, "connection stayed up after the NACK")
        if h.fail_hook == "uid":
            report.na(15, "retry success not checked: {fail_uid} always fails (use {fail_file})")
            await peer.ack(wire_del(FAIL_UID), [], f"del {FAIL_UID}", t)
        else:
            if blocker is not None:
                blocker.close()
                blocker = None
            h.fail_file.write_text("")
            state = await h.wait_state(
                lambda s: FAIL_UID in s["workloads"] and not s["pending"] and s["ready"] is True,
                "the retried pod running and ready", within=h.opts.retry_timeout)
            report.ok(15, "retry succeeded, then ready")
            await peer.ack(wire_del(FAIL_UID), [], f"del {FAIL_UID}", t)
    finally:
        if blocker is not None:
            blocker.close()
        h.fail_file.write_text("")


# --- server role -------------------------------------------------------------------------------------------


@dataclass
class ServerOptions:
    socket_path: str | None = None
    command: str | None = None
    env: Sequence[str] = ()
    timeout: float = 10.0
    keepalive_timeout: float = 12.0  # upstream checks an idle connection every 5 s
    pacing: float = 0.2  # how long to watch for a second datagram before answering


@dataclass
class SnapshotItem:
    kind: str
    uid: str
    netns: tuple[int, int] | None = None


class ServerHarness:
    def __init__(self, opts: ServerOptions, workdir: Path, report: Report) -> None:
        self.opts = opts
        self.report = report
        self.workdir = workdir
        self.child: Child | None = None
        self.path = opts.socket_path or str(workdir / "zds.sock")
        self.peers: list[Peer] = []

    async def start(self) -> None:
        if self.opts.command is None:
            return
        values = {"socket": self.path}
        argv = command_argv(self.opts.command, values)
        self.child = await Child.start(argv, parse_env(self.opts.env, values), self.workdir / "server.log",
                                       stdin=True)
        with trio.move_on_after(self.opts.timeout):
            while not os.path.exists(self.path):  # noqa: ASYNC240 - a stat, polled
                if self.child.exited:
                    raise KitError(f"server command exited with code {self.child.proc.returncode}:\n"
                                   f"{self.child.log_tail()}")
                await trio.sleep(0.02)
            return
        raise KitError(f"server command did not create {self.path} within {self.opts.timeout:.0f} s")

    async def stop(self) -> None:
        for p in self.peers:
            p.close()
        if self.child is not None:
            await self.child.stop()

    async def connect(self) -> Peer:
        try:
            sock = await transport.connect(self.path)
        except OSError as exc:
            raise CheckFailed(f"cannot connect to {self.path}: {exc.strerror or exc}") from None
        peer = Peer(sock, f"connection #{len(self.peers) + 1}")
        self.peers.append(peer)
        await peer.send(HELLO_V1)
        return peer

    async def next_request(self, peer: Peer, what: str) -> tuple[WireRequest, list[int], bytes]:
        got = await peer.recv(self.opts.timeout)
        if got is None:
            raise CheckFailed(f"{peer.name}: nothing received within {self.opts.timeout:.0f} s ({what})")
        data, fds, flags = got
        if data == b"":
            transport.close_fds(fds)
            raise CheckFailed(f"{peer.name}: server closed the connection ({what})")
        req = parse_request(data)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            req.problems.append(f"truncated datagram (flags {flags:#x}): >{MAX_DATAGRAM} bytes or many fds")
        return req, fds, data

    async def snapshot(self, peer: Peer, *, pacing: bool, nack_first: bool = False) -> list[SnapshotItem]:
        """Receive a whole snapshot, answering each message; checks case 2 (and 3 for the answers)."""
        items: list[SnapshotItem] = []
        for _ in range(1000):
            req, fds, data = await self.next_request(peer, "snapshot")
            problems = list(req.problems)
            item = SnapshotItem(req.kind, req.uid)
            if req.kind == "add":
                if len(fds) != 1:
                    problems.append(f"add {req.uid!r} carried {len(fds)} fds, expected exactly 1")
                else:
                    item.netns = identity(fds[0])
                    if not netns_mod.is_netns(fds[0]):
                        problems.append(f"add {req.uid!r}: the fd is not a network namespace")
                if req.info is None:
                    problems.append(f"add {req.uid!r} without workload_info")
            elif fds:
                problems.append(f"{req.kind} carried {len(fds)} fd(s), expected none")
            if req.kind in ("del", "?"):
                problems.append(f"unexpected {req.kind} in the snapshot")
            transport.close_fds(fds)
            if req.kind == "snapshot_sent" and data != SNAPSHOT_SENT:
                problems.append(f"snapshot_sent encoded as {data.hex(' ')}, expected 1a 00")
            if pacing:
                extra = await peer.recv(self.opts.pacing)
                if extra is not None:
                    transport.close_fds(extra[1])
                    what = "closed the connection" if extra[0] == b"" else f"sent {extra[0][:16].hex(' ')}"
                    problems.append(f"{peer.name} {what} before our answer to {req.kind}")
            for p in problems:
                self.report.fail(2, p)
            if problems:
                raise CheckFailed(f"snapshot on {peer.name} broke the rules")
            if req.kind == "snapshot_sent":
                await peer.send(ACK)
                return items
            items.append(item)
            if nack_first and len(items) == 1:
                await peer.send(wire_nack("conformance kit: NACK on purpose"))
                if item.netns is not None:
                    self.report.ok(3, "a NACK during the snapshot is only logged")
            else:
                await peer.send(ACK)
        raise CheckFailed("snapshot longer than 1000 entries")


async def run_server_kit(opts: ServerOptions, workdir: Path) -> KitRun:
    """Play server-role cases (1, 2, 3, 4, 8, 17, 18) against a ZDS server; see the module docstring."""
    report = Report("server", SERVER_CASES)
    h = ServerHarness(opts, workdir, report)
    try:
        await h.start()
        await _server_cases(h, report)
    finally:
        await h.stop()
    return KitRun(report.results(), h.child.log_tail() if h.child is not None else "")


async def _server_cases(h: ServerHarness, report: Report) -> None:
    t = h.opts.timeout

    async def steady() -> Peer:
        """A new connection whose snapshot has been received and answered."""
        peer = await h.connect()
        await h.snapshot(peer, pacing=False)
        return peer

    c1: Peer | None = None
    with report.case(2):
        c1 = await h.connect()
        items = await h.snapshot(c1, pacing=True)
        report.ok(1, "hello 08 01 accepted (the snapshot followed)")
        kinds = [i.kind for i in items]
        report.ok(2, f"{kinds.count('add')} add + {kinds.count('keep')} keep, each with the right fds, "
                     "one in flight, then snapshot_sent 1a 00")
        if not items:
            report.na(2, "empty snapshot: give the server workloads to check add/keep")
        extra = await c1.recv(h.opts.pacing)
        report.check(3, extra is None,
                     "ACK 0a 00 accepted (next message followed; connection kept after snapshot_sent)",
                     "server sent something or closed right after our ACK of snapshot_sent")
    with report.case(17):
        if c1 is None or c1.closed:
            c1 = await steady()
        await c1.send(ACK)
        await c1.expect_close(h.opts.keepalive_timeout, "an unsolicited ACK")
        report.ok(17, "unsolicited datagram: connection closed")
    with report.case(3):
        items = await h.snapshot(await h.connect(), pacing=False, nack_first=True)
        if not items:
            report.na(3, "NACK during the snapshot not checked (empty snapshot)")
    with report.case(8):
        c3 = await h.connect()
        req, fds, _ = await h.next_request(c3, "first snapshot message")
        transport.close_fds(fds)
        big = wire_nack("x" * 1100)
        await c3.send(big)
        await c3.expect_close(t, f"a {len(big)}-byte answer to {req.kind}")
        report.ok(8, f"a {len(big)}-byte answer closed the connection (truncated message)")
    older: Peer | None = None
    with report.case(17):
        (await steady()).close()
        older = await steady()
        report.ok(17, "after our EOF the server kept serving (a new connection got its snapshot)")
        if h.child is not None:
            report.check(17, not h.child.exited, "server process alive", "server process exited")
    with report.case(18):
        if h.child is None or h.child.proc.stdin is None:
            report.na(4, "del encoding not observed: needs --server-cmd with stdin control")
            raise NotApplicable("needs --server-cmd (the kit must trigger adds and dels through stdin)")
        if older is None:
            older = await steady()
        newest = await steady()
        await _case_multi_connection(h, report, older=older, newest=newest)


async def _case_multi_connection(h: ServerHarness, report: Report, *, older: Peer, newest: Peer) -> None:
    assert h.child is not None
    uid = f"kit-pod-{uuid.uuid4().hex[:6]}"
    await h.child.write_line(f"add {uid}=/proc/self/ns/net:{uid}:conformance:kit-sa")
    req, fds, _ = await h.next_request(newest, f"add {uid} after the stdin command")
    transport.close_fds(fds)
    report.check(18, req.kind == "add" and req.uid == uid and len(fds) == 1 and not req.problems,
                 "add reached the newest connection with one fd",
                 f"newest connection got {req.kind} {req.uid!r} with {len(fds)} fd(s) {req.problems}")
    other = await older.recv(h.opts.pacing + 0.1)
    if other is not None:
        transport.close_fds(other[1])
    report.check(18, other is None, "older connection got no add",
                 "the older connection also received something after the add")
    await newest.send(ACK)
    await h.child.write_line(f"del {uid}")
    for peer in (older, newest):
        req, fds, data = await h.next_request(peer, f"del {uid}")
        transport.close_fds(fds)
        good = req.kind == "del" and req.uid == uid and not fds and not req.problems
        report.check(18, good, f"del reached {peer.name}",
                     f"{peer.name} got {req.kind} {req.uid!r} ({req.problems}) instead of del {uid}")
        if req.kind == "del":
            report.check(4, not req.problems and data == wire_del(uid),
                         f"del encoded with uid in field 2 ({data[:4].hex(' ')}...)",
                         f"del encoded as {data.hex(' ')}: {req.problems}")
        await peer.send(ACK)


# --- rendering ----------------------------------------------------------------------------------------------


def render(results: Sequence[CaseResult], *, console: Any = None) -> None:
    """Print the pass/fail table with rich."""
    from rich.table import Table

    from ambient.output import make_console

    if console is None:
        console = make_console()
    table = Table(title="ZDS conformance", show_lines=False)
    table.add_column("role")
    table.add_column("case", justify="right")
    table.add_column("what")
    table.add_column("result")
    table.add_column("details", overflow="fold")
    colour = {Status.PASS: "green", Status.FAIL: "bold red", Status.NA: "yellow"}
    for r in results:
        details = "; ".join(d for d in r.details if d)
        table.add_row(r.role, str(r.number), r.title, f"[{colour[r.status]}]{r.status.value}[/]", details)
    console.print(table)
    failed = sum(r.status is Status.FAIL for r in results)
    na = sum(r.status is Status.NA for r in results)
    console.print(f"{len(results) - failed - na} passed, {failed} failed, {na} n/a")

__all__ = [
    "CLIENT_CASES",
    "SERVER_CASES",
    "CaseResult",
    "ClientOptions",
    "KitError",
    "KitRun",
    "ServerOptions",
    "Status",
    "parse_answer",
    "parse_request",
    "render",
    "run_client_kit",
    "run_server_kit",
    "wire_add",
    "wire_del",
    "wire_keep",
    "wire_nack",
]
