"""What every servicer of the stub does the same way: read the one request of a unary call, and turn the
world's errors into gRPC statuses."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from services.istiod.errors import NotFoundError, WorldError
from shared.aio import RpcError, RpcStatus, ServerCall


async def one_request(call: ServerCall) -> Any:
    """The call's request message; INVALID_ARGUMENT when the client sent none."""
    req = await call.recv_message()
    if req is None:
        raise RpcError(RpcStatus.INVALID_ARGUMENT, "no request")
    return req


@contextmanager
def world_errors() -> Iterator[None]:
    """WorldError -> INVALID_ARGUMENT, NotFoundError -> NOT_FOUND, with the error's message."""
    try:
        yield
    except WorldError as exc:
        raise RpcError(RpcStatus.INVALID_ARGUMENT, str(exc)) from None
    except NotFoundError as exc:
        raise RpcError(RpcStatus.NOT_FOUND, str(exc)) from None
