"""The netns cache: same inode keeps the old handle, keep placeholders, take hands the fd over."""

from __future__ import annotations

import os

from services.node_agent.cache import NetnsCache
from shared.zds.types import PodUid, WorkloadInfo

INFO = WorkloadInfo(name="a", namespace="ns", service_account="sa")


def pipe_fd() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_same_netns_keeps_old_handle_and_closes_new() -> None:
    cache = NetnsCache()
    fd = pipe_fd()
    same = os.dup(fd)
    assert cache.upsert(PodUid("a"), INFO, fd) == fd
    assert cache.upsert(PodUid("a"), INFO, same) == fd
    assert not is_open(same) and is_open(fd)
    cache.close()
    assert not is_open(fd)


def test_different_netns_replaces_and_closes_old() -> None:
    cache = NetnsCache()
    old, new = pipe_fd(), pipe_fd()
    cache.upsert(PodUid("a"), INFO, old)
    assert cache.upsert(PodUid("a"), INFO, new) == new
    assert not is_open(old)
    cache.close()


def test_placeholder_is_sent_as_keep() -> None:
    cache = NetnsCache()
    cache.ensure(PodUid("k"), INFO)
    fd = pipe_fd()
    cache.upsert(PodUid("a"), INFO, fd)
    snap = {e.uid: e for e in cache.snapshot()}
    assert snap[PodUid("k")].netns_fd is None
    assert snap[PodUid("a")].netns_fd == fd and snap[PodUid("a")].info == INFO
    cache.close()


def test_take_hands_over_the_fd() -> None:
    cache = NetnsCache()
    fd = pipe_fd()
    cache.upsert(PodUid("a"), INFO, fd)
    entry = cache.take(PodUid("a"))
    assert entry is not None and entry.netns_fd == fd
    assert PodUid("a") not in cache and cache.take(PodUid("a")) is None
    cache.close()
    assert is_open(fd)
    os.close(fd)
