"""Memory and fds of ztunnel before, at and after a peak of N concurrent connections (default 10,000).

Runs two pods' real proxy sets in this process (a client pod and a server pod on loopback addresses, with
HBONE between them: mTLS HTTP/2 CONNECT, pooled, as across nodes; `--mode passthrough` for plain TCP
instead), like the service tests, with the app and the load in *child processes*, so this process's RSS
and fd count are the two ztunnel ends' alone. It raises its own open-files limit (root) so that N
connections fit on both ends, and sets the connection caps above N.

    before   both pods up, one warm-up connection done
    peak     N connections open through the pair, each echoed once
    after    all closed, the open-connection count back at 0, SETTLE seconds later (ztunnel's periodic
             malloc_trim, host.py, runs meanwhile unless --no-trim)
    trimmed  after one more explicit malloc_trim(0)
    collected after gc.collect() and malloc_trim(0) (what reference cycles still held)
    released after the pooled HBONE connections are closed too (what their idle timeout does after 5 min)

Prints figures; asserts nothing. Needs no netns; root only for the raised fd limit. ztunnel itself runs with
PYTHONMALLOC=malloc (services/ztunnel/host.py); this script does not start through ztunnel's main, so set
it here to measure what ztunnel does (`PYTHONMALLOC=malloc .venv/bin/python benchmarks/conn_peak.py`).

    .venv/bin/python benchmarks/conn_peak.py [--connections 10000] [--mode hbone|passthrough] [--no-trim]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import socket
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.istiod.ca import CertificateAuthority
from services.ztunnel.hbone.tls import TlsContextCache
from services.ztunnel.host import libc_malloc_trim, trim_malloc_periodically
from services.ztunnel.inpod.handler import InPodWorkloadHandler
from services.ztunnel.peers import StatePeers
from services.ztunnel.proxy.context import Mesh, ProxyConfig
from services.ztunnel.state.store import StateStore
from services.ztunnel.telemetry.access_log import Telemetry
from shared.addr import Addr
from shared.logs import setup_logging
from shared.netns import netns_id
from shared.zds.types import PodUid, WorkloadInfo
from tests.service.test_ztunnel_mesh import NODE, MeshCerts, PodSockets, workload

CLIENT_IP = "127.0.78.2"
SERVER_IP = "127.0.78.3"

APP = r"""
import sys, trio
async def echo(stream):
    try:
        async for data in stream:
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass
async def main():
    listeners = await trio.open_tcp_listeners(0, host=sys.argv[1], backlog=4096)
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(echo, listeners)
trio.run(main)
"""

LOAD = r"""
import sys, trio
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
async def main():
    streams = []
    for _ in range(n):
        sock = trio.socket.socket()
        await sock.bind((host, 0))
        await sock.connect((host, port))
        stream = trio.SocketStream(sock)
        await stream.send_all(b"x")
        streams.append(stream)
    for stream in streams:
        assert await stream.receive_some(1) == b"x"
    print("open", flush=True)
    await trio.wrap_file(sys.stdin).readline()
    for stream in streams:
        await stream.send_eof()
    for stream in streams:
        while await stream.receive_some():
            pass
        await stream.aclose()
    print("closed", flush=True)
trio.run(main)
"""


class BenchSockets(PodSockets):
    """Loopback pods whose outbound always goes to the app (what the benchmark's load dials)."""

    def __init__(self, app: Addr) -> None:
        super().__init__()
        self.app = app

    def original_dst(self, sock: socket.socket) -> Addr | None:
        return self.app


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def show(label: str, note: str, *, collect: bool = False, trim: bool = False) -> None:
    """Print this process's RSS and fds now, after a gc.collect() and/or a malloc_trim(0) if asked."""
    if collect:
        gc.collect()
    trimmer = libc_malloc_trim() if trim else None
    if trimmer is not None:
        trimmer()
    print(f"{label:<9} RSS {rss_mib():7.1f} MiB   fds {fds():6}   ({note})")


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, need)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"open-files limit: {resource.getrlimit(resource.RLIMIT_NOFILE)}")


