"""HBONE server core's receive path against h2 as the oracle: the plain-DATA fast path must give exactly the
events, output and errors h2 itself gives for the same bytes, split at the same points."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.ztunnel.hbone import core
from tests.fuzz.targets import hbone_frames, hbone_opening, hbone_receive
from tests.fuzz.test_fuzz_targets import FUZZ

if not core.FAST_DATA:
    pytest.skip("this h2 version has no fast DATA path to compare", allow_module_level=True)


_frame = st.tuples(st.sampled_from([0, 0, 0, 1, 3, 4, 6, 8, 9]), st.sampled_from([0, 0, 1, 8, 0x20]),
                   st.sampled_from([1, 1, 3, 0]), st.binary(max_size=64))


@FUZZ
@given(st.lists(_frame, max_size=12), st.lists(st.integers(min_value=1, max_value=200), max_size=8))
def test_fast_path_matches_h2(frames: list[tuple[int, int, int, bytes]], cuts: list[int]) -> None:
    wire = hbone_opening() + b"".join(struct.pack(">HBBBL", len(p) >> 8, len(p) & 0xFF, kind, flags, sid) + p
                                      for kind, flags, sid, p in frames)
    chunks, pos = [], 0
    for cut in cuts:
        chunks.append(wire[pos:pos + cut])
        pos += cut
    chunks.append(wire[pos:])
    assert hbone_receive(chunks, fast=True) == hbone_receive(chunks, fast=False)


@FUZZ
@given(st.binary(max_size=600))
def test_hbone_frames_bytes(data: bytes) -> None:
    hbone_frames(data)
