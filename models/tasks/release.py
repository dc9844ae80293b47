"""The release steps of a shipped model: ``python -m models ship``, ``fuse`` and ``unfuse``.

Why commands of the package and not of the benchmark: they write the checkpoints the service
loads (``make train`` runs them to build the default), so they are part of what the models
promise and are tested as such (``tests/test_release.py``).

- ``ship``: re-calibrate a trained checkpoint on its recipe's leave-one-system-out (LOSO)
  scores (:func:`models.tasks.loso.loso_calibration`) and record the LOSO estimate, the dev
  EER and the bona fide false alarms at the service threshold in its card.
- ``fuse``: build a fused checkpoint from part checkpoints (:mod:`models.architectures.fusion`):
  bona-normal with the given weights (each part ranked against its own dev bona fide scores),
  or logistic with weights fitted on the parts' LOSO scores. Calibrate it afterwards with
  ``ship --recipe a=0.6+b=0.4`` (or ``a+b``).
- ``unfuse``: write the parts a fused checkpoint embeds back out as checkpoints of their own,
  with their cards. The package ships only the fused default; its parts (each LCNN, the fine
  LFCC+GMM) are regenerated from it this way instead of shipping twice.

Every step reads the developer corpus (``../shared/corpus``) and the recipes' folds
(:mod:`models.tasks.recipes`), so it runs from a checkout, not from an installed wheel.

Training writes into the shipped folder (``models/checkpoints/``) only the file of a named
model, from a config in ``models/configs/`` (:func:`check_output`): a candidate recipe
(``experiments/configs/``) cannot overwrite or add to what the package ships.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import ModelError
from models.tasks.config import REPO_ROOT
from models.tasks.loso import BONAFIDE_PRIOR
from models.tasks.options import THREADS, command
from models.tasks.recipes import RUNS, SHIPPED_CONFIGS

#: where ``make train`` keeps the default's parts before fusing them (regenerable scratch)
RELEASE_PARTS = REPO_ROOT / "runs" / "release"


class ReleaseError(ModelError, ValueError):
    """A release step cannot run on these inputs (missing folds, mismatched weights, ...)."""


def check_output(config_path: str | Path, output: str | Path) -> None:
    """Refuse a training output inside the shipped checkpoint folder unless it is a named
    model's file, trained from the shipped config that names that very file as its output:
    experiments (and overrides) write under ``runs/``."""
    from models.inference import CHECKPOINT_DIR, NAMED_MODELS
    from models.tasks.config import TrainConfig, repo_path

    out = Path(output).resolve()
    if CHECKPOINT_DIR.resolve() not in out.parents:
        return
    shipped = {p.resolve() for p in NAMED_MODELS.values()}
    source = Path(config_path).resolve()
    declared = TrainConfig.load(source).output if source.is_file() else None
    if (out not in shipped or source.parent != SHIPPED_CONFIGS.resolve()
            or declared is None or repo_path(declared) != out):
        raise ReleaseError(
            f"{output}: training writes into models/checkpoints/ only a shipped model's file "
            f"({', '.join(sorted({p.name for p in NAMED_MODELS.values()}))}) from a config in "
            "models/configs/; give --output under runs/ (experiments/README.md)")


def _dev(root: Path) -> Any:
    from models.data.asvspoof import ASVspoofSplit

    return ASVspoofSplit(root, "dev")


def _systems(root: Path) -> list[str]:
    from models.data.asvspoof import ASVspoofSplit
    from models.tasks.loso import spoof_systems

    return spoof_systems(ASVspoofSplit(root, "train").trials())


def ship(checkpoint: str | Path, recipe: str, *, out: str | Path | None = None,
         prior: float = BONAFIDE_PRIOR, threshold: float = 0.5, fold_scale: str = "",
         runs: Path = RUNS, mode: str = "reduced") -> dict[str, Any]:
    """Re-calibrate ``checkpoint`` on ``recipe``'s LOSO scores and write it (over itself, or
    to ``out``) with the LOSO estimate and false alarms in its card; returns the card's
    ``bonafide_false_alarm`` with the calibration."""
    from models.checkpoint import is_callshield, read_checkpoint, save_checkpoint
    from models.inference import detector_from_state
    from models.tasks.antispoofing import eer_by_system
    from models.tasks.loso import SHORT_SECONDS, loso_calibration, report, score_trials
    from models.tasks.recipes import corpus_root, durations, recipe_folds

    root = corpus_root()
    systems = _systems(root)
    folds = recipe_folds(recipe, systems, runs, mode)
    if len(folds) != len(systems):
        raise ReleaseError(f"recipe {recipe!r} has {len(folds)} of {len(systems)} LOSO folds "
                           "(train them: python -m bench.generalization train-folds)")
    state = read_checkpoint(checkpoint)
    if not is_callshield(state):
        raise ReleaseError(f"{checkpoint}: not a callshield checkpoint")
    detector = detector_from_state(state)
    dev = _dev(root)
    trials = dev.trials()
    dev_scores = np.asarray(score_trials(detector, trials, dev.audio_dir))
    labels = np.array([t.label for t in trials])
    dev_eer = eer_by_system(dev_scores, labels, [t.system for t in trials])
    bona = [t for t in trials if t.is_bonafide]
    bona_scores = dev_scores[labels == 1]
    calibration = loso_calibration(folds, bona_scores, prior)
    flagged = calibration.spoof_probability(bona_scores) >= threshold
    dur = durations(root)
    short = np.array([dur.get(t.utt_id, 99.0) < SHORT_SECONDS for t in bona])
    loso = report(recipe, folds, dur, threshold, prior=prior)
    state["calibration"] = vars(calibration)
    alarms = {"threshold": threshold, "bonafide_prior": prior,
              "digits": float(flagged[short].mean()),
              "sentences": float(flagged[~short].mean()),
              "digits_trials": int(short.sum()), "sentences_trials": int((~short).sum())}
    state["card"] = {**state.get("card", {}), "dev_eer": dev_eer, "calibration_source": (
        "leave-one-system-out scores of the recipe's folds, anchored on this model's dev "
        "bona fide scores (python -m models ship)"),
        "loso": {"per_engine_eer": loso.per_engine, "pooled_eer": loso.pooled_eer,
                 "fold_scale": fold_scale, "spoof_miss_at_threshold": loso.misses},
        "bonafide_false_alarm": alarms}
    save_checkpoint(out or checkpoint, **{k: v for k, v in state.items() if k != "format"})
    return {"calibration": vars(calibration), **alarms}


def fuse(parts: list[tuple[str | Path, str]], out: str | Path, *,
         weights: list[float] | None = None, name: str = "fusion", version: str = "1",
         runs: Path = RUNS, mode: str = "reduced") -> dict[str, Any]:
    """Write a fused checkpoint of ``parts`` ((checkpoint, recipe) pairs) to ``out``.

    With ``weights`` (one per part, in order): a bona-normal fusion, each part ranked against
    its own dev bona fide scores, as the fold scores were against theirs. Without: a logistic
    fusion, weights fitted on the recipes' LOSO scores, each part anchored on its own dev bona
    fide scores (median, IQR). Returns the weights."""
    from models.architectures.fusion import fusion_state
    from models.checkpoint import is_callshield, read_checkpoint, save_checkpoint
    from models.inference import detector_from_state
    from models.tasks.loso import robust_scale, score_trials
    from models.tasks.recipes import corpus_root, fusion_weights, recipe_folds

    recipes = [recipe for _, recipe in parts]
    if len(set(recipes)) != len(recipes):
        raise ReleaseError(f"each part needs its own recipe name: {recipes}")
    if weights and len(weights) != len(parts):
        raise ReleaseError(f"one weight per part: {len(weights)} weights, {len(parts)} parts")
    root = corpus_root()
    if weights:  # bona-normal: fixed weights, in the order of the parts
        fitted: dict[str, Any] = {"parts": recipes, "weight": list(weights), "bias": 0.0,
                                  "combine": "bona-normal"}
    else:
        systems = _systems(root)
        folds = {r: recipe_folds(r, systems, runs, mode) for r in recipes}
        if any(len(f) != len(systems) for f in folds.values()):
            raise ReleaseError("a logistic fusion needs every part's LOSO folds")
        fitted = fusion_weights(folds)
    order = fitted["parts"]  # sorted recipe names (logistic), as given (bona-normal)
    states, med, iqr, reference = {}, {}, {}, {}
    dev = _dev(root)
    bona = [t for t in dev.trials() if t.is_bonafide]
    for path, recipe in parts:
        state = read_checkpoint(path)
        if not is_callshield(state):
            raise ReleaseError(f"{path}: not a callshield checkpoint")
        states[recipe] = state
        scores = np.asarray(score_trials(detector_from_state(state), bona, dev.audio_dir))
        med[recipe], iqr[recipe] = robust_scale(scores)
        reference[recipe] = np.sort(scores).tolist()
    first = states[order[0]]
    combination = {"mean": [med[r] for r in order], "scale": [iqr[r] for r in order],
                   "weight": fitted["weight"], "bias": fitted["bias"],
                   "combine": fitted.get("combine", "linear")}
    if combination["combine"] == "bona-normal":
        combination["reference"] = [reference[r] for r in order]
    save_checkpoint(
        out, architecture="fusion", name=name, version=str(version),
        sample_rate=first["sample_rate"], window_seconds=first["window_seconds"],
        model_config={"parts": order},
        state_dict=fusion_state([states[r] for r in order], combination),
        card={"fusion": {"parts": {r: states[r]["name"] for r in order},
                         "weight": fitted["weight"], "bias": fitted["bias"],
                         "combine": combination["combine"]},
              "config": {"name": name, "architecture": "fusion", "parts": order}})
    return fitted


def part_file(recipe: str) -> str:
    """A part's file name from its recipe name (``lcnn-s1`` -> ``lcnn_s1.pt``), the names the
    default's training configs write under ``runs/release/``."""
    return recipe.replace("-", "_") + ".pt"


