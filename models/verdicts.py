"""Per-speaker verdicts and alerts from window scores: the decision, with no protobuf in it.

A call center needs two things from a speaker's stream of window scores: an alert within
seconds of a machine voice starting to speak (also when it takes over a line on which a
genuine voice spoke first), and no alert on a genuine voice whose one odd window scores high.

The default rule, :class:`EvidenceRule`, accumulates calibrated evidence, a CUSUM
(Page's cumulative sum) over the speaker's speech: each window adds its spoof log-odds minus a
drift, weighted by the seconds of *new* speech it brings (windows overlap, so a window is
worth the speech it adds, not its length), and the sum never drops below zero. Genuine speech
keeps the sum at zero, so evidence against a voice that takes over mid-call starts counting
from the takeover, not from the start of the call (the change-point reset); one high window
brings at most ``clip x hop`` and cannot reach the alert level alone. The alert's time range
is the stretch since the sum last left zero: the speech the alert rests on.

:class:`EmaRule` is the earlier rule (exponential moving average of window probabilities, two
confirming windows, 1 s of speech first), kept for comparison in ``make bench-diarization``
and selectable with ``--verdict-rule ema``. Parameters of both were chosen on the dev calls
with oracle turns (bench/results/diarization.md).

States carry the protobuf enum's numbers so the service maps them without a table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

DEFAULT_THRESHOLD = 0.5
MIN_SPEECH_SECONDS = 1.0  # of a speaker's speech before any verdict other than UNKNOWN
SMOOTHING = 0.2  # EMA weight of the newest window: the displayed probability rests on ~5


class State(IntEnum):
    """A speaker's verdict (numbers as ``callshield.v1.SpeakerState``)."""

    UNKNOWN = 1
    LIKELY_BONAFIDE = 2
    SPOOF_SUSPECTED = 3


@dataclass(frozen=True)
class Verdict:
    speaker: str
    probability: float  # running spoof probability of the speaker's recent speech
    state: State
    speech_seconds: float


@dataclass(frozen=True)
class Alert:
    speaker: str
    start: float  # call time of the first window the alert rests on
    end: float  # call time at which it was raised
    probability: float  # mean window spoof probability over [start, end]


@dataclass(frozen=True)
class Update:
    """What one scored window changed: a new state and/or the speaker's first alert."""

    changed: bool
    alert: Alert | None = None


class SpeakerRule(Protocol):
    """The verdict state of one speaker, fed that speaker's scored windows in time order."""

    name: str
    state: State
    alerted: bool
    windows: int
    first_speech: float
    speech_seconds: float

    def update(self, probability: float, start: float, end: float,
               speech_seconds: float) -> Update: ...

    def verdict(self) -> Verdict: ...

    def final_verdict(self) -> Verdict: ...


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


@dataclass
class _Common:
    name: str
    threshold: float = DEFAULT_THRESHOLD
    state: State = State.UNKNOWN
    alerted: bool = False
    windows: int = 0
    first_speech: float = 0.0  # start of the first scored window
    speech_seconds: float = 0.0  # the speaker's speech up to the latest window
    probability: float | None = None  # display: EMA of window probabilities

    def _fold(self, probability: float, start: float, speech_seconds: float) -> float:
        """Bookkeeping every rule shares; returns the new speech this window brings."""
        if self.windows == 0:
            self.first_speech = start
        self.windows += 1
        new = max(0.0, speech_seconds - self.speech_seconds)
        self.speech_seconds = speech_seconds
        if self.probability is None:
            self.probability = probability
        else:
            self.probability += SMOOTHING * (probability - self.probability)
        return new

    def verdict(self) -> Verdict:
        return Verdict(self.name, self.probability or 0.0, self.state, self.speech_seconds)

    def final_verdict(self) -> Verdict:
        """A speaker once alerted stays SPOOF_SUSPECTED in the summary."""
        v = self.verdict()
        return Verdict(v.speaker, v.probability, State.SPOOF_SUSPECTED, v.speech_seconds) \
            if self.alerted else v


