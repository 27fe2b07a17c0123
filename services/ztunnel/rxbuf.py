"""The process's one receive buffer (one shared buffer, not 256 KiB per connection).

Every data-path reader fills it and drains it with no checkpoint in between: the plaintext splice loop
(proxy/tcp.py), the HBONE upstream direction (hbone/relay.py) and the batched TLS reader
(hbone/tlsstream.py). Whatever must outlive the next `await` is copied out first.
"""

from __future__ import annotations

from typing import Final

RECEIVE_BUFFER_SIZE: Final = 256 * 1024
receive_buffer: Final = bytearray(RECEIVE_BUFFER_SIZE)  # never resized: tlsstream pins it for SSL_read
receive_view: Final = memoryview(receive_buffer)
