"""The call simulator (``diarization.simulate``) on short words: what the calls estimate
draws from Speech Commands (0.3-1 s words), where an overlap longer than the last turn used
to put the next turn before it, or before the call's start (issue 28).

The voices are tones written to ``tmp_path``: the turn-taking does not depend on what is said.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from diarization.corpus import Utterance
from diarization.simulate import OVERLAP_REACH, SAMPLE_RATE, Segment, SimConfig, Simulator, _rng

WORD_SECONDS = (0.3, 0.5, 0.7, 0.9)


def _voice(folder: Path, name: str, label: str, seconds: tuple[float, ...]) -> list[Utterance]:
    utterances = []
    for i, length in enumerate(seconds):
        path = folder / f"{name}_{i}.flac"
        n = max(1, round(length * SAMPLE_RATE))
        tone = 0.1 * np.sin(2 * np.pi * (150 + 40 * i) * np.arange(n) / SAMPLE_RATE)
        sf.write(path, tone.astype(np.float32), SAMPLE_RATE)
        utterances.append(Utterance(f"{name}_{i}", path, name, label,
                                    "-" if label == "bonafide" else "T01", length))
    return utterances


def _conversations(sim: Simulator, n: int) -> list[list[Segment]]:
    return [sim.conversation(_rng(0, "test", i))[1] for i in range(n)]


def test_short_word_turns_always_overlapping_stay_after_the_previous_turn(tmp_path: Path) -> None:
    # one word a turn, every turn overlapped by up to 3 s: far more than a word lasts
    # three voices (the simulator draws a takeover voice too), two of them in each call
    sim = Simulator({v: _voice(tmp_path, v, "bonafide", WORD_SECONDS) for v in "abc"},
                    SimConfig(min_seconds=6, max_seconds=10, utterances_per_turn=(1, 1),
                              overlap_probability=1.0, overlap=(0.5, 3.0),
                              backchannel_probability=0.0, takeover_probability=0.0))
    overlapped = 0
    for segments in _conversations(sim, 20):
        assert segments[0].start >= 0
        for before, turn in zip(segments, segments[1:], strict=False):
            # in start order the parties still alternate: no turn went back past the one
            # before it, and each starts at most OVERLAP_REACH of the way back into it
            assert turn.voice != before.voice
            assert turn.start >= before.start
            length = before.end - before.start
            assert turn.start >= before.start + (1 - OVERLAP_REACH) * length - 1e-9
            overlapped += turn.start < before.end
    assert overlapped > 100  # overlaps still happen, bounded, not dropped


@pytest.mark.timeout(60)
@pytest.mark.parametrize("config", [
    # every turn overlapped by far more than it lasts, no pauses or gaps to move on by
    SimConfig(min_seconds=5, max_seconds=5, utterances_per_turn=(1, 1), pause_in_turn=(0, 0),
              gap_between_turns=(0, 0), overlap_probability=1.0, overlap=(1e6, 1e6)),
    # back-channel on every turn, takeovers, turns of many words
    SimConfig(min_seconds=5, max_seconds=8, utterances_per_turn=(5, 9), pause_in_turn=(0, 0),
              overlap_probability=1.0, overlap=(0, 1e6), backchannel_probability=1.0,
              takeover_probability=1.0),
], ids=["overlap-everything", "all-at-once"])
def test_extreme_configurations_end(tmp_path: Path, config: SimConfig) -> None:
    # words of 10 ms: the clock moves on by half a word a turn at the least
    sim = Simulator({v: _voice(tmp_path, v, "bonafide", (0.01, 0.02)) for v in "abc"}, config)
    for segments in _conversations(sim, 3):
        assert segments and min(s.start for s in segments) >= 0


@pytest.mark.parametrize("change", [
    {"gap_between_turns": (-1.0, 0.5)}, {"pause_in_turn": (-0.1, 0.1)},
    {"overlap": (0.5, 0.1)}, {"max_seconds": float("inf")}, {"min_seconds": 0.0},
    {"utterances_per_turn": (0, 2)}, {"overlap_probability": 1.5},
])
def test_a_configuration_that_could_not_end_is_refused(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SimConfig(**change)  # type: ignore[arg-type]


def test_a_backchannel_is_labelled_by_its_speakers_truth(tmp_path: Path) -> None:
    # the synthetic voice's utterances last 1.5 s: its back-channel, cut to 0.8 s, stands out
    voices = {"spoofer": _voice(tmp_path, "spoofer", "spoof", (1.5, 1.5)),
              "caller": _voice(tmp_path, "caller", "bonafide", (1.2, 1.6)),
              "agent": _voice(tmp_path, "agent", "bonafide", (1.1, 1.7))}
    truth = {v: u[0].label for v, u in voices.items()}
    sim = Simulator(voices, SimConfig(min_seconds=10, max_seconds=15, backchannel_probability=1.0,
                                      takeover_probability=0.0))
    segments = [s for call in _conversations(sim, 10) for s in call]
    assert all(s.label == truth[s.voice] for s in segments)
    backchannel = [s for s in segments if s.voice == "spoofer" and s.end - s.start < 1.0]
    assert backchannel and all(s.label == "spoof" for s in backchannel)
