"""The node agent's pod lifecycle with fakes (enrol, retry, unenrol, restart), and once against the real ZDS
server with a real ZDS client (ztunnel side) over a Unix socket."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from services.node_agent.cache import NetnsCache
from services.node_agent.errors import EnrolmentError
from services.node_agent.lifecycle import NodeAgent, PathNetnsOpener
from services.node_agent.model import ANNOTATION_REDIRECTION, STATUS_ENABLED, Pod
from services.node_agent.rules import RuleSettings
from services.node_agent.testing import (
    FakeNode,
    FakeRuleApplier,
    FakeZtunnel,
    PipeNetnsOpener,
    RecordingStatus,
)
from services.node_agent.zds_server import ZdsServer
from services.ztunnel.inpod.statemanager import WorkloadManager
from services.ztunnel.inpod.zds_client import run_zds_client
from shared.logs import UpstreamFormatter
from shared.netns import netns_id
from shared.zds.codec import decode_request, encode_ack
from shared.zds.transport import recv_datagram, send_datagram
from shared.zds.types import AddWorkload, PodUid, SnapshotSent
from tests.service.test_zds_transport import expect_closed, raw_client
from tests.service.zds_fakes import RecordingHandler

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def pod(name: str, *, labels: dict[str, str] | None = None, netns: str | None = None, **kw: object) -> Pod:
    return Pod(
        uid=PodUid(f"uid-{name}"),
        name=name,
        namespace="default",
        service_account=f"sa-{name}",
        labels=AMBIENT if labels is None else labels,
        netns_path=netns if netns is not None else f"/run/netns/{name}",
        **kw,  # type: ignore[arg-type]
    )


class Env(FakeNode):
    def ident(self, p: Pod) -> tuple[int, int]:
        assert p.netns_path is not None
        return netns_id(self.opener.handles[p.netns_path])


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env()
    try:
        yield e
    finally:
        e.close()


@pytest.fixture
async def running(env: Env) -> AsyncIterator[Env]:
    async with trio.open_nursery() as nursery:
        await nursery.start(env.agent.run)
        yield env
        nursery.cancel_scope.cancel()


async def test_ambient_pod_is_enrolled_and_reported_enabled(running: Env) -> None:
    p = pod("a")
    await running.agent.pod_changed(p, {})
    assert running.status.current == {p.uid: "enabled"}
    assert running.ztunnel.added == [(p.uid, p.workload_info, running.ident(p))]
    assert running.ident(p) in running.applier.installed


async def test_ztunnel_absent_keeps_rules_pending_until_it_connects(
    running: Env, autojump_clock: trio.testing.MockClock
) -> None:
    running.ztunnel.set_connected(False)
    p = pod("a")
    await running.agent.pod_changed(p, {})
    assert running.status.current == {p.uid: "pending"}
    assert running.ident(p) in running.applier.installed  # fail closed: rules stay
    await trio.sleep(30)  # many retries with backoff; still pending, reported once
    assert running.status.history == [(p.uid, "pending")]
    running.ztunnel.set_connected(True)
    with trio.fail_after(10):
        while running.status.current.get(p.uid) != "enabled":
            await running.status.changed.wait()
    assert running.ztunnel.added == [(p.uid, p.workload_info, running.ident(p))]


async def test_nack_is_retried(running: Env, autojump_clock: trio.testing.MockClock) -> None:
    running.ztunnel.nack = "failure to start proxy : address in use"
    p = pod("a")
    await running.agent.pod_changed(p, {})
    assert running.status.current[p.uid] == "pending"
    running.ztunnel.nack = None
    with trio.fail_after(10):
        while running.status.current.get(p.uid) != "enabled":
            await running.status.changed.wait()


async def test_unlabel_removes_rules_sends_del_and_clears_status(running: Env) -> None:
    p = pod("a")
    await running.agent.pod_changed(p, {})
    ident = running.ident(p)
    await running.agent.pod_changed(pod("a", labels={}), {})
    assert ident not in running.applier.installed
    assert ("delete", ident) in running.applier.calls
    assert running.ztunnel.deleted == [p.uid]
    assert running.status.current == {}
    assert p.uid not in running.agent.cache


async def test_namespace_label_enrols_and_none_opts_out(running: Env) -> None:
    a, b = pod("a", labels={}), pod("b", labels={"istio.io/dataplane-mode": "none"})
    await running.agent.pod_changed(a, AMBIENT)
    await running.agent.pod_changed(b, AMBIENT)
    assert running.status.current == {a.uid: "enabled"}
    await running.agent.pod_changed(a, {})  # namespace un-labelled
    assert running.status.current == {}
    assert running.ztunnel.deleted == [a.uid]


async def test_deleted_pod_is_removed_without_touching_its_netns(running: Env) -> None:
    p = pod("a")
    await running.agent.pod_changed(p, {})
    await running.agent.pod_deleted(p)
    assert [c for c in running.applier.calls if c[0] == "delete"] == []
    assert running.ztunnel.deleted == [p.uid]
    assert p.uid not in running.agent.cache


async def test_missing_netns_is_final_and_leaves_nothing(running: Env) -> None:
    p = pod("a")
    running.opener.missing.add("/run/netns/a")
    with pytest.raises(EnrolmentError, match="does not exist") as info:
        await running.agent.cni_add(p, None)
    assert not info.value.retryable
    assert p.uid not in running.agent.cache and running.agent.status_of(p.uid) is None
    assert running.applier.calls == [] and running.ztunnel.added == []


async def test_failed_rule_install_drops_the_pod(running: Env) -> None:
    running.applier.fail_apply = True
    p = pod("a")
    with pytest.raises(EnrolmentError, match="redirection not installed"):
        await running.agent.cni_add(p, None)
    assert p.uid not in running.agent.cache
    assert running.ztunnel.added == [] and running.status.current == {}
    # other pods are unaffected
    running.applier.fail_apply = False
    await running.agent.cni_add(pod("b"), None)
    assert running.status.current == {PodUid("uid-b"): "enabled"}


async def test_bad_annotation_is_a_clear_error(running: Env) -> None:
    p = pod("a", annotations={"ambient.istio.io/dns-capture": "sometimes"})
    with pytest.raises(EnrolmentError, match="is not a boolean"):
        await running.agent.cni_add(p, None)
    assert running.applier.calls == []


async def test_same_netns_twice_keeps_one_handle(running: Env) -> None:
    p = pod("a")
    await running.agent.cni_add(p, None)
    first = running.agent.cache.get(p.uid)
    await running.agent.cni_add(p, None)
    assert running.agent.cache.get(p.uid) == first
    assert len(running.agent.cache) == 1


async def test_cni_add_checks_eligibility_when_labels_known(running: Env) -> None:
    p = pod("a", labels={})
    decision = await running.agent.cni_add(p, {})
    assert not decision.eligible
    assert running.applier.calls == []


async def test_restart_snapshot_sends_add_or_keep(env: Env) -> None:
    """Case 38: pods annotated enabled before the restart form the snapshot: add with fd, or keep."""
    a, b = pod("a"), pod("b")
    env.opener.missing.add("/run/netns/b")
    await env.agent.restore([a, b])
    entries = {e.uid: e for e in env.agent.cache.snapshot()}
    fd_a = entries[a.uid].netns_fd
    assert fd_a is not None and netns_id(fd_a) == env.ident(a)
    assert entries[b.uid].netns_fd is None  # keep
    assert env.ident(a) in env.applier.installed  # rules reconciled


async def test_real_zds_server_snapshot_reconnect_and_del_to_all(tmp_path: Path) -> None:
    """Against the real ZDS server and client: enrol, reconnect gets a snapshot, del goes to every client."""
    path = str(tmp_path / "zds.sock")
    cache = NetnsCache()
    server = ZdsServer(path, cache, accept_interval=0)
    opener = PipeNetnsOpener()
    status = RecordingStatus()
    agent = NodeAgent(
        applier=FakeRuleApplier(),
        ztunnel=server,
        status=status,
        settings=RuleSettings(),
        opener=opener,
        cache=cache,
    )
    handler1, handler2 = RecordingHandler(), RecordingHandler()
    p = pod("a")
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                await nursery.start(agent.run)
                await agent.pod_changed(p, {})  # no ztunnel yet
                assert status.current == {p.uid: "pending"}
                nursery.start_soon(_client, path, handler1)
                while status.current.get(p.uid) != "enabled":
                    await status.changed.wait()
                assert handler1.events.count(("start", p.uid)) == 1
                # a second ztunnel connects: it gets the pod in its snapshot
                nursery.start_soon(_client, path, handler2)
                await server.wait_connections(2)
                assert server.peer_pids == frozenset({os.getpid()})  # both clients are this process
                while ("start", p.uid) not in handler2.events:
                    await trio.sleep(0.01)
                await agent.pod_deleted(p)
                while ("stop", p.uid) not in handler2.events or ("stop", p.uid) not in handler1.events:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    finally:
        agent.close()
        opener.close()


async def _client(path: str, handler: RecordingHandler) -> None:
    await run_zds_client(path, WorkloadManager(handler))


async def test_pipe_fds_are_closed(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    opener = PipeNetnsOpener()
    await opener.open(pod("a"))
    opener.close()
    assert len(os.listdir("/proc/self/fd")) == before + 1  # the dup handed out is the caller's


async def test_keep_placeholder_survives_a_failed_open(env: Env) -> None:
    """A pod restored without a netns (sent as `keep`) is not dropped when a later attempt cannot find it."""
    p = pod("k")
    env.opener.missing.add("/run/netns/k")
    await env.agent.restore([p])
    with pytest.raises(EnrolmentError):
        await env.agent.enrol(p)
    assert [e.uid for e in env.agent.cache.snapshot()] == [p.uid]


async def test_a_pod_without_its_netns_is_logged_with_its_name_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The real opener's error, wrapped by enrol and logged by the pod watch path, names the pod once."""
    agent = NodeAgent(
        applier=FakeRuleApplier(),
        ztunnel=FakeZtunnel(),
        status=RecordingStatus(),
        settings=RuleSettings(),
        opener=PathNetnsOpener(str(tmp_path)),  # an empty host: no namespace holds the pod's IP
    )
    p = msgspec.structs.replace(pod("extra", ips=("10.244.2.50",)), netns_path=None)
    try:
        with caplog.at_level(logging.WARNING, logger="node_agent"):
            await agent.pod_changed(p, {})
    finally:
        agent.close()
    [record] = [r for r in caplog.records if "10.244.2.50" in str(getattr(r, "fields", ""))]
    fields = dict(record.fields)  # type: ignore[attr-defined]
    assert (fields["namespace"], fields["name"]) == ("default", "extra")
    assert str(fields["error"]).startswith("no network namespace on this node holds 10.244.2.50")
    line = UpstreamFormatter(json_format=False).format(record)
    assert line.count("extra") == 1, line  # the pod is named once: by its fields, not again in the error


