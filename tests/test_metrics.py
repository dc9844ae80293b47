"""Official-ASVspoof metric semantics, pinned by hand-computed cases and a brute-force twin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.metrics import (
    ASVSPOOF2019_COST_MODEL,
    ASVSPOOF2021_COST_MODEL,
    AsvErrorRates,
    CostModel2019,
    asv_error_rates,
    compute_det_curve,
    compute_eer,
    compute_tdcf_curve,
    min_tdcf,
    read_asv_scores,
    split_by_label,
)


def _brute_force_det(bona: np.ndarray, spoof: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The official DET curve, one trial at a time: walk the trials in ascending score order
    (bona fide before spoof on a tie, which is what the stable sort of the concatenation
    gives) and reject one more trial at each step."""
    trials = [(float(s), 1) for s in bona] + [(float(s), 0) for s in spoof]
    trials.sort(key=lambda t: t[0])  # Python's sort is stable too
    frr, far = [0.0], [1.0]
    rejected_bona = rejected_spoof = 0
    for _, is_bona in trials:
        rejected_bona += is_bona
        rejected_spoof += 1 - is_bona
        frr.append(rejected_bona / len(bona))
        far.append((len(spoof) - rejected_spoof) / len(spoof))
    return np.array(frr), np.array(far)


def _brute_force_eer(bona: np.ndarray, spoof: np.ndarray) -> float:
    frr, far = _brute_force_det(bona, spoof)
    best = 0
    for k in range(len(frr)):
        if abs(frr[k] - far[k]) < abs(frr[best] - far[best]):
            best = k
    return (frr[best] + far[best]) / 2


def test_perfect_separation_gives_zero() -> None:
    eer, threshold = compute_eer([2.0, 3.0, 4.0], [-1.0, 0.0, 1.0])
    assert eer == 0.0
    assert threshold == 1.0  # the highest spoof score: everything at or below it is rejected


def test_fully_inverted_gives_one() -> None:
    assert compute_eer([-1.0, 0.0, 1.0], [2.0, 3.0, 4.0]).eer == 1.0


def test_det_curve_shape_and_first_threshold() -> None:
    frr, far, thr = compute_det_curve([1.0, 2.0, 3.0], [0.0, 1.5])
    assert frr.shape == far.shape == thr.shape == (6,)
    assert (frr[0], far[0], frr[-1], far[-1]) == (0.0, 1.0, 1.0, 0.0)
    assert thr[0] == pytest.approx(-0.001)  # lowest score minus 0.001, as upstream
    np.testing.assert_array_equal(thr[1:], [0.0, 1.0, 1.5, 2.0, 3.0])


def test_eer_without_crossing_is_mean_of_frr_and_far() -> None:
    # Sorted: 0(s) 1(b) 1.5(s) 2(b) 3(b)
    # frr = 0, 0, 1/3, 1/3, 2/3, 1 ; far = 1, 1/2, 1/2, 0, 0, 0
    # |frr - far| is smallest (1/6) at index 2 (threshold 1): EER = (1/3 + 1/2) / 2 = 5/12.
    eer, threshold = compute_eer([1.0, 2.0, 3.0], [0.0, 1.5])
    assert eer == pytest.approx(5 / 12)
    assert threshold == 1.0


def test_tie_counts_against_the_countermeasure() -> None:
    # bona fide [2, 3, 4], spoof [0, 1, 2]: one bona fide and one spoof share the score 2.
    # The stable sort of concat(bona, spoof) gives 0(s) 1(s) 2(b) 2(s) 3(b) 4(b), i.e. the
    # tied bona fide is rejected before the tied spoof:
    #   frr = 0, 0, 0, 1/3, 1/3, 2/3, 1 ; far = 1, 2/3, 1/3, 1/3, 0, 0, 0
    # -> |frr - far| = 0 at index 3 (threshold 2): EER = 1/3. Had the tie been broken the
    # other way the classes would look perfectly separated (EER 0).
    eer, threshold = compute_eer([2.0, 3.0, 4.0], [0.0, 1.0, 2.0])
    assert eer == pytest.approx(1 / 3)
    assert threshold == 2.0


