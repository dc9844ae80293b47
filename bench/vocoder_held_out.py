"""Vocoder held out: the stand-in for a modern neural engine the detector never saw.

The engines that still pass as human on the hidden set are modern neural ones, and none of
the corpus' engines is. Copy-synthesis gives spoofs whose only difference from their bona
fide sources is a neural vocoder, and vocoders come in families (HiFi-GAN's GAN generators,
Vocos-style iSTFT heads trained here, ...). For each family F: fit the recipe without F's
copies, then score F's copies against the bona fide recordings they were made from.
Reported per held-out family: the EER (copies vs their sources) and the share of copies
missed at the service threshold, the fold calibrated as a shipped model (the recipe's LOSO
calibration anchored on the fold's corpus dev bona fide scores).

- GMM recipes (``lfcc-gmm-fine``, the default; ``lfcc-gmm-dd``): fitted here on the corpus
  and the Speech Commands train bona fide, with the corpus' spoofs and the copies of every
  *other* family as spoofs.
- Neural recipes (:data:`models.tasks.recipes.NEURAL_RECIPES`, e.g. ``lcnn-sc-voc3``): each
  fold is one training of the recipe's config at its LOSO fold scale (``FOLD_SCALE``) with
  every ``data.extra`` entry of F's copies dropped (an entry's family is read from the
  system ids of its protocol; bona fide-only entries stay), about 8 minutes on 2 threads
  for ``lcnn-sc-voc3``. Folds are kept in ``runs/vocoder-held-out/<recipe>/<family>/``
  (``--runs``), resumable, and a finished fold (its ``model.pt``) is reused on rerun.

Copies are read from ``runs/vocoded/*/flac`` (``make vocode``, ``make vocode-extra``, and
``python -m models vocode --vocoder vocos-8k`` for a trained family); each file name ends
in its vocoder's system id, which says its family. A family with no copies is skipped and
named. ``--family``, ``--epochs`` and ``--limit`` make a smoke run (with ``--runs`` and
``--out`` elsewhere). Writes ``bench/results/vocoder-held-out.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import RESULTS, command, page, prose, start, write_results
from bench.newcallers import DEFAULT_PRIOR, Clip, bonafide_clips
from models.tasks.config import REPO_ROOT, TrainConfig, repo_path

VOCODED = REPO_ROOT / "runs" / "vocoded"
#: where the neural recipes' family-held-out trainings are kept
RUNS = REPO_ROOT / "runs" / "vocoder-held-out"
#: system id -> family
FAMILIES = {"V01": "hifigan", "V02": "hifigan", "V03": "vocos", "V04": "nsf"}


def copies_by_family(root: Path = VOCODED) -> dict[str, list[tuple[str, Path]]]:
    """(source utt_id, path) of every copy written under ``root``, by vocoder family."""
    out: dict[str, list[tuple[str, Path]]] = {}
    for path in sorted(root.glob("*/flac/*.flac")):
        if path.name.endswith(".tmp.flac"):
            continue
        source, _, system = path.name.removesuffix(".flac").rpartition("_")
        if system in FAMILIES:
            out.setdefault(FAMILIES[system], []).append((source, path))
    return out


# --------------------------------------------------------------------------- neural folds


def entry_families(entry: dict[str, str]) -> set[str]:
    """The vocoder families of a ``data.extra`` entry's spoofs, from its protocol's system
    ids (empty for a bona fide-only entry such as the Speech Commands train protocol)."""
    from models.data.asvspoof import read_protocol

    return {FAMILIES.get(t.system, t.system)
            for t in read_protocol(repo_path(entry["protocol"])) if not t.is_bonafide}


def without_family(config: TrainConfig, family: str) -> TrainConfig:
    """``config`` with the family's copies left out: every extra entry whose spoofs are all
    the family's is dropped (no need to load them), and the family's system ids are
    excluded too, so an entry that mixes families keeps only the other families' copies."""
    fold = copy.deepcopy(config)
    fold.data.extra = [e for e in config.data.extra if entry_families(e) != {family}]
    ids = {system for system, name in FAMILIES.items() if name == family}
    fold.data.exclude_systems = sorted({*fold.data.exclude_systems, *ids})
    fold.optim.select = "last"  # as a LOSO fold: the epoch count is the recipe's
    return fold


def family_fold_config(recipe: str, family: str, args: argparse.Namespace) -> TrainConfig:
    """The recipe at its LOSO fold scale (:func:`bench.generalization.fold_config`),
    without the family's copies, training on ``--threads``."""
    from bench.generalization import fold_config
    from models.tasks.recipes import FOLD_SCALE

    limit, epochs = FOLD_SCALE[recipe]
    config = without_family(fold_config(recipe, limit if args.limit is None else args.limit,
                                        args.epochs or epochs), family)
    config.optim.threads = args.threads
    return config


