"""Pod status writer: the node agent's `ambient.istio.io/redirection` annotation, through the control plane.

Upstream's agent merge-patches `pods/status` with "pending" (rules installed, ztunnel has not acked),
"enabled" (ztunnel acked) or null (unenrolled). Here the same goes to the istiod stub's
`PodWatch.SetRedirection` (proto/podwatch.proto), authorized by the node token.

Theory of operation
-------------------
`ControlPlaneStatusReporter.report(pod, status)` is the lifecycle's StatusReporter. It never waits for the
network and never raises: it records the pod's *desired* status and wakes the writer. The lifecycle calls it
while it holds the pod's lock, and a slow or absent control plane must not hold up enrolment; nor may a
failed write ever change the pod's enrolment (upstream, too, only retries the patch).

`run()` is the single writer task. It sends the desired statuses one call at a time; a newer report for the
same pod replaces one not yet sent, so only the latest status of each pod is written (pending -> enabled in
quick succession may write just "enabled"). The outcome of a call decides what happens to that write:

    OK                                         done
    NOT_FOUND                                  dropped: the pod (or that uid) is gone, nothing to annotate
    PERMISSION_DENIED, INVALID_ARGUMENT,       dropped and logged as an error: retrying cannot help
      UNAUTHENTICATED, UNIMPLEMENTED, ...
    UNAVAILABLE, DEADLINE_EXCEEDED, other      kept (unless superseded meanwhile); the writer backs off
                                               (100 ms doubling to 5 s) and retries, like upstream's queue

The backoff is for the whole writer, not per pod: those errors mean the control plane is unreachable or
unwell, and every pending write would fail the same way.

This module imports shared.aio (and so trio_asyncio) only when the writer runs, so importing it for the type
does not affect pyroute2 on the Trio thread (under trio_asyncio its sync IPRoute refuses to run there).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec
import trio

from services.node_agent.model import Pod
from shared.logs import Field
from shared.zds.types import PodUid

if TYPE_CHECKING:
    from shared.aio import Channel, GrpcTarget, RpcError

log = logging.getLogger("node_agent.status")

BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 5.0
CALL_TIMEOUT = 10.0


class StatusWrite(msgspec.Struct, frozen=True, kw_only=True):
    pod: Pod
    status: str | None  # "pending", "enabled", None = remove


async def set_redirection(
    channel: Channel, target: GrpcTarget, node: str, pod: Pod, status: str | None
) -> bool:
    """One `PodWatch.SetRedirection` call: set the pod's annotation to `status`, or remove it (None).

    Args:
        channel: a channel to the control plane (`shared.aio.open_target(target)`).
        target: supplies the node token (call metadata).
        node: this node; the pod must run on it.
        pod: the pod (namespace, name and uid, a precondition against a re-created namesake).
        status: "pending", "enabled" or None.
    Returns:
        Whether the annotation changed.
    Raises:
        RpcError: PERMISSION_DENIED (another node's pod or token), NOT_FOUND (pod gone), UNAVAILABLE, ...
    """
    from shared.api import podwatch_grpc, podwatch_pb2

    request = podwatch_pb2.SetRedirectionRequest(
        node=node, namespace=pod.namespace, name=pod.name, uid=pod.uid
    )
    if status is not None:
        request.value = status
    response = await channel.unary(
        podwatch_grpc.PodWatchStub, "SetRedirection", request, metadata=target.call_metadata()
    )
    return bool(response.changed)


class LatestStatusQueue:
    """The desired redirection status per pod, newest report last, drained by one writer with backoff.

    Shared by the status reporters (control plane, Kubernetes API); each supplies the one call that writes a
    status (`drain(write)`).
    """

    def __init__(self, *, backoff_initial: float = BACKOFF_INITIAL, backoff_max: float = BACKOFF_MAX) -> None:
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._desired: dict[PodUid, StatusWrite] = {}
        self._wakeup = trio.Event()
        self.written = 0
        """Calls that succeeded (for tests and the curious)."""
        self.last_error: str | None = None
        """Why the last failed write failed (None until one has)."""

    @property
    def backlog(self) -> int:
        """Writes not yet done (waiting, or being retried)."""
        return len(self._desired)

    async def report(self, pod: Pod, status: str | None) -> None:
        """Record `status` as the pod's desired annotation for the writer to send; never blocks or raises."""
        await trio.lowlevel.checkpoint()
        self._desired.pop(pod.uid, None)  # re-insert: the newest report goes last
        self._desired[pod.uid] = StatusWrite(pod=pod, status=status)
        self._wakeup.set()

    async def drain(self, write: Callable[[StatusWrite], Awaitable[bool]]) -> None:
        """Write desired statuses with `write` (True: finished with, done or dropped; False: retry later,
        after a backoff) until cancelled."""
        backoff = self._backoff_initial
        while True:
            if not self._desired:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            uid, pending = next(iter(self._desired.items()))
            if await write(pending):
                backoff = self._backoff_initial
                if self._desired.get(uid) is pending:  # not superseded while the call ran
                    del self._desired[uid]
                continue
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max)


