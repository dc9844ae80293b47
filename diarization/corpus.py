"""The corpus speakers as *voices*: the unit a diarization system should tell apart.

The calls' RTTM labels voices, not protocol speaker ids: a copy-synthesis spoof (T04 Griffin-Lim,
T05 WORLD) keeps the voice of the speaker it resynthesises, while a TTS system (T01-T03, T06)
speaks with its own voice whatever speaker id the protocol names. The simulator follows the
same rule so that its RTTM means what the calls' RTTM means.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

COPY_SYNTHESIS = frozenset({"T04", "T05"})
MIN_UTTERANCE_SECONDS = 0.3


@dataclass(frozen=True)
class Utterance:
    utt_id: str
    path: Path
    voice: str
    label: str  # bonafide | spoof
    system: str  # "-" for bona fide
    duration: float


def voice_of(speaker: str, system: str, voice: str) -> str:
    """The voice identity of one utterance (see the module docstring)."""
    if system in ("-", "") or system in COPY_SYNTHESIS:
        return speaker
    return f"{system}_{voice}"


def load_voices(corpus: Path, split: str) -> dict[str, list[Utterance]]:
    """Utterances per voice for ``split`` (``train`` or ``dev``), in file order."""
    folder = corpus / f"ASVspoof2019_LA_{split}" / "flac"
    voices: dict[str, list[Utterance]] = defaultdict(list)
    with open(corpus / f"metadata.{split}.tsv", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            duration = float(row["duration_s"])
            if duration < MIN_UTTERANCE_SECONDS:
                continue
            voice = voice_of(row["speaker"], row["system"], row["voice"])
            voices[voice].append(Utterance(
                utt_id=row["utt_id"], path=folder / f"{row['utt_id']}.flac", voice=voice,
                label=row["label"], system=row["system"], duration=duration))
    return dict(voices)
