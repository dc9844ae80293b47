"""``make bench-generalization``: leave-one-system-out (LOSO) estimates per recipe.

Dev shares its six engines with train, so dev EER says nothing about engines the detector
never saw; the hidden evaluation set has only such engines. For every recipe and every
engine T01-T06: fit without T's spoofs, score dev bona fide against T's dev spoofs
(:mod:`models.tasks.loso`). Writes ``bench/results/generalization.{json,md}``: per recipe,
the EER per held-out engine, the pooled LOSO EER, and, at the service's alert threshold
(0.5) under a calibration fitted on the pooled LOSO scores, the bona fide false-alarm rate
on digits (< 1 s) and sentences, and each held-out engine's miss rate.

Recipes:

- ``lfcc-gmm``: the classic baseline, refitted per fold.
- ``lfcc-gmm-dd``: the same without the static cepstra (deltas and double deltas only,
  ``static: false``), quiet frames dropped (``vad_db: 30``), 32 components in both modes
  (``experiments/gmm-exploration.md``).
- ``lfcc-gmm-fine``: ``lfcc-gmm-dd`` on 40 linear filters and 30 cepstra (20 and 20), a part
  of the default fusion (lcnn-gmm-fusion v6).
- ``whisper-lr`` / ``whisper-lr-voc``: frozen Whisper tiny.en encoder + logistic
  regression, without / with the vocoded bona fide (``make vocode``) as extra spoofs.
- ``rawnet2`` / ``rawnet2-voc``: RawNet2-tel trained per fold from
  ``models/configs/rawnet2_tel.yaml`` / ``experiments/configs/rawnet2_tel_voc.yaml`` at a
  reduced scale (``--fold-limit`` training trials, ``--fold-epochs`` epochs): six trainings
  per recipe, so on this 2-core CPU they are
  trained with ``python -m bench.generalization train-folds`` in the background (resumable,
  ``runs/loso/``) and the report reads their scores; ``--mode reduced`` reports whatever
  folds exist and says which are missing.
- ``lcnn`` / ``lcnn-s1`` / ``lcnn-s2`` / ``lcnn-hr`` / ``lcnn-voc`` / ``lcnn-voc-s1``: the LFCC-LCNN
  (``models/configs/lcnn*_tel*.yaml`` for the default's parts, ``experiments/configs/`` for
  the rest) at full scale per fold (every training trial, 12 epochs; the ``-voc`` ones add
  the vocoded bona fide as spoofs), trained the same way; the fold scores of the default's
  parts (``lcnn``, ``lcnn-s1``, ``lcnn-sc-voc3``) are committed in ``bench/results/loso/``,
  the others' (``lcnn-voc`` was a part of v5) in ``experiments/loso/``.
- ``lcnn-sc-voc3``: the LCNN with the Speech Commands train speakers as bona fide and their
  copies through three vocoder families (HiFi-GAN, vocos-8k, nsf-8k) as spoofs, 6 epochs per
  fold (``models/configs/lcnn_sc_voc3_tel.yaml``, a part of the default since v6; needs
  ``make vocode-extra``).
- ``fusion(a+b)``: a logistic-regression fusion of the recipes' scores, weights fitted on the
  pooled LOSO scores of the other folds (leave-one-fold-out, so the fusion is LOSO too).
- ``fusion(a=0.6+b=0.4)``: the bona-normal fusion (``models.architectures.fusion``): each
  part's scores as normal quantiles of their rank among the fold's bona fide scores, summed
  with the given weights (nothing fitted on spoofs, so nothing to leave out).

``--mode reduced`` (the default, under 20 minutes here) uses fewer GMM components and
frames; ``--mode full`` uses the shipped sizes.

The recipes, their folds and the fusions of folds are :mod:`models.tasks.recipes`, which the
release steps (``python -m models ship`` / ``fuse``) read too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import RAN, page, prose, start
from models.data.asvspoof import ASVspoofSplit, Trial, read_protocol
from models.tasks.config import REPO_ROOT, TrainConfig
from models.tasks.loso import (
    BONAFIDE_PRIOR,
    FoldScores,
    fold_eval_trials,
    report,
    spoof_systems,
    train_fold,
)
from models.tasks.recipes import (
    FOLD_SCALE,
    GMM_RECIPES,
    GMM_SIZES,
    NEURAL_RECIPES,
    RUNS,
    committed_folds,
    corpus_root,
    durations,
    fuse,
    fuse_bona_normal,
    fusion_weights,
    gmm_folds,
    neural_folds,
    parse_fusion,
)

RESULTS = REPO_ROOT / "bench" / "results"
VOCODED = REPO_ROOT / "runs" / "vocoded" / "train"


def fold_scale_note(recipe: str, runs: Path | None = None) -> str:
    """The scale the recipe's folds were trained at: read from a fold run's config where
    this machine trained them (``make train-gpu`` trains at full scale), else the recipe's
    committed scale."""
    limit, epochs = FOLD_SCALE[recipe]
    configs = sorted(runs.glob(f"{recipe}/*/config.json")) if runs else []
    if configs:
        raw = json.loads(configs[0].read_text())
        limit, epochs = raw["data"]["limit"], raw["optim"]["epochs"]
    else:
        for path in sorted(committed_folds(recipe).glob("T*.json")):
            limit, epochs = json.loads(path.read_text()).get("scale", (limit, epochs))
            break
    trials = "every corpus trial" if not limit else f"{limit} corpus trials"
    return f"{epochs} epochs on {trials} per fold"


def fold_config(recipe: str, limit: int | None, epochs: int) -> TrainConfig:
    config = TrainConfig.load(NEURAL_RECIPES[recipe])
    config.data.limit = limit or None  # 0: every training trial
    config.data.dev_limit = 200  # per-epoch dev EER is informational only in a fold
    config.optim.epochs = epochs
    return config


def train_folds(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    systems = args.systems or spoof_systems(ASVspoofSplit(corpus_root(), "train").trials())
    for recipe in args.recipe:
        limit, epochs = FOLD_SCALE[recipe]
        config = fold_config(recipe, limit if args.fold_limit is None else args.fold_limit,
                             args.fold_epochs or epochs)
        config.optim.threads = args.threads
        config.optim.device = args.device
        if args.seed is not None:
            config.optim.seed = args.seed
        for system in systems:
            began = time.time()
            fold = train_fold(config, system, Path(args.runs) / recipe / system)
            print(f"{recipe} without {system}: EER {100 * fold.eer():.2f}% "
                  f"({time.time() - began:.0f} s)", flush=True)
    return 0


# --------------------------------------------------------------------------- frozen encoder


def whisper_features(trials: list[Trial], audio_dir: Path, cache: Path,
                     batch: int = 16) -> dict[str, np.ndarray]:
    """Pooled Whisper encoder features of each trial's first 4 s window (repeat-padded, as
    scoring sees it), cached in ``cache`` (.npz) so recipes and folds share one pass."""
    from models.architectures.whisper import WhisperEncoder
    from models.data.asvspoof import audio_path
    from models.data.audio import load_audio, repeat_pad

    have: dict[str, np.ndarray] = {}
    if cache.is_file():
        with np.load(cache) as z:
            have = dict(zip(z["ids"].tolist(), z["x"], strict=True))
    todo = [t for t in trials if t.utt_id not in have]
    if todo:
        encoder = WhisperEncoder()
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            waves = np.stack([repeat_pad(load_audio(audio_path(audio_dir, t.utt_id), 8000), 32000)
                              for t in chunk])
            for t, x in zip(chunk, encoder.embed(waves, 8000), strict=True):
                have[t.utt_id] = x
        cache.parent.mkdir(parents=True, exist_ok=True)
        ids = sorted(have)
        np.savez(cache, ids=np.array(ids), x=np.stack([have[i] for i in ids]))
    return {t.utt_id: have[t.utt_id] for t in trials}


def linear_folds(recipe: str, train: list[Trial], dev: list[Trial],
                 feats: dict[str, np.ndarray], systems: list[str]) -> list[FoldScores]:
    """Per fold: logistic regression on the frozen features without the held-out engine."""
    from models.architectures.whisper import LinearHead

    folds = []
    for system in systems:
        fit = [t for t in train if t.system != system]
        head = LinearHead.fit(np.stack([feats[t.utt_id] for t in fit]),
                              np.array([t.label for t in fit]))
        test = fold_eval_trials(dev, system)
        scores = head(np.stack([feats[t.utt_id] for t in test]))
        folds.append(FoldScores(system, [t.utt_id for t in test], [t.label for t in test],
                                [float(s) for s in scores]))
    return folds


# --------------------------------------------------------------------------- report


def export_folds(args: argparse.Namespace) -> int:
    """Copy finished fold scores to where they are committed (small JSON): the default's
    parts to ``bench/results/loso``, every other recipe to ``experiments/loso``."""
    for scores in sorted(Path(args.runs).glob("*/T*/scores.json")):
        recipe, system = scores.parent.parent.name, scores.parent.name
        target = committed_folds(recipe) / f"{system}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        payload = json.loads(scores.read_text())
        config = scores.parent / "config.json"
        if config.is_file():  # the scale travels with the scores (the report's notes)
            raw = json.loads(config.read_text())
            payload["scale"] = [raw["data"]["limit"] or 0, raw["optim"]["epochs"]]
        target.write_text(json.dumps(payload))
        print(f"exported {target.relative_to(REPO_ROOT)}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    clock = start(args.threads)
    root = corpus_root()
    train = ASVspoofSplit(root, "train").trials()
    dev = ASVspoofSplit(root, "dev").trials()
    systems = spoof_systems(train)
    dur = durations(root)
    cache = REPO_ROOT / "runs" / "features"
    results: dict[str, list[FoldScores]] = {}
    notes: dict[str, str] = {}

    if "lfcc-gmm" in args.recipes:
        results["lfcc-gmm"] = gmm_folds(train, dev, root, systems, args.mode,
                                        cache / f"gmm-loso-{args.mode}.json")
        notes["lfcc-gmm"] = (f"{GMM_SIZES[args.mode]['n_components']} components, "
                             f"{GMM_SIZES[args.mode]['max_frames_per_class']} frames/class")
    for recipe, (options, name) in GMM_RECIPES.items():  # own size in both modes, as yaml
        if recipe in args.recipes:
            results[recipe] = gmm_folds(train, dev, root, systems, args.mode, cache / name,
                                        **options)
            notes[recipe] = (f"{options['n_components']} components, "
                             f"{options['max_frames_per_class']} frames/class; "
                             f"{options.get('n_filters', 20)} filters, "
                             f"{options.get('n_ceps', 20)} cepstra, deltas and double deltas "
                             "only, frames within 30 dB of the loudest")
    vocoded = VOCODED / "protocol.txt"
    if "lfcc-gmm-voc" in args.recipes and vocoded.is_file():
        results["lfcc-gmm-voc"] = gmm_folds(
            train, dev, root, systems, args.mode, cache / f"gmm-voc-loso-{args.mode}.json",
            read_protocol(vocoded), VOCODED / "flac")
        notes["lfcc-gmm-voc"] = notes.get("lfcc-gmm", "") + "; plus the vocoded bona fide"
    if any(r.startswith("whisper") for r in args.recipes):
        feats = whisper_features(train, ASVspoofSplit(root, "train").audio_dir,
                                 cache / "whisper-train.npz")
        feats |= whisper_features(dev, ASVspoofSplit(root, "dev").audio_dir,
                                  cache / "whisper-dev.npz")
        if "whisper-lr" in args.recipes:
            results["whisper-lr"] = linear_folds("whisper-lr", train, dev, feats, systems)
            notes["whisper-lr"] = "frozen tiny.en encoder, mean+std pooled, logistic regression"
        if "whisper-lr-voc" in args.recipes and vocoded.is_file():
            extra = read_protocol(vocoded)
            feats |= whisper_features(extra, VOCODED / "flac", cache / "whisper-vocoded.npz")
            results["whisper-lr-voc"] = linear_folds("whisper-lr-voc", train + extra, dev,
                                                     feats, systems)
            notes["whisper-lr-voc"] = "as whisper-lr, plus the vocoded bona fide as spoofs"
    for recipe in NEURAL_RECIPES:
        if recipe in args.recipes:
            folds = neural_folds(recipe, systems, Path(args.loso_dir))
            if folds:
                results[recipe] = folds
                missing = sorted(set(systems) - {f.held_out for f in folds})
                notes[recipe] = fold_scale_note(recipe, Path(args.loso_dir)) + (
                    EXTRA_DATA.get(recipe, "; plus the vocoded bona fide as spoofs")
                    if "-voc" in recipe else "") + (
                    f"; folds missing: {missing}" if missing else "")
    complete = {k: v for k, v in results.items() if len(v) == len(systems)}
    for combo in args.fuse:
        names, weights = parse_fusion(combo)
        if all(n in complete for n in names):
            if weights is None:
                results[f"fusion({combo})"] = fuse({n: complete[n] for n in names})
                notes[f"fusion({combo})"] = "logistic fusion, weights fitted leaving the fold out"
            else:
                results[f"fusion({combo})"] = fuse_bona_normal(
                    {n: complete[n] for n in names}, dict(zip(names, weights, strict=True)))
                notes[f"fusion({combo})"] = ("bona-normal fusion: ranks among the fold's bona "
                                             "fide scores, fixed weights")
    reports = [report(name, folds, dur, notes=notes.get(name, ""))
               for name, folds in results.items()]
    payload = {
        "mode": args.mode, "seconds": clock.seconds(), "systems": systems,
        "threshold": 0.5, "recipes": [r.to_json() for r in reports],
        "fusion_weights": {c: fusion_weights({n: complete[n] for n in c.split("+")})
                           for c in args.fuse if parse_fusion(c)[1] is None
                           and all(n in complete for n in c.split("+"))},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "generalization.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / "generalization.md").write_text(markdown(payload))
    print(markdown(payload))
    return 0


#: what a neural recipe trains on beyond the corpus, where it is not the vocoded corpus bona fide
EXTRA_DATA = {"lcnn-sc-voc3": "; plus the Speech Commands train speakers as bona fide and their "
                              "copies through HiFi-GAN, vocos-8k and nsf-8k as spoofs"}


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}"


FALSE_ALARMS = """False alarms: dev bona fide trials whose spoof probability reaches the service's
alert threshold (0.5), under a calibration fitted on the pooled LOSO scores with a bona fide prior
of {prior} (`python -m models ship`'s default, as lfcc-gmm and the default's parts ship; the
Makefile ships the default model at 0.92); digits are trials under 1 s. Misses at that threshold,
per held-out engine, are in the JSON. """ + RAN


def markdown(payload: dict[str, Any]) -> str:
    systems = payload["systems"]
    lines = [
        "### Leave-one-system-out EER (%) on dev: bona fide vs the engine left out of training",
        "",
        "| recipe | " + " | ".join(systems) + " | pooled | worst | bona fide false alarms "
        "digits / sentences | notes |",
        "|---|" + "---|" * len(systems) + "---|---|---|---|",
    ]
    for r in payload["recipes"]:
        per = [_pct(r["per_engine_eer"].get(s, float("nan"))) for s in systems]
        fa = r["bonafide_false_alarm"]
        lines.append(f"| {r['recipe']} | " + " | ".join(per) + f" | {_pct(r['pooled_eer'])} | "
                     f"{_pct(r['worst_engine_eer'])} | {_pct(fa['digits'])} / "
                     f"{_pct(fa['sentences'])} | {r['notes']} |")
    return page(lines, prose(FALSE_ALARMS, {**payload, "prior": BONAFIDE_PRIOR}))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
    parser = argparse.ArgumentParser(prog="python -m bench.generalization", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("train-folds", help="train the neural recipes' LOSO folds (resumable)")
    p.add_argument("--recipe", action="append", choices=sorted(NEURAL_RECIPES), required=True)
    p.add_argument("--systems", nargs="*", help="held-out engines (default: every one)")
    p.add_argument("--fold-limit", type=int, default=None,
                   help="corpus trials (0: all; default: the recipe's FOLD_SCALE)")
    p.add_argument("--fold-epochs", type=int, default=None,
                   help="default: the recipe's FOLD_SCALE")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--runs", default=str(RUNS), help="where fold runs are kept")
    p.add_argument("--seed", type=int, default=None,
                   help="override the recipe's seed (measure seed noise; use another --runs)")
    p.set_defaults(func=train_folds)
    p = sub.add_parser("report", help="LOSO table of every recipe -> bench/results")
    p.add_argument("--mode", choices=["reduced", "full"], default="reduced")
    p.add_argument("--recipes", nargs="*", default=[
        "lfcc-gmm", "lfcc-gmm-dd", "lfcc-gmm-fine", "lfcc-gmm-voc", "whisper-lr",
        "whisper-lr-voc", "rawnet2", "rawnet2-voc", "lcnn", "lcnn-s1", "lcnn-s2", "lcnn-hr",
        "lcnn-voc", "lcnn-voc-s1", "lcnn-sc-voc3"])
    p.add_argument("--fuse", nargs="*", default=["rawnet2-voc+lfcc-gmm",
                                                 "rawnet2+lfcc-gmm-dd",
                                                 "rawnet2-voc+lfcc-gmm-dd",
                                                 "lfcc-gmm-dd+whisper-lr",
                                                 "rawnet2-voc+lfcc-gmm-dd+whisper-lr",
                                                 "lcnn+lfcc-gmm-dd",
                                                 "lcnn=0.6+lfcc-gmm-dd=0.4",
                                                 "lcnn=0.6+lfcc-gmm-fine=0.2+lfcc-gmm-dd=0.2",
                                                 "lcnn=0.3+lcnn-s1=0.3+lfcc-gmm-fine=0.2"
                                                 "+lfcc-gmm-dd=0.2",
                                                 "lcnn=0.3+lcnn-hr=0.3+lfcc-gmm-fine=0.2"
                                                 "+lfcc-gmm-dd=0.2",
                                                 "lcnn=0.3+lcnn-voc=0.3+lfcc-gmm-fine=0.2"
                                                 "+lfcc-gmm-dd=0.2",
                                                 "lcnn=0.2+lcnn-s1=0.2+lcnn-s2=0.2"
                                                 "+lfcc-gmm-fine=0.2+lfcc-gmm-dd=0.2",
                                                 "lcnn=0.2+lcnn-s1=0.2+lcnn-voc=0.2"
                                                 "+lfcc-gmm-fine=0.2+lfcc-gmm-dd=0.2",
                                                 "lcnn=0.2+lcnn-s1=0.2+lcnn-voc=0.2"
                                                 "+lcnn-voc-s1=0.2+lfcc-gmm-fine=0.2"
                                                 "+lfcc-gmm-dd=0.2",
                                                 "lcnn=0.2+lcnn-s1=0.2+lcnn-sc-voc3=0.2"
                                                 "+lfcc-gmm-fine=0.2+lfcc-gmm-dd=0.2",
                                                 "lcnn=0.2+lcnn-s1=0.2+lcnn-voc=0.2"
                                                 "+lcnn-sc-voc3=0.2+lfcc-gmm-fine=0.2"
                                                 "+lfcc-gmm-dd=0.2",
                                                 "lcnn+rawnet2-voc+lfcc-gmm-dd",
                                                 "lcnn-voc+lfcc-gmm-dd"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loso-dir", default=str(RUNS), help="fold runs to read (train-folds --runs)")
    p.set_defaults(func=run_report)
    p = sub.add_parser("export-folds", help="copy finished fold scores to bench/results/loso "
                       "(the default's parts) or experiments/loso (every other recipe)")
    p.add_argument("--runs", default=str(RUNS))
    p.set_defaults(func=export_folds)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