class ControlPlaneStatusReporter(LatestStatusQueue):
    """StatusReporter writing the redirection annotation through the control plane; run `run()` beside it."""

    def __init__(
        self,
        target: GrpcTarget,
        node: str,
        *,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        call_timeout: float = CALL_TIMEOUT,
    ) -> None:
        super().__init__(backoff_initial=backoff_initial, backoff_max=backoff_max)
        self.target = target
        self.node = node
        self._call_timeout = call_timeout

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write desired statuses until cancelled (see the module docstring)."""
        from shared.aio import open_aio_loop, open_target

        async with open_aio_loop(), open_target(self.target) as channel:
            task_status.started()
            await self.drain(lambda write: self._write(channel, write))

    async def _write(self, channel: Channel, write: StatusWrite) -> bool:
        """One call. True when the write is finished with (done or dropped), False to retry it later."""
        from shared.aio import RpcError, RpcStatus

        pod, status = write.pod, write.status
        what: list[Field] = [*pod.log_fields(), ("status", status or "removed")]
        try:
            with trio.fail_after(self._call_timeout):
                changed = await set_redirection(channel, self.target, self.node, pod, status)
        except trio.TooSlowError:
            return self._failed(what, f"no answer within {self._call_timeout:g} s", retry=True)
        except RpcError as exc:
            if exc.status == RpcStatus.NOT_FOUND:
                log.info("redirection status not written", extra={"fields": [*what, ("error", exc.message)]})
                return True
            return self._failed(what, str(exc), retry=_retryable(exc))
        if self.last_error is not None:
            log.info("redirection status written; the control plane takes status writes again",
                     extra={"fields": what})
            self.last_error = None
        else:
            log.debug("redirection status written", extra={"fields": [*what, ("changed", changed)]})
        self.written += 1
        return True

    def _failed(self, what: list[Field], reason: str, *, retry: bool) -> bool:
        fields = [*what, ("error", reason)]
        if not retry:
            log.error("redirection status not written, and retrying cannot help", extra={"fields": fields})
            return True
        if self.last_error is None:  # one warning per outage, not one per attempt
            log.warning("cannot write the redirection status; retrying with backoff, enrolment is unaffected",
                        extra={"fields": fields})
        else:
            log.debug("cannot write the redirection status", extra={"fields": fields})
        self.last_error = reason
        return False


def _retryable(exc: RpcError) -> bool:
    from shared.aio import RpcStatus

    return exc.status not in (
        RpcStatus.PERMISSION_DENIED,
        RpcStatus.INVALID_ARGUMENT,
        RpcStatus.UNAUTHENTICATED,
        RpcStatus.UNIMPLEMENTED,
        RpcStatus.FAILED_PRECONDITION,
    )