def unfuse(model: str | Path, out_dir: str | Path) -> list[Path]:
    """Write each part embedded in a fused checkpoint (a name or a path) to ``out_dir`` as
    ``<recipe>.pt`` with its ``<RECIPE>_CARD.md``; returns the checkpoint paths."""
    from models.card import render_card
    from models.checkpoint import read_checkpoint, save_checkpoint
    from models.inference import NAMED_MODELS, ModelNotFoundError, detector_from_state

    path = NAMED_MODELS.get(str(model), Path(model))
    if not path.is_file():
        raise ModelNotFoundError(f"model {str(model)!r} not found at {path}")
    state = read_checkpoint(path)
    if state.get("architecture") != "fusion":
        raise ReleaseError(f"{model}: not a fused checkpoint (architecture "
                           f"{state.get('architecture')!r})")
    out = Path(out_dir)
    written = []
    recipes = state["model_config"]["parts"]
    for recipe, part in zip(recipes, state["state_dict"]["parts"], strict=True):
        target = out / part_file(recipe)
        save_checkpoint(target, **{k: v for k, v in part.items() if k != "format"})
        card = out / f"{target.stem.upper()}_CARD.md"
        card.write_text(render_card(detector_from_state(part)))
        written.append(target)
    return written


# --------------------------------------------------------------------------- CLI


