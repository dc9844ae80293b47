"""The recipes by name and their leave-one-system-out (LOSO) fold scores.

Why here and not in ``bench/``: the release steps (:mod:`models.tasks.release`, ``python -m
models ship`` and ``fuse``) calibrate and weight the shipped models on these scores, and the
benchmark (``bench/generalization.py``) reports them; both read the same folds through
:func:`recipe_folds`, so a table and a shipped card cannot disagree on what "lcnn" means.

Where a recipe's fold scores come from, first found wins:

1. this machine's fold runs (``runs/loso/<recipe>/<engine>/scores.json``,
   ``python -m bench.generalization train-folds``);
2. the committed ones: ``bench/results/loso/<recipe>/`` for the recipes the shipped default
   is built from (:data:`SHIPPED_FOLDS`), ``experiments/loso/<recipe>/`` for every other
   (measured, not shipped; ``experiments/README.md``);
3. LFCC+GMM recipes are refitted per fold on demand (about two minutes on one core) and cached
   in ``runs/features/``.

Recipe strings: a name (``lcnn``), ``a+b`` for the leave-one-fold-out logistic fusion of
recipes, ``a=0.6+b=0.4`` for the bona-normal fusion with those weights.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from models.data.asvspoof import ASVspoofSplit, Trial
from models.tasks.config import REPO_ROOT, TrainConfig
from models.tasks.loso import FoldScores, anchored, fold_eval_trials

SHIPPED_CONFIGS = REPO_ROOT / "models" / "configs"
EXPERIMENT_CONFIGS = REPO_ROOT / "experiments" / "configs"
#: committed fold scores of the recipes the shipped default is built from
SHIPPED_FOLDS = REPO_ROOT / "bench" / "results" / "loso"
#: committed fold scores of recipes measured and not shipped
EXPERIMENT_FOLDS = REPO_ROOT / "experiments" / "loso"
RUNS = REPO_ROOT / "runs" / "loso"
FEATURES = REPO_ROOT / "runs" / "features"

#: the neural recipes and their training configs: the default's parts in ``models/configs``,
#: the candidates that were measured and not shipped in ``experiments/configs``
NEURAL_RECIPES = {
    "lcnn": SHIPPED_CONFIGS / "lcnn_tel.yaml",
    "lcnn-s1": SHIPPED_CONFIGS / "lcnn_s1_tel.yaml",
    "lcnn-voc": EXPERIMENT_CONFIGS / "lcnn_tel_voc.yaml",  # a part of v5
    "rawnet2": SHIPPED_CONFIGS / "rawnet2_tel.yaml",  # rawnet2-tel's recipe, folds reduced
    "rawnet2-voc": EXPERIMENT_CONFIGS / "rawnet2_tel_voc.yaml",
    "lcnn-voc-s1": EXPERIMENT_CONFIGS / "lcnn_voc_s1_tel.yaml",
    "lcnn-hr": EXPERIMENT_CONFIGS / "lcnn_hr_tel.yaml",
    "lcnn-sam": EXPERIMENT_CONFIGS / "lcnn_sam_tel.yaml",
    "lcnn-s2": EXPERIMENT_CONFIGS / "lcnn_s2_tel.yaml",
    "lcnn-sc-voc3": SHIPPED_CONFIGS / "lcnn_sc_voc3_tel.yaml",
}
#: the neural recipes whose committed folds calibrate the shipped default (its LCNN parts)
SHIPPED_RECIPES = frozenset({"lcnn", "lcnn-s1", "lcnn-sc-voc3"})
#: each neural recipe's fold scale (corpus training trials, 0: all; epochs): RawNet2 folds
#: are reduced (a full-scale fold is ~1.5 h on this CPU); an LCNN fold at full scale is ~10 min
FOLD_SCALE = {"rawnet2": (1600, 6), "rawnet2-voc": (1600, 6), "lcnn": (0, 12),
              "lcnn-voc": (0, 12), "lcnn-voc-s1": (0, 12), "lcnn-hr": (0, 12), "lcnn-sam": (0, 12),
              "lcnn-s1": (0, 12), "lcnn-s2": (0, 12), "lcnn-sc-voc3": (0, 6)}

GMM_SIZES = {"reduced": {"n_components": 32, "max_frames_per_class": 20000},
             "full": {"n_components": 128, "max_frames_per_class": 50000}}
# lfcc-gmm-dd (models/configs/lfcc_gmm_dd.yaml): without statics, more components than 32
# fit the training engines closer and generalize worse on LOSO (21.4 % at 64 and 21.5 % at
# 128 against 19.7-20.1 % at 32; experiments/gmm-exploration.md), so one size for both modes.
# Frames more than 30 dB below the utterance's loudest are dropped (vad_db): same pooled
# EER within seed noise, alone and fused with RawNet2, and a lower worst engine at every
# seed and size (experiments/gmm-exploration.md, "Quiet-frame gate").
GMM_DD = {"static": False, "vad_db": 30.0, "n_components": 32, "max_frames_per_class": 20000}
# lfcc-gmm-fine (models/configs/lfcc_gmm_fine.yaml): the same on 40 filters and 30 cepstra, a
# part of the default fusion. Seeds 0-2: 16.1 / 18.5 / 18.2 % pooled against 19.7-21.3 % for
# lfcc-gmm-dd; 48x36 and 60x32 grids scored 22 %.
GMM_FINE = {**GMM_DD, "n_filters": 40, "n_ceps": 30}
#: GMM recipes fitted on demand (a couple of minutes on one core): their options and cache
GMM_RECIPES = {"lfcc-gmm-dd": (GMM_DD, "gmm-dd-vad30-loso.json"),
               "lfcc-gmm-fine": (GMM_FINE, "gmm-fine-loso.json")}


def committed_folds(recipe: str) -> Path:
    """Where a neural recipe's fold scores are committed (``export-folds`` writes there)."""
    return (SHIPPED_FOLDS if recipe in SHIPPED_RECIPES else EXPERIMENT_FOLDS) / recipe


