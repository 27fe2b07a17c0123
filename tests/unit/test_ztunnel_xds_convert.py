"""The operator-facing errors of decoding xDS resources (services/ztunnel/xds/convert.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf import any_pb2

from services.ztunnel.xds.convert import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    address_from_any,
    authorization_from_any,
)
from services.ztunnel.xds.errors import ConversionError

CASES = [
    (address_from_any, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, "Address", "istio.workload.Address"),
    (authorization_from_any, AUTHORIZATION_TYPE_URL, ADDRESS_TYPE_URL, "Authorization",
     "istio.security.Authorization"),
]


@pytest.mark.parametrize(("decode", "own", "other", "kind", "full_name"), CASES, ids=["address", "authz"])
def test_wrong_type_and_undecodable_bytes_name_the_resource_type(
        decode: Callable[[str, any_pb2.Any], Any], own: str, other: str, kind: str, full_name: str) -> None:
    with pytest.raises(ConversionError) as wrong:
        decode("r", any_pb2.Any(type_url=other, value=b""))
    assert f"resource of type {other!r} in an {kind} response" in str(wrong.value)
    with pytest.raises(ConversionError) as garbled:
        decode("r", any_pb2.Any(type_url=own, value=b"\xff"))
    assert f"cannot decode {full_name}: " in str(garbled.value)


@pytest.mark.parametrize(("decode", "own", "other", "kind", "full_name"), CASES, ids=["address", "authz"])
def test_an_error_in_a_resources_content_is_named_by_the_resource(
        decode: Callable[[str, any_pb2.Any], Any], own: str, other: str, kind: str, full_name: str) -> None:
    # Found by the xDS fuzz target: an empty resource named "" was NACKed as resource '/' (its content's
    # namespace/name), so the NACK did not say which resource it refused.
    with pytest.raises(ConversionError) as empty:
        decode("ns/named", any_pb2.Any(type_url=own, value=b""))
    assert empty.value.name == "ns/named"
    assert str(empty.value).startswith("resource 'ns/named': ")
