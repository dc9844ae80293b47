"""Per-speaker running spoof probability, verdict states with hysteresis, and alerts.

One window's score is noisy, so the running probability is an exponential moving average of
window probabilities, and a state changes only after ``confirm_windows`` consecutive windows
agree, with a margin below the threshold for clearing a suspicion. An alert fires the first
time a speaker becomes SPOOF_SUSPECTED and never again for that speaker, so an agent's screen
is not flooded while the score hovers around the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from callshield.v1 import detection_pb2 as pb

DEFAULT_THRESHOLD = 0.5
SMOOTHING = 0.2  # weight of the newest window: the verdict rests on about 5 windows
MARGIN = 0.1  # hysteresis band below the threshold
MIN_SPEECH_SECONDS = 1.0  # before a speaker leaves UNKNOWN
CONFIRM_WINDOWS = 2


@dataclass
class SpeakerTrack:
    name: str
    threshold: float
    probability: float | None = None
    state: int = pb.SPEAKER_STATE_UNKNOWN
    speech_seconds: float = 0.0
    alerted: bool = False
    windows: int = 0
    first_speech: float = 0.0  # start of the first scored window
    _run_state: int = pb.SPEAKER_STATE_UNKNOWN  # the state the recent windows point to
    _run_length: int = 0
    _run_start: float = 0.0

    def verdict(self) -> pb.SpeakerVerdict:
        return pb.SpeakerVerdict(
            speaker=self.name, spoof_probability=self.probability or 0.0, state=self.state,
            speech_seconds=self.speech_seconds,
        )

    def final_verdict(self) -> pb.SpeakerVerdict:
        verdict = self.verdict()
        if self.alerted:
            verdict.state = pb.SPEAKER_STATE_SPOOF_SUSPECTED
        return verdict

    def _target(self) -> int:
        assert self.probability is not None
        if self.speech_seconds < MIN_SPEECH_SECONDS:
            return pb.SPEAKER_STATE_UNKNOWN
        if self.probability >= self.threshold:
            return pb.SPEAKER_STATE_SPOOF_SUSPECTED
        if self.probability < self.threshold - MARGIN:
            return pb.SPEAKER_STATE_LIKELY_BONAFIDE
        # inside the band: a suspected speaker stays suspected, others stay where they are
        return self.state

    def update(
        self, probability: float, start: float, end: float, speech_seconds: float
    ) -> tuple[bool, pb.Alert | None]:
        """Fold in one window (``speech_seconds``: the speaker's speech up to ``end``);
        returns (state changed, alert raised now or None)."""
        if self.windows == 0:
            self.first_speech = start
        self.windows += 1
        self.speech_seconds = speech_seconds
        if self.probability is None:
            self.probability = probability
        else:
            self.probability += SMOOTHING * (probability - self.probability)
        target = self._target()
        if target == self._run_state:
            self._run_length += 1
        else:
            self._run_state, self._run_length, self._run_start = target, 1, start
        confirm = 1 if target == pb.SPEAKER_STATE_UNKNOWN else CONFIRM_WINDOWS
        if target == self.state or self._run_length < confirm:
            return False, None
        self.state = target
        alert = None
        if target == pb.SPEAKER_STATE_SPOOF_SUSPECTED and not self.alerted:
            self.alerted = True
            alert = pb.Alert(
                speaker=self.name, start_seconds=self._run_start, end_seconds=end,
                spoof_probability=self.probability,
            )
        return True, alert


@dataclass
class CallAggregator:
    """All speakers of one stream, in first-seen order."""

    threshold: float = DEFAULT_THRESHOLD
    speakers: dict[str, SpeakerTrack] = field(default_factory=dict)

    def track(self, speaker: str) -> SpeakerTrack:
        if speaker not in self.speakers:
            self.speakers[speaker] = SpeakerTrack(speaker, self.threshold)
        return self.speakers[speaker]

    def summary(self, call_id: str, audio_seconds: float) -> pb.StreamSummary:
        """Speakers in order of first speech; a party or label that never had a window
        scored (a silent leg, a diarization label that faded) has no verdict to report."""
        heard = sorted((t for t in self.speakers.values() if t.windows),
                       key=lambda t: t.first_speech)
        return pb.StreamSummary(
            call_id=call_id,
            speakers=[t.final_verdict() for t in heard],
            audio_seconds=audio_seconds,
            windows_scored=sum(t.windows for t in self.speakers.values()),
        )
