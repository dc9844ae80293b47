"""Loading a trained detector by name or path and scoring waveforms with it.

This is the one entry point the server, the workers and the CLIs use, so that ``default``
means the same model everywhere.

A callshield checkpoint is a ``torch.save``d dict (loadable with ``weights_only=True``)::

    {"format": "callshield/1", "architecture": "rawnet2" | "aasist" | "lfcc_gmm" |
     "whisper_lr" | "fusion",
     "name": str, "version": str, "sample_rate": int, "window_seconds": float,
     "model_config": dict, "state_dict": dict, "calibration": {"scale", "bias"}, "card": dict}

Official state_dicts (AASIST ``.pth``, RawNet2 ``.pth`` or ``.pth.xz``) load too, with the
official 16 kHz configs and no calibration.
"""

from __future__ import annotations

import io
import lzma
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
FORMAT = "callshield/1"
NAMED_MODELS = {
    "default": CHECKPOINT_DIR / "default.pt",  # RawNet2-tel v1 (MODEL_CARD.md)
    # RawNet2 trained with vocoded bona fide as extra spoofs, fused with LFCC+GMM; weights and
    # calibration fitted on leave-one-system-out scores (FUSION_CARD.md). Best on LOSO, but
    # not the default: see the README, "Unseen engines".
    "fusion": CHECKPOINT_DIR / "fusion.pt",
    "rawnet2-voc": CHECKPOINT_DIR / "rawnet2_voc.pt",  # its RawNet2 part (RAWNET2_VOC_CARD.md)
    # LFCC+GMM v2: deltas only, quiet frames dropped, calibrated on LOSO (LFCC_GMM_CARD.md).
    "lfcc-gmm": CHECKPOINT_DIR / "lfcc_gmm.pt",
    "aasist-l": CHECKPOINT_DIR / "aasist_l.pt",
}


# Architectures that are not a logits ``nn.Module``: their model scores a list of waveforms.
WAVE_SCORERS = ("lfcc_gmm", "whisper_lr", "fusion")


