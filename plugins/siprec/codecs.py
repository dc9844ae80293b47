"""The recorded streams' codecs -> 8 kHz linear PCM, sans-IO: one decoder per stream.

Every lane of a recording goes to the detector as 8 kHz LINEAR16, the rate PCMU and PCMA
carry natively, so that a session whose streams use different codecs (one leg G.711, the
other G.722, as SBCs record a call between a carrier and a wideband phone) is still one
detection stream with one sample rate.

G.722 (RFC 3551 4.5.2, payload type 9) carries 16 kHz audio on an 8 kHz RTP clock: one
payload byte is two 16 kHz samples and one tick of the RTP clock, just as one PCMU byte is
one 8 kHz sample and one tick; that is why the jitter buffer times every codec by its
payload length. It is decoded by the ITU-T reference codec (PyPI ``g722``, a C extension of
sippy's libg722, the spandsp implementation) in its 64 kbit/s mode, the only mode RTP
signals, then low-pass filtered and decimated to 8 kHz here. The decoder and the filter
keep their state from packet to packet: ADPCM adapts across packets, so a decoder started
afresh per packet would ruin the audio (tests/test_siprec_protocol.py measures both).

Why not soxr, the resampler the server uses for whole streams: its streaming mode releases
output in blocks of about 50 ms (the first five 20 ms packets give nothing, the sixth 830
samples), which would hold a G.722 lane back against the G.711 one and add that much to the
latency per packet. The FIR here releases each packet's 160 samples at once, 23 samples (2.9
ms at 8 kHz) behind the PCM: 22 of the codec's QMF filters and 24 of the FIR, both at 16 kHz.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from G722 import G722
from scipy.signal import firwin

from models.data.audio import alaw_decode, mulaw_decode

RATE = 8000
G722_RATE = 16000
G722_BIT_RATE = 64000  # the RTP payload format's mode (RFC 3551 4.5.2)
# 49 taps: a delay of 24 samples at 16 kHz, so with the codec's 22 the total (46) is a whole
# number of 8 kHz samples; a Kaiser window (beta 8): flat to 3 kHz (-1.5 dB at 3.4 kHz), and
# what would fold back onto the telephone band is cut by 16 dB at 4 kHz, 35 at 4.3, 80 from
# 4.6 kHz up
DECIMATOR = firwin(49, 3700, fs=G722_RATE, window=("kaiser", 8.0))

Decoder = Callable[[bytes], np.ndarray]


class G722Decoder:
    """One stream's G.722 payloads -> 8 kHz int16, state kept across packets."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A new source (a re-INVITE relocks the stream): its encoder starts afresh too."""
        self._codec = G722(G722_RATE, G722_BIT_RATE)
        self._history = np.zeros(DECIMATOR.size - 1)  # the last 16 kHz samples, for the FIR
        self._phase = 0  # 0: the next 16 kHz sample is kept, 1: dropped

    def __call__(self, payload: bytes) -> np.ndarray:
        wide = np.frombuffer(self._codec.decode(payload), np.int16).astype(np.float64)
        if not wide.size:
            return np.zeros(0, np.int16)
        # the FIR over the history and this packet (a plain convolution: several times
        # cheaper than lfilter with its state, on 320 samples), every other output kept
        joined = np.concatenate((self._history, wide))
        narrow = np.convolve(joined, DECIMATOR, mode="valid")[self._phase :: 2]
        self._history = joined[-(DECIMATOR.size - 1) :]
        self._phase = (self._phase + wide.size) % 2
        return np.clip(np.rint(narrow), -32768, 32767).astype(np.int16)


def decoder(codec: str) -> Decoder:
    """A decoder for one stream of ``codec`` (an rtpmap name we answer with)."""
    if codec == "PCMU":
        return mulaw_decode
    if codec == "PCMA":
        return alaw_decode
    if codec == "G722":
        return G722Decoder()
    raise ValueError(f"no decoder for {codec}")


def encode_g722(pcm16k: np.ndarray) -> bytes:
    """16 kHz int16 -> G.722 at 64 kbit/s, one encoder for the whole signal (as a phone's
    is for a whole call): what the test SRCs send."""
    return bytes(G722(G722_RATE, G722_BIT_RATE).encode(np.ascontiguousarray(pcm16k,
                                                                            np.int16)))
