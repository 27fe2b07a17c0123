"""A Kubernetes API client: list, watch (with bookmarks) and merge-patch, as JSON.

Usage::

    async with open_kube_api(kubeconfig=None) as api:    # None: in-cluster, $KUBECONFIG, ~/.kube/config
        page = await api.list("/api/v1/pods", {"fieldSelector": "spec.nodeName=node-a"})
        async for event in api.watch("/api/v1/pods", {...}, resource_version=page.resource_version):
            ...                                              # WatchEvent(type, object); BOOKMARKs included
        await api.patch_merge("/api/v1/namespaces/ns/pods/name/status", {"metadata": {...}})

Why this shape: the kubeconfig (files, embedded data, in-cluster service-account token re-read on 401) and
the TLS setup come from lightkube (`KubeConfig`, its httpx client adapter), which runs under Trio through
anyio. Its watch loop is not used: it asks for no bookmarks and, on 410 Gone, silently watches again from
"now", losing the changes in between; our reflector (reflector.py) needs to see both. The requests here
are the few a list+watch needs, decoded with msgspec.

Errors (errors.py): every failure is a `KubeApiError` with the HTTP status (0 when the server could not be
reached) and the server's reason and message; `status == 410` (HTTP, or an ERROR event in the stream) is
`Gone`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import trio

from shared.kube.errors import Gone, KubeApiError, KubeConfigError

log = logging.getLogger("kube")
# the HTTP client logs every request at info: the reflector says what matters
for _chatty in ("httpx2", "httpcore2"):
    logging.getLogger(_chatty).setLevel(logging.WARNING)

REQUEST_TIMEOUT = 10.0
WATCH_TIMEOUT = 300
"""Seconds the server keeps one watch request open (timeoutSeconds); then the reflector watches again."""


class Status(msgspec.Struct, kw_only=True):
    code: int = 0
    reason: str = ""
    message: str = ""


class ListMeta(msgspec.Struct, kw_only=True):
    resourceVersion: str = ""


class ListPage(msgspec.Struct, kw_only=True):
    items: list[msgspec.Raw] = msgspec.field(default_factory=list)
    metadata: ListMeta = msgspec.field(default_factory=ListMeta)
    kind: str = ""

    @property
    def resource_version(self) -> str:
        return self.metadata.resourceVersion


class WatchEvent(msgspec.Struct, kw_only=True):
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK, ERROR
    object: msgspec.Raw


def load_config(kubeconfig: str | None) -> Any:
    """The lightkube SingleConfig for `kubeconfig` (a path), or from the environment when None.

    Raises:
        KubeConfigError: no usable configuration (the message says which was tried).
    """
    from lightkube import ConfigError as LightkubeConfigError
    from lightkube import KubeConfig

    try:
        config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
        single = config.get()
    except (LightkubeConfigError, OSError, ValueError, KeyError) as exc:
        where = kubeconfig or "the in-cluster service account, $KUBECONFIG or ~/.kube/config"
        raise KubeConfigError(f"cannot load the Kubernetes configuration from {where}: {exc}") from None
    if single is None:
        raise KubeConfigError(f"the kubeconfig {kubeconfig} has no current context")
    return single


class KubeApi:
    """A few requests of the Kubernetes API over one HTTP client (made by `open_kube_api`)."""

    def __init__(self, client: Any, *, watch_timeout: int = WATCH_TIMEOUT) -> None:
        self._client = client
        self.watch_timeout = watch_timeout

    @property
    def server(self) -> str:
        return str(self._client.base_url)

    async def list(self, path: str, params: Mapping[str, str] | None = None) -> ListPage:
        response = await self._send("GET", path, params=dict(params or {}))
        return msgspec.json.decode(response.content, type=ListPage)

    async def get(self, path: str) -> bytes:
        response = await self._send("GET", path)
        return bytes(response.content)

    async def patch_merge(self, path: str, body: Mapping[str, Any]) -> bytes:
        response = await self._send(
            "PATCH", path, content=msgspec.json.encode(body),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        return bytes(response.content)

    async def watch(
        self, path: str, params: Mapping[str, str] | None, *, resource_version: str
    ) -> AsyncIterator[WatchEvent]:
        """One watch request from `resource_version`, bookmarks on; ends when the server ends it.

        Raises:
            Gone: the version is too old (HTTP 410, or an ERROR event with code 410).
            KubeApiError: any other failure, including a stream that stays silent past the server's timeout.
        """
        import httpx2 as httpx

        query = {
            **(params or {}),
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(self.watch_timeout),
        }
        request = self._client.build_request(
            "GET", path, params=query, timeout=httpx.Timeout(REQUEST_TIMEOUT, read=None)
        )
        decoder = msgspec.json.Decoder(WatchEvent)
        # the server ends the request after timeoutSeconds; a connection that dies silently must not hang us
        with trio.fail_after(self.watch_timeout + 30):
            try:
                response = await self._client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise _unreachable(self.server, exc) from None
            try:
                if response.status_code != 200:
                    await response.aread()
                    raise _api_error(response.status_code, response.content)
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        event = decoder.decode(line)
                    except msgspec.DecodeError as exc:
                        raise KubeApiError(0, "", f"undecodable watch event: {exc}") from None
                    if event.type == "ERROR":
                        status = msgspec.json.decode(event.object, type=Status)
                        raise (Gone if status.code == 410 else KubeApiError)(
                            status.code, status.reason, status.message)
                    yield event
            except httpx.HTTPError as exc:
                raise KubeApiError(0, "", f"watch of {path} broke: {exc}") from None
            finally:
                with trio.CancelScope(shield=True):
                    await response.aclose()

    async def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx2 as httpx

        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _unreachable(self.server, exc) from None
        if response.status_code >= 300:
            raise _api_error(response.status_code, response.content)
        return response


def _unreachable(server: str, exc: Exception) -> KubeApiError:
    return KubeApiError(0, "", f"cannot reach the API server {server}: {type(exc).__name__}: {exc}")


def _api_error(code: int, body: bytes) -> KubeApiError:
    try:
        status = msgspec.json.decode(body, type=Status)
    except msgspec.DecodeError:
        status = Status(code=code, message=body[:200].decode(errors="replace"))
    return (Gone if code == 410 else KubeApiError)(code, status.reason, status.message or f"HTTP {code}")


@asynccontextmanager
async def open_kube_api(kubeconfig: str | None = None, **options: Any) -> AsyncIterator[KubeApi]:
    """A KubeApi for the kubeconfig at `kubeconfig` (None: in-cluster, then $KUBECONFIG, ~/.kube/config).

    Raises:
        KubeConfigError: the configuration cannot be loaded.
    """
    from lightkube.config.client_adapter import AsyncClient, ConnectionParams

    single = load_config(kubeconfig)
    import httpx2 as httpx

    try:
        client = AsyncClient(single, ConnectionParams(timeout=httpx.Timeout(REQUEST_TIMEOUT)))
    except (OSError, ValueError) as exc:
        raise KubeConfigError(f"cannot set up the Kubernetes client: {exc}") from None
    try:
        yield KubeApi(client, **options)
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()
