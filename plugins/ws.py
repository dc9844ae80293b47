"""What the WebSocket plugins share: close codes (RFC 6455) and a per-connection error type."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import WSMsgType, web

NORMAL = 1000
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
INVALID_PAYLOAD = 1007
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011


class WsProtocolError(Exception):
    """Ends one connection: ``reason`` labels the metric, ``code`` is the close code."""

    def __init__(self, reason: str, detail: str, code: int = PROTOCOL_ERROR) -> None:
        super().__init__(detail)
        self.reason = reason
        self.code = code


def json_message(msg: Any) -> dict[str, Any]:
    """A text frame's JSON object, or :class:`WsProtocolError`."""
    if msg.type == WSMsgType.BINARY:
        raise WsProtocolError("unexpected_binary", "binary frame where JSON text was expected",
                              UNSUPPORTED_DATA)
    try:
        data = json.loads(msg.data)
    except (TypeError, ValueError) as exc:
        raise WsProtocolError("malformed", f"not JSON: {exc}", INVALID_PAYLOAD) from exc
    if not isinstance(data, dict):
        raise WsProtocolError("malformed", "JSON message is not an object", INVALID_PAYLOAD)
    return data


async def close(ws: web.WebSocketResponse, code: int, message: str = "") -> None:
    if not ws.closed:
        await ws.close(code=code, message=message[:120].encode())