class ModelNotFoundError(FileNotFoundError):
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
    model: Any  # nn.Module, or LFCCGMM for the classic baseline
    calibration: Calibration = field(default_factory=Calibration)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    official_score: bool = False
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def window_samples(self) -> int:
        return int(round(self.window_seconds * self.sample_rate))

    @property
    def min_samples(self) -> int:
        """Shortest waveform the model accepts; shorter ones are repeat-padded."""
        return int(getattr(self.model, "min_samples", self.sample_rate // 4))

    def score_batch(self, batch: np.ndarray) -> np.ndarray:
        """Scores of equal-length waveforms ``(B, T)`` in one forward pass."""
        if self.architecture in WAVE_SCORERS:
            return np.asarray(self.model.score(list(batch)), dtype=np.float64)
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        x = x.to(self.device, self.dtype, non_blocking=True)
        with torch.inference_mode():
            if self.official_score:
                out = self.model.score(x)
            else:
                logits = self.model(x).float()
                out = logits[:, 1] - logits[:, 0]  # log-odds of bona fide
        return out.float().cpu().numpy().astype(np.float64)

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


def _read_state(path: Path) -> dict[str, Any]:
    if path.suffix == ".xz":
        return torch.load(io.BytesIO(lzma.open(path).read()), map_location="cpu",
                          weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def build_model(architecture: str, model_config: dict[str, Any]) -> Any:
    if architecture == "rawnet2":
        from models.architectures.rawnet2 import RawNet2, RawNet2Config

        return RawNet2(RawNet2Config.from_dict(model_config))
    if architecture == "aasist":
        from models.architectures.aasist import AASIST, AASISTConfig

        return AASIST(AASISTConfig(**model_config))
    raise ValueError(f"unknown architecture {architecture!r}")


def _official_detector(path: Path, state: dict[str, Any]) -> tuple[str, Any, bool]:
    """Recognise an official state_dict by its keys and build the matching model."""
    if "gru.weight_ih_l0" in state:
        from models.architectures.rawnet2 import RawNet2, RawNet2Config

        model = RawNet2(RawNet2Config.baseline2021())
        model.load_state_dict(state, strict=True)
        return "rawnet2", model, True
    if "pos_S" in state:
        from models.architectures.aasist import AASIST, AASISTConfig

        width = state["encoder.0.0.conv1.weight"].shape[0]
        config = AASISTConfig.aasist() if width == 32 else AASISTConfig.aasist_l()
        model = AASIST(config)
        model.load_state_dict(state, strict=True)
        return "aasist", model, False
    raise ValueError(f"{path}: not a callshield checkpoint nor an official RawNet2/AASIST one")


def load_detector(
    name_or_path: str | Path, device: str = "cpu", half: bool = False
) -> Detector:
    """Load ``default``, ``lfcc-gmm``, ``aasist-l`` or a checkpoint path.

    ``half=True`` runs a neural model in float16 (GPU workers); CPU stays float32.
    """
    key = str(name_or_path)
    path = NAMED_MODELS.get(key, Path(key))
    if not path.is_file():
        hint = " (train it with `python -m models train`)" if key in NAMED_MODELS else ""
        raise ModelNotFoundError(f"model {key!r} not found at {path}{hint}")
    state = _read_state(path)
    torch_device = resolve_device(device)
    dtype = torch.float16 if half and torch_device.type == "cuda" else torch.float32
    if state.get("format") != FORMAT:
        architecture, model, official = _official_detector(path, state)
        model = model.to(torch_device, dtype).eval()
        return Detector(
            name=path.stem, version="official", architecture=architecture, sample_rate=16000,
            window_seconds=64600 / 16000, model=model, device=torch_device, dtype=dtype,
            official_score=official,
        )
    return detector_from_state(state, torch_device, dtype)


def detector_from_state(
    state: dict[str, Any], device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Detector:
    """A :class:`Detector` from a loaded callshield checkpoint dict."""
    device = device or torch.device("cpu")
    calibration = Calibration(**state.get("calibration", {}))
    common = dict(
        name=state["name"], version=state["version"], architecture=state["architecture"],
        sample_rate=int(state["sample_rate"]), window_seconds=float(state["window_seconds"]),
        calibration=calibration, card=state.get("card", {}),
    )
    if state["architecture"] == "lfcc_gmm":
        from models.architectures.lfcc_gmm import LFCCGMM

        return Detector(model=LFCCGMM.from_state_dict(state["state_dict"]), **common)
    if state["architecture"] == "whisper_lr":
        from models.architectures.whisper import WhisperLR

        return Detector(model=WhisperLR.from_state_dict(state["state_dict"]), **common)
    if state["architecture"] == "fusion":
        from models.architectures.fusion import FusedScorer

        fused = state["state_dict"]
        parts = [detector_from_state(p, device, dtype) for p in fused["parts"]]
        model = FusedScorer(parts, fused["mean"], fused["scale"], fused["weight"],
                            fused["bias"])
        return Detector(model=model, **common)
    model = build_model(state["architecture"], state["model_config"])
    model.load_state_dict(state["state_dict"], strict=True)
    model = model.to(device, dtype).eval()
    return Detector(model=model, device=device, dtype=dtype, **common)


def save_checkpoint(path: str | Path, **fields: Any) -> None:
    """Write a callshield checkpoint (see the module docstring for the fields)."""
    required = {"architecture", "name", "version", "sample_rate", "window_seconds", "state_dict"}
    missing = required - set(fields)
    if missing:
        raise ValueError(f"checkpoint fields missing: {sorted(missing)}")
    fields.setdefault("model_config", {})
    fields.setdefault("calibration", {"scale": 1.0, "bias": 0.0})
    fields.setdefault("card", {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": FORMAT, **fields}, tmp)
    tmp.replace(path)
