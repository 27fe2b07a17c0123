"""ztunnel's mesh state: domain types (types.py) and the store the xDS client fills (store.py)."""

from services.ztunnel.state.store import StateStore

__all__ = ["StateStore"]
