"""h2's frame buffer with its limits checked as soon as a frame header arrives, not after the payload.

h2 waits for a whole frame before checking its length against SETTINGS_MAX_FRAME_SIZE (a header declaring
16 MiB is buffered whole first), and it keeps up to 64 CONTINUATION frames of a header block (64 MiB at a
1 MiB frame size) before decoding it. Here each frame header is checked the moment its 9 bytes are in:
a length above our frame size is FRAME_SIZE_ERROR, and a HEADERS/PUSH_PROMISE/CONTINUATION frame that would
take the header block past the header-list size we advertise is ENHANCE_YOUR_CALM; either way h2 sends the
GOAWAY and the connection ends before the payload is read.
"""

from __future__ import annotations

import h2.errors
import h2.exceptions
import h2.frame_buffer
import hyperframe.frame

_HEADER_BLOCK_FRAMES = frozenset({0x1, 0x5, 0x9})  # HEADERS, PUSH_PROMISE, CONTINUATION
_CONTINUATION = 0x9


class HeaderBlockTooLargeError(h2.exceptions.ProtocolError):
    """A header block grew past the header-list size we advertised."""

    error_code = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


class BoundedFrameBuffer(h2.frame_buffer.FrameBuffer):
    """`FrameBuffer` that refuses an oversized frame or header block from its frame header alone."""

    def __init__(self, *, server: bool, max_frame_size: int, max_header_block: int) -> None:
        super().__init__(server=server)
        self.max_frame_size = max_frame_size
        self.max_header_block = max_header_block

    def __next__(self) -> hyperframe.frame.Frame:
        data = self._data
        if len(data) >= 9:
            length = int.from_bytes(data[:3], "big")
            if length > self.max_frame_size:
                raise h2.exceptions.FrameTooLargeError(
                    f"Received overlong frame: length {length}, max {self.max_frame_size}")
            kind = data[3]
            if kind in _HEADER_BLOCK_FRAMES:
                so_far = (sum(len(f.data) for f in self._headers_buffer)
                          if kind == _CONTINUATION else 0)
                if so_far + length > self.max_header_block:
                    raise HeaderBlockTooLargeError(
                        f"header block of at least {so_far + length} bytes, more than the "
                        f"{self.max_header_block} advertised")
        return super().__next__()