def corpus_root() -> Path:
    """The developer corpus the recipes train on (``../shared/corpus``, from the configs)."""
    return TrainConfig.load(NEURAL_RECIPES["lcnn"]).data.root_path


def durations(root: Path) -> dict[str, float]:
    """Seconds per utterance, from the corpus' metadata (digits vs sentences)."""
    out: dict[str, float] = {}
    for split in ("train", "dev"):
        path = root / f"metadata.{split}.tsv"
        if path.is_file():
            with path.open() as f:
                for row in csv.DictReader(f, delimiter="\t"):
                    out[row["utt_id"]] = float(row["duration_s"])
    return out


def gmm_folds(train: list[Trial], dev: list[Trial], root: Path, systems: list[str],
              mode: str, cache: Path, extra: list[Trial] | None = None,
              extra_dir: Path | None = None, **options: Any) -> list[FoldScores]:
    """Per fold: the classic baseline refitted without the held-out engine (whole training
    utterances, first-window scoring, as ``models/tasks/gmm.py``). Cached per mode.
    ``options`` are further :class:`LFCCGMMConfig` fields (a variant of the recipe)."""
    from models.architectures.lfcc_gmm import LFCCGMM, LFCCGMMConfig
    from models.data.asvspoof import audio_path
    from models.data.audio import load_audio, repeat_pad

    if cache.is_file():  # a cache of other engines' folds (a partial run) is refitted
        cached = [FoldScores.from_json(f) for f in json.loads(cache.read_text())]
        if [f.held_out for f in cached] == list(systems):
            return cached
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


# --------------------------------------------------------------------------- folds by name


def neural_folds(recipe: str, systems: list[str], runs: Path = RUNS) -> list[FoldScores]:
    """A recipe's fold scores: from ``runs`` (this machine's fold trainings) where present,
    else the committed ones (:func:`committed_folds`), so a clean checkout reports them."""
    out = []
    for system in systems:
        for path in (runs / recipe / system / "scores.json",
                     committed_folds(recipe) / f"{system}.json"):
            if path.is_file():
                out.append(FoldScores.from_json(json.loads(path.read_text())))
                break
    return out


def recipe_folds(recipe: str, systems: list[str], runs: Path = RUNS,
                 mode: str = "reduced") -> list[FoldScores]:
    """LOSO folds of a recipe by name: a neural recipe's fold runs (or committed scores),
    the GMM's folds (fitted on demand), or a fusion of recipes (module docstring)."""
    if "+" in recipe or "=" in recipe:
        names, weights = parse_fusion(recipe)
        parts = {name: recipe_folds(name, systems, runs, mode) for name in names}
        if weights is None:
            return fuse(parts)
        return fuse_bona_normal(parts, dict(zip(names, weights, strict=True)))
    if recipe in NEURAL_RECIPES:
        return neural_folds(recipe, systems, runs)
    if recipe in GMM_RECIPES:
        # Cheap (about two minutes on one core), so `ship` and `fuse` fit the folds
        # themselves instead of requiring a benchmark run, which rewrites the results.
        options, name = GMM_RECIPES[recipe]
        root = corpus_root()
        return gmm_folds(ASVspoofSplit(root, "train").trials(), ASVspoofSplit(root, "dev").trials(),
                         root, systems, mode, FEATURES / name, **options)
    caches = {"lfcc-gmm": f"gmm-loso-{mode}.json", "lfcc-gmm-voc": f"gmm-voc-loso-{mode}.json"}
    if recipe not in caches:
        known = sorted([*NEURAL_RECIPES, *GMM_RECIPES, *caches])
        raise ValueError(f"unknown recipe {recipe!r}: one of {', '.join(known)}, or parts "
                         "joined by + (a=0.6+b=0.4 for a bona-normal fusion)")
    cache = FEATURES / caches[recipe]
    if not cache.is_file():
        return []
    return [FoldScores.from_json(f) for f in json.loads(cache.read_text())]
