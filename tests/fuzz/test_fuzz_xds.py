"""Bounded fuzzing (hypothesis) of ztunnel's xDS conversion into its state: random and mutated Address and
Authorization resources; only ConversionError, and a rejected resource leaves the state as it was
(tests/fuzz/xds_target.py says what is checked)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.test_fuzz_targets import FUZZ
from tests.fuzz.xds_target import MODES, TYPE_URLS, check_update, mutate, seeds, xds_update

_type_url = st.sampled_from(TYPE_URLS)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


_leaf = st.one_of(
    st.tuples(st.integers(1, 20), st.just(0), st.integers(0, 2**64 - 1)),  # varint: enums, ports, lengths
    st.tuples(st.integers(1, 20), st.just(2), st.binary(max_size=20)),  # strings, bytes (addresses)
    st.tuples(st.integers(1, 20), st.sampled_from([1, 5]), st.binary(min_size=8, max_size=8)),
)


def _encode(field: tuple[int, int, object]) -> bytes:
    number, wire, value = field
    key = _varint(number << 3 | wire)
    if wire == 0:
        assert isinstance(value, int)
        return key + _varint(value)
    if wire == 2:
        body = value if isinstance(value, bytes) else b"".join(_encode(f) for f in value)  # type: ignore[attr-defined]
        return key + _varint(len(body)) + body
    assert isinstance(value, bytes)
    return key + value[: 8 if wire == 1 else 4]


# Well-formed protobuf fields, nested: appended to a valid resource they merge into its sub-messages
# (a workload's addresses, ports, services; a policy's rules and matches) and change what it says.
_fields = st.recursive(_leaf, lambda inner: st.tuples(st.integers(1, 20), st.just(2),
                                                       st.lists(inner, min_size=1, max_size=3)),
                       max_leaves=8)


@st.composite
def _mutated(draw: st.DrawFn, type_url: str) -> tuple[str, bytes]:
    name, seed = draw(st.sampled_from(seeds()[type_url]))
    if draw(st.booleans()):
        payload = b"".join(_encode(f) for f in draw(st.lists(_fields, min_size=1, max_size=4)))
        return name, mutate(seed, "append", payload, 0)
    return name, mutate(seed, draw(st.sampled_from(MODES)), draw(st.binary(max_size=24)),
                        draw(st.integers(0, 4096)))


@st.composite
def _update(draw: st.DrawFn) -> tuple[str, list[tuple[str, bytes]], list[str]]:
    type_url = draw(_type_url)
    resources = draw(st.lists(_mutated(type_url), min_size=1, max_size=4))
    names = [name for name, _ in seeds()[type_url]]
    removed = draw(st.lists(st.sampled_from(names), max_size=2))
    return type_url, resources, removed


@FUZZ
@given(_update())
def test_xds_mutated_resources(update: tuple[str, list[tuple[str, bytes]], list[str]]) -> None:
    check_update(*update)


@FUZZ
@given(_type_url, st.lists(st.tuples(st.text(max_size=30), st.binary(max_size=200)), min_size=1, max_size=3))
def test_xds_random_resources(type_url: str, resources: list[tuple[str, bytes]]) -> None:
    check_update(type_url, resources, [])


@FUZZ
@given(st.binary(max_size=400))
def test_xds_bytes(data: bytes) -> None:
    xds_update(data)


def test_a_rejected_resource_keeps_the_value_it_replaces() -> None:
    # The rule the targets check, on one known case: a workload whose address has 3 bytes is NACKed and the
    # store keeps the old workload under that name.
    name, seed = next((n, s) for n, s in seeds()[TYPE_URLS[0]] if n.startswith("Kubernetes//Pod/"))
    bad_address = _encode((1, 2, [(3, 2, b"\x0a\x00\x01")]))  # workload.addresses += 3 bytes
    check_update(TYPE_URLS[0], [(name, mutate(seed, "append", bad_address, 0))], [])
