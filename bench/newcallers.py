"""New-caller false alarms: how often a genuine voice from a source never trained on is flagged.

Engine LOSO (``bench.generalization report``) keeps the bona fide side fixed: every fold
trains on the same bona fide speakers and sources it is tested on. The hidden evaluation
set changes both sides at once, and its bona fide digits from new speakers were flagged
far more often than dev's. This benchmark moves the bona fide side instead:

- **shipped**: a shipped model, as the service runs it (its own calibration, the alert
  threshold 0.5, the first window repeat-padded as ``python -m models score``): the share
  of clips flagged per bona fide source of the corpus' dev part, and for the Speech
  Commands dev speakers (47 crowdsourced speakers on their own microphones, never trained
  on), with the share of those speakers that have at least one flagged word;
- **source held out**: for each bona fide source (the corpus' FSDD digit speakers, its
  LibriSpeech readers, Speech Commands, the rest), a recipe refitted without that source's
  bona fide, calibrated as a shipped model is (the recipe's LOSO calibration anchored on the
  fold model's dev bona fide scores of the sources it did see), and the share of the
  held-out source's clips flagged at the service threshold. A new speaker from a trained
  source is easier than a new source; this is the harder one;
- **variants** of the training data, so the benchmark says whether breadth helps:
  ``corpus`` (as shipped), ``+sc`` (the Speech Commands train speakers as bona fide) and
  ``+sc+voc`` (those plus their copies through neural vocoders as spoofs, from
  ``make vocode-extra``, so a new voice and its synthetic copy differ only by synthesis).

Reduced mode fits the fine LFCC+GMM part only (a few minutes per variant on one core,
cached in ``runs/features/newcallers-*.json``); the neural parts' source-held-out folds are
``--mode full`` material (an LCNN fold is about 10 minutes per held-out source on this CPU)
and are not run here yet. Writes ``bench/results/newcallers.{json,md}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import RAN, command, page, prose, start, write_results
from models.data.asvspoof import ASVspoofSplit, Trial, audio_path
from models.tasks.config import REPO_ROOT

CACHE = REPO_ROOT / "runs" / "features"
EXTRA = REPO_ROOT.parent / "shared" / "extra-bonafide" / "speech-commands"
#: vocoded copies of the Speech Commands train clips (make vocode-extra: sc-train, sc-train-nsf,
#: sc-train-vocos), then the corpus'
VOCODED_EXTRA = sorted((REPO_ROOT / "runs" / "vocoded").glob("sc-train*"))
VOCODED_CORPUS = REPO_ROOT / "runs" / "vocoded" / "train"
#: metadata ``source`` -> the group a source-held-out fold leaves out
GROUPS = {"FSDD": "fsdd-digits", "LIBRISPEECH": "librispeech", "SPEECH-COMMANDS": "speech-commands"}
REST = "rest"
VARIANTS = ("corpus", "+sc", "+sc+voc")
#: the default model's calibration prior (Makefile DEFAULT_PRIOR; the benches' one copy of it,
#: tests/test_newcallers.py holds the two and the shipped card together)
DEFAULT_PRIOR = 0.92


def group_of(source: str) -> str:
    return GROUPS.get(source, REST)


@dataclass(frozen=True)
class Clip:
    """A bona fide clip with where it came from."""

    utt_id: str
    speaker: str
    group: str
    split: str  # train / dev
    path: Path


def bonafide_clips(root: Path, extra: Path = EXTRA) -> list[Clip]:
    """Every bona fide clip of the corpus (train, dev) and of Speech Commands, with its group."""
    clips = []
    for split in ("train", "dev"):
        audio_dir = ASVspoofSplit(root, split).audio_dir
        with (root / f"metadata.{split}.tsv").open() as f:
            for row in csv.DictReader(f, delimiter="\t"):
                if row["label"] == "bonafide":
                    clips.append(Clip(row["utt_id"], row["speaker"], group_of(row["source"]),
                                      split, audio_path(audio_dir, row["utt_id"])))
    if (extra / "metadata.tsv").is_file():
        with (extra / "metadata.tsv").open() as f:
            for row in csv.DictReader(f, delimiter="\t"):
                clips.append(Clip(row["utt_id"], row["speaker"], group_of(row["source"]),
                                  row["split"], extra / "flac" / f"{row['utt_id']}.flac"))
    return clips


def vocoded_spoofs(dirs: list[Path]) -> list[tuple[str, Path]]:
    """(utt_id, path) of every vocoded copy written under ``dirs`` so far (``vocode`` writes
    each file whole, via a ``.tmp.flac``, and its protocol only at the end)."""
    return [(p.name.removesuffix(".flac"), p) for d in dirs
            for p in sorted((d / "flac").glob("*.flac")) if not p.name.endswith(".tmp.flac")]


def flag_summary(clips: list[Clip], flagged: np.ndarray) -> dict[str, Any]:
    """Share of clips flagged, and of speakers with at least one flagged clip."""
    by_speaker: dict[str, bool] = defaultdict(bool)
    for clip, hit in zip(clips, flagged, strict=True):
        by_speaker[clip.speaker] |= bool(hit)
    return {"clips": len(clips), "flagged": float(np.mean(flagged)) if len(clips) else float("nan"),
            "speakers": len(by_speaker),
            "speakers_flagged": float(np.mean(list(by_speaker.values()))) if by_speaker
            else float("nan")}


# --------------------------------------------------------------------------- shipped models


def shipped(model: str, clips: list[Clip], threshold: float, threads: int) -> dict[str, Any]:
    """A shipped model as the service runs it: its own calibration, the alert threshold."""
    import torch

    from models.data.audio import load_audio, repeat_pad
    from models.inference import load_detector

    torch.set_num_threads(threads)
    detector = load_detector(model)
    dev = [c for c in clips if c.split == "dev"]
    waves = [repeat_pad(load_audio(c.path, detector.sample_rate), detector.window_samples)
             for c in dev]
    p = detector.spoof_probability(np.asarray(detector.scores(waves)))
    flagged = p >= threshold
    out: dict[str, Any] = {"model": model, "name": detector.name,
                           "version": detector.version, "groups": {}}
    for group in sorted({c.group for c in dev}):
        idx = [i for i, c in enumerate(dev) if c.group == group]
        out["groups"][group] = flag_summary([dev[i] for i in idx], flagged[idx])
    return out


# --------------------------------------------------------------------------- source held out


def _fit_gmm(bona: list[np.ndarray], spoof: list[np.ndarray], options: dict[str, Any]) -> Any:
    from models.architectures.lfcc_gmm import LFCCGMM, LFCCGMMConfig
    from models.tasks.recipes import GMM_SIZES

    model = LFCCGMM(LFCCGMMConfig(**{"sample_rate": 8000, "n_fft": 256, "seed": 0,
                                     **GMM_SIZES["reduced"], **options}))
    model.fit(bona, spoof)
    return model


def source_folds(recipe: str, variant: str, clips: list[Clip], root: Path,
                 cache: Path) -> dict[str, dict[str, list]]:
    """Per held-out group (and ``none``, the variant fitted on every source): scores of
    every bona fide dev clip and of every clip of the held-out group. Cached."""
    from models.data.audio import load_audio, repeat_pad
    from models.tasks.recipes import GMM_RECIPES

    if cache.is_file():
        return json.loads(cache.read_text())
    options, _ = GMM_RECIPES[recipe]
    train = ASVspoofSplit(root, "train")
    spoof_trials: list[Trial] = [t for t in train.trials() if not t.is_bonafide]
    spoof_waves = [load_audio(audio_path(train.audio_dir, t.utt_id), 8000) for t in spoof_trials]
    if variant == "+sc+voc":
        extra = vocoded_spoofs([*VOCODED_EXTRA, VOCODED_CORPUS])
        spoof_waves += [load_audio(p, 8000) for _, p in extra]
    use_sc = variant != "corpus"
    trainable = [c for c in clips
                 if c.split == "train" and (use_sc or c.group != "speech-commands")]
    waves = {c.utt_id: load_audio(c.path, 8000) for c in clips
             if c.split == "train" or c.split == "dev"}
    groups = sorted({c.group for c in trainable})
    out: dict[str, dict[str, list]] = {}
    for held in ["none", *groups]:
        bona = [waves[c.utt_id] for c in trainable if c.group != held]
        model = _fit_gmm(bona, spoof_waves, options)
        test = [c for c in clips if c.split == "dev" or c.group == held]
        scores = model.score([repeat_pad(waves[c.utt_id], 32000) for c in test])
        out[held] = {"utt_ids": [c.utt_id for c in test], "scores": [float(s) for s in scores]}
        print(f"newcallers {recipe} {variant} without {held}: {len(bona)} bona fide, "
              f"{len(spoof_waves)} spoofs", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return out


def held_out_rates(recipe: str, variant: str, folds: dict[str, dict[str, list]],
                   clips: list[Clip], unit_folds: list[Any], prior: float,
                   threshold: float) -> dict[str, Any]:
    """Flag rates of each fold's held-out group, each fold calibrated as a shipped model:
    the recipe's LOSO calibration anchored on the fold's dev bona fide of seen sources."""
    from models.tasks.loso import loso_calibration

    by_id = {c.utt_id: c for c in clips}
    rows: dict[str, Any] = {}
    for held, fold in folds.items():
        ids, scores = fold["utt_ids"], np.asarray(fold["scores"])
        seen_dev = np.array([by_id[u].split == "dev" and by_id[u].group != held
                             and (variant != "corpus" or by_id[u].group != "speech-commands")
                             for u in ids])
        calibration = loso_calibration(unit_folds, scores[seen_dev], prior)
        flagged = calibration.spoof_probability(scores) >= threshold
        if held == "none":  # every source trained on: the dev speakers of each source
            for group in sorted({by_id[u].group for u in ids}):
                idx = [i for i, u in enumerate(ids) if by_id[u].group == group
                       and by_id[u].split == "dev"]
                trained = variant != "corpus" or group != "speech-commands"
                key = f"{group} dev speakers" + ("" if trained else " (source never trained)")
                rows[key] = flag_summary([by_id[ids[i]] for i in idx], flagged[idx])
        else:
            idx = [i for i, u in enumerate(ids) if by_id[u].group == held]
            rows[f"{held} held out"] = flag_summary([by_id[ids[i]] for i in idx], flagged[idx])
    return rows


# --------------------------------------------------------------------------- report


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}"


TARGET = """Target (issue 28): <= 2 % for every held-out source and the Speech Commands dev
speakers. Variants: `corpus` as shipped, `+sc` with the Speech Commands train speakers as bona
fide, `+sc+voc` with their vocoded copies (and the corpus') as spoofs ({vocoded_items} vocoded
items here). """ + RAN


def markdown(payload: dict[str, Any]) -> str:
    lines = ["### New-caller false alarms at the service threshold (spoof probability >= "
             f"{payload['threshold']})", ""]
    for s in payload["shipped"]:
        lines += [f"**Shipped `{s['model']}`** ({s['name']} v{s['version']}, its own "
                  "calibration), dev bona fide per source:", "",
                  "| source | clips | flagged % | speakers | speakers with a flagged clip % |",
                  "|---|---|---|---|---|"]
        for group, r in s["groups"].items():
            lines.append(f"| {group} | {r['clips']} | {_pct(r['flagged'])} | {r['speakers']} | "
                         f"{_pct(r['speakers_flagged'])} |")
        lines.append("")
    for recipe, variants in payload["source_held_out"].items():
        lines += [f"**Source held out, `{recipe}`** (refitted per fold, LOSO calibration at "
                  f"bona fide prior {payload['prior']} anchored on the fold's seen dev bona "
                  "fide):", "", "| variant | clips of | clips | flagged % | speakers with a "
                  "flagged clip % |", "|---|---|---|---|---|"]
        for variant, rows in variants.items():
            for key, r in rows.items():
                lines.append(f"| {variant} | {key} | {r['clips']} | {_pct(r['flagged'])} | "
                             f"{_pct(r['speakers_flagged'])} |")
        lines.append("")
    lines.append(prose(TARGET, payload))
    return page(lines)


def run(args: argparse.Namespace) -> int:
    from models.tasks.loso import spoof_systems
    from models.tasks.recipes import corpus_root, recipe_folds

    clock = start(args.threads)
    root = corpus_root()
    clips = bonafide_clips(root)
    payload: dict[str, Any] = {
        "mode": args.mode, "threshold": args.threshold, "prior": args.prior,
        "shipped": [shipped(m, clips, args.threshold, args.threads) for m in args.model],
        "source_held_out": {},
        "vocoded_items": len(vocoded_spoofs([*VOCODED_EXTRA, VOCODED_CORPUS])),
    }
    systems = spoof_systems(ASVspoofSplit(root, "train").trials())
    for recipe in args.recipe:
        unit = recipe_folds(recipe, systems, Path(args.loso_dir), "reduced")
        payload["source_held_out"][recipe] = {}
        for variant in args.variant:
            if variant == "+sc+voc" and not vocoded_spoofs(VOCODED_EXTRA):
                print(f"skipping {variant}: no vocoded Speech Commands copies "
                      "(make vocode-extra)", file=sys.stderr)
                continue
            tag = variant.replace("+", "plus-")
            if variant == "+sc+voc":  # the copies written so far: a new count, a new fit
                tag += f"-{payload['vocoded_items']}"
            folds = source_folds(recipe, variant, clips, root,
                                 CACHE / f"newcallers-{recipe}-{tag}.json")
            payload["source_held_out"][recipe][variant] = held_out_rates(
                recipe, variant, folds, clips, unit, args.prior, args.threshold)
    payload["seconds"] = clock.seconds()
    write_results("newcallers", payload, markdown(payload))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = command("python -m bench.newcallers", __doc__)
    parser.add_argument("--model", action="append", default=None,
                        help="shipped model(s) to check as the service runs them "
                        "(default: default)")
    parser.add_argument("--recipe", action="append", default=None,
                        help="GMM recipe(s) refitted per held-out source (default lfcc-gmm-fine)")
    parser.add_argument("--variant", action="append", choices=VARIANTS, default=None)
    parser.add_argument("--mode", choices=["reduced"], default="reduced")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--prior", type=float, default=DEFAULT_PRIOR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loso-dir", default=str(REPO_ROOT / "runs" / "loso"))
    args = parser.parse_args(argv)
    args.model = args.model or ["default"]
    args.recipe = args.recipe or ["lfcc-gmm-fine"]
    args.variant = args.variant or list(VARIANTS)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
