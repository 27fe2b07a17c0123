"""Who is calling the stub: bearer tokens per node, and the admin token for world changes."""

from __future__ import annotations

from collections.abc import Mapping

from shared.aio import RpcError, RpcStatus


class Auth:
    """Bearer tokens: one per node (proves which node a caller runs on) and an optional admin token.

    With no node tokens at all, authentication is off (development/tests): any caller is accepted and the CA
    signs any identity that has a pod somewhere in the world.
    """

    def __init__(self, node_tokens: Mapping[str, str] | None = None, admin_token: str | None = None) -> None:
        self.node_by_token = {token: node for node, token in (node_tokens or {}).items()}
        self.admin_token = admin_token

    def set_node_tokens(self, node_tokens: Mapping[str, str]) -> None:
        self.node_by_token = {token: node for node, token in node_tokens.items()}

    @property
    def enabled(self) -> bool:
        return bool(self.node_by_token)

    @staticmethod
    def _bearer(metadata: Mapping[str, str]) -> str | None:
        value = metadata.get("authorization", "")
        return value[7:].strip() if value.lower().startswith("bearer ") else None

    def node_of(self, metadata: Mapping[str, str]) -> str | None:
        """The node the caller proved with its token, or None when auth is off. Raises RpcError."""
        if not self.enabled:
            return None
        token = self._bearer(metadata)
        if token is None:
            raise RpcError(RpcStatus.UNAUTHENTICATED, "missing 'authorization: Bearer <node token>' metadata")
        node = self.node_by_token.get(token)
        if node is None:
            raise RpcError(RpcStatus.UNAUTHENTICATED, "unknown node token; check the token file of this node")
        return node

    def check_admin(self, metadata: Mapping[str, str]) -> None:
        if self.admin_token is None:
            return
        if self._bearer(metadata) != self.admin_token:
            raise RpcError(
                RpcStatus.UNAUTHENTICATED,
                "world changes need 'authorization: Bearer <admin token>' (admin.token)",
            )
