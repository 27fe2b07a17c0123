"""The pods' `ambient.istio.io/redirection` annotation, written to the Kubernetes API.

As upstream's istio-cni agent does, each write is a JSON merge patch of the pod's `status` subresource that
sets the annotation ("pending", "enabled") or removes it (null); the patch also carries the pod's uid, so a
re-created pod of the same name is not annotated for its predecessor (the server refuses the patch).

`KubeStatusReporter` has the same contract as the control plane's reporter (pod_status.py): `report()`
records the desired status and never blocks nor raises; `run()` is the single writer, newest status per
pod, one request at a time. Outcomes:

    2xx                                  done
    404 Not Found                        dropped: the pod is gone
    400, 422 (the uid does not match)    dropped and logged as an error: retrying cannot help
    no answer, 401, 403, 409, 429, 5xx   kept; the writer backs off (100 ms doubling to 5 s) and retries;
                                         401/403 say that the credentials or RBAC are wrong
"""

from __future__ import annotations

import logging

import trio

from services.node_agent.model import ANNOTATION_REDIRECTION, Pod
from services.node_agent.pod_status import BACKOFF_INITIAL, BACKOFF_MAX, LatestStatusQueue, StatusWrite
from shared.kube.client import KubeApi, open_kube_api
from shared.kube.errors import KubeApiError
from shared.logs import Field

log = logging.getLogger("node_agent.status")

FINAL = frozenset({400, 404, 422})


def redirection_patch(pod: Pod, status: str | None) -> dict[str, object]:
    return {"metadata": {"uid": pod.uid, "annotations": {ANNOTATION_REDIRECTION: status}}}


class KubeStatusReporter(LatestStatusQueue):
    """StatusReporter patching the pod in the Kubernetes API; run `run()` beside it."""

    def __init__(
        self,
        *,
        kubeconfig: str | None = None,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        super().__init__(backoff_initial=backoff_initial, backoff_max=backoff_max)
        self.kubeconfig = kubeconfig

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_kube_api(self.kubeconfig) as api:
            await self.run_with(api, task_status=task_status)

    async def run_with(
        self, api: KubeApi, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        await self.drain(lambda write: self._write(api, write))

    async def _write(self, api: KubeApi, write: StatusWrite) -> bool:
        pod, status = write.pod, write.status
        what: list[Field] = [*pod.log_fields(), ("status", status or "removed")]
        path = f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}/status"
        try:
            await api.patch_merge(path, redirection_patch(pod, status))
        except KubeApiError as exc:
            fields = [*what, ("error", str(exc))]
            if exc.status == 404:
                log.info("redirection status not written: the pod is gone", extra={"fields": fields})
                return True
            if exc.status in FINAL:
                log.error("redirection status not written, and retrying cannot help",
                          extra={"fields": fields})
                return True
            if exc.status in (401, 403):
                log.error("the API server refuses the redirection status: check the agent's credentials "
                          "and RBAC (patch pods/status); retrying", extra={"fields": fields})
            elif self.last_error is None:
                log.warning("cannot write the redirection status; retrying with backoff, enrolment is "
                            "unaffected", extra={"fields": fields})
            self.last_error = str(exc)
            return False
        if self.last_error is not None:
            log.info("redirection status written; the API server takes status writes again",
                     extra={"fields": what})
            self.last_error = None
        self.written += 1
        return True