def _ship(args: argparse.Namespace) -> int:
    """calibrate a checkpoint on its recipe's LOSO scores (a release step)

    Re-calibrate a trained checkpoint on its recipe's leave-one-system-out scores and record
    the LOSO estimate and the false alarms at the service threshold in its card
    (models/tasks/release.py). Needs the corpus and the recipe's folds."""
    import torch

    torch.set_num_threads(args.threads)
    result = ship(args.checkpoint, args.recipe, out=args.out, prior=args.prior,
                  threshold=args.threshold, fold_scale=args.fold_scale,
                  runs=Path(args.loso_dir), mode=args.mode)
    print(json.dumps(result, indent=2))
    return 0


def _fuse(args: argparse.Namespace) -> int:
    """build a fused checkpoint from part checkpoints (a release step)

    Score every part on the dev bona fide and write the fused checkpoint: bona-normal with
    --weight (one per --part, in order), else logistic with weights fitted on the parts' LOSO
    scores. Calibrate it afterwards with `ship`."""
    import torch

    torch.set_num_threads(args.threads)
    parts = []
    for item in args.part:
        path, sep, recipe = item.rpartition("=")
        if not sep or not path or not recipe:
            raise ReleaseError(f"--part {item!r}: give CHECKPOINT=RECIPE")
        parts.append((path, recipe))
    fitted = fuse(parts, args.out, weights=args.weight, name=args.name, version=args.version,
                  runs=Path(args.loso_dir), mode=args.mode)
    print(json.dumps(fitted, indent=2))
    return 0


def _unfuse(args: argparse.Namespace) -> int:
    """write the parts a fused checkpoint embeds, with their cards"""
    for path in unfuse(args.model, args.out):
        print(path)
    return 0


#: where ``ship`` and ``fuse`` read the parts' leave-one-system-out folds
LOSO_FOLDS = argparse.ArgumentParser(add_help=False)
LOSO_FOLDS.add_argument("--mode", choices=["reduced", "full"], default="reduced",
                        help="which GMM LOSO folds to read")
LOSO_FOLDS.add_argument("--loso-dir", default=str(RUNS),
                        help="fold runs read before the committed")


def add_parsers(sub: Any) -> None:
    """The release subcommands of ``python -m models`` (:func:`models.cli.build_parser`)."""
    p = command(sub, "ship", _ship, parents=[LOSO_FOLDS, THREADS])
    p.add_argument("checkpoint")
    p.add_argument("--recipe", required=True,
                   help="a recipe (models/tasks/recipes.py), or parts joined by + for a fused "
                        "checkpoint (a=0.6+b=0.4: bona-normal with those weights)")
    p.add_argument("--out", help="write here instead of over the checkpoint")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--prior", type=float, default=BONAFIDE_PRIOR,
                   help="bona fide prior of the calibration")
    p.add_argument("--fold-scale", default="", help="how the folds were trained (for the card)")

    p = command(sub, "fuse", _fuse, parents=[LOSO_FOLDS, THREADS])
    p.add_argument("--part", action="append", required=True, metavar="CHECKPOINT=RECIPE")
    p.add_argument("--weight", action="append", type=float,
                   help="one per --part: a bona-normal fusion with these weights")
    p.add_argument("--out", required=True)
    p.add_argument("--name", default="fusion")
    p.add_argument("--version", default="1")

    p = command(  # the description names the parts' folder, which a docstring cannot
        sub, "unfuse", _unfuse,
        description="The package ships the fused default only; this regenerates its parts "
        f"(default folder {RELEASE_PARTS.relative_to(REPO_ROOT)}/, where `make train` keeps "
        "them) as checkpoints loadable by path, each with its card.")
    p.add_argument("model", nargs="?", default="default", help="a fused model's name or path")
    p.add_argument("--out", default=str(RELEASE_PARTS))
