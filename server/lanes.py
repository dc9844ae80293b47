"""Speaker lanes: everything one speaker of a stream owns, in one place.

A lane is one speaker's windower (which windows of its audio get scored, and when it spoke)
and its verdict rule (what the scores mean). Attribution (``server.speakers``: a channel per
party, or diarization) hands each chunk out as audio and a sample mask per speaker;
:class:`Lanes` keeps every lane on call time, opens
a lane for a speaker a diarizer finds mid-call, and builds the summary from the lanes. It is
sans-IO: no queue, no protobuf, so the service, ``Detect`` and the benchmarks that replay
verdict rules over recorded scores all cut and decide the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from models.verdicts import (
    DEFAULT_RULE,
    DEFAULT_THRESHOLD,
    SpeakerRule,
    Verdict,
    heard_in_order,
    make_rule,
)
from server.speakers import SpeakerAudio
from server.windowing import Window, Windower

FIRST_WINDOW_SECONDS = 1.0


@dataclass
class Lane:
    speaker: str
    windower: Windower
    rule: SpeakerRule

    @property
    def speech_ranges(self) -> list[tuple[float, float]]:
        return [(a, b) for a, b in self.windower.speech.ranges]


@dataclass(frozen=True)
class SpeakerSummary:
    verdict: Verdict  # final: a speaker once alerted stays SPOOF_SUSPECTED
    speech_ranges: list[tuple[float, float]]


class Lanes:
    """All speaker lanes of one stream, in creation order."""

    def __init__(self, sample_rate: int, window_seconds: float, hop_seconds: float,
                 threshold: float = DEFAULT_THRESHOLD, rule: str = DEFAULT_RULE,
                 speakers: Sequence[str] = ()) -> None:
        self.sample_rate = sample_rate
        self.window_seconds = window_seconds
        self.hop_seconds = hop_seconds
        self.threshold = threshold
        self.rule = rule
        self.lanes: dict[str, Lane] = {}
        self.attributed = 0  # samples of call time handed out so far
        # listeners that hear each attributed chunk with its call-time start sample before it
        # is windowed (the admin feed's flagged-audio tap); none on a server without it
        self.taps: list[Callable[[int, Sequence[SpeakerAudio]], None]] = []
        for speaker in speakers:
            self.lane(speaker)

    def lane(self, speaker: str) -> Lane:
        """The speaker's lane; one that appears mid-call starts at the current call time."""
        if speaker not in self.lanes:
            windower = Windower(self.sample_rate, self.window_seconds, self.hop_seconds,
                                FIRST_WINDOW_SECONDS, start_sample=self.attributed)
            self.lanes[speaker] = Lane(speaker, windower,
                                       make_rule(self.rule, speaker, self.threshold))
        return self.lanes[speaker]

    @property
    def audio_seconds(self) -> float:
        """Call time attributed so far, whether or not anyone spoke in it (a recording of
        silence has no lane, and still lasted)."""
        return self.attributed / self.sample_rate

    def push(self, parts: Sequence[SpeakerAudio]) -> list[tuple[Lane, Window]]:
        """Windows completed by one attributed chunk: ``parts`` is audio per speaker, all of
        one length (``""``: call time no speaker holds yet)."""
        for tap in self.taps:
            tap(self.attributed, parts)
        windows = []
        length = 0
        for speaker, audio, mask in parts:
            length = audio.shape[0]
            if speaker:
                lane = self.lane(speaker)
                windows += [(lane, w) for w in lane.windower.push(audio, mask)]
        self.attributed += length
        for lane in self.lanes.values():  # silent in this chunk: keep call time
            if lane.windower.total < self.attributed:
                gap = np.zeros(self.attributed - lane.windower.total, np.float32)
                windows += [(lane, w) for w in lane.windower.push(gap)]
        return windows

    def flush(self) -> list[tuple[Lane, Window]]:
        """The last window of every lane (end of the stream)."""
        return [(lane, w) for lane in self.lanes.values() for w in lane.windower.flush()]

    def summary(self) -> list[SpeakerSummary]:
        """Speakers heard, in order of first speech."""
        by_rule = {id(lane.rule): lane for lane in self.lanes.values()}
        return [SpeakerSummary(rule.final_verdict(), by_rule[id(rule)].speech_ranges)
                for rule in heard_in_order([lane.rule for lane in self.lanes.values()])]

    @property
    def windows_scored(self) -> int:
        return sum(lane.rule.windows for lane in self.lanes.values())
