"""SDP (RFC 4566) for a recording session, sans-IO: the SRC's offer read, the SRS's answer
written.

A SIPREC offer has one ``sendonly`` audio m-line per recorded stream, each tagged with
``a=label:`` (RFC 4574), which the metadata (:mod:`plugins.siprec.metadata`) ties to a
participant. The answer keeps every m-line in place (RFC 3264): ``recvonly`` on a port of
ours with the one codec we chose, ``inactive`` for a paused stream, port 0 for one we refuse.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from plugins.siprec.sip import SipError

# static payload types (RFC 3551) and the rtpmap names we decode, with their clock rate
STATIC = {0: ("PCMU", 8000), 8: ("PCMA", 8000), 9: ("G722", 8000), 18: ("G729", 8000)}
DECODABLE = ("PCMU", "PCMA", "G722")  # :mod:`plugins.siprec.codecs`; opus: docs/siprec.md
DIRECTIONS = ("sendonly", "recvonly", "sendrecv", "inactive")
MAX_MEDIA = 16  # m-lines parsed at all; the server's own limit is lower


@dataclass
class Media:
    kind: str  # "audio", "video", ...
    port: int
    proto: str
    formats: list[str]
    address: str = ""  # its c= (or the session's)
    label: str = ""
    direction: str = "sendrecv"
    rtpmap: dict[int, tuple[str, int]] = field(default_factory=dict)  # pt -> (NAME, rate)

    def codec(self, pt: int) -> tuple[str, int] | None:
        return self.rtpmap.get(pt) or STATIC.get(pt)

    def choose(self) -> tuple[int, str] | None:
        """The first offered payload type we decode (the offerer's order of preference)."""
        for fmt in self.formats:
            if fmt.isdigit() and (c := self.codec(int(fmt))) and c[0] in DECODABLE \
                    and c[1] == 8000:
                return int(fmt), c[0]
        return None

    def telephone_event(self) -> int | None:
        return next((pt for pt, (name, _) in self.rtpmap.items()
                     if name == "TELEPHONE-EVENT"), None)


@dataclass
class Sdp:
    origin: str = ""
    address: str = ""  # session-level c=
    direction: str = "sendrecv"
    media: list[Media] = field(default_factory=list)


def parse_sdp(data: bytes) -> Sdp:
    """An offer; :class:`SipError` 488 naming what is wrong."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SipError(488, "SDP is not UTF-8") from exc
    sdp = Sdp()
    current: Media | None = None
    lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    if not lines or not lines[0].startswith("v="):
        raise SipError(488, "SDP does not start with v=")
    for line in lines:
        kind, eq, value = line.partition("=")
        if not eq or len(kind) != 1:
            raise SipError(488, f"malformed SDP line {line[:40]!r}")
        if kind == "o":
            sdp.origin = value
        elif kind == "c":
            parts = value.split()
            if len(parts) != 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
                raise SipError(488, f"malformed c= line {value[:40]!r}")
            address = parts[2].split("/")[0]
            if current is None:
                sdp.address = address
            else:
                current.address = address
        elif kind == "m":
            parts = value.split()
            if len(parts) < 4 or not parts[1].split("/")[0].isdigit():
                raise SipError(488, f"malformed m= line {value[:40]!r}")
            if len(sdp.media) >= MAX_MEDIA:
                raise SipError(488, f"more than {MAX_MEDIA} m-lines")
            port = int(parts[1].split("/")[0])
            if port > 65535:
                raise SipError(488, f"m= port {port}")
            current = Media(parts[0], port, parts[2], parts[3:], direction=sdp.direction)
            sdp.media.append(current)
        elif kind == "a":
            name, _, arg = value.partition(":")
            if name in DIRECTIONS:
                if current is None:
                    sdp.direction = name
                else:
                    current.direction = name
            elif current is not None and name == "label":
                current.label = arg.strip()
            elif current is not None and name == "rtpmap":
                pt, _, encoding = arg.partition(" ")
                codec, _, rate = encoding.strip().partition("/")
                if pt.isdigit() and rate.split("/")[0].isdigit():
                    current.rtpmap[int(pt)] = (codec.upper(), int(rate.split("/")[0]))
    for m in sdp.media:
        m.address = m.address or sdp.address
        if m.port and not m.address and m.kind == "audio":
            raise SipError(488, "an m-line without a connection address (c=)")
    return sdp


@dataclass(frozen=True)
class AnswerLine:
    """Our side of one offered m-line: ``port`` 0 refuses it."""

    kind: str
    proto: str
    port: int
    payload: int | None = None
    codec: str = ""
    direction: str = "recvonly"
    label: str = ""


def answer(lines: list[AnswerLine], address: str, session_id: int, version: int) -> bytes:
    """The answer SDP: every offered m-line in its place."""
    family = "IP6" if ":" in address else "IP4"
    out = ["v=0", f"o=callshield {session_id} {version} IN {family} {address}", "s=callshield",
           f"c=IN {family} {address}", "t=0 0"]
    for line in lines:
        if not line.port or line.payload is None:
            fmt = line.payload if line.payload is not None else 0
            out.append(f"m={line.kind} 0 {line.proto} {fmt}")
            continue
        out += [f"m={line.kind} {line.port} {line.proto} {line.payload}",
                f"a=rtpmap:{line.payload} {line.codec}/8000"]
        if line.label:
            out.append(f"a=label:{line.label}")
        out.append(f"a={line.direction}")
    return ("\r\n".join(out) + "\r\n").encode()


def session_id() -> int:
    return int(time.time())
