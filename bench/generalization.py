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
  (``bench/results/gmm-exploration.md``).
- ``lfcc-gmm-fine``: ``lfcc-gmm-dd`` on 40 linear filters and 30 cepstra (20 and 20), a part
  of the default fusion (lcnn-gmm-fusion v5).
- ``whisper-lr`` / ``whisper-lr-voc``: frozen Whisper tiny.en encoder + logistic
  regression, without / with the vocoded bona fide (``make vocode``) as extra spoofs.
- ``rawnet2`` / ``rawnet2-voc``: RawNet2-tel trained per fold from
  ``models/configs/rawnet2_tel{,_voc}.yaml`` at a reduced scale (``--fold-limit`` training
  trials, ``--fold-epochs`` epochs): six trainings per recipe, so on this 2-core CPU they are
  trained with ``python -m bench.generalization train-folds`` in the background (resumable,
  ``runs/loso/``) and the report reads their scores; ``--mode reduced`` reports whatever
  folds exist and says which are missing.
- ``lcnn`` / ``lcnn-s1`` / ``lcnn-s2`` / ``lcnn-hr`` / ``lcnn-voc`` / ``lcnn-voc-s1``: the LFCC-LCNN
  (``models/configs/lcnn*_tel*.yaml``) at full scale per fold (every training trial, 12
  epochs; the ``-voc`` ones add the vocoded bona fide as spoofs), trained the same way; their
  fold scores are committed in ``bench/results/loso/``.
- ``fusion(a+b)``: a logistic-regression fusion of the recipes' scores, weights fitted on the
  pooled LOSO scores of the other folds (leave-one-fold-out, so the fusion is LOSO too).
- ``fusion(a=0.6+b=0.4)``: the bona-normal fusion (``models.architectures.fusion``): each
  part's scores as normal quantiles of their rank among the fold's bona fide scores, summed
  with the given weights (nothing fitted on spoofs, so nothing to leave out).

``--mode reduced`` (the default, under 20 minutes here) uses fewer GMM components and
frames; ``--mode full`` uses the shipped sizes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.data.asvspoof import ASVspoofSplit, Trial, read_protocol
from models.tasks.config import REPO_ROOT, TrainConfig
from models.tasks.loso import (
    BONAFIDE_PRIOR,
    FoldScores,
    anchored,
    fold_eval_trials,
    report,
    spoof_systems,
    train_fold,
)

RESULTS = REPO_ROOT / "bench" / "results"
RUNS = REPO_ROOT / "runs" / "loso"
VOCODED = REPO_ROOT / "runs" / "vocoded" / "train"
NEURAL_RECIPES = {
    "rawnet2": REPO_ROOT / "models" / "configs" / "rawnet2_tel.yaml",
    "rawnet2-voc": REPO_ROOT / "models" / "configs" / "rawnet2_tel_voc.yaml",
    "lcnn": REPO_ROOT / "models" / "configs" / "lcnn_tel.yaml",
    "lcnn-voc": REPO_ROOT / "models" / "configs" / "lcnn_tel_voc.yaml",
    "lcnn-voc-s1": REPO_ROOT / "models" / "configs" / "lcnn_voc_s1_tel.yaml",
    "lcnn-hr": REPO_ROOT / "models" / "configs" / "lcnn_hr_tel.yaml",
    "lcnn-sam": REPO_ROOT / "models" / "configs" / "lcnn_sam_tel.yaml",
    "lcnn-s1": REPO_ROOT / "models" / "configs" / "lcnn_s1_tel.yaml",
    "lcnn-s2": REPO_ROOT / "models" / "configs" / "lcnn_s2_tel.yaml",
}
#: each neural recipe's fold scale (corpus training trials, 0: all; epochs): RawNet2 folds
#: are reduced (a full-scale fold is ~1.5 h on this CPU); an LCNN fold at full scale is ~10 min
FOLD_SCALE = {"rawnet2": (1600, 6), "rawnet2-voc": (1600, 6), "lcnn": (0, 12),
              "lcnn-voc": (0, 12), "lcnn-voc-s1": (0, 12), "lcnn-hr": (0, 12), "lcnn-sam": (0, 12),
              "lcnn-s1": (0, 12), "lcnn-s2": (0, 12)}


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
        for path in sorted((COMMITTED / recipe).glob("T*.json")):
            limit, epochs = json.loads(path.read_text()).get("scale", (limit, epochs))
            break
    trials = "every corpus trial" if not limit else f"{limit} corpus trials"
    return f"{epochs} epochs on {trials} per fold"


