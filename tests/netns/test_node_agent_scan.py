"""Finding a pod's netns by its IP (restart / label-change enrolment without a CNI event)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import pytest
import trio

from services.node_agent.errors import NetnsGoneError
from services.node_agent.lifecycle import PathNetnsOpener
from services.node_agent.model import Pod
from services.node_agent.netns_scan import find_netns_by_ips
from services.node_agent.testing import FakeNode
from shared.netns import netns_id, open_netns
from shared.zds.types import PodUid
from tests.netns.conftest import run

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


async def test_pod_netns_is_found_by_ip(make_netns: Callable[[str], str]) -> None:
    pod, other = make_netns("pod"), make_netns("other")
    run("ip", "-n", pod, "link", "add", "vp", "type", "veth", "peer", "name", "vo", "netns", other)
    run("ip", "-n", pod, "addr", "add", "10.251.7.2/24", "dev", "vp")
    run("ip", "-n", other, "addr", "add", "10.251.7.1/24", "dev", "vo")
    expected = open_netns(pod)
    try:
        # in a worker thread, as the agent does: sync pyroute2 refuses the Trio thread under trio_asyncio
        found = await trio.to_thread.run_sync(find_netns_by_ips, ["10.251.7.2"])
        assert found is not None
        fd, path = found
        assert path.startswith(("/run/netns/", "/proc/"))
        assert netns_id(fd) == netns_id(expected)
        os.close(fd)
        assert await trio.to_thread.run_sync(find_netns_by_ips, ["10.251.99.99"]) is None

        opener = PathNetnsOpener()
        p = Pod(uid=PodUid("u"), name="a", namespace="d", ips=("10.251.7.2",))
        fd = await opener.open(p)
        assert netns_id(fd) == netns_id(expected)
        os.close(fd)
        with pytest.raises(NetnsGoneError, match=r"no network namespace on this node holds 10\.251\.99\.99"):
            await opener.open(Pod(uid=PodUid("v"), name="b", namespace="d", ips=("10.251.99.99",)))
    finally:
        os.close(expected)


async def test_two_namespaces_with_the_pod_ip_are_refused_not_guessed(
    make_netns: Callable[[str], str],
) -> None:
    """Two labs on one host can reuse pod IPs: the agent must not pick one of them."""
    first, second = make_netns("twin1"), make_netns("twin2")
    for name in (first, second):
        run("ip", "-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        run("ip", "-n", name, "addr", "add", "10.251.8.2/24", "dev", "d0")
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(NetnsGoneError, match="more than one network namespace holds"):
        await PathNetnsOpener().open(Pod(uid=PodUid("w"), name="c", namespace="d", ips=("10.251.8.2",)))
    assert len(os.listdir("/proc/self/fd")) == before


async def test_a_scan_never_pairs_a_pod_with_another_pods_namespace(
    make_netns: Callable[[str], str], caplog: pytest.LogCaptureFixture,
) -> None:
    """Upstream istio#61211: the scan paired a pod with a namespace it did not own. Here a pod enrolled
    through its CNI event still holds its namespace (its delete was missed) when a new pod gets the same
    IP and has no CNI event yet: the only namespace holding that IP is the old pod's, so the scan must skip
    it (one log line) instead of handing it to ztunnel as the new pod's."""
    stale = make_netns("stale")
    run("ip", "-n", stale, "link", "add", "s0", "type", "veth", "peer", "name", "s1")
    run("ip", "-n", stale, "addr", "add", "10.251.9.2/24", "dev", "s0")
    node = FakeNode()
    node.agent.opener = PathNetnsOpener()
    try:
        old = Pod(uid=PodUid("old"), name="old", namespace="d", labels=AMBIENT, ips=("10.251.9.2",),
                  netns_path=f"/run/netns/{stale}")
        await node.agent.cni_add(old, None)
        new = Pod(uid=PodUid("new"), name="new", namespace="d", labels=AMBIENT, ips=("10.251.9.2",))
        with caplog.at_level(logging.WARNING, logger="node_agent.lifecycle"):
            await node.agent.pod_changed(new, {})
        assert [uid for uid, _, _ in node.ztunnel.added] == [PodUid("old")]
        assert node.agent.status_of(PodUid("new")) is None and PodUid("new") not in node.agent.cache
        [skipped] = [r for r in caplog.records if r.getMessage().startswith("netns scan match skipped")]
        assert ("owner_uid", "old") in getattr(skipped, "fields", [])
        # the CNI-reported namespace is taken as given, even while another namespace holds the pod's IP
        own = make_netns("own")
        await node.agent.cni_add(
            Pod(uid=PodUid("new"), name="new", namespace="d", labels=AMBIENT, ips=("10.251.9.2",),
                netns_path=f"/run/netns/{own}"), None)
        expected = open_netns(own)
        try:
            assert node.ztunnel.added[-1][0] == PodUid("new")
            assert node.ztunnel.added[-1][2] == netns_id(expected)
        finally:
            os.close(expected)
    finally:
        node.close()
