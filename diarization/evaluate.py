"""Reference material and scoring shared by the benchmark, the tuning script and the tests."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.data.audio import load_audio

CALLS = Path(__file__).resolve().parents[2] / "shared" / "calls"
Turns = Sequence[tuple[float, float, str]]


@dataclass(frozen=True)
class Call:
    uri: str
    audio: Path
    rttm: Path
    meta: dict[str, Any]  # the call's JSON (turns with bonafide/spoof labels), {} if none

    def load(self, sample_rate: int = 8000) -> np.ndarray:
        return load_audio(self.audio, sample_rate)

    @property
    def spoof_voices(self) -> set[str]:
        return {t["speaker"] for t in self.meta.get("turns", []) if t["label"] == "spoof"}

    @property
    def first_spoof_seconds(self) -> float | None:
        starts = [t["start"] for t in self.meta.get("turns", []) if t["label"] == "spoof"]
        return min(starts) if starts else None


def shared_calls(folder: Path = CALLS) -> list[Call]:
    """The mono calls of ``../shared/calls`` listed in ``calls.tsv``, in its order."""
    with open(folder / "calls.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [Call(r["call_id"], folder / f"{r['call_id']}.flac", folder / f"{r['call_id']}.rttm",
                 json.loads((folder / f"{r['call_id']}.json").read_text())) for r in rows]


def simulated_calls(folder: Path, subset: str = "development") -> list[Call]:
    uris = (folder / f"{subset}.lst").read_text().split()
    return [Call(u, folder / "audio" / f"{u}.flac", folder / f"{subset}.rttm", {}) for u in uris]


def annotation(turns: Turns, uri: str = "call") -> Any:
    from pyannote.core import Annotation, Segment

    ann = Annotation(uri=uri)
    for start, end, label in turns:
        if end > start:
            ann[Segment(start, end), len(ann)] = label
    return ann


def reference(call: Call) -> Any:
    from pyannote.database.util import load_rttm

    return load_rttm(str(call.rttm))[call.uri]


def der(pairs: Sequence[tuple[Any, Any]], collar: float) -> float:
    """Global DER (total error over total speech) of (reference, hypothesis) pairs."""
    from pyannote.metrics.diarization import DiarizationErrorRate

    metric = DiarizationErrorRate(collar=collar, skip_overlap=False)
    for ref, hyp in pairs:
        metric(ref, hyp)
    return float(abs(metric))


def label_to_voice(ref: Any, hyp: Any) -> dict[str, str]:
    """Each hypothesis label -> the reference voice it is mapped to (optimal DER mapping)."""
    from pyannote.metrics.diarization import DiarizationErrorRate

    return {str(k): str(v) for k, v in DiarizationErrorRate().optimal_mapping(ref, hyp).items()}
