"""The new-caller false-alarm estimate (``bench.newcallers``): which clips a source-held-out
fold leaves out, and how it counts a caller as flagged."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from bench.newcallers import EXTRA, Clip, bonafide_clips, flag_summary, held_out_rates
from models.tasks.loso import FoldScores
from tests.paths import CORPUS, require


def test_every_bonafide_clip_has_a_source_group() -> None:
    clips = bonafide_clips(require(CORPUS), require(EXTRA))
    groups = Counter((c.group, c.split) for c in clips)
    # The corpus' three digit speakers, its readers, the crowd of Speech Commands, the rest.
    assert groups["fsdd-digits", "train"] == 900
    assert groups["speech-commands", "train"] == 3287
    assert groups["speech-commands", "dev"] == 1191
    assert groups["librispeech", "dev"] > 0 and groups["rest", "dev"] > 0
    assert all(c.path.is_file() for c in clips[:: len(clips) // 50])
    # Speech Commands is split by speaker: no dev speaker was ever a train speaker.
    train = {c.speaker for c in clips if c.group == "speech-commands" and c.split == "train"}
    assert not train & {c.speaker for c in clips if c.group == "speech-commands"
                        and c.split == "dev"}


def _clip(i: int, speaker: str, group: str, split: str = "dev") -> Clip:
    return Clip(f"u{i}", speaker, group, split, Path(f"u{i}.flac"))


def test_a_caller_counts_once_however_many_words_are_flagged() -> None:
    clips = [_clip(0, "a", "g"), _clip(1, "a", "g"), _clip(2, "b", "g"), _clip(3, "c", "g")]
    summary = flag_summary(clips, np.array([True, True, False, False]))
    assert summary["flagged"] == 0.5
    assert summary["speakers"] == 3 and summary["speakers_flagged"] == 1 / 3


def test_held_out_rates_calibrate_on_seen_sources_only() -> None:
    # Seen dev bona fide near 0; the held-out source's clips far below them; the unit
    # calibration from LOSO-like folds puts the threshold between bona fide and spoofs.
    rng = np.random.default_rng(0)
    seen = [_clip(i, f"s{i}", "librispeech") for i in range(50)]
    held = [_clip(100 + i, f"h{i % 5}", "fsdd-digits", "train") for i in range(20)]
    fold = {"utt_ids": [c.utt_id for c in [*seen, *held]],
            "scores": [*rng.normal(0, 1, 50).tolist(), *([-20.0] * 10), *([5.0] * 10)]}
    unit = [FoldScores("T01", [f"b{i}" for i in range(200)] + [f"s{i}" for i in range(200)],
                       [1] * 200 + [0] * 200,
                       [*rng.normal(0, 1, 200).tolist(), *rng.normal(-8, 1, 200).tolist()])]
    rows = held_out_rates("r", "corpus", {"fsdd-digits": fold}, [*seen, *held], unit,
                          prior=0.92, threshold=0.5)
    row = rows["fsdd-digits held out"]
    assert row["clips"] == 20
    assert row["flagged"] == 0.5  # the ten far below every seen genuine voice
    assert row["speakers_flagged"] == 1.0  # each of the five callers has one of them


def test_the_benches_calibrate_at_the_prior_the_default_shipped_with() -> None:
    """One operating point: the Makefile's DEFAULT_PRIOR (what `make train` ships), the
    benches' copy (calls, new callers and vocoder held out calibrate their stand-ins with it)
    and the shipped default's card must agree, or the estimates describe another model."""
    import re

    from bench.newcallers import DEFAULT_PRIOR
    from models.inference import load_detector
    from tests.paths import REPO

    makefile = (REPO / "Makefile").read_text()
    assert float(re.search(r"^DEFAULT_PRIOR := (\S+)$", makefile, re.M).group(1)) == DEFAULT_PRIOR
    card = load_detector("default").card
    assert card["bonafide_false_alarm"]["bonafide_prior"] == DEFAULT_PRIOR
