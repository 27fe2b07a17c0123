"""`ambient world` argument handling (the calls themselves are covered by the service tests)."""

from __future__ import annotations

import pytest

from ambient.cli import build_parser
from ambient.world import WorldCliError, _labels, _split_key, _to_json


def test_labels_kubectl_style() -> None:
    assert _labels(["a=1", "b=", "c-"]) == ({"a": "1", "b": ""}, ["c"])
    for bad in ("nokey", "=v", "-"):
        with pytest.raises(WorldCliError):
            _labels([bad])


def test_keys_and_documents() -> None:
    assert _split_key("ns/name", "pod") == ("ns", "name")
    with pytest.raises(WorldCliError, match="must be NAMESPACE/NAME"):
        _split_key("name", "pod")
    assert _to_json(b"name: p\nnamespace: ns\n", "p.yaml") == b'{"name":"p","namespace":"ns"}'
    with pytest.raises(WorldCliError, match=r"p\.yaml: not valid YAML/JSON"):
        _to_json(b"[unclosed", "p.yaml")


def test_registered_in_the_operator_cli() -> None:
    args = build_parser().parse_args(["world", "pod", "add", "ns/p", "--node", "n", "--ip", "10.0.0.1"])
    assert args.pod == "ns/p" and args.ip == ["10.0.0.1"] and args.sa == "default"
    args = build_parser().parse_args(["world", "label", "namespace", "ns", "a=b", "c-"])
    assert (args.kind, args.target, args.labels) == ("namespace", "ns", ["a=b", "c-"])
