"""Deterministic two-party (sometimes takeover) telephone conversations for diarization training.

``python -m diarization.simulate OUT --train 200 --dev 20`` writes ``OUT/audio/``
FLAC calls, one RTTM and one UEM per subset, the URI lists, and ``OUT/database.yml`` (a
pyannote.database protocol ``CallSim.SpeakerDiarization.Tel``). The same arguments give the same
bytes: every call draws from its own ``numpy`` generator seeded by (seed, subset, index).

Why simulate: no diarization corpus of telephone calls can be shipped here, and the calls that
the service sees are exactly this: two parties taking turns, short overlaps and back-channel,
a voice that may be machine-made, a telephone channel. Turns, pauses and overlaps are drawn
wider than those of ``../shared/calls`` so that the model does not learn one rhythm. Voices
come from the corpus *train* split only (``dev`` speakers are the ones in ``../shared/calls``),
bona fide and spoof alike; the channel is :class:`models.data.augment.TelephoneAugment`.
"""

from __future__ import annotations

import argparse
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import structlog

from diarization.corpus import Utterance, load_voices
from models.data.audio import load_audio
from models.data.augment import AugmentConfig, TelephoneAugment
from models.data.augment.channel import add_noise

SAMPLE_RATE = 8000
SUBSETS = {"train": "train", "development": "dev"}  # pyannote subset -> corpus split
CHANNEL = {  # milder than the countermeasure's training channel: real calls, not attacks
    "g711": {"p": 0.6},
    "band_limit": {"p": 0.5},
    "resample": {"p": 0.2},
    "packet_loss": {"p": 0.1, "loss_rate": [0.005, 0.03]},
    "noise": {"p": 0.0},  # the call-level floor is added by the simulator itself
    "gain": {"p": 0.0},
    "rawboost_lnl": {"p": 0.2},
    "rawboost_isd": {"p": 0.0},
    "rawboost_ssi": {"p": 0.1, "snr_db": [25, 45]},
}
# Bumped whenever the same seed and configuration draw different calls, so that what was
# computed from earlier draws (the calls estimate's scored calls) is not taken for them.
# 2: overlaps bounded by the previous turn, back-channel labelled by its speaker.
VERSION = 2
# An overlap reaches back at most this share of the previous turn: the next party cuts in
# before the turn ends, never before it began (a turn of one short word would otherwise put
# the next before it, or before the call's start), and every turn still moves the clock on.
OVERLAP_REACH = 0.5
log = structlog.get_logger("callshield.diarization.simulate")


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    voice: str
    label: str


@dataclass(frozen=True)
class SimConfig:
    min_seconds: float = 25.0
    max_seconds: float = 75.0
    utterances_per_turn: tuple[int, int] = (1, 5)
    pause_in_turn: tuple[float, float] = (0.05, 0.45)
    gap_between_turns: tuple[float, float] = (0.1, 1.6)
    overlap_probability: float = 0.2
    overlap: tuple[float, float] = (0.1, 1.0)
    backchannel_probability: float = 0.08  # one short utterance inside the other's turn
    takeover_probability: float = 0.2  # party B's voice changes half-way (3 voices)
    level_dbfs: tuple[float, float] = (-30.0, -18.0)
    snr_db: tuple[float, float] = (25.0, 50.0)

    def __post_init__(self) -> None:
        # The turn loop only ends because every turn moves the clock forward: a negative gap
        # or pause, an endless call or a turn of no utterances would undo that, so such a
        # configuration is refused here rather than hanging the simulation.
        if not 0 < self.min_seconds <= self.max_seconds < float("inf"):
            raise ValueError(f"call length: need 0 < min <= max < inf, got "
                             f"{self.min_seconds}..{self.max_seconds}")
        if not 1 <= self.utterances_per_turn[0] <= self.utterances_per_turn[1]:
            raise ValueError(f"utterances_per_turn: need 1 <= lo <= hi, got "
                             f"{self.utterances_per_turn}")
        for name in ("pause_in_turn", "gap_between_turns", "overlap"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi < float("inf"):
                raise ValueError(f"{name}: need 0 <= lo <= hi < inf, got {(lo, hi)}")
        for name in ("overlap_probability", "backchannel_probability", "takeover_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: a probability, got {getattr(self, name)}")


def _rng(seed: int, subset: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(subset.encode()), index])


def _level(wave: np.ndarray, dbfs: float) -> np.ndarray:
    rms = float(np.sqrt(np.mean(wave.astype(np.float64) ** 2))) + 1e-9
    return (wave * (10 ** (dbfs / 20) / rms)).astype(np.float32)