def corpus_root() -> Path:
    return TrainConfig.load(NEURAL_RECIPES["rawnet2"]).data.root_path


def durations(root: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for split in ("train", "dev"):
        path = root / f"metadata.{split}.tsv"
        if path.is_file():
            with path.open() as f:
                for row in csv.DictReader(f, delimiter="\t"):
                    out[row["utt_id"]] = float(row["duration_s"])
    return out


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


# --------------------------------------------------------------------------- LFCC+GMM


GMM_SIZES = {"reduced": {"n_components": 32, "max_frames_per_class": 20000},
             "full": {"n_components": 128, "max_frames_per_class": 50000}}
# lfcc-gmm-dd (models/configs/lfcc_gmm_dd.yaml): without statics, more components than 32
# fit the training engines closer and generalize worse on LOSO (21.4 % at 64 and 21.5 % at
# 128 against 19.7-20.1 % at 32; bench/results/gmm-exploration.md), so one size for both modes.
# Frames more than 30 dB below the utterance's loudest are dropped (vad_db): same pooled
# EER within seed noise, alone and fused with RawNet2, and a lower worst engine at every
# seed and size (gmm-exploration.md, "Quiet-frame gate").
GMM_DD = {"static": False, "vad_db": 30.0, "n_components": 32, "max_frames_per_class": 20000}
# lfcc-gmm-fine (models/configs/lfcc_gmm_fine.yaml): the same on 40 filters and 30 cepstra, a
# part of the default fusion (lcnn-gmm-fusion v4). Seeds 0-2: 16.1 / 18.5 / 18.2 %
# pooled against 19.7-21.3 % for lfcc-gmm-dd; 48x36 and 60x32 grids scored 22 %.
GMM_FINE = {**GMM_DD, "n_filters": 40, "n_ceps": 30}
#: GMM recipes fitted on demand (a couple of minutes on one core): their options and cache
GMM_RECIPES = {"lfcc-gmm-dd": (GMM_DD, "gmm-dd-vad30-loso.json"),
               "lfcc-gmm-fine": (GMM_FINE, "gmm-fine-loso.json")}


def gmm_folds(train: list[Trial], dev: list[Trial], root: Path, systems: list[str],
              mode: str, cache: Path, extra: list[Trial] | None = None,
              extra_dir: Path | None = None, **options: Any) -> list[FoldScores]:
    """Per fold: the classic baseline refitted without the held-out engine (whole training
    utterances, first-window scoring, as ``models/tasks/gmm.py``). Cached per mode.
    ``options`` are further :class:`LFCCGMMConfig` fields (a variant of the recipe)."""
    from models.architectures.lfcc_gmm import LFCCGMM, LFCCGMMConfig
    from models.data.asvspoof import audio_path
    from models.data.audio import load_audio, repeat_pad

    if cache.is_file():
        return [FoldScores.from_json(f) for f in json.loads(cache.read_text())]
    train_dir = ASVspoofSplit(root, "train").audio_dir
    dev_dir = ASVspoofSplit(root, "dev").audio_dir
    waves = {t.utt_id: load_audio(audio_path(train_dir, t.utt_id), 8000) for t in train}
    for t in extra or []:
        waves[t.utt_id] = load_audio(audio_path(extra_dir or train_dir, t.utt_id), 8000)
    folds = []
    for system in systems:
        fit = [t for t in [*train, *(extra or [])] if t.system != system]
        model = LFCCGMM(LFCCGMMConfig(**{"sample_rate": 8000, "n_fft": 256, "seed": 0,
                                         **GMM_SIZES[mode], **options}))
        model.fit([waves[t.utt_id] for t in fit if t.is_bonafide],
                  [waves[t.utt_id] for t in fit if not t.is_bonafide])
        test = fold_eval_trials(dev, system)
        scores = model.score([repeat_pad(load_audio(audio_path(dev_dir, t.utt_id), 8000), 32000)
                              for t in test])
        folds.append(FoldScores(system, [t.utt_id for t in test], [t.label for t in test],
                                [float(x) for x in scores]))
        print(f"{cache.stem} without {system}: EER {100 * folds[-1].eer():.2f}%", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps([f.to_json() for f in folds]))
    return folds


# --------------------------------------------------------------------------- fusion


def _fit_fusion(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1.0, class_weight="balanced").fit(x, y)
    return lr.coef_[0].astype(np.float64), float(lr.intercept_[0])


def fuse(parts: dict[str, list[FoldScores]]) -> list[FoldScores]:
    """Logistic-regression fusion of several recipes' scores, leave-one-fold-out: the
    weights that score fold T are fitted on the other folds only, so the fused scores are
    as blind to T as each part is. Each part's scores enter in units of its fold's bona fide
    scores (:func:`models.tasks.loso.anchored`), as a shipped fusion sees them."""
    names = sorted(parts)
    by_fold = {name: {f.held_out: f for f in parts[name]} for name in names}
    systems = sorted(set.intersection(*(set(v) for v in by_fold.values())))
    units = {(n, t): anchored(by_fold[n][t]) for n in names for t in systems}
    out = []
    for system in systems:
        others = [t for t in systems if t != system]
        x = np.concatenate([np.stack([units[n, t] for n in names], axis=1) for t in others])
        y = np.concatenate([np.asarray(by_fold[names[0]][t].labels) for t in others])
        weight, bias = _fit_fusion(x, y)
        ref = by_fold[names[0]][system]
        fused = np.stack([units[n, system] for n in names], axis=1) @ weight + bias
        out.append(FoldScores(system, ref.utt_ids, ref.labels, [float(v) for v in fused]))
    return out


def parse_fusion(recipe: str) -> tuple[list[str], list[float] | None]:
    """``a+b`` -> parts, no weights (logistic fusion); ``a=0.6+b=0.4`` -> parts and their
    weights (bona-normal fusion)."""
    items = recipe.split("+")
    if not any("=" in item for item in items):
        return items, None
    pairs = [item.split("=", 1) for item in items]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"{recipe!r}: give every part of a bona-normal fusion a weight")
    return [n for n, _ in pairs], [float(w) for _, w in pairs]


