"""The istiod stub as a real process (`python -m services.istiod.app`) on a free loopback port, for the
service and kubernetes tiers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from tests.access_logs import ParsedLine, parse_plain

ROOT = Path(__file__).resolve().parents[1]


@asynccontextmanager
async def run_stub(state: Path, *stub_args: str) -> AsyncIterator[int]:
    """Start istiod-stub on a free loopback port with `stub_args` (default: the bookinfo world file); yield
    the port once it is serving."""
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "services.istiod.app",
            *(stub_args or ("--world", str(ROOT / "examples" / "bookinfo.yaml"))),
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(state),
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        log = b""
        serving: list[ParsedLine] = []
        while not serving:
            chunk = await proc.stderr.receive_some()
            assert chunk, f"istiod-stub exited: {log.decode()}"
            log += chunk
            lines = [parse_plain(line.decode()) for line in log.split(b"\n")[:-1]]  # whole lines only
            serving = [p for p in lines if (p.target, p.message) == ("istiod-stub", "istiod-stub serving")]
        [line] = serving
        assert line.fields["transport"] == "tls", line
        host, _, port = str(line.fields["address"]).rpartition(":")
        assert host == "127.0.0.1", line
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, proc.stderr)  # a full pipe would stop the stub at its next log line
            yield int(port)
            nursery.cancel_scope.cancel()
    finally:
        proc.terminate()
        with trio.CancelScope(shield=True):
            await proc.wait()


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some():
        pass
