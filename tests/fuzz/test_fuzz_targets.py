"""Bounded fuzzing (hypothesis) of the parsers a peer or a user feeds: only their documented error.

FUZZ_EXAMPLES scales the number of examples per target (default 300); `scripts/fuzz TARGET [seconds]` runs the
same targets coverage-guided under atheris for long runs.
"""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.targets import cni_request, world_file, zds_codec

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
_json = st.recursive(_json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    st.text(max_size=12), c, max_size=4), max_leaves=20)


@FUZZ
@given(st.binary(max_size=1100))
def test_zds_codec_bytes(data: bytes) -> None:
    zds_codec(data)


@FUZZ
@given(st.dictionaries(st.sampled_from(["Netns", "PodName", "PodNamespace", "PodUID", "IPs",
                                        "ServiceAccount", "Labels", "Annotations", "x"]), _json, max_size=8))
def test_cni_request_json(doc: dict[str, object]) -> None:
    cni_request(json.dumps(doc).encode())


@FUZZ
@given(st.binary(max_size=300))
def test_cni_request_bytes(data: bytes) -> None:
    cni_request(data)


@FUZZ
@given(st.dictionaries(st.sampled_from(["nodes", "namespaces", "pods", "services", "policies", "x"]),
                       _json, max_size=5))
def test_world_json(doc: dict[str, object]) -> None:
    world_file(json.dumps(doc).encode())


@FUZZ
@given(st.binary(max_size=300))
def test_world_bytes(data: bytes) -> None:
    world_file(data)