def fuse_bona_normal(parts: dict[str, list[FoldScores]],
                     weights: dict[str, float]) -> list[FoldScores]:
    """Per fold: each part's scores as ranks among that fold's bona fide scores (normal
    quantiles, :func:`models.architectures.fusion.bona_normal`), weighted and summed."""
    from models.architectures.fusion import bona_normal

    names = list(weights)
    by_fold = {name: {f.held_out: f for f in parts[name]} for name in names}
    systems = sorted(set.intersection(*(set(v) for v in by_fold.values())))
    out = []
    for system in systems:
        ref = by_fold[names[0]][system]
        y = np.asarray(ref.labels)
        fused = np.zeros(len(y))
        for name in names:
            fold = by_fold[name][system]
            if fold.utt_ids != ref.utt_ids:
                raise ValueError(f"{name} and {names[0]} scored other trials for {system}")
            s = np.asarray(fold.scores, np.float64)
            fused += weights[name] * bona_normal(s, s[y == 1])
        out.append(FoldScores(system, ref.utt_ids, ref.labels, [float(v) for v in fused]))
    return out


def fusion_weights(parts: dict[str, list[FoldScores]]) -> dict[str, Any]:
    """The fusion fitted on every fold (what a shipped fused model uses), on anchored units."""
    names = sorted(parts)
    x = np.stack([np.concatenate([anchored(f) for f in parts[n]]) for n in names], axis=1)
    y = np.concatenate([np.asarray(f.labels) for f in parts[names[0]]])
    weight, bias = _fit_fusion(x, y)
    return {"parts": names, "weight": weight.tolist(), "bias": bias}


