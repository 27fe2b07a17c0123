"""Fuzz targets shared by the bounded hypothesis tier (tests/fuzz) and `scripts/fuzz` (atheris).

Each target takes arbitrary bytes and must either succeed or raise the module's documented error type;
anything else (another exception, a leaked fd) is a bug.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from services.istiod.errors import WorldError
from services.istiod.world import load_world
from services.node_agent.cni_server import parse_add_request
from services.node_agent.errors import CniRequestError
from services.ztunnel.hbone import core
from services.ztunnel.hbone.core import ClientCore, ServerCore
from services.ztunnel.hbone.errors import HboneProtocolError
from shared.zds import types as zds
from shared.zds.codec import decode_ack, decode_hello, decode_request
from shared.zds.errors import ZdsError, ZdsProtocolError, ZdsVersionError
from shared.zds.session import LocalProtocolError, Phase, ServerSession
from shared.zds.types import Ack, AddWorkload, Hello, Request
from tests.fuzz.xds_target import xds_update


def zds_codec(data: bytes) -> None:
    """Every decoder on `data`, with and without one fd: only ZdsError, and no fd left open on error."""
    for decode in (decode_hello, decode_request, decode_ack):
        for with_fd in (False, True):
            fds = [os.open("/dev/null", os.O_RDONLY)] if with_fd else []
            try:
                msg = decode(data, fds)
            except ZdsError:
                for fd in fds:
                    try:
                        os.fstat(fd)
                    except OSError:
                        continue
                    os.close(fd)
                    raise AssertionError(f"{decode.__name__} left fd {fd} open after an error") from None
                continue
            if isinstance(msg, AddWorkload):
                assert msg.netns_fd == fds[0]
            for fd in fds:
                os.close(fd)


def cni_request(data: bytes) -> None:
    with contextlib.suppress(CniRequestError):
        parse_add_request(data)


def world_file(data: bytes) -> None:
    with contextlib.suppress(WorldError):
        load_world(data, "fuzz")


# --- the ZDS server session ---

_UID = zds.PodUid("a")
SESSION_STEPS: tuple[Hello | Request | Ack, ...] = (
    Hello(version=zds.Version.V1), Hello(version=0), Hello(version=7),
    AddWorkload(uid=_UID, workload_info=zds.WorkloadInfo(name="p", namespace="n", service_account="s")),
    zds.KeepWorkload(uid=_UID), zds.DelWorkload(uid=_UID), zds.SnapshotSent(),
    Ack(), Ack(error="failure to start proxy"))
"""What a fuzzed sequence picks from: a hello received, a request sent, or an answer received."""


def server_session(steps: Sequence[int]) -> None:
    """A ZDS ServerSession driven by `steps` (indexes into SESSION_STEPS): a peer's datagram out of turn is
    only ever ZdsProtocolError / ZdsVersionError and closes the session; our send out of turn only
    LocalProtocolError and changes nothing; an answer is always matched to the one request in flight."""
    session = ServerSession()
    for index in steps:
        step = SESSION_STEPS[index % len(SESSION_STEPS)]
        phase, in_flight = session.phase, session.in_flight
        assert session.idle == (phase in (Phase.SNAPSHOT, Phase.STEADY) and in_flight is None)
        if isinstance(step, Hello):
            try:
                session.receive_hello(step)
            except ZdsVersionError:
                assert phase is Phase.HELLO and session.phase is Phase.CLOSED
                continue
            except ZdsProtocolError:
                assert phase is not Phase.HELLO
                continue
            assert phase is Phase.HELLO and session.phase is Phase.SNAPSHOT
        elif isinstance(step, Ack):
            try:
                answered = session.receive_ack(step)
            except ZdsProtocolError:
                assert in_flight is None and session.phase is Phase.CLOSED
                continue
            assert answered is in_flight and session.in_flight is None
        else:
            try:
                data, fds = session.send(step)
            except LocalProtocolError:
                assert (session.phase, session.in_flight) == (phase, in_flight)
                assert in_flight is not None or phase in (Phase.HELLO, Phase.CLOSED) or (
                    phase is Phase.STEADY and isinstance(step, (zds.KeepWorkload, zds.SnapshotSent)))
                continue
            assert in_flight is None and phase in (Phase.SNAPSHOT, Phase.STEADY)
            assert session.in_flight is step and fds == []  # no fd given: none attached
            if not isinstance(step, AddWorkload):  # an add is decoded only with its fd
                assert decode_request(data, fds) == step


def zds_session(data: bytes) -> None:
    server_session(data)


# --- the HBONE server core's receive path ---

def hbone_opening() -> bytes:
    """A client's preface, SETTINGS and one CONNECT, as our client core writes them."""
    client = ClientCore()
    client.open_stream(("10.0.0.1", 80), forwarded_for=("10.0.0.2", 1234), traceparent="00-" + "1" * 32
                       + "-" + "2" * 16 + "-00")
    return bytes(client.data_to_send())


def hbone_receive(chunks: Sequence[bytes], *, fast: bool) -> list[object]:
    """What a ServerCore gives for `chunks` (events, then output, per chunk; a protocol error ends it),
    with the plain-DATA fast path on or off. Any other exception is a bug."""
    saved = core.FAST_DATA
    core.FAST_DATA = fast
    try:
        server = ServerCore(["10.0.0.1"])
        seen: list[object] = []
        for chunk in chunks:
            try:
                seen.append(server.receive_data(chunk))
            except HboneProtocolError as exc:
                seen.append(("error", str(exc)))
                break
            seen.append(bytes(server.data_to_send()))
        return seen
    finally:
        core.FAST_DATA = saved


def hbone_frames(data: bytes) -> None:
    """The opening, then `data[1:]` as frames, cut every `data[0] + 1` bytes: the fast path must give what
    h2 alone gives (the oracle); when this h2 has no fast path, only the documented error may be raised."""
    if not data:
        return
    wire = hbone_opening() + data[1:]
    step = data[0] + 1
    chunks = [wire[i:i + step] for i in range(0, len(wire), step)]
    slow = hbone_receive(chunks, fast=False)
    if core.FAST_DATA:
        assert hbone_receive(chunks, fast=True) == slow


TARGETS = {"zds-codec": zds_codec, "zds-session": zds_session, "hbone-frames": hbone_frames,
           "cni-request": cni_request, "world": world_file, "xds": xds_update}
