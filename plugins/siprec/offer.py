"""A SIPREC INVITE's body read, sans-IO: the multipart parts (RFC 7866: the SDP and the
recording metadata; any other part, such as Cisco's ``application/gtd``, ignored), which
m-lines are recorded, on which lane, for which participant.

Each failure is a :class:`plugins.siprec.sip.SipError` with the response that says what we
cannot take: 415 for a body type, 400 for a malformed body or metadata, 488 for SDP we cannot
record from (no audio, no PCMU/PCMA/G.722, SRTP only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from plugins.siprec.metadata import Participant, Recording, parse_metadata
from plugins.siprec.sdp import Media, Sdp, parse_sdp
from plugins.siprec.sip import SipError, SipMessage

METADATA_TYPES = ("application/rs-metadata+xml", "application/rs-metadata")
ACCEPT = "application/sdp, multipart/mixed, application/rs-metadata+xml"
MAX_PARTS = 8
PLAIN_RTP = ("RTP/AVP", "RTP/AVPF")


def content_type(value: str) -> tuple[str, dict[str, str]]:
    """``multipart/mixed;boundary="x"`` -> ("multipart/mixed", {"boundary": "x"})."""
    kind, *params = value.split(";")
    out = {}
    for p in params:
        key, _, val = p.partition("=")
        out[key.strip().lower()] = val.strip().strip('"')
    return kind.strip().lower(), out


def parse_multipart(boundary: str, body: bytes) -> list[tuple[str, bytes]]:
    """The parts of a ``multipart/mixed`` body (RFC 2046), as (content type, body)."""
    if not boundary or len(boundary) > 70:
        raise SipError(400, "multipart body without a usable boundary")
    delimiter = b"--" + boundary.encode()
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        raise SipError(400, "multipart body without its boundary delimiters")
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # the close delimiter
        if len(parts) >= MAX_PARTS:
            raise SipError(400, f"more than {MAX_PARTS} body parts")
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk.lstrip(b"\n")
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            head, sep, data = chunk.partition(b"\n\n")
        kind = "text/plain"
        for line in head.decode("utf-8", "replace").splitlines():
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                kind = content_type(value)[0]
        parts.append((kind, data[:-2] if data.endswith(b"\r\n") else data.rstrip(b"\n")))
    return parts


@dataclass
class Recorded:
    """One recorded m-line: its index in the offer, its codec, and its lane."""

    index: int
    media: Media
    payload: int
    codec: str
    lane: int = 0
    participant: Participant | None = None


@dataclass
class Offer:
    sdp: Sdp
    metadata: Recording | None
    recorded: list[Recorded] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)  # m-line indexes answered with port 0
    mixed: bool = False

    @property
    def lanes(self) -> tuple[str, ...]:
        return ("mixed",) if self.mixed else ("caller", "agent")

    def aor(self, lane: int) -> str:
        return next((r.participant.aor for r in self.recorded
                     if r.lane == lane and r.participant is not None), "")


def read_body(request: SipMessage) -> tuple[Sdp, Recording | None]:
    kind, params = content_type(request.get("Content-Type", "application/sdp"))
    if not request.body:
        raise SipError(488, "INVITE without an SDP offer (offerless INVITEs are not taken)")
    if kind == "application/sdp":
        return parse_sdp(request.body), None
    if kind != "multipart/mixed":
        raise SipError(415, f"body of type {kind[:40]}")
    sdp: Sdp | None = None
    metadata: Recording | None = None
    for part_type, data in parse_multipart(params.get("boundary", ""), request.body):
        if part_type == "application/sdp" and sdp is None:
            sdp = parse_sdp(data)
        elif part_type in METADATA_TYPES and metadata is None:
            metadata = parse_metadata(data)
    if sdp is None:
        raise SipError(488, "multipart body without an application/sdp part")
    return sdp, metadata


def read_offer(request: SipMessage, max_streams: int = 2) -> Offer:
    """What to record of an INVITE (initial or re-INVITE). At most ``max_streams`` audio
    streams are recorded: the caller's, then the others in offer order; the rest are
    refused (port 0)."""
    sdp, metadata = read_body(request)
    offer = Offer(sdp, metadata)
    candidates: list[Recorded] = []
    secure = 0
    for i, m in enumerate(sdp.media):
        if m.kind != "audio" or m.port == 0 or m.direction == "recvonly":
            offer.refused.append(i)
            continue
        if m.proto.upper() not in PLAIN_RTP:  # SRTP (RTP/SAVP...): no keys, no audio
            secure += 1
            offer.refused.append(i)
            continue
        chosen = m.choose()
        if chosen is None:
            offer.refused.append(i)
            continue
        participant = metadata.sender_of(m.label) if metadata and m.label else None
        candidates.append(Recorded(i, m, chosen[0], chosen[1], participant=participant))
    if not candidates and secure:
        raise SipError(488, "SRTP media (RTP/SAVP) is not taken: send the recording as RTP/AVP")
    if not candidates:
        offered = sorted({(m.codec(int(f)) or (f, 0))[0] for m in sdp.media
                          for f in m.formats if f.isdigit()})
        raise SipError(488, "no audio stream in PCMU, PCMA or G722 to record (offered: "
                            f"{', '.join(offered)[:80] or 'none'})")
    caller = metadata.caller() if metadata else None
    if caller is not None and any(c.participant is caller for c in candidates):
        candidates.sort(key=lambda c: c.participant is not caller)  # stable: caller first
    for extra in candidates[max_streams:]:
        offer.refused.append(extra.index)
    offer.recorded = candidates[:max_streams]
    offer.mixed = len(offer.recorded) == 1
    for lane, r in enumerate(offer.recorded):
        r.lane = lane
    return offer