# --------------------------------------------------------------------------- report


COMMITTED = RESULTS / "loso"  # fold scores of the neural recipes, exported by export-folds


def neural_folds(recipe: str, systems: list[str], runs: Path) -> list[FoldScores]:
    """A recipe's fold scores: from ``runs`` (this machine's fold trainings) where present,
    else the committed ones (``bench/results/loso``), so a clean checkout reports them."""
    out = []
    for system in systems:
        for path in (runs / recipe / system / "scores.json",
                     COMMITTED / recipe / f"{system}.json"):
            if path.is_file():
                out.append(FoldScores.from_json(json.loads(path.read_text())))
                break
    return out


def recipe_folds(recipe: str, systems: list[str], runs: Path, mode: str) -> list[FoldScores]:
    """LOSO folds of a recipe by name: a neural recipe's fold runs (or committed scores),
    the GMM's cached folds, or ``a+b`` for the leave-one-fold-out fusion of recipes."""
    if "+" in recipe:
        names, weights = parse_fusion(recipe)
        parts = {name: recipe_folds(name, systems, runs, mode) for name in names}
        if weights is None:
            return fuse(parts)
        return fuse_bona_normal(parts, dict(zip(names, weights, strict=True)))
    if recipe in NEURAL_RECIPES:
        return neural_folds(recipe, systems, runs)
    if recipe in GMM_RECIPES:
        # Cheap (about two minutes on one core), so `ship` and `fuse-model` fit the folds
        # themselves instead of requiring a `report` run, which rewrites the results.
        options, name = GMM_RECIPES[recipe]
        root = corpus_root()
        return gmm_folds(ASVspoofSplit(root, "train").trials(), ASVspoofSplit(root, "dev").trials(),
                         root, systems, mode, REPO_ROOT / "runs" / "features" / name, **options)
    cache = REPO_ROOT / "runs" / "features" / {
        "lfcc-gmm": f"gmm-loso-{mode}.json", "lfcc-gmm-voc": f"gmm-voc-loso-{mode}.json"}[recipe]
    if not cache.is_file():
        return []
    return [FoldScores.from_json(f) for f in json.loads(cache.read_text())]


