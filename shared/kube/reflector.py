"""List+watch of one Kubernetes collection, kept going whatever the server does (a reflector, as client-go
calls it).

Theory of operation
-------------------
`Reflector.run(send)` lists the collection and sends `Listed(objects)`, the whole collection keyed by uid,
then watches from the list's resourceVersion and sends `Upserted(obj)` / `Deleted(obj)` for each event. The
version it holds moves with every event and every BOOKMARK (which the server sends so that a quiet watch
still advances), so:

    the server ends the watch (its timeout)      watch again from the version held: nothing is lost
    the connection breaks, the server restarts    `Lost(reason)` once; back off (0.2 s doubling to 30 s);
      or answers with an error                   watch again from the version held (resume)
    410 Gone (version no longer in the history)  list again: a new `Listed` replaces the consumer's view
    the list itself fails                        back off and list again

The consumer (the node agent's pod source, the istiod stub's world) owns the view; a `Listed` after the
first one tells it to diff. `lists` and `resumes` count what happened, for tests and the curious.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Generic, Protocol, TypeVar

import msgspec
import trio

from shared.kube.client import KubeApi
from shared.kube.errors import Gone, KubeApiError
from shared.kube.objects import Bookmark, ObjectMeta

log = logging.getLogger("kube")

BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 30.0


class HasMeta(Protocol):
    @property
    def metadata(self) -> ObjectMeta: ...


T = TypeVar("T", bound=HasMeta)


class Listed(msgspec.Struct, Generic[T], frozen=True, kw_only=True):
    kind: str
    objects: dict[str, T]


class Upserted(msgspec.Struct, Generic[T], frozen=True, kw_only=True):
    kind: str
    object: T


class Deleted(msgspec.Struct, Generic[T], frozen=True, kw_only=True):
    kind: str
    object: T


class Lost(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    reason: str
    status: int = 0
    """The HTTP status of the failure (401: credentials, 403: RBAC, 404: no such resource); 0 without one."""


ReflectorEvent = Listed[T] | Upserted[T] | Deleted[T] | Lost


class Reflector(Generic[T]):
    """Lists and watches `path` (with `params`, e.g. a field selector); see the module docstring."""

    def __init__(
        self,
        api: KubeApi,
        kind: str,
        path: str,
        decode: Callable[[bytes], T],
        params: Mapping[str, str] | None = None,
        *,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.api = api
        self.kind = kind
        self.path = path
        self.params = dict(params or {})
        self._decode = decode
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self.resource_version = ""
        self.lists = 0
        """Complete listings made (the first one included; each later one followed a 410 or a failed list)."""
        self.resumes = 0
        """Watches started again from the version held, after the previous one ended or broke."""
        self.last_error: str | None = None

    async def run(self, send: trio.MemorySendChannel[ReflectorEvent[T]]) -> None:
        """List and watch until cancelled; never raises for the server's failures (module docstring)."""
        backoff = self._backoff_initial
        need_list = True
        watched = False
        async with send:
            while True:
                try:
                    if need_list:
                        await self._list(send)
                        need_list, watched = False, False
                    elif watched:
                        self.resumes += 1
                    watched = True
                    async for _ in self._watch(send):
                        backoff = self._backoff_initial
                    self._recovered()
                    continue  # the server ended the watch: watch again from the version held
                except Gone as exc:
                    log.info("resource version too old; listing again", extra={"fields": [
                        ("kind", self.kind), ("resource_version", self.resource_version),
                        ("error", exc.message)]})
                    if need_list:  # a fresh list's version gone already: do not spin
                        await trio.sleep(backoff)
                        backoff = min(backoff * 2, self._backoff_max)
                    need_list = True
                    continue
                except (KubeApiError, trio.TooSlowError) as exc:
                    reason = str(exc) if isinstance(exc, KubeApiError) else "the watch went silent"
                    status = exc.status if isinstance(exc, KubeApiError) else 0
                if self.last_error is None:
                    log.warning("lost the API server; retrying with backoff, the last listing stays in use",
                                extra={"fields": [("kind", self.kind), ("error", reason),
                                                  ("backoff", f"{backoff:.1f}s")]})
                    await send.send(Lost(kind=self.kind, reason=reason, status=status))
                else:
                    log.debug("API server still unavailable",
                              extra={"fields": [("kind", self.kind), ("error", reason)]})
                self.last_error = reason
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max)

    async def _list(self, send: trio.MemorySendChannel[ReflectorEvent[T]]) -> None:
        page = await self.api.list(self.path, self.params)
        objects: dict[str, T] = {}
        for raw in page.items:
            obj = self._decode(bytes(raw))
            objects[obj.metadata.uid] = obj
        self.resource_version = page.resource_version
        self.lists += 1
        self._recovered()
        log.debug("listed", extra={"fields": [("kind", self.kind), ("count", len(objects)),
                                              ("resource_version", self.resource_version)]})
        await send.send(Listed(kind=self.kind, objects=objects))

    async def _watch(self, send: trio.MemorySendChannel[ReflectorEvent[T]]) -> AsyncIterator[None]:
        async for event in self.api.watch(self.path, self.params, resource_version=self.resource_version):
            self._recovered()
            if event.type == "BOOKMARK":
                bookmark = msgspec.json.decode(event.object, type=Bookmark)
                self.resource_version = bookmark.metadata.resource_version
                yield None
                continue
            obj = self._decode(bytes(event.object))
            self.resource_version = obj.metadata.resource_version or self.resource_version
            if event.type in ("ADDED", "MODIFIED"):
                await send.send(Upserted(kind=self.kind, object=obj))
            elif event.type == "DELETED":
                await send.send(Deleted(kind=self.kind, object=obj))
            yield None

    def _recovered(self) -> None:
        if self.last_error is not None:
            log.info("API server reachable again", extra={"fields": [("kind", self.kind)]})
            self.last_error = None

