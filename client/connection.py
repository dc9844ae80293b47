"""The connection and channel setup shared by the sync and asyncio clients."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from callshield.v1.detection_pb2_grpc import DetectionServiceStub

MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # Detect sends whole recordings
# gRPC's default reconnect backoff grows to 120 s: a detector restarted after a minute would
# stay unreachable to a long-lived client (a telephony plugin) for up to two more minutes.
MAX_RECONNECT_BACKOFF_MS = 2000


class BaseClient:
    """What the sync and asyncio clients share (httpx's ``BaseClient``): the connection, its
    channel, of the subclass's kind, and the service stub over it."""

    def __init__(
        self, target: str = "127.0.0.1:50051", *, token: str | None = None, tls: bool = False,
        root_certificates: str | Path | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.connection = Connection(target, token, tls, root_certificates, channel_options)
        self._channel = self._open_channel()
        self._stub = DetectionServiceStub(self._channel)

    def _open_channel(self) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Connection:
    target: str = "127.0.0.1:50051"
    token: str | None = None
    tls: bool = False
    root_certificates: str | Path | None = None  # PEM file; None: the system roots
    # More gRPC channel arguments, after ours (a later one wins), e.g.
    # ("grpc.use_local_subchannel_pool", 1) for a TCP connection of this client's own: gRPC
    # otherwise lets channels with equal arguments in one process share one connection
    channel_options: Sequence[tuple[str, Any]] = ()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def admin_metadata(self, admin_token: str | None) -> tuple[tuple[str, str], ...]:
        """The admin RPCs' metadata (WatchCalls): the server's admin token, never the
        stream token (``admin_token`` None: the connection's token, for a client made with
        the admin token)."""
        token = admin_token if admin_token is not None else self.token
        return (("authorization", f"Bearer {token}"),) if token else ()

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls or self.root_certificates):
            return None
        roots = Path(self.root_certificates).read_bytes() if self.root_certificates else None
        return grpc.ssl_channel_credentials(root_certificates=roots)

    @property
    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.initial_reconnect_backoff_ms", 1000),
                ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
                *self.channel_options]

    def channel(self) -> grpc.Channel:
        """A blocking channel to :attr:`target`, TLS when asked."""
        credentials = self.credentials()
        if credentials is None:
            return grpc.insecure_channel(self.target, self.options)
        return grpc.secure_channel(self.target, credentials, self.options)

    def aio_channel(self) -> grpc.aio.Channel:
        """The asyncio twin of :meth:`channel`."""
        credentials = self.credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(self.target, self.options)
        return grpc.aio.secure_channel(self.target, credentials, self.options)
