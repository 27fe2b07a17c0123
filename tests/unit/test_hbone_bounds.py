"""HBONE server core: oversized frames and header blocks are refused from the frame header, before payload."""

from __future__ import annotations

import h2.config
import h2.connection
import pytest

from services.ztunnel.hbone.core import MAX_FRAME_SIZE, SERVER_MAX_HEADER_LIST_SIZE, ServerCore
from services.ztunnel.hbone.errors import HboneProtocolError


def _client_preamble() -> bytes:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    return client.data_to_send()


def _frame(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return length.to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big")


def test_oversized_frame_refused_from_its_header_alone() -> None:
    core = ServerCore(["10.0.0.1"])
    core.receive_data(_client_preamble())
    with pytest.raises(HboneProtocolError) as info:
        core.receive_data(_frame(16 * 1024 * 1024 - 1, 0x0, 0, 1))  # no payload sent at all
    assert info.value.error_code == 0x6  # FRAME_SIZE_ERROR
    assert b"\x07" in core.data_to_send()  # a GOAWAY is queued


def test_header_block_capped_while_continuations_arrive() -> None:
    core = ServerCore(["10.0.0.1"])
    core.receive_data(_client_preamble())
    chunk = 16 * 1024
    data = _frame(chunk, 0x1, 0, 1) + b"\x00" * chunk  # HEADERS without END_HEADERS
    core.receive_data(data)
    sent = chunk
    with pytest.raises(HboneProtocolError) as info:
        while sent <= SERVER_MAX_HEADER_LIST_SIZE:
            # only the CONTINUATION's frame header: the check must not wait for its payload
            core.receive_data(_frame(chunk, 0x9, 0, 1))
            core.receive_data(b"\x00" * chunk)
            sent += chunk
    assert info.value.error_code == 0xB  # ENHANCE_YOUR_CALM
    assert sent <= SERVER_MAX_HEADER_LIST_SIZE
    assert chunk < MAX_FRAME_SIZE