async def test_first_listing_restores_annotated_pods_and_skips_fresh_ones_quietly(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A fresh node: pods never enrolled (not annotated `enabled`) whose netns does not exist yet are no
    warning and no `keep`; a pod annotated `enabled` whose netns is gone is both."""
    fresh, found = pod("fresh"), pod("found")
    enabled = pod("was", annotations={ANNOTATION_REDIRECTION: STATUS_ENABLED})
    env.opener.missing.update({"/run/netns/fresh", "/run/netns/was"})
    with caplog.at_level(logging.WARNING, logger="node_agent"):
        await env.agent.initial_pods([(fresh, {}), (found, {}), (enabled, {})])
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("pod enabled before restart")
    assert dict(warnings[0].fields)["name"] == "was"  # type: ignore[attr-defined]
    entries = {e.uid: e for e in env.agent.cache.snapshot()}
    assert set(entries) == {found.uid, enabled.uid}
    assert entries[enabled.uid].netns_fd is None and entries[found.uid].netns_fd is not None


@pytest.mark.parametrize("breaking", ["unreadable answer", "unsolicited answers"])
async def test_a_job_lost_with_a_broken_ztunnel_reaches_the_next_one(tmp_path: Path, breaking: str) -> None:
    """A ztunnel breaks its session while a second pod's add waits in its queue: the job is not lost (nor
    is the server), both pods end enabled and started on the next ztunnel that connects."""
    path = str(tmp_path / "zds.sock")
    cache = NetnsCache()
    server = ZdsServer(path, cache, accept_interval=0)
    opener = PipeNetnsOpener()
    status = RecordingStatus()
    agent = NodeAgent(applier=FakeRuleApplier(), ztunnel=server, status=status, settings=RuleSettings(),
                      opener=opener, cache=cache)
    handler = RecordingHandler()
    a, b = pod("a"), pod("b")
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                await nursery.start(agent.run)
                bad = await raw_client(path)
                data, fds, _ = await recv_datagram(bad)
                assert decode_request(data, fds) == SnapshotSent()
                await send_datagram(bad, encode_ack())
                await server.wait_connections(1)
                nursery.start_soon(agent.pod_changed, a, {})
                nursery.start_soon(agent.pod_changed, b, {})
                data, fds, _ = await recv_datagram(bad)
                first = decode_request(data, fds)
                assert isinstance(first, AddWorkload)
                os.close(first.netns_fd)
                await trio.testing.wait_all_tasks_blocked()  # the other pod's add is queued behind it
                if breaking == "unreadable answer":
                    await send_datagram(bad, (b"\xff\xff", []))
                else:  # an answer, then more than anything in flight or queued can take
                    for _ in range(3):
                        await send_datagram(bad, encode_ack())
                await expect_closed(bad)
                bad.close()
                if breaking == "unreadable answer":  # neither add was answered: both wait for a ztunnel
                    while status.current != {a.uid: "pending", b.uid: "pending"}:
                        await status.changed.wait()
                nursery.start_soon(_client, path, handler)  # the next ztunnel
                while status.current != {a.uid: STATUS_ENABLED, b.uid: STATUS_ENABLED} \
                        or {("start", a.uid), ("start", b.uid)} - set(handler.events):
                    await trio.sleep(0.01)
                assert server.connection_count == 1
                nursery.cancel_scope.cancel()
    finally:
        agent.close()
        opener.close()