class Simulator:
    def __init__(self, voices: dict[str, list[Utterance]], config: SimConfig) -> None:
        # voices with too little speech make turns of the same three words: keep those with >= 2
        self.voices = {v: u for v, u in sorted(voices.items()) if len(u) >= 2}
        self.names = sorted(self.voices)
        self.config = config
        self.channel = TelephoneAugment(AugmentConfig.from_dict(CHANNEL), SAMPLE_RATE)
        self._cache: dict[Path, np.ndarray] = {}

    def _audio(self, utt: Utterance) -> np.ndarray:
        if utt.path not in self._cache:
            self._cache[utt.path] = load_audio(utt.path, SAMPLE_RATE)
        return self._cache[utt.path]

    def _label(self, voice: str) -> str:
        """A voice's truth, whatever it says: its turns and its back-channel alike."""
        return "spoof" if self.voices[voice][0].label == "spoof" else "bonafide"

    def _turn(self, voice: str, rng: np.random.Generator) -> list[np.ndarray]:
        lo, hi = self.config.utterances_per_turn
        pool = self.voices[voice]
        picks = rng.choice(len(pool), size=int(rng.integers(lo, hi + 1)))
        return [self._audio(pool[i]) for i in picks]

    def conversation(self, rng: np.random.Generator) -> tuple[np.ndarray, list[Segment]]:
        """One call: mixture at 8 kHz and its reference speech segments."""
        c = self.config
        duration = rng.uniform(c.min_seconds, c.max_seconds)
        a, b, c_voice = rng.choice(self.names, size=3, replace=False)
        parties = {"A": str(a), "B": str(b)}
        levels = {p: rng.uniform(*c.level_dbfs) for p in ("A", "B")}
        takeover_at = (rng.uniform(0.3, 0.7) * duration
                       if rng.random() < c.takeover_probability else None)
        placed: list[tuple[int, np.ndarray, Segment]] = []
        t = rng.uniform(0.1, 1.5)
        party = "A" if rng.random() < 0.7 else "B"
        while t < duration:
            if party == "B" and takeover_at is not None and t >= takeover_at:
                parties["B"] = str(c_voice)
            voice = parties[party]
            label = self._label(voice)
            began = t
            for i, wave in enumerate(self._turn(voice, rng)):
                if i:
                    t += rng.uniform(*c.pause_in_turn)
                start = int(t * SAMPLE_RATE)
                gain = levels[party] + rng.uniform(-2, 2)
                placed.append((start, _level(wave, gain),
                               Segment(t, t + wave.shape[0] / SAMPLE_RATE, voice, label)))
                t += wave.shape[0] / SAMPLE_RATE
            other = "B" if party == "A" else "A"
            if rng.random() < c.backchannel_probability and len(placed) > 1:
                # a short reply of the other party while this one still speaks
                turn_start = placed[-1][2].start
                wave = self._turn(parties[other], rng)[0][: int(0.8 * SAMPLE_RATE)]
                bc = rng.uniform(turn_start, max(turn_start, t - 0.5))
                placed.append((int(bc * SAMPLE_RATE), _level(wave, levels[other]),
                               Segment(bc, bc + wave.shape[0] / SAMPLE_RATE,
                                       parties[other], self._label(parties[other]))))
            if rng.random() < c.overlap_probability:
                t = max(t - rng.uniform(*c.overlap), t - OVERLAP_REACH * (t - began))
            else:
                t += rng.uniform(*c.gap_between_turns)
            # a turn of empty recordings has no length to move on by: one sample, so the loop
            # ends whatever the audio
            t = max(t, began + 1 / SAMPLE_RATE)
            party = other
        total = max(s + w.shape[0] for s, w, _ in placed) + int(rng.uniform(0.2, 1.0) * SAMPLE_RATE)
        mix = np.zeros(total, np.float32)
        for start, wave, _ in placed:
            mix[start : start + wave.shape[0]] += wave
        mix = self.channel(mix, rng)
        mix = add_noise(mix, rng.uniform(*c.snr_db), str(rng.choice(["white", "pink"])), rng)
        mix = np.clip(mix, -0.99, 0.99).astype(np.float32)
        return mix, [s for _, _, s in sorted(placed, key=lambda p: p[0])]


def rttm_lines(uri: str, segments: Sequence[Segment]) -> list[str]:
    return [f"SPEAKER {uri} 1 {s.start:.3f} {s.end - s.start:.3f} <NA> <NA> {s.voice} <NA> <NA>\n"
            for s in segments]


def write_database(out: Path, counts: dict[str, int], seed: int, corpus: Path) -> Path:
    """Simulate every subset under ``out`` and write ``out/database.yml``."""
    for subset, n in counts.items():
        sim = Simulator(load_voices(corpus, SUBSETS[subset]), SimConfig())
        folder = out / "audio"
        folder.mkdir(parents=True, exist_ok=True)
        uris, rttm, uem = [], [], []
        for i in range(n):
            uri = f"{subset}_{i:04d}"
            audio, segments = sim.conversation(_rng(seed, subset, i))
            sf.write(folder / f"{uri}.flac", audio, SAMPLE_RATE, subtype="PCM_16")
            uris.append(uri + "\n")
            rttm += rttm_lines(uri, segments)
            uem.append(f"{uri} 1 0.000 {audio.shape[0] / SAMPLE_RATE:.3f}\n")
        (out / f"{subset}.lst").write_text("".join(uris))
        (out / f"{subset}.rttm").write_text("".join(rttm))
        (out / f"{subset}.uem").write_text("".join(uem))
        log.info("simulated", subset=subset, calls=n, voices=len(sim.names))
    protocol = "\n".join(
        f"        {s}:\n          uri: {s}.lst\n          annotation: {s}.rttm\n"
        f"          annotated: {s}.uem" for s in counts)
    yml = out / "database.yml"
    yml.write_text(
        "# written by python -m diarization.simulate; paths are relative to this file\n"
        "Databases:\n  CallSim: audio/{uri}.flac\n"
        f"Protocols:\n  CallSim:\n    SpeakerDiarization:\n      Tel:\n{protocol}\n")
    return yml


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m diarization.simulate", description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--corpus", type=Path,
                   default=Path(__file__).resolve().parents[2] / "shared" / "corpus")
    p.add_argument("--train", type=int, default=200, help="training calls")
    p.add_argument("--dev", type=int, default=20, help="development calls")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    yml = write_database(args.out, {"train": args.train, "development": args.dev}, args.seed,
                         args.corpus)
    print(yml)


if __name__ == "__main__":
    main()
