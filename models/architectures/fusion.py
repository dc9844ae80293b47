"""Score-level fusion of several detectors, with weights fitted on leave-one-system-out scores.

Why: a raw-waveform network and a cepstral GMM fail on different engines (they look at
different cues), so a linear combination of their scores misses fewer unseen engines than
either. The weights are a logistic regression fitted on the parts' pooled LOSO scores
(``bench/generalization.py``), where every spoof is an engine the part never saw: fitted on
dev, they would favour whichever part best memorised dev's six engines.

A fused checkpoint holds each part's whole callshield checkpoint (so each keeps its own
sample rate, window and weights) plus the standardisation and weights of the combination::

    {"architecture": "fusion", "state_dict": {"parts": [checkpoint, ...],
     "mean": [...], "scale": [...], "weight": [...], "bias": float}, ...}
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from models.architectures.scorer import WaveScorer


@cache
def _controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


class FusedScorer:
    """What ``load_detector`` builds for ``architecture: fusion``: ``score(waves)`` is
    ``sum_i w_i * (s_i - mean_i) / scale_i + bias`` over the parts' raw scores (higher =
    bona fide, the project's convention)."""

    def __init__(self, parts: Sequence[Any], mean: Sequence[float], scale: Sequence[float],
                 weight: Sequence[float], bias: float) -> None:
        if not len(parts) == len(mean) == len(scale) == len(weight):
            raise ValueError("one mean, scale and weight per part")
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
        out = []
        for part in self.parts:
            if isinstance(part.model, torch.nn.Module):
                out.append(part.score_batch(batch))
                continue
            # numpy parts on one BLAS thread: OpenBLAS workers keep spinning after a small
            # product and starve torch's threads (measured: the RawNet2 part ran 2.2x slower
            # right after a 2-thread GMM score).
            with _controller().limit(limits=1, user_api="blas"):
                out.append(part.score_batch(batch))
        return np.stack(out, axis=1)

    def score(self, waves: list[NDArray[np.floating]]) -> NDArray[np.float64]:
        if not waves:
            return np.zeros(0, np.float64)
        z = (self.part_scores(waves) - self.mean) / self.scale
        return z @ self.weight + self.bias


def fusion_state(parts: Sequence[dict[str, Any]], weights: dict[str, Any]) -> dict[str, Any]:
    """The ``state_dict`` of a fused checkpoint from the parts' checkpoints and the weights
    that ``bench.generalization.fusion_weights`` fitted."""
    return {"parts": list(parts), "mean": list(weights["mean"]), "scale": list(weights["scale"]),
            "weight": list(weights["weight"]), "bias": float(weights["bias"])}


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
                               fused["bias"]))
