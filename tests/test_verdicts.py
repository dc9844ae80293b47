"""The per-speaker verdict rule on synthetic window-score sequences (no model, no network).

Windows follow the server's default schedule: one window per second of a speaker's continuous
speech (hop 1 s), ``speech_seconds`` the speaker's speech up to the window's end.
"""

from __future__ import annotations

from models.verdicts import EvidenceRule, State, Update, make_rule
from server.lanes import Lanes
from server.speakers import SpeakerAudio


def _feed(rule: EvidenceRule, probs: list[float], t0: float = 0.0,
          speech0: float = 0.0) -> list[Update]:
    return [rule.update(p, t0 + i, t0 + i + 1, speech0 + i + 1) for i, p in enumerate(probs)]


def _first_alert(updates: list[Update]) -> int | None:
    return next((i for i, u in enumerate(updates) if u.alert is not None), None)


def test_steady_spoof_alerts_within_seconds_and_once() -> None:
    rule = EvidenceRule("B")
    updates = _feed(rule, [0.9] * 30)
    first = _first_alert(updates)
    assert first is not None and first + 1 <= 3  # three seconds of speech at most
    assert sum(u.alert is not None for u in updates) == 1
    alert = updates[first].alert
    assert alert is not None and alert.start == 0.0 and alert.probability > 0.8
    assert rule.state == State.SPOOF_SUSPECTED


def test_takeover_is_caught_from_the_change_not_from_the_call_start() -> None:
    """A genuine voice for 60 s, then a clone on the same label: the evidence of the genuine
    minute does not delay the alert, and the alert's range starts at the takeover."""
    rule = EvidenceRule("A")
    genuine = _feed(rule, [0.05] * 60)
    assert rule.state == State.LIKELY_BONAFIDE and not any(u.alert for u in genuine)
    clone = _feed(rule, [0.85] * 20, t0=60.0, speech0=60.0)
    first = _first_alert(clone)
    assert first is not None and first + 1 <= 4
    alert = clone[first].alert
    assert alert is not None and alert.start >= 60.0


def test_one_outlier_window_on_a_genuine_voice_raises_nothing() -> None:
    rule = EvidenceRule("A")
    probs = [0.1] * 10 + [0.999] + [0.1] * 10 + [0.97] + [0.2] * 10
    assert not any(u.alert for u in _feed(rule, probs))
    assert rule.state == State.LIKELY_BONAFIDE and not rule.alerted


def test_evidence_waits_for_a_second_of_speech_and_drains_back() -> None:
    rule = EvidenceRule("A")
    first = rule.update(0.95, 0.0, 1.0, 0.6)  # 0.6 s of speech: too little to judge
    assert rule.state == State.UNKNOWN and first.alert is None
    _feed(rule, [0.1] * 30, t0=1.0, speech0=0.6)
    assert rule.evidence == 0.0 and rule.state == State.LIKELY_BONAFIDE


def test_windows_without_new_speech_weigh_half_a_second() -> None:
    """Windows that bring no new speech (the other party talks) re-score audio already
    counted: each weighs half a second, so overlapping windows are not fresh evidence."""
    rule = EvidenceRule("A")
    rule.update(0.3, 0.0, 1.0, 1.0)
    assert rule.evidence == 0.0
    rule.update(0.99, 1.0, 2.0, 1.0)
    assert rule.evidence == rule.clip * rule.min_weight and not rule.alerted


def test_both_rules_are_selectable_and_deterministic() -> None:
    probs = [0.2, 0.7, 0.9, 0.4, 0.95, 0.95, 0.1]
    for kind in ("evidence", "ema"):
        runs = []
        for _ in range(2):
            r = make_rule(kind, "A")
            runs.append([r.update(p, i, i + 1, i + 1.0) for i, p in enumerate(probs)])
        assert runs[0] == runs[1]


def test_lanes_report_each_speakers_time_ranges() -> None:
    """The summary says when each speaker spoke: call-time ranges of its speech."""
    import numpy as np

    rate = 8000
    t = np.arange(rate) / rate
    tone = (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    silence = np.zeros(rate, np.float32)
    lanes = Lanes(rate, 4.0, 1.0, speakers=("A", "B"))
    # A speaks 0-2 s, B 2-3 s, A again 4-5 s (call time); chunks of 0.5 s
    a = np.concatenate([tone, tone, silence, silence, tone, silence])
    b = np.concatenate([silence, silence, tone, silence, silence, silence])
    windows = []
    for i in range(0, a.shape[0], rate // 2):
        windows += lanes.push([SpeakerAudio("A", a[i : i + rate // 2]),
                               SpeakerAudio("B", b[i : i + rate // 2])])
    windows += lanes.flush()
    for lane, w in windows:
        if w.has_speech:
            lane.rule.update(0.1, w.start, w.end, w.speech_total)
    ranges = {s.verdict.speaker: s.speech_ranges for s in lanes.summary()}
    assert [(round(x, 2), round(y, 2)) for x, y in ranges["A"]] == [(0.0, 2.0), (4.0, 5.0)]
    assert [(round(x, 2), round(y, 2)) for x, y in ranges["B"]] == [(2.0, 3.0)]
