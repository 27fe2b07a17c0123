"""Writing a file that holds a secret (a token, a private key): mode 0600 whatever was there before.

    write_secret(path, token.encode())

`os.open(..., O_CREAT, 0o600)` sets the mode only when it creates the file: an existing file keeps its
mode (a 0644 left by an older run or another tool would stay readable by everyone). The mode is therefore
set on the open descriptor before a byte is written, and the umask cannot widen it.
"""

from __future__ import annotations

import os
from pathlib import Path

SECRET_MODE = 0o600


def write_secret(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace the contents of `path` with `data`, the file owner-only (0600) before anything is written."""
    fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SECRET_MODE)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, SECRET_MODE)
        f.write(data)
