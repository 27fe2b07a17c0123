"""The node agent's pod netns cache (upstream `podNetnsCache`) and the ZDS snapshot it yields.

Theory of operation
-------------------
Keyed by pod uid, each entry holds the pod's WorkloadInfo and an open handle to its network namespace. The
cache owns those fds: `upsert` with a handle to the *same* namespace (same nsfs inode) closes the new one
and keeps the old, so ztunnel sees no change; a different namespace replaces (and closes) the old one.
`ensure` inserts a placeholder without a handle; a snapshot sends such a pod as `keep`, so a ztunnel that
already serves it keeps doing so even though this agent (restarted) could not find its namespace.
`take` removes an entry and hands its fd to the caller, who closes it.
"""

from __future__ import annotations

import os

import msgspec

from shared.netns import NetnsId, netns_id
from shared.zds.types import PodUid, SnapshotEntry, WorkloadInfo


class CacheEntry(msgspec.Struct, frozen=True, kw_only=True):
    uid: PodUid
    info: WorkloadInfo | None = None
    netns_fd: int | None = None
    netns: NetnsId | None = None


class NetnsCache:
    """uid -> (WorkloadInfo, netns fd). Implements services.node_agent.zds_server.SnapshotSource."""

    def __init__(self) -> None:
        self._entries: dict[PodUid, CacheEntry] = {}

    def __contains__(self, uid: object) -> bool:
        return uid in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, uid: PodUid) -> CacheEntry | None:
        return self._entries.get(uid)

    def uids(self) -> list[PodUid]:
        return list(self._entries)

    def ensure(self, uid: PodUid, info: WorkloadInfo | None = None) -> CacheEntry:
        """The entry for `uid`, inserting a placeholder without a netns if there is none."""
        entry = self._entries.get(uid)
        if entry is None:
            entry = self._entries[uid] = CacheEntry(uid=uid, info=info)
        elif info is not None and entry.info != info:
            entry = self._entries[uid] = msgspec.structs.replace(entry, info=info)
        return entry

    def upsert(self, uid: PodUid, info: WorkloadInfo, netns_fd: int) -> int:
        """Store `netns_fd` (ownership passes to the cache) and return the fd now cached for `uid`.

        Same namespace as the cached handle: the new fd is closed and the old one returned.
        """
        ident = netns_id(netns_fd)
        old = self._entries.get(uid)
        if old is not None and old.netns_fd is not None:
            if old.netns == ident:
                os.close(netns_fd)
                self._entries[uid] = msgspec.structs.replace(old, info=info)
                return old.netns_fd
            os.close(old.netns_fd)
        self._entries[uid] = CacheEntry(uid=uid, info=info, netns_fd=netns_fd, netns=ident)
        return netns_fd

    def take(self, uid: PodUid) -> CacheEntry | None:
        """Remove and return the entry; the caller now owns (and must close) its fd."""
        return self._entries.pop(uid, None)

    def snapshot(self) -> list[SnapshotEntry]:
        """Every cached pod: with its fd (sent as `add`; the fd stays ours) or without (sent as `keep`)."""
        return [SnapshotEntry(uid=e.uid, info=e.info, netns_fd=e.netns_fd) for e in self._entries.values()]

    def close(self) -> None:
        """Close every cached handle (process exit)."""
        for entry in self._entries.values():
            if entry.netns_fd is not None:
                os.close(entry.netns_fd)
        self._entries.clear()
