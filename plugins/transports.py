"""One transport per socket kind: TCP (AudioSocket) and WebSocket (Twilio, FreeSWITCH,
AudioHook). A transport moves bytes or messages and closes; what they mean is the platform
protocol's (:mod:`plugins.protocols`), and what to do when anything fails is the one error
ladder in :mod:`plugins.session`.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress

from aiohttp import WSMsgType, web

from plugins.protocols.base import Inbound
from plugins.protocols.events import NORMAL, Outbound, ProtocolViolation

READ_BYTES = 65536


class TcpTransport:
    """A TCP connection, with an idle limit: no complete frame (:meth:`heard`) for
    ``idle_seconds`` is a protocol error (AudioSocket: Asterisk sends a frame every 20 ms all
    call long, so silence that long is a fault, and a peer trickling bytes never holds a
    connection open)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 idle_seconds: float) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_seconds = idle_seconds
        self._closed = False
        self._deadline = asyncio.get_running_loop().time() + idle_seconds

    @property
    def closed(self) -> bool:
        return self._closed or self.writer.is_closing()

    @property
    def close_code(self) -> int | None:
        return None

    def heard(self) -> None:
        self._deadline = asyncio.get_running_loop().time() + self.idle_seconds

    async def receive(self) -> Inbound | None:
        """The next bytes; None at a clean close (FIN). A reset raises ConnectionError."""
        try:
            async with asyncio.timeout_at(self._deadline):
                data = await self.reader.read(READ_BYTES)
        except TimeoutError as exc:
            raise ProtocolViolation("idle", f"no frame for {self.idle_seconds} s") from exc
        return data or None

    async def send(self, message: Outbound) -> None:
        self.writer.write(message if isinstance(message, bytes) else message.encode())
        await self.writer.drain()

    async def close(self, code: int = NORMAL, reason: str = "", last: tuple[Outbound, ...] = (),
                    linger_seconds: float = 0.0) -> None:
        """Close, sending ``last`` (a hangup or error frame) first. After that frame the write
        side is shut (FIN) and the socket lingers briefly before closing: Asterisk keeps
        streaming audio until it reads the frame, and closing a socket with unread input
        makes the kernel send a reset, which can destroy the frame before Asterisk reads it.
        Once only: a detector failure can race the call's own end."""
        if self.closed:
            return
        self._closed = True
        with suppress(ConnectionError, OSError):
            if last:
                for message in last:
                    await self.send(message)
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                await asyncio.sleep(linger_seconds)
        self.writer.close()
        with suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


class WebSocketTransport:
    """An accepted aiohttp WebSocket: text frames in as ``str``, binary as ``bytes``."""

    def __init__(self, socket: web.WebSocketResponse) -> None:
        self.socket = socket

    @property
    def closed(self) -> bool:
        return self.socket.closed

    @property
    def close_code(self) -> int | None:
        return self.socket.close_code

    def heard(self) -> None:
        pass

    async def receive(self) -> Inbound | None:
        """The next message; None once the socket is closing or closed."""
        msg = await self.socket.receive()
        if msg.type == WSMsgType.TEXT:
            return str(msg.data)
        if msg.type == WSMsgType.BINARY:
            return bytes(msg.data)
        return None

    async def send(self, message: Outbound) -> None:
        if isinstance(message, bytes):
            await self.socket.send_bytes(message)
        else:
            await self.socket.send_str(message)

    async def close(self, code: int = NORMAL, reason: str = "", last: tuple[Outbound, ...] = (),
                    linger_seconds: float = 0.0) -> None:
        if self.socket.closed:
            return
        with suppress(ConnectionError, RuntimeError):
            for message in last:
                await self.send(message)
            await asyncio.sleep(linger_seconds)
        if not self.socket.closed:
            await self.socket.close(code=code, message=reason[:120].encode())
