"""What the WebSocket plugins share: close codes (RFC 6455), a per-connection error type,
and running one connection to its end."""

from __future__ import annotations

import json
from typing import Any, Protocol

import structlog
from aiohttp import WSMsgType, web

from plugins import metrics
from plugins.core import CallBridge, DetectorGone, ProtocolError

NORMAL = 1000
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
INVALID_PAYLOAD = 1007
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011


class WsCall(Protocol):
    log: structlog.stdlib.BoundLogger
    bridge: CallBridge | None

    async def run(self) -> None: ...


async def run_call(plugin: str, socket: web.WebSocketResponse, call: WsCall) -> None:
    """Run one connection; every failure ends here as its close code and a log line, so it
    never reaches aiohttp or another call."""
    try:
        await call.run()
    except ProtocolError as exc:
        metrics.PROTOCOL_ERRORS.labels(plugin, exc.reason).inc()
        call.log.warning("protocol error", reason=exc.reason, detail=str(exc))
        await close(socket, exc.code, str(exc))
    except DetectorGone:
        await close(socket, INTERNAL_ERROR, "detector unavailable")
    except Exception:
        call.log.exception("internal error")
        await close(socket, INTERNAL_ERROR, "internal error")
    finally:
        if call.bridge is not None:
            await call.bridge.abort("connection closed")


def json_message(msg: Any) -> dict[str, Any]:
    """A text frame's JSON object, or :class:`ProtocolError`."""
    if msg.type == WSMsgType.BINARY:
        raise ProtocolError("unexpected_binary", "binary frame where JSON text was expected",
                              UNSUPPORTED_DATA)
    try:
        data = json.loads(msg.data)
    except (TypeError, ValueError) as exc:
        raise ProtocolError("malformed", f"not JSON: {exc}", INVALID_PAYLOAD) from exc
    if not isinstance(data, dict):
        raise ProtocolError("malformed", "JSON message is not an object", INVALID_PAYLOAD)
    return data


async def close(ws: web.WebSocketResponse, code: int, message: str = "") -> None:
    if not ws.closed:
        await ws.close(code=code, message=message[:120].encode())
