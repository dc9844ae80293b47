"""The server's errors, and the one table that turns them into gRPC statuses.

Code that finds a problem (settings, decoding, the stream loop, admission) raises one of
these with a message written for the client developer; only :func:`grpc_statuses`, around
each RPC of the servicer, speaks gRPC. So a status code is chosen by the kind of problem, in
one place, and a new check cannot answer with the wrong code by accident (``settings.py``
used to raise ``InvalidAudio`` for a bad label or threshold).

The queue's :class:`~server.queue.base.QueueUnavailable` predates this module and lives with
the queue backends; it is mapped here like the others.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import ClassVar

import grpc

from server.queue.base import QueueUnavailable

Metadata = tuple[tuple[str, str], ...]


class ServerError(Exception):
    """Base of the errors a client is told about: :data:`STATUS` gives the code, the
    message is the status details, ``metadata`` goes with it as trailing metadata."""

    metadata: ClassVar[Metadata] = ()


class InvalidArgument(ServerError, ValueError):
    """A request the API does not accept: a config field out of range, a label, requests
    in the wrong order."""


class InvalidAudio(InvalidArgument):
    """Audio the API does not accept: format, chunk size, duration, an unreadable file."""


class ClientTimeout(ServerError):
    """The client kept a stream open without sending what it must."""


class Overloaded(ServerError):
    """A limit on open calls or queued work is reached: retry later."""


class Draining(ServerError):
    """The server is shutting down: clients whose retry policy covers UNAVAILABLE retry after
    a second (by then a load balancer has seen health NOT_SERVING and routes elsewhere)."""

    metadata: ClassVar[Metadata] = (("grpc-retry-pushback-ms", "1000"),)


class DecodeCancelled(ServerError):
    """The caller gave up (client cancelled, deadline passed) while a recording was decoded."""


#: error class -> (status code, prefix of the details); the most derived class listed wins
STATUS: dict[type[Exception], tuple[grpc.StatusCode, str]] = {
    InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, ""),
    ClientTimeout: (grpc.StatusCode.DEADLINE_EXCEEDED, ""),
    Overloaded: (grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    Draining: (grpc.StatusCode.UNAVAILABLE, ""),
    QueueUnavailable: (grpc.StatusCode.UNAVAILABLE, "inference unavailable: "),
    DecodeCancelled: (grpc.StatusCode.CANCELLED, ""),
}
MAPPED = tuple(STATUS)


def grpc_status(exc: Exception) -> tuple[grpc.StatusCode, str, Metadata]:
    """``(code, details, trailing metadata)`` for one of the :data:`MAPPED` errors."""
    cls = next(c for c in type(exc).__mro__ if c in STATUS)
    code, prefix = STATUS[cls]
    return code, prefix + str(exc), getattr(exc, "metadata", ())


@asynccontextmanager
async def grpc_statuses(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Around an RPC's body: a mapped error raised inside ends the call with its status."""
    try:
        yield
    except MAPPED as exc:
        await context.abort(*grpc_status(exc))
