"""Domain types of ZDS, independent of the protobuf classes (which never leave shared/zds/codec.py)."""

from __future__ import annotations

import enum
from typing import NewType

import msgspec

PodUid = NewType("PodUid", str)
"""The Kubernetes Pod metadata.uid: the key of ztunnel's in-pod proxy table (not the xDS Workload.uid)."""

MAX_DATAGRAM = 1024
"""Both upstream peers read into a 1024-byte buffer; anything larger is a truncated message."""


class Version(enum.IntEnum):
    NOT_USED = 0
    V1 = 1


class WorkloadInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    namespace: str
    service_account: str


# --- messages (one per datagram) -------------------------------------------------------------------------


class Hello(msgspec.Struct, frozen=True, kw_only=True):
    """ZdsHello: the client's first datagram. `version` is the raw enum number so unknown ones survive."""

    version: int


class AddWorkload(msgspec.Struct, frozen=True, kw_only=True):
    """WorkloadRequest{add}; travels with exactly one netns fd (SCM_RIGHTS)."""

    uid: PodUid
    workload_info: WorkloadInfo | None
    netns_fd: int = -1


class KeepWorkload(msgspec.Struct, frozen=True, kw_only=True):
    uid: PodUid


class DelWorkload(msgspec.Struct, frozen=True, kw_only=True):
    uid: PodUid


class SnapshotSent(msgspec.Struct, frozen=True, kw_only=True):
    pass


class Ack(msgspec.Struct, frozen=True, kw_only=True):
    """WorkloadResponse{ack}: an empty error is an ACK, anything else a NACK."""

    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


Request = AddWorkload | KeepWorkload | DelWorkload | SnapshotSent


class SnapshotEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One pod of a node agent's snapshot: sent as `add` (with a copy of netns_fd) when the fd is known, else
    as `keep`. The fd stays owned by whoever built the entry (the node agent's netns cache)."""

    uid: PodUid
    info: WorkloadInfo | None = None
    netns_fd: int | None = None
