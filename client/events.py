"""Turning service responses into plain dicts: the ``client stream --json`` line format.

Every line has ``type`` (window, verdict, alert or summary), ``call_id``, ``speaker`` (except
the summary, which lists ``speakers``), ``start``, ``end`` and ``spoof_probability``.
"""

from __future__ import annotations

from typing import Any

from callshield.v1 import detection_pb2 as pb

VERDICTS = {
    pb.SPEAKER_STATE_SPOOF_SUSPECTED: "spoof",
    pb.SPEAKER_STATE_LIKELY_BONAFIDE: "bonafide",
}


def verdict_name(state: int) -> str:
    """``spoof``, ``bonafide`` or ``unknown`` for a SpeakerState."""
    return VERDICTS.get(state, "unknown")


def _speaker(v: pb.SpeakerVerdict) -> dict[str, Any]:
    return {
        "speaker": v.speaker, "verdict": verdict_name(v.state),
        "spoof_probability": round(v.spoof_probability, 4),
        "speech_seconds": round(v.speech_seconds, 2),
    }


class EventFormatter:
    """Stateful: a verdict line carries the time range of its speaker's latest window."""

    def __init__(self, call_id: str) -> None:
        self.call_id = call_id
        self._last: dict[str, tuple[float, float]] = {}

    def __call__(self, response: pb.StreamDetectResponse) -> dict[str, Any]:
        kind = response.WhichOneof("event")
        base: dict[str, Any] = {"type": kind, "call_id": self.call_id}
        if kind == "window":
            w = response.window
            self._last[w.speaker] = (w.start_seconds, w.end_seconds)
            return base | {"speaker": w.speaker, "start": round(w.start_seconds, 3),
                           "end": round(w.end_seconds, 3),
                           "spoof_probability": round(w.spoof_probability, 4),
                           "model": w.model}
        if kind == "verdict":
            v = response.verdict
            start, end = self._last.get(v.speaker, (0.0, 0.0))
            return base | _speaker(v) | {"start": round(start, 3), "end": round(end, 3),
                                         "state": pb.SpeakerState.Name(v.state)}
        if kind == "alert":
            a = response.alert
            return base | {"speaker": a.speaker, "start": round(a.start_seconds, 3),
                           "end": round(a.end_seconds, 3),
                           "spoof_probability": round(a.spoof_probability, 4)}
        s = response.summary
        speakers = [_speaker(v) | {"speech": [[round(r.start_seconds, 2), round(r.end_seconds, 2)]
                                              for r in v.speech]} for v in s.speakers]
        return base | {
            "start": 0.0, "end": round(s.audio_seconds, 3),
            "spoof_probability": max((v["spoof_probability"] for v in speakers), default=0.0),
            "spoof": any(v["verdict"] == "spoof" for v in speakers),
            "windows_scored": s.windows_scored, "speakers": speakers,
        }


def event_to_dict(response: pb.StreamDetectResponse, call_id: str) -> dict[str, Any]:
    """One response as a dict, without the window context a stream would give verdicts."""
    return EventFormatter(call_id)(response)
