"""ASVspoof countermeasure metrics, computed the way the official evaluation scripts do.

Reported numbers are only comparable with published ASVspoof results if every detail of the
official ``eval_metrics.py`` is kept, including the ones that look arbitrary: the stable sort
that puts a bona fide trial before a spoof trial with the same score (a tie therefore counts
against the countermeasure), the extra threshold 0.001 below the lowest score, the EER taken
as the mean of FRR and FAR at the first index minimising ``|FRR - FAR|`` (it need not be a
crossing point), and an ASV operating point fixed at the ASV EER threshold.

Two t-DCF formulations exist. ASVspoof 2019 reported the original one (Kinnunen et al.,
Odyssey 2018): ``C1 * Pmiss_cm + C2 * Pfa_cm`` over ``min(C1, C2)``; it leaves out the cost
of the ASV system alone, so a perfect CM scores 0. ASVspoof 2021 revised it (Kinnunen et al.,
TASLP 2020): ``C0 + C1 * Pmiss_cm + C2 * Pfa_cm`` over ``C0 + min(C1, C2)``, so a perfect CM
scores the ASV-only floor ``C0 / (C0 + min(C1, C2))``. The cost-model type picks the formula.

Score convention: higher means more likely bona fide (resp. target speaker for ASV).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "ASVSPOOF2019_COST_MODEL",
    "ASVSPOOF2021_COST_MODEL",
    "EER",
    "AsvErrorRates",
    "AsvScores",
    "CostModel2019",
    "CostModel2021",
    "asv_error_rates",
    "compute_det_curve",
    "compute_eer",
    "compute_tdcf_curve",
    "min_tdcf",
    "read_asv_scores",
    "split_by_label",
]

FloatArray = NDArray[np.float64]

# Offset of the extra lowest threshold, as in the official script (an absolute, not relative, gap).
_FIRST_THRESHOLD_GAP = 0.001


class EER(NamedTuple):
    """Equal error rate (a fraction, not a percentage) and the threshold where it was read."""

    eer: float
    threshold: float


class AsvErrorRates(NamedTuple):
    """ASV error rates at a fixed threshold; the t-DCF treats them as constants."""

    p_fa: float
    """Non-target trials accepted."""
    p_miss: float
    """Target trials rejected."""
    p_miss_spoof: float
    """Spoof trials rejected (so ``1 - p_miss_spoof`` of spoofs would pass a CM-less ASV)."""


class AsvScores(NamedTuple):
    """ASV scores split by trial key, as read from an ASVspoof ASV score file."""

    target: FloatArray
    nontarget: FloatArray
    spoof: FloatArray


@dataclass(frozen=True)
class _Priors:
    """The class priors both t-DCF formulations start with (checked once, here)."""

    p_spoof: float
    p_tar: float
    p_non: float

    def __post_init__(self) -> None:
        p_spoof, p_tar, p_non = self.p_spoof, self.p_tar, self.p_non
        if min(p_spoof, p_tar, p_non) < 0 or abs(p_spoof + p_tar + p_non - 1) > 1e-10:
            raise ValueError(
                "t-DCF priors must be non-negative and sum to one, got "
                f"p_spoof={p_spoof}, p_tar={p_tar}, p_non={p_non} (sum {p_spoof + p_tar + p_non})"
            )


@dataclass(frozen=True)
class CostModel2019(_Priors):
    """t-DCF parameters of the original (ASVspoof 2019) formulation.

    The official 2019 dict also carries ``Cmiss`` and ``Cfa``; that formula never reads them,
    so they are left out here.
    """

    c_miss_asv: float
    c_fa_asv: float
    c_miss_cm: float
    c_fa_cm: float


@dataclass(frozen=True)
class CostModel2021(_Priors):
    """t-DCF parameters of the revised (ASVspoof 2021) formulation."""

    c_miss: float
    c_fa: float
    c_fa_spoof: float


_ASVSPOOF_PRIORS = {"p_spoof": 0.05, "p_tar": (1 - 0.05) * 0.99, "p_non": (1 - 0.05) * 0.01}
ASVSPOOF2019_COST_MODEL = CostModel2019(
    **_ASVSPOOF_PRIORS, c_miss_asv=1, c_fa_asv=10, c_miss_cm=1, c_fa_cm=10)
ASVSPOOF2021_COST_MODEL = CostModel2021(**_ASVSPOOF_PRIORS, c_miss=1, c_fa=10, c_fa_spoof=10)


def _scores(values: ArrayLike, name: str) -> FloatArray:
    """Validate one score vector; the official script would silently return NaN rates."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} scores must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} scores are empty: the error rate would divide by zero")
    n_bad = int(np.count_nonzero(~np.isfinite(arr)))
    if n_bad:
        raise ValueError(f"{name} scores contain {n_bad} NaN/inf value(s) out of {arr.size}")
    return arr