def train_family_fold(config: TrainConfig, run_dir: Path) -> Path:
    """Train the fold (resumable, ``config.json`` beside it) unless its ``model.pt`` is
    there; a half-trained run at another scale is refused rather than resumed."""
    from dataclasses import asdict

    from models.tasks.antispoofing import train

    model = run_dir / "model.pt"
    if model.is_file():
        print(f"{run_dir}: finished fold, reused (delete it to retrain)", flush=True)
        return model
    config.output = str(model.resolve())
    saved = run_dir / "config.json"
    if saved.is_file() and (run_dir / "last.pt").is_file():
        old, new = json.loads(saved.read_text()), json.loads(json.dumps(asdict(config)))
        if (old["data"], old["optim"]["epochs"]) != (new["data"], new["optim"]["epochs"]):
            raise SystemExit(f"{run_dir} holds a fold of another config: pick another --runs")
    train(config, run_dir, progress=False)
    return model


def score_paths(detector: Any, paths: Sequence[Path], chunk: int = 256) -> np.ndarray:
    """First-window scores of audio files, as ``python -m models score`` (repeat-padded to
    the model's window), read a chunk at a time to bound memory."""
    from models.data.audio import load_audio, repeat_pad

    out = []
    for i in range(0, len(paths), chunk):
        waves = [repeat_pad(load_audio(p, detector.sample_rate), detector.window_samples)
                 for p in paths[i:i + chunk]]
        out.append(np.asarray(detector.scores(waves), np.float64))
    return np.concatenate(out) if out else np.zeros(0)


def neural_rows(recipe: str, families: dict[str, list[tuple[str, Path]]],
                clips: dict[str, Clip], dev_bona: list[Clip], unit: list[Any],
                args: argparse.Namespace) -> dict[str, Any]:
    """Per family with copies: train the recipe without them, score them against their
    sources, calibrate on the recipe's LOSO folds anchored on the corpus dev bona fide."""
    from models.inference import load_detector
    from models.metrics import compute_eer
    from models.tasks.antispoofing import training_items
    from models.tasks.loso import loso_calibration

    rows: dict[str, Any] = {}
    for family in sorted(families):
        config = family_fold_config(recipe, family, args)
        others = sum(t.system in FAMILIES for t in training_items(config)[0])
        detector = load_detector(train_family_fold(config, Path(args.runs) / recipe / family))
        held = [(s, p) for s, p in families[family] if s in clips]
        copy_scores = score_paths(detector, [p for _, p in held])
        source_scores = score_paths(detector, [clips[s].path for s, _ in held])
        anchor = score_paths(detector, [c.path for c in dev_bona])
        missed = loso_calibration(unit, anchor, args.prior).spoof_probability(copy_scores) < 0.5
        rows[f"{recipe} / {family}"] = {
            "copies": len(held), "eer": float(compute_eer(source_scores, copy_scores)[0]),
            "missed": float(missed.mean()), "trained_on_other_copies": others}
        print(f"vocoder held out {recipe} {family}: {rows[f'{recipe} / {family}']}", flush=True)
    return rows


# --------------------------------------------------------------------------- GMM folds


def gmm_rows(recipe: str, families: dict[str, list[tuple[str, Path]]],
             clips: dict[str, Clip], dev_bona: list[Clip], unit: list[Any],
             args: argparse.Namespace) -> dict[str, Any]:
    """Per family: the GMM fitted on everything but the family's copies, here and now."""
    from bench.newcallers import _fit_gmm
    from models.data.asvspoof import ASVspoofSplit, audio_path
    from models.data.audio import load_audio, repeat_pad
    from models.metrics import compute_eer
    from models.tasks.loso import loso_calibration
    from models.tasks.recipes import GMM_RECIPES, corpus_root

    options, _ = GMM_RECIPES[recipe]
    train = ASVspoofSplit(corpus_root(), "train")
    spoofs = [load_audio(audio_path(train.audio_dir, t.utt_id), 8000)
              for t in train.trials() if not t.is_bonafide]
    bona_train = [c for c in clips.values() if c.split == "train"]
    waves = {c.utt_id: load_audio(c.path, 8000) for c in clips.values()
             if c.split == "train" or c.group != "speech-commands"}
    rows: dict[str, Any] = {}
    for family in sorted(families):
        if len(families) < 2:
            break  # nothing to train on but the family held out
        others = [load_audio(p, 8000) for f, items in families.items() if f != family
                  for _, p in items]
        model = _fit_gmm([waves[c.utt_id] for c in bona_train], spoofs + others, options)
        held = [(s, p) for s, p in families[family] if s in waves]
        copy_scores = model.score([repeat_pad(load_audio(p, 8000), 32000) for _, p in held])
        source_scores = model.score([repeat_pad(waves[s], 32000) for s, _ in held])
        anchor = model.score([repeat_pad(waves[c.utt_id], 32000) for c in dev_bona])
        calibration = loso_calibration(unit, anchor, args.prior)
        missed = calibration.spoof_probability(copy_scores) < 0.5
        rows[f"{recipe} / {family}"] = {
            "copies": len(held), "eer": float(compute_eer(source_scores, copy_scores)[0]),
            "missed": float(missed.mean()),
            "trained_on_other_copies": len(others)}
        print(f"vocoder held out {recipe} {family}: {rows[f'{recipe} / {family}']}",
              flush=True)
    return rows


