"""Score-level fusion of several detectors, with weights fitted on leave-one-system-out scores.

Why: a raw-waveform network and a cepstral GMM fail on different engines (they look at
different cues), so a linear combination of their scores misses fewer unseen engines than
either. The weights are a logistic regression fitted on the parts' pooled LOSO scores
(``bench/generalization.py``), where every spoof is an engine the part never saw: fitted on
dev, they would favour whichever part best memorised dev's six engines.

Two ways to combine the parts (``combine`` in the state):

* ``linear``: ``sum_i w_i * (s_i - mean_i) / scale_i + bias``, each part standardised on its
  dev bona fide scores (median, IQR), weights by logistic regression on LOSO scores.
* ``bona-normal``: each part's score becomes the normal quantile of its rank among the part's
  own dev bona fide scores (``reference``), extended linearly below the lowest of them, and
  the fused score is ``sum_i w_i * z_i``. Why: an LCNN with a one-class softmax saturates
  (genuine speech scores near +alpha, a seen engine near -alpha, an unseen one anywhere), so a
  straight line through its scores gave it a small weight and squashed its confident answers
  (on the dev calls it separated every spoofed voice, the linear fusion flagged 3 of 7). Ranks
  against genuine speech mean the same for every part, need only bona fide audio (which an
  operator has), and keep "further below any genuine voice" meaning "more evidence".

A fused checkpoint holds each part's whole callshield checkpoint (so each keeps its own
sample rate, window and weights) plus the combination::

    {"architecture": "fusion", "state_dict": {"parts": [checkpoint, ...],
     "mean": [...], "scale": [...], "weight": [...], "bias": float,
     "combine": "linear" | "bona-normal", "reference": [[bona fide scores], ...]}, ...}
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from models.architectures.scorer import WaveScorer

COMBINES = ("linear", "bona-normal")
#: scores closer than this many reference spreads tie (far below any score difference that
#: means something, far above float rounding between CPUs)
TIE_TOLERANCE = 1e-4


def bona_normal(scores: NDArray[np.floating],
                reference: NDArray[np.floating]) -> NDArray[np.float64]:
    """Scores as standard-normal quantiles of their rank among genuine ``reference`` scores.

    Inside the reference range: ``Phi^-1(F(s))``, ``F`` the empirical distribution with half a
    count of smoothing at each end (so no score maps to an infinite quantile). Below the lowest
    genuine score, where spoofs live, the quantile goes on falling linearly at the reference's
    robust spread (IQR / 1.349, the standard deviation of a normal with that IQR), so a score
    far below every genuine voice counts as more evidence than one just below them. Above the
    highest it stays at the top quantile: more genuine than every genuine voice is no more."""
    from scipy.special import ndtri

    ref = np.sort(np.asarray(reference, np.float64))
    s = np.asarray(scores, np.float64)
    n = ref.shape[0]
    if n < 2:
        raise ValueError("bona-normal fusion needs at least two reference scores")
    floor = 0.5 / (n + 1)
    q1, q3 = np.percentile(ref, [25, 75])
    spread = max(float(q3 - q1) / 1.349, 1e-6)
    # A score within float rounding of a reference score counts as equal to it. The dev bona
    # fide scores are the reference, so each one ties with itself; another CPU's rounding
    # (a few 1e-6) put half of them one rank lower, which moved the dev EER by two trials.
    rank = (np.searchsorted(ref, s + TIE_TOLERANCE * spread, side="right") + 0.5) / (n + 1)
    z = ndtri(np.clip(rank, floor, 1.0 - floor))
    return np.where(s < ref[0], ndtri(floor) + (s - ref[0]) / spread, z)


@cache
def _controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """Threads for the numpy parts, one per torch thread, shared by every fused model of the
    process. Idle threads wait on a queue, so they cost nothing between batches."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fusion-numpy")


