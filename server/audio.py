"""Decoding stream audio into per-speaker float waveforms at the model's sample rate.

Telephony sends G.711 or 16-bit PCM at 8 kHz, web clients 16 or 48 kHz; the model wants one
rate, so every chunk is decoded and resampled here as it arrives. The codecs and the
streaming resampler are the project's one audio module (``models.data.audio``); this module
holds what belongs to the API: the protobuf encodings, size and duration limits, and the
errors a client is told.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from callshield.v1 import detection_pb2 as pb
from models.data.audio import SAMPLE_BYTES, StreamResampler, pcm_decode
from server.errors import DecodeCancelled, InvalidAudio

MAX_CHUNK_BYTES = 64 * 1024
MIN_RATE, MAX_RATE = 8000, 48000
ENCODINGS = {
    pb.AUDIO_ENCODING_LINEAR16: ("LINEAR16", SAMPLE_BYTES["LINEAR16"]),
    pb.AUDIO_ENCODING_MULAW: ("MULAW", SAMPLE_BYTES["MULAW"]),
    pb.AUDIO_ENCODING_ALAW: ("ALAW", SAMPLE_BYTES["ALAW"]),
}


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


def frame_bytes(data: bytes, encoding: int, channels: int) -> int:
    """Bytes per frame of ``encoding``; refuses ``data`` that does not hold whole frames."""
    name, width = ENCODINGS[encoding]
    size = width * channels
    if len(data) % size:
        raise InvalidAudio(
            f"{len(data)} bytes is not a whole number of {name} frames "
            f"({size} bytes each for {channels} channel(s))"
        )
    return size


def pcm_from_bytes(data: bytes, encoding: int, channels: int) -> np.ndarray:
    """Encoded bytes -> float32 samples in [-1, 1], shape ``(frames, channels)``."""
    frame_bytes(data, encoding, channels)
    return pcm_decode(data, ENCODINGS[encoding][0]).reshape(-1, channels)


class Decoded(NamedTuple):
    """One decoded chunk: ``channels`` at the model's rate (what the lanes score) and, when
    the decoder was asked for it, the chunk downmixed to ``mono`` at another rate (what a
    diarizer of a MIXED stream hears: the client's own rate, so a 16 or 48 kHz client keeps
    the band above 4 kHz that the spoof model's 8 kHz drops)."""

    channels: list[np.ndarray]
    mono: np.ndarray | None = None


class StreamDecoder:
    """Chunks of one stream -> one float32 waveform per speaker channel at ``target_rate``,
    and the downmixed mono at ``mono_rate`` when given.

    SPLIT mode yields one channel per party; MIXED mode downmixes to a single channel.
    """

    def __init__(
        self, encoding: int, sample_rate: int, channels: int, split: bool, target_rate: int,
        mono_rate: int | None = None,
    ) -> None:
        check_format(encoding, sample_rate, channels)
        self.encoding, self.channels, self.split = encoding, channels, split
        self._resampler = StreamResampler(sample_rate, target_rate, channels, split)
        self._mono = None if mono_rate is None else StreamResampler(sample_rate, mono_rate,
                                                                    channels)
        self.outputs = self._resampler.outputs
        self.frames_in = 0
        self.sample_rate = sample_rate

    def decode(self, data: bytes, last: bool = False) -> Decoded:
        if not data and not last:
            raise InvalidAudio("empty audio chunk")
        if len(data) > MAX_CHUNK_BYTES:
            raise InvalidAudio(
                f"audio chunk of {len(data)} bytes exceeds the {MAX_CHUNK_BYTES}-byte limit"
            )
        pcm = pcm_from_bytes(data, self.encoding, self.channels)
        self.frames_in += pcm.shape[0]
        mono = None if self._mono is None else self._mono.push(pcm, last)[0]
        return Decoded(self._resampler.push(pcm, last), mono)

    def flush(self) -> Decoded:
        """The resamplers' tail, at the end of the stream."""
        return self.decode(b"", last=True)

    @property
    def seconds_in(self) -> float:
        return self.frames_in / self.sample_rate


# libsndfile's frame count when the header does not say (a FLAC written to a pipe has 0
# total samples in its STREAMINFO)
UNKNOWN_FRAMES = 2**63 - 1


@dataclass(frozen=True)
class ContainerInfo:
    """What a WAV or FLAC header says, read without decoding the samples."""

    sample_rate: int
    channels: int
    frames: int | None  # None: the header does not say




def _unreadable(exc: BaseException) -> InvalidAudio:
    """libsndfile's reason without soundfile's prefix, which holds the repr of the file object
    (``Error opening <_io.BytesIO object at 0x...>``): a client must not see server internals."""
    import soundfile

    reason = exc.error_string if isinstance(exc, soundfile.LibsndfileError) else ""
    return InvalidAudio(
        "audio is not a readable WAV or FLAC file"
        + (f" ({reason.rstrip('.')})" if reason else "")
        + "; for raw samples set config.encoding, sample_rate_hz and channels")


def check_duration(frames: int, rate: int, max_seconds: float) -> None:
    """Refuse a recording longer than ``max_seconds`` (``--max-detect-seconds``)."""
    if frames > max_seconds * rate:
        raise InvalidAudio(
            f"audio lasts {frames / rate:.0f} s, over the {max_seconds:g} s limit of Detect; "
            "send longer recordings with StreamDetect")


def check_header_duration(frames: int | None, rate: int, max_seconds: float) -> None:
    """:func:`check_duration` on a header's frame count. A header without one is refused:
    libsndfile cannot read such a FLAC to its end from memory (it fails seeking past the last
    frame), and the limit could only be enforced while decoding."""
    if frames is None or frames == UNKNOWN_FRAMES:
        raise InvalidAudio(
            "the file's header does not give its length (a FLAC written to a pipe?); "
            "rewrite it with its length, or send raw samples with a config")
    check_duration(frames, rate, max_seconds)


def container_info(data: bytes) -> ContainerInfo:
    """The header of WAV or FLAC bytes; cheap whatever the length of the recording."""
    import io

    import soundfile

    if not data:
        raise InvalidAudio("empty audio: send WAV or FLAC bytes, or raw samples with a config")
    try:
        info = soundfile.info(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise _unreadable(exc) from None
    frames = int(info.frames)
    return ContainerInfo(int(info.samplerate), int(info.channels),
                         None if frames == UNKNOWN_FRAMES else frames)


class Recording(NamedTuple):
    """A decoded Detect recording: float32 ``(frames, outputs)`` at the model's rate and, when
    asked for, the downmixed ``mono`` at another rate (what offline diarization hears)."""

    audio: np.ndarray
    mono: np.ndarray | None = None


class _Filled:
    """Blocks written one after another into one array sized for the whole recording.

    Why not a list of blocks and one ``np.concatenate`` at the end: the blocks and their
    concatenation are alive together, twice the recording's memory at the peak (a `Detect`
    of an hour at 48 kHz, MIXED and diarized, peaked at +630 MB that way, against the
    500 MB bound). With the size known from the header or the byte count, the array is
    allocated once; a recording longer than announced grows it by a quarter at a time."""

    def __init__(self, frames: int, columns: int | None) -> None:
        self._shape_tail = () if columns is None else (columns,)
        self.data = np.empty((max(frames, 1), *self._shape_tail), np.float32)
        self.filled = 0

    def write(self, block: np.ndarray) -> None:
        end = self.filled + block.shape[0]
        if end > self.data.shape[0]:
            grown = np.empty((max(end, self.data.shape[0] * 5 // 4 + 1), *self._shape_tail),
                             np.float32)
            grown[: self.filled] = self.data[: self.filled]
            self.data = grown
        self.data[self.filled : end] = block
        self.filled = end

    def result(self) -> np.ndarray:
        if self.data.shape[0] - self.filled > max(1024, self.filled // 100):
            return self.data[: self.filled].copy()  # a larger guess: do not keep its tail
        return self.data[: self.filled]


class BlockResampler:
    """Float blocks ``(frames, channels)`` at one rate -> float32 ``(frames, outputs)`` at
    another, downmixed unless ``split``, and the downmixed mono at ``mono_rate`` when given.
    Streaming, so a whole recording is never held at its source rate: memory is what the
    models will read. ``frames``: the recording's length at ``rate_in`` when known (from the
    header or the byte count), so each output is allocated once (:class:`_Filled`)."""

    def __init__(self, rate_in: int, rate_out: int, channels: int, split: bool,
                 mono_rate: int | None = None, frames: int | None = None) -> None:
        self._resampler = StreamResampler(rate_in, rate_out, channels, split)
        self._mono = None if mono_rate is None else StreamResampler(rate_in, mono_rate, channels)
        guess = frames if frames is not None else int(60 * rate_in)  # unknown: a minute, grown

        def at(rate: int) -> int:
            return -(-guess * rate // rate_in) + 64  # + the resamplers' flushed tail

        self._audio = _Filled(at(rate_out), self._resampler.outputs)
        self._mono_out = None if mono_rate is None else _Filled(at(mono_rate), None)

    def push(self, block: np.ndarray, last: bool = False) -> None:
        outs = self._resampler.push(block, last)
        self._audio.write(np.stack(outs, axis=1))
        if self._mono is not None and self._mono_out is not None:
            for out in self._mono.push(block, last):
                self._mono_out.write(out)

    def result(self) -> Recording:
        """Everything pushed, flushed."""
        self.push(np.zeros((0, self._resampler.channels), np.float32), last=True)
        return Recording(self._audio.result(),
                         None if self._mono_out is None else self._mono_out.result())


DECODE_BLOCK_SECONDS = 10.0  # a cancelled Detect stops decoding within one block


def decode_container(
    data: bytes, rate_out: int, split: bool, max_seconds: float,
    cancel: threading.Event | None = None, mono_rate: int | None = None,
) -> Recording:
    """WAV or FLAC bytes -> float32 ``(frames, outputs)`` at ``rate_out`` (and the mono at
    ``mono_rate`` when given, from the same blocks), decoded block by block: stops with
    :class:`InvalidAudio` as soon as more than ``max_seconds`` came out (whatever the header
    claimed), and with :class:`DecodeCancelled` once ``cancel`` is set. Blocking: run it in a
    worker thread."""
    import io

    import soundfile

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            rate, channels = int(f.samplerate), int(f.channels)
            check_header_duration(f.frames, rate, max_seconds)
            known = None if f.frames == UNKNOWN_FRAMES else int(f.frames)
            out = BlockResampler(rate, rate_out, channels, split, mono_rate, known)
            block_frames = int(DECODE_BLOCK_SECONDS * rate)
            total = 0
            while True:
                if cancel is not None and cancel.is_set():
                    raise DecodeCancelled
                block = f.read(block_frames, dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                total += block.shape[0]
                check_duration(total, rate, max_seconds)  # whatever the header said
                out.push(block)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        if isinstance(exc, InvalidAudio):
            raise
        raise _unreadable(exc) from None
    if total == 0:
        raise InvalidAudio("the audio file holds no samples")
    return out.result()


def decode_raw(
    data: bytes, encoding: int, rate_in: int, channels: int, rate_out: int, split: bool,
    max_seconds: float, cancel: threading.Event | None = None, mono_rate: int | None = None,
) -> Recording:
    """Raw encoded samples (a Detect with a config) -> like :func:`decode_container`; the
    duration is known from the byte count, so an over-long payload is refused before any
    decoding."""
    size = frame_bytes(data, encoding, channels)
    check_duration(len(data) // size, rate_in, max_seconds)
    out = BlockResampler(rate_in, rate_out, channels, split, mono_rate, len(data) // size)
    step = int(DECODE_BLOCK_SECONDS * rate_in) * size
    for start in range(0, len(data), step):
        if cancel is not None and cancel.is_set():
            raise DecodeCancelled
        out.push(pcm_from_bytes(data[start : start + step], encoding, channels))
    return out.result()
