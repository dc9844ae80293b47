"""Loading a trained detector by name or path and scoring waveforms with it.

This is the one entry point the server, the workers and the CLIs use, so that ``default``
means the same model everywhere. The checkpoint format itself (what a file records, how it is
read and written) is :mod:`models.checkpoint`; the architectures' scorers are
:mod:`models.architectures`; this module turns a checkpoint into a calibrated
:class:`Detector`. Official state_dicts (AASIST ``.pth``, RawNet2 ``.pth`` or ``.pth.xz``)
load too, with the official 16 kHz configs and no calibration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.architectures.scorer import Scorer, official_scorer, scorer_class
from models.checkpoint import is_callshield, read_checkpoint
from models.errors import ModelError

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
NAMED_MODELS = {
    # Three LFCC-LCNNs (one-class softmax; seeds 0 and 1, and one trained on a crowd of new
    # callers with their vocoded copies as spoofs) and two LFCC+GMMs (v2 and a finer front
    # end) in a bona-normal fusion, calibrated on leave-one-system-out scores
    # (LCNN_FUSION_CARD.md): v5's LOSO estimate with less than half its new-caller false
    # alarms, at the same throughput. The parts are embedded in the one file
    # (`python -m models unfuse` writes them out), so they do not ship twice.
    "default": CHECKPOINT_DIR / "lcnn_fusion.pt",
    "lcnn-fusion": CHECKPOINT_DIR / "lcnn_fusion.pt",  # the same model by its own name
    # the previous default: telephone-band RawNet2, best on dev's seen engines, at chance on
    # an unseen neural TTS (RAWNET2_TEL_CARD.md)
    "rawnet2-tel": CHECKPOINT_DIR / "rawnet2_tel.pt",
    # LFCC+GMM v2: deltas only, quiet frames dropped, calibrated on LOSO (LFCC_GMM_CARD.md);
    # the cheapest model, and a part of the default.
    "lfcc-gmm": CHECKPOINT_DIR / "lfcc_gmm.pt",
}
#: names once offered and no longer shipped, with why: asking for one says so and names the
#: models that are (docs/history.md has what they measured)
WITHDRAWN_MODELS = {
    "aasist-l": "a one-epoch placeholder (dev EER 56 %), never trained properly",
    "lcnn": "a part of the default, which embeds it (python -m models unfuse writes it out)",
    "fusion": "RawNet2 (vocoded) + LFCC+GMM v3, worse than the default on unseen engines "
              "(LOSO 19.4 % against 11.8 %) and slower",
    "rawnet2-voc": "the RawNet2 part of the withdrawn fusion v3",
}


class ModelNotFoundError(ModelError, FileNotFoundError):
    pass


@dataclass
class Calibration:
    """Logistic map from a raw score to P(bona fide); ``1 - p`` is the spoof probability.

    Fitted on the corpus dev split (:func:`fit_calibration`) so that scores from different
    models mean the same thing to the alert threshold.
    """

    scale: float = 1.0
    bias: float = 0.0

    def spoof_probability(self, scores: np.ndarray) -> np.ndarray:
        z = np.clip(self.scale * np.asarray(scores, dtype=np.float64) + self.bias, -60, 60)
        return 1.0 / (1.0 + np.exp(z))


def fit_calibration(scores: np.ndarray, labels: np.ndarray, prior: float = 0.5) -> Calibration:
    """Prior-weighted logistic regression of bona fide-vs-spoof on the score (Brümmer's
    linear calibration), by Newton's method; classes are re-weighted to ``prior`` so the
    bona fide/spoof imbalance of the dev split does not shift the 0.5 point."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    n_pos, n_neg = y.sum(), (1 - y).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("calibration needs both bona fide and spoof scores")
    w = np.where(y == 1, prior / n_pos, (1 - prior) / n_neg)
    a, b = 1.0 / (s.std() + 1e-9), -s.mean() / (s.std() + 1e-9)
    for _ in range(100):
        z = np.clip(a * s + b, -60, 60)
        p = 1 / (1 + np.exp(-z))
        g = np.array([np.sum(w * (p - y) * s), np.sum(w * (p - y))])
        h_diag = w * p * (1 - p)
        hess = np.array(
            [[np.sum(h_diag * s * s), np.sum(h_diag * s)], [np.sum(h_diag * s), np.sum(h_diag)]]
        )
        step = np.linalg.solve(hess + 1e-9 * np.eye(2), g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-10:
            break
    return Calibration(float(a), float(b))


@dataclass
class Detector:
    """A loaded countermeasure: raw scores (higher = bona fide) and spoof probabilities."""

    name: str
    version: str
    architecture: str
    sample_rate: int
    window_seconds: float
    scorer: Scorer  # the architecture's: builds, holds and scores the model
    calibration: Calibration = field(default_factory=Calibration)
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> Any:
        """The network (an ``nn.Module``) or the model object of a non-neural scorer."""
        return self.scorer.model

    @property
    def device(self) -> torch.device:
        return self.scorer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.scorer.dtype

    @property
    def window_samples(self) -> int:
        return int(round(self.window_seconds * self.sample_rate))

    @property
    def min_samples(self) -> int:
        """Shortest waveform the model accepts; shorter ones are repeat-padded."""
        return int(getattr(self.model, "min_samples", self.sample_rate // 4))

    def score_batch(self, batch: np.ndarray) -> np.ndarray:
        """Scores of equal-length waveforms ``(B, T)`` in one forward pass."""
        return self.scorer.score_batch(batch)

    def scores(self, waves: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """Scores of variable-length waveforms: grouped by length so each forward is one
        dense batch, and short ones repeat-padded to :attr:`min_samples`."""
        from models.data.audio import repeat_pad

        fitted = [w if w.shape[0] >= self.min_samples else repeat_pad(w, self.min_samples)
                  for w in waves]
        out = np.empty(len(fitted), dtype=np.float64)
        by_length: dict[int, list[int]] = {}
        for i, w in enumerate(fitted):
            by_length.setdefault(w.shape[0], []).append(i)
        for indices in by_length.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                out[chunk] = self.score_batch(np.stack([fitted[i] for i in chunk]))
        return out

    def spoof_probability(self, scores: np.ndarray) -> np.ndarray:
        return self.calibration.spoof_probability(scores)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_detector(
    name_or_path: str | Path, device: str = "cpu", half: bool = False
) -> Detector:
    """Load a model of :data:`NAMED_MODELS` (``default``, ``rawnet2-tel``, ``lfcc-gmm``) or a
    checkpoint path.

    ``half=True`` runs a neural model in float16 (GPU workers); CPU stays float32.
    """
    key = str(name_or_path)
    path = NAMED_MODELS.get(key, Path(key))
    if key in WITHDRAWN_MODELS and not path.is_file():
        raise ModelNotFoundError(
            f"model {key!r} is no longer shipped: {WITHDRAWN_MODELS[key]}; pick one of "
            f"{', '.join(NAMED_MODELS)} or give a checkpoint path")
    if not path.is_file():
        hint = " (train it with `python -m models train`)" if key in NAMED_MODELS else ""
        raise ModelNotFoundError(f"model {key!r} not found at {path}{hint}")
    state = read_checkpoint(path)
    torch_device = resolve_device(device)
    dtype = torch.float16 if half and torch_device.type == "cuda" else torch.float32
    if not is_callshield(state):
        scorer = official_scorer(state, torch_device, dtype)
        if scorer is None:
            raise ValueError(
                f"{path}: not a callshield checkpoint nor an official RawNet2/AASIST one")
        return Detector(
            name=path.stem, version="official", architecture=scorer.architecture,
            sample_rate=16000, window_seconds=64600 / 16000, scorer=scorer,
        )
    return detector_from_state(state, torch_device, dtype)


def detector_from_state(
    state: dict[str, Any], device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Detector:
    """A :class:`Detector` from a loaded callshield checkpoint dict."""
    device = device or torch.device("cpu")
    cls = scorer_class(state.get("scorer") or state["architecture"])
    return Detector(
        name=state["name"], version=state["version"], architecture=state["architecture"],
        sample_rate=int(state["sample_rate"]), window_seconds=float(state["window_seconds"]),
        scorer=cls.from_checkpoint(state, device, dtype),
        calibration=Calibration(**state.get("calibration", {})), card=state.get("card", {}),
    )