class FusedScorer:
    """What ``load_detector`` builds for ``architecture: fusion``: ``score(waves)`` is
    ``sum_i w_i * (s_i - mean_i) / scale_i + bias`` over the parts' raw scores (``linear``)
    or ``sum_i w_i * bona_normal(s_i) + bias`` (``bona-normal``); higher = bona fide, the
    project's convention."""

    def __init__(self, parts: Sequence[Any], mean: Sequence[float], scale: Sequence[float],
                 weight: Sequence[float], bias: float, combine: str = "linear",
                 reference: Sequence[Sequence[float]] | None = None) -> None:
        if not len(parts) == len(mean) == len(scale) == len(weight):
            raise ValueError("one mean, scale and weight per part")
        if combine not in COMBINES:
            raise ValueError(f"unknown fusion combine {combine!r}; one of {COMBINES}")
        if combine == "bona-normal" and (reference is None or len(reference) != len(parts)):
            raise ValueError("bona-normal fusion needs one reference score list per part")
        self.combine = combine
        self.reference = [np.sort(np.asarray(r, np.float64)) for r in reference or []]
        self.parts = list(parts)  # models.inference.Detector objects
        self.mean = np.asarray(mean, np.float64)
        self.scale = np.asarray(scale, np.float64)
        self.weight = np.asarray(weight, np.float64)
        self.bias = float(bias)

    @property
    def min_samples(self) -> int:
        return max(p.min_samples for p in self.parts)

    def part_scores(self, waves: list[NDArray[np.floating]]) -> NDArray[np.float64]:
        batch = np.stack([np.asarray(w, np.float32) for w in waves])
        out: list[NDArray[np.float64] | None] = [None] * len(self.parts)
        numpy_parts = []
        for i, part in enumerate(self.parts):
            if isinstance(part.model, torch.nn.Module):
                out[i] = np.asarray(part.score_batch(batch), np.float64)
            else:
                numpy_parts.append(i)
        if numpy_parts:
            # The numpy parts (LFCC+GMM) run one BLAS thread each, on shares of the batch in a
            # pool as wide as torch's thread budget: numpy's FFT and small products use one
            # core, so one after another they left the second core idle for half the fused
            # score. One BLAS thread, because OpenBLAS workers keep spinning after a small
            # product and starve torch's threads (measured: the RawNet2 part ran 2.2x slower
            # right after a 2-thread GMM score).
            workers = max(1, torch.get_num_threads())
            shares = np.array_split(np.arange(len(batch)), min(workers, len(batch)))
            jobs = [(i, share) for i in numpy_parts for share in shares]
            with _controller().limit(limits=1, user_api="blas"):
                results = list(_pool(workers).map(
                    lambda job: self.parts[job[0]].score_batch(batch[job[1]]), jobs))
            for i in numpy_parts:
                out[i] = np.concatenate([np.asarray(r, np.float64)
                                         for (j, _), r in zip(jobs, results, strict=True)
                                         if j == i])
        return np.stack(out, axis=1)

    def score(self, waves: list[NDArray[np.floating]]) -> NDArray[np.float64]:
        if not waves:
            return np.zeros(0, np.float64)
        raw = self.part_scores(waves)
        if self.combine == "bona-normal":
            z = np.stack([bona_normal(raw[:, i], ref) for i, ref in enumerate(self.reference)],
                         axis=1)
        else:
            z = (raw - self.mean) / self.scale
        return z @ self.weight + self.bias


def fusion_state(parts: Sequence[dict[str, Any]], weights: dict[str, Any]) -> dict[str, Any]:
    """The ``state_dict`` of a fused checkpoint from the parts' checkpoints and the weights
    that ``bench.generalization.fusion_weights`` fitted."""
    state = {"parts": list(parts), "mean": list(weights["mean"]),
             "scale": list(weights["scale"]), "weight": list(weights["weight"]),
             "bias": float(weights["bias"]), "combine": weights.get("combine", "linear")}
    if "reference" in weights:
        state["reference"] = [[float(v) for v in r] for r in weights["reference"]]
    return state


class FusionScorer(WaveScorer):
    """Fused checkpoints: each part loads as the detector its own checkpoint describes."""

    architecture = "fusion"

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], device: torch.device,
                        dtype: torch.dtype) -> FusionScorer:
        from models.inference import detector_from_state

        fused = state["state_dict"]
        parts = [detector_from_state(p, device, dtype) for p in fused["parts"]]
        return cls(FusedScorer(parts, fused["mean"], fused["scale"], fused["weight"],
                               fused["bias"], fused.get("combine", "linear"),
                               fused.get("reference")))
