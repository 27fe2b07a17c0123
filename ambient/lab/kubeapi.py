"""The lab's own small client of its Kubernetes API server: blocking requests and a watch, made from inside
the control-plane namespace.

The lab's API server listens on the control-plane address (`<prefix>-cp`, 172.29.0.2:6443), which the host
namespace has no route to, on purpose. Each connection's socket is created inside that namespace
(probe.netns_socket) and then used from here, so `lab up` and the lab's kubelet (kubelet.py), which must
stay in the host namespace to create pod namespaces, still reach it; no packet leaves the lab. TLS uses the
lab's CA and admin client certificate (ambient/kube/apiserver.py's Pki).

    api = LabKubeApi(netns, host, port, pki)
    api.get("/api/v1/pods")                                   # the decoded JSON object
    api.create("/api/v1/namespaces", {...})
    api.patch_status("bookinfo", "ratings-v1", {"status": {...}})
    for event in api.watch("/api/v1/pods", resource_version):  # {"type": ..., "object": ...} until it ends
        ...
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from collections.abc import Iterator, Mapping
from typing import Any, Protocol
from urllib.parse import urlencode

from ambient.kube.apiserver import Pki
from ambient.lab.errors import LabError
from ambient.lab.probe import netns_socket
from shared.netns import NetnsError

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
WATCH_SECONDS = 240


class KubeRequestError(LabError):
    """A request to the lab's API server failed; `status` is the HTTP status, 0 when it did not answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class KubeRequests(Protocol):
    """What `up` and the lab's kubelet ask of the API server (LabKubeApi; a fake in the unit tests)."""

    def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, *, content_type: str = JSON
    ) -> dict[str, Any]: ...

    def get(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]: ...

    def create(self, path: str, obj: Mapping[str, Any]) -> dict[str, Any]: ...

    def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]: ...

    def watch(self, path: str, resource_version: str) -> Iterator[dict[str, Any]]: ...


class _Conn(http.client.HTTPSConnection):
    def __init__(self, sock: socket.socket, host: str, port: int, context: ssl.SSLContext, timeout: float):
        super().__init__(host, port, timeout=timeout, context=context)
        self._prepared = sock
        self._context = context

    def connect(self) -> None:
        self._prepared.settimeout(self.timeout)
        self._prepared.connect((self.host, self.port))
        self.sock = self._context.wrap_socket(self._prepared, server_hostname=self.host)


class LabKubeApi:
    """Requests to the API server at host:port, from inside network namespace `netns`."""

    def __init__(self, netns: str, host: str, port: int, pki: Pki, *, timeout: float = 10.0) -> None:
        self.netns, self.host, self.port, self.timeout = netns, host, port, timeout
        self._context = pki.client_context()

    def _connection(self, timeout: float | None) -> _Conn:
        try:
            sock = netns_socket(self.netns)
        except (OSError, NetnsError) as exc:
            raise KubeRequestError(0, f"cannot open a socket in {self.netns}: {exc}") from None
        return _Conn(sock, self.host, self.port, self._context, self.timeout if timeout is None else timeout)

    def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, *, content_type: str = JSON
    ) -> dict[str, Any]:
        """One request; the answer's JSON object. Raises KubeRequestError on any status but 2xx."""
        raw = self.request_raw(method, path, body, content_type=content_type)
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            raise KubeRequestError(200, f"{method} {path}: the answer is not JSON") from None
        return answer if isinstance(answer, dict) else {}

    def request_raw(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, *, content_type: str = JSON
    ) -> bytes:
        """One request; the answer's body. Raises KubeRequestError on any status but 2xx."""
        conn = self._connection(None)
        where = f"{method} https://{self.host}:{self.port}{path}"
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Accept": JSON, **({"Content-Type": content_type} if data is not None else {})}
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise KubeRequestError(0, f"{where}: the lab's API server did not answer: {exc}") from None
        finally:
            conn.close()
        if not 200 <= response.status < 300:
            raise KubeRequestError(response.status, f"{where}: HTTP {response.status}: {_message(raw)}")
        return raw

    def get(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        return self.request("GET", path + (f"?{urlencode(params)}" if params else ""))

    def create(self, path: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, obj)

    def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        path = f"/api/v1/namespaces/{namespace}/pods/{name}/status"
        return self.request("PATCH", path, patch, content_type=MERGE_PATCH)

    def wait_ready(self, timeout: float) -> None:
        """Wait until /readyz answers 200. Raises KubeRequestError with the last failure."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.request_raw("GET", "/readyz")
                return
            except KubeRequestError as exc:
                if time.monotonic() > deadline:
                    raise KubeRequestError(exc.status, f"not ready after {timeout:g} s: {exc}") from None
            time.sleep(0.3)

    def watch(self, path: str, resource_version: str) -> Iterator[dict[str, Any]]:
        """The watch events of collection `path` after `resource_version`, bookmarks included, until the
        server ends the watch (every WATCH_SECONDS). An ERROR event (410 Gone: list again) is yielded as it
        comes. Raises KubeRequestError when the watch cannot be opened."""
        query = urlencode({"watch": "1", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                           "timeoutSeconds": str(WATCH_SECONDS)})  # fmt: skip
        conn = self._connection(WATCH_SECONDS + 30)
        try:
            conn.request("GET", f"{path}?{query}", headers={"Accept": JSON})
            response = conn.getresponse()
            if response.status != 200:
                raise KubeRequestError(response.status, f"watch {path}: HTTP {response.status}: "
                                       f"{_message(response.read())}")  # fmt: skip
            while line := response.readline():
                if line.strip():
                    event = json.loads(line)
                    if isinstance(event, dict):
                        yield event
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise KubeRequestError(0, f"watch {path}: {exc}") from None
        finally:
            conn.close()


def _message(raw: bytes) -> str:
    """The `message` of a Kubernetes Status answer, else the start of the body."""
    try:
        status = json.loads(raw)
        if isinstance(status, dict) and status.get("message"):
            return str(status["message"])
    except ValueError:
        pass
    return raw[:200].decode(errors="replace").strip() or "(empty answer)"