def export_folds(args: argparse.Namespace) -> int:
    """Copy finished fold scores to bench/results/loso (small JSON, committed)."""
    for scores in sorted(Path(args.runs).glob("*/T*/scores.json")):
        recipe, system = scores.parent.parent.name, scores.parent.name
        target = COMMITTED / recipe / f"{system}.json"
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
    import torch

    torch.set_num_threads(args.threads)
    began = time.time()
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
                    "; plus the vocoded bona fide as spoofs" if "-voc" in recipe
                    else "") + (f"; folds missing: {missing}" if missing else "")
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
        "mode": args.mode, "seconds": round(time.time() - began, 1), "systems": systems,
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


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}"


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
    lines += [
        "",
        "False alarms: dev bona fide trials whose spoof probability reaches the service's "
        "alert threshold (0.5), under a calibration fitted on the pooled LOSO scores with a "
        f"bona fide prior of {BONAFIDE_PRIOR} (`ship`'s default, as lcnn, lfcc-gmm and fusion "
        "ship; the Makefile ships the default model at 0.92); digits are trials "
        "under 1 s. Misses at that threshold, per held-out engine, are in the JSON. "
        f"Mode `{payload['mode']}`, {payload['seconds']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- shipping


def ship(args: argparse.Namespace) -> int:
    """Re-calibrate a trained checkpoint on its recipe's LOSO scores and record the LOSO
    estimate and the false-alarm rates at the service threshold in its card."""
    import torch

    from models.data.asvspoof import ASVspoofSplit
    from models.inference import FORMAT, load_detector, save_checkpoint
    from models.tasks.loso import SHORT_SECONDS, loso_calibration, score_trials

    torch.set_num_threads(args.threads)
    root = corpus_root()
    systems = spoof_systems(ASVspoofSplit(root, "train").trials())
    folds = recipe_folds(args.recipe, systems, Path(args.loso_dir), args.mode)
    if len(folds) != len(systems):
        print(f"error: {args.recipe} has {len(folds)} of {len(systems)} LOSO folds",
              file=sys.stderr)
        return 2
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    assert state.get("format") == FORMAT, "not a callshield checkpoint"
    detector = load_detector(args.checkpoint)
    dev = ASVspoofSplit(root, "dev")
    trials = dev.trials()
    dev_scores = np.asarray(score_trials(detector, trials, dev.audio_dir))
    labels = np.array([t.label for t in trials])
    from models.tasks.antispoofing import eer_by_system

    dev_eer = eer_by_system(dev_scores, labels, [t.system for t in trials])
    bona = [t for t in trials if t.is_bonafide]
    bona_scores = dev_scores[labels == 1]
    calibration = loso_calibration(folds, bona_scores, args.prior)
    flagged = calibration.spoof_probability(bona_scores) >= args.threshold
    dur = durations(root)
    short = np.array([dur.get(t.utt_id, 99.0) < SHORT_SECONDS for t in bona])
    loso = report(args.recipe, folds, dur, args.threshold, prior=args.prior)
    state["calibration"] = vars(calibration)
    state["card"] = {**state.get("card", {}), "dev_eer": dev_eer, "calibration_source": (
        "leave-one-system-out scores of the recipe's folds, anchored on this model's dev "
        "bona fide scores (bench/generalization.py ship)"),
        "loso": {"per_engine_eer": loso.per_engine, "pooled_eer": loso.pooled_eer,
                 "fold_scale": args.fold_scale, "spoof_miss_at_threshold": loso.misses},
        "bonafide_false_alarm": {"threshold": args.threshold, "bonafide_prior": args.prior,
                                 "digits": float(flagged[short].mean()),
                                 "sentences": float(flagged[~short].mean()),
                                 "digits_trials": int(short.sum()),
                                 "sentences_trials": int((~short).sum())}}
    fields = {k: v for k, v in state.items() if k != "format"}
    save_checkpoint(args.out or args.checkpoint, **fields)
    print(json.dumps({"calibration": vars(calibration), **state["card"]["bonafide_false_alarm"]},
                     indent=2))
    return 0


def fuse_model(args: argparse.Namespace) -> int:
    """Build a fused checkpoint from shipped parts. Logistic: weights fitted on their recipes'
    LOSO scores, each part anchored on its own dev bona fide scores (median, IQR), as the fold
    scores were. Bona-normal (``--weight``): the given weights, each part ranked against its
    own dev bona fide scores, as the fold scores were against theirs. Calibrate it afterwards
    with ``ship --recipe a+b`` (or ``a=0.6+b=0.4``)."""
    import torch

    from models.architectures.fusion import fusion_state
    from models.inference import FORMAT, detector_from_state, save_checkpoint
    from models.tasks.loso import robust_scale, score_trials

    torch.set_num_threads(args.threads)
    root = corpus_root()
    systems = spoof_systems(ASVspoofSplit(root, "train").trials())
    pairs = [p.split("=", 1) for p in args.part]
    recipes = [r for _, r in pairs]
    if args.weight and len(args.weight) != len(pairs):
        print("error: one --weight per --part", file=sys.stderr)
        return 2
    if args.weight:  # bona-normal: fixed weights, in the order of the parts
        weights: dict[str, Any] = {"parts": recipes, "weight": list(args.weight), "bias": 0.0,
                                   "combine": "bona-normal"}
    else:
        folds = {r: recipe_folds(r, systems, Path(args.loso_dir), args.mode) for r in recipes}
        if any(len(f) != len(systems) for f in folds.values()):
            print("error: every part needs all LOSO folds", file=sys.stderr)
            return 2
        weights = fusion_weights(folds)
    order = weights["parts"]  # sorted recipe names (logistic), as given (bona-normal)
    states, med, iqr, reference = {}, {}, {}, {}
    dev = ASVspoofSplit(root, "dev")
    bona = [t for t in dev.trials() if t.is_bonafide]
    for path, recipe in pairs:
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state.get("format") == FORMAT, f"{path}: not a callshield checkpoint"
        states[recipe] = state
        scores = np.asarray(score_trials(detector_from_state(state), bona, dev.audio_dir))
        med[recipe], iqr[recipe] = robust_scale(scores)
        reference[recipe] = np.sort(scores).tolist()
    first = states[order[0]]
    combination = {"mean": [med[r] for r in order], "scale": [iqr[r] for r in order],
                   "weight": weights["weight"], "bias": weights["bias"],
                   "combine": weights.get("combine", "linear")}
    if combination["combine"] == "bona-normal":
        combination["reference"] = [reference[r] for r in order]
    fused = fusion_state([states[r] for r in order], combination)
    save_checkpoint(
        args.out, architecture="fusion", name=args.name, version=args.version,
        sample_rate=first["sample_rate"], window_seconds=first["window_seconds"],
        model_config={"parts": order}, state_dict=fused,
        card={"fusion": {"parts": {r: states[r]["name"] for r in order},
                         "weight": weights["weight"], "bias": weights["bias"],
                         "combine": combination["combine"]},
              "config": {"name": args.name, "architecture": "fusion", "parts": order}})
    print(json.dumps(weights, indent=2))
    return 0


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
        "lcnn-voc", "lcnn-voc-s1"])
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
                                                 "lcnn+rawnet2-voc+lfcc-gmm-dd",
                                                 "lcnn-voc+lfcc-gmm-dd"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loso-dir", default=str(RUNS), help="fold runs to read (train-folds --runs)")
    p.set_defaults(func=run_report)
    p = sub.add_parser("ship", help="calibrate a checkpoint on its recipe's LOSO scores")
    p.add_argument("checkpoint")
    p.add_argument("--recipe", default="rawnet2-voc",
                   help="a recipe, or parts joined by + for a fused checkpoint")
    p.add_argument("--mode", choices=["reduced", "full"], default="reduced",
                   help="which GMM LOSO folds to read")
    p.add_argument("--out", help="write here instead of over the checkpoint")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--prior", type=float, default=BONAFIDE_PRIOR,
                   help="bona fide prior of the calibration")
    p.add_argument("--fold-scale", default="6 epochs on 1600 corpus trials per fold")
    p.add_argument("--loso-dir", default=str(RUNS))
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=ship)
    p = sub.add_parser("fuse-model", help="fused checkpoint from parts, weights on LOSO")
    p.add_argument("--part", action="append", required=True, help="CHECKPOINT=RECIPE")
    p.add_argument("--weight", action="append", type=float,
                   help="one per --part: a bona-normal fusion with these weights (default: "
                        "logistic fusion, weights fitted on the parts' LOSO scores)")
    p.add_argument("--out", required=True)
    p.add_argument("--name", default="fusion")
    p.add_argument("--version", default="1")
    p.add_argument("--mode", choices=["reduced", "full"], default="reduced")
    p.add_argument("--loso-dir", default=str(RUNS))
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=fuse_model)
    p = sub.add_parser("export-folds", help="copy finished fold scores to bench/results/loso")
    p.add_argument("--runs", default=str(RUNS))
    p.set_defaults(func=export_folds)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
