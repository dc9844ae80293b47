"""Label bookkeeping of the diarizers: speaker names, per-sample labels by call time, turns.

Why apart from the clusterer (:mod:`diarization.stream`): naming speakers and mapping frame
labels onto audio samples are the same for the streaming and the offline diarizer and for the
benches, and they are plain arithmetic that a reader can check without the models.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import numpy as np

#: what :meth:`OutputTimeline.emit` hands back: output-rate audio and a label per sample
Labelled = tuple[np.ndarray, np.ndarray]


def speaker_label(index: int) -> str:
    """A, B, ..., Z, AA, AB, ...: stable, short, and ordered by first speech."""
    letters = string.ascii_uppercase
    label = ""
    index += 1
    while index:
        index, r = divmod(index - 1, 26)
        label = letters[r] + label
    return label


def turns_from_labels(labels: np.ndarray, rate: int,
                      speakers: Sequence[str]) -> list[tuple[float, float, str]]:
    """Per-sample labels (-1: nobody or overlap, k: ``speakers[k]``) at ``rate`` -> speech
    turns ``(start, end, label)`` in seconds."""
    turns = []
    change = np.flatnonzero(np.diff(labels)) + 1
    bounds = np.concatenate([[0], change, [labels.shape[0]]])
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b > a and labels[a] >= 0:
            turns.append((a / rate, b / rate, speakers[labels[a]]))
    return turns


class OutputTimeline:
    """The audio a diarizer hands back (at ``rate``), held until its labels are decided.

    Why by call time and not by sample count: the audio handed back may arrive at another
    rate than the audio diarized, and a resampler upstream may hold a few samples back (its
    filter delay) and hand them over later; each sample is labelled by the buffer frame that
    covers its call time."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._pending = np.zeros(0, np.float32)  # received, not yet emitted
        self.received = 0  # samples received
        self.emitted = 0  # samples emitted (labelled) so far

    def add(self, audio: np.ndarray) -> None:
        self._pending = np.concatenate([self._pending, np.asarray(audio, np.float32)])
        self.received += audio.shape[0]

    def emit(self, frame_labels: np.ndarray, buffer_end: float, buffer_seconds: float,
             until: float | None) -> list[Labelled]:
        """The audio from the last emitted sample up to call time ``until`` (``None``: all
        received), each sample labelled by the frame of ``frame_labels`` (the labels of the
        buffer of ``buffer_seconds`` ending at call time ``buffer_end``) that covers it."""
        target = self.received if until is None else min(int(until * self.rate), self.received)
        n = target - self.emitted
        if n <= 0:
            return []
        chunk, self._pending = self._pending[:n], self._pending[n:]
        times = (self.emitted + np.arange(n)) / self.rate
        frames = frame_labels.shape[0]
        idx = ((times - (buffer_end - buffer_seconds)) / buffer_seconds * frames).astype(int)
        self.emitted = target
        return [(chunk, frame_labels[np.clip(idx, 0, frames - 1)])]
