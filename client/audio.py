"""Reading WAV/FLAC files and cutting them into LINEAR16 stream chunks."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
import soundfile

from callshield.v1 import detection_pb2 as pb

CHUNK_SECONDS = 0.1  # about what telephony gateways send per packet group


@dataclass(frozen=True)
class AudioFile:
    pcm: np.ndarray  # int16, (frames, channels)
    sample_rate: int

    @property
    def channels(self) -> int:
        return int(self.pcm.shape[1])

    @property
    def seconds(self) -> float:
        return self.pcm.shape[0] / self.sample_rate

    def config(
        self, *, split: bool = False, call_id: str | None = None, interim_results: bool = True,
        alert_threshold: float = 0.0, party_labels: tuple[str, ...] = (),
    ) -> pb.StreamConfig:
        """The StreamConfig that describes this file's chunks."""
        return pb.StreamConfig(
            encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=self.sample_rate,
            channels=self.channels,
            channel_mode=pb.CHANNEL_MODE_SPLIT if split else pb.CHANNEL_MODE_MIXED,
            call_id=call_id or uuid.uuid4().hex[:12], party_labels=list(party_labels),
            interim_results=interim_results, alert_threshold=alert_threshold,
        )

    def chunks(self, seconds: float = CHUNK_SECONDS) -> Iterator[bytes]:
        """Little-endian interleaved 16-bit chunks of ``seconds`` each (the last shorter)."""
        step = max(1, int(round(seconds * self.sample_rate)))
        for start in range(0, self.pcm.shape[0], step):
            yield self.pcm[start : start + step].astype("<i2").tobytes()


def read_audio(path: str | Path) -> AudioFile:
    """Read a WAV or FLAC file as 16-bit PCM, keeping its rate and channels."""
    pcm, rate = soundfile.read(str(path), dtype="int16", always_2d=True)
    return AudioFile(pcm, int(rate))


class StreamFileOptions(TypedDict, total=False):
    """The keywords of both clients' ``stream_file``, typed once; defaults in :func:`file_stream`.

    ``split``: a stereo file carries one party per channel (CHANNEL_MODE_SPLIT) rather than a
    mixed call; ``realtime``: release the chunks at the pace of a live call, for latency
    figures; ``call_id``: the id the server logs (random if absent); ``alert_threshold``:
    the stream's alert threshold (0: the server's); ``chunk_seconds``: audio per request.
    """

    split: bool
    realtime: bool
    call_id: str | None
    alert_threshold: float
    chunk_seconds: float


@dataclass(frozen=True)
class FileStream:
    """What a client's ``stream_file`` sends: the config, the chunks and their pacing, so the
    sync and asyncio clients differ only in how they wait between chunks."""

    config: pb.StreamConfig
    chunks: Iterator[bytes]
    pace_seconds: float | None  # seconds between chunks, None: as fast as the call accepts


def file_stream(
    path: str | Path, *, split: bool = False, realtime: bool = False,
    call_id: str | None = None, alert_threshold: float = 0.0,
    chunk_seconds: float = CHUNK_SECONDS,
) -> FileStream:
    """What both clients' ``stream_file`` sends for ``path`` (see :class:`StreamFileOptions`)."""
    audio = read_audio(path)
    config = audio.config(split=split, call_id=call_id, alert_threshold=alert_threshold)
    return FileStream(config, audio.chunks(chunk_seconds), chunk_seconds if realtime else None)