@dataclass
class EvidenceRule(_Common):
    """CUSUM of calibrated spoof log-odds per second of new speech (module docstring).

    The drift is the log-odds of ``threshold`` (0 at the default 0.5): evidence grows only
    while windows score above the threshold. ``level`` is the alert level in log-odds x
    seconds of speech; ``clip`` bounds one window's log-odds, so a single extreme window
    (at most ``clip`` x 1 s hop = 3) cannot reach the level alone, while a steady 0.9 voice
    (2.2 per second) reaches it in two seconds. A window weighs the seconds of new speech it
    brings but at least ``min_weight``: diarized lanes are fragmented, and weighing by new
    speech alone let a cloned voice's short turns at the end of a call go unflagged.
    Chosen on the 10 dev calls (bench/results/diarization.md): with oracle turns all 7 spoof
    calls flagged, no bona fide voice, median delay 2.9 s (the EMA rule: 3.4 s); with the
    streaming diarizer all 7 and none (EMA: all 7, and one call with a genuine voice
    flagged). Level 6 doubled the delays; level 2 flagged genuine voices. The weights assume
    the default 1 s hop: a client hop of several seconds lets one window weigh more.
    """

    level: float = 4.0
    clip: float = 3.0
    min_weight: float = 0.5
    evidence: float = 0.0
    _run_start: float = 0.0
    _run_probabilities: list[float] = field(default_factory=list)

    def update(self, probability: float, start: float, end: float,
               speech_seconds: float) -> Update:
        new = self._fold(probability, start, speech_seconds)
        step = (max(-self.clip, min(self.clip, _logit(probability))) - _logit(self.threshold))
        if self.evidence == 0.0:
            self._run_start, self._run_probabilities = start, []
        self.evidence = max(0.0, self.evidence + step * max(new, self.min_weight))
        if self.evidence > 0:
            self._run_probabilities.append(probability)
        target = self.state
        if self.speech_seconds >= MIN_SPEECH_SECONDS:
            if self.evidence >= self.level:
                target = State.SPOOF_SUSPECTED
            elif self.evidence == 0.0:
                target = State.LIKELY_BONAFIDE
        if target == self.state:
            return Update(False)
        self.state = target
        alert = None
        if target == State.SPOOF_SUSPECTED and not self.alerted:
            self.alerted = True
            run = self._run_probabilities or [probability]
            alert = Alert(self.name, self._run_start, end, sum(run) / len(run))
        return Update(True, alert)


@dataclass
class EmaRule(_Common):
    """The earlier rule: EMA of window probabilities, hysteresis, two confirming windows."""

    MARGIN = 0.1  # hysteresis band below the threshold
    CONFIRM_WINDOWS = 2
    _run_state: State = State.UNKNOWN  # the state the recent windows point to
    _run_length: int = 0
    _run_start: float = 0.0

    def _target(self) -> State:
        assert self.probability is not None
        if self.speech_seconds < MIN_SPEECH_SECONDS:
            return State.UNKNOWN
        if self.probability >= self.threshold:
            return State.SPOOF_SUSPECTED
        if self.probability < self.threshold - self.MARGIN:
            return State.LIKELY_BONAFIDE
        return self.state  # inside the band: stay

    def update(self, probability: float, start: float, end: float,
               speech_seconds: float) -> Update:
        self._fold(probability, start, speech_seconds)
        target = self._target()
        if target == self._run_state:
            self._run_length += 1
        else:
            self._run_state, self._run_length, self._run_start = target, 1, start
        confirm = 1 if target == State.UNKNOWN else self.CONFIRM_WINDOWS
        if target == self.state or self._run_length < confirm:
            return Update(False)
        self.state = target
        alert = None
        if target == State.SPOOF_SUSPECTED and not self.alerted:
            self.alerted = True
            assert self.probability is not None
            alert = Alert(self.name, self._run_start, end, self.probability)
        return Update(True, alert)


RULES = {"evidence": EvidenceRule, "ema": EmaRule}
DEFAULT_RULE = "evidence"


def make_rule(kind: str, name: str, threshold: float = DEFAULT_THRESHOLD) -> SpeakerRule:
    try:
        return RULES[kind](name, threshold)
    except KeyError:
        raise ValueError(f"unknown verdict rule {kind!r}; one of {sorted(RULES)}") from None


def heard_in_order(rules: Sequence[SpeakerRule]) -> list[SpeakerRule]:
    """Speakers with at least one scored window, in order of first speech: a silent leg or a
    diarization label that faded has no verdict to report."""
    return sorted((r for r in rules if r.windows), key=lambda r: r.first_speech)
