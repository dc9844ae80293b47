"""What every sans-IO platform protocol shares: the interface, how a connection ends on our
side, and JSON text frames. The events it returns are :mod:`.events`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from plugins.protocols.events import (
    INTERNAL_ERROR,
    INVALID_PAYLOAD,
    NORMAL,
    UNSUPPORTED_DATA,
    Event,
    Outbound,
    ProtocolViolation,
)

Inbound = str | bytes  # a WebSocket text (str) or binary frame, or bytes read off TCP


class Cause(Enum):
    """Why we end a connection ourselves."""

    PROTOCOL = "protocol"  # the platform broke its protocol
    DETECTOR = "detector"  # the detection stream failed
    INTERNAL = "internal"  # our own bug


@dataclass(frozen=True)
class Ending:
    """How a connection ends on our side: ``send`` these, then (``farewell_seconds``) wait
    that long for the platform's own goodbye (:meth:`PlatformProtocol.farewell`), or
    (``linger_seconds``) shut the write side and wait that long before closing, then close
    with ``code``/``reason`` where the transport has them."""

    send: tuple[Outbound, ...] = ()
    code: int = NORMAL
    reason: str = ""
    farewell_seconds: float = 0.0
    linger_seconds: float = 0.0


class PlatformProtocol:
    """One connection of one platform, sans-IO. Subclasses implement :meth:`_receive`."""

    plugin = ""

    def context(self) -> dict[str, Any]:
        """Log fields known before the call is identified (AudioHook's session id)."""
        return {}

    def receive(self, data: Inbound) -> list[Event]:
        """What ``data`` (one read or one message) means, in order; a protocol error comes
        last, as a value."""
        events: list[Event] = []
        try:
            self._receive(data, events)
        except ProtocolViolation as exc:
            events.append(exc)
        return events

    def _receive(self, data: Inbound, events: list[Event]) -> None:
        raise NotImplementedError

    def end_of_input(self, close_code: int | None) -> list[Event]:
        """The platform closed its side (WebSocket ``close_code``, None on TCP)."""
        return []

    def flush(self) -> list[Event]:
        """At a hangup: audio still held back (a lagging track), padded out."""
        return []

    def alert(self, data: dict[str, Any]) -> Outbound | None:
        """The in-band alert message for the platform, or None when it has no in-band
        channel or can no longer take one (closing)."""
        return None

    def ending(self, cause: Cause, error: ProtocolViolation | None = None) -> Ending | None:
        """How we end the connection for ``cause``; None when an ending is under way."""
        raise NotImplementedError

    def farewell(self, data: Inbound) -> list[Outbound] | None:
        """While waiting for the platform's goodbye after ours: the replies once it came."""
        return None


class WebSocketProtocol(PlatformProtocol):
    """Platforms whose only goodbye is the WebSocket close frame (Twilio, FreeSWITCH)."""

    def ending(self, cause: Cause, error: ProtocolViolation | None = None) -> Ending | None:
        if cause is Cause.PROTOCOL and error is not None:
            return Ending(code=error.code, reason=str(error))
        reason = "detector unavailable" if cause is Cause.DETECTOR else "internal error"
        return Ending(code=INTERNAL_ERROR, reason=reason)


def json_object(data: Inbound) -> dict[str, Any]:
    """A text frame's JSON object, or :class:`ProtocolViolation`."""
    if isinstance(data, bytes):
        raise ProtocolViolation("unexpected_binary", "binary frame where JSON text was expected",
                                UNSUPPORTED_DATA)
    try:
        message = json.loads(data)
    except (TypeError, ValueError) as exc:
        raise ProtocolViolation("malformed", f"not JSON: {exc}", INVALID_PAYLOAD) from exc
    if not isinstance(message, dict):
        raise ProtocolViolation("malformed", "JSON message is not an object", INVALID_PAYLOAD)
    return message


def dumps(message: dict[str, Any]) -> str:
    """A JSON text frame, as aiohttp's ``send_json`` writes it."""
    return json.dumps(message)
