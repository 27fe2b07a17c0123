"""The parts of Kubernetes objects every reader needs, as msgspec types (unknown fields are ignored)."""

from __future__ import annotations

from typing import Any

import msgspec


class ObjectMeta(msgspec.Struct, kw_only=True, rename="camel"):
    name: str = ""
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    deletion_timestamp: str | None = None


class Bookmark(msgspec.Struct, kw_only=True):
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)


class KubeObject(msgspec.Struct, frozen=True, kw_only=True):
    """Any object: its metadata decoded, and the whole object as the server sent it (JSON)."""

    metadata: ObjectMeta
    raw: dict[str, Any]


_decode_meta = msgspec.json.Decoder(Bookmark).decode
_decode_any = msgspec.json.Decoder(dict[str, Any]).decode


def decode_object(data: bytes) -> KubeObject:
    """A KubeObject from the JSON of one object (a list item or a watch event's object).

    Raises:
        msgspec.DecodeError: not a JSON object, or metadata of the wrong shape.
    """
    return KubeObject(metadata=_decode_meta(data).metadata, raw=_decode_any(data))