def run(args: argparse.Namespace) -> int:
    from models.data.asvspoof import ASVspoofSplit
    from models.tasks.loso import spoof_systems
    from models.tasks.recipes import NEURAL_RECIPES, corpus_root, recipe_folds

    clock = start(args.threads)
    root = corpus_root()
    clips = {c.utt_id: c for c in bonafide_clips(root)}
    families = copies_by_family()
    skipped = [f for f in sorted(set(FAMILIES.values())) if f not in families]
    if args.family:
        families = {f: v for f, v in families.items() if f in args.family}
    dev_bona = [c for c in clips.values() if c.split == "dev" and c.group != "speech-commands"]
    systems = spoof_systems(ASVspoofSplit(root, "train").trials())
    rows: dict[str, Any] = {}
    for recipe in args.recipe:
        unit = recipe_folds(recipe, systems, Path(args.loso_dir), "reduced")
        if not unit:  # before a neural fold spends its minutes of training
            raise SystemExit(f"{recipe}: no LOSO fold scores to calibrate on "
                             "(python -m bench.generalization train-folds)")
        fit = neural_rows if recipe in NEURAL_RECIPES else gmm_rows
        rows.update(fit(recipe, families, clips, dev_bona, unit, args))
    payload = {"threshold": 0.5, "prior": args.prior, "rows": rows, "skipped": skipped,
               "families": {f: len(v) for f, v in families.items()},
               "seconds": clock.seconds()}
    write_page(Path(args.out), payload)
    return 0


def write_page(out: Path, payload: dict[str, Any]) -> None:
    """The results page in ``bench/results``, or in ``--out`` (a smoke run's elsewhere)."""
    if out.resolve() == RESULTS.resolve():
        write_results("vocoder-held-out", payload, markdown(payload))
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocoder-held-out.json").write_text(json.dumps(payload, indent=2))
    (out / "vocoder-held-out.md").write_text(markdown(payload))
    print(markdown(payload))


CALIBRATION = """Copies per family: {families}; families without copies: {skipped}. Calibration:
the recipe's LOSO calibration at bona fide prior {prior}, anchored on the fold's corpus dev bona
fide. {seconds:.0f} s."""


def markdown(payload: dict[str, Any]) -> str:
    lines = ["### Vocoder family held out: its copies against the recordings they were made "
             "from", "", "| recipe / family held out | copies | EER % | missed at the service "
             "threshold % | other families' copies trained on |", "|---|---|---|---|---|"]
    for key, r in payload["rows"].items():
        lines.append(f"| {key} | {r['copies']} | {100 * r['eer']:.1f} | "
                     f"{100 * r['missed']:.1f} | {r['trained_on_other_copies']} |")
    if not payload["rows"]:
        lines.append("| (fewer than two vocoder families have copies here) | | | | |")
    return page(lines, prose(CALIBRATION, {**payload,
                                           "skipped": ", ".join(payload["skipped"]) or "none"}))


def main(argv: list[str] | None = None) -> int:
    from models.tasks.recipes import GMM_RECIPES, NEURAL_RECIPES

    parser = command("python -m bench.vocoder_held_out", __doc__)
    parser.add_argument("--recipe", action="append", default=None,
                        choices=sorted([*GMM_RECIPES, *NEURAL_RECIPES]))
    parser.add_argument("--prior", type=float, default=DEFAULT_PRIOR)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads, for scoring and the neural folds' training")
    parser.add_argument("--loso-dir", default=str(REPO_ROOT / "runs" / "loso"))
    parser.add_argument("--family", action="append", default=None,
                        help="hold out only these families (default: every one with copies)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="neural folds' epochs (default: the recipe's FOLD_SCALE)")
    parser.add_argument("--limit", type=int, default=None,
                        help="neural folds' corpus training trials, extras in proportion "
                        "(0: all; default: the recipe's FOLD_SCALE)")
    parser.add_argument("--runs", default=str(RUNS), help="where the neural folds are kept")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the results page")
    args = parser.parse_args(argv)
    args.recipe = args.recipe or ["lfcc-gmm-fine"]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
