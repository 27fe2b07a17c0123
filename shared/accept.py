"""Which accept() errors mean "out of resources, try again shortly" (trio's serve_listeners sorts them the
same way): every accept loop retries these after ACCEPT_RETRY_DELAY and lets any other error propagate."""

from __future__ import annotations

import errno
from typing import Final

ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""Too many open files (process, system), no memory, no buffer space."""

ACCEPT_RETRY_DELAY: Final = 0.1  # seconds
