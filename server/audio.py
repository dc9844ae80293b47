"""Decoding stream audio into per-speaker float waveforms at the model's sample rate.

Telephony sends G.711 or 16-bit PCM at 8 kHz, web clients 16 or 48 kHz; the model wants one
rate, so every chunk is decoded and resampled here as it arrives. Resampling is streaming
(soxr keeps its filter state between chunks), so chunk boundaries leave no clicks.
"""

from __future__ import annotations

import numpy as np
import soxr

from callshield.v1 import detection_pb2 as pb
from models.data.augment import alaw_decode, mulaw_decode

MAX_CHUNK_BYTES = 64 * 1024
MIN_RATE, MAX_RATE = 8000, 48000
ENCODINGS = {
    pb.AUDIO_ENCODING_LINEAR16: ("LINEAR16", 2),
    pb.AUDIO_ENCODING_MULAW: ("MULAW", 1),
    pb.AUDIO_ENCODING_ALAW: ("ALAW", 1),
}


class InvalidAudio(ValueError):
    """The client sent something the API does not accept (maps to INVALID_ARGUMENT)."""


def check_format(encoding: int, sample_rate: int, channels: int) -> None:
    if encoding not in ENCODINGS:
        name = pb.AudioEncoding.Name(encoding) if encoding in pb.AudioEncoding.values() else ""
        raise InvalidAudio(
            f"unknown audio encoding {encoding} {name}".rstrip()
            + "; use LINEAR16, MULAW or ALAW"
        )
    if not MIN_RATE <= sample_rate <= MAX_RATE:
        raise InvalidAudio(
            f"sample_rate_hz {sample_rate} out of range [{MIN_RATE}, {MAX_RATE}]"
        )
    if channels not in (1, 2):
        raise InvalidAudio(f"channels must be 1 or 2, got {channels}")


def pcm_from_bytes(data: bytes, encoding: int, channels: int) -> np.ndarray:
    """Encoded bytes -> float32 samples in [-1, 1], shape ``(frames, channels)``."""
    name, width = ENCODINGS[encoding]
    frame_bytes = width * channels
    if len(data) % frame_bytes:
        raise InvalidAudio(
            f"{len(data)} bytes is not a whole number of {name} frames "
            f"({frame_bytes} bytes each for {channels} channel(s))"
        )
    if encoding == pb.AUDIO_ENCODING_LINEAR16:
        pcm = np.frombuffer(data, dtype="<i2")
    elif encoding == pb.AUDIO_ENCODING_MULAW:
        pcm = mulaw_decode(data)
    else:
        pcm = alaw_decode(data)
    return (pcm.astype(np.float32) / 32768.0).reshape(-1, channels)


class StreamDecoder:
    """Chunks of one stream -> one float32 waveform per speaker channel at ``target_rate``.

    SPLIT mode yields one channel per party; MIXED mode downmixes to a single channel.
    """

    def __init__(
        self, encoding: int, sample_rate: int, channels: int, split: bool, target_rate: int
    ) -> None:
        check_format(encoding, sample_rate, channels)
        self.encoding, self.channels, self.split = encoding, channels, split
        self.outputs = channels if split else 1
        self._resamplers = [
            soxr.ResampleStream(sample_rate, target_rate, 1, dtype="float32", quality="HQ")
            if sample_rate != target_rate else None
            for _ in range(self.outputs)
        ]
        self.frames_in = 0
        self.sample_rate = sample_rate

    def decode(self, data: bytes, last: bool = False) -> list[np.ndarray]:
        if not data and not last:
            raise InvalidAudio("empty audio chunk")
        if len(data) > MAX_CHUNK_BYTES:
            raise InvalidAudio(
                f"audio chunk of {len(data)} bytes exceeds the {MAX_CHUNK_BYTES}-byte limit"
            )
        pcm = pcm_from_bytes(data, self.encoding, self.channels)
        self.frames_in += pcm.shape[0]
        mono = pcm if self.split else pcm.mean(axis=1, keepdims=True)
        out = []
        for ch, resampler in enumerate(self._resamplers):
            x = np.ascontiguousarray(mono[:, ch])
            out.append(x if resampler is None else resampler.resample_chunk(x, last=last))
        return out

    def flush(self) -> list[np.ndarray]:
        """The resamplers' tail, at the end of the stream."""
        return self.decode(b"", last=True)

    @property
    def seconds_in(self) -> float:
        return self.frames_in / self.sample_rate


def read_container(data: bytes) -> tuple[np.ndarray, int]:
    """WAV or FLAC bytes -> float32 ``(frames, channels)`` and the file's sample rate."""
    import io

    import soundfile

    if not data:
        raise InvalidAudio("empty audio: send WAV or FLAC bytes, or raw samples with a config")
    try:
        audio, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise InvalidAudio(
            f"audio is not a readable WAV or FLAC file ({exc}); for raw samples set "
            "config.encoding, sample_rate_hz and channels"
        ) from None
    if audio.shape[0] == 0:
        raise InvalidAudio("the audio file holds no samples")
    return audio, int(rate)


def resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Whole-recording resampling of ``(frames, channels)`` audio."""
    if rate_in == rate_out:
        return audio
    return np.asarray(soxr.resample(audio, rate_in, rate_out, quality="HQ"), dtype=np.float32)