def test_symmetry_under_class_swap_and_negation() -> None:
    # Equal class sizes make frr - far move by exactly 1/N per trial, so its zero is unique
    # and the first-argmin rule cannot pick different points in the two directions.
    rng = np.random.default_rng(0)
    bona = rng.normal(1.0, 1.0, 300)
    spoof = rng.normal(0.0, 1.0, 300)
    assert compute_eer(bona, spoof).eer == pytest.approx(compute_eer(-spoof, -bona).eer)


def test_invariant_to_monotone_transform() -> None:
    rng = np.random.default_rng(1)
    bona, spoof = rng.normal(1.0, 1.0, 200), rng.normal(0.0, 1.0, 500)
    assert compute_eer(bona, spoof).eer == compute_eer(np.exp(bona), np.exp(spoof)).eer


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("discrete", [False, True])
def test_matches_brute_force(seed: int, discrete: bool) -> None:
    rng = np.random.default_rng(seed)
    n_bona, n_spoof = rng.integers(1, 60, size=2)
    bona = rng.normal(0.7, 1.0, n_bona)
    spoof = rng.normal(0.0, 1.0, n_spoof)
    if discrete:  # many ties, within and across classes
        bona, spoof = np.round(bona * 2), np.round(spoof * 2)
    frr, far, _ = compute_det_curve(bona, spoof)
    bf_frr, bf_far = _brute_force_det(bona, spoof)
    np.testing.assert_allclose(frr, bf_frr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(far, bf_far, rtol=0, atol=1e-12)
    assert compute_eer(bona, spoof).eer == pytest.approx(_brute_force_eer(bona, spoof), abs=1e-12)


def test_random_scores_are_near_half() -> None:
    rng = np.random.default_rng(2)
    assert compute_eer(rng.normal(size=4000), rng.normal(size=4000)).eer == pytest.approx(
        0.5, abs=0.03
    )


@pytest.mark.parametrize(
    ("bona", "spoof", "match"),
    [
        ([], [0.0], "bona fide scores are empty"),
        ([0.0], [], "spoof scores are empty"),
        ([0.0, np.nan], [0.0], "NaN/inf"),
        ([0.0], [np.inf], "NaN/inf"),
        ([[0.0, 1.0]], [0.0], "1-D"),
    ],
)
def test_degenerate_inputs_raise(bona: list, spoof: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_eer(bona, spoof)
    with pytest.raises(ValueError, match=match):
        compute_det_curve(bona, spoof)


def test_split_by_label() -> None:
    bona, spoof = split_by_label([0.1, 0.2, 0.3], ["bonafide", "spoof", "bonafide"])
    np.testing.assert_array_equal(bona, [0.1, 0.3])
    np.testing.assert_array_equal(spoof, [0.2])
    bona, spoof = split_by_label([0.1, 0.2, 0.3], [0, 1, 1])
    np.testing.assert_array_equal(bona, [0.2, 0.3])
    with pytest.raises(ValueError, match="mismatched lengths: 3 scores but 2 labels"):
        split_by_label([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="'bonafide' or 'spoof'"):
        split_by_label([0.1], ["genuine"])
    with pytest.raises(ValueError, match="0 \\(spoof\\) or 1"):
        split_by_label([0.1], [2])


# --- t-DCF ---------------------------------------------------------------------------------


def _asv(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(3, 1, 2000), rng.normal(0, 1, 2000), rng.normal(2, 1, 2000)


def _tdcf_2021_floor(tar: np.ndarray, non: np.ndarray, spf: np.ndarray) -> float:
    """C0 / (C0 + min(C1, C2)) written out from the 2021 evaluation plan."""
    cm = ASVSPOOF2021_COST_MODEL
    rates = asv_error_rates(tar, non, spf, compute_eer(tar, non).threshold)
    c0 = cm.p_tar * cm.c_miss * rates.p_miss + cm.p_non * cm.c_fa * rates.p_fa
    c1 = cm.p_tar * cm.c_miss - c0
    c2 = cm.p_spoof * cm.c_fa_spoof * (1 - rates.p_miss_spoof)
    return c0 / (c0 + min(c1, c2))


def test_perfect_cm_reaches_the_asv_only_floor() -> None:
    tar, non, spf = _asv()
    rng = np.random.default_rng(3)
    bona_cm, spoof_cm = rng.uniform(5, 6, 500), rng.uniform(-6, -5, 500)
    # 2019 formulation leaves the ASV-only cost out: a perfect CM costs nothing.
    assert min_tdcf(bona_cm, spoof_cm, tar, non, spf) == 0.0
    floor = _tdcf_2021_floor(tar, non, spf)
    assert 0 < floor < 1
    got = min_tdcf(bona_cm, spoof_cm, tar, non, spf, cost_model=ASVSPOOF2021_COST_MODEL)
    assert got == pytest.approx(floor)


@pytest.mark.parametrize("cost_model", [ASVSPOOF2019_COST_MODEL, ASVSPOOF2021_COST_MODEL])
def test_random_cm_is_near_one(cost_model: object) -> None:
    tar, non, spf = _asv()
    rng = np.random.default_rng(4)
    value = min_tdcf(rng.normal(size=3000), rng.normal(size=3000), tar, non, spf, cost_model)
    assert 0.9 < value <= 1.0 + 1e-12  # rejecting all or accepting all already costs 1


def test_tdcf_curve_hand_computed() -> None:
    # ASV error rates fixed by hand, 2019 model:
    # C1 = 0.9405 * (1 - 0.1) - 0.0095 * 10 * 0.2 = 0.82745 ; C2 = 10 * 0.05 * (1 - 0.3) = 0.35
    # Normalised curve = (C1 * frr + C2 * far) / C2.
    rates = AsvErrorRates(p_fa=0.2, p_miss=0.1, p_miss_spoof=0.3)
    curve, thr = compute_tdcf_curve([1.0, 2.0, 3.0], [0.0, 1.5], rates)
    frr, far, _ = compute_det_curve([1.0, 2.0, 3.0], [0.0, 1.5])
    np.testing.assert_allclose(curve, (0.82745 * frr + 0.35 * far) / 0.35)
    # Best point rejects only the lowest spoof: frr 0, far 1/2 -> 0.35 * 0.5 / 0.35 = 0.5.
    assert curve.min() == pytest.approx(0.5)
    assert thr[int(np.argmin(curve))] == 0.0


def test_tdcf_rejects_hard_decisions_and_bad_priors() -> None:
    tar, non, spf = _asv()
    with pytest.raises(ValueError, match="soft scores"):
        min_tdcf([1.0, 1.0], [0.0, 0.0], tar, non, spf)
    with pytest.raises(ValueError, match="sum to one"):
        CostModel2019(0.05, 0.95 * 0.99, 0.05 * 0.99, 1, 10, 1, 10)
    with pytest.raises(ValueError, match="ASV spoof scores are empty"):
        min_tdcf([0.0, 1.0, 2.0], [0.5], tar, non, [])


def test_read_asv_scores(tmp_path: Path) -> None:
    path = tmp_path / "asv.txt"
    path.write_text("LA_0069 target 3.5\nLA_0069 nontarget -1.25\n\nLA_0070 spoof 0.5\n")
    scores = read_asv_scores(path)
    np.testing.assert_array_equal(scores.target, [3.5])
    np.testing.assert_array_equal(scores.nontarget, [-1.25])
    np.testing.assert_array_equal(scores.spoof, [0.5])
    path.write_text("LA_0069 target 3.5\nLA_0069 impostor 1.0\n")
    with pytest.raises(ValueError, match=":2: key must be"):
        read_asv_scores(path)
    path.write_text("LA_0069 target 3.5\nLA_0069 nontarget 1.0\n")
    with pytest.raises(ValueError, match="no 'spoof' trials"):
        read_asv_scores(path)