async def run(connections: int, mode: str, trim: bool, settle: float) -> None:
    app = await trio.lowlevel.open_process([sys.executable, "-c", APP, SERVER_IP], stdout=-1)
    assert app.stdout is not None
    app_port = int((await app.stdout.receive_some(64)).decode())
    sockets = BenchSockets((SERVER_IP, app_port))
    store = StateStore()
    mesh = None
    if mode == "hbone":
        ca = CertificateAuthority.create()
        mesh = Mesh(store=store, certs=MeshCerts(ca), contexts=TlsContextCache([ca.root_pem]), node=NODE)
        store.apply_addresses([workload("client", CLIENT_IP), workload("web", SERVER_IP)], [])
    cap = 4 * connections + 1000
    config = ProxyConfig(connect_timeout=10, max_connections=cap, max_connections_per_pod=cap)
    client_r, client_w = os.pipe()
    server_r, server_w = os.pipe()
    sockets.ip_of.update({netns_id(client_r): CLIENT_IP, netns_id(server_r): SERVER_IP})
    try:
        async with trio.open_nursery() as nursery:
            if trim:
                nursery.start_soon(trim_malloc_periodically)
            handler = InPodWorkloadHandler(nursery, config=config, telemetry=Telemetry(), sockets=sockets,
                                           peers=StatePeers(store), mesh=mesh)
            await handler.start_workload(PodUid("client"), WorkloadInfo(name="client", namespace="mesh",
                                                                          service_account="client"), client_r)
            await handler.start_workload(PodUid("web"), WorkloadInfo(name="web", namespace="mesh",
                                                                       service_account="web"), server_r)
            outbound = sockets.ports[CLIENT_IP]["outbound"]

            async def load(n: int) -> float:
                """Open n connections, echo once each, hold them, close them; returns the peak RSS."""
                proc = await trio.lowlevel.open_process(
                    [sys.executable, "-c", LOAD, CLIENT_IP, str(outbound), str(n)], stdin=-1, stdout=-1)
                assert proc.stdin is not None and proc.stdout is not None
                assert (await proc.stdout.receive_some(16)).strip() == b"open"
                peak = rss_mib(), fds()
                if n > 1:
                    print(f"peak      RSS {peak[0]:7.1f} MiB   fds {peak[1]:6}   "
                          f"counted connections {handler.limits.open}")
                await proc.stdin.send_all(b"close\n")
                assert (await proc.stdout.receive_some(16)).strip() == b"closed"
                await proc.wait()
                client_pod = handler.pods[PodUid("client")].context.connections
                while client_pod.open:  # noqa: ASYNC110  (a poll is fine here; the server keeps its pool)
                    await trio.sleep(0.1)
                return peak[0]

            await load(1)
            before = rss_mib(), fds()
            print(f"before    RSS {before[0]:7.1f} MiB   fds {before[1]:6}")
            started = time.monotonic()
            peak = await load(connections)
            print(f"          {connections} connections opened, echoed and closed in "
                  f"{time.monotonic() - started:.1f} s")
            await trio.sleep(settle)
            show("after", f"{settle:g} s later{', periodic malloc_trim on' if trim else ', no malloc_trim'}")
            show("trimmed", "one more malloc_trim(0)", trim=True)
            show("collected", "gc.collect(), then malloc_trim(0)", collect=True, trim=True)
            pools = [p.pool for p in handler.pods.values() if p.pool is not None]
            closed = 0
            for pool in pools:
                # What the pool's idle timeout (5 min) would do: GOAWAY and close every pooled connection.
                # No reference to them is kept here, so what they held can be freed.
                for conn in pool.connections():
                    conn.close()
                    closed += 1
            del pools
            if closed:
                while fds() > before[1]:  # noqa: ASYNC110  (both ends' sockets closed)
                    await trio.sleep(0.1)
                await trio.sleep(1)
                show("released", f"{closed} pooled HBONE connections closed, as after their idle timeout; "
                     "gc.collect(), malloc_trim(0)", collect=True, trim=True)
            per = (peak - before[0]) * 1024 / connections
            print(f"per connection at the peak: {per:.1f} KiB (both ends, {mode})")
            nursery.cancel_scope.cancel()
    finally:
        app.kill()
        await app.wait()
        for fd in (client_r, client_w, server_r, server_w):
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--mode", choices=["hbone", "passthrough"], default="hbone")
    parser.add_argument("--no-trim", action="store_true", help="do not run ztunnel's periodic malloc_trim")
    parser.add_argument("--settle", type=float, default=12.0, help="seconds between the close and 'after'")
    args = parser.parse_args()
    setup_logging(json_format=False, level="warn")  # failed connections, with their fields, on stderr
    raise_fd_limit(4 * args.connections + 4096)
    print(f"{args.connections} connections through a client and a server pod in this process ({args.mode}); "
          f"PYTHONMALLOC={os.environ.get('PYTHONMALLOC', 'unset')}, "
          f"MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', 'unset')}, "
          f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}")
    trio.run(run, args.connections, args.mode, not args.no_trim, args.settle)


if __name__ == "__main__":
    main()
