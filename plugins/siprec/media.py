"""A recording session's lanes, sans-IO: each participant's stream is one channel of the
detection stream (SPLIT: ``caller``, ``agent``), or its one stream is the call (MIXED).

Streams arrive on their own sockets, each with its own jitter; the lanes line them up in call
time so that a channel's sample *n* and the other's were spoken at the same moment: a stream
that starts late is preceded by the silence it missed, and a lane that falls silent (a stream
stopped, one side on hold) is padded once the other leads it by ``max_skew_seconds``, so the
detector is never held back by a dead stream.
"""

from __future__ import annotations

import numpy as np

RATE = 8000


class Lanes:
    def __init__(self, count: int, max_skew_seconds: float = 0.5) -> None:
        self.count = count
        self.max_skew = int(max_skew_seconds * RATE)
        self._pending: list[list[np.ndarray]] = [[] for _ in range(count)]
        self._sizes = [0] * count
        self._started = [False] * count
        self._taken = 0  # samples per lane handed out so far
        self.padded = 0  # samples of silence added to a lagging lane
        # per lane: padding not yet matched by the silence its stream fills in later (a
        # timestamp jump after silence suppression or a hold): that silence is the same
        # time, so it is skipped rather than added twice, which would shift the lane late
        self._debt = [0] * count

    def add(self, lane: int, pcm: list[np.ndarray], elapsed_seconds: float) -> None:
        """``pcm`` of ``lane``; ``elapsed_seconds``: call time when it arrived (the first
        audio of a lane that starts late is placed there)."""
        if not pcm:
            return
        if not self._started[lane]:
            self._started[lane] = True
            lead = int(elapsed_seconds * RATE) - (self._taken + self._sizes[lane])
            if lead > 0:
                self._append(lane, np.zeros(lead, np.int16))
        for chunk in pcm:
            if self._debt[lane] and chunk.size and not chunk.any():
                skip = min(self._debt[lane], chunk.size)
                self._debt[lane] -= skip
                chunk = chunk[skip:]
            self._append(lane, chunk)

    def _append(self, lane: int, chunk: np.ndarray) -> None:
        if chunk.size:
            self._pending[lane].append(chunk)
            self._sizes[lane] += chunk.size

    def take(self, final: bool = False) -> bytes:
        """Interleaved little-endian int16 of every lane, as far as all have audio (at the
        end, ``final``: as far as any has)."""
        most = max(self._sizes)
        target = most if final else min(self._sizes)
        if not final and most - target > self.max_skew:
            target = most - self.max_skew // 2
        if target <= 0:
            return b""
        columns = []
        for lane in range(self.count):
            if self._sizes[lane] < target:
                gap = target - self._sizes[lane]
                self._append(lane, np.zeros(gap, np.int16))
                self.padded += gap
                if not final and self._started[lane]:  # a late start is placed by time
                    self._debt[lane] += gap
            joined = np.concatenate(self._pending[lane])
            columns.append(joined[:target])
            rest = joined[target:]
            self._pending[lane] = [rest] if rest.size else []
            self._sizes[lane] = rest.size
        self._taken += target
        if self.count == 1:
            return columns[0].astype("<i2").tobytes()
        return np.stack(columns, axis=1).astype("<i2").tobytes()
