"""`ambient zds serve|watch` and `ambient zds-conformance` as an operator meets them: bad input gives one
clear line and exit 1 (or argparse's exit 2), never a traceback; serve and watch talk to each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from ambient.zds import parse_workload

REPO = Path(__file__).resolve().parents[2]


def ambient(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ambient.zds", *args],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False, input=stdin,
    )


def assert_clean_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_parse_workload_defaults_and_errors() -> None:
    spec = parse_workload("pod-1=ns1")
    assert (spec.uid, spec.netns, spec.info.name, spec.info.namespace, spec.info.service_account) == (
        "pod-1", "ns1", "pod-1", "default", "default"
    )
    spec = parse_workload("pod-2=/proc/1/ns/net:web:shop:web-sa")
    assert (spec.netns, spec.info.name, spec.info.namespace, spec.info.service_account) == (
        "/proc/1/ns/net", "web", "shop", "web-sa"
    )
    for bad in ("pod", "=ns1", "pod=", "pod=a:b:c:d:e"):
        with pytest.raises(ValueError, match="is not UID=NETNS"):
            parse_workload(bad)


def test_serve_bad_netns_path_is_a_clear_error(tmp_path: Path) -> None:
    proc = ambient("zds", "serve", "--socket", str(tmp_path / "s"), "--workload", "p=/nonexistent/netns")
    assert_clean_error(proc, 1, "ambient zds serve: error:", "/nonexistent/netns does not exist")
    assert not (tmp_path / "s").exists()


def test_serve_netns_that_is_not_a_namespace(tmp_path: Path) -> None:
    plain = tmp_path / "plain-file"
    plain.write_text("")
    proc = ambient("zds", "serve", "--socket", str(tmp_path / "s"), "--workload", f"p={plain}")
    assert_clean_error(proc, 1, "not a network namespace")


def test_serve_malformed_workload_is_a_usage_error(tmp_path: Path) -> None:
    proc = ambient("zds", "serve", "--socket", str(tmp_path / "s"), "--workload", "no-equals-sign")
    assert_clean_error(proc, 2, "is not UID=NETNS")


def test_serve_socket_path_is_a_directory(tmp_path: Path) -> None:
    proc = ambient("zds", "serve", "--socket", str(tmp_path), "--workload", "p=/proc/self/ns/net")
    assert_clean_error(proc, 1, "is a directory")


def test_watch_unwritable_state_file(tmp_path: Path) -> None:
    missing_dir = str(tmp_path / "no" / "such" / "state.json")
    proc = ambient("zds", "watch", "--socket", str(tmp_path / "s"), "--state-file", missing_dir)
    assert_clean_error(proc, 1, "cannot write state file")


def test_conformance_usage_errors(tmp_path: Path) -> None:
    assert_clean_error(ambient("zds-conformance"), 2, "nothing to check")
    assert_clean_error(ambient("zds-conformance", "--server", str(tmp_path / "none")), 1, "does not exist")
    assert_clean_error(
        ambient("zds-conformance", "--client-cmd", "/nonexistent/ztunnel {socket}"), 1, "cannot start"
    )
    assert_clean_error(ambient("zds-conformance", "--client-cmd", "x", "--client-env", "NOEQUALS"), 1,
                       "not KEY=VALUE")


# --- serve and watch together ------------------------------------------------------------------------------


class Lines:
    """JSON/text lines of a child's stdout, read in the background."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.lines: list[str] = []
        self._changed = trio.Event()

    async def pump(self) -> None:
        buf = b""
        async for chunk in self.stream:
            buf += chunk
            *done, buf = buf.split(b"\n")
            self.lines.extend(line.decode() for line in done)
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, predicate: Any) -> str:
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if predicate(line):
                    return line
            seen = len(self.lines)
            await self._changed.wait()


def event(kind: str, uid: str | None = None) -> Any:
    def match(line: str) -> bool:
        try:
            obj = json.loads(line)
        except ValueError:
            return False
        return isinstance(obj, dict) and obj.get("event") == kind and (uid is None or obj.get("uid") == uid)

    return match


async def test_serve_and_watch_talk_add_and_del_from_stdin(tmp_path: Path) -> None:
    sock, state = str(tmp_path / "zds.sock"), tmp_path / "state.json"
    base = [sys.executable, "-m", "ambient.zds", "zds"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    serve = await trio.lowlevel.open_process(
        [*base, "serve", "--socket", sock, "--workload", "pod-1=/proc/self/ns/net:web:shop:web-sa"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=REPO,
    )
    watch = None
    try:
        assert serve.stdout is not None and serve.stdin is not None
        serve_out = Lines(serve.stdout)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_out.pump)
            with trio.fail_after(30):
                await serve_out.wait_for(lambda line: line.startswith("serving ZDS"))
                watch = await trio.lowlevel.open_process(
                    [*base, "watch", "--socket", sock, "--state-file", str(state)],
                    stdout=subprocess.PIPE, env=env, cwd=REPO,
                )
                assert watch.stdout is not None
                watch_out = Lines(watch.stdout)
                nursery.start_soon(watch_out.pump)
                started = json.loads(await watch_out.wait_for(event("start", "pod-1")))
                st = os.stat("/proc/self/ns/net")
                assert started["name"] == "web" and started["namespace"] == "shop"
                assert started["netns"] == {"ino": st.st_ino, "dev": st.st_dev}
                await watch_out.wait_for(event("ready"))
                assert json.loads(state.read_text())["ready"] is True

                await serve.stdin.send_all(b"add pod-2=/proc/self/ns/net:api\nbogus\n")
                await watch_out.wait_for(event("start", "pod-2"))
                await serve_out.wait_for(lambda line: line == "add pod-2: ack")
                await serve_out.wait_for(lambda line: line.startswith("unknown command 'bogus'"))
                await serve.stdin.send_all(b"add pod-3=/nonexistent\ndel pod-2\n")
                await serve_out.wait_for(lambda line: line.startswith("add: error:") and "not exist" in line)
                await watch_out.wait_for(event("stop", "pod-2"))
                await serve_out.wait_for(lambda line: line == "del pod-2: sent to 1 connection(s)")
                assert set(json.loads(state.read_text())["workloads"]) == {"pod-1"}
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for proc in (watch, serve):
                if proc is not None:
                    proc.terminate()
                    with trio.move_on_after(5):
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
    assert serve.returncode == 0
    assert watch is not None and watch.returncode == 0