def split_by_label(
    scores: ArrayLike, labels: ArrayLike | Sequence[str]
) -> tuple[FloatArray, FloatArray]:
    """Split one score vector into ``(bonafide, spoof)``.

    ``labels`` holds 1/True for bona fide and 0/False for spoof, or the protocol strings
    ``"bonafide"``/``"spoof"``, so scores and protocol columns can be passed as they are.
    """
    score_arr = np.asarray(scores, dtype=np.float64)
    label_arr = np.asarray(labels)
    if score_arr.ndim != 1 or label_arr.ndim != 1:
        raise ValueError(
            f"scores and labels must be 1-D, got shapes {score_arr.shape} and {label_arr.shape}"
        )
    if score_arr.shape != label_arr.shape:
        raise ValueError(f"mismatched lengths: {score_arr.size} scores but {label_arr.size} labels")
    if label_arr.dtype.kind in "USO":
        text = label_arr.astype(str)
        unknown = sorted(set(np.unique(text)) - {"bonafide", "spoof"})
        if unknown:
            raise ValueError(f"labels must be 'bonafide' or 'spoof', got {unknown[:5]}")
        is_bona = text == "bonafide"
    else:
        unknown_num = sorted(set(np.unique(label_arr).tolist()) - {0, 1})
        if unknown_num:
            raise ValueError(f"labels must be 0 (spoof) or 1 (bona fide), got {unknown_num[:5]}")
        is_bona = label_arr.astype(bool)
    return score_arr[is_bona], score_arr[~is_bona]


