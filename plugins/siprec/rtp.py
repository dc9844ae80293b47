"""RTP (RFC 3550) for a recording session, sans-IO: packets parsed, one source locked per
stream, reordered and gap-filled into 8 kHz linear PCM (:mod:`.codecs` decodes).

Each stream locks onto the first SSRC it hears (again after a re-INVITE); packets of any other
source are dropped and counted, so a stray or injected stream cannot mix into a participant's
lane. The jitter buffer holds packets up to ``reorder_seconds`` (60 ms: three 20 ms packets)
to put them back in order; a packet still missing by then is lost and its time becomes
silence (counted), as is a timestamp jump (silence suppression), so that the lane's time stays
the call's time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from plugins.siprec.codecs import G722Decoder, decoder

RATE = 8000  # the RTP clock of every codec we take (G.722's too: RFC 3551 4.5.2)
MAX_GAP_SECONDS = 5.0  # a timestamp jump longer than this is a new timeline, not silence


@dataclass(frozen=True)
class RtpPacket:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    marker: bool
    payload: bytes = field(repr=False)


def parse_rtp(data: bytes) -> RtpPacket | None:
    """None for what is not an RTP v2 packet (RTCP on the RTP port, garbage)."""
    if len(data) < 12 or data[0] >> 6 != 2:
        return None
    pt = data[1] & 0x7F
    if 72 <= pt <= 76:  # RTCP multiplexed on the RTP port (RFC 5761)
        return None
    offset = 12 + 4 * (data[0] & 0x0F)
    if data[0] & 0x10:  # header extension
        if len(data) < offset + 4:
            return None
        offset += 4 + 4 * int.from_bytes(data[offset + 2 : offset + 4], "big")
    end = len(data)
    if data[0] & 0x20 and end > offset:  # padding
        end -= data[-1]
    if end < offset:
        return None
    return RtpPacket(pt, int.from_bytes(data[2:4], "big"), int.from_bytes(data[4:8], "big"),
                     int.from_bytes(data[8:12], "big"), bool(data[1] & 0x80),
                     data[offset:end])


def build_rtp(payload_type: int, sequence: int, timestamp: int, ssrc: int, payload: bytes,
              marker: bool = False) -> bytes:
    """One packet (the test peers and the bench send these)."""
    return (bytes([0x80, (0x80 if marker else 0) | payload_type])
            + (sequence & 0xFFFF).to_bytes(2, "big") + (timestamp & 0xFFFFFFFF).to_bytes(4, "big")
            + ssrc.to_bytes(4, "big") + payload)


@dataclass
class StreamStats:
    packets: int = 0
    foreign_ssrc: int = 0  # dropped: another source than the locked one
    other_payload: int = 0  # dropped: neither the negotiated codec nor telephone-event
    events: int = 0  # telephone-event (DTMF): ignored, never logged
    late: int = 0  # arrived after its time was filled in, or a duplicate
    lost_samples: int = 0  # filled with silence
    gap_samples: int = 0  # timestamp jumps (silence suppression) filled with silence


class JitterBuffer:
    """One stream's packets -> its PCM, in order, with time kept."""

    def __init__(self, payload_type: int, codec: str, event_type: int | None = None,
                 reorder_seconds: float = 0.06) -> None:
        self.payload_type = payload_type
        self.decode = decoder(codec)
        self.event_type = event_type
        self.hold = int(reorder_seconds * RATE)
        self.stats = StreamStats()
        self.ssrc: int | None = None
        self._next_seq: int | None = None  # extended sequence number expected next
        self._next_ts = 0  # RTP timestamp expected next (unwrapped)
        self._held: dict[int, RtpPacket] = {}  # extended seq -> packet

    def relock(self) -> None:
        """A re-INVITE may change the source: lock onto the next one heard."""
        self.flush()
        self.ssrc, self._next_seq = None, None
        if isinstance(self.decode, G722Decoder):
            self.decode.reset()

    def push(self, packet: RtpPacket) -> list[np.ndarray]:
        """PCM (int16) now playable, in order; empty while reordering."""
        if self.ssrc is None:
            self.ssrc = packet.ssrc
        elif packet.ssrc != self.ssrc:
            self.stats.foreign_ssrc += 1
            return []
        if packet.payload_type == self.event_type:
            self.stats.events += 1
            return []
        if packet.payload_type != self.payload_type:
            self.stats.other_payload += 1
            return []
        self.stats.packets += 1
        if self._next_seq is None:
            self._next_seq, self._next_ts = packet.sequence, packet.timestamp
        seq = self._extend(packet.sequence)
        if seq < self._next_seq or seq in self._held:
            self.stats.late += 1
            return []
        self._held[seq] = packet
        return self._drain(force=False)

    def flush(self) -> list[np.ndarray]:
        """At the end (or a pause): everything held, gaps filled."""
        return self._drain(force=True)

    def _extend(self, seq: int) -> int:
        assert self._next_seq is not None
        delta = (seq - self._next_seq + 0x8000) % 0x10000 - 0x8000
        return self._next_seq + delta

    def _drain(self, force: bool) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        while self._held:
            assert self._next_seq is not None
            packet = self._held.pop(self._next_seq, None)
            if packet is None:
                first = min(self._held)
                newest = self._held[max(self._held)]
                waited = (newest.timestamp - self._next_ts) & 0xFFFFFFFF
                if not force and waited < self.hold:
                    break  # still worth waiting for the missing one
                packet = self._held.pop(first)
                missing = (packet.timestamp - self._next_ts) & 0xFFFFFFFF
                if missing < MAX_GAP_SECONDS * RATE:
                    out.append(np.zeros(missing, np.int16))
                    self.stats.lost_samples += missing
                self._next_seq = first
            else:
                jump = (packet.timestamp - self._next_ts) & 0xFFFFFFFF
                if 0 < jump < MAX_GAP_SECONDS * RATE:  # silence suppression: time went on
                    out.append(np.zeros(jump, np.int16))
                    self.stats.gap_samples += jump
            out.append(self.decode(packet.payload))
            self._next_seq += 1
            # one payload byte is one tick of the 8 kHz clock for PCMU, PCMA and G.722 alike
            # (G.722's byte is two 16 kHz samples), whatever the decoder gave out for it
            self._next_ts = (packet.timestamp + len(packet.payload)) & 0xFFFFFFFF
        return out
