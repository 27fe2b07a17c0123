"""The xDS fuzz target: random and mutated Address / Authorization resources (protobuf bytes) through
ztunnel's conversion into its state (`XdsClient.handle_response`, the path every delta response takes).

The rules checked on every input:

* nothing raises out of `handle_response`; a resource either converts or is rejected with ConversionError
  (the documented rejection type, checked by converting each resource on its own too);
* the reply is a NACK exactly when something was rejected, and the NACK names every rejected resource;
* a rejected resource leaves the state as it was: the store holds the same value under that name (or still
  none) and the ACKed version is unchanged; when every resource is rejected and nothing is removed, the
  whole state (workloads, services, policies, both indexes, versions) is unchanged;
* a converted resource is in the store under its name.

The store starts from the bookinfo world as the istiod stub derives it, so mutations start from realistic
resources and rejections have something to leave alone.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from google.protobuf import any_pb2

from services.istiod.derive import Resources
from services.istiod.testing import bookinfo_world
from services.ztunnel.state.store import StateStore
from services.ztunnel.xds.client import XdsClient, XdsClientConfig
from services.ztunnel.xds.convert import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    address_from_any,
    authorization_from_any,
)
from services.ztunnel.xds.errors import ConversionError
from shared.aio import GrpcTarget
from shared.api import discovery_pb2

TYPE_URLS = (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL)
CONVERTERS = {ADDRESS_TYPE_URL: address_from_any, AUTHORIZATION_TYPE_URL: authorization_from_any}
MODES = ("raw", "overwrite", "truncate", "append")


@cache
def seeds() -> dict[str, tuple[tuple[str, bytes], ...]]:
    """type URL -> the (name, serialized resource) pairs derived from the bookinfo world."""
    derived = Resources(bookinfo_world()).by_type
    return {url: tuple((name, msg.SerializeToString()) for name, (_, msg) in sorted(derived[url].items()))
            for url in TYPE_URLS}


def mutate(seed: bytes, mode: str, payload: bytes, position: int) -> bytes:
    """`seed` changed by `payload`: replaced by it (raw), written over it at `position` (overwrite), cut at
    `position` and followed by it (truncate), or followed by it (append: protobuf merges a repeated field
    and a later scalar or sub-message wins, so appended fields rewrite the resource's meaning)."""
    at = position % (len(seed) + 1)
    if mode == "raw":
        return payload
    if mode == "overwrite":
        return seed[:at] + payload + seed[at + len(payload):]
    if mode == "truncate":
        return seed[:at] + payload
    return seed + payload


def _response(type_url: str, resources: list[tuple[str, bytes]], removed: list[str],
              nonce: str) -> discovery_pb2.DeltaDiscoveryResponse:
    return discovery_pb2.DeltaDiscoveryResponse(
        type_url=type_url, nonce=nonce, removed_resources=removed,
        resources=[discovery_pb2.Resource(name=name, version=f"v-{i}",
                                          resource=any_pb2.Any(type_url=type_url, value=value))
                   for i, (name, value) in enumerate(resources)])


def seeded_client() -> XdsClient:
    """A client whose store holds the whole bookinfo world (both types ACKed)."""
    client = XdsClient(GrpcTarget(host="127.0.0.1", port=1), StateStore(), XdsClientConfig(node_id="fuzz"))
    for type_url, pairs in seeds().items():
        reply = client.handle_response(_response(type_url, list(pairs), [], "seed"))
        assert not reply.HasField("error_detail"), reply.error_detail.message
    return client


def _state(client: XdsClient) -> dict[str, Any]:
    store = client.store
    return {"workloads": dict(store.workloads), "services": dict(store.services),
            "policies": dict(store.policies), "by_addr": dict(store._by_addr),
            "by_vip": dict(store._by_vip), "versions": copy.deepcopy(client.versions)}


def _held(state: dict[str, Any], type_url: str, name: str) -> object:
    if type_url == AUTHORIZATION_TYPE_URL:
        return state["policies"].get(name)
    return state["workloads"].get(name) or state["services"].get(name)


def check_update(type_url: str, resources: list[tuple[str, bytes]], removed: list[str]) -> None:
    """One delta response of `type_url` with `resources` (name, serialized value) and `removed` names
    through a seeded client; asserts the rules of the module docstring."""
    client = seeded_client()
    unique: dict[str, bytes] = {}
    for name, value in resources:
        unique.setdefault(name, value)
    removed = [name for name in dict.fromkeys(removed) if name not in unique]
    convert = CONVERTERS[type_url]
    converted: dict[str, object] = {}
    rejected: list[str] = []
    for name, value in unique.items():
        try:
            converted[name] = convert(name, any_pb2.Any(type_url=type_url, value=value))
        except ConversionError:
            rejected.append(name)
    before = _state(client)
    reply = client.handle_response(_response(type_url, list(unique.items()), removed, "fuzz"))
    after = _state(client)
    assert reply.response_nonce == "fuzz"
    assert reply.HasField("error_detail") == bool(rejected)
    for name in rejected:
        assert f"resource {name!r}" in reply.error_detail.message
        assert _held(after, type_url, name) == _held(before, type_url, name)
        assert after["versions"][type_url].get(name) == before["versions"][type_url].get(name)
    for name, item in converted.items():
        assert _held(after, type_url, name) == item
    if not converted and not removed:
        assert after == before


def xds_update(data: bytes) -> None:
    """The byte-level form of `check_update` (for atheris): byte 0 picks the type URL; the rest is split at
    0xff into up to 4 resources, each `seed index, mode, position, payload...` (see `mutate`); a chunk that
    starts with 0xfe names a removal of that seed instead."""
    if not data:
        return
    type_url = TYPE_URLS[data[0] % 2]
    pool = seeds()[type_url]
    resources: list[tuple[str, bytes]] = []
    removed: list[str] = []
    for chunk in data[1:].split(b"\xff")[:4]:
        if len(chunk) < 3:
            continue
        if chunk[0] == 0xFE:
            removed.append(pool[chunk[1] % len(pool)][0])
            continue
        name, seed = pool[chunk[0] % len(pool)]
        resources.append((name, mutate(seed, MODES[chunk[1] % len(MODES)], chunk[3:], chunk[2] * 7)))
    check_update(type_url, resources, removed)