def compute_det_curve(
    bonafide_scores: ArrayLike, spoof_scores: ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Return ``(frr, far, thresholds)``, each of length ``N + 1`` for ``N`` trials.

    Entry ``k`` rejects the ``k`` lowest-scoring trials in stable-sorted order. Entry 0 rejects
    nothing (FRR 0, FAR 1) at a threshold just below the lowest score.
    """
    bona = _scores(bonafide_scores, "bona fide")
    spoof = _scores(spoof_scores, "spoof")
    n_scores = bona.size + spoof.size
    all_scores = np.concatenate((bona, spoof))
    labels = np.concatenate((np.ones(bona.size), np.zeros(spoof.size)))
    # Stable: on a tie the bona fide trial (concatenated first) is rejected first.
    order = np.argsort(all_scores, kind="mergesort")
    labels = labels[order]
    bona_rejected = np.cumsum(labels)
    spoof_accepted = spoof.size - (np.arange(1, n_scores + 1) - bona_rejected)
    frr = np.concatenate((np.atleast_1d(0), bona_rejected / bona.size))
    far = np.concatenate((np.atleast_1d(1), spoof_accepted / spoof.size))
    thresholds = np.concatenate(
        (np.atleast_1d(all_scores[order[0]] - _FIRST_THRESHOLD_GAP), all_scores[order])
    )
    return frr, far, thresholds


def compute_eer(bonafide_scores: ArrayLike, spoof_scores: ArrayLike) -> EER:
    """EER as a fraction, with the DET threshold it was read at (scores > threshold pass)."""
    frr, far, thresholds = compute_det_curve(bonafide_scores, spoof_scores)
    min_index = int(np.argmin(np.abs(frr - far)))
    eer = float(np.mean((frr[min_index], far[min_index])))
    return EER(eer=eer, threshold=float(thresholds[min_index]))


def asv_error_rates(
    target: ArrayLike, nontarget: ArrayLike, spoof: ArrayLike, threshold: float
) -> AsvErrorRates:
    """ASV rates at ``threshold``; a score equal to the threshold is accepted, as upstream."""
    tar = _scores(target, "ASV target")
    non = _scores(nontarget, "ASV nontarget")
    spf = _scores(spoof, "ASV spoof")
    return AsvErrorRates(
        p_fa=float(np.sum(non >= threshold) / non.size),
        p_miss=float(np.sum(tar < threshold) / tar.size),
        p_miss_spoof=float(np.sum(spf < threshold) / spf.size),
    )


def compute_tdcf_curve(
    bonafide_cm: ArrayLike,
    spoof_cm: ArrayLike,
    asv: AsvErrorRates,
    cost_model: CostModel2019 | CostModel2021 = ASVSPOOF2019_COST_MODEL,
) -> tuple[FloatArray, FloatArray]:
    """Normalised t-DCF at every CM threshold of the DET curve: ``(tdcf_norm, thresholds)``."""
    bona = _scores(bonafide_cm, "bona fide CM")
    spoof = _scores(spoof_cm, "spoof CM")
    if np.unique(np.concatenate((bona, spoof))).size < 3:
        raise ValueError("CM scores must be soft scores, not binary decisions (< 3 unique values)")
    p_miss_cm, p_fa_cm, thresholds = compute_det_curve(bona, spoof)
    if isinstance(cost_model, CostModel2019):
        c0 = 0.0
        c1 = (
            cost_model.p_tar * (cost_model.c_miss_cm - cost_model.c_miss_asv * asv.p_miss)
            - cost_model.p_non * cost_model.c_fa_asv * asv.p_fa
        )
        c2 = cost_model.c_fa_cm * cost_model.p_spoof * (1 - asv.p_miss_spoof)
    else:
        c0 = (
            cost_model.p_tar * cost_model.c_miss * asv.p_miss
            + cost_model.p_non * cost_model.c_fa * asv.p_fa
        )
        c1 = cost_model.p_tar * cost_model.c_miss - c0
        c2 = cost_model.p_spoof * cost_model.c_fa_spoof * (1 - asv.p_miss_spoof)
    if c0 < 0 or c1 < 0 or c2 < 0:
        raise ValueError(
            f"negative t-DCF weights (C0={c0}, C1={c1}, C2={c2}): check the ASV error rates"
        )
    default_cost = c0 + min(c1, c2)
    if default_cost == 0:
        raise ValueError(
            f"t-DCF is undefined: its normaliser is 0 (C0={c0}, C1={c1}, C2={c2}); "
            "the ASV system alone already rejects every spoof or misses every target"
        )
    tdcf = c0 + c1 * p_miss_cm + c2 * p_fa_cm
    return tdcf / default_cost, thresholds


def min_tdcf(
    bonafide_cm: ArrayLike,
    spoof_cm: ArrayLike,
    asv_target: ArrayLike,
    asv_nontarget: ArrayLike,
    asv_spoof: ArrayLike,
    cost_model: CostModel2019 | CostModel2021 = ASVSPOOF2019_COST_MODEL,
) -> float:
    """Normalised minimum t-DCF, with the ASV operating point at its own EER threshold."""
    asv_threshold = compute_eer(asv_target, asv_nontarget).threshold
    rates = asv_error_rates(asv_target, asv_nontarget, asv_spoof, asv_threshold)
    curve, _ = compute_tdcf_curve(bonafide_cm, spoof_cm, rates, cost_model)
    return float(np.min(curve))


def read_asv_scores(path: str | Path) -> AsvScores:
    """Read an ASVspoof 2019 ASV score file (``speaker key score`` per line).

    ``key`` is ``target``, ``nontarget`` or ``spoof``, as in
    ``ASVspoof2019.LA.asv.dev.gi.trl.scores.txt``. Blank lines are skipped.
    """
    buckets: dict[str, list[float]] = {"target": [], "nontarget": [], "spoof": []}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3:
                raise ValueError(
                    f"{path}:{line_no}: expected 'speaker key score', got {len(fields)} fields"
                )
            _, key, raw = fields
            if key not in buckets:
                raise ValueError(
                    f"{path}:{line_no}: key must be target, nontarget or spoof, got {key!r}"
                )
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{path}:{line_no}: score {raw!r} is not a number") from None
            if not math.isfinite(value):
                raise ValueError(f"{path}:{line_no}: score {raw!r} is not finite")
            buckets[key].append(value)
    for key, values in buckets.items():
        if not values:
            raise ValueError(f"{path}: no {key!r} trials; the t-DCF needs all three keys")
    return AsvScores(
        target=np.asarray(buckets["target"], dtype=np.float64),
        nontarget=np.asarray(buckets["nontarget"], dtype=np.float64),
        spoof=np.asarray(buckets["spoof"], dtype=np.float64),
    )
