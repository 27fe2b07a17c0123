"""Fuzz targets shared by the bounded hypothesis tier (tests/fuzz) and `scripts/fuzz` (atheris).

Each target takes arbitrary bytes and must either succeed or raise the module's documented error type;
anything else (another exception, a leaked fd) is a bug.
"""

from __future__ import annotations

import contextlib
import os

from services.istiod.errors import WorldError
from services.istiod.world import load_world
from services.node_agent.cni_server import parse_add_request
from services.node_agent.errors import CniRequestError
from shared.zds.codec import decode_ack, decode_hello, decode_request
from shared.zds.errors import ZdsError
from shared.zds.types import AddWorkload
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


TARGETS = {"zds-codec": zds_codec, "cni-request": cni_request, "world": world_file, "xds": xds_update}
