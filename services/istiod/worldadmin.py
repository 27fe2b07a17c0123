"""The stub's world admin (WorldAdmin): `ambient world ...` changes the world through it (apply a file,
add/remove pods and policies, set labels) and reads it back; every call needs the admin token."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.istiod.auth import Auth
from services.istiod.rpc import one_request, world_errors
from services.istiod.store import WorldStore
from services.istiod.world import load_world, world_to_json
from shared.aio import RpcError, RpcStatus, ServerCall
from shared.api import worldadmin_pb2


class WorldAdminServicer:
    """Each change answers with the world's new generation; a bad world is INVALID_ARGUMENT, a missing pod or
    policy NOT_FOUND, any change while the world follows the Kubernetes API FAILED_PRECONDITION (the next
    change there would undo it)."""

    def __init__(self, store: WorldStore, auth: Auth) -> None:
        self.store = store
        self.auth = auth

    async def _request(self, call: ServerCall) -> Any:
        self.auth.check_admin(call.metadata)
        return await one_request(call)

    async def _change(self, call: ServerCall, change: Callable[[Any], int]) -> None:
        """Apply `change(request)` to the world; answer with the generation it returns."""
        req = await self._request(call)
        if self.store.follows is not None:
            raise RpcError(RpcStatus.FAILED_PRECONDITION,
                           f"the world follows {self.store.follows}: make the change there (kubectl), "
                           "not through the world admin API")
        with world_errors():
            generation = change(req)
        await call.send_message(worldadmin_pb2.WorldResponse(generation=generation))

    async def ApplyWorld(self, call: ServerCall) -> None:
        def apply(req: worldadmin_pb2.ApplyWorldRequest) -> int:
            return self.store.apply(load_world(req.document, req.source or "world"), req.source or "world")

        await self._change(call, apply)

    async def AddPod(self, call: ServerCall) -> None:
        await self._change(call, lambda req: self.store.add_pod(req.pod_json))

    async def RemovePod(self, call: ServerCall) -> None:
        await self._change(call, lambda req: self.store.remove_pod(req.namespace, req.name))

    async def SetLabels(self, call: ServerCall) -> None:
        def set_labels(req: worldadmin_pb2.SetLabelsRequest) -> int:
            if req.kind == worldadmin_pb2.SetLabelsRequest.NAMESPACE:
                return self.store.set_namespace_labels(req.name, dict(req.set), list(req.remove))
            return self.store.set_pod_labels(req.namespace, req.name, dict(req.set), list(req.remove))

        await self._change(call, set_labels)

    async def AddPolicy(self, call: ServerCall) -> None:
        await self._change(call, lambda req: self.store.add_policy(req.policy_json))

    async def RemovePolicy(self, call: ServerCall) -> None:
        await self._change(call, lambda req: self.store.remove_policy(req.namespace, req.name))

    async def GetWorld(self, call: ServerCall) -> None:
        await self._request(call)
        await call.send_message(
            worldadmin_pb2.WorldResponse(
                generation=self.store.generation, world_json=world_to_json(self.store.world)
            )
        )
