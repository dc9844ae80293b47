"""Sliding scoring windows over one speaker's audio, with a bounded buffer.

The first window is scored as soon as ``first_seconds`` of audio exist, then windows grow by
one hop until they reach the full length, then slide: so a verdict comes within about two
seconds of speech instead of after a full window. Windows with too little speech (a silent
channel in SPLIT mode, gaps between turns) are marked so that they are not scored: a spoof
score of background noise means nothing and would only pull the running probability around.

The audio a window hands to the model is its speech only: the frames below the energy gate
are cut out and the speech is repeat-padded back to the window's length. The models are
trained on trimmed utterances, repeat-padded when short; a window that is mostly the other
party's turn (silence on this speaker's channel) is far outside that, and on the dev calls
it hid a TTS voice that its speech alone scores at 0.95. Padding back to the window length
keeps the few standard lengths, so windows of many streams still batch together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.data.audio import repeat_pad

SPEECH_FRAME_SECONDS = 0.02
SPEECH_DBFS = -50.0  # a frame louder than this counts as speech (call noise floors: -55 to -75)
MIN_SPEECH_FRACTION = 0.25  # of a window, for it to be scored
MIN_SPEECH_SECONDS = 0.5  # and at least this much: shorter speech repeats too often when padded
MIN_TAIL_SECONDS = 0.5  # shortest audio a final window may rest on
RANGE_GAP_SECONDS = 0.3  # a pause shorter than this stays inside one speech range
MAX_RANGES = 512  # per speaker; past it the closest neighbours merge (memory stays bounded)


@dataclass(frozen=True)
class Window:
    start: float  # seconds from the start of the stream
    end: float
    audio: np.ndarray  # float32 at the model's rate: the window's speech, repeat-padded
    speech_seconds: float  # in the whole window
    speech_total: float  # in the speaker's audio from the start of the stream to ``end``

    @property
    def has_speech(self) -> bool:
        return self.speech_seconds >= max(
            MIN_SPEECH_SECONDS, MIN_SPEECH_FRACTION * (self.end - self.start)
        )


def _speech_frames(audio: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """``(frames, mask)``: whole 20 ms frames, and which are above :data:`SPEECH_DBFS` (an
    energy gate, not a VAD model)."""
    frame = int(SPEECH_FRAME_SECONDS * sample_rate)
    n = audio.shape[0] // frame
    frames = audio[: n * frame].reshape(n, frame)
    rms_db = 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
    return frames, rms_db > SPEECH_DBFS


def speech_seconds(audio: np.ndarray, sample_rate: int) -> float:
    """Seconds of 20 ms frames above :data:`SPEECH_DBFS`."""
    return float(np.count_nonzero(_speech_frames(audio, sample_rate)[1]) * SPEECH_FRAME_SECONDS)


def speech_only(audio: np.ndarray, sample_rate: int) -> tuple[np.ndarray, float]:
    """The speech frames of ``audio``, repeat-padded to its length, and their seconds;
    ``audio`` itself when it has no speech frame."""
    frames, mask = _speech_frames(audio, sample_rate)
    seconds = float(np.count_nonzero(mask) * SPEECH_FRAME_SECONDS)
    if seconds == 0:
        return audio, 0.0
    return repeat_pad(frames[mask].reshape(-1), audio.shape[0]), seconds


class SpeechRanges:
    """When a speaker spoke, as merged ``[start, end]`` call-time ranges (the summary's
    per-speaker time ranges, for an agent's UI): the same energy gate that counts speech."""

    def __init__(self) -> None:
        self.ranges: list[list[float]] = []

    def add(self, start: float, mask: np.ndarray, frame_seconds: float) -> None:
        """``mask``: speech frames of consecutive ``frame_seconds`` frames from ``start``."""
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            return
        breaks = np.flatnonzero(np.diff(idx) > 1)
        firsts = idx[np.r_[0, breaks + 1]]
        lasts = idx[np.r_[breaks, idx.size - 1]] + 1
        for a, b in zip(firsts, lasts, strict=True):
            self._append(start + a * frame_seconds, start + b * frame_seconds)

    def _append(self, a: float, b: float) -> None:
        if self.ranges and a - self.ranges[-1][1] <= RANGE_GAP_SECONDS:
            self.ranges[-1][1] = max(self.ranges[-1][1], b)
        else:
            self.ranges.append([a, b])
        if len(self.ranges) > MAX_RANGES:
            gaps = [self.ranges[i + 1][0] - self.ranges[i][1] for i in range(MAX_RANGES)]
            i = int(np.argmin(gaps))
            self.ranges[i][1] = self.ranges.pop(i + 1)[1]


class Windower:
    """Cuts one speaker's audio into windows ending at ``first, first + hop, ...`` seconds.

    Only the last ``window`` seconds are kept, so memory per stream stays bounded however
    long the call is.
    """

    def __init__(
        self, sample_rate: int, window_seconds: float, hop_seconds: float,
        first_seconds: float = 1.0, start_sample: int = 0,
    ) -> None:
        """``start_sample``: the call time (in samples) of the first sample pushed, for a
        speaker that a diarizer finds mid-call; its first window ends ``first_seconds`` later."""
        if not 0 < hop_seconds <= window_seconds:
            raise ValueError("need 0 < hop <= window")
        self.sample_rate = sample_rate
        self.window = int(round(window_seconds * sample_rate))
        self.hop = int(round(hop_seconds * sample_rate))
        self._next_end = start_sample + min(int(round(first_seconds * sample_rate)), self.window)
        self._last_end = start_sample
        self._buf = np.zeros(0, np.float32)
        self._origin = start_sample
        self._buf_start = start_sample  # stream sample index of _buf[0]
        self.total = start_sample  # samples received, counted from the start of the call
        self._speech_total = 0.0
        self.speech = SpeechRanges()

    def push(self, audio: np.ndarray, mask: np.ndarray | None = None) -> list[Window]:
        """``mask``: the samples of ``audio`` that are this speaker's (``None``: all). The rest
        is zeroed before the energy gate rather than the mask standing in for it: a 20 ms
        frame that straddles a turn boundary then counts (and is scored) with only its
        speaker's samples, as the windows were tuned and benchmarked."""
        if mask is not None:
            audio = np.where(mask, audio, 0)
        self._buf = np.concatenate([self._buf, audio.astype(np.float32, copy=False)])
        self.total += audio.shape[0]
        windows = []
        while self.total >= self._next_end:
            windows.append(self._cut(self._next_end))
            self._next_end += self.hop
        keep_from = max(0, self._next_end - self.window)
        if keep_from > self._buf_start:
            self._buf = self._buf[keep_from - self._buf_start :]
            self._buf_start = keep_from
        return windows

    def flush(self) -> list[Window]:
        """A last window over the tail, when at least half a hop is still unscored."""
        tail = self.total - self._last_end
        min_tail = max(self.hop // 2, int(MIN_TAIL_SECONDS * self.sample_rate))
        if tail >= min_tail:
            return [self._cut(self.total)]
        if tail > 0:
            # too short to score, and still call time the speaker may have spoken in: its
            # speech ranges count (else a call's last range ended up to half a hop early,
            # e.g. at 29.5 s of a 30 s call)
            rate = self.sample_rate
            _, mask = _speech_frames(self._buf[self._last_end - self._buf_start:], rate)
            self.speech.add(self._last_end / rate, mask, SPEECH_FRAME_SECONDS)
            self._last_end = self.total
        return []

    def _cut(self, end: int) -> Window:
        start = max(self._origin, end - self.window)
        audio = self._buf[start - self._buf_start : end - self._buf_start].copy()
        new_from = max(start, self._last_end) - start
        self._last_end = end
        rate = self.sample_rate
        _, mask = _speech_frames(audio[new_from:], rate)
        self._speech_total += float(np.count_nonzero(mask) * SPEECH_FRAME_SECONDS)
        self.speech.add((start + new_from) / rate, mask, SPEECH_FRAME_SECONDS)
        speech, seconds = speech_only(audio, rate)
        return Window(
            start=start / rate, end=end / rate, audio=speech,
            speech_seconds=seconds, speech_total=self._speech_total,
        )
